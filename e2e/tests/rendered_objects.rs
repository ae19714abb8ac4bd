//! What the operator builds for each example, judged by the real apiserver and against the promises in
//! docs/security.md: the MTA pod passes Pod Security `baseline` and breaks `restricted` only where Postfix must (its
//! container), the sidecar container is `restricted`, and the NetworkPolicy opens exactly submission from the allowed
//! namespaces, metrics from the monitoring and operator namespaces, and egress to SMTP, DNS and HTTPS (and to the
//! SOCKS5 proxies on the pool addresses, for egress mode Socks5Proxy).
#![allow(clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;

use securemail_e2e::dataplane::output_with_input;
use securemail_e2e::{kubectl, kubectl_ok, unique_namespace, yaml_files};
use serde_json::{Value, json};

/// The objects `securemail-operator render` prints for `example` (comment-only documents skipped).
fn render(example: &std::path::Path) -> Vec<Value> {
    let binary = std::env::var("SECUREMAIL_OPERATOR_BIN")
        .unwrap_or_else(|_| panic!("SECUREMAIL_OPERATOR_BIN is not set; run the suite with `make e2e`"));
    let output = Command::new(binary)
        .arg("render")
        .arg("-f")
        .arg(example)
        .output()
        .unwrap_or_else(|err| panic!("cannot run render: {err}"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    text.split("\n---\n")
        .map(|document| {
            serde_yaml::from_str::<Value>(document.trim_start_matches("---\n"))
                .unwrap_or_else(|err| panic!("render printed bad YAML: {err}"))
        })
        .filter(|object| !object.is_null())
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|object| object["kind"] == kind)
        .unwrap_or_else(|| panic!("render printed no {kind}"))
}

/// A Pod with the StatefulSet's pod template, its claim templates as empty directories, in `namespace`.
fn pod_of(stateful_set: &Value, namespace: &str) -> Value {
    let template = &stateful_set["spec"]["template"];
    let mut spec = template["spec"].clone();
    let claims = stateful_set["spec"]["volumeClaimTemplates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let volumes = spec["volumes"].as_array_mut().expect("the pod template has volumes");
    volumes.extend(
        claims
            .iter()
            .map(|claim| json!({"name": claim["metadata"]["name"], "emptyDir": {}})),
    );
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mta-probe", "namespace": namespace, "labels": template["metadata"]["labels"]},
        "spec": spec,
    })
}

/// Creates `pod` with a server-side dry run; the error text when the apiserver refuses it.
fn dry_run_create(pod: &Value) -> Result<String, String> {
    let output = output_with_input(
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(securemail_e2e::kubeconfig())
            .args(["create", "--dry-run=server", "-f", "-"]),
        pod.to_string().as_bytes(),
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stderr)
    } else {
        Err(stderr)
    }
}

fn label_namespace(namespace: &str, level: &str) {
    kubectl_ok(&[
        "label",
        "namespace",
        namespace,
        "--overwrite",
        &format!("pod-security.kubernetes.io/enforce={level}"),
        &format!("pod-security.kubernetes.io/warn={level}"),
    ]);
}

