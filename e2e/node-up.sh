#!/usr/bin/env bash
# Starts the test node on the control plane that `SECUREMAIL_NODE=1 cluster-up.sh` started (cluster-up.sh runs this
# itself): containerd with its own configuration, root, state and socket in the cluster's state directory, a bridge
# CNI network, the kubelet, kube-scheduler, kube-controller-manager, kube-proxy (iptables mode) and kube-router's
# firewall (NetworkPolicy), and waits for the node to be Ready. Images come from no registry: the sandbox (pause) image and a probe image are built here from
# e2e/node/*.go and imported into containerd's k8s.io namespace. cluster-down.sh undoes all of it (node-lib.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
# shellcheck source=cluster-lib.sh
. "$here/cluster-lib.sh"
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
# shellcheck source=node-lib.sh
. "$here/node-lib.sh"
cache=${SECUREMAIL_CACHE:-$HOME/.cache/securemail}
# Built from the pinned plugins module by build-control-plane.sh; Debian's (/usr/lib/cni) work too.
cni_bin=${SECUREMAIL_CNI_BIN_DIR:-$cache/cni-plugins-$CNI_PLUGINS_VERSION/bin}
pki="$dir/pki"
kubeconfig="$dir/kubeconfig"
# The images the node has without a registry; pods use them with imagePullPolicy: IfNotPresent (or Never).
pause_image=securemail.local/pause:1
probe_image=securemail.local/probe:1
coredns_image=securemail.local/coredns:$COREDNS_VERSION
local_path_image=securemail.local/local-path-provisioner:$LOCAL_PATH_PROVISIONER_VERSION
volume_helper_image=securemail.local/volume-helper:1

log() { echo "node-up: $*" >&2; }
die() { echo "node-up: $*" >&2; exit 1; }
# Shows the failing component's log, stops what the node started (its logs stay in $dir) and exits.
fail() {
  local step=$1 name=${2:-}
  echo "node-up: FAILED: $step" >&2
  if [ -n "$name" ] && [ -f "$dir/$name.log" ]; then
    echo "node-up: last 40 lines of $dir/$name.log:" >&2
    tail -n 40 "$dir/$name.log" >&2
  fi
  node_teardown || true
  exit 1
}
port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
# Waits up to SECONDS for component NAME, just launched, to pass CHECK (a command); fails with its log if it exits first
# or the time runs out.
await_component() {
  local name=$1 seconds=$2
  shift 2
  for _ in $(seq 1 $((seconds * 5))); do
    alive "$dir/$name.pid" || fail "$name exited during startup" "$name"
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  fail "$name did not answer within ${seconds}s" "$name"
}
kc() { kubectl --kubeconfig "$kubeconfig" --request-timeout=10s "$@"; }

if [ ! -f "$kubeconfig" ] || [ ! -f "$pki/ca.key" ]; then
  die "no control plane in $dir (run SECUREMAIL_NODE=1 e2e/cluster-up.sh)"
fi
# A string match rather than `ip | grep -q`: under pipefail, grep -q leaving early fails the pipe with SIGPIPE.
[[ $(ip -o addr show dev "$node_if" 2>/dev/null) == *" inet $node_ip/"* ]] \
  || die "the node address $node_ip is not on $node_if (start the control plane with SECUREMAIL_NODE=1)"
for name in "${node_components[@]}"; do
  alive "$dir/$name.pid" && die "$name is already running (pid $(cat "$dir/$name.pid")); run e2e/cluster-down.sh first"
done
for p in "127.0.0.1 $kubelet_healthz_port" "$node_ip $kubelet_port" "127.0.0.1 $scheduler_port" \
  "127.0.0.1 $controller_manager_port" "127.0.0.1 $proxy_metrics_port" "127.0.0.1 $proxy_healthz_port" \
  "127.0.0.1 $kube_router_health_port"; do
  # shellcheck disable=SC2086 # "address port"
  if port_busy $p; then die "port ${p/ /:} is already in use (see the SECUREMAIL_*_PORT settings in node-lib.sh)"; fi
done

# --- Packages: Debian's runtime (they install in seconds; the kubelet works with containerd 1.6 and runc 1.1) -------
# nft only lets cluster-down.sh delete the iptables tables the node created.
# kube-router keeps NetworkPolicy peers in ipsets, through the ipset tool.
declare -A packages=([containerd]=containerd [runc]=runc [iptables]=iptables [ctr]=containerd [nft]=nftables
  [ipset]=ipset)
