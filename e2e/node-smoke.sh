#!/usr/bin/env bash
# Proves the test node started by `SECUREMAIL_NODE=1 cluster-up.sh` runs workloads the way a cluster does: a pod from
# a locally imported image is scheduled and started, gets a pod address, its logs and exec work through the
# apiserver, a ClusterIP Service reaches it through kube-proxy from the host, from another pod and from itself, and
# cluster DNS resolves the apiserver's and the Service's names; a hostPort answers on the node's address.
# Leaves nothing behind (its namespace is deleted). Exits non-zero at the first failed check.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
# shellcheck source=node-lib.sh
. "$here/node-lib.sh"
kubeconfig="$dir/kubeconfig"
ns=node-smoke
host_port=${SECUREMAIL_SMOKE_HOST_PORT:-18080}

kc() { kubectl --kubeconfig "$kubeconfig" --request-timeout=30s "$@"; }
pass() { echo "node-smoke: ok: $*" >&2; }
fail() {
  echo "node-smoke: FAILED: $*" >&2
  kc -n "$ns" get pods,services,endpointslices -o wide >&2 || true
  kc -n "$ns" describe pods >&2 || true
  exit 1
}
# Prints a pod's output of `probe ARGS...`; the probe binary is the image's only file.
probe() { local pod=$1; shift; kc -n "$ns" exec "$pod" -- /probe "$@"; }

[ -f "$kubeconfig" ] || fail "no cluster in $dir (run: SECUREMAIL_NODE=1 e2e/cluster-up.sh)"
[ "$(kc get node "$node_name" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ] \
  || fail "node $node_name is not Ready"
pass "node $node_name Ready"

kc delete namespace "$ns" --ignore-not-found --wait=true >/dev/null
trap 'kc delete namespace "$ns" --wait=false >/dev/null 2>&1 || true' EXIT
kc create namespace "$ns" >/dev/null
kc apply -n "$ns" -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: server, labels: {app: server}}
spec:
  containers:
  - name: probe
    image: securemail.local/probe:1
    imagePullPolicy: Never
    args: [serve, ":8080"]
    ports: [{containerPort: 8080, hostPort: $host_port}]
    readinessProbe: {httpGet: {path: /ready, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  containers:
  - name: probe
    image: securemail.local/probe:1
    imagePullPolicy: Never
    args: [serve, ":8080"]
---
apiVersion: v1
kind: Service
metadata: {name: server}
spec:
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
EOF
kc -n "$ns" wait --for=condition=Ready pod/server pod/client --timeout=120s >/dev/null \
  || fail "the pods did not become Ready within 120s"
pass "pods scheduled, started and Ready (readiness probe from the kubelet)"

server_ip=$(kc -n "$ns" get pod server -o 'jsonpath={.status.podIP}')
client_ip=$(kc -n "$ns" get pod client -o 'jsonpath={.status.podIP}')
prefix=${pod_cidr%.*/*}
if [[ $server_ip != "$prefix".* ]] || [[ $client_ip != "$prefix".* ]] || [ "$server_ip" = "$client_ip" ]; then
  fail "pod addresses $server_ip, $client_ip are not two distinct addresses in $pod_cidr"
fi
pass "pod addresses $server_ip and $client_ip in $pod_cidr"

[[ $(kc -n "$ns" logs server) == *"probe server serving on :8080"* ]] \
  || fail "kubectl logs does not show the server's start"
pass "kubectl logs"

[ "$(probe server get http://127.0.0.1:8080/)" = "probe server" ] || fail "kubectl exec into the server"
pass "kubectl exec"

cluster_ip=$(kc -n "$ns" get service server -o 'jsonpath={.spec.clusterIP}')
# kube-proxy programs the Service once its EndpointSlice lists the ready pod; allow it a few seconds.
for _ in $(seq 1 20); do
  [ "$(curl -fsS --max-time 2 "http://$cluster_ip/" 2>/dev/null)" = "probe server" ] && break
  sleep 0.5
done
[ "$(curl -fsS --max-time 2 "http://$cluster_ip/")" = "probe server" ] \
  || fail "the Service's ClusterIP $cluster_ip does not reach the server from the host"
pass "ClusterIP $cluster_ip from the host (kube-proxy)"

[ "$(probe client get "http://$cluster_ip/")" = "probe server" ] \
  || fail "the Service's ClusterIP does not reach the server from another pod"
[[ $(kc -n "$ns" logs server) == *"from $client_ip:"* ]] \
  || fail "the server did not see the client pod's own address (source NAT on the pod network)"
pass "ClusterIP from another pod, which the server sees as $client_ip"

[ "$(probe server get "http://$cluster_ip/")" = "probe server" ] \
  || fail "the server does not reach itself through its Service (hairpin)"
pass "ClusterIP from the backend pod itself (hairpin)"

[ "$(probe client resolve kubernetes.default.svc.cluster.local)" = 10.96.0.1 ] \
  || fail "kubernetes.default.svc.cluster.local does not resolve to 10.96.0.1 in a pod"
# The short name goes through the pod's search path, as applications use it.
[ "$(probe client resolve server)" = "$cluster_ip" ] || fail "the Service name \"server\" does not resolve to $cluster_ip"
[ "$(probe client get http://server/)" = "probe server" ] || fail "the Service does not answer by name"
pass "cluster DNS: kubernetes.default.svc.cluster.local and the Service by its short name"

[ "$(curl -fsS --max-time 2 "http://$node_ip:$host_port/")" = "probe server" ] \
  || fail "the server's hostPort $host_port does not answer on the node address $node_ip"
pass "hostPort $host_port on the node address (portmap plugin)"

echo "node-smoke: all checks passed" >&2
