#!/usr/bin/env bash
# Shared by cluster-up.sh, node-up.sh and cluster-down.sh: the test node's settings and the teardown of everything
# the node adds to the machine outside its state directory (network devices, sysctls, iptables chains, mounts,
# cgroups, shim sockets). Expects $dir (the cluster's state directory) to be set.
#
# The kubelet and kube-proxy work in the machine's own network namespace, cgroups and iptables tables, so one test
# node runs per machine at a time; every setting below has an environment override for moving it out of the way.

# shellcheck disable=SC2034 # the settings are read by the scripts that source this file
: "${dir:?node-lib.sh needs dir, the state directory of the cluster}"
node_name=securemail-node
# A non-loopback address for the node: the apiserver reaches the kubelet there (logs, exec) and pods reach the
# apiserver there, which neither can do through 127.0.0.1. It lives on an interface the node owns.
node_ip=${SECUREMAIL_NODE_IP:-10.240.0.1}
node_if=${SECUREMAIL_NODE_IF:-smnode0}
pod_cidr=${SECUREMAIL_POD_CIDR:-10.244.0.0/24}
pod_bridge=${SECUREMAIL_POD_BRIDGE:-smcni0}
# The apiserver's --service-cluster-ip-range is 10.96.0.0/16; the tenth address is the usual cluster DNS address.
cluster_dns_ip=10.96.0.10
kubelet_port=${SECUREMAIL_KUBELET_PORT:-10250}
kubelet_healthz_port=${SECUREMAIL_KUBELET_HEALTHZ_PORT:-10248}
scheduler_port=${SECUREMAIL_SCHEDULER_PORT:-10259}
controller_manager_port=${SECUREMAIL_CONTROLLER_MANAGER_PORT:-10257}
proxy_metrics_port=${SECUREMAIL_PROXY_METRICS_PORT:-10249}
proxy_healthz_port=${SECUREMAIL_PROXY_HEALTHZ_PORT:-10256}
kube_router_health_port=${SECUREMAIL_KUBE_ROUTER_HEALTH_PORT:-20244}
# The cluster's Service addresses (the apiserver's --service-cluster-ip-range; kube-router needs them too).
service_cidr=10.96.0.0/16
node_dir="$dir/node"
containerd_sock="$node_dir/containerd/containerd.sock"
# Node components in the order they stop: consumers of the apiserver first, the runtime last.
node_components=(kube-router kube-proxy kubelet kube-scheduler kube-controller-manager containerd)

