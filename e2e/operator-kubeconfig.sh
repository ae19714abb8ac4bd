#!/usr/bin/env bash
# Applies the operator's RBAC (testdata/operator-rbac.yaml) to the local control plane and writes a kubeconfig
# holding a fresh token of its ServiceAccount, so the operator runs with exactly those permissions. Prints its path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
export KUBECONFIG=${KUBECONFIG:-$dir/kubeconfig}
out=$(dirname "$KUBECONFIG")/operator.kubeconfig

kubectl apply -f "$here/testdata/operator-rbac.yaml" >/dev/null
token=$(kubectl create token securemail-operator -n securemail-system --duration=24h)
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
- name: securemail-operator
  user:
    token: $token
contexts:
- name: operator
  context: {cluster: local, user: securemail-operator}
current-context: operator
CONFIG
echo "$out"
