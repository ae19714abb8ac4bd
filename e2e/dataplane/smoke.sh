#!/usr/bin/env bash
# Proves the data-plane test world in DIR works without the sidecar, with independent tools run from the MTA's
# namespace: DNSSEC answers through unbound (dig), independent validation from the trust anchor (delv, drill),
# records published at run time (nsupdate) and an SPF check against them (pyspf), each receiver's TLS behaviour
# (openssl s_client), the MTA-STS policy (curl), the egress host's SOCKS5 source addresses (socks5_probe.py) and one
# delivery over verified TLS (swaks). Every check can fail; the first failure is named and the script exits
# non-zero. Records it publishes (1 s TTL) are removed again. Usage: smoke.sh DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

current=
log() { echo "smoke: $*" >&2; }
die() { echo "smoke: $*" >&2; exit 1; }
check() { current=$1; log "check: $1"; }
# fail DETAIL [OUTPUT]: names the failing check, shows what the tool said, exits.
fail() {
  echo "smoke: FAILED: $current: $1" >&2
  if [ -n "${2:-}" ]; then printf '%s\n' "$2" | sed 's/^/smoke:   | /' >&2; fi
  exit 1
}

[ $# -eq 1 ] || die "usage: $0 DIR"
dir=$(absolute_dir "$1")
[ "$(id -u)" -eq 0 ] || die "must run as root (ip netns exec)"
[ -f "$dir/world.env" ] || die "no $dir/world.env: start the world with up.sh $dir"
for cmd in dig delv drill openssl curl swaks nsupdate; do
  command -v "$cmd" >/dev/null || die "$cmd is not installed: run e2e/install-deps.sh"
done

load_world_env "$dir/world.env"
w() { [ -n "${world[$1]:-}" ] || die "world.env has no $1"; echo "${world[$1]}"; }
mta() { in_ns "$(w SMDP_MTA_NETNS)" "$@"; }
ca=$(w SMDP_CA_FILE)
resolver=$(w SMDP_RESOLVER)
IFS=, read -r -a egress_addrs <<<"$(w SMDP_EGRESS_ADDRS)"
[ "${#egress_addrs[@]}" -ge 2 ] || die "SMDP_EGRESS_ADDRS is $(w SMDP_EGRESS_ADDRS), expected two addresses or more"

spki_sha256() { openssl x509 -in "$1" -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum | cut -d' ' -f1; }
# TLSA rdata as one line "usage selector matching HEX" (dig splits long hex into chunks).
tlsa_rdata() {
  mta dig +short +time=2 +tries=1 "_25._tcp.$1" TLSA | head -n 1 | awk '{ h = ""; for (i = 4; i <= NF; i++) h = h $i
    print $1, $2, $3, tolower(h) }'
}
# s_client ADDR [ARGS...]: a STARTTLS session that sends QUIT; prints everything openssl said.
s_client() {
  local addr=$1
  shift
  echo QUIT | mta timeout 10 openssl s_client -starttls smtp -connect "$addr:25" -brief "$@" 2>&1
}
# ehlo_reply NETNS ADDR: the server's full EHLO reply, speaking plain SMTP from bash.
# shellcheck disable=SC2016 # the inner script gets its address as $1
ehlo_reply() {
  in_ns "$1" timeout 10 bash -c '
    exec 3<>"/dev/tcp/$1/25"
    IFS= read -r line <&3 || exit 1
    printf "EHLO smoke.sender.test\r\n" >&3
    while IFS= read -r line <&3; do
      printf "%s\n" "${line%$'"'"'\r'"'"'}"
      [[ $line == 250\ * ]] && break
    done
    printf "QUIT\r\n" >&3
    IFS= read -r line <&3 || true' _ "$2"
}

# --- DNS through the validating resolver ------------------------------------------------------------------------
check "dane.test TLSA is secure (ad) and matches mx.dane.test's certificate"
out=$(mta dig +dnssec +time=2 +tries=1 "@$resolver" _25._tcp.mx.dane.test TLSA) \
  || fail "no answer from the resolver" "$out"
