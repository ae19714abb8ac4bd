#!/usr/bin/env bash
# Runs the Argo CD health check of SecureMailTenant (charts/securemail-operator/files/argocd/health.lua) with a real
# Lua interpreter against the fixtures in charts/tests/argocd/: each one a SecureMailTenant whose header comments give
# the expected health (`# expect-status: Degraded`) and a substring of its message (`# expect-message: ...`).
# The script runs unmodified, the way Argo CD runs it: the object as the global `obj`, the returned table read as the
# health, inside Argo CD's sandbox (base and table libraries only; no string library, so no string methods either).
# Also checks that docs/argocd.md carries the script byte for byte; `--update-docs` rewrites that snippet from it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
health="$root/charts/securemail-operator/files/argocd/health.lua"
docs="$root/docs/argocd.md"
key=resource.customizations.health.securemail.io_SecureMailTenant
begin_marker='<!-- argocd-cm snippet: generated from health.lua by charts/tests/argocd-health.sh --update-docs -->'
end_marker='<!-- end of argocd-cm snippet -->'
lua=${LUA:-lua5.4}

die() { echo "argocd-health: $*" >&2; exit 1; }

# The argocd-cm merge patch docs/argocd.md shows, made from health.lua.
snippet() {
  echo '```yaml'
  echo 'data:'
  echo "  $key: |"
  # Empty lines stay empty: a block scalar does not need them indented.
  sed 's/^./    &/' "$health"
  echo '```'
}

# The lines between the markers in docs/argocd.md.
docs_snippet() {
  awk -v begin="$begin_marker" -v end="$end_marker" '$0 == end { inside = 0 } inside { print } $0 == begin { inside = 1 }' \
    "$docs"
}

markers_present() {
  grep -qxF -- "$begin_marker" "$docs" && grep -qxF -- "$end_marker" "$docs"
}

if [ "${1:-}" = --update-docs ]; then
  markers_present || die "docs/argocd.md lacks the snippet markers: $begin_marker ... $end_marker"
  # Through the environment: awk -v would interpret backslashes in the Lua.
  updated=$(SNIPPET=$(snippet) awk -v begin="$begin_marker" -v end="$end_marker" '
    $0 == begin { print; print ENVIRON["SNIPPET"]; skipping = 1; next }
    $0 == end { skipping = 0 }
    !skipping' "$docs")
  printf '%s\n' "$updated" >"$docs"
  echo "argocd-health: docs/argocd.md snippet rewritten from health.lua"
  exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [--update-docs]"

command -v "$lua" >/dev/null || die "$lua not found; e2e/install-deps.sh installs it (Debian package lua5.4)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0

# docs/argocd.md: the snippet is what health.lua makes, and as YAML it gives back health.lua byte for byte.
if ! markers_present; then
  echo "argocd-health: docs/argocd.md lacks the snippet markers: $begin_marker ... $end_marker" >&2
  failed=1
elif ! diff -u <(snippet) <(docs_snippet) >"$tmp/docs.diff"; then
  echo "argocd-health: the Lua in docs/argocd.md differs from health.lua (run $0 --update-docs):" >&2
  cat "$tmp/docs.diff" >&2
  failed=1
elif ! docs_snippet | python3 -c '
import sys, yaml
body = sys.stdin.read().split("\n", 1)[1].rsplit("```", 1)[0]
with open(sys.argv[1], encoding="utf-8", newline="") as script:
    sys.exit(yaml.safe_load(body)["data"][sys.argv[2]] != script.read())
' "$health" "$key"; then
  echo "argocd-health: the argocd-cm snippet in docs/argocd.md does not parse back to health.lua" >&2
  failed=1
fi

# A fixture as a Lua chunk returning the object as Argo CD converts it from JSON.
yaml_to_lua='
import datetime, sys, yaml

def lua(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value))  # Argo CD hands every number to Lua as a float (gopher-lua LNumber)
    if isinstance(value, (datetime.date, datetime.datetime)):
        value = value.isoformat().replace("+00:00", "Z")
    if isinstance(value, str):
        return "\"" + "".join(
            c if c.isascii() and c.isprintable() and c not in "\"\\" else "".join(f"\\{b:03d}" for b in c.encode())
            for c in value) + "\""
    if isinstance(value, list):
        return "{" + ", ".join(lua(item) for item in value) + "}"
    if isinstance(value, dict):  # a null field is absent, as in Argo CD
        return "{" + ", ".join(f"[{lua(str(k))}] = {lua(v)}" for k, v in value.items() if v is not None) + "}"
    raise SystemExit(f"cannot convert {value!r} to Lua")

with open(sys.argv[1], encoding="utf-8") as fixture:
    print("return " + lua(yaml.safe_load(fixture)))
'

# Runs health.lua (arg 1) on the object chunk (arg 2); prints status and message on two lines.
driver=$(cat <<'LUA'
local health_path, object_path = arg[1], arg[2]
local env = {
  obj = assert(loadfile(object_path))(),
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = pcall, select = select,
  tonumber = tonumber, tostring = tostring, type = type, table = table,
}
local script = assert(loadfile(health_path, "t", env))
local string_methods = getmetatable("").__index
getmetatable("").__index = nil
local ok, hs = pcall(script)
getmetatable("").__index = string_methods
if not ok then
  io.stderr:write("health.lua raised an error: ", tostring(hs), "\n")
  os.exit(2)
end
-- Argo CD turns any other status into Unknown, and shows the message as is.
local valid = { Healthy = true, Progressing = true, Degraded = true, Suspended = true, Missing = true, Unknown = true }
if type(hs) ~= "table" or not valid[hs.status] or type(hs.message) ~= "string" or hs.message == "" then
  io.stderr:write("health.lua returned no valid status with a message\n")
  os.exit(2)
end
print(hs.status)
print(hs.message)
LUA
)

count=0
for fixture in "$here"/argocd/*.yaml; do
  [ -e "$fixture" ] || die "no fixtures in $here/argocd"
  name=charts/tests/argocd/$(basename "$fixture")
  count=$((count + 1))
  want_status=$(sed -n 's/^# expect-status: //p' "$fixture")
  want_message=$(sed -n 's/^# expect-message: //p' "$fixture")
  if [ -z "$want_status" ] || [ -z "$want_message" ]; then
    echo "argocd-health: $name has no '# expect-status:' or '# expect-message:' header" >&2
    failed=1
    continue
  fi
  if ! python3 -c "$yaml_to_lua" "$fixture" >"$tmp/object.lua"; then
    echo "argocd-health: $name: cannot convert to a Lua table" >&2
    failed=1
    continue
  fi
  if ! result=$("$lua" - "$health" "$tmp/object.lua" <<<"$driver" 2>"$tmp/stderr"); then
    echo "argocd-health: $name: $(cat "$tmp/stderr")" >&2
    failed=1
    continue
  fi
  status=${result%%$'\n'*}
  message=${result#*$'\n'}
  if [ "$status" != "$want_status" ] || [[ $message != *"$want_message"* ]]; then
    echo "argocd-health: $name: got $status \"$message\"; expected $want_status with \"$want_message\"" >&2
    failed=1
  fi
done

[ "$failed" -eq 0 ] || exit 1
echo "argocd-health: $count fixtures as expected; docs/argocd.md carries health.lua"
