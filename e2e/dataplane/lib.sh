#!/usr/bin/env bash
# Shared by up.sh, down.sh, smoke.sh and host-link.sh: the fixed topology of the data-plane test world and small
# helpers. Sourced, never run; the constants are used by the scripts that source it.
# shellcheck disable=SC2034
# Namespace names are fixed (prefix smdp-), so only one world runs on a machine at a time.

# The bridge lives in its own namespace so nothing of the world touches the root namespace's interfaces.
SMDP_LAN_NS=smdp-lan
SMDP_SUBNET_PREFIX=10.77.0
SMDP_MTA_NS=smdp-mta
SMDP_MTA_ADDR=10.77.0.10
SMDP_MTA_HOSTNAME=mta.sender.test
SMDP_DNS_NS=smdp-dns
SMDP_AUTH_ADDR=10.77.0.53
SMDP_RESOLVER_ADDR=10.77.0.54
SMDP_WEB_NS=smdp-web
SMDP_WEB_ADDR=10.77.0.80
SMDP_STS_POLICY_ID=20261125
# postgrey's policy service, on the smart receiver's loopback.
SMDP_POSTGREY_PORT=10023
# The egress host: Dante's SOCKS5 server on each address, and each address is also the source of the connections
# made for clients that came in on it (external.rotation same-same).
SMDP_EGRESS_NS=smdp-egress
# Two per node-suite tenant that sends through the proxy (node_egress.rs, node_queue.rs).
SMDP_EGRESS_ADDRS=(10.77.0.61 10.77.0.62 10.77.0.63 10.77.0.64)
SMDP_EGRESS_PORT=1080
# Zones the tests publish into at run time with DNS UPDATE (unsigned, insecurely delegated from the test root).
SMDP_DYNAMIC_ZONES=(tenant.test. 0.77.10.in-addr.arpa. 0.78.10.in-addr.arpa.)
# host-link.sh: a veth from the machine's root namespace onto the world's bridge, for a Kubernetes node running
# there, and the range of pod addresses the world routes back through it.
SMDP_HOST_LINK_IF=smdp-host
SMDP_HOST_LINK_PEER=vhost
SMDP_HOST_LINK_ADDR=10.77.0.2
SMDP_HOST_ROUTED_CIDR=10.78.0.0/24
# host-link.sh check: a stand-in pod (a namespace routed through the root namespace) with an address from the
# routed range.
SMDP_SCRATCH_NS=smdp-scratch
SMDP_SCRATCH_ADDR=10.78.0.5

# One receiving Postfix per line: name, address, MX host name, accepted domains (comma separated), certificate
# kind, TLS mode. Certificate kinds: ca (test CA, right name), chain (the same, CA certificate sent too, for
# DANE-TA), wrongname, expired, selfsigned. TLS modes: may (TLS >= 1.2 offered), none (no STARTTLS), tls11
# (TLS 1.1 only), stripped (TLS offered by Postfix but removed by a proxy on the public address), ratelimit (as
# may, but RCPT for busy@ gets Gmail's 421 4.7.28; its MX host name makes the sidecar class it as gmail), smart (as
# may, but RCPT for grey-* is greylisted by postgrey: 450 first, accepted on a retry a second later; reject-* gets
# 550 5.1.1; it also receives the DSNs for notices.sender.test, the load test's sender domain).
SMDP_RECEIVERS=(
  "dane 10.77.0.21 mx.dane.test dane.test ca may"
  "daneta 10.77.0.22 mx.dane-ta.test dane-ta.test chain may"
  "danemismatch 10.77.0.23 mx.dane-mismatch.test dane-mismatch.test ca may"
  "daneservfail 10.77.0.24 mx.dane-servfail.test dane-servfail.test ca may"
  "sts 10.77.0.31 mx.sts.test sts.test ca may"
  "rogue 10.77.0.32 rogue.sts.test sts.test,sts-nomatch.test ca may"
  "good 10.77.0.41 mx.good.plain.test good.plain.test ca may"
  "nostarttls 10.77.0.42 mx.nostarttls.plain.test nostarttls.plain.test ca none"
  "wrongname 10.77.0.43 mx.wrongname.plain.test wrongname.plain.test wrongname may"
  "expired 10.77.0.44 mx.expired.plain.test expired.plain.test expired may"
  "selfsigned 10.77.0.45 mx.selfsigned.plain.test selfsigned.plain.test selfsigned may"
  "tls11 10.77.0.46 mx.tls11.plain.test tls11.plain.test ca tls11"
  "stripped 10.77.0.47 mx.stripped.plain.test stripped.plain.test ca stripped"
  "ratelimited 10.77.0.48 gmail-smtp-in.l.google.com ratelimited.plain.test ca ratelimit"
  "smart 10.77.0.49 mx.smart.plain.test smart.plain.test,notices.sender.test ca smart"
)

# Splits one SMDP_RECEIVERS line into rx_name rx_addr rx_host rx_domains rx_cert rx_tls.
receiver_fields() {
  # shellcheck disable=SC2034 # the fields are read by the callers
  read -r rx_name rx_addr rx_host rx_domains rx_cert rx_tls <<<"$1"
}

receiver_ns() { echo "smdp-mx-$1"; }

# Every namespace the world can have, in start order; down.sh also walks this list.
all_namespaces() {
  local line rx_name
  echo "$SMDP_LAN_NS" "$SMDP_DNS_NS" "$SMDP_WEB_NS" "$SMDP_MTA_NS" "$SMDP_EGRESS_NS"
  for line in "${SMDP_RECEIVERS[@]}"; do
    rx_name=${line%% *}
    receiver_ns "$rx_name"
  done
}

# Runs a command inside a namespace of the world.
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# True when a process with this pid exists and is not a zombie.
pid_alive() {
  local state
  state=$(ps -p "$1" -o stat= 2>/dev/null) && [[ $state != Z* ]]
}

# Resolves a user-supplied state directory to an absolute path without requiring it to exist.
absolute_dir() { realpath -m -- "$1"; }

# load_world_env FILE: world.env (KEY=value, no quoting) into the associative array `world`, read as data rather
# than sourced.
declare -A world=()
load_world_env() {
  local key value
  while IFS='=' read -r key value; do
    [[ $key =~ ^SMDP_[A-Z0-9_]+$ ]] && world[$key]=$value
  done <"$1"
}

# logged LOG SINCE TEXT [TEXT2]: waits up to 5 s for a line of LOG after its first SINCE lines that holds TEXT (and
# TEXT2), e.g. a receiver's "connect from" a given address.
logged() {
  for _ in $(seq 1 50); do
    tail -n +"$(($2 + 1))" "$1" | grep -F -- "$3" | grep -qF -- "${4:-$3}" && return 0
    sleep 0.1
  done
  return 1
}
