#!/usr/bin/env bash
# Builds the release binaries the operator and sidecar images ship and prints the directory they are in: built for the
# host triple named explicitly, so the flags below stay out of target/release (the benchmarks' build) and out of build
# scripts; with cargo auditable, so the crate list is in each binary. Paths of the checkout, of the target directory
# (generated code is compiled from there) and of cargo's registry are rewritten so the binaries do not depend on
# where they were built (rustc applies the last prefix that matches); symbols are stripped (the crate list is a
# section of its own and stays). Used by images/build.sh, and by e2e/prebuild.sh to build them ahead of it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
triple=$(rustc -vV | sed -n 's/^host: //p')
cargo_auditable=$("$here/tools.sh" cargo-auditable)
cargo_home=${CARGO_HOME:-$HOME/.cargo}
# SOURCE_DATE_EPOCH for the C compiler (aws-lc): always the same value. GCC reads it for __DATE__/__TIME__, and cc's
# build scripts rebuild when it changes, which with the commit's time would rebuild aws-lc and everything above it at
# every commit.
(cd "$root" && RUSTFLAGS="--remap-path-prefix=$root=/securemail --remap-path-prefix=$target_dir=/target \
  --remap-path-prefix=$cargo_home=/cargo" \
  CARGO_PROFILE_RELEASE_STRIP=symbols SOURCE_DATE_EPOCH=0 \
  "$cargo_auditable" auditable build --quiet --locked --release --target "$triple" \
  -p securemail-operator --bin securemail-operator -p securemail-sidecar --bin securemail-sidecar)
echo "$target_dir/$triple/release"
