#!/usr/bin/env bash
# Starts the data-plane test world: network namespaces on one bridge, a DNSSEC-signed test root with bind9 and a
# validating unbound and zones tests can update at run time, nginx serving MTA-STS policies, one real Postfix
# receiver per TLS case, a STARTTLS-stripping proxy and an egress host (Dante's SOCKS5 server on two source
# addresses). Usage: up.sh DIR. DIR holds every config, key, log, mailbox and pid; DIR/world.env describes the world.
# Nothing listens outside our own namespaces. A world already running from DIR is stopped and replaced; a failed
# start is cleaned up by down.sh (logs stay in DIR). Needs root (namespaces, Postfix).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

t0=$(date +%s%3N)
# Each line carries the seconds since start, so a slow step shows itself.
log() {
  local ms=$(($(date +%s%3N) - t0))
  printf 'dataplane-up: [%d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*" >&2
}
die() { echo "dataplane-up: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DIR"
dir=$(absolute_dir "$1")
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, Postfix)"
for cmd in ip openssl named dnssec-keygen dnssec-signzone dnssec-dsfromkey unbound unbound-checkconf nginx \
  postconf postfix dig python3 setpriv danted; do
  command -v "$cmd" >/dev/null || die "$cmd is not installed: run e2e/install-deps.sh"
done
python=$(command -v python3)
postfix_daemons=$(postconf -h daemon_directory)

# --- State directory ----------------------------------------------------------------------------------------------
# The marker file is what makes it safe to wipe DIR: a directory without it is never emptied.
marker="$dir/.smdp-world"
if [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
  [ -f "$marker" ] || die "$dir is not empty and was not made by up.sh; refusing to use it"
  log "replacing the world in $dir"
  "$here/down.sh" "$dir" >&2
  find "$dir" -mindepth 1 -delete
fi
# Fixed namespace names mean one world per machine; never take over another directory's world.
for ns in $(all_namespaces); do
  if ip netns list | grep -qx "$ns\( .*\)\?"; then
    die "namespace $ns already exists (another world is running: stop it with down.sh ITS-DIR, or down.sh --lost)"
  fi
done
if [ -e /etc/netns/$SMDP_MTA_NS ]; then
  die "/etc/netns/$SMDP_MTA_NS already exists (left by another world?); remove it or run its down.sh"
fi

mkdir -p "$dir"/{pids,pki,dns,web/html,web/tmp,mx,mta,egress}
: >"$marker"
# Postfix daemons run as the postfix user and must reach their queue and mailboxes inside DIR.
chmod 755 "$dir"
setpriv --reuid=postfix --regid=postfix --clear-groups test -x "$dir" \
  || die "the postfix user cannot enter $dir (a parent directory is not world-searchable); pick another DIR"
: >"$dir/netns"

# From here on a failure stops everything started so far; the logs stay in DIR.
finished=false
on_exit() {
  local status=$?
  if ! $finished; then
    echo "dataplane-up: FAILED (status $status); stopping what was started, logs kept in $dir" >&2
    "$here/down.sh" "$dir" >&2 || true
  fi
}
trap on_exit EXIT

# --- Certificates -------------------------------------------------------------------------------------------------
pki=$dir/pki
log "generating the test CA and certificates"
quiet_openssl() { openssl "$@" 2>>"$pki/openssl.log" || die "openssl $1 failed (see $pki/openssl.log)"; }
new_key() { quiet_openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

new_key "$pki/ca.key"
quiet_openssl req -x509 -new -key "$pki/ca.key" -days 30 -subj "/CN=SecureMail data-plane test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$pki/ca.crt"
# `openssl ca` is the only way in OpenSSL 3.0 to give a certificate validity dates in the past (expired case).
mkdir -p "$pki/newcerts"
: >"$pki/index.txt"
echo 1000 >"$pki/serial"
cat >"$pki/ca.cnf" <<EOF
[ca]
default_ca = test_ca
[test_ca]
database = $pki/index.txt
new_certs_dir = $pki/newcerts
serial = $pki/serial
certificate = $pki/ca.crt
private_key = $pki/ca.key
default_md = sha256
policy = any_name
unique_subject = no
[any_name]
commonName = supplied
EOF

# leaf NAME CN SAN-DNS-NAME KIND: writes NAME.key and NAME.crt (KIND ca, expired or selfsigned).
leaf() {
  local name=$1 cn=$2 san=$3 kind=$4
  new_key "$pki/$name.key"
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:$san" >"$pki/$name.ext"
  case $kind in
    selfsigned)
      quiet_openssl req -x509 -new -key "$pki/$name.key" -days 30 -subj "/CN=$cn" \
        -addext "subjectAltName=DNS:$san" -addext "extendedKeyUsage=serverAuth" -out "$pki/$name.crt" ;;
    ca)
      quiet_openssl req -new -key "$pki/$name.key" -subj "/CN=$cn" -out "$pki/$name.csr"
      quiet_openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAserial "$pki/serial" \
        -days 30 -extfile "$pki/$name.ext" -out "$pki/$name.crt" ;;
    expired)
      quiet_openssl req -new -key "$pki/$name.key" -subj "/CN=$cn" -out "$pki/$name.csr"
      quiet_openssl ca -batch -notext -config "$pki/ca.cnf" -startdate 20240101000000Z -enddate 20240201000000Z \
        -extfile "$pki/$name.ext" -in "$pki/$name.csr" -out "$pki/$name.crt" ;;
  esac
}

