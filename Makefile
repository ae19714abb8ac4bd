# SecureMail: `make demo` runs the main job on a local control plane, `make test` runs every test.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
CARGO_FLAGS ?= --locked
CLUSTER_DIR ?= /tmp/securemail-cluster
KUBECONFIG_FILE := $(CLUSTER_DIR)/kubeconfig
CRD_FILE := crds/securemailtenants.securemail.io.yaml
DATAPLANE_DIR ?= /tmp/securemail-dataplane
DATAPLANE_LOCK := /tmp/securemail-dataplane.lock
# Where cargo puts binaries: CARGO_TARGET_DIR when set, as cargo itself does.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
export SECUREMAIL_CLUSTER_DIR := $(CLUSTER_DIR)

.PHONY: test deps prebuild fmt-check lint deny unit fuzz fuzz-smoke crds check-crds check-alerts check-chart cluster-up cluster-down node-up node-down node-smoke e2e e2e-node e2e-dataplane e2e-faults e2e-faults-ci e2e-load e2e-load-ci dataplane-up dataplane-down demo bench-operator bench-node bench-sidecar bench-policy images check-images check-image-containers

## test: every check CI runs — formatting, clippy, unit tests, a fuzzing smoke run, CRD drift, end-to-end suites
## (data plane, fault injection and load at reduced size; control plane; the images, reproducible and run as
## containers; the node running them). The Go-built tools are built in the background from the start (prebuild), and
## the suites that need none of them run first, so on a new machine their builds overlap the Rust builds and the
## suites' waiting.
test: deps prebuild fmt-check lint deny unit fuzz-smoke check-crds e2e-dataplane e2e-faults-ci e2e-load-ci e2e \
  check-alerts check-chart check-images check-image-containers e2e-node

## prebuild: start building, in the background at low priority, every pinned tool not cached yet (e2e/prebuild.sh,
## log in $(TARGET_DIR)/prebuild.log); it stops between tools once this make has exited.
prebuild:
	@mkdir -p $(TARGET_DIR)
	@setsid nohup nice -n 19 e2e/prebuild.sh $$PPID >$(TARGET_DIR)/prebuild.log 2>&1 </dev/null &

## deps: install what the tests need on a fresh machine (Debian packages; control-plane binaries are built by e2e).
deps:
	@e2e/install-deps.sh

fmt-check:
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path sidecar/fuzz/Cargo.toml -- --check

