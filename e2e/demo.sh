#!/usr/bin/env bash
# The main job end to end on a local Kubernetes, the way a platform team onboards: the images imported into the
# node's container runtime, `helm install` of the operator chart, `kubectl apply` of the example tenants, their MTA
# pods running, and what the operator made of them; then one message sent end to end to a receiver in the data-plane
# world, the node's stand-in Internet.
# The cluster and the world keep running afterwards (stop them with `make cluster-down` and `make dataplane-down`).
# Expects the images (make images).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
operator=${SECUREMAIL_OPERATOR_BIN:-$root/target/debug/securemail-operator}
world=${SECUREMAIL_DATAPLANE_DIR:-/tmp/securemail-dataplane}
step() { printf '\n== %s\n' "$*"; }

step "Building the operator's command line (for the offline render) and the demo's sender"
(cd "$root" && cargo build --locked -q -p securemail-operator --bin securemail-operator -p securemail-e2e --bin demo-send)

step "Starting the data-plane world, the node's Internet: a signed DNS root and zones, a validating resolver,"
echo "   receiving MX hosts (DANE, MTA-STS), an egress host with SOCKS5 proxies (e2e/dataplane/README.md)"
"$here/dataplane/up.sh" "$world" >/dev/null
"$here/dataplane/host-link.sh" up "$world" >/dev/null

step "Starting a local Kubernetes: control plane and one node (the first run builds them, several minutes)"
kubeconfig=$(SECUREMAIL_NODE=1 "$here/cluster-up.sh" | tail -n 1)
export KUBECONFIG=$kubeconfig
kubectl get nodes -o wide

step "helm install: the operator chart (CRD, least-privilege RBAC with Secrets only in the tenants' namespaces,"
echo "   two replicas with one leader), from the images make images built, imported into the node's containerd;"
echo "   its ServiceMonitor, PodMonitor and alert pack consumed by a Prometheus Operator's Prometheus (namespace monitoring)"
SECUREMAIL_DATAPLANE_DIR=$world SECUREMAIL_EXTRA_TENANT_NAMESPACES=tenant-egress "$here/node-install.sh" \
  "$root/target/images"
kubectl get pods -n securemail-system -o wide
kubectl get pods -n monitoring -o wide

step "kubectl apply: the example tenants, with the submission certificate and client CA Secrets they name"
"$here/apply-examples.sh"
step "A spec that would weaken transport security is refused by the apiserver"
if kubectl apply --dry-run=server -f "$here/testdata/invalid/cleartext-without-exception.yaml" 2>&1; then
  echo "unexpected: the invalid tenant was accepted" >&2
  exit 1
fi

step "Waiting for the MTA pods: each checks it can send from its pool address, and cannot yet"
# The examples send from documentation addresses (egress mode None: the platform puts each address on its pod).
# No pod here has one, so every sidecar stays unready and its tenant names the pod and the address.
for tenant in tenant-lakeside/lakeside-clinic tenant-riverside/riverside-pharmacy; do
  kubectl wait --for=condition=EgressReady=False --timeout=240s -n "${tenant%/*}" "smt/${tenant#*/}" >/dev/null
  kubectl get smt -n "${tenant%/*}" "${tenant#*/}" \
    -o jsonpath='{.metadata.name}: EgressReady=False: {.status.conditions[?(@.type=="EgressReady")].message}{"\n"}'
done

step "The platform's part of mode None: each pod gets its address (docs/egress.md); then every tenant Ready, or a"
echo "   condition that names what it lacks"
for tenant in tenant-lakeside/lakeside-clinic tenant-riverside/riverside-pharmacy; do
  namespace=${tenant%/*} name=${tenant#*/}
  addresses=$(kubectl get smt -n "$namespace" "$name" -o jsonpath='{.spec.ipPool.addresses[*].address}')
  ordinal=0
  for address in $addresses; do
    "$here/node/pod-address.sh" add "$namespace" "$name-mta-$ordinal" "$address"
    echo "   $namespace/$name-mta-$ordinal: $address"
    ordinal=$((ordinal + 1))
  done
done
# dedicated-warmup.yaml asks for prerequisites this cluster deliberately lacks (a StorageClass fast-retain, a
# cert-manager issuer, egress hosts with SOCKS5 proxies): its status says which.
kubectl wait --for=condition=Ready --timeout=180s -n tenant-lakeside smt/lakeside-clinic >/dev/null
kubectl wait --for=condition=Ready --timeout=180s -n tenant-riverside smt/riverside-pharmacy >/dev/null
kubectl get smt -A -o wide
kubectl get pods -A -l app.kubernetes.io/component=mta -o wide

step "What the operator made for tenant-lakeside/lakeside-clinic"
kubectl get statefulset,service,configmap,secret,poddisruptionbudget,networkpolicy,serviceaccount -n tenant-lakeside \
  -l app.kubernetes.io/managed-by=securemail-operator

step "Its conditions"
kubectl get smt -n tenant-lakeside lakeside-clinic \
  -o jsonpath='{range .status.conditions[*]}{.type}{"\t"}{.status}{"\t"}{.reason}{"\t"}{.message}{"\n"}{end}' | column -t -s $'\t'

step "DNS records the tenant must publish"
kubectl get smt -n tenant-lakeside lakeside-clinic \
  -o jsonpath='{range .status.dnsRecords[*]}{.type}{"\t"}{.name}{"\t"}{.value}{"\n"}{end}' | cut -c1-160

step "Offline render prints the same configuration the operator applied"
rendered=$(mktemp)
# On the UTC date the operator judged the warmup, should midnight have passed since.
judged=$(kubectl get smt -n tenant-lakeside lakeside-clinic -o jsonpath='{.status.ipPool[0].lastEvaluated}')
# With the operator's settings that shape children: here the world's DNSSEC root, which the chart gives the sidecars.
trust_anchors=$(sed -n 's/^SMDP_TRUST_ANCHOR=//p' "$world/world.env")
"$operator" render -f "$root/examples/minimal.yaml" --date "${judged:0:10}" \
  --sidecar-trust-anchors-file "$trust_anchors" > "$rendered"
python3 - "$rendered" <<'PY'
import json, subprocess, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "ConfigMap"]
live = json.loads(subprocess.check_output(
    ["kubectl", "get", "configmap", "-n", "tenant-lakeside", "lakeside-clinic-mta-config", "-o", "json"]))
same = docs[0]["data"] == live["data"]
print("ConfigMap data (main.cf, master.cf, sidecar-0.yaml):", "identical" if same else "DIFFERENT")
sys.exit(0 if same else 1)
PY
rm -f "$rendered"

step "One message end to end: a tenant sending through the world's egress host, an application's submission on 587"
echo "   with its client certificate, DKIM-signed, delivered over DANE-verified TLS, its evidence on the pod's volume"
KUBECONFIG=$kubeconfig SECUREMAIL_DATAPLANE_DIR=$world "$root/target/debug/demo-send"

cat <<MSG

The cluster, the world, the operator and the MTA pods are still running. Try:
  export KUBECONFIG=$kubeconfig
  kubectl explain smt.spec.tlsPolicy
  kubectl describe smt -n tenant-northwind northwind-health-plan
  kubectl logs -n tenant-lakeside lakeside-clinic-mta-0 -c sidecar
Stop them with: make cluster-down; make dataplane-down
MSG
