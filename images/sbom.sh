#!/usr/bin/env bash
# Writes the SPDX SBOM of an image archive with the pinned syft (images/tools.sh): the Debian packages from the
# image's dpkg records and the Rust crates from the binaries' cargo auditable sections, with versions. syft stamps
# each document with the current time and a random namespace; both are replaced by values that follow from the
# image (the commit's time, the manifest digest), so the same image always gets the same SBOM.
# Usage: sbom.sh ARCHIVE REF OUT_FILE EPOCH
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
archive=$1 ref=$2 out_file=$3 epoch=$4

syft=$("$here/tools.sh" syft)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# No update check, no network: everything syft needs is in the archive.
SYFT_CHECK_FOR_APP_UPDATE=false TMPDIR=$tmp "$syft" scan --quiet "oci-archive:$archive" \
  --source-name "${ref%:*}" --source-version "${ref##*:}" -o "spdx-json=$tmp/sbom.json"
python3 - "$tmp/sbom.json" "$out_file" "$archive" "$epoch" <<'PY'
import datetime, json, sys, tarfile
sbom_path, out_path, archive, epoch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with tarfile.open(archive) as tar:
    index = json.load(tar.extractfile("index.json"))
digest = index["manifests"][0]["digest"]
name = index["manifests"][0]["annotations"]["io.containerd.image.name"]
with open(sbom_path) as f:
    sbom = json.load(f)
sbom["creationInfo"]["created"] = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
    "%Y-%m-%dT%H:%M:%SZ")
repository = name.rsplit(":", 1)[0]
sbom["documentNamespace"] = f"https://{repository}/sbom/{digest.replace(':', '-')}"
with open(out_path, "w") as f:
    json.dump(sbom, f, indent=1, sort_keys=True)
    f.write("\n")
PY
