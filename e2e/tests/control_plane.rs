//! The SecureMailTenant API against a real kube-apiserver: the CRD installs, examples are accepted, invalid specs
//! are refused with messages that say what to fix, defaults agree with the Rust types, printer columns show, and
//! status is only writable through its subresource.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use securemail_api::SecureMailTenant;
use securemail_e2e::dataplane::output_with_input;
use securemail_e2e::{
    client, ensure_crd, ensure_namespace, eventually, kubeconfig, kubectl, kubectl_ok, repo_root, unique_namespace,
    yaml_files,
};
use serde_json::{Value, json};

fn read_tenant(path: &Path) -> SecureMailTenant {
    let text = std::fs::read_to_string(path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|err| panic!("{} is not a SecureMailTenant: {err}", path.display()))
}

/// The minimal example, moved into `namespace`.
fn minimal_tenant(namespace: &str) -> SecureMailTenant {
    let mut tenant = read_tenant(&securemail_e2e::repo_root().join("examples/minimal.yaml"));
    tenant.metadata.namespace = Some(namespace.to_owned());
    tenant.metadata.resource_version = None;
    tenant
}

#[test]
fn every_example_passes_server_side_dry_run() {
    ensure_crd();
    let examples = yaml_files("examples");
    assert!(
        examples.len() >= 3,
        "expected at least three examples, found {examples:?}"
    );
    for path in examples {
        let tenant = read_tenant(&path);
        ensure_namespace(tenant.metadata.namespace.as_deref().unwrap_or("default"));
        let out = kubectl_ok(&["apply", "--dry-run=server", "-f", &path.to_string_lossy()]);
        assert!(
            out.contains("created (server dry run)") || out.contains("configured (server dry run)"),
            "{out}"
        );
    }
}

