#!/usr/bin/env bash
# Crashes one component of the local control plane (SIGKILL, as an OOM kill or a node failure would) and starts it
# again with exactly the command line cluster-up.sh recorded and the same state: etcd keeps its data directory (an
# existing member ignores the --initial-cluster flags), the apiserver its certificates and appends to the same audit
# log. Waits until the apiserver reports /readyz (which includes its etcd check) and prints how long the component
# was gone, in seconds. With DOWN_SECONDS it stays down that long first (an outage rather than a crash loop). A
# component that exits while starting is started again, up to 3 starts, with its last log lines on stderr.
# Usage: cluster-restart.sh apiserver|etcd [DOWN_SECONDS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=cluster-lib.sh
. "$here/cluster-lib.sh"
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
kubeconfig="$dir/kubeconfig"

die() { echo "cluster-restart: $*" >&2; exit 1; }

case ${1:-} in
  apiserver | kube-apiserver) name=kube-apiserver ;;
  etcd) name=etcd ;;
  *) die "usage: cluster-restart.sh apiserver|etcd [DOWN_SECONDS] (got '${1:-}')" ;;
esac
down=${2:-0}
[[ $down =~ ^[0-9]+$ ]] || die "DOWN_SECONDS must be a whole number of seconds, got '$down'"
[ -f "$dir/$name.args" ] || die "no recorded command line for $name in $dir (start the control plane with e2e/cluster-up.sh)"
pid=$(cat "$dir/$name.pid" 2>/dev/null) || die "no pid file for $name in $dir"
ours "$pid" "$name" || die "$name (pid $pid) is not running"

start=$(date +%s.%N)
kill -KILL "$pid"
for _ in $(seq 1 100); do
  ours "$pid" "$name" || break
  sleep 0.05
done
ours "$pid" "$name" && die "$name (pid $pid) survived SIGKILL"
sleep "$down"

# Like the kubelet with a static pod, a component that exits while starting is started again (a loaded kube-apiserver
# can fail a post-start hook's deadline and exit); the tests are about the operator, not the apiserver's start-up.
# What it said before exiting goes to stderr.
starts=0
start_component() {
  starts=$((starts + 1))
  log_offset=$(stat -c %s "$dir/$name.log" 2>/dev/null || echo 0)
  launch "$dir" "$name"
}
start_component
for _ in $(seq 1 240); do
  if ! alive "$dir/$name.pid"; then
    echo "cluster-restart: $name exited while starting (start $starts); its last lines:" >&2
    tail -c +$((log_offset + 1)) "$dir/$name.log" | tail -n 15 >&2
    [ "$starts" -lt 3 ] || die "$name exited $starts times while starting; see $dir/$name.log"
    start_component
    continue
  fi
  if kubectl --kubeconfig "$kubeconfig" --request-timeout=2s get --raw /readyz >/dev/null 2>&1; then
    python3 -c "import time; print(f'{time.time() - $start:.1f}')"
    exit 0
  fi
  sleep 0.25
done
die "the apiserver did not report /readyz ok within 60s after restarting $name; see $dir/$name.log"
