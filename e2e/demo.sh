#!/usr/bin/env bash
# The main job end to end on a local control plane: start it, install the SecureMailTenant CRD, apply the example
# tenants and show them as a platform engineer would see them. The control plane keeps running afterwards.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
step() { printf '\n== %s\n' "$*"; }

step "Starting the local control plane (the first run builds kube-apiserver and etcd, several minutes)"
kubeconfig=$("$here/cluster-up.sh" | tail -n 1)
export KUBECONFIG=$kubeconfig
kubectl version 2>/dev/null | sed -n 's/^Server Version: /kube-apiserver /p'

step "Installing the SecureMailTenant CRD"
kubectl apply --server-side --force-conflicts -f "$root/crds/securemailtenants.securemail.io.yaml"
kubectl wait --for=condition=Established --timeout=60s crd/securemailtenants.securemail.io

step "Applying the example tenants"
for example in "$root"/examples/*.yaml; do
  namespace=$(sed -n 's/^  namespace: //p' "$example" | head -n 1)
  kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl apply -f "$example"
done

step "A spec that would weaken transport security is refused by the apiserver"
if kubectl apply --dry-run=server -f "$here/testdata/invalid/cleartext-without-exception.yaml" 2>&1; then
  echo "unexpected: the invalid tenant was accepted" >&2
  exit 1
fi

step "kubectl get smt -A"
kubectl get smt -A -o wide

step "Effective TLS policy of the minimal tenant (defaults filled in by the apiserver)"
kubectl get smt -n tenant-lakeside lakeside-clinic -o jsonpath='{.spec.tlsPolicy}'; echo

cat <<MSG

The control plane is still running. Try:
  export KUBECONFIG=$kubeconfig
  kubectl explain smt.spec.tlsPolicy
Stop it with: make cluster-down
MSG
