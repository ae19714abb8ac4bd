#!/usr/bin/env bash
# Stops the data-plane test world started by up.sh DIR: the daemons it recorded, then anything else still running
# inside the world's namespaces (such as the Postfix and sidecar a test started in smdp-mta), then deletes those
# namespaces (the bridge and every veth go with them) and /etc/netns/smdp-mta. A host link (host-link.sh) goes
# first. DIR keeps its logs, mailboxes and configs for inspection; pid files are removed. Safe to run twice, and
# after an up.sh that failed halfway.
# Usage: down.sh DIR
#        down.sh --lost   when DIR was deleted while its world ran: treats every smdp-* namespace, and the root
#                         namespace's smdp-host link, as the world's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

log() { echo "dataplane-down: $*" >&2; }
die() { echo "dataplane-down: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR | --lost"
[ "$(id -u)" -eq 0 ] || die "must run as root"
if [ "$1" = --lost ]; then
  # A stand-in DIR that records what up.sh would have: every smdp-* namespace and the resolv.conf directory.
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  : >"$dir/.smdp-world"
  ip netns list | awk '$1 ~ /^smdp-/ { print $1 }' >"$dir/netns"
  echo "/etc/netns/$SMDP_MTA_NS" >"$dir/etc-netns"
  if ip link show dev "$SMDP_HOST_LINK_IF" >/dev/null 2>&1; then echo "link $SMDP_HOST_LINK_IF" >"$dir/host-link"; fi
else
  dir=$(absolute_dir "$1")
fi
if [ ! -e "$dir/.smdp-world" ]; then
  log "no world in $dir; nothing to do"
  exit 0
fi

# The host link first: its veth is in the root namespace, and a check that died leaves a scratch namespace and
# net.ipv4.ip_forward to restore. Its peer is on the world's bridge, so deleting the namespaces would also take the
# veth, but not the rest.
if [ -f "$dir/host-link" ] || [ -f "$dir/host-link-check" ]; then
  "$here/host-link.sh" down "$dir" || log "the host link of $dir was not fully removed (see above); going on"
fi

# Only namespaces this DIR recorded (up.sh writes each name before creating it) and that still exist.
namespaces=()
if [ -f "$dir/netns" ]; then
  while IFS= read -r ns; do
    [[ $ns == smdp-* ]] || continue
    if [ -e "/run/netns/$ns" ]; then namespaces+=("$ns"); fi
  done <"$dir/netns"
fi

# Every process inside our namespaces; nothing outside them is ever signalled.
world_pids() {
  local ns
  for ns in "${namespaces[@]}"; do
    ip netns pids "$ns" 2>/dev/null || true
  done
}
# True when the recorded pid is a live process in one of our namespaces (never a recycled pid elsewhere).
in_world() {
  local pid=$1
  pid_alive "$pid" && world_pids | grep -qx "$pid"
}
wait_gone() {
  local tries=$1 pid
  for _ in $(seq 1 "$tries"); do
    local left=0
    for pid in "${@:2}"; do
      if pid_alive "$pid"; then left=1; break; fi
    done
    [ "$left" -eq 0 ] && return 0
    sleep 0.1
  done
  return 1
}

# Recorded daemons first, gracefully: a Postfix master stops its own children, nginx its workers.
recorded=()
for pidfile in "$dir"/pids/*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if [[ $pid =~ ^[0-9]+$ ]] && [ "${#namespaces[@]}" -gt 0 ] && in_world "$pid"; then
    log "stopping $(basename "$pidfile" .pid) (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    recorded+=("$pid")
  fi
done
if [ "${#recorded[@]}" -gt 0 ]; then wait_gone 50 "${recorded[@]}" || true; fi

# Whatever is left in the namespaces (children, processes tests started there) gets TERM, then KILL.
if [ "${#namespaces[@]}" -gt 0 ]; then
  mapfile -t leftover < <(world_pids)
  if [ "${#leftover[@]}" -gt 0 ]; then
    log "terminating ${#leftover[@]} remaining process(es) in the world's namespaces"
    kill -TERM "${leftover[@]}" 2>/dev/null || true
    if ! wait_gone 30 "${leftover[@]}"; then
      mapfile -t leftover < <(world_pids)
      if [ "${#leftover[@]}" -gt 0 ]; then
        log "killing ${#leftover[@]} process(es) that ignored TERM"
        kill -KILL "${leftover[@]}" 2>/dev/null || true
        wait_gone 50 "${leftover[@]}" || true
      fi
    fi
  fi
  mapfile -t leftover < <(world_pids)
  [ "${#leftover[@]}" -eq 0 ] || die "processes still running in the world: ${leftover[*]}"
fi

for ns in "${namespaces[@]}"; do
  ip netns del "$ns" || die "could not delete namespace $ns"
done
[ "${#namespaces[@]}" -eq 0 ] || log "deleted namespaces: ${namespaces[*]}"

if [ -f "$dir/etc-netns" ]; then
  etc=$(cat "$dir/etc-netns")
  # Only the directory up.sh created for the MTA namespace.
  if [ "$etc" = "/etc/netns/$SMDP_MTA_NS" ] && [ -d "$etc" ]; then
    rm -rf -- "$etc"
    rmdir /etc/netns 2>/dev/null || true
  fi
  rm -f "$dir/etc-netns"
fi
rm -f "$dir"/pids/*.pid "$dir/netns"
log "world in $dir is down (logs kept)"
