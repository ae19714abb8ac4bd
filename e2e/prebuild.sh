#!/usr/bin/env bash
# Builds every pinned tool `make test` needs that is not cached yet (SECUREMAIL_CACHE), in the order the suites need
# them. `make test` starts this in the background at low priority as its first step: on a machine where nothing is
# cached the Go builds (tens of minutes of CPU) then run while the Rust builds leave a core idle and while suites wait
# on their worlds, instead of one after another in front of the suites that need them. Each tool's own script builds
# it under a lock (build-once.sh, build-control-plane.sh), so a suite that gets there first waits for this build and
# never starts a second one. A failure here is only logged: the suite that needs the tool builds it again and fails
# with the reason. Usage: prebuild.sh [PID] — stops between tools once process PID (the make that started it) is gone.
set -uo pipefail
# Low priority among the machine's sessions too: with autogroup scheduling (Linux's default for desktops and many
# servers) a session competes as a whole whatever its processes' nice values, so the session's own nice is set.
echo 19 2>/dev/null >/proc/self/autogroup || true
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
parent=${1:-}

step() {
  if [ -n "$parent" ] && ! kill -0 "$parent" 2>/dev/null; then
    echo "prebuild: $parent exited; stopping"
    exit 0
  fi
  local started=$SECONDS
  if "$@" >/dev/null; then
    echo "prebuild: $* ($((SECONDS - started)) s)"
  else
    echo "prebuild: $* failed; the suite that needs it builds it again"
  fi
}

step "$here/build-control-plane.sh" etcd kubernetes
step "$here/helm.sh" version --short
step "$root/alerts/check.sh" promtool-path
step "$root/images/tools.sh" cargo-auditable
step "$root/images/tools.sh" syft
step "$root/images/binaries.sh"
step "$here/build-control-plane.sh" cni coredns local-path kube-router
step "$here/node-monitoring.sh" build
echo "prebuild: done in $SECONDS s"
