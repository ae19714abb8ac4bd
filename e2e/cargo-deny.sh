#!/usr/bin/env bash
# Runs the pinned cargo-deny, installed once from crates.io (`cargo install --locked`) into a cache outside the
# repository, keyed by version. Usage: cargo-deny.sh ARGS...
set -euo pipefail
# shellcheck source=build-once.sh
. "$(dirname "$0")/build-once.sh"
CARGO_DENY_VERSION=0.20.2
dir=${SECUREMAIL_CACHE:-$HOME/.cache/securemail}/cargo-deny-$CARGO_DENY_VERSION
install_cargo_deny() {
  echo "cargo-deny.sh: installing cargo-deny $CARGO_DENY_VERSION (first run only, a few minutes)" >&2
  rm -rf "$dir.tmp"
  cargo install --quiet --locked --root "$dir.tmp" "cargo-deny@$CARGO_DENY_VERSION" \
    || { echo "cargo-deny.sh: cargo install of cargo-deny $CARGO_DENY_VERSION failed" >&2; exit 1; }
  rm -rf "$dir"; mv "$dir.tmp" "$dir"
}
build_once "$dir/bin/cargo-deny" install_cargo_deny
exec "$dir/bin/cargo-deny" "$@"
