#!/usr/bin/env bash
# Sidecar benchmark: in a data-plane world of its own, N messages (10 KB, DKIM RSA-2048) through Postfix → LMTP →
# sidecar → a TLS 1.3 Postfix receiver, against Postfix delivering the same N directly with verified TLS, measured in
# the same run (e2e/examples/bench_sidecar.rs); plus the policy-cache hit latency against a plain HashMap
# (sidecar/examples/policy_cache_bench.rs). Prints each figure with its target; a MISS is reported, not fatal, but a
# broken run (a message missing, a step failing) exits non-zero.
# One world runs per machine (fixed namespace names): the world's whole lifetime holds the shared lock.
# Usage: bench-sidecar.sh [N]   (default 2000)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
count=${1:-2000}
dir=${SECUREMAIL_BENCH_DATAPLANE_DIR:-/tmp/securemail-bench-dataplane}
lock=${SECUREMAIL_DATAPLANE_LOCK:-/tmp/securemail-dataplane.lock}
target=${CARGO_TARGET_DIR:-$root/target}/release
log() { echo "bench-sidecar: $*" >&2; }

cd "$root"
cargo build --locked -q --release -p securemail-operator --bin securemail-operator \
  -p securemail-sidecar --bin securemail-sidecar --example policy_cache_bench \
  -p securemail-e2e --example bench_sidecar

log "policy cache: resolve() hits vs a plain HashMap"
"$target/examples/policy_cache_bench" 100000

exec 9>"$lock"
log "waiting for $lock (one data-plane world per machine)"
flock 9
# Daemons must not inherit the lock (9>&-), or it would outlive this script.
teardown() {
  "$here/dataplane/down.sh" "$dir" >/dev/null 2>&1 9>&- || true
  flock -u 9
}
trap teardown EXIT
log "starting the data-plane world in $dir"
"$here/dataplane/up.sh" "$dir" >/dev/null 9>&-
SECUREMAIL_DATAPLANE_DIR=$dir SECUREMAIL_OPERATOR_BIN=$target/securemail-operator \
  SECUREMAIL_SIDECAR_BIN=$target/securemail-sidecar "$target/examples/bench_sidecar" "$count" 9>&-
