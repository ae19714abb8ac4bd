#!/usr/bin/env bash
# Runs the operator container of the installed chart release (default securemail-operator in securemail-system) as a
# local process: the local control plane has no kubelet, so the Deployment's pods never start. The process gets the
# Deployment's arguments and environment and its ServiceAccount's token, so it runs with exactly the chart's
# settings and permissions; only the admin address moves to 127.0.0.1:18080. Logs go to
# $SECUREMAIL_CLUSTER_DIR/operator.log; cluster-down.sh stops it. Usage: operator-up.sh [RELEASE [NAMESPACE]]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
release=${1:-securemail-operator}
namespace=${2:-securemail-system}
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
binary=${SECUREMAIL_OPERATOR_BIN:-$root/target/debug/securemail-operator}
export KUBECONFIG=$dir/kubeconfig

die() { echo "operator-up: $*" >&2; exit 1; }
[ -f "$KUBECONFIG" ] || die "no control plane in $dir (run e2e/cluster-up.sh first)"
[ -x "$binary" ] || die "no operator binary at $binary (cargo build -p securemail-operator)"

# Replace a running operator: TERM lets it finish in-flight reconciles; KILL after 5 s.
if [ -f "$dir/securemail-operator.pid" ]; then
  previous=$(cat "$dir/securemail-operator.pid")
  kill -TERM "$previous" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$previous" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$previous" 2>/dev/null || true
fi

operator_kubeconfig=$("$here/operator-kubeconfig.sh" "$release" "$namespace")
deployment=$(kubectl get deployment -n "$namespace" -l "app.kubernetes.io/instance=$release" -o json)
mapfile -t args < <(jq -r '.items[0].spec.template.spec.containers[0].args[]' <<<"$deployment" |
  grep -v '^--admin-address=')
# Literal values only; the downward-API ones (pod name and namespace) are set below.
mapfile -t environment < <(jq -r '.items[0].spec.template.spec.containers[0].env[] | select(.value != null)
  | "\(.name)=\(.value)"' <<<"$deployment")

env "${environment[@]}" KUBECONFIG="$operator_kubeconfig" POD_NAMESPACE="$namespace" POD_NAME="$release-local" \
  setsid nohup "$binary" "${args[@]}" --admin-address 127.0.0.1:18080 </dev/null >"$dir/operator.log" 2>&1 &
echo $! > "$dir/securemail-operator.pid"
for _ in $(seq 1 50); do
  curl -sf http://127.0.0.1:18080/readyz >/dev/null 2>&1 && { echo "operator-up: running (log $dir/operator.log)" >&2; exit 0; }
  kill -0 "$(cat "$dir/securemail-operator.pid")" 2>/dev/null || { tail -n 20 "$dir/operator.log" >&2; die "the operator exited"; }
  sleep 0.2
done
die "the operator did not become ready; see $dir/operator.log"