grep -q 'status: NOERROR' <<<"$out" || fail "status is not NOERROR" "$out"
grep -Eq '^;; flags:[a-z ]* ad[ ;]' <<<"$out" || fail "no ad flag" "$out"
dane_tlsa=$(tlsa_rdata mx.dane.test)
[ "$dane_tlsa" = "3 1 1 $(spki_sha256 "$(w SMDP_RX_DANE_CERT)")" ] || fail "TLSA $dane_tlsa does not match the cert"

check "dane-servfail.test TLSA is SERVFAIL while its MX and A are secure"
out=$(mta dig +time=2 +tries=1 "@$resolver" _25._tcp.mx.dane-servfail.test TLSA) \
  || fail "no answer from the resolver" "$out"
grep -q 'status: SERVFAIL' <<<"$out" || fail "TLSA lookup is not SERVFAIL" "$out"
out=$(mta dig +time=2 +tries=1 "@$resolver" dane-servfail.test MX) || fail "no answer from the resolver" "$out"
grep -q 'status: NOERROR' <<<"$out" || fail "MX lookup is not NOERROR" "$out"
grep -Eq '^;; flags:[a-z ]* ad[ ;]' <<<"$out" || fail "MX is not secure" "$out"
[ "$(mta dig +short "@$resolver" mx.dane-servfail.test A)" = "$(w SMDP_RX_DANESERVFAIL_ADDR)" ] \
  || fail "mx.dane-servfail.test A is not $(w SMDP_RX_DANESERVFAIL_ADDR)"

check "dane-mismatch.test TLSA is secure and matches no certificate the server has"
out=$(mta dig +time=2 +tries=1 "@$resolver" _25._tcp.mx.dane-mismatch.test TLSA) \
  || fail "no answer from the resolver" "$out"
grep -Eq '^;; flags:[a-z ]* ad[ ;]' <<<"$out" || fail "no ad flag" "$out"
mismatch_tlsa=$(tlsa_rdata mx.dane-mismatch.test)
[ "$mismatch_tlsa" != "3 1 1 $(spki_sha256 "$(w SMDP_RX_DANEMISMATCH_CERT)")" ] || fail "TLSA matches the server's key"

check "sts.test is insecure (no ad) with MX mx.sts.test (10) and rogue.sts.test (20)"
out=$(mta dig +time=2 +tries=1 "@$resolver" sts.test MX) || fail "no answer from the resolver" "$out"
grep -q 'status: NOERROR' <<<"$out" || fail "status is not NOERROR" "$out"
if grep -Eq '^;; flags:[a-z ]* ad[ ;]' <<<"$out"; then fail "unsigned zone answered with ad" "$out"; fi
mx=$(mta dig +short "@$resolver" sts.test MX | sort | tr '\n' ' ')
[ "$mx" = "10 mx.sts.test. 20 rogue.sts.test. " ] || fail "MX set is '$mx'"
txt=$(mta dig +short "@$resolver" _mta-sts.sts.test TXT) || fail "no answer from the resolver"
[ "$txt" = "\"v=STSv1; id=$(w SMDP_STS_POLICY_ID)\"" ] || fail "_mta-sts TXT is $txt"

check "system resolver in smdp-mta is the test resolver"
[ "$(mta dig +short mx.good.plain.test A)" = "$(w SMDP_RX_GOOD_ADDR)" ] || fail "mx.good.plain.test does not resolve"

# --- Records published at run time -------------------------------------------------------------------------------
[ "$(w SMDP_DYNAMIC_ZONES)" = tenant.test,0.77.10.in-addr.arpa,0.78.10.in-addr.arpa ] \
  || die "SMDP_DYNAMIC_ZONES is $(w SMDP_DYNAMIC_ZONES)"
# update ZONE COMMAND...: one DNS UPDATE to the authoritative server, as a tenant's DNS automation would send it.
update() {
  local zone=$1 out
  shift
  out=$({ printf 'server %s\nzone %s\n' "$(w SMDP_AUTH_DNS)" "$zone"; printf '%s\n' "$@" send; } \
    | mta nsupdate -t 5 2>&1) || fail "nsupdate in $zone refused" "$out"
}
# answer NAME TYPE: the resolver's full reply (dig +dnssec, so the ad flag shows).
answer() { mta dig +dnssec +time=2 +tries=1 "@$resolver" "$1" "$2"; }
# published NAME TYPE: waits up to 10 s for the resolver to answer with records; prints the reply.
published() {
  local out
  for _ in $(seq 1 100); do
    out=$(answer "$1" "$2") || true
    if grep -q 'status: NOERROR' <<<"$out" && ! grep -q 'ANSWER: 0,' <<<"$out"; then
      printf '%s\n' "$out"
      return 0
    fi
    sleep 0.1
  done
  fail "the resolver has no $2 for $1 10 s after it was published" "$out"
}
insecure() { if grep -Eq '^;; flags:[a-z ]* ad[ ;]' <<<"$1"; then fail "answered with ad" "$1"; fi; }
# Unique names, so a run never meets a previous run's cache.
token=$(date +%s%N)