missing=()
for cmd in "${!packages[@]}"; do command -v "$cmd" >/dev/null || missing+=("${packages[$cmd]}"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi

start=$(date +%s)
"$here/build-control-plane.sh" >/dev/null || die "building the Kubernetes binaries failed"
bin="$cache/kubernetes-$KUBERNETES_VERSION/bin"
kube_router="$cache/kube-router-$KUBE_ROUTER_VERSION/bin/kube-router"
coredns_dir="$cache/coredns-$COREDNS_VERSION"
for plugin in bridge host-local loopback portmap; do
  [ -x "$cni_bin/$plugin" ] || die "CNI plugin $plugin missing in $cni_bin"
done

# --- Images: static Go binaries in single-layer archives, cached by the hash of their sources ---------------------
images_key=$(cat "$here/node/pause.go" "$here/node/probe.go" "$here/node/volume-helper.go" "$here/node/image-tar.sh" \
  <(go version) | sha256sum | cut -c1-16)
images="$cache/node-images-$images_key"
if [ ! -f "$images/volume-helper.tar" ]; then
  log "building the pause, probe and volume-helper images"
  rm -rf "$images.tmp"; mkdir -p "$images.tmp"
  for prog in pause probe volume-helper; do
    (cd "$images.tmp" && CGO_ENABLED=0 go build -trimpath -ldflags=-s -o "$images.tmp/$prog" "$here/node/$prog.go") \
      || die "go build of $prog failed"
  done
  "$here/node/image-tar.sh" "$images.tmp/pause.tar" "$pause_image" /pause "$images.tmp/pause"
  "$here/node/image-tar.sh" "$images.tmp/probe.tar" "$probe_image" /probe "$images.tmp/probe"
  "$here/node/image-tar.sh" "$images.tmp/volume-helper.tar" "$volume_helper_image" /volume-helper \
    "$images.tmp/volume-helper"
  rm -rf "$images"; mv "$images.tmp" "$images"
fi
# Images of binaries built by build-control-plane.sh, written again when the binary is newer.
binary_image() {
  local tar=$1 ref=$2 binary=$3
  if [ ! -f "$tar" ] || [ "$binary" -nt "$tar" ]; then
    "$here/node/image-tar.sh" "$tar" "$ref" "/$(basename "$binary")" "$binary"
  fi
}
binary_image "$coredns_dir/image.tar" "$coredns_image" "$coredns_dir/bin/coredns"
local_path_dir="$cache/local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION"
binary_image "$local_path_dir/image.tar" "$local_path_image" "$local_path_dir/bin/local-path-provisioner"

mkdir -p "$node_dir"/{containerd,cni/net.d,cni/ipam,kubelet,pod-logs,certs}
chmod 700 "$node_dir"

# --- Certificates and kubeconfigs, from the control plane's CA ---------------------------------------------------
openssl_quiet() { openssl "$@" 2>>"$node_dir/openssl.log" || die "openssl $1 failed (see $node_dir/openssl.log)"; }
client_ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
# The users below are the ones the apiserver's bootstrap RBAC policy (and the Node authorizer) already grant.
sign kubelet-client "/O=system:nodes/CN=system:node:$node_name" "$client_ext"
sign kube-scheduler "/CN=system:kube-scheduler" "$client_ext"
sign kube-controller-manager "/CN=system:kube-controller-manager" "$client_ext"
sign kube-proxy "/CN=system:kube-proxy" "$client_ext"
# Bound to the read-only ClusterRole applied below.
sign kube-router "/CN=securemail:kube-router" "$client_ext"
sign kubelet-serving "/CN=$node_name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$node_ip,DNS:$node_name"
server=$(sed -n 's/^ *server: //p' "$kubeconfig")
write_kubeconfig() {
  local name=$1 cert=$2
  cat > "$node_dir/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: securemail
  cluster:
    server: $server
    certificate-authority: $pki/ca.crt
users:
- name: $name
  user:
    client-certificate: $pki/$cert.crt
    client-key: $pki/$cert.key
contexts:
- name: securemail
  context: {cluster: securemail, user: $name}
current-context: securemail
EOF
}
write_kubeconfig kubelet kubelet-client
write_kubeconfig kube-scheduler kube-scheduler
write_kubeconfig kube-controller-manager kube-controller-manager
write_kubeconfig kube-proxy kube-proxy
write_kubeconfig kube-router kube-router

# --- Kernel settings -----------------------------------------------------------------------------------------------
node_record_sysctls
node_record_iptables_tables
# Pods reach Services and the outside through the host; bridged pod-to-pod replies must pass iptables so that a
# Service's DNAT is undone (br_netfilter is built in here; the setting is per network namespace).
sysctl -qw net.ipv4.ip_forward=1
sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || log "warning: bridge-nf-call-iptables is not available"

# --- containerd ----------------------------------------------------------------------------------------------------
cat > "$node_dir/containerd/config.toml" <<EOF
version = 2
root = "$node_dir/containerd/root"
state = "$node_dir/containerd/state"
# Snapshotters that cannot work here only add errors to the log.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "$containerd_sock"

[debug]
  level = "warn"

[plugins."io.containerd.internal.v1.opt"]
  path = "$node_dir/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  # Built and imported by node-up.sh: there is no registry to pull the upstream pause image from.
  sandbox_image = "$pause_image"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below its own, and every sandbox would fail
  # with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  # Pod network namespaces stay inside the state directory instead of /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$node_dir/runc"
        # cgroup v1 with the kubelet's cgroupfs driver (there is no systemd).
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$cni_bin"
    conf_dir = "$node_dir/cni/net.d"
    max_conf_num = 1
EOF
# A bridge on the node with one pod subnet; host-local keeps its allocations in the state directory.
cat > "$node_dir/cni/net.d/10-securemail.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "securemail",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$pod_bridge",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$pod_cidr"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$node_dir/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
# The kubelet links every container's log into /var/log/containers (a fixed path); note whether the directory is ours.
[ -d /var/log/containers ] || touch "$node_dir/made-var-log-containers"
log "starting containerd"
record_and_launch "$dir" containerd containerd --config "$node_dir/containerd/config.toml"
ctr_() { ctr -a "$containerd_sock" -n k8s.io "$@"; }
await_component containerd 20 ctr_ version
for tar in "$images/pause.tar" "$images/probe.tar" "$images/volume-helper.tar" "$coredns_dir/image.tar" \
  "$local_path_dir/image.tar"; do
  ctr_ images import "$tar" >/dev/null 2>>"$dir/containerd.log" || fail "importing $tar" containerd
done

# --- kubelet -------------------------------------------------------------------------------------------------------
cat > "$node_dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$containerd_sock
# This machine runs cgroup v1 and no systemd.
cgroupDriver: cgroupfs
failCgroupV1: false
address: $node_ip
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz_port
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [$cluster_dns_ip]
podLogsDir: $node_dir/pod-logs
failSwapOn: false
rotateCertificates: false
# Lowering its own oom_score_adj needs CAP_SYS_RESOURCE, which root lacks here.
oomScoreAdj: 0
# Images cannot be pulled again (no registry), so they are never garbage-collected; evictions only on real shortage.
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 100Mi, nodefs.available: 2%, imagefs.available: 2%}
EOF
log "starting kubelet"
record_and_launch "$dir" kubelet "$bin/kubelet" \
  --config="$node_dir/kubelet.yaml" \
  --kubeconfig="$node_dir/kubelet.kubeconfig" \
  --root-dir="$node_dir/kubelet" \
  --hostname-override="$node_name" \
  --node-ip="$node_ip" \
  --v=1

