#!/usr/bin/env bash
# Links the machine's root namespace into the data-plane test world started by up.sh DIR, so that a Kubernetes test
# node running there can use the world as its Internet: a veth pair, `smdp-host` (10.77.0.2/24) in the root namespace
# and its peer on the world's bridge, plus a route in every namespace of the world that sends the pods' range
# (10.78.0.0/24, routed to the pods by the root namespace) back through 10.77.0.2.
# Usage: host-link.sh up DIR      makes the link; refuses when smdp-host or 10.77.0.2 is already there
#        host-link.sh check DIR   proves it: the root namespace and a stand-in pod (namespace smdp-scratch, 10.78.0.5,
#                                 routed through the root namespace) reach a receiver directly and through the
#                                 egress host's SOCKS5 server, and get answers back
#        host-link.sh down DIR    removes exactly what up and check made (down.sh does this too); safe to run twice
# Everything made is recorded in DIR/host-link (and DIR/host-link-check) before it is made.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

t0=$(date +%s%3N)
log() {
  local ms=$(($(date +%s%3N) - t0))
  printf 'host-link: [%d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*" >&2
}
die() { echo "host-link: $*" >&2; exit 1; }

if [ $# -ne 2 ] || [[ ! $1 =~ ^(up|check|down)$ ]]; then die "usage: $0 up|check|down DIR"; fi
action=$1
dir=$(absolute_dir "$2")
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, the root namespace's links)"
record=$dir/host-link
check_record=$dir/host-link-check
prefix=${SMDP_HOST_ROUTED_CIDR#*/}
[ "$prefix" = 24 ] || die "lib.sh: SMDP_HOST_ROUTED_CIDR must be a /24"

link_exists() { ip link show dev "$1" >/dev/null 2>&1; }
ns_exists() { [ -e "/run/netns/$1" ]; }
# world.env without the keys this script appends; written through a temporary file so a reader never sees half.
strip_env() {
  local env=$dir/world.env
  [ -f "$env" ] || return 0
  grep -v -e '^SMDP_HOST_LINK_ADDR=' -e '^SMDP_HOST_LINK_IF=' -e '^SMDP_HOST_ROUTED_CIDR=' "$env" \
    >"$env.tmp" || true
  mv "$env.tmp" "$env"
}
# The world's namespaces that have an address on the LAN (all but the bridge's own).
addressed_namespaces() {
  local ns
  for ns in $(all_namespaces); do
    [ "$ns" = "$SMDP_LAN_NS" ] && continue
    echo "$ns"
  done
}

# --- down ---------------------------------------------------------------------------------------------------------
# Undoes the records of check, then of up, newest first; what is already gone is skipped.
undo() {
  local file=$1 kind arg1 arg2 pids
  [ -f "$file" ] || return 0
  while read -r kind arg1 arg2; do
    case $kind in
      ip_forward)
        log "restoring net.ipv4.ip_forward=$arg1"
        sysctl -qw "net.ipv4.ip_forward=$arg1" ;;
      netns)
        if [[ $arg1 != smdp-* ]] || ! ns_exists "$arg1"; then continue; fi
        pids=$(ip netns pids "$arg1")
        # shellcheck disable=SC2086 # one pid a word
        if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; fi
        log "deleting namespace $arg1"
        ip netns del "$arg1" ;;
      link)
        if [[ $arg1 != smdp-* ]] || ! link_exists "$arg1"; then continue; fi
        log "deleting link $arg1"
        ip link del dev "$arg1" ;;
      route)
        # route NS CIDR: the world's route back to the pods, via the host link.
        ns_exists "$arg1" || continue
        ip -n "$arg1" route del "$arg2" via "$SMDP_HOST_LINK_ADDR" 2>/dev/null || true ;;
      env)
        strip_env ;;
    esac
  done < <(tac "$file")
  rm -f "$file"
}
if [ "$action" = down ]; then
  if [ ! -f "$record" ] && [ ! -f "$check_record" ]; then
    log "no host link recorded in $dir; nothing to do"
    exit 0
  fi
  undo "$check_record"
  undo "$record"
  log "host link of $dir is down"
  exit 0
fi

# --- up and check need a running world ------------------------------------------------------------------------------
if [ ! -f "$dir/.smdp-world" ] || [ ! -f "$dir/world.env" ]; then die "no world in $dir: start it with up.sh $dir"; fi
if ! grep -qx "$SMDP_LAN_NS" "$dir/netns" 2>/dev/null || ! ns_exists "$SMDP_LAN_NS"; then
  die "the world in $dir is not running (no namespace $SMDP_LAN_NS of its own)"
fi

