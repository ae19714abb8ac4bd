#!/usr/bin/env bash
# Installs what the build and the test suites need on a fresh Debian machine, and nothing when it is all there.
# Control-plane binaries (kube-apiserver, etcd) are built from Go modules by build-control-plane.sh instead.
set -euo pipefail

die() { echo "install-deps: $*" >&2; exit 1; }

# command -> Debian package providing it
declare -A packages=(
  [openssl]=openssl
  [curl]=curl
  [shellcheck]=shellcheck
)
missing=()
for cmd in "${!packages[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${packages[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi

for tool in cargo go kubectl; do
  command -v "$tool" >/dev/null || die "$tool is not installed (see README: Requirements)"
done
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing from the Rust toolchain"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing from the Rust toolchain"
