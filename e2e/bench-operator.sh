#!/usr/bin/env bash
# Operator benchmark: applies N tenants to a fresh local control plane and measures the time until every one is
# DkimReady and ConfigValid, against the floor of generating N RSA-2048 keys on every core measured in the same run;
# the operator's CPU above that floor per tenant; its peak RSS, per tenant above an operator with no tenant; and a
# restart over the converged tenants: the time of its relist and no-op pass and its apiserver writes (audit log).
# Usage: bench-operator.sh [N]   (default 1000)
# Cores: in a cluster the control plane runs on other machines than the operator. So by default etcd and
# kube-apiserver get the last core to themselves, and the operator and the keygen floor get the others (the floor is
# N keys / the operator's cores). BENCH_SHARED_CORES=1 runs everything on every core instead, where the control
# plane's CPU for each tenant's writes competes with key generation.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
count=${1:-1000}
export SECUREMAIL_CLUSTER_DIR=${SECUREMAIL_BENCH_DIR:-/tmp/securemail-bench}
export SECUREMAIL_ETCD_PORT=24791 SECUREMAIL_APISERVER_PORT=27443
dir=$SECUREMAIL_CLUSTER_DIR
namespace=bench
operator_user=system:serviceaccount:securemail-system:securemail-operator
log() { echo "bench-operator: $*" >&2; }

cores=$(nproc)
if [ "${BENCH_SHARED_CORES:-0}" = 1 ] || [ "$cores" -lt 2 ]; then
  operator_cores=0-$((cores - 1)) control_plane_cores=$operator_cores
else
  operator_cores=0-$((cores - 2)) control_plane_cores=$((cores - 1))
fi

cd "$root"
cargo build --locked -q --release -p securemail-operator --bin securemail-operator --example keygen_floor
"$here/cluster-down.sh" >/dev/null 2>&1 || true
trap '"$here/cluster-down.sh" >/dev/null 2>&1 || true' EXIT
export KUBECONFIG
KUBECONFIG=$("$here/cluster-up.sh" | tail -n 1)
# Every thread, present and future (new threads inherit the affinity of the thread that makes them).
taskset -a -cp "$control_plane_cores" "$(cat "$dir/etcd.pid")" >/dev/null
taskset -a -cp "$control_plane_cores" "$(cat "$dir/kube-apiserver.pid")" >/dev/null
kubectl create namespace "$namespace" >/dev/null
# Installed the way users install it; one replica, so no lease is waited for.
"$here/helm.sh" install securemail-operator charts/securemail-operator -n securemail-system --create-namespace \
  --set replicaCount=1 --set "tenantNamespaces={$namespace}" >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/securemailtenants.securemail.io >/dev/null

# The operator's own memory before any tenant exists: what the per-tenant cost is measured above.
SECUREMAIL_OPERATOR_BIN=$root/target/release/securemail-operator taskset -c "$operator_cores" "$here/operator-up.sh"
sleep 5
base_kib=$(sed -n 's/^VmHWM:\s*\([0-9]*\) kB/\1/p' "/proc/$(cat "$dir/securemail-operator.pid")/status")
kill "$(cat "$dir/securemail-operator.pid")"
while kill -0 "$(cat "$dir/securemail-operator.pid")" 2>/dev/null; do sleep 0.2; done

log "keygen floor: $count RSA-2048 keys on cores $operator_cores (control plane on $control_plane_cores)"
floor=$(taskset -c "$operator_cores" target/release/examples/keygen_floor "$count")

log "applying $count tenants"
python3 - "$count" > "$dir/tenants.yaml" <<'PY'
import sys
for i in range(int(sys.argv[1])):
    print(f"""---
apiVersion: securemail.io/v1alpha1
kind: SecureMailTenant
metadata: {{name: tenant-{i}, namespace: bench}}
spec:
  domains: [{{name: notify.tenant-{i}.example}}]
  ipPool: {{addresses: [{{address: 10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}, hostname: mta.tenant-{i}.example}}]}}
  submission: {{tls: {{secretName: submission-tls}}, clientCertificates: {{caSecretName: apps-ca}}}}""")
PY
# Every tenant names the same two Secrets; the operator checks that they exist (ConfigValid).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "/CN=bench" \
  -keyout "$dir/tls.key" -out "$dir/tls.crt" 2>/dev/null
kubectl -n "$namespace" create secret tls submission-tls --cert="$dir/tls.crt" --key="$dir/tls.key" >/dev/null
kubectl -n "$namespace" create secret generic apps-ca --from-file=ca.crt="$dir/tls.crt" >/dev/null
kubectl apply --server-side -f "$dir/tenants.yaml" >/dev/null

# Cheap progress signal: the operator's own tenants-by-condition gauge (from its cache), so polling does not load
# the apiserver that is being measured; the apiserver's answer is what counts once the gauge says done. A scrape
# encodes every tenant's series, so it is asked every N/1000 seconds (at least 0.5): about the same number of scrapes
# at any N, each within 1 % of the converge time, rather than a polling cost in the operator's CPU that grows as N².
poll_seconds=$(python3 -c "print(max(0.5, $count / 1000))")
gauge() {
  curl -s http://127.0.0.1:18080/metrics |
    sed -n "s/^securemail_operator_tenants{condition=\"$1\",status=\"True\"} //p"
}
converged() {
  kubectl get smt -n "$namespace" -o json | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
def good(t):
    conds = {c["type"]: c["status"] for c in t.get("status", {}).get("conditions", [])}
    return conds.get("DkimReady") == "True" and conds.get("ConfigValid") == "True"
print(sum(good(t) for t in items))'
}