#[test]
fn invalid_specs_are_refused_with_a_message_naming_the_fix() {
    ensure_crd();
    let cases = yaml_files("e2e/testdata/invalid");
    assert!(cases.len() >= 10, "expected the invalid set, found {cases:?}");
    let mut failures = Vec::new();
    for path in cases {
        let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let expected = text
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} must start with '# expect: <message>'", path.display()));
        let output = kubectl(&["apply", "--dry-run=server", "-f", &path.to_string_lossy()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            failures.push(format!(
                "{}: accepted, expected refusal with {expected:?}",
                path.display()
            ));
        } else if !stderr.contains(expected) {
            failures.push(format!(
                "{}: refused with {stderr:?}, expected {expected:?}",
                path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// kubectl `args` with `object` as the file (`-f -`).
fn kubectl_with(args: &[&str], object: &Value) -> Output {
    output_with_input(
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig())
            .args(args)
            .args(["-f", "-"]),
        object.to_string().as_bytes(),
    )
}

/// A tenant stored with egress mode HostNetwork before the CRD refused it keeps updating while its egress section
/// stays as it is (the apiserver ratchets a rule whose object is unchanged), and is refused once that section
/// changes. Shown on a copy of the CRD under another group: replacing the real one would race this binary's other
/// tests.
#[tokio::test]
async fn a_tenant_stored_with_host_network_updates_until_its_egress_changes() {
    let crd_text = std::fs::read_to_string(repo_root().join("crds/securemailtenants.securemail.io.yaml"))
        .unwrap_or_else(|err| panic!("the CRD: {err}"));
    let mut refusing: Value = serde_yaml::from_str(&crd_text).unwrap_or_else(|err| panic!("the CRD: {err}"));
    let crd_name = "ratchetedtenants.ratchet.securemail.io";
    refusing["metadata"] = json!({"name": crd_name});
    refusing["spec"]["group"] = json!("ratchet.securemail.io");
    refusing["spec"]["names"] = json!({
        "kind": "RatchetedTenant", "listKind": "RatchetedTenantList",
        "plural": "ratchetedtenants", "singular": "ratchetedtenant",
    });
    let mut accepting = refusing.clone();
    let egress_rules = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/ipPool/properties/egress\
                        /x-kubernetes-validations";
    let rules = accepting
        .pointer_mut(egress_rules)
        .and_then(Value::as_array_mut)
        .unwrap_or_else(|| panic!("the CRD has no rules at {egress_rules}"));
    let before = rules.len();
    rules.retain(|rule| !rule["rule"].as_str().unwrap_or_default().contains("HostNetwork"));
    assert_eq!(
        rules.len() + 1,
        before,
        "one rule on spec.ipPool.egress refuses HostNetwork"
    );

    let fixture_path = repo_root().join("e2e/testdata/invalid/host-network-egress.yaml");
    let fixture = std::fs::read_to_string(&fixture_path).unwrap_or_else(|err| panic!("the fixture: {err}"));
    let refusal = fixture
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("# expect: "))
        .unwrap_or_else(|| panic!("{} names no refusal", fixture_path.display()));
    let namespace = unique_namespace("ratchet");
    let mut tenant: Value = serde_yaml::from_str(&fixture).unwrap_or_else(|err| panic!("the fixture: {err}"));
    tenant["apiVersion"] = json!("ratchet.securemail.io/v1alpha1");
    tenant["kind"] = json!("RatchetedTenant");
    tenant["metadata"] = json!({"name": "stored", "namespace": namespace});

    let apply_crd = ["apply", "--server-side", "--force-conflicts"];
    let output = kubectl_with(&apply_crd, &accepting);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        &format!("crd/{crd_name}"),
    ]);
    eventually(
        "the CRD without the rule to store the tenant",
        Duration::from_secs(30),
        || async { kubectl_with(&["create"], &tenant).status.success().then_some(()) },
    )
    .await;

    let output = kubectl_with(&apply_crd, &refusing);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut another = tenant.clone();
    another["metadata"]["name"] = json!("new");
    eventually(
        "the rule to refuse a new HostNetwork tenant",
        Duration::from_secs(30),
        || async {
            let output = kubectl_with(&["create", "--dry-run=server"], &another);
            String::from_utf8_lossy(&output.stderr).contains(refusal).then_some(())
        },
    )
    .await;

    let patch = |spec: Value| {
        kubectl(&[
            "patch",
            "ratchetedtenant",
            "stored",
            "-n",
            &namespace,
            "--type",
            "merge",
            "-p",
            &json!({"spec": spec}).to_string(),
        ])
    };
    let paused = patch(json!({"paused": true}));
    assert!(
        paused.status.success(),
        "an update leaving the egress section alone was refused: {}",
        String::from_utf8_lossy(&paused.stderr)
    );
    let changed = patch(json!({"ipPool": {"egress": {"networkAttachment": "public-pool"}}}));
    let stderr = String::from_utf8_lossy(&changed.stderr);
    assert!(!changed.status.success() && stderr.contains(refusal), "{stderr}");
    kubectl_ok(&["delete", "crd", crd_name, "--wait=false"]);
}

#[tokio::test]
async fn apiserver_defaults_agree_with_the_rust_types() {
    ensure_crd();
    let namespace = unique_namespace("defaults");
    let api: Api<SecureMailTenant> = Api::namespaced(client().await, &namespace);
    for path in yaml_files("examples") {
        let mut local = read_tenant(&path);
        local.metadata.namespace = Some(namespace.clone());
        let created = api
            .create(&PostParams::default(), &local)
            .await
            .unwrap_or_else(|err| panic!("{} not created: {err}", path.display()));
        // Serde fills defaults on the client, the schema's defaults fill them on the server: they must agree, or
        // the operator would act on a spec the user never sees.
        assert_eq!(created.spec, local.spec, "defaults differ for {}", path.display());
    }
}

#[tokio::test]
async fn default_tls_policy_never_allows_cleartext() {
    ensure_crd();
    let namespace = unique_namespace("tls-default");
    let api: Api<SecureMailTenant> = Api::namespaced(client().await, &namespace);
    let created = api
        .create(&PostParams::default(), &minimal_tenant(&namespace))
        .await
        .unwrap_or_else(|err| panic!("minimal tenant not created: {err}"));
    let stored = serde_json::to_value(&created.spec.tls_policy).unwrap_or_default();
    assert_eq!(
        stored,
        json!({"mode": "verified", "minVersion": "1.2", "dane": true, "mtaSts": true, "onFailure": "defer"})
    );
}

#[tokio::test]
async fn status_is_only_writable_through_the_subresource() {
    ensure_crd();
    let namespace = unique_namespace("status");
    let api: Api<SecureMailTenant> = Api::namespaced(client().await, &namespace);
    let created = api
        .create(&PostParams::default(), &minimal_tenant(&namespace))
        .await
        .unwrap_or_else(|err| panic!("minimal tenant not created: {err}"));
    let name = created.metadata.name.clone().unwrap_or_default();
    let generation = created.metadata.generation;

    // A status written through the main resource is dropped.
    let through_main = api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"warmupDay": 9}})),
        )
        .await
        .unwrap_or_else(|err| panic!("merge patch failed: {err}"));
    assert_eq!(through_main.status.and_then(|status| status.warmup_day), None);

    // Through the subresource it sticks, and a spec change sent along is dropped without bumping the generation.
    let through_status = api
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"warmupDay": 4}, "spec": {"paused": true}})),
        )
        .await
        .unwrap_or_else(|err| panic!("status patch failed: {err}"));
    assert_eq!(through_status.status.and_then(|status| status.warmup_day), Some(4));
    assert!(!through_status.spec.paused);
    assert_eq!(through_status.metadata.generation, generation);
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    ensure_crd();
    let namespace = unique_namespace("columns");
    let api: Api<SecureMailTenant> = Api::namespaced(client().await, &namespace);
    let created = api
        .create(&PostParams::default(), &minimal_tenant(&namespace))
        .await
        .unwrap_or_else(|err| panic!("minimal tenant not created: {err}"));
    let name = created.metadata.name.clone().unwrap_or_default();
    let status = json!({"status": {
        "ips": "1/1",
        "warmupDay": 3,
        "conditions": [{
            "type": "Ready", "status": "False", "reason": "Warming", "message": "day 3 of 21",
            "lastTransitionTime": "2026-11-25T10:00:00Z", "observedGeneration": 1
        }, {
            "type": "QueueStorageEncrypted", "status": "True", "reason": "EncryptingStorageClass",
            "message": "queue volumes use StorageClass gp3", "lastTransitionTime": "2026-11-25T10:00:00Z",
            "observedGeneration": 1
        }]
    }});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap_or_else(|err| panic!("status patch failed: {err}"));

    let wide = kubectl_ok(&["get", "smt", "-n", &namespace, "-o", "wide"]);
    let mut lines = wide.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "IPS",
            "WARMUP-DAY",
            "AGE",
            "QUEUE-ENCRYPTED",
            "REASON",
            "MESSAGE"
        ],
        "{wide}"
    );
    let row: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(row[..4], [name.as_str(), "False", "1/1", "3"], "{wide}");
    assert_eq!(row[5..], ["True", "Warming", "day", "3", "of", "21"], "{wide}");

    // The short name and the category find the same object.
    for resource in ["securemailtenants", "securemail"] {
        let names = kubectl_ok(&["get", resource, "-n", &namespace, "-o", "name"]);
        assert!(names.contains(&name), "kubectl get {resource}: {names}");
    }
}

#[test]
fn kubectl_explain_documents_the_fields() {
    ensure_crd();
    let explained = kubectl_ok(&["explain", "smt.spec.tlsPolicy.onFailure"]);
    assert!(explained.contains("no secure path"), "{explained}");
    let explained = kubectl_ok(&["explain", "smt.spec.ipPool.addresses.hostname"]);
    assert!(explained.contains("PTR"), "{explained}");
}
