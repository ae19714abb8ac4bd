#!/usr/bin/env bash
# Coverage-guided fuzzing of one target on the stable toolchain: the SanitizerCoverage instrumentation that
# `cargo +nightly fuzz run` adds is also reachable through stable codegen flags; only AddressSanitizer (nightly's
# -Zsanitizer, not needed for safe Rust) is missing. --target keeps the flags off build scripts and proc macros.
# Usage: sidecar/fuzz/run-stable.sh [TARGET] [SECONDS] [libFuzzer options...]   (defaults: lmtp_session, 60)
# Starts from the committed seeds (seeds/TARGET, read only) and the working corpus (corpus/TARGET, git-ignored,
# where new inputs go); a crash is saved under artifacts/TARGET/ and makes the script fail. Builds in
# $CARGO_TARGET_DIR/fuzz when CARGO_TARGET_DIR is set (never in the main build's directory: other flags), else
# sidecar/fuzz/target.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:-lmtp_session}
seconds=${2:-60}
shift $(($# < 2 ? $# : 2))
[ -f "fuzz_targets/$target.rs" ] || { echo "no fuzz target $target in sidecar/fuzz/fuzz_targets" >&2; exit 2; }
triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
# All targets in one build: the second target's run then starts without compiling.
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --locked --quiet --release --target "$triple" --bins
mkdir -p "corpus/$target" "artifacts/$target"
# -timeout: an input taking 10 s is a hang, a finding like a panic.
"$CARGO_TARGET_DIR/$triple/release/$target" -max_total_time="$seconds" -max_len=4096 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="artifacts/$target/" "$@" "corpus/$target" "seeds/$target"
