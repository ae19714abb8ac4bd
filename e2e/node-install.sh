#!/usr/bin/env bash
# Installs SecureMail on the test node the way a platform team does on a cluster: the images `make images` built are
# imported into the node's containerd (there is no registry), the operator's and the tenants' namespaces are created
# with their Pod Security levels and the operator chart is installed with `helm upgrade --install`; waits until both
# operator replicas run and one holds the Lease. The chart's ServiceMonitor, PodMonitor and PrometheusRule are on,
# consumed by a Prometheus Operator installed first (node-monitoring.sh).
# Usage: node-install.sh [IMAGES_DIR] (default target/images). Expects the node (make node-up).
# With SECUREMAIL_DATAPLANE_DIR naming a running data-plane world linked to this machine (dataplane/host-link.sh),
# the world is the node's Internet: cluster DNS forwards to the world's validating resolver, and the sidecars resolve
# through cluster DNS like any pod (the chart names no resolver) and trust the world's root (the chart's trust
# anchors); SECUREMAIL_EXTRA_TENANT_NAMESPACES (comma-separated) adds tenant namespaces beyond the examples'.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
images=${1:-$root/target/images}
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
# shellcheck source=node-lib.sh
. "$here/node-lib.sh"
release=securemail-operator
namespace=securemail-system

log() { echo "node-install: $*" >&2; }
die() { echo "node-install: $*" >&2; exit 1; }
export KUBECONFIG="$dir/kubeconfig"

if [ ! -S "$containerd_sock" ] || [ ! -f "$KUBECONFIG" ]; then die "no node in $dir (run make node-up)"; fi
for image in operator sidecar mta; do
  [ -f "$images/$image.tar" ] || die "$images/$image.tar is missing (run make images)"
  # The archive's index names the reference the chart and the operator use; the kubelet finds it by that name.
  ctr -a "$containerd_sock" -n k8s.io images import --no-unpack=false "$images/$image.tar" >/dev/null \
    || die "importing $images/$image.tar into the node's containerd failed"
done
log "imported: $(ctr -a "$containerd_sock" -n k8s.io images ls -q | grep '^ghcr.io/securemail/' | paste -sd' ')"

# Pod Security admission as docs/security.md asks a platform team to set it: the operator's namespace enforces
# `restricted`, the tenants' `baseline` (Postfix's master runs as root); audit and warn at the same level, so the
# apiserver's audit log names any violation, also of a Deployment's or StatefulSet's pod template.
# (`kubectl label`, not labels in an applied manifest: a later `kubectl apply` of the namespace keeps them.)
pod_security() { # NAMESPACE LEVEL
  kubectl create namespace "$1" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl label --overwrite namespace "$1" "pod-security.kubernetes.io/enforce=$2" \
    "pod-security.kubernetes.io/audit=$2" "pod-security.kubernetes.io/warn=$2" >/dev/null
}
pod_security "$namespace" restricted
namespaces=$( (sed -n 's/^  namespace: //p' "$root"/examples/*.yaml; tr ',' '\n' <<<"${SECUREMAIL_EXTRA_TENANT_NAMESPACES:-}") \
  | grep -v '^$' | sort -u | paste -sd, -)
for tenant_namespace in ${namespaces//,/ }; do
  pod_security "$tenant_namespace" baseline
done
sidecar_dns=()
if [ -n "${SECUREMAIL_DATAPLANE_DIR:-}" ]; then
  world_env=$SECUREMAIL_DATAPLANE_DIR/world.env
  [ -f "$world_env" ] || die "SECUREMAIL_DATAPLANE_DIR=$SECUREMAIL_DATAPLANE_DIR has no world.env (run dataplane/up.sh)"
  resolver=$(sed -n 's/^SMDP_RESOLVER=//p' "$world_env")
  # CoreDNS (node-up.sh) forwards what is not cluster.local to the machine's resolvers; here, to the world's. Its cache
  # starts empty in the restarted pod.
  kubectl -n kube-system get configmap coredns -o yaml \
    | sed "s|forward \. .*|forward . $resolver:53|" | kubectl apply -f - >/dev/null \
    || die "pointing cluster DNS at the world's resolver failed"
  kubectl -n kube-system rollout restart deployment/coredns >/dev/null
  kubectl -n kube-system rollout status deployment/coredns --timeout=120s >/dev/null \
    || die "CoreDNS did not come back within 120s"
  sidecar_dns=(--set-file "sidecarDns.trustAnchors=$(sed -n 's/^SMDP_TRUST_ANCHOR=//p' "$world_env")")
fi
# A drained pod goes after its queue read empty twice this far apart: shorter than the chart's minute, so the node
# suites' drains take seconds.
drain_confirmation=${SECUREMAIL_DRAIN_CONFIRMATION_SECONDS:-10}
# The Prometheus Operator and the Prometheus it manages, before the chart whose monitors and rules they consume.
"$here/node-monitoring.sh" install || die "installing the Prometheus Operator and its Prometheus failed"
mapfile -t monitoring < <("$here/node-monitoring.sh" chart-args)
api_port=$(sed -n 's|^ *server: https://[^:]*:||p' "$KUBECONFIG")
# The operator's NetworkPolicy opens egress to the apiserver's port as its pods see it (the endpoint of the
# kubernetes Service, this node's apiserver port).
"$here/helm.sh" upgrade --install "$release" "$root/charts/securemail-operator" --namespace "$namespace" \
  --create-namespace --set "tenantNamespaces={$namespaces}" --set "networkPolicy.apiServerPorts={443,$api_port}" \
  --set "drainConfirmationSeconds=$drain_confirmation" "${sidecar_dns[@]}" "${monitoring[@]}" --wait --timeout 180s \
  >/dev/null || {
  kubectl -n "$namespace" get pods -o wide >&2 || true
  kubectl -n "$namespace" describe pods >&2 || true
  die "helm install of the operator chart did not become ready within 180s"
}
holder=""
for _ in $(seq 1 60); do
  holder=$(kubectl -n "$namespace" get lease securemail-operator -o 'jsonpath={.spec.holderIdentity}' 2>/dev/null || true)
  [ -n "$holder" ] && kubectl -n "$namespace" get pod "$holder" >/dev/null 2>&1 && break
  sleep 1
done
[ -n "$holder" ] || die "no operator pod took the Lease $namespace/securemail-operator within 60s"
log "operator: $(kubectl -n "$namespace" get pods -l app.kubernetes.io/name=securemail-operator --no-headers | wc -l) pods, leader $holder"
