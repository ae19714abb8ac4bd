#!/usr/bin/env bash
# TLS policy lookup benchmark: the sidecar's socketmap endpoint (`securemail-sidecar policy-socketmap`) against
# postfix-mta-sts-resolver's `mta-sts-daemon` (PyPI, pinned, with uvloop), both answering Postfix socketmap lookups
# for the MTA-STS domains of a data-plane world of its own, through the same client (e2e/dataplane/socketmap_bench.py):
# first that both answers agree (and what the sidecar answers for the DANE domains), then the first lookup per
# domain after a start (ROUNDS restarts, the order of the two alternating), then N warm lookups from 1 and from 4
# client processes. Prints the figures and the ratio sidecar/anchor.
# One world runs per machine (fixed namespace names): the world's whole lifetime holds the shared lock.
# Usage: bench-policy.sh [N] [ROUNDS]   (defaults: 20000, 10)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
count=${1:-20000}
rounds=${2:-10}
dir=${SECUREMAIL_BENCH_DATAPLANE_DIR:-/tmp/securemail-bench-dataplane}
lock=${SECUREMAIL_DATAPLANE_LOCK:-/tmp/securemail-dataplane.lock}
target=${CARGO_TARGET_DIR:-$root/target}/release
resolver_version=1.5.1
# Every package of the anchor's venv, pinned, so the anchor is the same program on every run.
resolver_packages=(
  "postfix-mta-sts-resolver[uvloop]==$resolver_version" aiodns==4.0.4 aiohappyeyeballs==2.7.1 aiohttp==3.14.5
  aiosignal==1.4.0 attrs==26.1.0 cffi==2.1.1 frozenlist==1.8.0 idna==3.20 multidict==7.2.1 propcache==0.5.4
  pycares==5.2.1 pycparser==3.12 PyYAML==6.0.4 typing_extensions==4.16.0 uvloop==0.23.0 yarl==1.25.1
)
venv=${XDG_CACHE_HOME:-$HOME/.cache}/securemail/venv-mta-sts-resolver-$resolver_version
sidecar_addr=127.0.0.1:18461
anchor_addr=127.0.0.1:28461
mta_ns=smdp-mta
client=$here/dataplane/socketmap_bench.py
log() { echo "bench-policy: $*" >&2; }

cd "$root"
cargo build --locked -q --release -p securemail-sidecar --bin securemail-sidecar
if [ ! -x "$venv/bin/mta-sts-daemon" ]; then
  log "installing postfix-mta-sts-resolver $resolver_version into $venv"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q "${resolver_packages[@]}"
fi

exec 9>"$lock"
log "waiting for $lock (one data-plane world per machine)"
flock 9
pids=()
stop_servers() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}
# Daemons must not inherit the lock (9>&-), or it would outlive this script.
teardown() {
  stop_servers
  "$here/dataplane/down.sh" "$dir" >/dev/null 2>&1 9>&- || true
  flock -u 9
}
trap teardown EXIT
log "starting the data-plane world in $dir"
"$here/dataplane/up.sh" "$dir" >/dev/null 9>&-
world() { sed -n "s/^$1=//p" "$dir/world.env"; }
ca=$(world SMDP_CA_FILE)
sts_domains=("$(world SMDP_CASE_STS)" "$(world SMDP_CASE_STS_NOMATCH)")
dane_domains=("$(world SMDP_CASE_DANE)" "$(world SMDP_CASE_DANE_TA)")

work=$dir/bench-policy
mkdir -p "$work"
# The sidecar reads only tlsPolicy and dns; the rest is what any sidecar.yaml must contain.
cat >"$work/sidecar.yaml" <<EOF
tenant: bench/policy
source: {address: $(world SMDP_MTA_ADDR), hostname: $(world SMDP_MTA_HOSTNAME)}
listen: {lmtp: $work/lmtp.sock, admin: 127.0.0.1:9090}
signing: []
tlsPolicy: {}
warmup: {providerShares: {gmail: 20, microsoft: 20, yahoo: 20, apple: 20, other: 20}}
evidence: {dir: $work/evidence, retentionDays: 1}
stateDir: $work/state
maxMessageBytes: 1048576
dns: {nameservers: ['$(world SMDP_RESOLVER):53'], trustAnchorFile: '$(world SMDP_TRUST_ANCHOR)'}
EOF
# The resolver's defaults (internal cache, 60 s grace, SNI required), on another loopback port; it asks the
# namespace's resolver (/etc/netns/smdp-mta/resolv.conf, the world's unbound).
cat >"$work/mta-sts-daemon.yml" <<EOF
host: ${anchor_addr%:*}
port: ${anchor_addr#*:}
reuse_port: true
shutdown_timeout: 5
cache:
  type: internal
  options:
    cache_size: 10000
default_zone:
  strict_testing: false
  timeout: 4
  require_sni: true
EOF

wait_port() {
  local _
  for _ in $(seq 1 100); do
    # shellcheck disable=SC2016 # the inner script gets its arguments as $1 and $2
    if ip netns exec "$mta_ns" bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "${2%:*}" "${2#*:}" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "$1 did not listen on $2 within 10 s; its log: $work/$1.log"
  tail -n 20 "$work/$1.log" >&2
  exit 1
}
start_servers() {
  ip netns exec "$mta_ns" env SSL_CERT_FILE="$ca" RUST_LOG=warn "$target/securemail-sidecar" policy-socketmap \
    --config "$work/sidecar.yaml" --listen "$sidecar_addr" </dev/null >>"$work/sidecar.log" 2>&1 9>&- &
  pids+=("$!")
  ip netns exec "$mta_ns" env SSL_CERT_FILE="$ca" "$venv/bin/mta-sts-daemon" -v warn -c "$work/mta-sts-daemon.yml" \
    </dev/null >>"$work/anchor.log" 2>&1 9>&- &
  pids+=("$!")
  wait_port sidecar "$sidecar_addr"
  wait_port anchor "$anchor_addr"
}
client() { ip netns exec "$mta_ns" python3 "$client" "$@"; }
domain_args() { local d; for d in "$@"; do printf -- '--domain\n%s\n' "$d"; done; }
mapfile -t sts_args < <(domain_args "${sts_domains[@]}")
mapfile -t all_args < <(domain_args "${sts_domains[@]}" "${dane_domains[@]}")

results=$work/results.jsonl
: >"$results"
log "cold: the first lookup of each MTA-STS domain after a start, $rounds rounds"
for round in $(seq 1 "$rounds"); do
  start_servers
  if [ $((round % 2)) -eq 1 ]; then
    order=(--target "sidecar=$sidecar_addr" --target "anchor=$anchor_addr")
  else
    order=(--target "anchor=$anchor_addr" --target "sidecar=$sidecar_addr")
  fi
  client first "${order[@]}" "${sts_args[@]}" >>"$results"
  stop_servers
done

start_servers
log "answers of both for the MTA-STS and DANE domains"
client check --sidecar "$sidecar_addr" --anchor "$anchor_addr" "${all_args[@]}"
for clients in 1 4; do
  log "warm: $count lookups from $clients client(s), each server in turn"
  client load --target "sidecar=$sidecar_addr" "${sts_args[@]}" -n "$count" -c "$clients" >>"$results"
  client load --target "anchor=$anchor_addr" "${sts_args[@]}" -n "$count" -c "$clients" >>"$results"
done
stop_servers

echo
echo "TLS policy lookups over socketmap (sidecar policy-socketmap vs postfix-mta-sts-resolver $resolver_version)," \
  "domains: ${sts_domains[*]}; $(nproc) cores, $(date -u +%Y-%m-%d)"
python3 "$client" report "$results"
