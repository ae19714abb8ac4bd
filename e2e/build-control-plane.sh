#!/usr/bin/env bash
# Builds the pinned etcd and Kubernetes binaries (kube-apiserver and the node's components) from their Go modules
# through the Go module proxy and caches the binaries outside the repository, keyed by version. Prints the cache
# directory on success. Usage: build-control-plane.sh [COMPONENT...]: etcd kubernetes (the control plane), cni coredns
# local-path kube-router (the rest of the node); all of them by default.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
cache=${SECUREMAIL_CACHE:-$HOME/.cache/securemail}
mkdir -p "$cache"

die() { echo "build-control-plane: $*" >&2; exit 1; }
command -v go >/dev/null || die "Go is not installed; it is needed to build Kubernetes and etcd"
# Runs started at the same time (two suites, two worktrees) would build into the same directories and trip over each
# other's temporary files: one builds, the others wait and then find the binaries.
exec 9>"$cache/.build-control-plane.lock"
flock 9

# Every Kubernetes binary the test cluster runs, built by ONE `go build` so they compile their shared packages once.
kube_binaries=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

build_kubernetes() {
  local dir="$cache/kubernetes-$KUBERNETES_VERSION" b missing=false
  for b in "${kube_binaries[@]}"; do [ -x "$dir/bin/$b" ] || missing=true; done
  $missing || return 0
  echo "build-control-plane: building ${kube_binaries[*]} $KUBERNETES_VERSION (first run only, several minutes)" >&2
  local work="$dir/src"
  rm -rf "$work" "$dir/bin.tmp"; mkdir -p "$work" "$dir/bin.tmp"
  # k8s.io/kubernetes requires its staging modules at v0.0.0; map each to its published v0.N.P release.
  local gomod staging
  gomod=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$KUBERNETES_VERSION from the Go module proxy"
  staging=$(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")
  [ -n "$staging" ] || die "no staging replaces found in k8s.io/kubernetes@$KUBERNETES_VERSION go.mod"
  local staging_version="v0.${KUBERNETES_VERSION#v1.}"
  {
    echo "module securemail.local/kubernetes-build"
    echo
    echo "go $(sed -n 's/^go \(.*\)/\1/p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    for m in $staging; do echo "replace $m => $m $staging_version"; done
  } > "$work/go.mod"
  {
    echo "//go:build tools"
    echo
    echo "package tools"
    echo
    for b in "${kube_binaries[@]}"; do echo "import _ \"k8s.io/kubernetes/cmd/$b\""; done
  } > "$work/tools.go"
  (cd "$work" && go mod tidy >/dev/null 2>"$work/tidy.log") || { cat "$work/tidy.log" >&2; die "go mod tidy failed for Kubernetes"; }
  # Stamp the version the way Kubernetes' own build does, so clients see v1.N.P rather than v0.0.0-master.
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local ldflags="-X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  local pkgs=()
  for b in "${kube_binaries[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  # Static binaries (no cgo): the kubelet runs here with the cgroupfs driver, which needs no C library.
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$dir/bin.tmp/" "${pkgs[@]}") \
    || die "go build of Kubernetes $KUBERNETES_VERSION failed"
  rm -rf "${dir:?}/bin"
  mv "$dir/bin.tmp" "$dir/bin"
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

# The node's pod network: the bridge plugin with host-local addresses, loopback (containerd sets up each pod's lo
# with it) and portmap (hostPort).
cni_plugins=(main/bridge main/loopback ipam/host-local meta/portmap)

build_cni_plugins() {
  local dir="$cache/cni-plugins-$CNI_PLUGINS_VERSION" p missing=false
  for p in "${cni_plugins[@]}"; do [ -x "$dir/bin/${p#*/}" ] || missing=true; done
  $missing || return 0
  echo "build-control-plane: building CNI plugins $CNI_PLUGINS_VERSION (first run only)" >&2
  local work="$dir/src" module=github.com/containernetworking/plugins
  rm -rf "$work" "$dir/bin.tmp"; mkdir -p "$work" "$dir/bin.tmp"
  printf 'module securemail.local/cni-plugins-build\n\ngo 1.26\n\nrequire %s %s\n' "$module" "$CNI_PLUGINS_VERSION" \
    > "$work/go.mod"
  {
    printf '//go:build tools\n\npackage tools\n\n'
    for p in "${cni_plugins[@]}"; do printf 'import _ "%s/plugins/%s"\n' "$module" "$p"; done
  } > "$work/tools.go"
  (cd "$work" && go mod tidy >/dev/null 2>"$work/tidy.log") || { cat "$work/tidy.log" >&2; die "go mod tidy failed for the CNI plugins"; }
  local pkgs=()
  for p in "${cni_plugins[@]}"; do pkgs+=("$module/plugins/$p"); done
  (cd "$work" && CGO_ENABLED=0 go build -trimpath \
    -ldflags "-X $module/pkg/utils/buildversion.BuildVersion=$CNI_PLUGINS_VERSION" -o "$dir/bin.tmp/" "${pkgs[@]}") \
    || die "go build of the CNI plugins $CNI_PLUGINS_VERSION failed"
  rm -rf "${dir:?}/bin"
  mv "$dir/bin.tmp" "$dir/bin"
}

# Cluster DNS for the node, with only the plugins e2e/node/coredns/main.go names.
build_coredns() {
  local dir="$cache/coredns-$COREDNS_VERSION"
  # Rebuilt when the plugin list changes, too.
  [ -x "$dir/bin/coredns" ] && cmp -s "$here/node/coredns/main.go" "$dir/src/main.go" && return 0
  echo "build-control-plane: building CoreDNS $COREDNS_VERSION (first run only)" >&2
  local work="$dir/src"
  rm -rf "$work"; mkdir -p "$work" "$dir/bin"
  printf 'module securemail.local/coredns-build\n\ngo 1.26\n\nrequire github.com/coredns/coredns %s\n' \
    "$COREDNS_VERSION" > "$work/go.mod"
  cp "$here/node/coredns/main.go" "$work/main.go"
  (cd "$work" && go mod tidy >/dev/null 2>"$work/tidy.log") || { cat "$work/tidy.log" >&2; die "go mod tidy failed for CoreDNS"; }
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -o "$dir/bin/coredns.tmp" .) || die "go build of CoreDNS $COREDNS_VERSION failed"
  mv "$dir/bin/coredns.tmp" "$dir/bin/coredns"
}

# Persistent volumes for the node's pods: Rancher's local-path provisioner (host directories as local volumes).
build_local_path_provisioner() {
  local dir="$cache/local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION"
  [ -x "$dir/bin/local-path-provisioner" ] && return 0
  echo "build-control-plane: building local-path-provisioner $LOCAL_PATH_PROVISIONER_VERSION (first run only)" >&2
  local work="$dir/src" module=github.com/rancher/local-path-provisioner
  rm -rf "$work"; mkdir -p "$work" "$dir/bin"
  printf 'module securemail.local/local-path-build\n\ngo 1.26\n\nrequire %s %s\n' "$module" \
    "$LOCAL_PATH_PROVISIONER_VERSION" > "$work/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$module" > "$work/tools.go"
  (cd "$work" && go mod tidy >/dev/null 2>"$work/tidy.log") \
    || { cat "$work/tidy.log" >&2; die "go mod tidy failed for local-path-provisioner"; }
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -o "$dir/bin/local-path-provisioner.tmp" "$module") \
    || die "go build of local-path-provisioner $LOCAL_PATH_PROVISIONER_VERSION failed"
  mv "$dir/bin/local-path-provisioner.tmp" "$dir/bin/local-path-provisioner"
}