# Sysctls the node needs or the kubelet sets on start (its kernel tunables). Their previous values are recorded in
# $node_dir/sysctl.orig and put back by node_teardown, so the machine is left as it was found.
node_sysctls=(net.ipv4.ip_forward vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

node_record_sysctls() {
  local key
  [ -f "$node_dir/sysctl.orig" ] && return 0
  for key in "${node_sysctls[@]}"; do
    printf '%s %s\n' "$key" "$(cat "/proc/sys/${key//.//}")"
  done > "$node_dir/sysctl.orig"
}

# True while every node component runs.
node_alive() {
  local name
  for name in "${node_components[@]}"; do alive "$dir/$name.pid" || return 1; done
}

# Gives the node its address on an interface of its own: one end of a veth pair whose other end stays unused (this
# kernel has no dummy driver: "Unknown device type"), both up so the address is a usable local address. Refuses an
# interface or address already in use, so a second node (or anything else using them) is never taken over.
node_address_up() {
  if ip link show "$node_if" >/dev/null 2>&1; then
    echo "node: interface $node_if already exists (another test node? set SECUREMAIL_NODE_IF)" >&2
    return 1
  fi
  if [[ $(ip -o addr show) == *" inet $node_ip/"* ]]; then
    echo "node: address $node_ip is already in use (set SECUREMAIL_NODE_IP)" >&2
    return 1
  fi
  mkdir -p "$node_dir"
  ip link add "$node_if" type veth peer name "${node_if}p" && ip addr add "$node_ip/32" dev "$node_if" \
    && ip link set "${node_if}p" up && ip link set "$node_if" up
}

# Records which iptables tables exist before the node adds any, so node_remove_iptables can drop the ones it made.
node_record_iptables_tables() {
  local tool
  for tool in iptables ip6tables; do
    [ -f "$node_dir/$tool-tables.orig" ] || "$tool-save" 2>/dev/null | sed -n 's/^\*//p' > "$node_dir/$tool-tables.orig"
  done
}

# Stops one node component recorded in $dir/NAME.pid: TERM, then KILL after 5 s.
node_stop() {
  local name=$1 pid
  [ -f "$dir/$name.pid" ] || return 0
  pid=$(cat "$dir/$name.pid")
  [ -n "$pid" ] && ours "$pid" "$name" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do ours "$pid" "$name" || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do ours "$pid" "$name" || return 0; sleep 0.1; done
  echo "could not stop $name (pid $pid)" >&2
  return 1
}

# Deletes every iptables chain named KUBE-* (kubelet, kube-proxy) or CNI-* (the bridge plugin's masquerading, the
# portmap plugin) and the rules in other chains that jump to them, for IPv4 and IPv6. Rules of anything else stay.
node_remove_iptables() {
  local tool table rules chains
  for tool in iptables ip6tables; do
    command -v "$tool-save" >/dev/null || continue
    for table in filter nat mangle raw; do
      rules=$("$tool-save" -t "$table" 2>/dev/null) || continue
      chains=$(sed -n 's/^:\(\(KUBE\|CNI\)-[^ ]*\) .*/\1/p' <<<"$rules")
      [ -n "$chains" ] || continue
      {
        echo "*$table"
        # Declaring a chain in a restore file empties it, which removes every reference between our chains.
        sed -n 's/^\(:\(KUBE\|CNI\)-[^ ]*\) .*/\1 - [0:0]/p' <<<"$rules"
        # Jumps from built-in or foreign chains into ours.
        grep -E '^-A ' <<<"$rules" | grep -vE '^-A (KUBE|CNI)-' | grep -E -- '-j (KUBE|CNI)-' | sed 's/^-A /-D /' || true
        while read -r chain; do echo "-X $chain"; done <<<"$chains"
        echo COMMIT
      } | "$tool-restore" --noflush || echo "node: could not remove the $tool $table chains" >&2
    done
    node_remove_new_tables "$tool"
  done
}

# With the nf_tables backend (Debian's default iptables) the first rule in a table creates the table; a table that
# did not exist before the node and is now empty (built-in chains with policy ACCEPT, nothing else) is deleted.
node_remove_new_tables() {
  local tool=$1 family=ip table rules
  [ "$tool" = ip6tables ] && family=ip6
  [ -f "$node_dir/$tool-tables.orig" ] && command -v nft >/dev/null || return 0
  [[ $("$tool" --version 2>/dev/null) == *nf_tables* ]] || return 0
  for table in $("$tool-save" 2>/dev/null | sed -n 's/^\*//p'); do
    grep -qx "$table" "$node_dir/$tool-tables.orig" && continue
    rules=$("$tool-save" -t "$table" 2>/dev/null | grep -vE '^(#|\*|COMMIT|:[A-Z]+ ACCEPT )' || true)
    [ -z "$rules" ] && nft delete table "$family" "$table"
  done
  return 0
}

# Destroys kube-router's ipsets (its NetworkPolicy peers: KUBE-SRC-*, KUBE-DST-*, kube-router-*), once no iptables rule
# refers to them (node_remove_iptables). Sets of anything else stay.
node_remove_ipsets() {
  command -v ipset >/dev/null || return 0
  local set
  for set in $(ipset list -n 2>/dev/null | grep -E '^(inet6:)?(KUBE-|kube-router-)' || true); do
    ipset destroy "$set" 2>/dev/null || echo "node: could not destroy ipset $set" >&2
  done
  return 0
}

# Unmounts everything mounted under $dir (container root filesystems, sandbox shm, network namespaces, the
# kubelet's volume mounts), deepest first.
node_unmount() {
  local target
  # mountinfo escapes spaces as \040; none of our paths contain one.
  awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r target; do
    umount "$target" 2>/dev/null || umount -l "$target" || echo "node: could not unmount $target" >&2
  done
}

# Removes the kubelet's pod cgroups (kubepods, and kubelet/runtime cgroups it made) from every v1 hierarchy,
# children first. Only empty cgroups can go, so this runs after every container has been killed.
node_remove_cgroups() {
  local hierarchy
  for hierarchy in /sys/fs/cgroup/*/; do
    [ -d "${hierarchy}kubepods" ] || continue
    find "${hierarchy}kubepods" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ -d "${hierarchy}kubepods" ] && echo "node: could not remove ${hierarchy}kubepods" >&2
  done
  return 0
}

# Kills every container of the node's containerd (their processes would otherwise outlive the runtime and keep
# mounts and network namespaces alive), then stops the shims that are left.
node_kill_containers() {
  local pid args id
  if [ -S "$containerd_sock" ] && alive "$dir/containerd.pid"; then
    for id in $(ctr -a "$containerd_sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$containerd_sock" -n k8s.io tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    sleep 0.5
    for id in $(ctr -a "$containerd_sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$containerd_sock" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true
    done
  fi
  # Without a running containerd (it crashed, or was killed) the containers are still there: every process in the
  # kubelet's pod cgroups is one of this node's containers.
  { find /sys/fs/cgroup/pids/kubepods -name cgroup.procs -exec cat {} + 2>/dev/null || true; } \
    | xargs -r kill -KILL 2>/dev/null || true
  # containerd 1.6 puts shim sockets in /run/containerd/s whatever its state directory, named by the hash of
  # "<containerd socket>/<namespace>/<task id>"; a killed shim leaves its socket behind.
  local task
  for task in "$node_dir"/containerd/state/io.containerd.runtime.v2.task/k8s.io/*; do
    [ -d "$task" ] || continue
    id=${task##*/}
    rm -f "/run/containerd/s/$(printf '%s' "$containerd_sock/k8s.io/$id" | sha256sum | cut -d' ' -f1)"
  done
  # Shims started by our containerd name its socket on their command line; a shim of any other containerd does not.
  for pid in $(pgrep -x containerd-shim 2>/dev/null; pgrep -f '^/usr/bin/containerd-shim-runc-v2 ' 2>/dev/null); do
    args=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || continue
    [[ $args == *" -address $containerd_sock "* ]] && kill -KILL "$pid" 2>/dev/null
  done
  return 0
}

# Removes the node's address; after the apiserver has stopped, which listens on it: without its own address the
# apiserver's shutdown hangs until cluster-down.sh kills it.
node_address_down() {
  # Deleting one end of the veth pair deletes both.
  if ip link show "$node_if" >/dev/null 2>&1; then ip link delete "$node_if"; fi
}

# Undoes everything the node did to the machine but its address (node_address_down). Safe to run when nothing of the
# node is left.
node_teardown() {
  [ -d "$node_dir" ] || return 0
  local name key value status=0
  for name in kube-router kube-proxy kubelet kube-scheduler kube-controller-manager; do node_stop "$name" || status=1; done
  node_kill_containers
  node_stop containerd || status=1
  node_unmount
  node_remove_cgroups
  node_remove_iptables
  node_remove_ipsets
  if ip link show "$pod_bridge" >/dev/null 2>&1; then ip link delete "$pod_bridge" || status=1; fi
  # The kubelet links each container's log into this fixed directory; only links into our state directory go.
  find /var/log/containers -maxdepth 1 -type l -lname "$dir/*" -delete 2>/dev/null || true
  if [ -f "$node_dir/made-var-log-containers" ]; then rmdir /var/log/containers 2>/dev/null || true; fi
  # Left only when empty: another containerd on the machine may use them.
  rmdir /run/containerd/s /run/containerd/fifo /run/containerd 2>/dev/null || true
  if [ -f "$node_dir/sysctl.orig" ]; then
    while read -r key value; do
      sysctl -qw "$key=$value" || status=1
    done < "$node_dir/sysctl.orig"
  fi
  return $status
}