# --- control-plane controllers -------------------------------------------------------------------------------------
log "starting kube-scheduler and kube-controller-manager"
# Neither gets --authentication-kubeconfig: delegated authentication needs the apiserver's request-header CA (the
# aggregation layer), which this apiserver does not have; without it they retry and log an error every few seconds.
# Their health endpoints answer anyway; their metrics are not scraped here.
record_and_launch "$dir" kube-scheduler "$bin/kube-scheduler" \
  --kubeconfig="$node_dir/kube-scheduler.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$scheduler_port" \
  --cert-dir="$node_dir/certs/kube-scheduler" \
  --leader-elect=false \
  --v=1
# Each controller acts as its own ServiceAccount, so RBAC is what a real cluster has; with the cluster-signing CA,
# approved CertificateSigningRequests are signed as in a real cluster.
record_and_launch "$dir" kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig="$node_dir/kube-controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 \
  --secure-port="$controller_manager_port" \
  --cert-dir="$node_dir/certs/kube-controller-manager" \
  --service-account-private-key-file="$pki/sa.key" \
  --root-ca-file="$pki/ca.crt" \
  --cluster-signing-cert-file="$pki/ca.crt" \
  --cluster-signing-key-file="$pki/ca.key" \
  --use-service-account-credentials=true \
  --leader-elect=false \
  --v=1