# SPKI SHA-256 (TLSA selector 1, matching 1) of a certificate or of a bare key.
spki_sha256() { openssl x509 -in "$1" -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum | cut -d' ' -f1; }
cert_sha256() { openssl x509 -in "$1" -outform DER | sha256sum | cut -d' ' -f1; }

for line in "${SMDP_RECEIVERS[@]}"; do
  receiver_fields "$line"
  case $rx_cert in
    ca | chain) leaf "$rx_name" "$rx_host" "$rx_host" ca ;;
    wrongname) leaf "$rx_name" "elsewhere.plain.test" "elsewhere.plain.test" ca ;;
    expired) leaf "$rx_name" "$rx_host" "$rx_host" expired ;;
    selfsigned) leaf "$rx_name" "$rx_host" "$rx_host" selfsigned ;;
    *) die "unknown certificate kind $rx_cert for $rx_name" ;;
  esac
  # Postfix reads the key and its chain (leaf first) from one file.
  {
    cat "$pki/$rx_name.key" "$pki/$rx_name.crt"
    if [ "$rx_cert" = chain ]; then cat "$pki/ca.crt"; fi
  } >"$pki/$rx_name.chain.pem"
done
# One certificate for both MTA-STS policy hosts.
new_key "$pki/web.key"
quiet_openssl req -new -key "$pki/web.key" -subj "/CN=mta-sts.sts.test" -out "$pki/web.csr"
printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
  "subjectAltName=DNS:mta-sts.sts.test,DNS:mta-sts.sts-nomatch.test" >"$pki/web.ext"
quiet_openssl x509 -req -in "$pki/web.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAserial "$pki/serial" \
  -days 30 -extfile "$pki/web.ext" -out "$pki/web.crt"
