//! Tenant fixtures and assertions shared by the operator suites.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_api::tenant::DkimSelectorState;
use serde_json::json;

use crate::operator::Operator;
use crate::{eventually, repo_root};

pub const WAIT: Duration = Duration::from_secs(60);

pub fn example(file: &str, namespace: &str) -> SecureMailTenant {
    let path = repo_root().join("examples").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let mut tenant: SecureMailTenant = serde_yaml::from_str(&text).unwrap_or_else(|err| panic!("{file}: {err}"));
    tenant.metadata.namespace = Some(namespace.to_owned());
    // Every test tenant gets addresses of its own: tenants left by earlier suites on the same control plane would
    // otherwise claim the examples' addresses first.
    // Namespaces are unique per test run, so a hash of the name picks one of 65536 /24 blocks in 10.0.0.0/8.
    let block = namespace.bytes().fold(2_166_136_261u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(16_777_619)
    }) % 65_536;
    for (index, address) in tenant.spec.ip_pool.addresses.iter_mut().enumerate() {
        address.address = if address.address.contains(':') {
            format!("fd00::{block:x}:{}", index + 1)
        } else {
            format!("10.{}.{}.{}", block / 256 % 256, block % 256, index + 1)
        };
    }
    // And domains of its own, for the same reason: a domain belongs to the tenant that claimed it first. A
    // namespace name is a DNS label.
    for domain in &mut tenant.spec.domains {
        domain.name = format!("{namespace}.{}", domain.name);
    }
    tenant
}

pub fn condition(tenant: &SecureMailTenant, type_: &str) -> Option<(String, String, String)> {
    tenant
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|condition| condition.type_ == type_)
        .map(|condition| {
            (
                condition.status.clone(),
                condition.reason.clone(),
                condition.message.clone(),
            )
        })
}

/// Creates `tenant` and, first, the Secrets it names (submission certificate, client CA) unless they exist; their
/// content is a placeholder: the operator only checks that the keys the pods mount are there.
pub async fn create(client: &Client, tenant: &SecureMailTenant) -> SecureMailTenant {
    let namespace = tenant.metadata.namespace.as_deref().unwrap_or_default();
    let submission = &tenant.spec.submission;
    let tls_secret = submission
        .tls
        .secret_name
        .clone()
        .unwrap_or_else(|| format!("{}-submission-tls", tenant.name_any()));
    create_secret(
        client,
        namespace,
        &tls_secret,
        "kubernetes.io/tls",
        &["tls.crt", "tls.key"],
    )
    .await;
    let ca_secret = &submission.client_certificates.ca_secret_name;
    create_secret(client, namespace, ca_secret, "Opaque", &["ca.crt"]).await;
    create_tenant(client, tenant).await
}

/// Creates `tenant` alone.
pub async fn create_tenant(client: &Client, tenant: &SecureMailTenant) -> SecureMailTenant {
    let api: Api<SecureMailTenant> =
        Api::namespaced(client.clone(), tenant.metadata.namespace.as_deref().unwrap_or_default());
    api.create(&PostParams::default(), tenant)
        .await
        .unwrap_or_else(|err| panic!("cannot create {}: {err}", tenant.name_any()))
}

/// A Secret of `type_` with a value under each of `keys`: a real certificate under `tls.crt` and `ca.crt` (the
/// operator reads the submission certificate's expiry), a placeholder elsewhere. An existing one is left as it is.
pub async fn create_secret(client: &Client, namespace: &str, name: &str, type_: &str, keys: &[&str]) {
    let value = |key: &str| match key {
        "tls.crt" | "ca.crt" => test_certificate().to_owned(),
        _ => "placeholder".to_owned(),
    };
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace},
        "type": type_,
        "stringData": keys.iter().map(|key| (*key, value(key))).collect::<BTreeMap<_, _>>(),
    }))
    .unwrap_or_else(|err| panic!("{err}"));
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => panic!("cannot create Secret {namespace}/{name}: {err}"),
    }
}

/// Waits until the operator has written status for the tenant's current generation.
pub async fn reconciled(client: &Client, namespace: &str, name: &str) -> SecureMailTenant {
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), namespace);
    eventually(&format!("status of {namespace}/{name}"), WAIT, || async {
        let tenant = api.get(name).await.ok()?;
        let observed = tenant.status.as_ref()?.observed_generation;
        (observed.is_some() && observed == tenant.metadata.generation).then_some(tenant)
    })
    .await
}

pub async fn reconcile_count(operator: &Operator) -> u64 {
    operator
        .metrics()
        .await
        .lines()
        .filter(|line| line.starts_with("securemail_operator_reconciles_total{result=\"success\"}"))
        .filter_map(|line| line.split_whitespace().last()?.parse().ok())
        .next()
        .unwrap_or(0)
}

