#!/usr/bin/env bash
# Installs the Prometheus Operator on the test node and a Prometheus it manages, the way a user's cluster consumes the
# chart's ServiceMonitor, PodMonitor and PrometheusRule (node-install.sh runs this before `helm install`, since the
# chart's monitors need the monitoring.coreos.com CRDs):
# - the operator and its config reloader, built from the pinned Go module (versions.env) in one `go build` and cached
#   outside the repository keyed by version, packed into local images (node/image-tar.sh);
# - Prometheus itself from its pinned Go module (PROMETHEUS_MODULE_VERSION, the release promtool comes from), cached
#   the same way: Debian's `prometheus` is built without Kubernetes service discovery, which every scrape job the
#   Prometheus Operator writes uses;
# - the CRDs and the operator's RBAC and Deployment from the same module version (example/), in namespace
#   $monitoring_namespace, the namespace the chart's NetworkPolicies let scrape;
# - a Prometheus resource that selects monitors and rules labelled $selector_label in every namespace.
# Usage: node-monitoring.sh build (the binaries and images only) | install (needs the node: make node-up; ends when
# Prometheus is ready) | chart-args (prints, one per line, the `helm install` arguments that turn on the chart's
# monitors and rules for this Prometheus).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
dir=${SECUREMAIL_CLUSTER_DIR:-/tmp/securemail-cluster}
# shellcheck source=node-lib.sh
. "$here/node-lib.sh"
cache=${SECUREMAIL_CACHE:-$HOME/.cache/securemail}
module=github.com/prometheus-operator/prometheus-operator
po_dir="$cache/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION"
operator_image=securemail.local/prometheus-operator:$PROMETHEUS_OPERATOR_VERSION
reloader_image=securemail.local/prometheus-config-reloader:$PROMETHEUS_OPERATOR_VERSION
# What the chart's monitors and rules must carry for this Prometheus to pick them up (node-install.sh sets it through
# the chart's serviceMonitor.labels, podMonitor.labels and prometheusRule.labels).
monitoring_namespace=monitoring
selector_label=prometheus=securemail
prometheus_name=securemail

log() { echo "node-monitoring: $*" >&2; }
die() { echo "node-monitoring: $*" >&2; exit 1; }