# The dane-mismatch zone publishes the hash of this key, which no server uses.
new_key "$pki/unrelated.key"
mismatch_hash=$(openssl pkey -in "$pki/unrelated.key" -pubout -outform DER | sha256sum | cut -d' ' -f1)
# nginx and Postfix load their keys as root before dropping privileges, so keys stay readable by root only.
chmod 600 "$pki"/*.key "$pki"/*.chain.pem

# --- DNS: a signed test root, signed and unsigned children ----------------------------------------------------------
dns=$dir/dns
log "signing the test root and zones"
mkdir -p "$dns/keys"
# zone_head ZONE: SOA and NS shared by every zone; short TTLs so a test never waits long for a cache to forget.
zone_head() {
  # shellcheck disable=SC2016 # $TTL is a zone-file directive, not a shell variable
  printf '$TTL 60\n%s IN SOA ns.test. hostmaster.test. 1 3600 600 86400 30\n%s IN NS ns.test.\n' "$1" "$1"
}
# sign ZONE: adds a KSK and a ZSK, signs DIR/dns/ZONE.db into ZONE.signed, prints the DS of the KSK.
sign() {
  local zone=$1 file=${1%.} ksk zsk
  [ "$zone" = . ] && file=root
  ksk=$(dnssec-keygen -q -K "$dns/keys" -a ECDSAP256SHA256 -f KSK -n ZONE "$zone")
  zsk=$(dnssec-keygen -q -K "$dns/keys" -a ECDSAP256SHA256 -n ZONE "$zone")
  cat "$dns/keys/$ksk.key" "$dns/keys/$zsk.key" >>"$dns/$file.db"
  # -d keeps its dsset- files in DIR rather than the caller's working directory.
  dnssec-signzone -q -K "$dns/keys" -d "$dns" -o "$zone" -O full -f "$dns/$file.signed" "$dns/$file.db" \
    "$dns/keys/$ksk" "$dns/keys/$zsk" >>"$dns/signzone.log" 2>&1 \
    || die "dnssec-signzone $zone failed (see $dns/signzone.log)"
  dnssec-dsfromkey -2 "$dns/keys/$ksk.key"
  echo "$ksk" >"$dns/$file.ksk"
}
host_addr() {
  local line
  for line in "${SMDP_RECEIVERS[@]}"; do
    receiver_fields "$line"
    if [ "$rx_name" = "$1" ]; then echo "$rx_addr"; return; fi
  done
  die "no receiver named $1"
}

{
  zone_head dane.test.
  echo "@ IN MX 10 mx.dane.test."
  echo "mx IN A $(host_addr dane)"
  echo "_25._tcp.mx IN TLSA 3 1 1 $(spki_sha256 "$pki/dane.crt")"
} >"$dns/dane.test.db"
{
  zone_head dane-ta.test.
  echo "@ IN MX 10 mx.dane-ta.test."
  echo "mx IN A $(host_addr daneta)"
  echo "_25._tcp.mx IN TLSA 2 0 1 $(cert_sha256 "$pki/ca.crt")"
} >"$dns/dane-ta.test.db"
{
  zone_head dane-mismatch.test.
  echo "@ IN MX 10 mx.dane-mismatch.test."
  echo "mx IN A $(host_addr danemismatch)"
  echo "_25._tcp.mx IN TLSA 3 1 1 $mismatch_hash"
} >"$dns/dane-mismatch.test.db"
{
  zone_head dane-servfail.test.
  echo "@ IN MX 10 mx.dane-servfail.test."
  echo "mx IN A $(host_addr daneservfail)"
  echo "_25._tcp.mx IN TLSA 3 1 1 $(spki_sha256 "$pki/daneservfail.crt")"
} >"$dns/dane-servfail.test.db"
{
  zone_head sts.test.
  echo "@ IN MX 10 mx.sts.test."
  echo "@ IN MX 20 rogue.sts.test."
  echo "mx IN A $(host_addr sts)"
  echo "rogue IN A $(host_addr rogue)"
  echo "mta-sts IN A $SMDP_WEB_ADDR"
  echo "_mta-sts IN TXT \"v=STSv1; id=$SMDP_STS_POLICY_ID\""
} >"$dns/sts.test.db"
# Its only MX is the rogue host, which its enforce policy does not list.
{
  zone_head sts-nomatch.test.
  echo "@ IN MX 10 rogue.sts.test."
  echo "mta-sts IN A $SMDP_WEB_ADDR"
  echo "_mta-sts IN TXT \"v=STSv1; id=$SMDP_STS_POLICY_ID\""
} >"$dns/sts-nomatch.test.db"
# mx_records ZONE: an MX record for each receiver domain in ZONE, pointing at the receiver's host wherever it lives
# (the rate-limiting "Gmail" host is in google.com).
mx_records() {
  local line domain
  for line in "${SMDP_RECEIVERS[@]}"; do
    receiver_fields "$line"
    for domain in ${rx_domains//,/ }; do
      if [[ $domain == *."$1" ]]; then echo "${domain%."$1"} IN MX 10 $rx_host."; fi
    done
  done
}
{
  zone_head plain.test.
  mx_records plain.test
  for line in "${SMDP_RECEIVERS[@]}"; do
    receiver_fields "$line"
    if [[ $rx_host == *.plain.test ]]; then echo "${rx_host%.plain.test} IN A $rx_addr"; fi
  done
} >"$dns/plain.test.db"
{
  zone_head sender.test.
  echo "${SMDP_MTA_HOSTNAME%.sender.test} IN A $SMDP_MTA_ADDR"
  # Where the DSNs to the load test's sender domain go.
  mx_records sender.test
} >"$dns/sender.test.db"
# Under the test root, not the Internet's: gives the rate-limiting receiver a Gmail MX host name.
{
  zone_head google.com.
  echo "gmail-smtp-in.l IN A $(host_addr ratelimited)"
} >"$dns/google.com.db"

# Zones the tests publish into at run time (DNS UPDATE, allowed from anywhere: only the world reaches named). Empty
# but for SOA and NS; 5 s records and a 1 s negative TTL, so a name looked up just before it was published is found
# about a second later.
for zone in "${SMDP_DYNAMIC_ZONES[@]}"; do
  # shellcheck disable=SC2016 # $TTL is a zone-file directive, not a shell variable
  printf '$TTL 5\n%s IN SOA ns.test. hostmaster.test. 1 3600 600 86400 1\n%s IN NS ns.test.\n' "$zone" "$zone" \
    >"$dns/${zone%.}.db"
done

signed_zones=(dane.test. dane-ta.test. dane-mismatch.test. dane-servfail.test.)
unsigned_zones=(sts.test. sts-nomatch.test. plain.test. sender.test. google.com.)
# The root holds ns.test itself (no zone cut at test.), delegations with DS to the signed zones and without DS to
# the unsigned and the dynamic ones, which makes those provably insecure. The reverse zones are delegated straight
# from the root (arpa., in-addr.arpa. and 10.in-addr.arpa. are empty non-terminals of the test root).
{
  zone_head .
  echo "ns.test. IN A $SMDP_AUTH_ADDR"
} >"$dns/root.db"
for zone in "${signed_zones[@]}"; do
  ds=$(sign "$zone")
  { echo "$zone IN NS ns.test."; echo "$ds"; } >>"$dns/root.db"
done
for zone in "${unsigned_zones[@]}" "${SMDP_DYNAMIC_ZONES[@]}"; do
  echo "$zone IN NS ns.test." >>"$dns/root.db"
done
root_ds=$(sign .)
# A broken signature on the TLSA RRset only: MX and A validate, the TLSA lookup is bogus, so the validating
# resolver answers SERVFAIL for exactly that name.
awk '$4 == "RRSIG" && $5 == "TLSA" { t = $NF; $NF = (substr(t, 1, 1) == "A" ? "B" : "A") substr(t, 2) } { print }' \
  "$dns/dane-servfail.test.signed" >"$dns/dane-servfail.test.signed.tmp"
mv "$dns/dane-servfail.test.signed.tmp" "$dns/dane-servfail.test.signed"

# Trust anchor for the sidecar and unbound: the root KSK as one DNSKEY record with an explicit TTL and the key on
# one line, the plainest zone-file form any parser accepts; the DS form sits next to it.
awk '!/^;/ { for (i = 1; i <= NF; i++) if ($i == "DNSKEY") d = i; key = ""; for (i = d + 4; i <= NF; i++) key = key $i
            print ". 3600 IN DNSKEY", $(d + 1), $(d + 2), $(d + 3), key }' \
  "$dns/keys/$(cat "$dns/root.ksk").key" >"$dir/trust-anchor"
awk '{ for (i = 1; i <= NF; i++) if ($i == "DS") d = i; digest = ""; for (i = d + 4; i <= NF; i++) digest = digest $i
       print ". 3600 IN DS", $(d + 1), $(d + 2), $(d + 3), digest }' <<<"$root_ds" >"$dir/trust-anchor.ds"
# delv reads anchors in named.conf syntax.
awk '{ for (i = 1; i <= NF; i++) if ($i == "DNSKEY") d = i; key = ""; for (i = d + 4; i <= NF; i++) key = key $i
       printf "trust-anchors {\n  \"%s\" static-key %s %s %s \"%s\";\n};\n", $1, $(d + 1), $(d + 2), $(d + 3), key }' \
  "$dir/trust-anchor" >"$dns/delv-anchors.conf"

{
  cat <<EOF
options {
  directory "$dns";
  pid-file none;
  session-keyfile none;
  managed-keys-directory "$dns";
  listen-on port 53 { $SMDP_AUTH_ADDR; };
  listen-on-v6 { none; };
  recursion no;
  dnssec-validation no;
  notify no;
  allow-query { any; };
};
controls { };
logging {
  channel to_file { file "$dns/named.log"; severity info; print-time yes; print-category yes; };
  category default { to_file; };
  category queries { to_file; };
};
zone "." { type primary; file "$dns/root.signed"; };
EOF
  for zone in "${signed_zones[@]}"; do
    echo "zone \"$zone\" { type primary; file \"$dns/${zone%.}.signed\"; };"
  done
  for zone in "${unsigned_zones[@]}"; do
    echo "zone \"$zone\" { type primary; file \"$dns/${zone%.}.db\"; };"
  done
  # named keeps each update in ZONE.db.jnl next to the zone file.
  for zone in "${SMDP_DYNAMIC_ZONES[@]}"; do
    echo "zone \"$zone\" { type primary; file \"$dns/${zone%.}.db\"; allow-update { any; }; };"
  done
} >"$dns/named.conf"
named-checkconf -z "$dns/named.conf" >"$dns/named-checkconf.log" 2>&1 \
  || die "named-checkconf failed (see $dns/named-checkconf.log)"

printf '. 3600000 IN NS ns.test.\nns.test. 3600000 IN A %s\n' "$SMDP_AUTH_ADDR" >"$dns/root.hints"
cat >"$dns/unbound.conf" <<EOF
server:
  verbosity: 1
  interface: $SMDP_RESOLVER_ADDR
  port: 53
  do-ip6: no
  access-control: $SMDP_SUBNET_PREFIX.0/24 allow
  access-control: 127.0.0.0/8 allow
  username: ""
  chroot: ""
  directory: "$dns"
  pidfile: "$dns/unbound.pid"
  use-syslog: no
  logfile: "$dns/unbound.log"
  log-servfail: yes
  val-log-level: 2
  module-config: "validator iterator"
  root-hints: "$dns/root.hints"
  trust-anchor-file: "$dir/trust-anchor"
  # .test is a locally served zone by default (RFC 6761); here it must be resolved from the test root.
  local-zone: "test." nodefault
  # The RFC 1918 reverse zones (10.in-addr.arpa. and others) are locally served empty zones by default; here the
  # world's reverse zones must be resolved from the test root's delegations.
  unblock-lan-zones: yes
  # Short caches: a test that restarts a component does not inherit yesterday's answers for long.
  cache-max-ttl: 60
  cache-max-negative-ttl: 5
  val-bogus-ttl: 5
  infra-host-ttl: 30
remote-control:
  control-enable: no
EOF
unbound-checkconf "$dns/unbound.conf" >"$dns/unbound-checkconf.log" 2>&1 \
  || die "unbound-checkconf failed (see $dns/unbound-checkconf.log)"

# --- MTA-STS web server -------------------------------------------------------------------------------------------
web=$dir/web
policy() {
  printf 'version: STSv1\r\nmode: enforce\r\nmx: %s\r\nmax_age: 86400\r\n' "$1"
}
mkdir -p "$web/html/mta-sts.sts.test/.well-known" "$web/html/mta-sts.sts-nomatch.test/.well-known"
policy mx.sts.test >"$web/html/mta-sts.sts.test/.well-known/mta-sts.txt"
policy mx.sts-nomatch.test >"$web/html/mta-sts.sts-nomatch.test/.well-known/mta-sts.txt"
chmod -R a+rX "$web/html"
cat >"$web/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
pid $web/nginx.pid;
error_log $web/error.log info;
events { worker_connections 64; }
http {
  access_log $web/access.log;
  client_body_temp_path $web/tmp/body;
  proxy_temp_path $web/tmp/proxy;
  fastcgi_temp_path $web/tmp/fastcgi;
  uwsgi_temp_path $web/tmp/uwsgi;
  scgi_temp_path $web/tmp/scgi;
  # RFC 8461 wants text/plain; no types table, so every file is served as exactly that.
  types { }
  default_type text/plain;
  server {
    listen $SMDP_WEB_ADDR:443 ssl;
    server_name mta-sts.sts.test mta-sts.sts-nomatch.test;
    ssl_certificate $pki/web.crt;
    ssl_certificate_key $pki/web.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    root $web/html/\$host;
    location = /.well-known/mta-sts.txt { }
    location / { return 404; }
  }
}
EOF

# --- Egress host: Dante's SOCKS5 server ---------------------------------------------------------------------------
# A client that connects to one address gets its outgoing connection from the same address (same-same), and the
# CONNECT reply's BND.ADDR names it. No authentication; TCP CONNECT only, and only from 10.0.0.0/8 (the world, the
# host link and the pods behind it). Each session is logged with both of its connections' addresses.
egress=$dir/egress
{
  echo "logoutput: $egress/danted.log"
  for addr in "${SMDP_EGRESS_ADDRS[@]}"; do echo "internal: $addr port = $SMDP_EGRESS_PORT"; done
  for addr in "${SMDP_EGRESS_ADDRS[@]}"; do echo "external: $addr"; done
  cat <<EOF
external.rotation: same-same
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {
  from: 10.0.0.0/8 to: 0.0.0.0/0
  log: error connect disconnect
}
client block {
  from: 0.0.0.0/0 to: 0.0.0.0/0
  log: error connect
}
socks block {
  from: 0.0.0.0/0 to: 0.0.0.0/0
  command: bind bindreply udpassociate udpreply
  log: error connect
}
socks pass {
  from: 10.0.0.0/8 to: 0.0.0.0/0
  command: connect
  protocol: tcp
  log: error connect disconnect
}
socks block {
  from: 0.0.0.0/0 to: 0.0.0.0/0
  log: error connect
}
EOF
} >"$egress/danted.conf"

# --- Postfix receivers --------------------------------------------------------------------------------------------
postfix_uid=$(id -u postfix)
postfix_gid=$(id -g postfix)
# Every service runs unchained: the private queue directories have no chroot tree.
master_cf() {
  cat <<EOF
$1:25      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
}
log "configuring ${#SMDP_RECEIVERS[@]} Postfix receivers"
for line in "${SMDP_RECEIVERS[@]}"; do
  receiver_fields "$line"
  rx=$dir/mx/$rx_name
  mkdir -p "$rx/conf" "$rx/queue" "$rx/data" "$rx/mail"
  chown postfix:postfix "$rx/data" "$rx/mail"
  listen=$rx_addr
  # Behind the stripping proxy Postfix listens on loopback only; the proxy owns the public address.
  [ "$rx_tls" = stripped ] && listen=127.0.0.1
  master_cf "$listen" >"$rx/conf/master.cf"
  {
    cat <<EOF
compatibility_level = 3.6
queue_directory = $rx/queue
data_directory = $rx/data
# The master runs in the foreground with stdout going to DIR/mx/NAME/maillog; postlogd writes there.
maillog_file = /dev/stdout
myhostname = $rx_host
mydestination =
inet_interfaces = $listen
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# The receivers' namespaces have no resolver: reverse lookups of the client would only waste time.
smtpd_peername_lookup = no
smtpd_banner = \$myhostname ESMTP $rx_name
alias_maps =
alias_database =
local_transport = error:5.1.1 no local delivery on a test receiver
# Every address of the domain lands in one Maildir: DIR/mx/NAME/mail/mailbox/new/<one file per message>.
virtual_mailbox_domains = ${rx_domains//,/ }
virtual_mailbox_base = $rx/mail
virtual_mailbox_maps = static:mailbox/
virtual_uid_maps = static:$postfix_uid
virtual_gid_maps = static:$postfix_gid
virtual_minimum_uid = $postfix_uid
smtpd_relay_restrictions = reject_unauth_destination
# Records the TLS protocol and cipher in each message's Received header, and in the maillog.
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
smtpd_tls_chain_files = $pki/$rx_name.chain.pem
EOF
    case $rx_tls in
      may | stripped)
        echo "smtpd_tls_security_level = may"
        echo "smtpd_tls_protocols = >=TLSv1.2" ;;
      none)
        echo "smtpd_tls_security_level = none" ;;
      ratelimit)
        echo "smtpd_tls_security_level = may"
        echo "smtpd_tls_protocols = >=TLSv1.2"
        # Gmail's rate-limit reply; Postfix closes the session after a 421, as Gmail does.
        echo "smtpd_recipient_restrictions = check_recipient_access inline:{ { busy@$rx_domains = 421 4.7.28" \
          "Our system has detected an unusual rate of unsolicited mail originating from your IP address } }" ;;
      smart)
        echo "smtpd_tls_security_level = may"
        echo "smtpd_tls_protocols = >=TLSv1.2"
        # grey-* asks postgrey (on this namespace's loopback), which defers a recipient's first attempt; reject-*
        # is an unknown user. Postfix puts "<address>: Recipient address rejected:" before either text.
        echo "smtpd_restriction_classes = greylist"
        echo "greylist = check_policy_service inet:127.0.0.1:$SMDP_POSTGREY_PORT"
        echo "smtpd_recipient_restrictions = check_recipient_access regexp:{ { /^grey-/ greylist }," \
          "{ /^reject-/ 550 5.1.1 User unknown in virtual mailbox table } }" ;;
      tls11)
        # Debian's OpenSSL refuses TLS 1.1 at its default security level; this instance gets its own config.
        echo "smtpd_tls_security_level = may"
        echo "smtpd_tls_protocols = >=TLSv1.1, <=TLSv1.1"
        echo "tls_config_file = $rx/openssl.cnf"
        echo "tls_config_name = securemail_tls11"
        cat >"$rx/openssl.cnf" <<'EOF'
securemail_tls11 = tls11_init
[tls11_init]
ssl_conf = tls11_ssl
[tls11_ssl]
system_default = tls11_defaults
[tls11_defaults]
MinProtocol = TLSv1.1
MaxProtocol = TLSv1.1
CipherString = DEFAULT@SECLEVEL=0
EOF
        ;;
      *) die "unknown TLS mode $rx_tls for $rx_name" ;;
    esac
    # The good receiver has no mailbox nobody@: Postfix's unknown-user reply at RCPT, which the sidecar must hand
    # back to Postfix as a bounce. Every other local part is accepted as before.
    if [ "$rx_name" = good ]; then
      # Postfix puts "<address>: Recipient address rejected:" before the text.
      echo "smtpd_recipient_restrictions = check_recipient_access inline:{ { nobody@$rx_domains = 550 5.1.1" \
        "User unknown in virtual mailbox table } }"
    fi
  } >"$rx/conf/main.cf"
  # Postfix waits until a just-written main.cf is a couple of seconds old (it might still be being edited):
  # backdating the files saves that wait in every Postfix command below.
  touch -d '-1 minute' "$rx/conf/main.cf" "$rx/conf/master.cf"
  warnings=$(postconf -c "$rx/conf" -n 2>&1 >/dev/null) || die "postconf rejects $rx/conf/main.cf: $warnings"
  [ -z "$warnings" ] || die "postconf warns about $rx/conf/main.cf: $warnings"
done

# --- Network ------------------------------------------------------------------------------------------------------
log "creating namespaces"
# The name is recorded before the namespace exists, so down.sh deletes it even if up.sh dies halfway.
add_ns() {
  echo "$1" >>"$dir/netns"
  ip netns add "$1"
  ip -n "$1" link set lo up
}
add_ns "$SMDP_LAN_NS"
ip -n "$SMDP_LAN_NS" link add br0 type bridge
ip -n "$SMDP_LAN_NS" link set br0 up
# attach NS ADDR...: a veth pair created directly between the LAN namespace and NS; it never exists in the root
# namespace and disappears with NS.
attach() {
  local ns=$1 first=$2 addr
  shift
  local port="v${first##*.}"
  ip -n "$SMDP_LAN_NS" link add "$port" type veth peer name eth0 netns "$ns"
  ip -n "$SMDP_LAN_NS" link set "$port" master br0 up
  for addr in "$@"; do
    ip -n "$ns" addr add "$addr/24" dev eth0
  done
  ip -n "$ns" link set eth0 up
}
add_ns "$SMDP_DNS_NS"
attach "$SMDP_DNS_NS" "$SMDP_AUTH_ADDR" "$SMDP_RESOLVER_ADDR"
add_ns "$SMDP_WEB_NS"
attach "$SMDP_WEB_NS" "$SMDP_WEB_ADDR"
add_ns "$SMDP_MTA_NS"
attach "$SMDP_MTA_NS" "$SMDP_MTA_ADDR"
# A sending host has a way to the Internet: the sidecar's egress self-check asks the kernel for a route to a root
# server from its address. The LAN is this world's Internet, so the default route is the LAN itself.
ip -n "$SMDP_MTA_NS" route add default dev eth0
add_ns "$SMDP_EGRESS_NS"
attach "$SMDP_EGRESS_NS" "${SMDP_EGRESS_ADDRS[@]}"
for line in "${SMDP_RECEIVERS[@]}"; do
  receiver_fields "$line"
  add_ns "$(receiver_ns "$rx_name")"
  attach "$(receiver_ns "$rx_name")" "$rx_addr"
done
# `ip netns exec smdp-mta` bind-mounts this over /etc/resolv.conf, so every program there uses the test resolver.
echo "/etc/netns/$SMDP_MTA_NS" >"$dir/etc-netns"
mkdir -p "/etc/netns/$SMDP_MTA_NS"
printf 'nameserver %s\noptions edns0 trust-ad\n' "$SMDP_RESOLVER_ADDR" >"/etc/netns/$SMDP_MTA_NS/resolv.conf"

log "checking Postfix queue directories"
# Creates the queue subdirectories with the right owners before each master starts; it needs the receiver's
# address, hence its namespace. The checks run in parallel (each takes about half a second). Postfix commands print
# errors only to a terminal (the log would go to postlogd, which is not running yet), so a failure is repeated
# under `script` to show why.
check_pids=()
for line in "${SMDP_RECEIVERS[@]}"; do
  receiver_fields "$line"
  in_ns "$(receiver_ns "$rx_name")" postfix -c "$dir/mx/$rx_name/conf" check &
  check_pids+=("$!")
done
i=0
for line in "${SMDP_RECEIVERS[@]}"; do
  receiver_fields "$line"
  if ! wait "${check_pids[$i]}"; then
    conf=$dir/mx/$rx_name/conf
    in_ns "$(receiver_ns "$rx_name")" script -qec "postfix -c $conf check" /dev/null >&2 || true
    die "postfix check failed for receiver $rx_name"
  fi
  i=$((i + 1))
done

# --- Daemons ------------------------------------------------------------------------------------------------------
# start_daemon NAME NS LOG COMMAND...: runs COMMAND in the foreground inside NS, in its own session, and records its
# pid (ip netns exec and setsid both exec, so $! is the daemon itself) and, NUL-separated, NS, LOG and COMMAND, so a
# test can start it again after stopping it (nginx rewrites its own command line, so /proc cannot tell).
start_daemon() {
  local name=$1 ns=$2 logfile=$3
  shift 3
  printf '%s\0' "$ns" "$logfile" "$@" >"$dir/pids/$name.cmd"
  ip netns exec "$ns" setsid "$@" </dev/null >>"$logfile" 2>&1 &
  echo $! >"$dir/pids/$name.pid"
}
log "starting named, unbound, nginx, Dante, Postfix receivers and the stripping proxy"
# nginx -t binds its listen address, so it can only check the config inside the web namespace; danted -V looks
# for its addresses on the namespace's interfaces.
in_ns "$SMDP_WEB_NS" nginx -t -q -p "$web" -e "$web/error.log" -c "$web/nginx.conf" 2>"$web/nginx-t.log" \
  || die "nginx -t failed (see $web/nginx-t.log)"
in_ns "$SMDP_EGRESS_NS" danted -V -f "$egress/danted.conf" >"$egress/danted-V.log" 2>&1 \
  || die "danted -V failed (see $egress/danted-V.log)"
start_daemon named "$SMDP_DNS_NS" "$dns/named.stderr" named -f -4 -c "$dns/named.conf"
start_daemon unbound "$SMDP_DNS_NS" "$dns/unbound.stderr" unbound -d -c "$dns/unbound.conf"
start_daemon nginx "$SMDP_WEB_NS" "$web/nginx.stderr" nginx -p "$web" -e "$web/error.log" -c "$web/nginx.conf"
# Without -D danted stays in the foreground; -p keeps its own pid file out of /run.
start_daemon danted "$SMDP_EGRESS_NS" "$egress/danted.stderr" danted -f "$egress/danted.conf" \
  -p "$egress/danted.pid"
for line in "${SMDP_RECEIVERS[@]}"; do
  receiver_fields "$line"
  rx=$dir/mx/$rx_name
  start_daemon "postfix-$rx_name" "$(receiver_ns "$rx_name")" "$rx/maillog" \
    "$postfix_daemons/master" -c "$rx/conf" -d
  if [ "$rx_tls" = smart ]; then
    # Greylists for 1 s, so Postfix's first retry (seconds later) passes; no client is ever whitelisted, so every
    # new recipient is deferred once. Delayed messages get postgrey's X-Greylist header.
    mkdir -p "$rx/postgrey"
    chown postgrey:postgrey "$rx/postgrey"
    : >"$rx/postgrey-whitelist"
    start_daemon postgrey "$(receiver_ns "$rx_name")" "$rx/postgrey.log" postgrey \
      --inet="127.0.0.1:$SMDP_POSTGREY_PORT" --dbdir="$rx/postgrey" --delay=1 --auto-whitelist-clients=0 \
      --whitelist-clients="$rx/postgrey-whitelist" --whitelist-recipients="$rx/postgrey-whitelist" \
      --greylist-text="Greylisted, please try again later"
  fi
  if [ "$rx_tls" = stripped ]; then
    start_daemon stripproxy "$(receiver_ns "$rx_name")" "$rx/stripproxy.log" "$python" "$here/stripproxy.py" \
      --listen-host "$rx_addr" --upstream-host 127.0.0.1 --log "$rx/stripped-sessions.jsonl"
  fi
done

log "waiting for every service to answer"
# --- Readiness, checked from the MTA's namespace so the bridge is proven too ---------------------------------------
# wait_for WHAT LOGFILE PIDNAME COMMAND...: retries COMMAND for up to 20 s; fails early if the daemon died.
wait_for() {
  local what=$1 logfile=$2 pidname=$3
  shift 3
  for _ in $(seq 1 200); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! pid_alive "$(cat "$dir/pids/$pidname.pid")"; then
      tail -n 30 "$logfile" >&2 || true
      die "$what exited during start-up (log: $logfile)"
    fi
    sleep 0.1
  done
  tail -n 30 "$logfile" >&2 || true
  die "$what did not become ready within 20s (log: $logfile)"
}
# Reads the SMTP greeting, which also proves the proxy relays the upstream banner.
# shellcheck disable=SC2016 # the inner script gets its arguments as $1 and $2
smtp_banner() {
  in_ns "$SMDP_MTA_NS" timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/25"; IFS= read -r line <&3; [[ $line == 220* ]]' _ "$1"
}
# shellcheck disable=SC2016
tcp_open() { in_ns "$SMDP_MTA_NS" timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2"; }
wait_for named "$dns/named.log" named \
  in_ns "$SMDP_MTA_NS" dig +time=1 +tries=1 +norec "@$SMDP_AUTH_ADDR" . SOA
wait_for unbound "$dns/unbound.log" unbound \
  in_ns "$SMDP_MTA_NS" dig +time=1 +tries=1 "@$SMDP_RESOLVER_ADDR" . SOA
wait_for nginx "$web/error.log" nginx tcp_open "$SMDP_WEB_ADDR" 443
for addr in "${SMDP_EGRESS_ADDRS[@]}"; do
  wait_for danted "$egress/danted.log" danted tcp_open "$addr" "$SMDP_EGRESS_PORT"
done
for line in "${SMDP_RECEIVERS[@]}"; do
  receiver_fields "$line"
  pidname=postfix-$rx_name
  [ "$rx_tls" = stripped ] && pidname=stripproxy
  wait_for "receiver $rx_name" "$dir/mx/$rx_name/maillog" "$pidname" smtp_banner "$rx_addr"
  if [ "$rx_tls" = smart ]; then
    # shellcheck disable=SC2016 # the inner script gets its port as $1
    wait_for postgrey "$dir/mx/$rx_name/postgrey.log" postgrey \
      in_ns "$(receiver_ns "$rx_name")" timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$SMDP_POSTGREY_PORT"
  fi
done

# --- world.env ----------------------------------------------------------------------------------------------------
{
  echo "# Data-plane test world (e2e/dataplane/up.sh). KEY=value lines, no quoting needed."
  echo "SMDP_DIR=$dir"
  echo "SMDP_RESOLVER=$SMDP_RESOLVER_ADDR"
  echo "SMDP_RESOLVER_PORT=53"
  echo "SMDP_AUTH_DNS=$SMDP_AUTH_ADDR"
  echo "SMDP_TRUST_ANCHOR=$dir/trust-anchor"
  echo "SMDP_TRUST_ANCHOR_DS=$dir/trust-anchor.ds"
  echo "SMDP_CA_FILE=$pki/ca.crt"
  echo "SMDP_MTA_NETNS=$SMDP_MTA_NS"
  echo "SMDP_MTA_ADDR=$SMDP_MTA_ADDR"
  echo "SMDP_MTA_HOSTNAME=$SMDP_MTA_HOSTNAME"
  echo "SMDP_MTA_RESOLV_CONF=/etc/netns/$SMDP_MTA_NS/resolv.conf"
  echo "SMDP_MTA_STATE_DIR=$dir/mta"
  echo "SMDP_WEB_ADDR=$SMDP_WEB_ADDR"
  echo "SMDP_STS_POLICY_ID=$SMDP_STS_POLICY_ID"
  echo "SMDP_STS_POLICY_URL=https://mta-sts.sts.test/.well-known/mta-sts.txt"
  names=()
  for line in "${SMDP_RECEIVERS[@]}"; do
    receiver_fields "$line"
    key=SMDP_RX_${rx_name^^}
    names+=("$rx_name")
    echo "${key}_DOMAINS=$rx_domains"
    echo "${key}_HOST=$rx_host"
    echo "${key}_ADDR=$rx_addr"
    echo "${key}_NETNS=$(receiver_ns "$rx_name")"
    echo "${key}_MAILDIR=$dir/mx/$rx_name/mail/mailbox"
    echo "${key}_MAILLOG=$dir/mx/$rx_name/maillog"
    echo "${key}_CERT=$pki/$rx_name.crt"
    echo "${key}_TLS=$rx_tls"
  done
  echo "SMDP_RECEIVERS=$(IFS=,; echo "${names[*]}")"
  echo "SMDP_STRIPPED_SESSIONS=$dir/mx/stripped/stripped-sessions.jsonl"
  echo "SMDP_STRIPPED_RAW=$dir/mx/stripped/stripped-sessions.jsonl.raw"
  # The one address of a tenant-policy domain whose receiver answers RCPT with 550 5.1.1 (user unknown).
  echo "SMDP_GOOD_UNKNOWN_RECIPIENT=nobody@good.plain.test"
  # A sender domain whose MX is the smart receiver, so DSNs to it can be counted there.
  echo "SMDP_DSN_DOMAIN=notices.sender.test"
  # The egress host: SOCKS5 on each address, outgoing connections from the address the client connected to.
  echo "SMDP_EGRESS_NETNS=$SMDP_EGRESS_NS"
  echo "SMDP_EGRESS_ADDRS=$(IFS=,; echo "${SMDP_EGRESS_ADDRS[*]}")"
  echo "SMDP_EGRESS_SOCKS_PORT=$SMDP_EGRESS_PORT"
  echo "SMDP_EGRESS_LOG=$egress/danted.log"
  # Zones that accept DNS UPDATE (nsupdate to SMDP_AUTH_DNS) from anywhere in the world.
  dynamic=("${SMDP_DYNAMIC_ZONES[@]%.}")
  echo "SMDP_DYNAMIC_ZONES=$(IFS=,; echo "${dynamic[*]}")"
  # Recipient domain per policy case, for tests that think in cases rather than hosts.
  # SMDP_CASE_<CASE>=domain and SMDP_CASE_<CASE>_RX=the receiver (SMDP_RX_<RX>_*) its mail should reach, or not.
  for pair in DANE=dane.test:dane DANE_TA=dane-ta.test:daneta DANE_MISMATCH=dane-mismatch.test:danemismatch \
    DANE_SERVFAIL=dane-servfail.test:daneservfail STS=sts.test:sts STS_NOMATCH=sts-nomatch.test:rogue \
    RATELIMITED=ratelimited.plain.test:ratelimited; do
    echo "SMDP_CASE_${pair%%=*}=$(cut -d: -f1 <<<"${pair#*=}")"
    echo "SMDP_CASE_${pair%%=*}_RX=${pair##*:}"
  done
  for name in good nostarttls wrongname expired selfsigned tls11 stripped smart; do
    echo "SMDP_CASE_${name^^}=$name.plain.test"
    echo "SMDP_CASE_${name^^}_RX=$name"
  done
  echo "SMDP_NETNS=$(all_namespaces | tr ' \n' ',,' | sed 's/,*$//')"
} >"$dir/world.env.tmp"
mv "$dir/world.env.tmp" "$dir/world.env"

finished=true
log "world up; description in $dir/world.env"
echo "$dir/world.env"
