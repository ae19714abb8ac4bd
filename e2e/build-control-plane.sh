#!/usr/bin/env bash
# Builds the pinned kube-apiserver and etcd from their Go modules through the Go module proxy and caches the
# binaries outside the repository, keyed by version. Prints the cache's bin directory on success.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${SECUREMAIL_CACHE:-$HOME/.cache/securemail}
mkdir -p "$cache"

die() { echo "build-control-plane: $*" >&2; exit 1; }
command -v go >/dev/null || die "Go is not installed; it is needed to build kube-apiserver and etcd"

build_apiserver() {
  local dir="$cache/kube-apiserver-$KUBERNETES_VERSION"
  [ -x "$dir/bin/kube-apiserver" ] && return 0
  echo "build-control-plane: building kube-apiserver $KUBERNETES_VERSION (first run only, several minutes)" >&2
  local work="$dir/src"
  rm -rf "$work"; mkdir -p "$work" "$dir/bin"
  # k8s.io/kubernetes requires its staging modules at v0.0.0; map each to its published v0.N.P release.
  local gomod staging
  gomod=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$KUBERNETES_VERSION from the Go module proxy"
  staging=$(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")
  [ -n "$staging" ] || die "no staging replaces found in k8s.io/kubernetes@$KUBERNETES_VERSION go.mod"
  local staging_version="v0.${KUBERNETES_VERSION#v1.}"
  {
    echo "module securemail.local/kube-apiserver-build"
    echo
    echo "go $(sed -n 's/^go \(.*\)/\1/p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    for m in $staging; do echo "replace $m => $m $staging_version"; done
  } > "$work/go.mod"
  cat > "$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
  (cd "$work" && go mod tidy >/dev/null 2>"$work/tidy.log") || { cat "$work/tidy.log" >&2; die "go mod tidy failed for kube-apiserver"; }
  # Stamp the version the way Kubernetes' own build does, so clients see v1.N.P rather than v0.0.0-master.
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local ldflags="-X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$dir/bin/kube-apiserver.tmp" \
    k8s.io/kubernetes/cmd/kube-apiserver) \
    || die "go build of kube-apiserver $KUBERNETES_VERSION failed"
  mv "$dir/bin/kube-apiserver.tmp" "$dir/bin/kube-apiserver"
}

build_etcd() {
  local dir="$cache/etcd-$ETCD_VERSION"
  [ -x "$dir/bin/etcd" ] && return 0
  echo "build-control-plane: building etcd $ETCD_VERSION (first run only)" >&2
  local work="$dir/src"
  rm -rf "$work"; mkdir -p "$work" "$dir/bin"
  cat > "$work/go.mod" <<GOMOD
module securemail.local/etcd-build

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  # The etcd binary's main only hands its arguments to etcdmain.
  cat > "$work/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$work" && go mod tidy >/dev/null 2>"$work/tidy.log") || { cat "$work/tidy.log" >&2; die "go mod tidy failed for etcd"; }
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -o "$dir/bin/etcd.tmp" .) || die "go build of etcd $ETCD_VERSION failed"
  mv "$dir/bin/etcd.tmp" "$dir/bin/etcd"
}

build_etcd
build_apiserver
echo "$cache"
