# shellcheck shell=bash
# Sourced by the scripts that build a pinned tool into the cache outside the repository (SECUREMAIL_CACHE).
# build_once BINARY FUNCTION: runs FUNCTION, which builds BINARY, unless BINARY exists, holding a lock beside the cache
# while it does: `make test` starts building every tool in the background (e2e/prebuild.sh), and a suite that gets to
# a tool first waits for that build instead of starting a second one.
build_once() {
  local binary=$1 build=$2
  [ -x "$binary" ] && return 0
  local cache=${SECUREMAIL_CACHE:-$HOME/.cache/securemail}
  mkdir -p "$cache"
  (
    flock 9
    [ -x "$binary" ] || "$build"
  ) 9>"$cache/.$(basename "$binary").build.lock"
}
