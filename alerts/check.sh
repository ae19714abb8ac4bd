#!/usr/bin/env bash
# Checks the alert pack with promtool: rule syntax, then the unit tests in alerts/tests/ (every alert fires in one
# case and stays quiet in another), run with the scrape jobs the chart's monitors give their targets (from-chart.py
# on `helm template`), so rules and monitors cannot disagree. promtool is built once from its pinned Go module
# through the Go module proxy and cached outside the repository, keyed by version, like the control-plane binaries
# of e2e/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# PROMETHEUS_MODULE_VERSION: the Prometheus release promtool comes from (also the node's Prometheus).
# shellcheck source=../e2e/versions.env
. "$here/../e2e/versions.env"
# shellcheck source=../e2e/build-once.sh
. "$here/../e2e/build-once.sh"
cache=${SECUREMAIL_CACHE:-$HOME/.cache/securemail}

die() { echo "check-alerts: $*" >&2; exit 1; }

promtool_dir="$cache/promtool-$PROMETHEUS_MODULE_VERSION"

build_promtool() {
  command -v go >/dev/null || die "Go is not installed; it is needed to build promtool"
  echo "check-alerts: building promtool $PROMETHEUS_MODULE_VERSION (first run only, several minutes)" >&2
  # Built into a scratch directory and moved into place, so an interrupted build never leaves a binary behind.
  rm -rf "$promtool_dir/bin.tmp"; mkdir -p "$promtool_dir/bin.tmp"
  GOBIN="$promtool_dir/bin.tmp" CGO_ENABLED=0 go install -trimpath \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION" \
    || die "go install of promtool $PROMETHEUS_MODULE_VERSION failed"
  rm -rf "${promtool_dir:?}/bin"; mv "$promtool_dir/bin.tmp" "$promtool_dir/bin"
}

promtool_bin() {
  build_once "$promtool_dir/bin/promtool" build_promtool
  echo "$promtool_dir/bin/promtool"
}

# What promtool cannot see: each alert links absolutely to its runbook section (under the chart's default
# prometheusRule.docsUrl, which the chart replaces by its value) and that section exists, each metric it reads is
# documented, and its unit tests include a case where it fires and one where it does not.
check_links() {
  local rules="$here/securemail.rules.yaml" docs="$here/../docs" failed=0 alert anchor cases metric url
  while read -r url; do
    [[ $url == "$docs_url"/* ]] \
      || { echo "check-alerts: runbook_url $url is not under the chart's docsUrl $docs_url" >&2; failed=1; }
  done < <(sed -n 's/^ *runbook_url: *//p' "$rules")
  while read -r alert; do
    anchor=${alert,,}
    grep -q "runbook_url: $docs_url/operations.md#$anchor\$" "$rules" \
      || { echo "check-alerts: $alert has no runbook_url $docs_url/operations.md#$anchor" >&2; failed=1; }
    grep -qix "## $anchor" "$docs/operations.md" \
      || { echo "check-alerts: docs/operations.md has no section '## $alert'" >&2; failed=1; }
    cases=$(grep -h -A1 "alertname: $alert\$" "$here"/tests/*.yaml || true)
    grep -q 'exp_alerts:$' <<<"$cases" \
      || { echo "check-alerts: no test in alerts/tests/ where $alert fires" >&2; failed=1; }
    grep -q 'exp_alerts: \[\]' <<<"$cases" \
      || { echo "check-alerts: no test in alerts/tests/ where $alert stays quiet" >&2; failed=1; }
  done < <(sed -n 's/^ *- alert: *//p' "$rules")
  # Metric names in expressions only: the comments mention name prefixes.
  while read -r metric; do
    grep -q "\`$metric\`" "$docs/metrics.md" \
      || { echo "check-alerts: $metric is not documented in docs/metrics.md" >&2; failed=1; }
  done < <(grep -v '^ *#' "$rules" | grep -o 'securemail_[a-z_]*' | sort -u)
  return "$failed"
}

# `check.sh promtool-path`: build promtool if needed and print its path (other checks use it too).
if [ "${1:-}" = promtool-path ]; then promtool_bin; exit 0; fi

chart=$here/../charts/securemail-operator
docs_url=$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["prometheusRule"]["docsUrl"])' \
  "$chart/values.yaml")
check_links
promtool=$(promtool_bin)
"$promtool" check rules "$here/securemail.rules.yaml"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$here/../e2e/helm.sh" template securemail-operator "$chart" -n securemail-system \
  --set serviceMonitor.enabled=true,podMonitor.enabled=true,prometheusRule.enabled=true >"$scratch/chart.yaml" \
  || die "helm template of the chart failed"
# The tests name their rule file ../securemail.rules.yaml.
mkdir "$scratch/tests"
ln -s "$here/securemail.rules.yaml" "$scratch/securemail.rules.yaml"
jobs=$(DOCS_URL=$docs_url python3 "$here/from-chart.py" "$scratch/chart.yaml" "$here/securemail.rules.yaml" \
  "$here/tests" "$scratch/tests")
echo "check-alerts: unit tests with the chart's scrape jobs: $jobs" >&2
"$promtool" test rules "$scratch"/tests/*.yaml