if [ "$action" = up ]; then
  [ ! -f "$record" ] || die "$dir already has a host link (see $record); run host-link.sh down $dir first"
  link_exists "$SMDP_HOST_LINK_IF" \
    && die "a link named $SMDP_HOST_LINK_IF already exists in the root namespace (another world's host link?)"
  owner=$(ip -4 -o addr show | awk -v a="$SMDP_HOST_LINK_ADDR" '{ split($4, p, "/") } p[1] == a { print $2 }')
  [ -z "$owner" ] || die "$SMDP_HOST_LINK_ADDR is already in use in the root namespace (on $owner)"
  for ns in $(addressed_namespaces); do
    ns_exists "$ns" || continue
    if ip -n "$ns" -4 -o addr show | awk '{ split($4, p, "/"); print p[1] }' | grep -qx "$SMDP_HOST_LINK_ADDR"; then
      die "$SMDP_HOST_LINK_ADDR is already in use in the world (namespace $ns)"
    fi
  done
  # A route the root namespace already has for the world's LAN would compete with the link's.
  existing=$(ip -4 route show exact "$SMDP_SUBNET_PREFIX.0/24")
  [ -z "$existing" ] || die "the root namespace already routes $SMDP_SUBNET_PREFIX.0/24: $existing"

  finished=false
  # shellcheck disable=SC2317 # invoked by the trap
  on_exit() {
    if ! $finished; then
      echo "host-link: FAILED; removing what was made" >&2
      undo "$record"
    fi
  }
  trap on_exit EXIT
  log "creating $SMDP_HOST_LINK_IF ($SMDP_HOST_LINK_ADDR/24) on the world's bridge"
  # Recorded first, so down removes it even if this script dies halfway. The peer is created directly in the LAN
  # namespace, so the pair disappears with the world as well.
  echo "link $SMDP_HOST_LINK_IF" >>"$record"
  ip link add "$SMDP_HOST_LINK_IF" type veth peer name "$SMDP_HOST_LINK_PEER" netns "$SMDP_LAN_NS"
  ip -n "$SMDP_LAN_NS" link set "$SMDP_HOST_LINK_PEER" master br0 up
  ip addr add "$SMDP_HOST_LINK_ADDR/24" dev "$SMDP_HOST_LINK_IF"
  ip link set "$SMDP_HOST_LINK_IF" up
  log "routing $SMDP_HOST_ROUTED_CIDR via $SMDP_HOST_LINK_ADDR in every namespace of the world"
  for ns in $(addressed_namespaces); do
    ns_exists "$ns" || die "namespace $ns of the world is missing"
    echo "route $ns $SMDP_HOST_ROUTED_CIDR" >>"$record"
    ip -n "$ns" route add "$SMDP_HOST_ROUTED_CIDR" via "$SMDP_HOST_LINK_ADDR"
  done
  echo "env" >>"$record"
  env_lines=("SMDP_HOST_LINK_IF=$SMDP_HOST_LINK_IF" "SMDP_HOST_LINK_ADDR=$SMDP_HOST_LINK_ADDR"
    "SMDP_HOST_ROUTED_CIDR=$SMDP_HOST_ROUTED_CIDR")
  { cat "$dir/world.env"; printf '%s\n' "${env_lines[@]}"; } >"$dir/world.env.tmp"
  mv "$dir/world.env.tmp" "$dir/world.env"
  finished=true
  log "host link up; appended to $dir/world.env:"
  printf '%s\n' "${env_lines[@]}"
  exit 0
fi

# --- check ----------------------------------------------------------------------------------------------------------
[ -f "$record" ] || die "no host link in $dir: run host-link.sh up $dir first"
[ ! -f "$check_record" ] || die "$check_record exists (a check still running, or one that died): host-link.sh down $dir"
ns_exists "$SMDP_SCRATCH_NS" && die "namespace $SMDP_SCRATCH_NS already exists"
link_exists "$SMDP_SCRATCH_NS" && die "a link named $SMDP_SCRATCH_NS already exists in the root namespace"
load_world_env "$dir/world.env"
w() { [ -n "${world[$1]:-}" ] || die "world.env has no $1"; echo "${world[$1]}"; }
good=$(w SMDP_RX_GOOD_ADDR)
maillog=$(w SMDP_RX_GOOD_MAILLOG)
IFS=, read -r -a egress_addrs <<<"$(w SMDP_EGRESS_ADDRS)"
socks_port=$(w SMDP_EGRESS_SOCKS_PORT)
danted_log=$(w SMDP_EGRESS_LOG)