/// Every child exists, carries the managed-by and tenant labels and a controller owner reference to the tenant.
pub async fn assert_children(client: &Client, tenant: &SecureMailTenant) {
    let namespace = tenant.namespace().unwrap_or_default();
    let name = tenant.name_any();
    let uid = tenant.uid().unwrap_or_default();
    let selector = format!("app.kubernetes.io/managed-by=securemail-operator,securemail.io/tenant={name}");
    let params = ListParams::default().labels(&selector);
    let mut found: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    macro_rules! collect {
        ($kind:ty, $label:literal) => {{
            let api: Api<$kind> = Api::namespaced(client.clone(), &namespace);
            for object in api
                .list(&params)
                .await
                .unwrap_or_else(|err| panic!("list {}: {err}", $label))
            {
                let owner = object
                    .owner_references()
                    .iter()
                    .find(|owner| owner.controller == Some(true));
                assert_eq!(
                    owner.map(|owner| owner.uid.as_str()),
                    Some(uid.as_str()),
                    "{} {}",
                    $label,
                    object.name_any()
                );
                found.entry($label).or_default().push(object.name_any());
            }
        }};
    }
    collect!(StatefulSet, "StatefulSet");
    collect!(ConfigMap, "ConfigMap");
    collect!(Service, "Service");
    collect!(ServiceAccount, "ServiceAccount");
    collect!(PodDisruptionBudget, "PodDisruptionBudget");
    collect!(NetworkPolicy, "NetworkPolicy");
    collect!(Secret, "Secret");
    let mta = format!("{name}-mta");
    for kind in ["StatefulSet", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy"] {
        assert_eq!(found[kind], std::slice::from_ref(&mta), "{kind}");
    }
    assert_eq!(found["ConfigMap"], [format!("{name}-mta-config")]);
    assert_eq!(found["Service"].len(), 2, "{found:?}");
    let algorithms: usize = tenant
        .spec
        .domains
        .iter()
        .map(|domain| domain.dkim.algorithms.len())
        .sum();
    assert_eq!(
        found["Secret"].len(),
        algorithms,
        "one key Secret per domain and algorithm: {found:?}"
    );
}

/// Stands in for the kubelet: marks every replica of the tenant's StatefulSet ready.
pub async fn pods_become_ready(client: &Client, namespace: &str, name: &str) {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let sts = api
        .get(&format!("{name}-mta"))
        .await
        .unwrap_or_else(|err| panic!("StatefulSet: {err}"));
    let replicas = sts.spec.and_then(|spec| spec.replicas).unwrap_or(0);
    let status = json!({"status": {"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas}});
    api.patch_status(&format!("{name}-mta"), &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|err| panic!("StatefulSet status: {err}"));
}

/// Stands in for the StatefulSet controller: creates MTA pod `ordinal` of tenant `name` from its StatefulSet's pod
/// template (labels, containers, volumes, with the volume claim of `volumeClaimTemplates` by its conventional name),
/// as a real cluster would. Its status is then the test's to write, as a kubelet's would be.
pub async fn create_mta_pod(client: &Client, namespace: &str, name: &str, ordinal: u32) -> Pod {
    let statefulset = format!("{name}-mta");
    let sts = Api::<StatefulSet>::namespaced(client.clone(), namespace)
        .get(&statefulset)
        .await
        .unwrap_or_else(|err| panic!("StatefulSet: {err}"));
    let spec = sts
        .spec
        .unwrap_or_else(|| panic!("StatefulSet {statefulset} without a spec"));
    let pod_name = format!("{statefulset}-{ordinal}");
    let mut template = serde_json::to_value(&spec.template).unwrap_or_else(|err| panic!("{err}"));
    template["metadata"]["name"] = json!(pod_name);
    template["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = json!(ordinal.to_string());
    template["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
    for claim in spec.volume_claim_templates.unwrap_or_default() {
        let claim = claim.metadata.name.unwrap_or_default();
        let volume = json!({"name": claim, "persistentVolumeClaim": {"claimName": format!("{claim}-{pod_name}")}});
        match template["spec"]["volumes"].as_array_mut() {
            Some(volumes) => volumes.push(volume),
            None => template["spec"]["volumes"] = json!([volume]),
        }
    }
    let pod: Pod = serde_json::from_value(template).unwrap_or_else(|err| panic!("pod from the template: {err}"));
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|err| panic!("pod {pod_name}: {err}"))
}

pub async fn key_secrets(client: &Client, namespace: &str) -> BTreeMap<String, (String, Vec<u8>)> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().labels("app.kubernetes.io/component=dkim-key");
    api.list(&params)
        .await
        .unwrap_or_else(|err| panic!("key Secrets: {err}"))
        .into_iter()
        .map(|secret| {
            let data = secret
                .data
                .as_ref()
                .and_then(|data| data.get("private.pem"))
                .map(|bytes| bytes.0.clone())
                .unwrap_or_default();
            (secret.name_any(), (secret.uid().unwrap_or_default(), data))
        })
        .collect()
}

/// A self-signed certificate that expires 90 days after the operator's [`crate::clock::now`], made once per test
/// process with openssl (PEM).
pub fn test_certificate() -> &'static str {
    static CERTIFICATE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CERTIFICATE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("securemail-e2e-certificate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
        // openssl counts from the real clock: add the days the operator's clock is ahead, rounded up.
        let days = 90 + (crate::clock::offset().as_hours() + 23) / 24;
        crate::dataplane::openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                &days.to_string(),
                "-subj",
                "/CN=submission.e2e.test",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
            ],
        );
        let pem = std::fs::read_to_string(dir.join("cert.pem")).unwrap_or_else(|err| panic!("{err}"));
        let _ = std::fs::remove_dir_all(&dir);
        pem
    })
}

