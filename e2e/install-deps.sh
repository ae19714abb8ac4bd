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
  [postconf]=postfix
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

# dkimpy (pynacl for Ed25519, dnspython for zone-file TXT parsing) is the independent DKIM verifier that the
# operator's key tests sign and verify with; PyYAML reads rendered manifests in the demo.
if ! python3 -c 'import dkim, nacl, dns.rdata, yaml' 2>/dev/null; then
  command -v python3 >/dev/null || die "python3 is not installed (see README: Requirements)"
  echo "install-deps: installing dkimpy, pynacl, dnspython, pyyaml" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    dkimpy==1.1.8 pynacl==1.5.0 dnspython==2.9.2 pyyaml==6.0.3 || die "pip install of the Python test tools failed"
fi

for tool in cargo go kubectl; do
  command -v "$tool" >/dev/null || die "$tool is not installed (see README: Requirements)"
done
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing from the Rust toolchain"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing from the Rust toolchain"
