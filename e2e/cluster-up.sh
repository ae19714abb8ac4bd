#!/usr/bin/env bash
# Starts a local Kubernetes control plane (etcd + kube-apiserver, no controller-manager, no kubelet) on loopback for
# the end-to-end tests. Certificates and keys are generated here at start and live only in the state directory.
# Prints the admin kubeconfig path as the last stdout line. Running it again while the cluster is healthy is a no-op.
# With SECUREMAIL_NODE=1 it also starts a node (node-up.sh: containerd, kubelet, scheduler, controller-manager,
# kube-proxy); the apiserver then listens on the node's address instead of loopback, so pods can reach it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
# shellcheck source=cluster-lib.sh
. "$here/cluster-lib.sh"

dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
etcd_port=${SECUREMAIL_ETCD_PORT:-23791}
etcd_peer_port=$((etcd_port + 1))
api_port=${SECUREMAIL_APISERVER_PORT:-26443}
kubeconfig="$dir/kubeconfig"
with_node=${SECUREMAIL_NODE:-0}
# shellcheck source=node-lib.sh
. "$here/node-lib.sh"
api_host=127.0.0.1
[ "$with_node" = 1 ] && api_host=$node_ip

log() { echo "cluster-up: $*" >&2; }
die() { echo "cluster-up: $*" >&2; exit 1; }
# Shows the tail of a component's log so a failed start explains itself.
fail() {
  local step=$1 logfile=$2
  echo "cluster-up: FAILED: $step" >&2
  if [ -f "$logfile" ]; then
    echo "cluster-up: last 40 lines of $logfile:" >&2
    tail -n 40 "$logfile" >&2
  fi
  # Stop what was started but keep the logs for inspection; cluster-down.sh or the next cluster-up removes them.
  node_teardown >&2 || true
  local pidfile
  for pidfile in "$dir"/kube-apiserver.pid "$dir"/etcd.pid; do
    if [ -f "$pidfile" ]; then kill -TERM "$(cat "$pidfile")" 2>/dev/null || true; fi
  done
  echo "cluster-up: logs kept in $dir" >&2
  exit 1
}
# True when something already accepts connections on the loopback port.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

command -v kubectl >/dev/null || die "kubectl is not installed"
command -v openssl >/dev/null || die "openssl is not installed"
command -v curl >/dev/null || die "curl is not installed"

# Reuse a healthy cluster from an earlier run.
if alive "$dir/kube-apiserver.pid" && alive "$dir/etcd.pid" && [ -f "$kubeconfig" ] \
  && { [ "$with_node" = 1 ] && node_alive || { [ "$with_node" != 1 ] && [ ! -d "$node_dir" ]; }; } \
  && kubectl --kubeconfig "$kubeconfig" --request-timeout=5s get --raw /readyz >/dev/null 2>&1; then
  log "control plane already running"
  echo "$kubeconfig"
  exit 0
fi
# Anything left over (dead or half-started processes, old certs, old etcd data) is discarded.
if [ -e "$dir" ]; then
  log "removing stale state in $dir"
  SECUREMAIL_CLUSTER_DIR="$dir" "$here/cluster-down.sh" >&2
fi

for p in "$etcd_port" "$etcd_peer_port" "$api_port"; do
  if port_busy "$p"; then
    die "port 127.0.0.1:$p is already in use (set SECUREMAIL_ETCD_PORT / SECUREMAIL_APISERVER_PORT)"
  fi
done

cache=$("$here/build-control-plane.sh" etcd kubernetes | tail -n 1) || die "building the control plane failed"
etcd_bin="$cache/etcd-$ETCD_VERSION/bin/etcd"
apiserver_bin="$cache/kubernetes-$KUBERNETES_VERSION/bin/kube-apiserver"
[ -x "$etcd_bin" ] || die "etcd binary missing at $etcd_bin"
[ -x "$apiserver_bin" ] || die "kube-apiserver binary missing at $apiserver_bin"

start=$(date +%s)
mkdir -p "$dir/pki" "$dir/etcd-data"
# The test suites set the operator's clock relative to this moment (e2e/src/clock.rs), the same in every suite.
echo "$start" > "$dir/clock-origin"
if [ "$with_node" = 1 ]; then
  node_address_up || die "could not give the node its address $node_ip on $node_if"
fi
chmod 700 "$dir" "$dir/etcd-data"
pki="$dir/pki"

# --- Certificates: CA, apiserver serving cert, admin client cert, service-account signing key -------------------
log "generating certificates"
openssl_quiet() { openssl "$@" 2>>"$dir/openssl.log" || fail "openssl $1" "$dir/openssl.log"; }
openssl_quiet req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$cert_validity_days" \
  -subj "/CN=securemail-test-ca" -keyout "$pki/ca.key" -out "$pki/ca.crt"