# --- kube-proxy ----------------------------------------------------------------------------------------------------
cat > "$node_dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $node_dir/kube-proxy.kubeconfig}
hostnameOverride: $node_name
clusterCIDR: $pod_cidr
healthzBindAddress: 127.0.0.1:$proxy_healthz_port
metricsBindAddress: 127.0.0.1:$proxy_metrics_port
nodePortAddresses: [$node_ip/32]
oomScoreAdj: 0
# Zero leaves the machine's conntrack limits and timeouts as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
# NodePorts on 127.0.0.1 would need net.ipv4.conf.all.route_localnet=1 on the whole machine.
iptables: {localhostNodePorts: false}
EOF
log "starting kube-proxy"
record_and_launch "$dir" kube-proxy "$bin/kube-proxy" --config="$node_dir/kube-proxy.yaml" --v=1

# --- Ready ---------------------------------------------------------------------------------------------------------
ready=false
for _ in $(seq 1 240); do
  for name in "${node_components[@]}"; do
    # kube-router starts once the node is registered (below).
    [ "$name" = kube-router ] && continue
    alive "$dir/$name.pid" || fail "$name exited during startup" "$name"
  done
  if [ "$(kc get node "$node_name" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] \
    && kc get serviceaccount default -n default >/dev/null 2>&1; then
    ready=true
    break
  fi
  sleep 0.5
done
$ready || fail "node $node_name was not Ready with a default ServiceAccount within 120s" kubelet
log "node $node_name Ready at $node_ip in $(($(date +%s) - start))s"

# --- NetworkPolicy: kube-router's firewall alone ----------------------------------------------------------------
# Started once the node is registered: it finds its node by name, and exits when there is none yet. It reads pods,
# namespaces, nodes and policies, and turns each NetworkPolicy into iptables chains and ipsets in the
# FORWARD path of the bridge (bridge-nf-call-iptables above); traffic from the node itself (kubelet probes) passes.
# Pod networking stays the bridge plugin's and Services kube-proxy's.
kc apply -f - >/dev/null <<'EOF' || fail "applying kube-router's RBAC"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "securemail:kube-router"}
rules:
- apiGroups: [""]
  resources: [namespaces, pods, services, endpoints, nodes]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "securemail:kube-router"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "securemail:kube-router"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: "securemail:kube-router"}
EOF
log "starting kube-router (firewall only)"
record_and_launch "$dir" kube-router "$kube_router" \
  --kubeconfig="$node_dir/kube-router.kubeconfig" \
  --hostname-override="$node_name" \
  --run-firewall=true \
  --run-router=false \
  --run-service-proxy=false \
  --service-cluster-ip-range="$service_cidr" \
  --health-port="$kube_router_health_port" \
  --metrics-port=0 \
  --v=1

await_component kube-router 60 curl -fsS --max-time 2 "http://127.0.0.1:$kube_router_health_port/healthz"

# --- Cluster DNS ---------------------------------------------------------------------------------------------------
sed -e "s|@COREDNS_IMAGE@|$coredns_image|" -e "s|@CLUSTER_DNS_IP@|$cluster_dns_ip|" "$here/node/coredns.yaml" \
  | kc apply -f - >/dev/null || fail "applying the CoreDNS manifests"
kc -n kube-system rollout status deployment/coredns --timeout=120s >/dev/null \
  || fail "CoreDNS did not become available within 120s" kubelet
log "cluster DNS at $cluster_dns_ip"

# --- Persistent volumes ---------------------------------------------------------------------------------------------
sed -e "s|@PROVISIONER_IMAGE@|$local_path_image|" -e "s|@HELPER_IMAGE@|$volume_helper_image|" \
  -e "s|@VOLUME_DIR@|$node_dir/volumes|" "$here/node/local-path.yaml" | kc apply -f - >/dev/null \
  || fail "applying the local-path provisioner manifests"
kc -n local-path-storage rollout status deployment/local-path-provisioner --timeout=120s >/dev/null \
  || fail "the local-path provisioner did not become available within 120s" kubelet
log "node up in $(($(date +%s) - start))s (default StorageClass local-path; images $pause_image, $probe_image," \
  "$coredns_image, $local_path_image, $volume_helper_image)"
