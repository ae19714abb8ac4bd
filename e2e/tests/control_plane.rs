//! The SecureMailTenant API against a real kube-apiserver: the CRD installs, examples are accepted, invalid specs
//! are refused with messages that say what to fix, defaults agree with the Rust types, printer columns show, and
//! status is only writable through its subresource.

use std::path::Path;

use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use securemail_api::SecureMailTenant;
use securemail_e2e::{client, ensure_crd, ensure_namespace, kubectl, kubectl_ok, unique_namespace, yaml_files};
use serde_json::json;

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
        ["NAME", "READY", "IPS", "WARMUP-DAY", "AGE", "REASON", "MESSAGE"],
        "{wide}"
    );
    let row: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(row[..4], [name.as_str(), "False", "1/1", "3"], "{wide}");
    assert_eq!(row[5..], ["Warming", "day", "3", "of", "21"], "{wide}");

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