# NetworkPolicy for the node: kube-router, run with its firewall only (node-up.sh).
build_kube_router() {
  local dir="$cache/kube-router-$KUBE_ROUTER_VERSION"
  [ -x "$dir/bin/kube-router" ] && return 0
  echo "build-control-plane: building kube-router $KUBE_ROUTER_VERSION (first run only)" >&2
  local work="$dir/src" module=github.com/cloudnativelabs/kube-router/v2
  rm -rf "$work"; mkdir -p "$work" "$dir/bin"
  printf 'module securemail.local/kube-router-build\n\ngo 1.26\n\nrequire %s %s\n' "$module" "$KUBE_ROUTER_VERSION" \
    > "$work/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s/cmd/kube-router"\n' "$module" > "$work/tools.go"
  (cd "$work" && go mod tidy >/dev/null 2>"$work/tidy.log") \
    || { cat "$work/tidy.log" >&2; die "go mod tidy failed for kube-router"; }
  (cd "$work" && CGO_ENABLED=0 go build -trimpath \
    -ldflags "-X $module/pkg/version.Version=$KUBE_ROUTER_VERSION" -o "$dir/bin/kube-router.tmp" "$module/cmd/kube-router") \
    || die "go build of kube-router $KUBE_ROUTER_VERSION failed"
  mv "$dir/bin/kube-router.tmp" "$dir/bin/kube-router"
}

[ $# -gt 0 ] || set -- etcd kubernetes cni coredns local-path kube-router
for component in "$@"; do
  case $component in
    etcd) build_etcd ;;
    kubernetes) build_kubernetes ;;
    cni) build_cni_plugins ;;
    coredns) build_coredns ;;
    local-path) build_local_path_provisioner ;;
    kube-router) build_kube_router ;;
    *) die "unknown component $component (etcd kubernetes cni coredns local-path kube-router)" ;;
  esac
done
echo "$cache"