sign apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1,IP:$api_host"
# system:masters is bound to cluster-admin by the apiserver's bootstrap RBAC policy.
sign admin "/O=system:masters/CN=securemail-admin" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
# The apiserver's identity towards kubelets (logs, exec, port-forward); the kubelet asks the apiserver whether it may.
sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
openssl_quiet genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key"
openssl_quiet pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
chmod 600 "$pki"/*.key

# --- etcd ---------------------------------------------------------------------------------------------------------
# Plain HTTP is acceptable: it listens on loopback only and holds throwaway test data. No fsync keeps it fast.
log "starting etcd on 127.0.0.1:$etcd_port"
record_and_launch "$dir" etcd "$etcd_bin" \
  --name=securemail \
  --data-dir="$dir/etcd-data" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" \
  --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster="securemail=http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster-state=new \
  --unsafe-no-fsync \
  --log-level=warn

etcd_healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q '"health":"true"'; }
ready=false
for _ in $(seq 1 100); do
  alive "$dir/etcd.pid" || fail "etcd exited during startup" "$dir/etcd.log"
  if etcd_healthy; then ready=true; break; fi
  sleep 0.2
done
$ready || fail "etcd did not become healthy within 20s" "$dir/etcd.log"

# --- kube-apiserver -----------------------------------------------------------------------------------------------
# Without a controller-manager nobody creates the per-namespace "default" ServiceAccount, so the ServiceAccount
# admission plugin would reject every Pod; it is disabled. Priority and fairness is off to start faster.
# Every write request is audited (metadata only) to audit.log, so tests can count exactly what the operator wrote.
cat > "$dir/audit-policy.yaml" <<'EOF_POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
EOF_POLICY
# With a node the controller-manager creates the default ServiceAccounts, so the ServiceAccount admission plugin stays
# on; the Node authorizer (and NodeRestriction) give the kubelet what its pods need and nothing more; the apiserver
# shows its own client certificate to the kubelet (logs, exec) and checks the kubelet's serving certificate. Pods
# reach the apiserver through the kubernetes Service, whose endpoint is the advertised (node) address.
mode_args=(--authorization-mode=RBAC --disable-admission-plugins=ServiceAccount)
if [ "$with_node" = 1 ]; then
  mode_args=("--authorization-mode=Node,RBAC" --enable-admission-plugins=NodeRestriction
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt"
    --kubelet-client-key="$pki/apiserver-kubelet-client.key"
    --kubelet-certificate-authority="$pki/ca.crt"
    --kubelet-preferred-address-types=InternalIP)
fi
log "starting kube-apiserver on $api_host:$api_port"
record_and_launch "$dir" kube-apiserver "$apiserver_bin" \
  --etcd-servers="http://127.0.0.1:$etcd_port" \
  --bind-address="$api_host" \
  --advertise-address="$api_host" \
  --secure-port="$api_port" \
  --tls-cert-file="$pki/apiserver.crt" \
  --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --anonymous-auth=false \
  --service-account-key-file="$pki/sa.pub" \
  --service-account-signing-key-file="$pki/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc \
  --service-cluster-ip-range="$service_cidr" \
  --allow-privileged=true \
  "${mode_args[@]}" \
  --enable-priority-and-fairness=false \
  --audit-policy-file="$dir/audit-policy.yaml" \
  --audit-log-path="$dir/audit.log" \
  --audit-log-mode=blocking \
  --v=1

cat > "$kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: securemail
  cluster:
    server: https://$api_host:$api_port
    certificate-authority-data: $(base64 -w0 < "$pki/ca.crt")
users:
- name: securemail-admin
  user:
    client-certificate-data: $(base64 -w0 < "$pki/admin.crt")
    client-key-data: $(base64 -w0 < "$pki/admin.key")
contexts:
- name: securemail
  context:
    cluster: securemail
    user: securemail-admin
current-context: securemail
EOF
chmod 600 "$kubeconfig"

kc() { kubectl --kubeconfig "$kubeconfig" --request-timeout=5s "$@"; }
ready=false
for _ in $(seq 1 120); do
  alive "$dir/kube-apiserver.pid" || fail "kube-apiserver exited during startup" "$dir/kube-apiserver.log"
  alive "$dir/etcd.pid" || fail "etcd exited while kube-apiserver was starting" "$dir/etcd.log"
  if kc get --raw /readyz >/dev/null 2>&1; then ready=true; break; fi
  sleep 0.5
done
$ready || fail "kube-apiserver did not report /readyz ok within 60s" "$dir/kube-apiserver.log"

# The apiserver creates the default namespace from a post-start hook shortly after becoming ready.
ready=false
for _ in $(seq 1 60); do
  if kc get namespace default >/dev/null 2>&1; then ready=true; break; fi
  sleep 0.5
done
$ready || fail "namespace \"default\" did not appear within 30s" "$dir/kube-apiserver.log"

log "control plane ready in $(($(date +%s) - start))s (state in $dir)"
if [ "$with_node" = 1 ]; then
  "$here/node-up.sh" >&2 || fail "starting the node (see above)" ""
fi
echo "$kubeconfig"
