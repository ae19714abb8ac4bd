#!/usr/bin/env bash
# Checks of the images that need no container runtime. Usage: check.sh [reproducible|references]... (default both)
#   reproducible: builds the three images twice, into two fresh directories, and fails unless the archives, digests
#                 and SBOMs are byte for byte the same. The binaries come from the same cargo build both times;
#                 REBUILD_BINARIES=1 also builds them a second time from scratch in their own target directory.
#   references:   the references the images are built under are the ones the chart deploys (`helm template` with
#                 default values) and the ones the operator puts in a tenant's StatefulSet when the tenant names none
#                 (`securemail-operator render`, run from the operator image itself).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
scratch=$target_dir/images-check
die() { echo "images/check.sh: $*" >&2; exit 1; }
step() { echo "images/check.sh: $*" >&2; }

reproducible() {
  # Both builds stand for the commit checked out now, whatever is committed while they run.
  SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct)
  SECUREMAIL_IMAGE_REVISION=$(git -C "$root" rev-parse HEAD)
  export SOURCE_DATE_EPOCH SECUREMAIL_IMAGE_REVISION
  rm -rf "$scratch/first" "$scratch/second"
  step "first build"
  "$here/build.sh" "$scratch/first" >/dev/null
  if [ "${REBUILD_BINARIES:-0}" = 1 ]; then
    step "second build, binaries built again from scratch in $scratch/cargo (tens of minutes)"
    rm -rf "$scratch/cargo"
    CARGO_TARGET_DIR=$scratch/cargo "$here/build.sh" "$scratch/second" >/dev/null
  else
    step "second build"
    "$here/build.sh" "$scratch/second" >/dev/null
  fi
  local name status=0
  for name in operator sidecar mta; do
    for file in "$name.tar" "$name.spdx.json" "$name.digest"; do
      cmp -s "$scratch/first/$file" "$scratch/second/$file" || {
        echo "images/check.sh: $file differs between two builds of the same commit" >&2
        status=1
      }
    done
    [ $status -eq 0 ] && echo "reproducible: $name $(cut -d' ' -f1 "$scratch/first/$name.digest")"
  done
  [ $status -eq 0 ] || die "the builds are not reproducible; diffoscope on the two archives shows where"
  rm -rf "$scratch/first" "$scratch/second" "$scratch/cargo"
}

references() {
  local images=$target_dir/images
  "$here/build.sh" "$images" >/dev/null
  rm -rf "$scratch/references"; mkdir -p "$scratch/references"
  "$root/e2e/helm.sh" template securemail "$root/charts/securemail-operator" -n securemail-system \
    >"$scratch/references/chart.yaml"
  # The operator binary of the operator image, as the cluster would run it.
  python3 "$here/oci.py" extract --archive "$images/operator.tar" --path usr/local/bin/securemail-operator \
    --out "$scratch/references/securemail-operator"
  chmod +x "$scratch/references/securemail-operator"
  env -u SECUREMAIL_MTA_IMAGE -u SECUREMAIL_SIDECAR_IMAGE "$scratch/references/securemail-operator" render \
    -f "$root/examples/minimal.yaml" >"$scratch/references/render.yaml"
  python3 - "$images" "$scratch/references" <<'PY'
import json, sys, tarfile, yaml
images, refs = sys.argv[1], sys.argv[2]
built = {}
for name in ("operator", "sidecar", "mta"):
    with tarfile.open(f"{images}/{name}.tar") as tar:
        index = json.load(tar.extractfile("index.json"))
    built[name] = [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]
                   if "annotations" in m and "io.containerd.image.name" in m["annotations"]][0]
deployment = next(d for d in yaml.safe_load_all(open(f"{refs}/chart.yaml")) if d and d["kind"] == "Deployment")
container = deployment["spec"]["template"]["spec"]["containers"][0]
env = {e["name"]: e.get("value") for e in container.get("env", [])}
statefulset = next(d for d in yaml.safe_load_all(open(f"{refs}/render.yaml")) if d and d.get("kind") == "StatefulSet")
pod = {c["name"]: c["image"] for c in statefulset["spec"]["template"]["spec"]["containers"]}
wanted = [
    ("the chart's operator image", container["image"], built["operator"]),
    ("the chart's SECUREMAIL_MTA_IMAGE", env["SECUREMAIL_MTA_IMAGE"], built["mta"]),
    ("the chart's SECUREMAIL_SIDECAR_IMAGE", env["SECUREMAIL_SIDECAR_IMAGE"], built["sidecar"]),
    ("the operator's default postfix image", pod["postfix"], built["mta"]),
    ("the operator's default sidecar image", pod["sidecar"], built["sidecar"]),
]
failed = False
for what, found, expected in wanted:
    ok = found == expected
    failed |= not ok
    print(f"references: {what}: {found}" + ("" if ok else f" but make images builds {expected}"))
sys.exit(1 if failed else 0)
PY
}

checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=(references reproducible)
for check in "${checks[@]}"; do
  case $check in
    reproducible | references) "$check" ;;
    *) die "no check $check (reproducible, references)" ;;
  esac
done