# The module's directory in the Go module cache (CRDs and example manifests come from the version that is built).
module_dir() {
  local scratch; scratch=$(mktemp -d)
  (cd "$scratch" && go mod init securemail.local/module-dir >/dev/null 2>&1 \
    && go mod download -json "$module@$PROMETHEUS_OPERATOR_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
  rm -rf "$scratch"
}

build_operator() {
  [ -x "$po_dir/bin/operator" ] && [ -x "$po_dir/bin/prometheus-config-reloader" ] && return 0
  log "building the Prometheus Operator $PROMETHEUS_OPERATOR_VERSION and its config reloader (first run only, minutes)"
  local work="$po_dir/src"
  rm -rf "$work" "$po_dir/bin.tmp"; mkdir -p "$work" "$po_dir/bin.tmp"
  printf 'module securemail.local/prometheus-operator-build\n\ngo 1.26\n\nrequire %s %s\n' "$module" \
    "$PROMETHEUS_OPERATOR_VERSION" > "$work/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport (\n\t_ "%s/cmd/operator"\n\t_ "%s/cmd/prometheus-config-reloader"\n)\n' \
    "$module" "$module" > "$work/tools.go"
  (cd "$work" && go mod tidy >/dev/null 2>"$work/tidy.log") \
    || { cat "$work/tidy.log" >&2; die "go mod tidy failed for the Prometheus Operator"; }
  # One build for both commands: they share most of their packages (client-go, Prometheus' config). The version is
  # stamped as the project's own build does, so the operator's logs and build_info name it.
  local version_pkg=github.com/prometheus/common/version
  (cd "$work" && CGO_ENABLED=0 go build -trimpath \
    -ldflags "-X $version_pkg.Version=${PROMETHEUS_OPERATOR_VERSION#v}" \
    -o "$po_dir/bin.tmp/" "$module/cmd/operator" "$module/cmd/prometheus-config-reloader") \
    || die "go build of the Prometheus Operator $PROMETHEUS_OPERATOR_VERSION failed"
  rm -rf "${po_dir:?}/bin"
  mv "$po_dir/bin.tmp" "$po_dir/bin"
}

# The Prometheus release of the module version (v0.3XX.Y is 3.XX.Y): the Prometheus resource's spec.version, so the
# operator writes only flags and settings that release knows.
prometheus_version() {
  local minor=${PROMETHEUS_MODULE_VERSION#v0.}
  [[ $minor =~ ^3[0-9][0-9]\.[0-9]+$ ]] || die "PROMETHEUS_MODULE_VERSION=$PROMETHEUS_MODULE_VERSION is not a 3.x release"
  echo "3.$((10#${minor:1:2})).${minor#*.}"
}
prometheus_dir="$cache/prometheus-$PROMETHEUS_MODULE_VERSION"

build_prometheus() {
  [ -x "$prometheus_dir/bin/prometheus" ] && return 0
  log "building Prometheus $(prometheus_version) (first run only, minutes)"
  rm -rf "$prometheus_dir/bin.tmp"; mkdir -p "$prometheus_dir/bin.tmp"
  GOBIN="$prometheus_dir/bin.tmp" CGO_ENABLED=0 go install -trimpath \
    -ldflags "-X github.com/prometheus/common/version.Version=$(prometheus_version)" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE_VERSION" \
    || die "go install of Prometheus $PROMETHEUS_MODULE_VERSION failed"
  rm -rf "${prometheus_dir:?}/bin"; mv "$prometheus_dir/bin.tmp" "$prometheus_dir/bin"
}

# An image written again when its binary is newer than the archive.
binary_image() { # TAR REF ENTRYPOINT FILE[=PATH]...
  local tar=$1 source=${4%%=*}
  if [ ! -f "$tar" ] || [ "$source" -nt "$tar" ]; then "$here/node/image-tar.sh" "$@"; fi
}

build_images() {
  command -v go >/dev/null || die "Go is not installed; it is needed to build the Prometheus Operator and Prometheus"
  # Two runs at once (two worktrees) would build into the same directories: one builds, the others wait.
  mkdir -p "$cache"
  exec 8>"$cache/.build-monitoring.lock"
  flock 8
  build_operator
  binary_image "$po_dir/operator.tar" "$operator_image" /bin/operator "$po_dir/bin/operator=bin/operator"
  # The operator runs the reloader as /bin/prometheus-config-reloader (its container's command).
  binary_image "$po_dir/config-reloader.tar" "$reloader_image" /bin/prometheus-config-reloader \
    "$po_dir/bin/prometheus-config-reloader=bin/prometheus-config-reloader"
  # The operator starts Prometheus with arguments only, so the image's entrypoint is Prometheus (static, no shell).
  build_prometheus
  binary_image "$prometheus_dir/image.tar" "securemail.local/prometheus:v$(prometheus_version)" /bin/prometheus \
    "$prometheus_dir/bin/prometheus=bin/prometheus"
}

install() {
  export KUBECONFIG="$dir/kubeconfig"
  if [ ! -S "$containerd_sock" ] || [ ! -f "$KUBECONFIG" ]; then die "no node in $dir (run make node-up)"; fi
  build_images
  local tar version source
  version=$(prometheus_version)
  for tar in "$po_dir/operator.tar" "$po_dir/config-reloader.tar" "$prometheus_dir/image.tar"; do
    ctr -a "$containerd_sock" -n k8s.io images import "$tar" >/dev/null || die "importing $tar into the node failed"
  done
  source=$(module_dir)
  [ -d "$source/example/prometheus-operator-crd" ] || die "no CRDs in $module@$PROMETHEUS_OPERATOR_VERSION ($source)"

  # The namespace meets Pod Security `restricted`: the operator's example Deployment and the Prometheus pod below do.
  kubectl create namespace "$monitoring_namespace" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl label --overwrite namespace "$monitoring_namespace" pod-security.kubernetes.io/enforce=restricted \
    pod-security.kubernetes.io/warn=restricted >/dev/null
  # Server-side: the Prometheus CRD is too large for the last-applied annotation.
  kubectl apply --server-side --force-conflicts -f "$source/example/prometheus-operator-crd/" >/dev/null \
    || die "applying the monitoring.coreos.com CRDs failed"
  kubectl wait --for condition=Established --timeout 60s -f "$source/example/prometheus-operator-crd/" >/dev/null \
    || die "the monitoring.coreos.com CRDs were not established within 60s"

  # The project's example install (ServiceAccount, ClusterRole and binding, Deployment, Service) in our namespace,
  # with the local images; its ServiceMonitor of the operator itself is left out.
  local manifest
  for manifest in service-account cluster-role cluster-role-binding deployment service; do
    sed -e "s/namespace: default/namespace: $monitoring_namespace/" \
      -e "s|quay.io/prometheus-operator/prometheus-operator:$PROMETHEUS_OPERATOR_VERSION|$operator_image|" \
      -e "s|quay.io/prometheus-operator/prometheus-config-reloader:$PROMETHEUS_OPERATOR_VERSION|$reloader_image|" \
      "$source/example/rbac/prometheus-operator/prometheus-operator-$manifest.yaml"
    echo ---
  done | kubectl apply -f - >/dev/null || die "installing the Prometheus Operator failed"
  # Prometheus' own permissions (service discovery) from the same examples.
  for manifest in service-account cluster-role cluster-role-binding; do
    sed "s/namespace: default/namespace: $monitoring_namespace/" "$source/example/rbac/prometheus/prometheus-$manifest.yaml"
    echo ---
  done | kubectl apply -n "$monitoring_namespace" -f - >/dev/null || die "installing Prometheus' RBAC failed"

  # Rules evaluated every 5 s (the monitors set their own scrape interval: chart-args), so the node suite sees an
  # alert's expression hold within seconds; `for:` durations stay the pack's.
  kubectl apply -f - >/dev/null <<EOF || die "creating the Prometheus resource failed"
apiVersion: monitoring.coreos.com/v1
kind: Prometheus
metadata:
  name: $prometheus_name
  namespace: $monitoring_namespace
spec:
  version: v$version
  image: securemail.local/prometheus:v$version
  replicas: 1
  serviceAccountName: prometheus
  scrapeInterval: 5s
  evaluationInterval: 5s
  # Monitors and rules in any namespace, as long as they carry the label (nil namespace selectors would mean this
  # namespace only).
  serviceMonitorSelector: {matchLabels: {${selector_label%%=*}: ${selector_label#*=}}}
  serviceMonitorNamespaceSelector: {}
  podMonitorSelector: {matchLabels: {${selector_label%%=*}: ${selector_label#*=}}}
  podMonitorNamespaceSelector: {}
  ruleSelector: {matchLabels: {${selector_label%%=*}: ${selector_label#*=}}}
  ruleNamespaceSelector: {}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65534
    runAsGroup: 65534
    fsGroup: 65534
    seccompProfile: {type: RuntimeDefault}
EOF
  kubectl -n "$monitoring_namespace" rollout status deployment/prometheus-operator --timeout 120s >/dev/null || {
    kubectl -n "$monitoring_namespace" describe pods -l app.kubernetes.io/name=prometheus-operator >&2 || true
    die "the Prometheus Operator did not become ready within 120s"
  }
  # The operator creates the StatefulSet; wait for it to exist, then for its pod.
  local statefulset=prometheus-$prometheus_name
  for _ in $(seq 1 60); do
    kubectl -n "$monitoring_namespace" get statefulset "$statefulset" >/dev/null 2>&1 && break
    sleep 1
  done
  kubectl -n "$monitoring_namespace" rollout status "statefulset/$statefulset" --timeout 180s >/dev/null || {
    kubectl -n "$monitoring_namespace" get prometheus "$prometheus_name" -o yaml >&2 || true
    kubectl -n "$monitoring_namespace" describe pods >&2 || true
    die "Prometheus $monitoring_namespace/$prometheus_name did not become ready within 180s"
  }
}

# The chart's own switches and labels, as a user sets them for their Prometheus; 5 s scrapes (the chart's default is
# 30 s) so that the node suite sees a target go down within seconds.
chart_args() {
  local kind
  for kind in serviceMonitor podMonitor prometheusRule; do
    printf -- '--set\n%s.enabled=true\n--set\n%s.labels.%s=%s\n' "$kind" "$kind" "${selector_label%%=*}" \
      "${selector_label#*=}"
  done
  printf -- '--set\nserviceMonitor.interval=5s\n--set\npodMonitor.interval=5s\n'
  printf -- '--set\nmonitoringNamespace=%s\n' "$monitoring_namespace"
}

case "${1:-}" in
  build) build_images ;;
  install) install ;;
  chart-args) chart_args ;;
  *) die "usage: node-monitoring.sh build|install|chart-args" ;;
esac
