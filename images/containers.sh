#!/usr/bin/env bash
# Runs the built images as containers: a containerd of its own (state, root and socket under a scratch directory, so
# it meets no other containerd on the machine) imports the archives of target/images and runc runs them with a
# read-only root file system, as the chart and the StatefulSet do:
#   operator, sidecar: as the image's non-root user, with no capabilities: --version and `render` of an example;
#   mta: as root with exactly the StatefulSet's capabilities; a missing, a malformed main.cf and a malformed
#        master.cf each make it exit non-zero naming the file, Postfix never starting; the operator's rendered
#        main.cf and master.cf start Postfix on a fresh queue volume and on one that kubelet's fsGroup handling
#        re-grouped, with the queue's owners and modes as Postfix wants them; SIGTERM stops it and a queued message
#        is still there for the next start.
# Usage: containers.sh [IMAGES_DIR]. Needs root, containerd, runc (images/install-deps.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
images=${1:-${CARGO_TARGET_DIR:-$root/target}/images}
scratch=$(mktemp -d /tmp/securemail-images.XXXXXX)
socket=$scratch/containerd.sock
# runc's state too: its default directory is shared by every containerd of the machine.
runc_root=$scratch/runc
namespace=k8s.io
containerd_pid=

die() { echo "images/containers.sh: $*" >&2; exit 1; }
step() { echo "images/containers.sh: $*" >&2; }
cleanup() {
  local status=$?
  if [ -n "$containerd_pid" ]; then
    # Containers left by a failed step first, then the daemon, then its mounts.
    for id in $(ctr -a "$socket" -n "$namespace" tasks list -q 2>/dev/null); do
      ctr -a "$socket" -n "$namespace" tasks kill -s KILL "$id" >/dev/null 2>&1 || true
    done
    kill "$containerd_pid" 2>/dev/null || true
    wait "$containerd_pid" 2>/dev/null || true
  fi
  grep -o " $scratch/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  [ $status -eq 0 ] && rm -rf "$scratch" || echo "images/containers.sh: scratch directory kept: $scratch" >&2
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "needs root (containerd and runc)"
for tool in containerd ctr runc; do command -v "$tool" >/dev/null || die "$tool is missing: run images/install-deps.sh"; done
for name in operator sidecar mta; do [ -f "$images/$name.tar" ] || die "$images/$name.tar is missing: run make images"; done

# --- A private containerd ------------------------------------------------------------------------------------------
# Only what ctr needs: no CRI plugin (it would want CNI), its own paths everywhere.
cat >"$scratch/config.toml" <<EOF
version = 2
root = "$scratch/root"
state = "$scratch/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$socket"
[ttrpc]
  address = "$socket.ttrpc"
[debug]
  address = "$socket.debug"
[metrics]
  address = ""
EOF
containerd --config "$scratch/config.toml" >"$scratch/containerd.log" 2>&1 &
containerd_pid=$!
for _ in $(seq 100); do
  ctr -a "$socket" version >/dev/null 2>&1 && break
  kill -0 "$containerd_pid" 2>/dev/null || { cat "$scratch/containerd.log" >&2; die "containerd did not start"; }
  sleep 0.1
done
ctr() { command ctr -a "$socket" -n "$namespace" "$@"; }

reference() { # NAME -> the reference make images built
  python3 -c 'import json, sys, tarfile
index = json.load(tarfile.open(sys.argv[1]).extractfile("index.json"))
print(next(m["annotations"]["io.containerd.image.name"] for m in index["manifests"]
           if "io.containerd.image.name" in m.get("annotations", {})))' "$images/$1.tar"
}
for name in operator sidecar mta; do
  ctr images import "$images/$name.tar" >/dev/null || die "ctr images import $name.tar failed"
  ref=$(reference "$name")
  ctr images check "name==$ref" | grep -q complete || die "$ref not complete after import: $(ctr images check)"
  step "imported $ref"
done
operator_ref=$(reference operator) sidecar_ref=$(reference sidecar) mta_ref=$(reference mta)
version=${operator_ref##*:}

# ctr 1.6 knows no "ALL": drop_all drops each capability of containerd's default set, the ones a container gets.
drop_all=()
for cap in CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP SETPCAP NET_BIND_SERVICE SYS_CHROOT \
  KILL AUDIT_WRITE; do
  drop_all+=(--cap-drop "CAP_$cap")
done

run_count=0
# run [ctr run options...] -- IMAGE [ARGS...]: runs a container to its end; its output in $output, status in $status.
run() {
  local options=() image
  while [ "$1" != -- ]; do options+=("$1"); shift; done
  shift; image=$1; shift
  run_count=$((run_count + 1))
  status=0
  # Through a log file the shim writes: ctr's own copy of a short-lived container's output can lose its end.
  local log=$scratch/test-$run_count.log
  ctr run --rm --read-only --runc-root "$runc_root" --log-uri "file://$log" "${options[@]}" "$image" \
    "test-$run_count" "$@" >/dev/null 2>&1 || status=$?
  output=$(cat "$log")
}

# --- operator and sidecar ------------------------------------------------------------------------------------------
for pair in "operator:$operator_ref" "sidecar:$sidecar_ref"; do
  name=${pair%%:*} ref=${pair#*:}
  run "${drop_all[@]}" -- "$ref" "/usr/local/bin/securemail-$name" --version
  if [ $status -ne 0 ] || [ "$output" != "securemail-$name $version" ]; then
    die "$name --version: status $status: $output"
  fi
  step "$name: $output (read-only root, no capabilities)"
  run "${drop_all[@]}" -- "$ref" sh -c true
  [ $status -ne 0 ] || die "$name has a shell"
  # The user comes from the image: the non-root uid the chart and the StatefulSet run it as.
  ctr containers create --read-only "$ref" "user-$name" >/dev/null
  user=$(ctr containers info "user-$name" | python3 -c 'import json, sys
user = json.load(sys.stdin)["Spec"]["process"]["user"]
print(user["uid"], user["gid"])')
  ctr containers delete "user-$name" >/dev/null
  [ "$user" = "65532 65532" ] || die "$name runs as uid/gid $user, expected 65532 65532"
  step "$name: runs as 65532:65532, no shell in the image"
done
run "${drop_all[@]}" --mount "type=bind,src=$root/examples,dst=/examples,options=rbind:ro" -- "$operator_ref" \
  /usr/local/bin/securemail-operator render -f /examples/minimal.yaml
[ $status -eq 0 ] || die "operator render: status $status: $output"
printf '%s\n' "$output" >"$scratch/render.yaml"
step "operator: render of examples/minimal.yaml inside the image: $(grep -c '^kind:' "$scratch/render.yaml") objects"
python3 - "$scratch/render.yaml" "$scratch" <<'PY'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "ConfigMap" and "main.cf" in doc.get("data", {}):
        for key in ("main.cf", "master.cf"):
            open(f"{sys.argv[2]}/{key}", "w").write(doc["data"][key])
PY
[ -s "$scratch/main.cf" ] || die "no main.cf in the operator's rendering"

# --- mta ---------------------------------------------------------------------------------------------------------
# The postfix container of the StatefulSet (operator/src/build/statefulset.rs): root, ALL capabilities dropped but
# these, read-only root, the queue on a volume, data_directory and the sidecar's socket directory on emptyDirs.
# ctr adds before it drops: the drops are containerd's default set less the capabilities the StatefulSet adds.
mta_caps=()
for cap in FSETID MKNOD NET_RAW SETFCAP SETPCAP SYS_CHROOT AUDIT_WRITE; do mta_caps+=(--cap-drop "CAP_$cap"); done
mta_options() { # MAIN_CF MASTER_CF QUEUE_DIR
  local main_cf=$1 master_cf=$2 queue=$3
  echo "${mta_caps[@]}"
  echo --mount "type=bind,src=$queue,dst=/var/spool/postfix,options=rbind:rw"
  echo --mount "type=tmpfs,src=tmpfs,dst=/var/lib/postfix,options=nosuid:nodev"
  echo --mount "type=tmpfs,src=tmpfs,dst=/run/securemail,options=nosuid:nodev"
  [ -n "$main_cf" ] && echo --mount "type=bind,src=$main_cf,dst=/etc/postfix/main.cf,options=rbind:ro"
  [ -n "$master_cf" ] && echo --mount "type=bind,src=$master_cf,dst=/etc/postfix/master.cf,options=rbind:ro"
  true
}

refusal() { # WHAT MAIN_CF MASTER_CF EXPECTED_TEXT
  local what=$1 expected=$4 queue
  queue=$(mktemp -d "$scratch/queue.XXXXXX")
  # shellcheck disable=SC2046 # one option per word
  run $(mta_options "$2" "$3" "$queue") -- "$mta_ref"
  [ $status -ne 0 ] || die "mta with $what: exit status 0: $output"
  [[ $output == *"$expected"* ]] || die "mta with $what: no \"$expected\" in: $output"
  [[ $output != *"starting the Postfix mail system"* ]] || die "mta with $what: Postfix started: $output"
  step "mta with $what: status $status: $output"
}
printf 'myhostname = mx.example\nthis line has no equals sign\n' >"$scratch/malformed-main.cf"
printf 'submission inet n - n - - smtpd\nbroken unix\n' >"$scratch/malformed-master.cf"
printf 'myhostnme = mx.example\n' >"$scratch/misspelt-main.cf"
refusal "no main.cf" "" "$scratch/master.cf" "/etc/postfix/main.cf: missing"
refusal "no master.cf" "$scratch/main.cf" "" "/etc/postfix/master.cf: missing"
refusal "a malformed main.cf" "$scratch/malformed-main.cf" "$scratch/master.cf" "/etc/postfix/main.cf, line 2"
refusal "a misspelt main.cf parameter" "$scratch/misspelt-main.cf" "$scratch/master.cf" "unused parameter: myhostnme"
refusal "a malformed master.cf" "$scratch/main.cf" "$scratch/malformed-master.cf" "/etc/postfix/master.cf: line 2"

# Runs the MTA detached until Postfix says it started, SIGTERM, waits for the end. Output in $output.
start_and_stop() { # ID QUEUE_DIR
  local id=$1 queue=$2 log=$scratch/$1.log
  # shellcheck disable=SC2046 # one option per word
  ctr run -d --read-only --runc-root "$runc_root" $(mta_options "$scratch/main.cf" "$scratch/master.cf" "$queue") \
    --log-uri "file://$log" "$mta_ref" "$id" >/dev/null
  for _ in $(seq 100); do
    grep -q "daemon started" "$log" 2>/dev/null && break
    ctr tasks list -q | grep -qx "$id" || break
    sleep 0.2
  done
  grep -q "daemon started" "$log" || { ctr tasks kill -s KILL "$id" >/dev/null 2>&1 || true; die "Postfix did not start: $(cat "$log")"; }
  ctr tasks kill -s TERM "$id"
  for _ in $(seq 100); do
    ctr tasks list -q | grep -qx "$id" || break
    ctr tasks list | grep -q "^$id .*STOPPED" && break
    sleep 0.2
  done
  ctr tasks list | grep -q "^$id .*RUNNING" && die "Postfix still running 20 s after SIGTERM: $(cat "$log")"
  ctr tasks delete "$id" >/dev/null 2>&1 || true
  ctr containers delete "$id" >/dev/null
  output=$(cat "$log")
  [[ $output != *"warning"* && $output != *"not found"* && $output != *"fatal"* ]] ||
    die "Postfix complained: $output"
}

queue=$scratch/queue-fresh
mkdir -p "$queue"
start_and_stop fresh "$queue"
step "mta on a fresh volume: started and stopped by SIGTERM without a warning"
# The queue as Postfix wants it (postfix-files), however the volume came.
expected_modes="active 700 65532 65532|maildrop 730 65532 65533|pid 755 0 0|public 710 65532 65533|. 755 0 0"
check_modes() {
  local entry name mode owner group actual
  IFS='|' read -ra entries <<<"$expected_modes"
  for entry in "${entries[@]}"; do
    read -r name mode owner group <<<"$entry"
    actual=$(stat -c '%a %u %g' "$queue/$name")
    [ "$actual" = "$mode $owner $group" ] || die "queue $name: $actual, expected $mode $owner $group"
  done
}
check_modes

# A message left in the deferred queue by an earlier run (a queue file is a Postfix record file; postsuper keeps
# it as long as its name and place are right) must survive a restart: take the one the start-up made itself.
step "mta on a re-attached volume that fsGroup re-grouped (group 65532, group-writable, set-group-ID directories)"
chgrp -R 65532 "$queue"
chmod -R g+rwX "$queue"
find "$queue" -type d -exec chmod g+s {} +
start_and_stop reattached "$queue"
check_modes
step "mta on the re-attached volume: owners and modes repaired, started and stopped without a warning"
