#!/usr/bin/env bash
# The node's figures (issue: a real node): from `kubectl apply` of a new one-address tenant to Ready=True, against
# the anchor of a bare pod (the probe image, an HTTP readiness probe) from create to Ready on the same node in the
# same run, plus the RSA-2048 key the tenant needs; the memory of an idle MTA pod (Postfix + sidecar working sets,
# from the kubelet's summary API); and what the node's own processes cost while idle.
# Usage: bench-node.sh [RUNS] (default 3). Starts the control plane and node unless they run, installs SecureMail
# from target/images (make images) and leaves both running.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
runs=${1:-3}
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
# shellcheck source=node-lib.sh
. "$here/node-lib.sh"
namespace=tenant-lakeside

log() { echo "bench-node: $*" >&2; }
die() { echo "bench-node: $*" >&2; exit 1; }
now_ms() { date +%s%3N; }

export KUBECONFIG
KUBECONFIG=$(SECUREMAIL_NODE=1 "$here/cluster-up.sh" | tail -n 1)
"$here/node-install.sh" "$root/target/images"
"$here/apply-examples.sh" "$root/examples/minimal.yaml" >/dev/null
# Egress mode None: the platform puts each pool address on its pod (docs/egress.md); here as soon as the sidecar runs.
"$here/node/pod-address.sh" add "$namespace" lakeside-clinic-mta-0 192.0.2.10
kubectl wait --for=condition=Ready --timeout=240s -n "$namespace" smt/lakeside-clinic >/dev/null

# Milliseconds until `kubectl wait` saw the condition, from $1 (ms).
waited_since() { echo $(($(now_ms) - $1)); }

bare_pod() { # I
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: bench-bare-$1, namespace: $namespace}
spec:
  containers:
  - name: probe
    image: securemail.local/probe:1
    imagePullPolicy: Never
    command: [/probe, serve, ":8080"]
    readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
EOF
}

# A one-address tenant of its own: name, domain and address unused by the examples.
tenant() { # I
  sed -e "s/^  name: lakeside-clinic/  name: bench-$1/" \
    -e "s/notify\.lakeside-clinic\.example/bench-$1.lakeside-clinic.example/g" \
    -e "s/192\.0\.2\.10/192.0.2.$((200 + $1))/" "$root/examples/minimal.yaml"
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

bare=() ready=() keygen=()
for i in $(seq 1 "$runs"); do
  start=$(now_ms)
  bare_pod "$i" | kubectl apply -f - >/dev/null
  kubectl wait --for=condition=Ready --timeout=120s -n "$namespace" "pod/bench-bare-$i" >/dev/null
  bare+=("$(waited_since "$start")")
  kubectl delete pod -n "$namespace" "bench-bare-$i" --wait=false >/dev/null

  start=$(now_ms)
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out /dev/null 2>/dev/null
  keygen+=("$(waited_since "$start")")

  start=$(now_ms)
  tenant "$i" | kubectl apply -f - >/dev/null
  "$here/node/pod-address.sh" add "$namespace" "bench-$i-mta-0" "192.0.2.$((200 + i))"
  kubectl wait --for=condition=Ready --timeout=240s -n "$namespace" "smt/bench-$i" >/dev/null
  ready+=("$(waited_since "$start")")
  log "run $i: bare pod ${bare[-1]} ms, RSA-2048 key ${keygen[-1]} ms, tenant Ready ${ready[-1]} ms"
done
bare_ms=$(printf '%s\n' "${bare[@]}" | median)
keygen_ms=$(printf '%s\n' "${keygen[@]}" | median)
ready_ms=$(printf '%s\n' "${ready[@]}" | median)

# Idle: the MTA pods settle, then the kubelet's working sets and the node's processes over a minute.
sleep 30
summary=$(kubectl get --raw "/api/v1/nodes/$node_name/proxy/stats/summary")
mta_mib=$(python3 - "$summary" <<'PY'
import json, sys
pods = json.loads(sys.argv[1])["pods"]
sets = []
for pod in pods:
    if pod["podRef"]["name"].startswith(("bench-", "lakeside-clinic-mta")) and "-mta-" in pod["podRef"]["name"]:
        sets.append(sum(c.get("memory", {}).get("workingSetBytes", 0) for c in pod.get("containers", [])))
print(" ".join(f"{s / 1048576:.1f}" for s in sorted(sets)))
PY
)
# The same pods by the proportional set size of their processes (pause included): shared library pages split
# between the processes that map them. The kubelet's working set counts only pages first touched in the pod's
# cgroup, so the libraries the image import read count elsewhere.
pss_mib=""
for uid in $(kubectl get pods -n "$namespace" -l app.kubernetes.io/component=mta -o jsonpath='{.items[*].metadata.uid}'); do
  kib=0
  while read -r cgroup; do
    pid=${cgroup#/proc/}; pid=${pid%/cgroup}
    kib=$((kib + $(awk '/^Pss:/ { print $2 }' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)))
  done < <(grep -l "pod$uid" /proc/[0-9]*/cgroup 2>/dev/null || true)
  pss_mib+=" $(awk -v k="$kib" 'BEGIN { printf "%.1f", k / 1024 }')"
done
ticks=$(getconf CLK_TCK)
pids=()
for name in containerd kubelet kube-scheduler kube-controller-manager kube-proxy; do pids+=("$(cat "$dir/$name.pid")"); done
cpu_ticks() { local total=0 pid; for pid in "${pids[@]}"; do
  total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat"))); done; echo "$total"; }
rss_mib() { local total=0 pid; for pid in "${pids[@]}"; do
  total=$((total + $(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"))); done; echo $((total / 1024)); }
before=$(cpu_ticks)
sleep 60
after=$(cpu_ticks)
node_cpu=$(awk -v t=$((after - before)) -v hz="$ticks" 'BEGIN { printf "%.1f", 100 * t / hz / 60 }')

for i in $(seq 1 "$runs"); do kubectl delete smt -n "$namespace" "bench-$i" --wait=false >/dev/null; done

floor_ms=$((bare_ms + keygen_ms))
echo
echo "runs: $runs (medians)"
echo "anchor: bare pod create to Ready ${bare_ms} ms + one RSA-2048 key ${keygen_ms} ms = ${floor_ms} ms"
echo "tenant: kubectl apply to Ready=True ${ready_ms} ms (target 20000 ms)"
awk -v r="$ready_ms" -v f="$floor_ms" 'BEGIN { printf "ratio: %.2f\n", r / f }'
echo "idle MTA pods (Postfix + sidecar) per pod: kubelet working set $mta_mib MiB; proportional set size${pss_mib} MiB" \
  "(target 64 MiB)"
echo "node processes (containerd, kubelet, kube-scheduler, kube-controller-manager, kube-proxy) idle:" \
  "${node_cpu} % of one core, $(rss_mib) MiB resident"
