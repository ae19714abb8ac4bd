#!/usr/bin/env bash
# Shared by cluster-up.sh, cluster-restart.sh and cluster-down.sh: a control-plane component NAME (etcd,
# kube-apiserver) is started from the command line recorded in $dir/NAME.args (NUL-separated, program first), so a
# restart runs exactly what cluster-up.sh ran. Its pid goes to $dir/NAME.pid, its output to $dir/NAME.log.

# A process that already exited but is not yet reaped (state Z) counts as dead.
alive() {
  local state
  [ -f "$1" ] && state=$(ps -p "$(cat "$1")" -o stat= 2>/dev/null) && [[ $state != Z* ]]
}

# True only while `pid` is still the expected, running program, so a recycled pid is never signalled.
ours() {
  local pid=$1 name=$2 info state comm
  info=$(ps -p "$pid" -o stat=,comm= 2>/dev/null) || return 1
  read -r state comm <<<"$info"
  # The kernel keeps only the first 15 characters of a program name.
  [ "$comm" = "${name:0:15}" ] && [[ $state != Z* ]]
}

# Records the command line of component `name` (the remaining arguments) and starts it.
record_and_launch() {
  local dir=$1 name=$2
  shift 2
  printf '%s\0' "$@" > "$dir/$name.args"
  launch "$dir" "$name"
}

# Starts component `name` in its own session from its recorded command line, detached from the caller.
launch() {
  local dir=$1 name=$2 command
  mapfile -d '' -t command < "$dir/$name.args"
  [ "${#command[@]}" -gt 0 ] || { echo "no recorded command line in $dir/$name.args" >&2; return 1; }
  setsid nohup "${command[@]}" </dev/null >>"$dir/$name.log" 2>&1 &
  echo $! > "$dir/$name.pid"
}

# Test certificates last 400 days: the suites also run the operator with its clock moved ahead (CLOCK_AHEAD_DAYS in
# the Makefile), and it must still trust the apiserver. They are made afresh at every start and never leave this
# machine.
cert_validity_days=400

# Signs a new key for `name` with the CA in the caller's $pki; $3 is the extension section content. Uses the
# caller's openssl_quiet, which reports a failure the caller's way.
sign() {
  local name=$1 subj=$2 ext=$3
  : "${pki:?sign needs the pki directory of the caller}"
  openssl_quiet req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$subj" \
    -keyout "$pki/$name.key" -out "$pki/$name.csr"
  printf '%s\n' "$ext" > "$pki/$name.ext"
  openssl_quiet x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days "$cert_validity_days" -extfile "$pki/$name.ext" -out "$pki/$name.crt"
  chmod 600 "$pki/$name.key"
}
