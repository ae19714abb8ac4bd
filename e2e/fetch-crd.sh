#!/usr/bin/env bash
# Prints the path of a third-party CRD taken from the project's own Go module (pinned in versions.env), fetched
# through the Go module proxy. Usage: fetch-crd.sh external-dns
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
  *) die "unknown CRD source '${1:-}' (known: external-dns)" ;;
esac

# `go mod download` needs a module context; an empty throwaway one is enough.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && go mod init securemail.local/fetch-crd >/dev/null 2>&1)
dir=$(cd "$scratch" && go mod download -json "$module" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
if [ -z "$dir" ] || [ ! -f "$dir/$file" ]; then die "cannot find $file in $module"; fi
echo "$dir/$file"