#[test]
fn the_mta_pod_is_baseline_and_only_postfix_needs_more_than_restricted() {
    let namespace = unique_namespace("pss");
    for example in yaml_files("examples") {
        let objects = render(&example);
        let pod = pod_of(of_kind(&objects, "StatefulSet"), &namespace);
        let account = pod["spec"]["serviceAccountName"].as_str().expect("a service account");
        // No controller manager here makes ServiceAccounts; admission needs the pod's to exist.
        let existing = kubectl(&["get", "serviceaccount", account, "-n", &namespace]);
        if !existing.status.success() {
            kubectl_ok(&["create", "serviceaccount", account, "-n", &namespace]);
        }

        label_namespace(&namespace, "baseline");
        let warnings = dry_run_create(&pod)
            .unwrap_or_else(|err| panic!("{}: the MTA pod is refused under baseline: {err}", example.display()));
        assert!(warnings.trim().is_empty(), "{}: {warnings}", example.display());

        label_namespace(&namespace, "restricted");
        let refusal = dry_run_create(&pod)
            .expect_err("the Postfix container needs root and capabilities, which restricted refuses");
        assert!(refusal.contains("violates PodSecurity \"restricted"), "{refusal}");
        assert!(refusal.contains("container \"postfix\""), "{refusal}");
        let containers: BTreeSet<&str> = pod["spec"]["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .filter_map(|container| container["name"].as_str())
            .collect();
        for container in containers.iter().filter(|name| **name != "postfix") {
            assert!(
                !refusal.contains(&format!("\"{container}\"")),
                "{}: container {container} must meet restricted on its own: {refusal}",
                example.display()
            );
        }
    }
}

/// (protocol, port) pairs.
type Ports = BTreeSet<(String, u64)>;

fn port_set(rule: &Value) -> Ports {
    rule["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("a rule without ports opens every port: {rule}"))
        .iter()
        .map(|port| {
            (
                port["protocol"].as_str().unwrap_or("TCP").to_owned(),
                port["port"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("a port range or name: {port}")),
            )
        })
        .collect()
}

fn source_namespaces(rule: &Value) -> BTreeSet<String> {
    rule["from"]
        .as_array()
        .unwrap_or_else(|| panic!("an ingress rule without `from` admits every source: {rule}"))
        .iter()
        .map(|peer| {
            assert!(
                peer.get("ipBlock").is_none() && peer.get("podSelector").is_none(),
                "sources are whole namespaces only: {peer}"
            );
            let labels = peer["namespaceSelector"]["matchLabels"]
                .as_object()
                .expect("matchLabels");
            assert_eq!(labels.len(), 1, "{peer}");
            labels["kubernetes.io/metadata.name"]
                .as_str()
                .expect("a namespace name")
                .to_owned()
        })
        .collect()
}

#[test]
fn the_network_policy_opens_exactly_submission_metrics_and_outbound_smtp_dns_https() {
    for example in yaml_files("examples") {
        let tenant: Value = serde_yaml::from_str(&std::fs::read_to_string(&example).expect("example")).expect("yaml");
        let objects = render(&example);
        let policy = of_kind(&objects, "NetworkPolicy");
        let pod_labels = &of_kind(&objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"];
        let selected = policy["spec"]["podSelector"]["matchLabels"]
            .as_object()
            .expect("a pod selector");
        assert!(
            !selected.is_empty(),
            "{}: the policy must select the MTA pods only",
            example.display()
        );
        for (key, value) in selected {
            assert_eq!(&pod_labels[key], value, "{}: selector {key}", example.display());
        }
        assert_eq!(
            policy["spec"]["policyTypes"],
            json!(["Ingress", "Egress"]),
            "{}",
            example.display()
        );

        let mut submitters: BTreeSet<String> = tenant["spec"]["submission"]["allowedNamespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|namespace| namespace.as_str().map(str::to_owned))
            .collect();
        submitters.insert(tenant["metadata"]["namespace"].as_str().expect("namespace").to_owned());
        let scrapers: BTreeSet<String> = ["monitoring", "securemail-system"].map(str::to_owned).into();
        let ingress = policy["spec"]["ingress"].as_array().expect("ingress rules");
        let rules: Vec<(Ports, BTreeSet<String>)> = ingress
            .iter()
            .map(|rule| (port_set(rule), source_namespaces(rule)))
            .collect();
        let tcp = |port: u64| BTreeSet::from([("TCP".to_owned(), port)]);
        assert_eq!(
            rules,
            vec![(tcp(587), submitters), (tcp(9090), scrapers)],
            "{}: ingress",
            example.display()
        );

        // To anywhere: SMTP, DNS and HTTPS only. Through SOCKS5 proxies: their port, on the pool addresses only.
        let egress = policy["spec"]["egress"].as_array().expect("egress rules");
        let (anywhere, proxies): (Vec<&Value>, Vec<&Value>) = egress.iter().partition(|rule| rule["to"].is_null());
        let mut outbound = BTreeSet::new();
        for rule in anywhere {
            outbound.extend(port_set(rule));
        }
        let expected: Ports = [("TCP", 25), ("UDP", 53), ("TCP", 53), ("TCP", 443)]
            .map(|(protocol, port)| (protocol.to_owned(), port))
            .into();
        assert_eq!(outbound, expected, "{}: egress", example.display());
        let egress_spec = &tenant["spec"]["ipPool"]["egress"];
        let expected_proxies: Vec<(Ports, BTreeSet<String>)> = if egress_spec["mode"] == "Socks5Proxy" {
            let blocks = tenant["spec"]["ipPool"]["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|pool| pool["address"].as_str())
                .map(|address| format!("{address}/{}", if address.contains(':') { 128 } else { 32 }))
                .collect();
            vec![(tcp(egress_spec["proxyPort"].as_u64().unwrap_or(1080)), blocks)]
        } else {
            Vec::new()
        };
        let proxy_rules: Vec<(Ports, BTreeSet<String>)> = proxies
            .iter()
            .map(|rule| {
                let blocks = rule["to"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|peer| peer["ipBlock"]["cidr"].as_str().unwrap_or("not an ipBlock").to_owned())
                    .collect();
                (port_set(rule), blocks)
            })
            .collect();
        assert_eq!(
            proxy_rules,
            expected_proxies,
            "{}: egress to the proxies",
            example.display()
        );
    }
}
