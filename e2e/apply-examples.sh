#!/usr/bin/env bash
# Applies example tenants the way a platform team onboards one: the tenant's namespace, the submission certificate
# and client CA Secrets its spec names, then the SecureMailTenant. A throwaway self-signed certificate (made here,
# never stored) stands in for both. Usage: apply-examples.sh [EXAMPLE.yaml...] (default: every file in examples/).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
[ $# -gt 0 ] || set -- "$root"/examples/*.yaml

certs=$(mktemp -d)
trap 'rm -rf "$certs"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=securemail example" \
  -keyout "$certs/tls.key" -out "$certs/tls.crt" 2>/dev/null
for example in "$@"; do
  namespace=$(sed -n 's/^  namespace: //p' "$example" | head -n 1)
  [ -n "$namespace" ] || { echo "apply-examples: $example names no metadata.namespace" >&2; exit 1; }
  kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  while read -r secret; do
    kubectl -n "$namespace" create secret tls "$secret" --cert="$certs/tls.crt" --key="$certs/tls.key" \
      --dry-run=client -o yaml </dev/null | kubectl apply -f - >/dev/null
  done < <(sed -n 's/^ *secretName: //p' "$example")
  while read -r secret; do
    kubectl -n "$namespace" create secret generic "$secret" --from-file=ca.crt="$certs/tls.crt" \
      --dry-run=client -o yaml </dev/null | kubectl apply -f - >/dev/null
  done < <(sed -n 's/^ *caSecretName: //p' "$example")
  kubectl apply -f "$example"
done
