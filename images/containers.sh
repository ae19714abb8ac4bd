#!/usr/bin/env bash
# Runs the built images as containers: a containerd of its own (state, root and socket under a scratch directory, so
# it meets no other containerd on the machine) imports the archives of target/images and runc runs them with a
# read-only root file system, as the chart and the StatefulSet do:
#   operator, sidecar: as the image's non-root user, with no capabilities: --version and `render` of an example;
#        the sidecar refusing a missing and a malformed config, naming the file;
#   mta: as root with exactly the StatefulSet's capabilities; a missing, a malformed main.cf and a malformed
#        master.cf each make it exit non-zero naming the file, Postfix never starting; the operator's rendered
#        main.cf and master.cf start Postfix on a fresh queue volume and on one that kubelet's fsGroup handling
#        re-grouped, with the queue's owners and modes as Postfix wants them; SIGTERM stops it and a queued message
#        is still there for the next start.
#   operator, against a control plane of its own (e2e/cluster-up.sh on ports of its own) with the chart installed:
#        run as the chart's Deployment says, it becomes ready, takes the Lease, reconciles examples/minimal.yaml into a
#        StatefulSet that runs the mta and sidecar images built here, and stops on SIGTERM.
# Usage: containers.sh [IMAGES_DIR]. Needs root, containerd, runc (images/install-deps.sh) and what e2e/cluster-up.sh
# needs.
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
  [ -z "$sink_pid" ] || kill "$sink_pid" 2>/dev/null || true
  [ -z "$cluster_started" ] || SECUREMAIL_CLUSTER_DIR=$cluster_dir "$root/e2e/cluster-down.sh" >/dev/null 2>&1 || true
  [ -z "$netns_pid" ] || kill "$netns_pid" 2>/dev/null || true
  if [ -n "$containerd_pid" ]; then
    # Containers left by a failed step first (deleting its task ends its shim), then the daemon, then its mounts.
    for id in $(ctr -a "$socket" -n "$namespace" tasks list -q 2>/dev/null); do
      ctr -a "$socket" -n "$namespace" tasks kill -s KILL "$id" >/dev/null 2>&1 || true
      for _ in $(seq 50); do
        ctr -a "$socket" -n "$namespace" tasks delete "$id" >/dev/null 2>&1 && break
        sleep 0.1
      done
    done
    for id in $(ctr -a "$socket" -n "$namespace" containers list -q 2>/dev/null); do
      ctr -a "$socket" -n "$namespace" containers delete "$id" >/dev/null 2>&1 || true
    done
    kill "$containerd_pid" 2>/dev/null || true
    wait "$containerd_pid" 2>/dev/null || true
  fi
  grep -o " $scratch/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  [ "$status" -eq 0 ] && rm -rf "$scratch" || echo "images/containers.sh: scratch directory kept: $scratch" >&2
}
trap cleanup EXIT
netns_pid='' sink_pid='' cluster_started='' cluster_dir=''

[ "$(id -u)" = 0 ] || die "needs root (containerd and runc)"
for tool in containerd ctr runc; do
  command -v "$tool" >/dev/null || die "$tool is missing: run images/install-deps.sh"
done
for name in operator sidecar mta; do
  [ -f "$images/$name.tar" ] || die "$images/$name.tar is missing: run make images"
done

# --- A private containerd ------------------------------------------------------------------------------------------
# Only what ctr needs: no CRI plugin (it would want CNI), its own paths everywhere.
cat >"$scratch/config.toml" <<EOF
version = 2
root = "$scratch/root"
state = "$scratch/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]
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
# The output comes through a log file the shim writes. containerd 1.6's shim can lose all of a container's output
# when the process exits within milliseconds ("error copying stderr" in its log); every container run here prints
# something, so an empty output is that loss, and the run is repeated (up to 5 times).
run() {
  local options=() image attempt log
  while [ "$1" != -- ]; do options+=("$1"); shift; done
  shift; image=$1; shift
  for attempt in 1 2 3 4 5; do
    run_count=$((run_count + 1))
    log=$scratch/test-$run_count.log
    status=0
    ctr run --rm --read-only --runc-root "$runc_root" --log-uri "file://$log" "${options[@]}" "$image" \
      "test-$run_count" "$@" >/dev/null 2>"$log.ctr" || status=$?
    output=$(cat "$log" "$log.ctr")
    [ -z "$output" ] || return 0
    step "no output from the container (attempt $attempt); running it again"
  done
}

