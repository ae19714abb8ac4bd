#!/usr/bin/env bash
# Puts ADDRESS on the interface of an MTA pod running on the test node, as a platform does for egress mode None
# (docs/egress.md), or takes it away: through the network namespace of the pod's sidecar process, found in the node's
# containerd. The address lasts as long as the pod.
# Usage: pod-address.sh add|del NAMESPACE POD ADDRESS (KUBECONFIG: the test cluster's)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
# shellcheck source=../node-lib.sh
. "$here/../node-lib.sh"
die() { echo "pod-address: $*" >&2; exit 1; }

if [ $# -ne 4 ] || [[ ! $1 =~ ^(add|del)$ ]]; then die "usage: $0 add|del NAMESPACE POD ADDRESS"; fi
action=$1 namespace=$2 pod=$3 address=$4
# The sidecar's container, once the kubelet has started it (up to two minutes for a pod just created or not yet
# created).
id=""
for _ in $(seq 1 120); do
  id=$(kubectl get pod -n "$namespace" "$pod" 2>/dev/null \
    -o jsonpath='{.status.containerStatuses[?(@.name=="sidecar")].state.running.startedAt}/{.status.containerStatuses[?(@.name=="sidecar")].containerID}') ||
    id=""
  [[ $id == ?*/containerd://?* ]] && break
  sleep 1
done
[[ $id == ?*/containerd://?* ]] || die "$namespace/$pod has no running sidecar container"
id=${id#*/containerd://}
pid=$(ctr -a "$containerd_sock" -n k8s.io task ls | awk -v id="$id" '$1 == id { print $2 }')
[ -n "$pid" ] || die "the sidecar of $namespace/$pod ($id) is not among the node's tasks"
prefix=32
[[ $address == *:* ]] && prefix=128
nsenter -t "$pid" -n ip addr "$action" "$address/$prefix" dev eth0 || die "ip addr $action $address in $namespace/$pod failed"
