#!/usr/bin/env bash
# Installs what building (`build`) or running (`run`) the images needs on a fresh Debian machine, and nothing when it
# is all there. build: readelf (the libraries a binary needs) and dpkg-deb; run: Debian's containerd and runc for
# images/containers.sh. Go (syft) and cargo (cargo-auditable) come with the toolchains the README lists;
# e2e/install-deps.sh installs the rest the container test uses (jq, curl, openssl, swaks, iproute2).
# Usage: install-deps.sh build|run
set -euo pipefail
case ${1:-} in
  build) declare -A packages=([readelf]=binutils [dpkg-deb]=dpkg) ;;
  run) declare -A packages=([containerd]=containerd [ctr]=containerd [runc]=runc) ;;
  *) echo "usage: images/install-deps.sh build|run" >&2; exit 1 ;;
esac
missing=()
for cmd in "${!packages[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${packages[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "images/install-deps.sh: installing ${missing[*]}" >&2
command -v apt-get >/dev/null || {
  echo "images/install-deps.sh: apt-get not found; install ${missing[*]}" >&2
  exit 1
}
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The tests start a containerd of their own; the system service the package starts is not needed.
if [[ " ${missing[*]} " == *" containerd "* ]] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now containerd.service >/dev/null 2>&1 ||
    echo "images/install-deps.sh: could not stop containerd" >&2
fi
