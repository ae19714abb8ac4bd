#!/usr/bin/env python3
"""Writes a one-layer OCI image from a root filesystem directory, as an OCI archive (a tar of an OCI image layout).

No container engine is involved, and the output depends only on the inputs: entries sorted by path, every mtime set
to SOURCE_DATE_EPOCH, owners kept as numbers without names, gzip without a file name or time stamp. The same tree,
config and annotations therefore give the same digests on every build.

  oci.py image --rootfs DIR --config JSON --annotations JSON --ref REF --epoch N --out ARCHIVE
      prints: "<manifest digest> <compressed layer bytes> <uncompressed layer bytes>"
  oci.py attach-sbom --archive ARCHIVE --sbom FILE --media-type TYPE --epoch N
      adds the SBOM as an OCI artifact whose subject is the image (the referrers model of OCI 1.1).
  oci.py extract --archive ARCHIVE --path PATH --out FILE
      copies one file out of the image's layer.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
import tempfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def canonical(value):
    """JSON bytes that depend only on the value: sorted keys, no insignificant white space."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(rootfs, epoch, out, normalize=False):
    """Writes the root filesystem as an uncompressed tar to the binary file `out`, in sorted path order. Owners and
    modes are the tree's own (the build sets them on purpose), or with `normalize` root's and 0755/0644."""
    paths = []
    for directory, dirs, files in os.walk(rootfs):
        for name in dirs + files:
            full = os.path.join(directory, name)
            paths.append(os.path.relpath(full, rootfs))
    # Byte order, not locale order: the same on every machine.
    paths.sort(key=os.fsencode)
    seen_inodes = {}
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for rel in paths:
            full = os.path.join(rootfs, rel)
            st = os.lstat(full)
            info = tarfile.TarInfo(rel)
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid, info.gid = (0, 0) if normalize else (st.st_uid, st.st_gid)
            if normalize:
                info.mode = 0o755 if stat.S_ISDIR(st.st_mode) else 0o644
            info.uname = info.gname = ""
            info.mtime = epoch
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(full)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen_inodes:
                    info.type = tarfile.LNKTYPE
                    info.linkname = seen_inodes[key]
                    tar.addfile(info)
                    continue
                seen_inodes[key] = rel
                info.size = st.st_size
                with open(full, "rb") as data:
                    tar.addfile(info, data)
            else:
                sys.exit(f"oci.py: {full}: only directories, regular files and symbolic links belong in an image")


class Layout:
    """An OCI image layout being written in a directory: blobs by digest plus index.json."""

    def __init__(self, directory):
        self.directory = directory
        os.makedirs(os.path.join(directory, "blobs", "sha256"), exist_ok=True)

    def blob(self, data, media_type, **extra):
        digest = sha256(data)
        with open(os.path.join(self.directory, "blobs", "sha256", digest[7:]), "wb") as out:
            out.write(data)
        return dict(mediaType=media_type, digest=digest, size=len(data), **extra)

    def write_index(self, manifests):
        with open(os.path.join(self.directory, "oci-layout"), "wb") as out:
            out.write(canonical({"imageLayoutVersion": "1.0.0"}))
        with open(os.path.join(self.directory, "index.json"), "wb") as out:
            out.write(canonical({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                 "manifests": manifests}))