# --- operator and sidecar ------------------------------------------------------------------------------------------
for pair in "operator:$operator_ref" "sidecar:$sidecar_ref"; do
  name=${pair%%:*} ref=${pair#*:}
  run "${drop_all[@]}" -- "$ref" "/usr/local/bin/securemail-$name" --version
  if [ "$status" -ne 0 ] || [ "$output" != "securemail-$name $version" ]; then
    die "$name --version: status $status: $output"
  fi
  step "$name: $output (read-only root, no capabilities)"
  run "${drop_all[@]}" -- "$ref" sh -c true
  [ "$status" -ne 0 ] || die "$name has a shell"
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
[ "$status" -eq 0 ] || die "operator render: status $status: $output"
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

# The sidecar as the StatefulSet runs it, without its config and with a malformed one: it exits non-zero naming the
# file and the problem.
sidecar_config=/etc/securemail/sidecar/sidecar-0.yaml
run "${drop_all[@]}" -- "$sidecar_ref" /usr/local/bin/securemail-sidecar run --config "$sidecar_config"
if [ "$status" -eq 0 ] || [[ $output != *"$sidecar_config: cannot read"* ]]; then
  die "sidecar without its config: status $status: $output"
fi
step "sidecar without its config: status $status: $(head -n 1 <<<"$output")"
mkdir -p "$scratch/sidecar-config"
printf 'tenant: [\n' >"$scratch/sidecar-config/sidecar-0.yaml"
run "${drop_all[@]}" --mount "type=bind,src=$scratch/sidecar-config,dst=${sidecar_config%/*},options=rbind:ro" -- \
  "$sidecar_ref" /usr/local/bin/securemail-sidecar run --config "$sidecar_config"
if [ "$status" -eq 0 ] || [[ $output != *"$sidecar_config, line"* ]]; then
  die "sidecar with a malformed config: status $status: $output"
fi
step "sidecar with a malformed config: status $status: $(head -n 1 <<<"$output")"

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
  [ "$status" -ne 0 ] || die "mta with $what: exit status 0: $output"
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

# The pod's network namespace (loopback only) and the sidecar's socket directory, both shared with this script: the
# test submits on 587 from inside the namespace and plays the sidecar with an LMTP sink on the socket.
unshare --net sleep infinity &
netns_pid=$!
sleep 0.2
nsenter -t "$netns_pid" -n ip link set lo up
run_dir=$scratch/run
mkdir -p "$run_dir" "$scratch/tls" "$scratch/client-ca"
# A client CA for the submission listener, a server certificate and a client certificate it signed.
certificate() { # NAME SUBJECT
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$scratch/$1.key" \
    -subj "/CN=$2" -out "$scratch/$1.csr" 2>/dev/null
  openssl x509 -req -in "$scratch/$1.csr" -CA "$scratch/ca.crt" -CAkey "$scratch/ca.key" -days 2 \
    -set_serial "0x$(od -An -N8 -tx1 /dev/urandom | tr -d ' ')" -out "$scratch/$1.crt" 2>/dev/null
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$scratch/ca.key" -days 2 \
  -subj "/CN=securemail images test client CA" -out "$scratch/ca.crt" 2>/dev/null
certificate server "$(sed -n 's/^myhostname = //p' "$scratch/main.cf")"
certificate client "images test client"
install -m 0400 "$scratch/server.key" "$scratch/tls/tls.key"
install -m 0400 "$scratch/server.crt" "$scratch/tls/tls.crt"
install -m 0444 "$scratch/ca.crt" "$scratch/client-ca/ca.crt"

# Runs the MTA detached in the pod's namespaces until Postfix says it started.
start_mta() { # ID QUEUE_DIR
  local id=$1 queue=$2
  # shellcheck disable=SC2046 # one option per word
  ctr run -d --read-only --runc-root "$runc_root" $(mta_options "$scratch/main.cf" "$scratch/master.cf" "$queue") \
    --mount "type=bind,src=$run_dir,dst=/run/securemail,options=rbind:rw" \
    --mount "type=bind,src=$scratch/tls,dst=/etc/securemail/submission-tls,options=rbind:ro" \
    --mount "type=bind,src=$scratch/client-ca,dst=/etc/securemail/client-ca,options=rbind:ro" \
    --with-ns "network:/proc/$netns_pid/ns/net" --log-uri "file://$scratch/$id.log" "$mta_ref" "$id" >/dev/null
  wait_for_log "$id" "daemon started" || die "Postfix did not start: $(cat "$scratch/$id.log")"
}
wait_for_log() { # ID TEXT: up to 20 s
  for _ in $(seq 100); do
    grep -q "$2" "$scratch/$1.log" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
# SIGTERM, as kubelet sends it, and the end of the container within 20 s; its log in $output.
stop_mta() { # ID
  local id=$1
  ctr tasks kill -s TERM "$id"
  for _ in $(seq 100); do
    ctr tasks list | grep -q "^$id .*RUNNING" || break
    sleep 0.2
  done
  ctr tasks list | grep -q "^$id .*RUNNING" && die "Postfix still running 20 s after SIGTERM: $(cat "$scratch/$id.log")"
  ctr tasks delete "$id" >/dev/null 2>&1 || true
  ctr containers delete "$id" >/dev/null
  output=$(cat "$scratch/$id.log")
  # Postfix's own start-up checks (postfix-script) found nothing to warn about, and nothing was missing.
  if grep -E 'postfix-script\[[0-9]+\]: (warning|error|fatal)|fatal:|not found' <<<"$output"; then
    die "Postfix complained at start-up: $output"
  fi
}
# The queue as Postfix wants it (postfix-files), however the volume came.
check_modes() {
  local name mode owner group actual
  while read -r name mode owner group; do
    actual=$(stat -c '%a %u %g' "$queue/$name")
    [ "$actual" = "$mode $owner $group" ] || die "queue $name: $actual, expected $mode $owner $group"
  done <<'MODES'
. 755 0 0
active 700 65532 65532
deferred 700 65532 65532
maildrop 730 65532 65533
pid 755 0 0
public 710 65532 65533
MODES
}
# Messages in the queue: files in the queues a message passes through (defer/ holds only their delay logs).
queue_files() { find "$queue"/{maildrop,incoming,active,deferred,hold} -type f | wc -l; }

queue=$scratch/queue
mkdir -p "$queue"
start_mta first "$queue"
check_modes
step "mta on a fresh volume: Postfix started, queue owners and modes as postfix-files lists them"
# The StatefulSet's probe: ready once the master runs and 587 listens; a port nobody listens on is named.
ctr tasks exec --exec-id ready-587 first /usr/local/sbin/securemail-mta-ready 587 >"$scratch/ready.log" 2>&1 ||
  die "the probe says the running Postfix is not ready: $(cat "$scratch/ready.log")"
if ctr tasks exec --exec-id ready-2525 first /usr/local/sbin/securemail-mta-ready 2525 >"$scratch/ready.log" 2>&1; then
  die "the probe says ready for port 2525, where nothing listens"
fi
grep -q "nothing listens on port 2525" "$scratch/ready.log" ||
  die "the probe's refusal does not name the port: $(cat "$scratch/ready.log")"
grep -q "connect from" "$scratch/first.log" && die "the probe made a connection Postfix logged"
step "mta: the probe (securemail-mta-ready) sees the master and the 587 listener, opens no connection"
message_id="<images-test-$$@notify.example>"
nsenter -t "$netns_pid" -n swaks --silent 2 --server 127.0.0.1:587 --tls --tls-protocol tlsv1_2,tlsv1_3 \
  --tls-cert "$scratch/client.crt" --tls-key "$scratch/client.key" --ehlo client.example \
  --from "sender@$(sed -n 's/^myhostname = //p' "$scratch/main.cf")" --to someone@receiver.example \
  --header "Message-Id: $message_id" --body "queued across a restart" ||
  die "submission on 587 with a client certificate failed: $(cat "$scratch/first.log")"
# No sidecar yet: the LMTP socket is missing and Postfix keeps the message (deferred).
wait_for_log first "status=deferred" || die "the message was not deferred: $(cat "$scratch/first.log")"
# What the runbook (docs/operations.md) has an SRE run to see the queue works in the image: `postqueue -p`. (Its
# output can be lost as a short-lived container's can, see run(): asked again when empty.)
for attempt in 1 2 3 4 5; do
  listing=$(ctr tasks exec --exec-id "postqueue-$attempt" first /usr/sbin/postqueue -p 2>&1) || true
  [ -z "$listing" ] || break
done
[[ $listing == *"someone@receiver.example"* && $listing == *"lmtp.sock"* ]] ||
  die "postqueue -p does not list the deferred message and its reason: $listing"
stop_mta first
[ "$(queue_files)" = 1 ] || die "after SIGTERM the queue holds $(queue_files) files, expected the one message"
step "mta: message submitted on 587 (TLS, client certificate), deferred without a sidecar (postqueue -p lists it)," \
  "SIGTERM: still queued"

# kubelet's fsGroup handling on a re-attached volume: group 65532, group-writable, set-group-ID directories.
chgrp -R 65532 "$queue"
chmod -R g+rwX "$queue"
find "$queue" -type d -exec chmod g+s {} +
python3 "$here/lmtp_sink.py" "$run_dir/lmtp.sock" "$scratch/delivered" &
sink_pid=$!
# Postfix keeps a deferred message's next retry time as its queue file's mtime: as if the pod had been down past it
# (`postqueue -f` needs the pickup service, which this master.cf leaves out).
find "$queue/deferred" -type f -exec touch -d '1 hour ago' {} +
start_mta second "$queue"
check_modes
wait_for_log second "status=sent" || die "the queued message was not delivered: $(cat "$scratch/second.log")"
stop_mta second
kill "$sink_pid"
delivered=$(grep -l "^Message-Id: $message_id" "$scratch/delivered"/*.eml 2>/dev/null | wc -l)
[ "$delivered" = 1 ] || die "the message was delivered $delivered times, expected once"
[ "$(queue_files)" = 0 ] || die "the queue still holds $(queue_files) files after delivery"
step "mta restarted on the re-attached, re-grouped volume: owners and modes repaired, the message delivered once"

# --- the operator image against a control plane -------------------------------------------------------------------
# A control plane of this test's own (its state under the scratch directory, its own ports), the chart installed in
# it, and the operator image run as the chart's Deployment would run it: the Deployment's arguments and environment,
# a token of its ServiceAccount, read-only root, the image's non-root user, no capabilities. Host network: the
# apiserver listens on loopback.
cluster_dir=$scratch/cluster
export SECUREMAIL_CLUSTER_DIR=$cluster_dir
export SECUREMAIL_ETCD_PORT=${SECUREMAIL_IMAGES_ETCD_PORT:-33791}
export SECUREMAIL_APISERVER_PORT=${SECUREMAIL_IMAGES_APISERVER_PORT:-36443}
admin_port=${SECUREMAIL_IMAGES_ADMIN_PORT:-38080}
step "starting a control plane in $cluster_dir (apiserver on 127.0.0.1:$SECUREMAIL_APISERVER_PORT)"
cluster_started=1
KUBECONFIG=$("$root/e2e/cluster-up.sh" | tail -n 1)
export KUBECONFIG
tenant_namespace=$(sed -n 's/^  namespace: //p' "$root/examples/minimal.yaml")
kubectl create namespace "$tenant_namespace" >/dev/null
# Two replicas: the Deployment then asks for leader election, and the one replica run here must take the Lease.
"$root/e2e/helm.sh" install securemail-operator "$root/charts/securemail-operator" --namespace securemail-system \
  --create-namespace --set "tenantNamespaces={$tenant_namespace}" --set replicaCount=2 >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/securemailtenants.securemail.io >/dev/null
# The token, readable by the operator's uid only, as kubelet projects it for the pod.
install -m 0400 -o 65532 -g 65532 "$("$root/e2e/operator-kubeconfig.sh" securemail-operator securemail-system)" \
  "$scratch/operator.kubeconfig"
operator_kubeconfig=$scratch/operator.kubeconfig
deployment=$(kubectl get deployment -n securemail-system -l app.kubernetes.io/instance=securemail-operator -o json)
deployed=$(jq -r '.items[0].spec.template.spec.containers[0].image' <<<"$deployment")
[ "$deployed" = "$operator_ref" ] || die "the chart deploys $deployed, not $operator_ref"
mapfile -t operator_args < <(jq -r '.items[0].spec.template.spec.containers[0].args[]' <<<"$deployment" |
  grep -v '^--admin-address=')
operator_env=()
while IFS= read -r variable; do operator_env+=(--env "$variable"); done < <(jq -r \
  '.items[0].spec.template.spec.containers[0].env[] | select(.value != null) | "\(.name)=\(.value)"' <<<"$deployment")
pod_name=securemail-operator-image-test
ctr run -d --read-only --net-host --runc-root "$runc_root" "${drop_all[@]}" "${operator_env[@]}" \
  --env POD_NAMESPACE=securemail-system --env POD_NAME="$pod_name" \
  --env KUBECONFIG=/var/run/securemail/kubeconfig \
  --mount "type=bind,src=$operator_kubeconfig,dst=/var/run/securemail/kubeconfig,options=rbind:ro" \
  --log-uri "file://$scratch/operator.log" "$operator_ref" operator \
  /usr/local/bin/securemail-operator "${operator_args[@]}" --admin-address "127.0.0.1:$admin_port" >/dev/null
for _ in $(seq 150); do
  curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null ||
  die "the operator container is not ready: $(cat "$scratch/operator.log")"
holder=""
for _ in $(seq 150); do
  holder=$(kubectl get lease -n securemail-system -o jsonpath='{.items[*].spec.holderIdentity}' 2>/dev/null)
  [ "$holder" = "$pod_name" ] && break
  sleep 0.2
done
[ "$holder" = "$pod_name" ] ||
  die "the Lease is held by \"$holder\", not the operator container: $(cat "$scratch/operator.log")"
step "operator container: ready on 127.0.0.1:$admin_port, holds the Lease" \
  "($(kubectl get lease -n securemail-system -o name))"

# A tenant with the Secrets it names, as a platform team applies it.
kubectl -n "$tenant_namespace" create secret tls lakeside-submission-tls --cert="$scratch/server.crt" \
  --key="$scratch/server.key" >/dev/null
kubectl -n "$tenant_namespace" create secret generic lakeside-apps-ca --from-file=ca.crt="$scratch/ca.crt" >/dev/null
kubectl apply -f "$root/examples/minimal.yaml" >/dev/null
tenant=$(sed -n 's/^  name: //p' "$root/examples/minimal.yaml" | head -n 1)
# The status says the operator has seen this generation of the spec.
reconciled() {
  local generations
  generations=$(kubectl get smt -n "$tenant_namespace" "$tenant" \
    -o jsonpath='{.metadata.generation} {.status.observedGeneration}' 2>/dev/null) || return 1
  [ -n "${generations#* }" ] && [ "${generations% *}" = "${generations#* }" ]
}
for _ in $(seq 150); do
  reconciled && break
  sleep 0.2
done
reconciled || die "the tenant was not reconciled: $(cat "$scratch/operator.log")"
images_in_pod=$(kubectl get statefulset -n "$tenant_namespace" -l app.kubernetes.io/instance="$tenant" \
  -o jsonpath='{.items[0].spec.template.spec.containers[*].image}')
[ "$images_in_pod" = "$mta_ref $sidecar_ref" ] ||
  die "the tenant's StatefulSet runs $images_in_pod, not $mta_ref $sidecar_ref"
step "operator container: reconciled $tenant_namespace/$tenant; its StatefulSet runs $images_in_pod"

ctr tasks kill -s TERM operator
for _ in $(seq 100); do
  ctr tasks list | grep -q "^operator .*RUNNING" || break
  sleep 0.2
done
ctr tasks list | grep -q "^operator .*RUNNING" && die "the operator still runs 20 s after SIGTERM"
ctr tasks delete operator >/dev/null 2>&1 || true
ctr containers delete operator >/dev/null
step "operator container: stopped by SIGTERM"