# CPU seconds (utime + stime) a process has used so far: where the CPU went while converging.
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}
apiserver_pid=$(cat "$dir/kube-apiserver.pid")
etcd_pid=$(cat "$dir/etcd.pid")
apiserver_cpu_before=$(cpu_seconds "$apiserver_pid")
etcd_cpu_before=$(cpu_seconds "$etcd_pid")
writes_at_start=$(wc -l < "$dir/audit.log")
start=$(date +%s.%N)
SECUREMAIL_OPERATOR_BIN=$root/target/release/securemail-operator taskset -c "$operator_cores" "$here/operator-up.sh"
pid=$(cat "$dir/securemail-operator.pid")
while true; do
  if [ "$(gauge DkimReady)" = "$count" ] && [ "$(gauge ConfigValid)" = "$count" ] && [ "$(converged)" -eq "$count" ]; then
    break
  fi
  sleep "$poll_seconds"
done
elapsed=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
peak_kib=$(sed -n 's/^VmHWM:\s*\([0-9]*\) kB/\1/p' "/proc/$pid/status")
operator_cpu=$(cpu_seconds "$pid")
cpu_line="operator $operator_cpu s, kube-apiserver $(awk -v a="$(cpu_seconds "$apiserver_pid")" -v b="$apiserver_cpu_before" 'BEGIN { print a - b }') s, etcd $(awk -v a="$(cpu_seconds "$etcd_pid")" -v b="$etcd_cpu_before" 'BEGIN { print a - b }') s"
# The operator's writes while converging, by verb and resource, from the audit log.
writes_line=$(tail -n +"$((writes_at_start + 1))" "$dir/audit.log" | python3 -c '
import collections, json, sys
counts = collections.Counter()
for line in sys.stdin:
    event = json.loads(line)
    if event["user"]["username"].endswith(":securemail-operator"):
        ref = event.get("objectRef", {})
        counts[event["verb"] + " " + ref.get("resource", "?") + ("/" + ref["subresource"] if ref.get("subresource") else "")] += 1
print(", ".join(f"{what} {n}" for what, n in counts.most_common()))')

log "second pass: restart the operator and count its writes for unchanged tenants"
sleep 5
writes_before=$(grep -c "\"username\":\"$operator_user\".*\"namespace\":\"$namespace\"" "$dir/audit.log" || true)
pass_start=$(date +%s.%N)
SECUREMAIL_OPERATOR_BIN=$root/target/release/securemail-operator taskset -c "$operator_cores" "$here/operator-up.sh"
# Wait until the new process has reconciled every tenant once.
until [ "$(curl -s http://127.0.0.1:18080/metrics | sed -n 's/^securemail_operator_reconciles_total{result="success"} //p')" -ge "$count" ] 2>/dev/null; do
  sleep "$poll_seconds"
  python3 -c "import sys, time; sys.exit(time.time() - $pass_start > 600)" || { log "second pass did not finish"; exit 1; }
done
pass_seconds=$(python3 -c "import time; print(f'{time.time() - $pass_start:.1f}')")
sleep 2
writes_after=$(grep -c "\"username\":\"$operator_user\".*\"namespace\":\"$namespace\"" "$dir/audit.log" || true)

python3 - "$count" "$elapsed" "$floor" "$peak_kib" "$((writes_after - writes_before))" "$cpu_line" "$writes_line" \
  "$operator_cores" "$control_plane_cores" "$operator_cpu" "$base_kib" "$pass_seconds" <<'PY'
import sys
n, elapsed, floor, peak_kib, writes = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
operator_cores, operator_cpu, base_kib, pass_seconds = sys.argv[8], float(sys.argv[10]), int(sys.argv[11]), float(sys.argv[12])
# The floor is wall time with every operator core generating keys, so the keys' CPU is the floor times those cores.
first, _, last = operator_cores.partition("-")
floor_cpu = floor * (int(last or first) - int(first) + 1)
print(f"tenants                         {n}")
print(f"cores                           operator and keygen floor {operator_cores}, control plane {sys.argv[9]}")
print(f"converge (DkimReady+ConfigValid) {elapsed:.1f} s")
print(f"keygen floor ({n} RSA-2048 keys) {floor:.1f} s")
print(f"ratio converge / floor          {elapsed / floor:.2f}   (target <= 1.3)")
print(f"operator CPU above the floor    {(operator_cpu - floor_cpu) * 1000 / n:.1f} ms per tenant   "
      f"({operator_cpu:.1f} s, keys {floor_cpu:.1f} s; target: the same at any N)")
print(f"operator peak RSS               {peak_kib / 1024:.1f} MiB, {(peak_kib - base_kib) / n:.1f} KiB per tenant above "
      f"{base_kib / 1024:.1f} MiB with no tenant   (target <= 150 MiB and <= 15 KB per tenant at 10 000)")
print(f"restart: relist and no-op pass  {pass_seconds:.1f} s   (target <= 120 s at 10 000)")
print(f"writes per no-op reconcile      {writes / n:.3f}   ({writes} writes for {n} tenants; target 0)")
print(f"CPU while converging            {sys.argv[6]}")
print(f"writes while converging         {sys.argv[7]}")
PY