lint:
	shellcheck -x -P SCRIPTDIR e2e/*.sh e2e/node/*.sh e2e/dataplane/*.sh alerts/*.sh charts/tests/*.sh sidecar/fuzz/*.sh \
	  .ci/run images/*.sh images/mta/start
	$(CARGO) clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings

## deny: dependency policy (deny.toml): banned crates, licenses, sources; cargo-deny pinned, installed once.
deny:
	e2e/cargo-deny.sh check bans licenses sources

unit:
	$(CARGO) test $(CARGO_FLAGS)

## fuzz: every fuzz target of sidecar/fuzz for FUZZ_SECONDS each (default 600), coverage-guided on the stable
## toolchain, starting from the committed seeds (sidecar/fuzz/seeds/TARGET). New inputs go to the git-ignored
## sidecar/fuzz/corpus/TARGET, a crash to sidecar/fuzz/artifacts/TARGET and fails the run. Builds in
## $(TARGET_DIR)/fuzz (instrumented: never shared with the main build).
FUZZ_TARGETS := $(basename $(notdir $(wildcard sidecar/fuzz/fuzz_targets/*.rs)))
fuzz: FUZZ_SECONDS ?= 600
fuzz:
	for target in $(FUZZ_TARGETS); do CARGO_TARGET_DIR=$(TARGET_DIR) sidecar/fuzz/run-stable.sh $$target $(FUZZ_SECONDS); done

## fuzz-smoke: the same for FUZZ_SMOKE_SECONDS each (default 20): the seeds still pass and a short run finds no crash.
fuzz-smoke: FUZZ_SMOKE_SECONDS ?= 20
fuzz-smoke:
	for target in $(FUZZ_TARGETS); do CARGO_TARGET_DIR=$(TARGET_DIR) sidecar/fuzz/run-stable.sh $$target $(FUZZ_SMOKE_SECONDS); done

## crds: regenerate the committed CRD from the Rust types.
crds:
	$(CARGO) run $(CARGO_FLAGS) -q -p securemail-operator --bin crdgen > $(CRD_FILE)

## check-crds: fail when the committed CRD differs from what the code generates.
check-crds:
	@$(CARGO) run $(CARGO_FLAGS) -q -p securemail-operator --bin crdgen > $(TARGET_DIR)/crd.generated.yaml
	@diff -u $(CRD_FILE) $(TARGET_DIR)/crd.generated.yaml || { echo "$(CRD_FILE) is stale: run 'make crds' and commit it" >&2; exit 1; }

## check-alerts: promtool check and unit tests of the alert pack (alerts/); promtool built once, pinned, from Go.
check-alerts:
	alerts/check.sh

## check-chart: what the chart ships that needs no cluster: every dashboard query uses documented metrics and parses
## (promtool), and the Argo CD health check gives the expected health for each fixture (Lua 5.4). The chart itself is
## tested against the control plane in e2e (charts/tests/chart.sh).
check-chart:
	PROMTOOL=$$(alerts/check.sh promtool-path) python3 charts/tests/check-dashboard.py
	charts/tests/argocd-health.sh

## images: the operator, sidecar and mta images as OCI archives in target/images, each with an SPDX SBOM attached
## (images/build.sh, docs/images.md). Prints reference, digest and sizes; an image whose inputs did not change is not
## rebuilt. Needs root.
images:
	images/install-deps.sh build
	images/build.sh $(TARGET_DIR)/images

## check-images: two builds of this commit give byte-identical images (REBUILD_BINARIES=1: the binaries too, from
## scratch), and the references the images are built under are the chart's and the operator's defaults.
check-images: deps
	images/install-deps.sh build
	images/check.sh

## check-image-containers: run the built images with a containerd and runc of their own (images/containers.sh): the
## operator and sidecar as their non-root user on a read-only root; the mta refusing a missing or malformed main.cf or
## master.cf, starting Postfix from the operator's rendered files with the StatefulSet's capabilities, keeping a queued
## message across SIGTERM and delivering it once after a restart; the operator image against a control plane of its
## own (ports 33791, 36443, 38080): ready, takes the Lease, reconciles a tenant.
check-image-containers: deps images
	images/install-deps.sh run
	images/containers.sh $(TARGET_DIR)/images

cluster-up:
	e2e/cluster-up.sh

cluster-down:
	e2e/cluster-down.sh

## node-up: the control plane plus a node (containerd, kubelet, scheduler, controller-manager, kube-proxy) that runs
## pods from locally imported images; the apiserver then listens on the node's address. One node per machine.
node-up:
	SECUREMAIL_NODE=1 e2e/cluster-up.sh

## node-down: stop the control plane and the node, and remove everything the node added to the machine.
node-down:
	e2e/cluster-down.sh

## node-smoke: prove the running node: pods start, get addresses, logs/exec work, Services route through kube-proxy.
node-smoke:
	e2e/node-smoke.sh

## e2e: start a control plane, test the Helm chart against it (lint, every toggle, dry runs, install, RBAC matrix,
## uninstall), run the suites with the operator as the chart's ServiceAccount, then the control-plane fault suite (it
## kills and restarts the apiserver and etcd), stop the control plane. Then, on a fresh control plane, the operator
## suite once more with the operator's clock CLOCK_AHEAD_DAYS ahead: nothing may hold only on the day the examples
## were written (fresh, because the suite's last cases install third-party CRDs, and the Lease it leaves is renewed on
## the later clock). The suites run the operator on a set clock, noon UTC of the day (e2e/src/clock.rs). 60 days: past
## every example's warmup schedule and across a month and a year end, yet short of the examples' shortest DKIM
## rotation period (90 days), because a key's age comes from its Secret's creation time, which the apiserver stamps
## with the real clock.
e2e: CLOCK_AHEAD_DAYS ?= 60
e2e: deps
	$(CARGO) build $(CARGO_FLAGS) -p securemail-operator --bin securemail-operator
	e2e/cluster-up.sh >/dev/null
	status=0; KUBECONFIG=$(KUBECONFIG_FILE) charts/tests/chart.sh || status=$$?; [ $$status -eq 0 ] && \
	  KUBECONFIG=$(KUBECONFIG_FILE) SECUREMAIL_OPERATOR_BIN=$(TARGET_DIR)/debug/securemail-operator \
	  $(CARGO) test $(CARGO_FLAGS) -p securemail-e2e --test control_plane --test operator --test operator_namespaces --test operator_crash --test rendered_objects \
	  || status=$$?; [ $$status -eq 0 ] && \
	  KUBECONFIG=$(KUBECONFIG_FILE) SECUREMAIL_OPERATOR_BIN=$(TARGET_DIR)/debug/securemail-operator \
	  $(CARGO) test $(CARGO_FLAGS) -p securemail-e2e --test control_plane_faults || status=$$?; \
	  e2e/cluster-down.sh; exit $$status
	e2e/cluster-up.sh >/dev/null
	status=0; KUBECONFIG=$(KUBECONFIG_FILE) SECUREMAIL_OPERATOR_BIN=$(TARGET_DIR)/debug/securemail-operator \
	  SECUREMAIL_CLOCK_DAYS_AHEAD=$(CLOCK_AHEAD_DAYS) $(CARGO) test $(CARGO_FLAGS) -p securemail-e2e --test operator \
	  || status=$$?; e2e/cluster-down.sh; exit $$status

## e2e-node: the images (make images), the data-plane world linked to this machine as the node's Internet
## (e2e/dataplane/host-link.sh), a control plane with a node (make node-up), SecureMail installed on it as a platform
## team installs it (e2e/node-install.sh: images imported into the node's containerd, helm install, the sidecars
## resolving through the world), then the node suites: the operator as two pods with one leader, example tenants
## unready until their pods get their addresses, then Ready from their running MTA pods (node.rs); a tenant sending
## through the world's SOCKS5 egress host, each pod from its own address (node_egress.rs); queued mail kept through a
## deleted pod, killed containers and a shrinking pool, then delivered once (node_queue.rs).
## Monitoring as shipped (node_monitoring.rs): the chart's monitors and alert pack consumed by a Prometheus Operator
## and the Prometheus it manages (e2e/node-monitoring.sh, built before the lock is taken); every target up under the
## jobs the rules read, every alert loaded and quiet, the "down" alerts active while the operator or a sidecar is gone.
## DNS as a cluster has it (node_dns.rs): the sidecars ask cluster DNS, whose upstream validates, does not validate,
## or strips DNSSEC records; DANE holds in the first two, and nothing gets a policy in the third.
e2e-node: deps images
	e2e/node-monitoring.sh build
	$(CARGO) build $(CARGO_FLAGS) -p securemail-sidecar --bin securemail-sidecar
	$(CARGO) test $(CARGO_FLAGS) --no-run -p securemail-e2e --test node --test node_egress --test node_queue \
	  --test node_monitoring --test node_dns
	flock $(DATAPLANE_LOCK) bash -c 'trap "e2e/cluster-down.sh; e2e/dataplane/down.sh $(DATAPLANE_DIR)" EXIT; \
	  e2e/dataplane/up.sh $(DATAPLANE_DIR) >/dev/null && e2e/dataplane/host-link.sh up $(DATAPLANE_DIR) && \
	  SECUREMAIL_NODE=1 e2e/cluster-up.sh >/dev/null && SECUREMAIL_DATAPLANE_DIR=$(DATAPLANE_DIR) \
	  SECUREMAIL_EXTRA_TENANT_NAMESPACES=tenant-egress e2e/node-install.sh $(TARGET_DIR)/images && \
	  KUBECONFIG=$(KUBECONFIG_FILE) SECUREMAIL_DATAPLANE_DIR=$(DATAPLANE_DIR) \
	  SECUREMAIL_SIDECAR_BIN=$(TARGET_DIR)/debug/securemail-sidecar \
	  $(CARGO) test $(CARGO_FLAGS) -p securemail-e2e --test node --test node_egress --test node_queue \
	  --test node_monitoring --test node_dns'

## e2e-dataplane: start the data-plane world (DNSSEC zones, validating resolver, MTA-STS server, receiving MX hosts
## in network namespaces), check it without the sidecar, run the sidecar suites in it, stop it again.
e2e-dataplane: deps
	$(CARGO) build $(CARGO_FLAGS) -p securemail-operator --bin securemail-operator -p securemail-sidecar \
	  --bin securemail-sidecar
	$(CARGO) test $(CARGO_FLAGS) --no-run -p securemail-e2e --test dataplane --test dataplane_headers --test socketmap
	# One world per machine (fixed namespace names): the lock serialises suites and benchmarks that need it.
	flock $(DATAPLANE_LOCK) bash -c 'e2e/dataplane/up.sh $(DATAPLANE_DIR) >/dev/null || exit 1; status=0; \
	  e2e/dataplane/smoke.sh $(DATAPLANE_DIR) && SECUREMAIL_DATAPLANE_DIR=$(DATAPLANE_DIR) \
	  SECUREMAIL_OPERATOR_BIN=$(TARGET_DIR)/debug/securemail-operator \
	  SECUREMAIL_SIDECAR_BIN=$(TARGET_DIR)/debug/securemail-sidecar \
	  $(CARGO) test $(CARGO_FLAGS) -p securemail-e2e --test dataplane --test dataplane_headers --test socketmap -- --test-threads=1 \
	  || status=$$?; e2e/dataplane/down.sh $(DATAPLANE_DIR); exit $$status'

## e2e-faults: fault injection in a data-plane world of its own (e2e/tests/faults.rs): FAULT_MESSAGES submitted while
## FAULT_KILLS kill -9 of the sidecar and of Postfix land at random moments, then lost = 0 asserted and duplicates
## printed; the validating resolver, the MTA-STS host and a receiver (4xx) down for FAULT_OUTAGE_SECS each; the
## sidecar's state volume full. FAULT_SEED=... repeats a run's kill schedule.
e2e-faults: FAULT_MESSAGES ?= 10000
e2e-faults: FAULT_KILLS ?= 100
e2e-faults: FAULT_OUTAGE_SECS ?= 180
e2e-faults: deps
	$(CARGO) build $(CARGO_FLAGS) -p securemail-operator --bin securemail-operator -p securemail-sidecar \
	  --bin securemail-sidecar
	$(CARGO) test $(CARGO_FLAGS) --no-run -p securemail-e2e --test faults
	flock $(DATAPLANE_LOCK) bash -c 'e2e/dataplane/up.sh $(DATAPLANE_DIR) >/dev/null || exit 1; status=0; \
	  SECUREMAIL_DATAPLANE_DIR=$(DATAPLANE_DIR) SECUREMAIL_OPERATOR_BIN=$(TARGET_DIR)/debug/securemail-operator \
	  SECUREMAIL_SIDECAR_BIN=$(TARGET_DIR)/debug/securemail-sidecar SECUREMAIL_FAULT_MESSAGES=$(FAULT_MESSAGES) \
	  SECUREMAIL_FAULT_KILLS=$(FAULT_KILLS) SECUREMAIL_FAULT_OUTAGE_SECS=$(FAULT_OUTAGE_SECS) $(if $(FAULT_SEED), \
	  SECUREMAIL_FAULT_SEED=$(FAULT_SEED)) $(CARGO) test $(CARGO_FLAGS) -p securemail-e2e --test faults -- \
	  --test-threads=1 --nocapture || status=$$?; e2e/dataplane/down.sh $(DATAPLANE_DIR); exit $$status'

## e2e-faults-ci: the same at the size make test runs (1000 messages, 10 kills, 20 s outages).
e2e-faults-ci:
	$(MAKE) e2e-faults FAULT_MESSAGES=1000 FAULT_KILLS=10 FAULT_OUTAGE_SECS=20

## e2e-load: LOAD_MESSAGES (default 100000) messages of 10 KB through Postfix → sidecar → the world's receivers
## (e2e/tests/load.rs), in a data-plane world of its own: every provider class, DANE, MTA-STS and tenant-policy
## domains, a smart receiver greylisting 10 % (450, accepted on retry) and refusing 2 % (550 5.1.1, DSN to the
## sender); asserts lost = 0 and prints throughput, latency, sidecar CPU per message and peak RSS. Release builds
## (LOAD_PROFILE=debug uses the debug ones).
e2e-load: LOAD_MESSAGES ?= 100000
e2e-load: LOAD_PROFILE ?= release
e2e-load: deps
	$(CARGO) build $(CARGO_FLAGS) $(if $(filter release,$(LOAD_PROFILE)),--release) -p securemail-operator \
	  --bin securemail-operator -p securemail-sidecar --bin securemail-sidecar
	$(CARGO) test $(CARGO_FLAGS) --no-run -p securemail-e2e --test load
	flock $(DATAPLANE_LOCK) bash -c 'e2e/dataplane/up.sh $(DATAPLANE_DIR) >/dev/null || exit 1; status=0; \
	  SECUREMAIL_DATAPLANE_DIR=$(DATAPLANE_DIR) SECUREMAIL_OPERATOR_BIN=$(TARGET_DIR)/$(LOAD_PROFILE)/securemail-operator \
	  SECUREMAIL_SIDECAR_BIN=$(TARGET_DIR)/$(LOAD_PROFILE)/securemail-sidecar SECUREMAIL_LOAD_MESSAGES=$(LOAD_MESSAGES) \
	  $(CARGO) test $(CARGO_FLAGS) -p securemail-e2e --test load -- --nocapture || status=$$?; \
	  e2e/dataplane/down.sh $(DATAPLANE_DIR); exit $$status'

## e2e-load-ci: the same at the size make test runs (2000 messages, the debug builds the other suites use).
e2e-load-ci:
	$(MAKE) e2e-load LOAD_MESSAGES=2000 LOAD_PROFILE=debug

## dataplane-up / dataplane-down: the data-plane world alone, for poking at it by hand (see e2e/dataplane/README.md).
dataplane-up: deps
	e2e/dataplane/up.sh $(DATAPLANE_DIR)

dataplane-down:
	e2e/dataplane/down.sh $(DATAPLANE_DIR)

## demo: the main job end to end on a local Kubernetes with a node, from the images, ending with one message sent
## to a receiver in the data-plane world (both left running; stop them with `make cluster-down` and
## `make dataplane-down`).
demo: deps images
	e2e/demo.sh

## bench-operator: N tenants to DkimReady+ConfigValid vs the RSA keygen floor, the operator's CPU above it per tenant,
## peak RSS (per tenant), a restart's relist and no-op pass and its writes (N=1000);
## the control plane on a core of its own unless BENCH_SHARED_CORES=1.
bench-operator: N ?= 1000
bench-operator: deps
	e2e/bench-operator.sh $(N)

## bench-node: on the node, kubectl apply of a one-address tenant to Ready vs a bare pod's start plus one RSA key, the
## idle MTA pod's memory and the node's own cost (RUNS=3); leaves the cluster running (make cluster-down).
bench-node: RUNS ?= 3
bench-node: deps images
	e2e/bench-node.sh $(RUNS)

## bench-sidecar: Postfix → sidecar → TLS 1.3 receiver vs Postfix direct with TLS, in a data-plane world of its own
## (holds /tmp/securemail-dataplane.lock while it runs): messages/s, latency, sidecar CPU and RSS, policy cache.
## N=... overrides the message count (default 2000).
bench-sidecar: N ?= 2000
bench-sidecar: deps
	e2e/bench-sidecar.sh $(N)

## bench-policy: TLS policy lookups over Postfix's socketmap protocol, the sidecar's `policy-socketmap` vs
## postfix-mta-sts-resolver (PyPI, pinned, venv cached in ~/.cache/securemail), in a data-plane world of its own
## (holds /tmp/securemail-dataplane.lock while it runs): answers compared, first and warm lookups, lookups/s, p50/p99.
## N=... overrides the warm lookup count (default 20000).
bench-policy: N ?= 20000
bench-policy: deps
	e2e/bench-policy.sh $(N)
