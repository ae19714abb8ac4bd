#!/usr/bin/env bash
# The Helm chart against the local control plane (KUBECONFIG): helm lint and helm template for every values file in
# charts/tests/values, each rendering checked (check-rendered.py) and accepted by `kubectl apply --dry-run=server`
# without a Pod Security warning in a namespace enforcing "restricted"; then helm install, the RBAC can-i matrix of
# the release's ServiceAccount, and helm uninstall (which keeps the CRD).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
chart=$root/charts/securemail-operator
helm=$root/e2e/helm.sh
namespace=smchart-system
release=smchart
: "${KUBECONFIG:?set KUBECONFIG to the local control plane (make e2e starts one)}"

die() { echo "chart: $*" >&2; exit 1; }
step() { echo "chart: $*" >&2; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

step "versions and home follow the workspace"
workspace=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
grep -qx "version: $workspace" "$chart/Chart.yaml" || die "Chart.yaml version is not the workspace's $workspace"
grep -qx "appVersion: \"$workspace\"" "$chart/Chart.yaml" || die "Chart.yaml appVersion is not the workspace's $workspace"
repository=$(sed -n 's/^repository = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
grep -qx "home: $repository" "$chart/Chart.yaml" || die "Chart.yaml home is not the workspace's repository $repository"

step "namespaces, and the Prometheus Operator CRDs the monitoring toggles need"
for name in "$namespace" smchart-tenant-a smchart-tenant-b smchart-monitoring; do
  kubectl create namespace "$name" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
done
kubectl label namespace "$namespace" --overwrite pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/warn=restricted >/dev/null
for crd in servicemonitors podmonitors prometheusrules; do
  kubectl apply --server-side -f "$("$root/e2e/fetch-crd.sh" "$crd")" >/dev/null
  kubectl wait --for=condition=Established --timeout=60s "crd/$crd.monitoring.coreos.com" >/dev/null
done

for values in "$here"/values/*.yaml; do
  name=$(basename "$values" .yaml)
  step "values/$name.yaml: lint, template, server-side dry run"
  "$helm" lint --strict "$chart" -f "$values" >"$scratch/lint.log" 2>&1 || { cat "$scratch/lint.log" >&2; die "helm lint $name"; }
  "$helm" template "$release" "$chart" -n "$namespace" -f "$values" >"$scratch/$name.yaml"
  kubectl apply --server-side --force-conflicts --dry-run=server -f "$scratch/$name.yaml" >/dev/null 2>"$scratch/apply.log" \
    || { cat "$scratch/apply.log" >&2; die "the apiserver refused the $name rendering"; }
  if grep -i "warning" "$scratch/apply.log" >&2; then die "$name: the apiserver warned (above)"; fi
done
python3 "$here/check-rendered.py" "$chart" "$scratch"

step "a value the schema does not know is refused"
if "$helm" template "$release" "$chart" --set replicas=2 >/dev/null 2>"$scratch/schema.log"; then
  die "helm template accepted an unknown value"
fi
grep -q "additional properties 'replicas' not allowed" "$scratch/schema.log" || die "unclear schema error: $(cat "$scratch/schema.log")"

step "helm install (per-namespace RBAC for smchart-tenant-a; takes over the CRD)"
"$helm" install "$release" "$chart" -n "$namespace" --take-ownership --set 'tenantNamespaces={smchart-tenant-a}' \
  >"$scratch/install.log" || die "helm install failed"
grep -q "It manages SecureMailTenants in: smchart-tenant-a." "$scratch/install.log" || die "NOTES.txt: $(cat "$scratch/install.log")"
[ "$("$helm" status "$release" -n "$namespace" -o json | jq -r .info.status)" = deployed ] || die "release not deployed"

step "RBAC: what the operator's ServiceAccount may and may not do"
account=system:serviceaccount:$namespace:$release-securemail-operator
can() { kubectl auth can-i --as="$account" "$@" >/dev/null 2>&1; }
failed=0
set -f # the matrix's * are resource and verb wildcards, not file names
while read -r expected args; do
  [ -n "$expected" ] || continue
  # shellcheck disable=SC2086 # the matrix's arguments are words
  if can $args; then got=yes; else got=no; fi
  [ "$got" = "$expected" ] || { echo "chart: can-i $args: $got, expected $expected" >&2; failed=1; }
done <<'MATRIX'
yes watch securemailtenants.securemail.io --all-namespaces
yes patch securemailtenants.securemail.io --subresource=status -n smchart-tenant-a
yes create statefulsets.apps -n smchart-tenant-a
yes patch statefulsets.apps -n smchart-tenant-a
yes create secrets -n smchart-tenant-a
yes watch secrets -n smchart-tenant-a
yes delete persistentvolumeclaims -n smchart-tenant-a
yes patch persistentvolumeclaims -n smchart-tenant-a
yes update leases.coordination.k8s.io -n smchart-system
yes create events.events.k8s.io -n smchart-tenant-a
yes list pods -n smchart-tenant-a
yes watch pods -n smchart-tenant-a
yes list storageclasses.storage.k8s.io
yes watch storageclasses.storage.k8s.io
no get secrets -n smchart-tenant-b
no get secrets -n kube-system
no list secrets --all-namespaces
no watch secrets --all-namespaces
no create securemailtenants.securemail.io -n smchart-tenant-a
no update securemailtenants.securemail.io -n smchart-tenant-a
no delete securemailtenants.securemail.io -n smchart-tenant-a
no update statefulsets.apps -n smchart-tenant-a
no create pods -n smchart-tenant-a
no delete pods -n smchart-tenant-a
no create pods --subresource=exec -n smchart-tenant-a
no list pods --all-namespaces
no watch pods --all-namespaces
no watch pods -n smchart-tenant-b
no create persistentvolumeclaims -n smchart-tenant-a
no delete persistentvolumes
no patch storageclasses.storage.k8s.io
no create storageclasses.storage.k8s.io
no delete storageclasses.storage.k8s.io
no get nodes
no create leases.coordination.k8s.io -n kube-system
no create customresourcedefinitions.apiextensions.k8s.io
no create clusterroles.rbac.authorization.k8s.io
no bind clusterroles.rbac.authorization.k8s.io
no escalate roles.rbac.authorization.k8s.io -n smchart-tenant-a
no impersonate serviceaccounts -n smchart-tenant-a
no create serviceaccounts --subresource=token -n smchart-tenant-a
no create deployments.apps -n smchart-tenant-a
no create events -n smchart-tenant-a
no * *
MATRIX
set +f
[ "$failed" -eq 0 ] || die "the RBAC matrix does not hold"

step "helm uninstall removes the release and keeps the CRD"
"$helm" uninstall "$release" -n "$namespace" >/dev/null
for object in "clusterrole/$release-securemail-operator" "clusterrolebinding/$release-securemail-operator"; do
  ! kubectl get "$object" >/dev/null 2>&1 || die "$object left after uninstall"
done
! kubectl get -n smchart-tenant-a "role/$release-securemail-operator-secrets" >/dev/null 2>&1 || die "Secret Role left"
! kubectl get -n "$namespace" "deployment/$release-securemail-operator" >/dev/null 2>&1 || die "Deployment left"
kubectl get crd securemailtenants.securemail.io >/dev/null || die "helm uninstall deleted the CRD"
step "ok"