trap 'undo "$check_record"' EXIT
fail() {
  echo "host-link: FAILED: $1" >&2
  if [ -n "${2:-}" ]; then printf '%s\n' "$2" | sed 's/^/host-link:   | /' >&2; fi
  exit 1
}
# banner [NS]: the good receiver's greeting, read from NS (default: the root namespace).
# shellcheck disable=SC2016 # the inner script gets its address as $1
banner() {
  local run=()
  [ $# -eq 1 ] && run=(ip netns exec "$1")
  "${run[@]}" timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/25"; IFS= read -r line <&3; printf "%s\n" "${line%$'"'"'\r'"'"'}"
    printf "QUIT\r\n" >&3' _ "$good"
}
# via_socks NS PROXY: a connection to the good receiver through the egress host; checks the source it was given.
via_socks() {
  local run=() out bnd
  [ -n "$1" ] && run=(ip netns exec "$1")
  out=$("${run[@]}" python3 "$here/socks5_probe.py" --proxy "$2:$socks_port" --target "$good:25" 2>&1) \
    || fail "SOCKS5 through $2 from ${1:-the root namespace}" "$out"
  bnd=$(sed -n 's/^bnd_addr=//p' <<<"$out")
  [ "$bnd" = "$2" ] || fail "BND.ADDR is '$bnd', not $2" "$out"
  grep -q '^banner=220 ' <<<"$out" || fail "no banner through $2" "$out"
}

log "check: the root namespace reaches the good receiver ($good) from $SMDP_HOST_LINK_ADDR"
since=$(wc -l <"$maillog")
out=$(banner) || fail "no banner from $good" "$out"
[[ $out == 220\ * ]] || fail "banner from $good is '$out'"
logged "$maillog" "$since" ": connect from " "[$SMDP_HOST_LINK_ADDR]" \
  || fail "no connection from $SMDP_HOST_LINK_ADDR in $maillog"
log "check: the root namespace gets the egress address it asked for from the SOCKS5 server"
via_socks "" "${egress_addrs[0]}"

log "check: a stand-in pod at $SMDP_SCRATCH_ADDR, routed by the root namespace, reaches the world and back"
forward=$(sysctl -n net.ipv4.ip_forward)
echo "ip_forward $forward" >>"$check_record"
sysctl -qw net.ipv4.ip_forward=1
echo "netns $SMDP_SCRATCH_NS" >>"$check_record"
ip netns add "$SMDP_SCRATCH_NS"
ip -n "$SMDP_SCRATCH_NS" link set lo up
# As a pod's veth: the root-namespace end has no address and answers ARP for everything it routes (proxy ARP), the
# pod's default route points at the link itself, and the root namespace routes the pod's /32 to that end.
ip link add "$SMDP_SCRATCH_NS" type veth peer name eth0 netns "$SMDP_SCRATCH_NS"
sysctl -qw "net.ipv4.conf.$SMDP_SCRATCH_NS.proxy_arp=1" "net.ipv4.neigh.$SMDP_SCRATCH_NS.proxy_delay=0"
ip link set "$SMDP_SCRATCH_NS" up
ip -n "$SMDP_SCRATCH_NS" addr add "$SMDP_SCRATCH_ADDR/32" dev eth0
ip -n "$SMDP_SCRATCH_NS" link set eth0 up
ip -n "$SMDP_SCRATCH_NS" route add default dev eth0
ip route add "$SMDP_SCRATCH_ADDR/32" dev "$SMDP_SCRATCH_NS"
since=$(wc -l <"$maillog")
out=$(banner "$SMDP_SCRATCH_NS") || fail "no banner from $good in $SMDP_SCRATCH_NS" "$out"
[[ $out == 220\ * ]] || fail "banner from $good is '$out'"
# The receiver saw the pod's own address: nothing translated it on the way.
logged "$maillog" "$since" ": connect from " "[$SMDP_SCRATCH_ADDR]" \
  || fail "no connection from $SMDP_SCRATCH_ADDR in $maillog"
log "check: the stand-in pod's SOCKS5 session leaves the world from ${egress_addrs[-1]}"
since=$(wc -l <"$maillog")
since_danted=$(wc -l <"$danted_log")
via_socks "$SMDP_SCRATCH_NS" "${egress_addrs[-1]}"
logged "$danted_log" "$since_danted" "tcp/connect" "$SMDP_SCRATCH_ADDR." \
  || fail "Dante logged no session of client $SMDP_SCRATCH_ADDR" "$(tail -n 5 "$danted_log")"
logged "$maillog" "$since" ": connect from " "[${egress_addrs[-1]}]" \
  || fail "no connection from ${egress_addrs[-1]} in $maillog"
log "host link works; removing the stand-in pod, net.ipv4.ip_forward back to $forward"
