#!/usr/bin/env bash
# Prints the path of a third-party CRD taken from the project's own Go module (pinned in versions.env), fetched
# through the Go module proxy.
# Usage: fetch-crd.sh external-dns|cert-manager|servicemonitors|podmonitors|prometheusrules
# cert-manager ships its CRDs as Helm templates whose template expressions sit in comments and in label values;
# those lines are dropped into a copy (cached outside the repository) that kubectl can apply.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
die() { echo "fetch-crd: $*" >&2; exit 1; }

case "${1:-}" in
  external-dns)
    module="sigs.k8s.io/external-dns@$EXTERNAL_DNS_VERSION"
    file=config/crd/standard/dnsendpoints.externaldns.k8s.io.yaml
    ;;
  cert-manager)
    module="github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION"
    file=deploy/crds/crd-certificates.yaml
    ;;
  servicemonitors|podmonitors|prometheusrules)
    module="github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION"
    file=example/prometheus-operator-crd/monitoring.coreos.com_$1.yaml
    ;;
  *) die "unknown CRD source '${1:-}' (known: external-dns, cert-manager, servicemonitors, podmonitors, prometheusrules)" ;;
esac

# `go mod download` needs a module context; an empty throwaway one is enough.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && go mod init securemail.local/fetch-crd >/dev/null 2>&1)
dir=$(cd "$scratch" && go mod download -json "$module" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
if [ -z "$dir" ] || [ ! -f "$dir/$file" ]; then die "cannot find $file in $module"; fi
if grep -q '{{' "$dir/$file"; then
  plain="${SECUREMAIL_CACHE:-$HOME/.cache/securemail}/crds/${module//[\/@]/_}-$(basename "$file")"
  mkdir -p "$(dirname "$plain")"
  grep -v '{{' "$dir/$file" > "$plain.tmp" && mv "$plain.tmp" "$plain"
  echo "$plain"
else
  echo "$dir/$file"
fi
