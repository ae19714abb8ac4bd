#!/usr/bin/env bash
# Coverage-guided fuzzing of one target on the stable toolchain: the SanitizerCoverage instrumentation that
# `cargo +nightly fuzz run` adds is also reachable through stable codegen flags; only AddressSanitizer (nightly's
# -Zsanitizer, not needed for safe Rust) is missing. --target keeps the flags off build scripts and proc macros.
# Usage: sidecar/fuzz/run-stable.sh [TARGET] [SECONDS]   (defaults: lmtp_session, 60)
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-lmtp_session}
seconds=${2:-60}
triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --release --target "$triple" --bin "$target"
mkdir -p "corpus/$target" "artifacts/$target"
"$CARGO_TARGET_DIR/$triple/release/$target" -max_total_time="$seconds" -max_len=4096 \
    -artifact_prefix="artifacts/$target/" "corpus/$target"
