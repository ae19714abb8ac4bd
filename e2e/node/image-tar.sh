#!/usr/bin/env bash
# Writes a single-layer image as a docker-archive tar (what `ctr images import` reads) from static binaries, so the
# test node runs images without a registry or a Docker engine. Byte-identical output for the same inputs.
# Usage: image-tar.sh OUT.tar REPO:TAG ENTRYPOINT FILE... (each FILE lands in the image's / under its base name;
# FILE=PATH puts it at PATH in the image instead, e.g. a dynamically linked binary's libraries at their paths)
set -euo pipefail

[ $# -ge 4 ] || { echo "usage: image-tar.sh OUT.tar REPO:TAG ENTRYPOINT FILE[=PATH]..." >&2; exit 2; }
out=$1 ref=$2 entrypoint=$3
shift 3

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs" "$work/archive"
for f in "$@"; do
  if [[ $f == *=* ]]; then install -D -m 0755 "${f%%=*}" "$work/rootfs/${f#*=}"
  else install -m 0755 "$f" "$work/rootfs/$(basename "$f")"; fi
done
# Fixed owner, order and times make the layer digest depend on the files only.
tar -C "$work/rootfs" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$work/layer.tar" .
layer=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
mkdir "$work/archive/$layer"
mv "$work/layer.tar" "$work/archive/$layer/layer.tar"
printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["%s"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$entrypoint" "$layer" > "$work/config.json"
config=$(sha256sum "$work/config.json" | cut -d' ' -f1)
mv "$work/config.json" "$work/archive/$config.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' "$config" "$ref" "$layer" \
  > "$work/archive/manifest.json"
tar -C "$work/archive" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$out.tmp" .
mv "$out.tmp" "$out"
