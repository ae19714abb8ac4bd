#!/usr/bin/env bash
# Runs the pinned helm (HELM_VERSION in versions.env), built once from its Go module through the Go module proxy and
# cached outside the repository, keyed by version. Usage: helm.sh ARGS...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
# shellcheck source=build-once.sh
. "$here/build-once.sh"
dir=${SECUREMAIL_CACHE:-$HOME/.cache/securemail}/helm-$HELM_VERSION

build_helm() {
  command -v go >/dev/null || { echo "helm.sh: Go is not installed; it is needed to build helm" >&2; exit 1; }
  echo "helm.sh: building helm $HELM_VERSION (first run only, a few minutes)" >&2
  # The version stamps helm's own Makefile sets; the Kubernetes version is the client-go it is built with, which
  # `helm template` and `helm lint` assume when no cluster is asked.
  module=helm.sh/helm/v3
  ldflags="-X $module/internal/version.version=$HELM_VERSION -X $module/internal/version.gitTreeState=clean"
  for package in pkg/lint/rules pkg/chartutil; do
    ldflags+=" -X $module/$package.k8sVersionMajor=1 -X $module/$package.k8sVersionMinor=${HELM_KUBERNETES_MINOR}"
  done
  rm -rf "$dir/bin.tmp"; mkdir -p "$dir/bin.tmp"
  GOBIN="$dir/bin.tmp" CGO_ENABLED=0 go install -trimpath -ldflags "$ldflags" "$module/cmd/helm@$HELM_VERSION" \
    || { echo "helm.sh: go install of helm $HELM_VERSION failed" >&2; exit 1; }
  rm -rf "${dir:?}/bin"; mv "$dir/bin.tmp" "$dir/bin"
}
build_once "$dir/bin/helm" build_helm
exec "$dir/bin/helm" "$@"
