#!/usr/bin/env bash
# Writes a kubeconfig holding a fresh token of the ServiceAccount that the chart release RELEASE (default
# securemail-operator) in NAMESPACE (default securemail-system) runs the operator as, so a locally run operator has
# exactly the chart's permissions. Prints its path. Usage: operator-kubeconfig.sh [RELEASE [NAMESPACE]]
set -euo pipefail
release=${1:-securemail-operator}
namespace=${2:-securemail-system}
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
export KUBECONFIG=${KUBECONFIG:-$dir/kubeconfig}
out=$(dirname "$KUBECONFIG")/$release.kubeconfig

deployment=$(kubectl get deployment -n "$namespace" -l "app.kubernetes.io/instance=$release" -o name | head -n 1)
[ -n "$deployment" ] || { echo "operator-kubeconfig: no release $release in $namespace (helm install it first)" >&2; exit 1; }
account=$(kubectl get -n "$namespace" "$deployment" -o jsonpath='{.spec.template.spec.serviceAccountName}')
token=$(kubectl create token "$account" -n "$namespace" --duration=24h)
server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
ca=$(kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
umask 077
cat > "$out" <<CONFIG
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $server
    certificate-authority-data: $ca
users:
- name: $account
  user:
    token: $token
contexts:
- name: operator
  context: {cluster: local, user: $account}
current-context: operator
CONFIG
echo "$out"