def archive(layout_dir, epoch, path):
    """Tars the layout directory (what `ctr images import` and `skopeo copy oci-archive:` read)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as out:
        layer_tar(layout_dir, epoch, out, normalize=True)
    os.replace(tmp, path)


def unpack(path, directory):
    with tarfile.open(path) as tar:
        tar.extractall(directory, filter="data")


def build_image(args):
    config = json.loads(args.config)
    annotations = json.loads(args.annotations)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.out))) as work:
        layout = Layout(os.path.join(work, "layout"))
        raw = io.BytesIO()
        layer_tar(args.rootfs, args.epoch, raw)
        raw_bytes = raw.getvalue()
        compressed = io.BytesIO()
        # No file name and a zero time in the gzip header; level 9 is what the layer's size figures assume.
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=9, mtime=0) as gz:
            gz.write(raw_bytes)
        layer = layout.blob(compressed.getvalue(), LAYER)
        config["rootfs"] = {"type": "layers", "diff_ids": [sha256(raw_bytes)]}
        config_descriptor = layout.blob(canonical(config), CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config_descriptor, "layers": [layer],
                    "annotations": annotations}
        tag = args.ref.rsplit(":", 1)[1]
        manifest_descriptor = layout.blob(canonical(manifest), MANIFEST, annotations={
            # containerd names the imported image after the first, other tools take the tag from the second.
            "io.containerd.image.name": args.ref,
            "org.opencontainers.image.ref.name": tag,
        })
        layout.write_index([manifest_descriptor])
        archive(layout.directory, args.epoch, args.out)
    print(manifest_descriptor["digest"], layer["size"], len(raw_bytes))


def attach_sbom(args):
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.archive))) as work:
        directory = os.path.join(work, "layout")
        unpack(args.archive, directory)
        with open(os.path.join(directory, "index.json"), "rb") as index_file:
            index = json.load(index_file)
        # Only the image itself stays: attaching again replaces the SBOM instead of adding a second one.
        image = [m for m in index["manifests"] if m["mediaType"] == MANIFEST and "artifactType" not in m]
        if len(image) != 1:
            sys.exit(f"oci.py: {args.archive}: expected one image manifest, found {len(image)}")
        subject = {k: image[0][k] for k in ("mediaType", "digest", "size")}
        layout = Layout(directory)
        with open(args.sbom, "rb") as sbom_file:
            sbom = layout.blob(sbom_file.read(), args.media_type,
                               annotations={"org.opencontainers.image.title": os.path.basename(args.sbom)})
        empty = layout.blob(b"{}", EMPTY_CONFIG)
        artifact = {"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": args.media_type, "config": empty,
                    "layers": [sbom], "subject": subject}
        descriptor = layout.blob(canonical(artifact), MANIFEST, artifactType=args.media_type)
        # Blobs of an earlier SBOM are left out of the archive: only what the index reaches is kept.
        reachable = set(reachable_blobs(directory, image[0]["digest"]))
        reachable |= {descriptor["digest"], sbom["digest"], empty["digest"]}
        for name in os.listdir(os.path.join(directory, "blobs", "sha256")):
            if "sha256:" + name not in reachable:
                os.remove(os.path.join(directory, "blobs", "sha256", name))
        layout.write_index([image[0], descriptor])
        archive(directory, args.epoch, args.archive)


def reachable_blobs(directory, manifest_digest):
    with open(os.path.join(directory, "blobs", "sha256", manifest_digest[7:]), "rb") as manifest_file:
        manifest = json.load(manifest_file)
    return [manifest_digest, manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]


def image_manifest(tar):
    index = json.load(tar.extractfile("index.json"))
    image = [m for m in index["manifests"] if m["mediaType"] == MANIFEST and "artifactType" not in m]
    return json.load(tar.extractfile("blobs/sha256/" + image[0]["digest"][7:]))


def extract(args):
    with tarfile.open(args.archive) as tar:
        manifest = image_manifest(tar)
        layer = tar.extractfile("blobs/sha256/" + manifest["layers"][0]["digest"][7:])
        with tarfile.open(fileobj=layer, mode="r:gz") as files:
            member = files.extractfile(args.path.lstrip("/"))
            if member is None:
                sys.exit(f"oci.py: {args.archive}: no file {args.path} in the image")
            with open(args.out, "wb") as out:
                out.write(member.read())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    image = commands.add_parser("image")
    image.add_argument("--rootfs", required=True)
    image.add_argument("--config", required=True, help="image config JSON without rootfs")
    image.add_argument("--annotations", required=True, help="manifest annotations JSON")
    image.add_argument("--ref", required=True, help="full reference, e.g. ghcr.io/securemail/operator:0.1.0")
    image.add_argument("--epoch", type=int, required=True)
    image.add_argument("--out", required=True)
    sbom = commands.add_parser("attach-sbom")
    sbom.add_argument("--archive", required=True)
    sbom.add_argument("--sbom", required=True)
    sbom.add_argument("--media-type", required=True)
    sbom.add_argument("--epoch", type=int, required=True)
    extract_file = commands.add_parser("extract")
    extract_file.add_argument("--archive", required=True)
    extract_file.add_argument("--path", required=True)
    extract_file.add_argument("--out", required=True)
    args = parser.parse_args()
    {"image": build_image, "attach-sbom": attach_sbom, "extract": extract}[args.command](args)


if __name__ == "__main__":
    main()
