#!/usr/bin/env bash
# Stops the local control plane (and the node) started by cluster-up.sh and removes its state directory. Safe to run
# when nothing is running.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster-lib.sh
. "$here/cluster-lib.sh"
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
# shellcheck source=node-lib.sh
. "$here/node-lib.sh"

log() { echo "cluster-down: $*" >&2; }

# The node (when cluster-up.sh started one) goes while the apiserver still answers its components; this also removes
# what it added to the machine outside $dir: network devices, iptables chains, mounts, cgroups, sysctl changes.
with_node=false
if [ -d "$node_dir" ]; then
  with_node=true
  log "stopping the node"
  node_teardown || { log "the node was not removed completely (see above)"; exit 1; }
fi

# The operator (started by the demo) and the apiserver go first, so neither logs a storm of connection errors while
# what it talks to shuts down.
for name in securemail-operator kube-apiserver etcd; do
  pidfile="$dir/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if [ -n "$pid" ] && ours "$pid" "$name"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      ours "$pid" "$name" || break
      sleep 0.1
    done
    if ours "$pid" "$name"; then
      log "$name did not exit after TERM; killing"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do
        ours "$pid" "$name" || break
        sleep 0.1
      done
      ours "$pid" "$name" && { log "could not stop $name (pid $pid)"; exit 1; }
    fi
  fi
done

if $with_node; then
  node_address_down || { log "could not remove the node's interface $node_if"; exit 1; }
fi

if [ -e "$dir" ]; then
  rm -rf "$dir"
  log "removed $dir"
fi
