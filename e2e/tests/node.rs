//! On the test node (`make e2e-node`): SecureMail installed as a platform team installs it. The operator runs as the
//! chart's two pods with one leader, and example tenants' MTA pods, from the images `make images` built, are scheduled
//! on a volume from the node's StorageClass, pass their probes and make their tenants Ready from the StatefulSet
//! status the real controller-manager writes, and every pod meets the Pod Security level its namespace enforces
//! (`restricted` for the operator, `baseline` for tenants) without an audited violation. A tenant deleted with
//! `deletionPolicy: Drain` drains its pod and the garbage collector removes its children; with `Orphan` they run on.
//!
//! `e2e/node-install.sh` (images imported, `helm upgrade --install`) runs before this suite.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_e2e::dataplane::output_with_input;
use securemail_e2e::node::{
    TENANT_READY, containers, give_pods_their_addresses, logs, mta_pods, pod_ready, wait_for_conditions, wait_ready,
};
use securemail_e2e::tenants::condition;
use securemail_e2e::{audit_log, client, kubeconfig, kubectl, kubectl_ok, repo_root};

const OPERATOR_NAMESPACE: &str = "securemail-system";

/// Examples whose prerequisites the node has: a default StorageClass and Secrets `apply-examples.sh` creates.
const EXAMPLES: [(&str, &str, &str); 2] = [
    ("minimal.yaml", "tenant-lakeside", "lakeside-clinic"),
    ("strict-tls-overrides.yaml", "tenant-riverside", "riverside-pharmacy"),
];

#[tokio::test]
async fn the_operator_runs_as_two_pods_with_one_leader() {
    let client = client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let operators = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=securemail-operator"))
        .await
        .unwrap_or_else(|err| panic!("operator pods: {err}"));
    let names: Vec<String> = operators.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names.len(), 2, "the chart's two operator replicas, found {names:?}");
    for pod in &operators {
        assert!(pod_ready(pod), "operator pod {} is not Ready", pod.name_any());
        for (name, image, _, restarts) in containers(pod) {
            assert!(
                image.starts_with("ghcr.io/securemail/operator:"),
                "{}/{name} runs {image}, not the operator image",
                pod.name_any()
            );
            assert_eq!(restarts, 0, "{}/{name} restarted", pod.name_any());
        }
    }

    let leases: Api<Lease> = Api::namespaced(client, OPERATOR_NAMESPACE);
    let holder = leases
        .get("securemail-operator")
        .await
        .unwrap_or_else(|err| panic!("the operator's Lease: {err}"))
        .spec
        .and_then(|spec| spec.holder_identity)
        .unwrap_or_default();
    assert!(
        names.contains(&holder),
        "the Lease is held by {holder:?}, not by one of {names:?}"
    );
    for name in &names {
        let log = logs(OPERATOR_NAMESPACE, name, "operator");
        let leads = log.contains("acquired the leader lease");
        assert_eq!(
            leads,
            *name == holder,
            "{name} {} the Lease in its log, while {holder} holds it",
            if leads { "took" } else { "did not take" }
        );
        if !leads {
            assert!(
                log.contains("waiting for the leader lease"),
                "the standby {name} does not wait for the Lease"
            );
        }
    }
}

