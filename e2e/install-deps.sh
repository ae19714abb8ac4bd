#!/usr/bin/env bash
# Installs what the build and the test suites need on a fresh Debian machine, and nothing when it is all there.
# Control-plane binaries (kube-apiserver, etcd) are built from Go modules by build-control-plane.sh instead.
set -euo pipefail

die() { echo "install-deps: $*" >&2; exit 1; }

# command -> Debian package providing it
declare -A packages=(
  [openssl]=openssl
  [curl]=curl
  # Reads the chart's rendered Deployment (e2e/operator-up.sh).
  [jq]=jq
  [shellcheck]=shellcheck
  [lua5.4]=lua5.4
  [postconf]=postfix
  # The data-plane world (e2e/dataplane): namespaces, signed DNS, validating resolver, MTA-STS web server, and the
  # independent checkers its smoke test uses.
  [ip]=iproute2
  [named]=bind9
  [dnssec-signzone]=bind9-utils
  [dig]=bind9-dnsutils
  [drill]=ldnsutils
  [unbound]=unbound
  [nginx]=nginx
  [swaks]=swaks
  # Sets the clock of the operator and the sidecar in the suites (LD_PRELOAD of libfaketime): noon UTC of the
  # day, the next day, or a year ahead.
  [faketime]=faketime
  # A real Prometheus scrapes the sidecar and evaluates the alert pack in the data-plane suite.
  [prometheus]=prometheus
  # Greylisting for the data-plane world's "smart" receiver (first attempt 4xx, accepted on retry).
  [postgrey]=postgrey
  # The data-plane world's egress host: Dante's SOCKS5 server, one outgoing source address per listening address.
  [danted]=dante-server
)
missing=()
for cmd in "${!packages[@]}"; do
  command -v "$cmd" >/dev/null || missing+=("${packages[$cmd]}")
done
# swaks speaks TLS only with these Perl modules, which it merely recommends.
perl -MIO::Socket::SSL -MNet::SSLeay -e 1 2>/dev/null || missing+=(libio-socket-ssl-perl libnet-ssleay-perl)
# pyspf, the independent SPF checker the data-plane world's smoke test runs against the world's DNS (a module only,
# no command to look for).
dpkg-query -W -f='${Status}' python3-spf 2>/dev/null | grep -q 'ok installed' || missing+=(python3-spf)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}" >&2
  command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
  # The data-plane tests run private instances inside network namespaces. The system services these packages
  # just started would listen on the host (and unbound's resolvconf hook would take over /etc/resolv.conf).
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    # Only units of packages installed just now; a service the machine already ran is left alone.
    for pair in named:bind9 unbound:unbound unbound-resolvconf:unbound nginx:nginx prometheus:prometheus \
      postgrey:postgrey danted:dante-server; do
      unit=${pair%%:*}
      [[ " ${missing[*]} " == *" ${pair#*:} "* ]] || continue
      if systemctl cat "$unit.service" >/dev/null 2>&1; then
        systemctl disable --now "$unit.service" >/dev/null 2>&1 || echo "install-deps: could not stop $unit" >&2
      fi
    done
  fi
fi

# dkimpy (pynacl for Ed25519, dnspython for zone-file TXT parsing) is the independent DKIM verifier that the
# operator's key tests sign and verify with; PyYAML reads rendered manifests in the demo. pyspf is Debian's
# python3-spf above, again for a python3 that is not Debian's (then dist-packages is not on its path); same version.
if ! python3 -c 'import dkim, nacl, dns.rdata, yaml, spf' 2>/dev/null; then
  command -v python3 >/dev/null || die "python3 is not installed (see README: Requirements)"
  echo "install-deps: installing dkimpy, pynacl, dnspython, pyyaml, pyspf" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    dkimpy==1.1.8 pynacl==1.5.0 dnspython==2.9.2 pyyaml==6.0.3 pyspf==2.0.14 \
    || die "pip install of the Python test tools failed"
fi

for tool in cargo go kubectl; do
  command -v "$tool" >/dev/null || die "$tool is not installed (see README: Requirements)"
done
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing from the Rust toolchain"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing from the Rust toolchain"
