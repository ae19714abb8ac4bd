#!/usr/bin/env bash
# Installs the pinned image build tools once into a cache outside the repository, keyed by version, and prints the
# path of the one asked for. Usage: tools.sh cargo-auditable|syft
#   cargo-auditable (crates.io): embeds the crate list in each binary, so the SBOM names the exact crates shipped.
#   syft (Go module proxy): writes the SBOM from the finished root filesystem (dpkg status + auditable binaries).
set -euo pipefail
CARGO_AUDITABLE_VERSION=0.7.7
SYFT_VERSION=v1.57.2
cache=${SECUREMAIL_CACHE:-$HOME/.cache/securemail}

die() { echo "images/tools.sh: $*" >&2; exit 1; }
# shellcheck source=../e2e/build-once.sh
. "$(dirname "$0")/../e2e/build-once.sh"

case ${1:-} in
  cargo-auditable)
    dir=$cache/cargo-auditable-$CARGO_AUDITABLE_VERSION
    install_cargo_auditable() {
      echo "images/tools.sh: installing cargo-auditable $CARGO_AUDITABLE_VERSION (first run only)" >&2
      rm -rf "$dir.tmp"
      cargo install --quiet --locked --root "$dir.tmp" "cargo-auditable@$CARGO_AUDITABLE_VERSION" \
        || die "cargo install of cargo-auditable $CARGO_AUDITABLE_VERSION failed"
      rm -rf "$dir"; mv "$dir.tmp" "$dir"
    }
    build_once "$dir/bin/cargo-auditable" install_cargo_auditable
    echo "$dir/bin/cargo-auditable"
    ;;
  syft)
    dir=$cache/syft-$SYFT_VERSION
    build_syft() {
      command -v go >/dev/null || die "Go is not installed; it is needed to build syft"
      echo "images/tools.sh: building syft $SYFT_VERSION from the Go module proxy (first run only, minutes)" >&2
      rm -rf "$dir.tmp"; mkdir -p "$dir.tmp/bin"
      # The version stamp is what syft writes into each SBOM as its creator tool.
      GOBIN=$dir.tmp/bin CGO_ENABLED=0 go install -trimpath \
        -ldflags "-X main.version=${SYFT_VERSION#v}" "github.com/anchore/syft/cmd/syft@$SYFT_VERSION" \
        || die "go install of syft $SYFT_VERSION failed"
      rm -rf "$dir"; mv "$dir.tmp" "$dir"
    }
    build_once "$dir/bin/syft" build_syft
    echo "$dir/bin/syft"
    ;;
  *) die "usage: tools.sh cargo-auditable|syft" ;;
esac