check "tenant.test: a TXT published with nsupdate is answered by the resolver (insecure, no ad), also after a miss"
name=smoke-$token.tenant.test
out=$(answer "$name" TXT) || fail "no answer from the resolver" "$out"
grep -q 'status: NXDOMAIN' <<<"$out" || fail "$name exists before it was published" "$out"
update tenant.test "update add $name 1 TXT \"smoke $token\""
started=$(date +%s%3N)
out=$(published "$name" TXT)
log "  found $(($(date +%s%3N) - started)) ms after it was published (the miss was cached before)"
insecure "$out"
grep -q "TXT.*\"smoke $token\"" <<<"$out" || fail "wrong TXT" "$out"
update tenant.test "update delete $name TXT"

check "reverse zones: PTRs published with nsupdate for ${egress_addrs[0]} and 10.78.0.5 are answered by the resolver"
for pair in "${egress_addrs[0]}:0.77.10.in-addr.arpa" "10.78.0.5:0.78.10.in-addr.arpa"; do
  addr=${pair%%:*}
  zone=${pair#*:}
  ptr=$(awk -F. '{ print $4 "." $3 "." $2 "." $1 ".in-addr.arpa" }' <<<"$addr")
  # A run that failed halfway may have left its record.
  update "$zone" "update delete $ptr PTR"
  # Before: an NXDOMAIN from the world's own zone (its SOA), not from a resolver's built-in RFC 1918 zone.
  out=$(mta dig +time=2 +tries=1 "@$resolver" -x "$addr") || fail "no answer from the resolver" "$out"
  grep -q 'status: NXDOMAIN' <<<"$out" || fail "PTR for $addr exists before it was published" "$out"
  grep -Eq "^$zone\.[[:space:]].*SOA[[:space:]]+ns\.test\." <<<"$out" || fail "NXDOMAIN not from $zone" "$out"
  update "$zone" "update add $ptr 1 PTR smoke-$token.tenant.test."
  out=$(published "$ptr" PTR)
  insecure "$out"
  [ "$(mta dig +short "@$resolver" -x "$addr")" = "smoke-$token.tenant.test." ] || fail "dig -x $addr" "$out"
  update "$zone" "update delete $ptr PTR"
done

check "pyspf checks SPF against the world's DNS: v=spf1 ip4:${egress_addrs[0]} -all passes it, fails ${egress_addrs[1]}"
mta python3 -c 'import spf' 2>/dev/null || die "python3 has no spf module (pyspf): run e2e/install-deps.sh"
update tenant.test "update delete spf-smoke.tenant.test TXT" \
  "update add spf-smoke.tenant.test 1 TXT \"v=spf1 ip4:${egress_addrs[0]} -all\""
published spf-smoke.tenant.test TXT >/dev/null
for expect in "${egress_addrs[0]}:pass" "${egress_addrs[1]}:fail"; do
  # shellcheck disable=SC2016 # python, not shell
  result=$(mta python3 -c 'import spf, sys
print(spf.check2(i=sys.argv[1], s="x@spf-smoke.tenant.test", h="h.spf-smoke.tenant.test")[0])' "${expect%:*}" 2>&1) \
    || fail "pyspf failed" "$result"
  [ "$result" = "${expect#*:}" ] || fail "SPF for ${expect%:*} is '$result', not ${expect#*:}"
done
update tenant.test "update delete spf-smoke.tenant.test TXT"

# --- Independent validation from DIR/trust-anchor ----------------------------------------------------------------
check "delv validates dane.test TLSA from the test trust anchor and rejects dane-servfail.test"
out=$(mta delv -a "$dir/dns/delv-anchors.conf" "@$resolver" _25._tcp.mx.dane.test TLSA 2>&1)
grep -q '^; fully validated' <<<"$out" || fail "dane.test TLSA not fully validated" "$out"
if out=$(mta delv -a "$dir/dns/delv-anchors.conf" "@$resolver" _25._tcp.mx.dane-servfail.test TLSA 2>&1) \
  && grep -q 'fully validated' <<<"$out"; then
  fail "dane-servfail.test TLSA validated" "$out"
fi

check "drill chases dane.test TLSA to DIR/trust-anchor"
out=$(mta drill -k "$(w SMDP_TRUST_ANCHOR)" -S "@$resolver" _25._tcp.mx.dane.test TLSA 2>&1) || true
grep -q 'Chase successful' <<<"$out" || fail "drill chase failed" "$out"

# --- Receivers' TLS -----------------------------------------------------------------------------------------------
check "good: STARTTLS offered, certificate verifies for mx.good.plain.test against the test CA, TLS >= 1.2"
# Not `grep -q`: it stops reading at the match, and the reply's later lines then kill the reader with SIGPIPE, which
# pipefail reports as a failure.
reply=$(ehlo_reply "$(w SMDP_MTA_NETNS)" "$(w SMDP_RX_GOOD_ADDR)") || fail "no EHLO reply" "$reply"
grep -qx '250[- ]STARTTLS' <<<"$reply" || fail "no STARTTLS in EHLO" "$reply"
out=$(s_client "$(w SMDP_RX_GOOD_ADDR)" -CAfile "$ca" -verify_hostname mx.good.plain.test -verify_return_error) \
  || fail "handshake or verification failed" "$out"
grep -q '^Verification: OK' <<<"$out" || fail "not verified" "$out"
grep -Eq '^Protocol version: TLSv1\.[23]$' <<<"$out" || fail "protocol below TLS 1.2" "$out"

check "dane: mx.dane.test matches its TLSA 3 1 1 from DNS"
out=$(s_client "$(w SMDP_RX_DANE_ADDR)" -dane_tlsa_domain mx.dane.test -dane_tlsa_rrdata "$dane_tlsa" \
  -verify_return_error) || fail "DANE verification failed" "$out"
grep -q 'Verification: OK' <<<"$out" || fail "not verified" "$out"

check "dane-ta: mx.dane-ta.test chains to the CA named by its TLSA 2 0 1"
ta_tlsa=$(tlsa_rdata mx.dane-ta.test)
[[ $ta_tlsa == "2 0 1 "* ]] || fail "TLSA is '$ta_tlsa'"
out=$(s_client "$(w SMDP_RX_DANETA_ADDR)" -dane_tlsa_domain mx.dane-ta.test -dane_tlsa_rrdata "$ta_tlsa" \
  -verify_return_error) || fail "DANE-TA verification failed" "$out"
grep -q 'Verified peername: mx.dane-ta.test' <<<"$out" || fail "name not verified" "$out"

check "dane-mismatch: mx.dane-mismatch.test fails its TLSA"
if out=$(s_client "$(w SMDP_RX_DANEMISMATCH_ADDR)" -dane_tlsa_domain mx.dane-mismatch.test \
  -dane_tlsa_rrdata "$mismatch_tlsa" -verify_return_error); then
  fail "verification succeeded" "$out"
fi

check "sts: mx.sts.test and rogue.sts.test both have valid certificates for their names"
for host in mx rogue; do
  key=SMDP_RX_${host^^}
  [ "$host" = mx ] && key=SMDP_RX_STS
  out=$(s_client "$(w "${key}_ADDR")" -CAfile "$ca" -verify_hostname "$(w "${key}_HOST")" -verify_return_error) \
    || fail "$(w "${key}_HOST") does not verify" "$out"
done

check "nostarttls: no STARTTLS in EHLO"
out=$(ehlo_reply "$(w SMDP_MTA_NETNS)" "$(w SMDP_RX_NOSTARTTLS_ADDR)") || fail "no EHLO reply" "$out"
grep -q '^250' <<<"$out" || fail "no EHLO reply" "$out"
if grep -qx '250[- ]STARTTLS' <<<"$out"; then fail "STARTTLS offered" "$out"; fi

check "wrongname: chain verifies but the name is not mx.wrongname.plain.test"
out=$(s_client "$(w SMDP_RX_WRONGNAME_ADDR)" -CAfile "$ca" -verify_return_error) || fail "chain does not verify" "$out"
out=$(s_client "$(w SMDP_RX_WRONGNAME_ADDR)" -CAfile "$ca" -verify_hostname mx.wrongname.plain.test) \
  || true  # fails by design; the output says how
grep -q 'hostname mismatch' <<<"$out" || fail "no hostname mismatch" "$out"

check "expired: certificate has expired"
out=$(s_client "$(w SMDP_RX_EXPIRED_ADDR)" -CAfile "$ca" -verify_hostname mx.expired.plain.test) \
  || true  # fails by design; the output says how
grep -q 'certificate has expired' <<<"$out" || fail "not reported as expired" "$out"

check "selfsigned: certificate is self-signed"
out=$(s_client "$(w SMDP_RX_SELFSIGNED_ADDR)" -CAfile "$ca" -verify_hostname mx.selfsigned.plain.test) \
  || true  # fails by design; the output says how
grep -q 'self-signed certificate' <<<"$out" || fail "not reported as self-signed" "$out"

check "tls11: TLS 1.2 and 1.3 refused, TLS 1.1 accepted"
for version in -tls1_2 -tls1_3; do
  if out=$(s_client "$(w SMDP_RX_TLS11_ADDR)" "$version"); then fail "$version handshake succeeded" "$out"; fi
done
out=$(s_client "$(w SMDP_RX_TLS11_ADDR)" -tls1_1 -cipher 'DEFAULT@SECLEVEL=0' -CAfile "$ca" \
  -verify_hostname mx.tls11.plain.test -verify_return_error) || fail "TLS 1.1 handshake failed" "$out"
grep -q '^Protocol version: TLSv1.1$' <<<"$out" || fail "not TLS 1.1" "$out"

check "stripped: STARTTLS removed by the proxy (Postfix behind it offers it) and the session logged"
sessions=$(w SMDP_STRIPPED_SESSIONS)
before=$(wc -l <"$sessions")
out=$(ehlo_reply "$(w SMDP_MTA_NETNS)" "$(w SMDP_RX_STRIPPED_ADDR)") || fail "no EHLO reply" "$out"
grep -q '^250 ' <<<"$out" || fail "no final EHLO line" "$out"
if grep -qx '250[- ]STARTTLS' <<<"$out"; then fail "STARTTLS offered through the proxy" "$out"; fi
upstream=$(ehlo_reply "$(w SMDP_RX_STRIPPED_NETNS)" 127.0.0.1) || fail "Postfix behind the proxy not answering"
grep -qx '250[- ]STARTTLS' <<<"$upstream" || fail "Postfix behind the proxy offers no STARTTLS" "$upstream"
for _ in $(seq 1 50); do
  [ "$(wc -l <"$sessions")" -gt "$before" ] && break
  sleep 0.1
done
last=$(tail -n 1 "$sessions")
python3 - "$last" <<'EOF' || fail "session log entry is wrong" "$last"
import json, sys
record = json.loads(sys.argv[1])
assert record["ehlo"] == "EHLO smoke.sender.test", record
assert record["after_ehlo"] == "QUIT\r\n", record
EOF

check "smart: grey-* deferred with 450 once, then accepted; reject-* refused with 550 5.1.1; others accepted"
# rcpt_reply ADDRESS: the smart receiver's reply to RCPT TO:<ADDRESS>, over verified TLS.
rcpt_reply() {
  local out
  out=$(mta timeout 30 swaks --server "$(w SMDP_RX_SMART_HOST)" --port 25 --helo "$(w SMDP_MTA_HOSTNAME)" \
    --from smoke@sender.test --to "$1" --quit-after RCPT --tls --tls-verify --tls-ca-path "$ca" 2>&1) || true
  awk '/^ *~> RCPT TO/ { rcpt = 1; next } rcpt && /^<~\*? +[0-9][0-9][0-9] / { sub(/^<~\*? +/, ""); print; exit }' \
    <<<"$out"
}
grey="grey-smoke-$(date +%s%N)@$(w SMDP_CASE_SMART)"
reply=$(rcpt_reply "$grey")
[[ $reply == "450 "* ]] || fail "first attempt for grey-*: $reply"
sleep 1.5
reply=$(rcpt_reply "$grey")
[[ $reply == "250 "* ]] || fail "retry for grey-*: $reply"
reply=$(rcpt_reply "reject-smoke@$(w SMDP_CASE_SMART)")
[[ $reply == "550 5.1.1 "* ]] || fail "reject-*: $reply"
reply=$(rcpt_reply "alerts@$(w SMDP_DSN_DOMAIN)")
[[ $reply == "250 "* ]] || fail "the DSN domain: $reply"

# --- MTA-STS ------------------------------------------------------------------------------------------------------
check "MTA-STS policy for sts.test served over verified HTTPS as text/plain"
headers=$(mktemp)
trap 'rm -f "$headers"' EXIT
body=$(mta curl -fsS --max-time 10 --cacert "$ca" -D "$headers" "$(w SMDP_STS_POLICY_URL)") \
  || fail "fetch failed" "$body"
grep -qi '^content-type: text/plain' "$headers" || fail "wrong content type" "$(cat "$headers")"
grep -q '^mode: enforce' <<<"$body" || fail "policy is not enforce" "$body"
grep -qx 'mx: mx.sts.test.\?' <<<"$body" || fail "policy does not list mx.sts.test" "$body"

# --- Egress host --------------------------------------------------------------------------------------------------
maillog=$(w SMDP_RX_GOOD_MAILLOG)
for proxy in "${egress_addrs[@]}"; do
  check "egress: SOCKS5 via $proxy reaches the good receiver from $proxy, and the CONNECT reply's BND.ADDR says so"
  since=$(wc -l <"$maillog")
  out=$(mta python3 "$here/socks5_probe.py" --proxy "$proxy:$(w SMDP_EGRESS_SOCKS_PORT)" \
    --target "$(w SMDP_RX_GOOD_ADDR):25" 2>&1) || fail "SOCKS5 session failed" "$out"
  grep -qx "banner=220 $(w SMDP_RX_GOOD_HOST) .*" <<<"$out" || fail "no banner of the good receiver" "$out"
  bnd=$(sed -n 's/^bnd_addr=//p' <<<"$out")
  [ "$bnd" = "$proxy" ] || fail "BND.ADDR is '$bnd'" "$out"
  logged "$maillog" "$since" ": connect from " "[$proxy]" \
    || fail "the good receiver logged no connection from $proxy" "$(tail -n 5 "$maillog")"
done

check "egress: BIND and UDP ASSOCIATE are refused by the ruleset (TCP CONNECT only)"
for command in bind udp-associate; do
  if out=$(mta python3 "$here/socks5_probe.py" --proxy "${egress_addrs[0]}:$(w SMDP_EGRESS_SOCKS_PORT)" \
    --target "$(w SMDP_RX_GOOD_ADDR):25" --command "$command" 2>&1); then
    fail "$command accepted" "$out"
  fi
  grep -q 'reply 2 (connection not allowed by ruleset)' <<<"$out" || fail "$command: unexpected refusal" "$out"
done

# --- Delivery -----------------------------------------------------------------------------------------------------
check "a message over verified TLS lands in good's Maildir, received with TLS"
token="smoke-$(date +%s%N)"
maildir=$(w SMDP_RX_GOOD_MAILDIR)
out=$(mta timeout 30 swaks --server mx.good.plain.test --port 25 --helo "$(w SMDP_MTA_HOSTNAME)" \
  --from "smoke@sender.test" --to "probe@good.plain.test" --header "Subject: $token" --body "$token" \
  --tls --tls-verify --tls-ca-path "$ca" 2>&1) || fail "swaks failed" "$out"
delivered=
for _ in $(seq 1 100); do
  delivered=$(grep -l -- "$token" "$maildir"/new/* 2>/dev/null | head -n 1) || true
  [ -n "$delivered" ] && break
  sleep 0.1
done
[ -n "$delivered" ] || fail "no message with $token in $maildir/new" "$(tail -n 20 "$(w SMDP_RX_GOOD_MAILLOG)")"
grep -Eq '\(using TLSv1\.[23] with cipher' "$delivered" \
  || fail "Received header shows no TLS 1.2+" "$(cat "$delivered")"

current=
log "all checks passed"