/// The MTA pods of a tenant's StatefulSet.
/// Applies [`EXAMPLES`] with the Secrets they name (`apply-examples.sh`), once per test process: the cases that need
/// them run side by side.
fn apply_examples() {
    static APPLIED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    APPLIED.get_or_init(|| {
        let script = repo_root().join("e2e/apply-examples.sh");
        let output = std::process::Command::new(&script)
            .args(
                EXAMPLES
                    .iter()
                    .map(|(file, _, _)| repo_root().join("examples").join(file)),
            )
            .env("KUBECONFIG", kubeconfig())
            .output()
            .unwrap_or_else(|err| panic!("{}: {err}", script.display()));
        assert!(
            output.status.success(),
            "apply-examples.sh: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
}

#[tokio::test]
async fn example_tenants_become_ready_from_their_running_mta_pods() {
    let client = client().await;
    apply_examples();

    for (_, namespace, name) in EXAMPLES {
        let tenants: Api<SecureMailTenant> = Api::namespaced(client.clone(), namespace);
        // The examples send from documentation addresses (egress mode None) that no pod on this node has: each
        // sidecar finds it cannot send, stays unready, and the tenant names the pod and the address.
        let tenant = wait_for_conditions(
            &tenants,
            namespace,
            name,
            &[("EgressReady", "False"), ("Ready", "False")],
        )
        .await;
        let (_, reason, message) = condition(&tenant, "EgressReady").expect("EgressReady");
        assert_eq!(reason, "CannotSendFromAddress", "{namespace}/{name}: {message}");
        for (ordinal, pool) in tenant.spec.ip_pool.addresses.iter().enumerate() {
            let expected = format!(
                "pod {name}-mta-{ordinal} cannot send from {}: the address is not assigned to any interface of this \
                 pod",
                pool.address
            );
            assert!(message.contains(&expected), "{namespace}/{name}: {message}");
        }
        let (_, ready_reason, _) = condition(&tenant, "Ready").expect("Ready");
        assert_eq!(ready_reason, "CannotSendFromAddress", "{namespace}/{name}");
        let events = kubectl_ok(&[
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            "reason=CannotSendFromAddress",
            "-o",
            "name",
        ]);
        assert!(
            !events.trim().is_empty(),
            "{namespace}/{name}: no CannotSendFromAddress event"
        );

        // The platform's part of mode None: the address on its pod. The sidecar's next check passes.
        give_pods_their_addresses(&client, &tenants, namespace, name).await;
        let tenant = wait_ready(&tenants, namespace, name).await;
        let (status, _, _) = condition(&tenant, "EgressReady").expect("EgressReady");
        assert_eq!(status, "True", "{namespace}/{name}");

        // The status the operator read is the controller-manager's, for pods that really run.
        let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
        let statefulset = statefulsets
            .get(&format!("{name}-mta"))
            .await
            .unwrap_or_else(|err| panic!("StatefulSet of {namespace}/{name}: {err}"));
        let replicas = statefulset.spec.as_ref().and_then(|spec| spec.replicas).unwrap_or(1);
        let status = statefulset.status.unwrap_or_default();
        assert_eq!(
            status.ready_replicas,
            Some(replicas),
            "{namespace}/{name}: StatefulSet status {status:?}"
        );
        let addresses = tenant.spec.ip_pool.addresses.len();
        assert_eq!(
            usize::try_from(replicas).ok(),
            Some(addresses),
            "one MTA pod per pool address"
        );

        let pods = mta_pods(&client, namespace, name).await;
        assert_eq!(pods.len(), addresses, "{namespace}/{name}: MTA pods");
        for pod in &pods {
            let pod_name = pod.name_any();
            assert!(pod_ready(pod), "{namespace}/{pod_name} is not Ready");
            let mut images: Vec<(String, String)> = Vec::new();
            for (container, image, ready, restarts) in containers(pod) {
                assert!(ready, "{namespace}/{pod_name}/{container} is not ready");
                assert_eq!(restarts, 0, "{namespace}/{pod_name}/{container} restarted");
                images.push((container, image));
            }
            images.sort();
            let expected = [
                ("postfix", "ghcr.io/securemail/mta-postfix:"),
                ("sidecar", "ghcr.io/securemail/sidecar:"),
            ];
            assert!(
                images.len() == 2
                    && images
                        .iter()
                        .zip(expected)
                        .all(|((container, image), (want_container, want_image))| {
                            container == want_container && image.starts_with(want_image)
                        }),
                "{namespace}/{pod_name} runs {images:?}"
            );
            // Postfix came up from the operator's configuration, with the sidecar as its only transport.
            let postfix = logs(namespace, &pod_name, "postfix");
            assert!(
                postfix.contains("daemon started"),
                "{namespace}/{pod_name}: Postfix did not start:\n{postfix}"
            );
            // The probes (securemail-mta-ready) open no connection, so nothing but mail is in Postfix's log.
            assert!(
                !postfix.contains("lost connection after CONNECT"),
                "{namespace}/{pod_name}: a probe connects to Postfix:\n{postfix}"
            );
        }

        // The queue lives on a volume the node's StorageClass provisioned for this pod.
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
        for index in 0..addresses {
            let claim_name = format!("data-{name}-mta-{index}");
            let claim = claims
                .get(&claim_name)
                .await
                .unwrap_or_else(|err| panic!("{namespace}/{claim_name}: {err}"));
            let phase = claim.status.and_then(|status| status.phase).unwrap_or_default();
            assert_eq!(phase, "Bound", "{namespace}/{claim_name}");
            let class = claim.spec.and_then(|spec| spec.storage_class_name).unwrap_or_default();
            assert_eq!(
                class, "local-path",
                "{namespace}/{claim_name}: the default StorageClass"
            );
        }
        println!("{namespace}/{name}: Ready with {addresses} MTA pod(s) on the node");
    }
    let mut namespaces: Vec<&str> = EXAMPLES.iter().map(|(_, namespace, _)| *namespace).collect();
    namespaces.push(OPERATOR_NAMESPACE);
    assert_pod_security_clean(&namespaces);
}

/// Every pod and pod template written in `namespaces` met the Pod Security level the namespace audits
/// (node-install.sh labels them: `restricted` for the operator, `baseline` for tenants): the apiserver's audit log
/// holds writes of pods and workloads there, none with a violation. Enforcement alone would show only pods refused;
/// this also catches a StatefulSet template that would be.
fn assert_pod_security_clean(namespaces: &[&str]) {
    for namespace in namespaces {
        let labels = kubectl_ok(&["get", "namespace", namespace, "-o", "jsonpath={.metadata.labels}"]);
        assert!(
            labels.contains("\"pod-security.kubernetes.io/audit\""),
            "{namespace} has no Pod Security audit level: {labels}"
        );
    }
    let log = std::fs::read_to_string(audit_log()).unwrap_or_else(|err| panic!("{}: {err}", audit_log().display()));
    let mut checked = 0;
    for event in log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
    {
        let namespace = event
            .pointer("/objectRef/namespace")
            .and_then(|value| value.as_str())
            .unwrap_or_default();
        let resource = event
            .pointer("/objectRef/resource")
            .and_then(|value| value.as_str())
            .unwrap_or_default();
        if !namespaces.contains(&namespace)
            || !["pods", "deployments", "statefulsets", "replicasets"].contains(&resource)
        {
            continue;
        }
        checked += 1;
        let violations = event.pointer("/annotations/pod-security.kubernetes.io~1audit-violations");
        assert!(
            violations.is_none(),
            "a {resource} write in {namespace} violates its Pod Security level: {violations:?}"
        );
    }
    assert!(
        checked > 0,
        "no pod or workload write in {namespaces:?} in the audit log"
    );
}

/// A one-address tenant of its own in the examples' first namespace (the chart manages only those), named `name`,
/// with `deletion_policy`: the minimal example with its own name, domain and address.
fn own_tenant(name: &str, address: &str, deletion_policy: &str) -> String {
    let example = std::fs::read_to_string(repo_root().join("examples/minimal.yaml"))
        .unwrap_or_else(|err| panic!("examples/minimal.yaml: {err}"));
    example
        .replace("  name: lakeside-clinic", &format!("  name: {name}"))
        .replace(
            "notify.lakeside-clinic.example",
            &format!("{name}.lakeside-clinic.example"),
        )
        .replace("192.0.2.10", address)
        .replace("spec:\n", &format!("spec:\n  deletionPolicy: {deletion_policy}\n"))
}

/// `kubectl apply` of tenant `name`'s manifest, as a platform team applies it.
fn apply_tenant(name: &str, manifest: &str) {
    let applied = output_with_input(
        std::process::Command::new("kubectl").args(["--kubeconfig", &kubeconfig(), "apply", "-f", "-"]),
        manifest.as_bytes(),
    );
    assert!(
        applied.status.success(),
        "kubectl apply of tenant {name}: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
}

/// Names of the objects of `kind` in `namespace` that belong to tenant `name` (by its label).
fn children(kind: &str, namespace: &str, name: &str) -> Vec<String> {
    kubectl_ok(&[
        "get",
        kind,
        "-n",
        namespace,
        "-l",
        &format!("securemail.io/tenant={name}"),
        "-o",
        "name",
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

#[tokio::test]
async fn a_deleted_tenant_drains_and_its_children_go_while_an_orphaned_one_keeps_running() {
    let client = client().await;
    let namespace = EXAMPLES[0].1;
    let tenants: Api<SecureMailTenant> = Api::namespaced(client.clone(), namespace);
    // The examples' Secrets (apply-examples.sh) are what these tenants name too.
    apply_examples();
    for (name, address, policy) in [
        ("drained", "192.0.2.231", "Drain"),
        ("orphaned", "192.0.2.232", "Orphan"),
    ] {
        apply_tenant(name, &own_tenant(name, address, policy));
        give_pods_their_addresses(&client, &tenants, namespace, name).await;
        wait_ready(&tenants, namespace, name).await;
    }

    // Drain: the finalizer stays until the pod's queue read empty twice; then the operator marks the volume as
    // delivery evidence and the garbage collector (the real controller-manager) deletes the StatefulSet, its pod and
    // the other children.
    kubectl_ok(&["delete", "smt", "-n", namespace, "drained", "--wait=false"]);
    let deadline = Instant::now() + TENANT_READY;
    let kinds = "statefulsets,pods,services,configmaps,secrets";
    while tenants.get_opt("drained").await.ok().flatten().is_some() || !children(kinds, namespace, "drained").is_empty()
    {
        let claim = kubectl(&["get", "pvc", "-n", namespace, "data-drained-mta-0", "-o", "name"]);
        assert!(
            Instant::now() < deadline,
            "{namespace}/drained not gone with its children after {TENANT_READY:?}: left {:?}, claim {}",
            children(kinds, namespace, "drained"),
            String::from_utf8_lossy(&claim.stdout)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The volume stays, with its evidence, until the tenant's retention (the default six years) has passed.
    let marks = kubectl_ok(&[
        "get",
        "pvc",
        "-n",
        namespace,
        "data-drained-mta-0",
        "-o",
        "jsonpath={.metadata.labels.securemail\\.io/evidence-retained} \
         {.metadata.annotations.securemail\\.io/evidence-retain-until} \
         {.metadata.annotations.securemail\\.io/evidence-retained-from}",
    ]);
    let mut marks = marks.split_whitespace();
    assert_eq!(
        marks.next(),
        Some("true"),
        "the drained volume is not marked as evidence"
    );
    let until: jiff::Timestamp = marks
        .next()
        .and_then(|until| until.parse().ok())
        .expect("a retention date on the drained volume");
    let years = until.duration_since(jiff::Timestamp::now()).as_hours() / 24 / 365;
    assert_eq!(years, 5, "retained until {until}: six years (2190 days) from now");
    let from = marks.collect::<Vec<_>>().join(" ");
    assert!(
        from.contains("pod drained-mta-0 (address 192.0.2.231): tenant deleted"),
        "{from}"
    );
    // What a platform team does once it has archived the evidence elsewhere.
    kubectl_ok(&["delete", "pvc", "-n", namespace, "data-drained-mta-0", "--wait=false"]);

    // Orphan: the tenant goes at once, its StatefulSet keeps running its pod on its volume, owned by nobody.
    kubectl_ok(&[
        "delete",
        "smt",
        "-n",
        namespace,
        "orphaned",
        "--wait=true",
        "--timeout=60s",
    ]);
    let owners = kubectl_ok(&[
        "get",
        "statefulset",
        "-n",
        namespace,
        "orphaned-mta",
        "-o",
        "jsonpath={.metadata.ownerReferences}",
    ]);
    assert!(
        owners.trim().is_empty(),
        "the orphaned StatefulSet still has owners: {owners}"
    );
    let pods = mta_pods(&client, namespace, "orphaned").await;
    assert!(
        pods.len() == 1 && pods.iter().all(pod_ready),
        "the orphaned tenant's MTA pod no longer runs: {:?}",
        pods.iter().map(ResourceExt::name_any).collect::<Vec<_>>()
    );
    kubectl_ok(&["get", "pvc", "-n", namespace, "data-orphaned-mta-0"]);
    // What a platform team does with orphans once it has taken the mail elsewhere.
    for kind in [
        "statefulsets",
        "services",
        "configmaps",
        "secrets",
        "poddisruptionbudgets",
        "networkpolicies",
    ] {
        kubectl_ok(&[
            "delete",
            kind,
            "-n",
            namespace,
            "-l",
            "securemail.io/tenant=orphaned",
            "--wait=false",
        ]);
    }
}

#[tokio::test]
async fn a_tenant_whose_pod_the_scheduler_cannot_place_says_why() {
    let client = client().await;
    let namespace = EXAMPLES[0].1;
    let name = "unplaceable";
    let tenants: Api<SecureMailTenant> = Api::namespaced(client.clone(), namespace);
    apply_examples();
    // Placement on nodes labelled for mail egress, which this node is not.
    let manifest = own_tenant(name, "192.0.2.233", "Drain").replace(
        "spec:\n",
        "spec:\n  mta:\n    nodeSelector: {node-role.example.org/mail-egress: \"true\"}\n",
    );
    apply_tenant(name, &manifest);
    // The real scheduler's verdict, read from the pod's status, names the pod and the cause.
    let mut tenant = wait_for_conditions(&tenants, namespace, name, &[("MtaAvailable", "False")]).await;
    let deadline = Instant::now() + TENANT_READY;
    while condition(&tenant, "MtaAvailable").is_none_or(|(_, reason, _)| reason != "Unschedulable") {
        assert!(
            Instant::now() < deadline,
            "{name}: MtaAvailable {:?}",
            condition(&tenant, "MtaAvailable")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        tenant = tenants.get(name).await.expect("tenant");
    }
    let (_, _, message) = condition(&tenant, "MtaAvailable").expect("MtaAvailable");
    assert!(
        message.contains(&format!("{name}-mta-0")) && message.contains("node affinity/selector"),
        "the condition names the pod and the scheduler's reason: {message}"
    );
    let (ready, ready_reason, _) = condition(&tenant, "Ready").expect("Ready");
    assert_eq!((ready.as_str(), ready_reason.as_str()), ("False", "Unschedulable"));
    let events = kubectl_ok(&[
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        &format!("reason=Unschedulable,involvedObject.name={name}"),
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(
        events.contains(&format!("{name}-mta-0")),
        "an event names the pod: {events}"
    );
    println!("{name}: {message}");
    // Nothing ran, so nothing waits: the tenant goes at once, and its claim, never bound, holds no evidence to keep.
    kubectl_ok(&["delete", "smt", "-n", namespace, name, "--timeout=120s"]);
    let claim = kubectl_ok(&[
        "get",
        "pvc",
        "-n",
        namespace,
        "--ignore-not-found",
        &format!("data-{name}-mta-0"),
        "-o",
        "jsonpath={.metadata.deletionTimestamp}{.metadata.labels.securemail\\.io/evidence-retained}",
    ]);
    assert!(
        !claim.contains("true"),
        "the never-bound claim of {name} is kept as evidence: {claim}"
    );
}