/// `count` tenants, each in a namespace of its own named after `prefix`; every third one dual-signs (two keys per
/// domain), so some reconciles generate two keys.
pub async fn create_mix(client: &Client, prefix: &str, count: usize) -> Vec<SecureMailTenant> {
    let mut tenants = Vec::with_capacity(count);
    for index in 0..count {
        let namespace = crate::unique_namespace(prefix);
        let file = if index % 3 == 0 {
            "dedicated-warmup.yaml"
        } else {
            "minimal.yaml"
        };
        tenants.push(create(client, &example(file, &namespace)).await);
    }
    tenants
}

/// Whether the operator has reconciled the tenant's current generation and its DKIM keys are ready.
pub fn is_converged(tenant: &SecureMailTenant) -> bool {
    let current = tenant
        .status
        .as_ref()
        .is_some_and(|status| status.observed_generation == tenant.metadata.generation);
    current && condition(tenant, "DkimReady").is_some_and(|(status, _, _)| status == "True")
}

/// Waits until `tenant` converged ([`is_converged`]), then asserts exactly its own children ([`assert_children`])
/// and exactly one DKIM key per domain and algorithm: the active selectors in status are the stored key Secrets,
/// and every one is the first generated for its domain (`-1`), so none was lost and made again or duplicated.
pub async fn assert_converged(client: &Client, tenant: &SecureMailTenant, timeout: Duration) -> SecureMailTenant {
    let namespace = tenant.namespace().unwrap_or_default();
    let name = tenant.name_any();
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    let converged = eventually(&format!("{namespace}/{name} converged"), timeout, || async {
        api.get(&name).await.ok().filter(is_converged)
    })
    .await;
    assert_children(client, &converged).await;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let mut stored: Vec<String> = secrets
        .list(&ListParams::default().labels("app.kubernetes.io/component=dkim-key"))
        .await
        .unwrap_or_else(|err| panic!("key Secrets: {err}"))
        .iter()
        .filter_map(|secret| secret.labels().get("securemail.io/dkim-selector").cloned())
        .collect();
    stored.sort();
    let mut recorded: Vec<String> = converged
        .status
        .iter()
        .flat_map(|status| &status.dkim_selectors)
        .filter(|selector| selector.state == DkimSelectorState::Active)
        .map(|selector| selector.selector.clone())
        .collect();
    recorded.sort();
    assert_eq!(stored, recorded, "{namespace}: stored keys and status disagree");
    assert!(
        recorded.iter().all(|selector| selector.ends_with("-1")),
        "{namespace}: a key was generated more than once: {recorded:?}"
    );
    converged
}

/// What the operator made for `tenant` as it stands: each child's kind, name, labels, annotations (with the
/// desired-hash), owner references and content (spec, data, rules), and the DNS records and DKIM selectors in its
/// status. Key Secrets appear as their uid and a digest of their data, so a comparison can print it.
pub async fn converged_state(client: &Client, tenant: &SecureMailTenant) -> serde_json::Value {
    let namespace = tenant.namespace().unwrap_or_default();
    let name = tenant.name_any();
    let selector = format!("app.kubernetes.io/managed-by=securemail-operator,securemail.io/tenant={name}");
    let listed = crate::kubectl_ok(&[
        "get",
        "statefulsets,configmaps,services,serviceaccounts,poddisruptionbudgets,networkpolicies,secrets",
        "-n",
        &namespace,
        "-l",
        &selector,
        "-o",
        "json",
    ]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap_or_else(|err| panic!("kubectl get: {err}"));
    let mut children: Vec<serde_json::Value> = listed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|object| {
            let mut content = json!({
                "kind": object["kind"],
                "name": object["metadata"]["name"],
                "labels": object["metadata"]["labels"],
                "annotations": object["metadata"]["annotations"],
                "ownerReferences": object["metadata"]["ownerReferences"],
                "spec": object["spec"],
                "data": object["data"],
                "automountServiceAccountToken": object["automountServiceAccountToken"],
            });
            if object["kind"] == "Secret" {
                let mut hasher = std::hash::DefaultHasher::new();
                std::hash::Hash::hash(&object["data"].to_string(), &mut hasher);
                content["data"] = json!(format!(
                    "uid {} data {:016x}",
                    object["metadata"]["uid"],
                    std::hash::Hasher::finish(&hasher)
                ));
            }
            content
        })
        .collect();
    children.sort_by_key(|child| format!("{} {}", child["kind"], child["name"]));
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    let live = api
        .get(&name)
        .await
        .unwrap_or_else(|err| panic!("{namespace}/{name}: {err}"));
    let status = live.status.unwrap_or_default();
    json!({
        "children": children,
        "dnsRecords": status.dns_records,
        "dkimSelectors": status.dkim_selectors,
    })
}
