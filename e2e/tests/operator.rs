//! The operator against a real kube-apiserver, running as its own ServiceAccount: every example reconciles into
//! owned, labelled children with a truthful status; a second reconcile writes nothing; a restart keeps the DKIM
//! keys; a deleted key gets a new selector; address and domain conflicts, pausing and deletion behave as documented.
//!
//! One operator serves the whole file (two would fight over the same tenants), so the scenarios run in sequence
//! inside one test, each in its own namespace.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_api::tenant::{DkimSelectorState, PoolAddress, WarmupSpec};
use securemail_api::warmup::state::AddressWarmup;
use securemail_e2e::dnsbl::BlocklistServer;
use securemail_e2e::operator::{OPERATOR_USER, Operator};
use securemail_e2e::tenants::{
    WAIT, assert_children, condition, create, create_mta_pod, create_secret, create_tenant, example, key_secrets,
    pods_become_ready, reconcile_count, reconciled,
};
use securemail_e2e::{client, clock, ensure_crd, eventually, unique_namespace, writes_by};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reconciles_tenants_against_a_real_apiserver() {
    ensure_crd();
    let client = client().await;
    let blocklist = BlocklistServer::start();
    let mut operator = Operator::start(18_181);

    every_example_reconciles_to_owned_children_and_a_truthful_status(&client).await;
    let namespace = an_unchanged_tenant_costs_no_writes(&client, &operator).await;
    operator = a_restart_keeps_every_dkim_key(&client, operator, &namespace).await;
    a_deleted_key_secret_gets_a_new_selector(&client, &namespace).await;
    the_later_tenant_loses_a_shared_address(&client).await;
    children_the_tenant_no_longer_needs_are_swept(&client).await;
    a_paused_tenant_is_left_alone(&client).await;
    placement_follows_the_spec_and_leaves_the_volumes(&client).await;
    queue_volumes_are_made_only_on_a_class_known_to_encrypt_when_required(&client).await;
    a_missing_secret_makes_the_config_invalid_until_it_appears(&client, &operator).await;
    pods_that_cannot_run_say_why_until_they_are_ready(&client, &operator).await;
    the_warmup_loop_judges_yesterday_from_the_pods_status(&client, &operator).await;
    a_listed_address_is_named_with_its_zone(&client, &blocklist).await;
    deletion_follows_the_deletion_policy(&client).await;
    a_shrinking_pool_drains_before_the_pod_goes_and_keeps_its_volume_as_evidence(&client).await;
    deleting_a_drain_tenant_waits_for_empty_queues(&client).await;
    retained_evidence_volumes_go_only_when_their_retention_ended(&client).await;
    // Last: they install the external-dns and cert-manager CRDs into the shared control plane.
    dns_endpoints_follow_the_external_dns_crd(&client).await;
    operator = a_domain_belongs_to_one_tenant_at_a_time(&client, operator).await;
    the_submission_certificate_comes_from_cert_manager(&client).await;
    drop(operator);
}

async fn every_example_reconciles_to_owned_children_and_a_truthful_status(client: &Client) {
    for file in ["minimal.yaml", "dedicated-warmup.yaml", "strict-tls-overrides.yaml"] {
        let namespace = unique_namespace("reconcile");
        let tenant = create(client, &example(file, &namespace)).await;
        let name = tenant.name_any();
        let tenant = reconciled(client, &namespace, &name).await;
        assert_children(client, &tenant).await;

        let status = tenant.status.clone().unwrap_or_default();
        for type_ in ["ConfigValid", "DkimReady"] {
            assert_eq!(
                condition(&tenant, type_).map(|c| c.0),
                Some("True".to_owned()),
                "{file} {type_}"
            );
        }
        assert_eq!(
            condition(&tenant, "IpPoolConflict").map(|c| (c.0, c.2)),
            Some(("False".to_owned(), "every pool address is this tenant's".to_owned()))
        );
        assert_eq!(
            condition(&tenant, "MtaAvailable").map(|c| c.1),
            Some("PodsNotReady".to_owned())
        );
        assert_eq!(condition(&tenant, "Ready").map(|c| c.0), Some("False".to_owned()));

        // DNS records: SPF names every address, one DKIM record per selector, one PTR per address.
        let addresses: Vec<&PoolAddress> = tenant.spec.ip_pool.addresses.iter().collect();
        let spf: Vec<_> = status.dns_records.iter().filter(|r| r.purpose == "spf").collect();
        assert_eq!(spf.len(), tenant.spec.domains.len());
        for address in &addresses {
            assert!(
                spf[0].value.contains(&address.address),
                "{file}: SPF lacks {}",
                address.address
            );
        }
        let dkim: Vec<_> = status.dns_records.iter().filter(|r| r.purpose == "dkim").collect();
        assert_eq!(dkim.len(), status.dkim_selectors.len());
        assert!(
            dkim.iter()
                .all(|r| r.value.contains("v=DKIM1") && r.name.contains("._domainkey."))
        );
        assert_eq!(
            status.dns_records.iter().filter(|r| r.purpose == "ptr").count(),
            addresses.len()
        );
        assert!(
            status
                .dkim_selectors
                .iter()
                .all(|s| s.state == DkimSelectorState::Active)
        );
        assert_eq!(status.ip_pool.len(), addresses.len());
        assert_eq!(
            status.warmup_day,
            first_warmup_day(&tenant.spec.ip_pool.warmup, clock::today()),
            "{file}: warmup day on {}",
            clock::today()
        );

        // The kubelet's part: pods become ready, and so does the tenant.
        pods_become_ready(client, &namespace, &name).await;
        let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
        eventually(&format!("{file} Ready"), WAIT, || async {
            let tenant = api.get(&name).await.ok()?;
            (condition(&tenant, "Ready")?.0 == "True").then_some(())
        })
        .await;
        // No key material in status.
        let status_json =
            serde_json::to_string(&api.get_status(&name).await.ok().and_then(|t| t.status)).unwrap_or_default();
        assert!(!status_json.contains("PRIVATE KEY"));
    }
}

/// The warmup day a new tenant's status shows on `today`: its schedule starts on `spec.startDate` (which may lie in the
/// past or the future), or today without one; `None` once past the schedule (warm).
fn first_warmup_day(spec: &WarmupSpec, today: jiff::civil::Date) -> Option<u32> {
    let start = spec.start_date.as_deref().map_or(today, |date| {
        date.parse().unwrap_or_else(|err| panic!("startDate {date}: {err}"))
    });
    let warmup = AddressWarmup::begin(spec, start, today);
    warmup.daily_limit(spec).map(|_| warmup.day)
}

async fn an_unchanged_tenant_costs_no_writes(client: &Client, operator: &Operator) -> String {
    let namespace = unique_namespace("idempotent");
    let tenant = create(client, &example("dedicated-warmup.yaml", &namespace)).await;
    let name = tenant.name_any();
    reconciled(client, &namespace, &name).await;
    pods_become_ready(client, &namespace, &name).await;
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    eventually("Ready", WAIT, || async {
        (condition(&api.get(&name).await.ok()?, "Ready")?.0 == "True").then_some(())
    })
    .await;
    // Let the reconciles triggered by the operator's own writes settle.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let before_writes = writes_by(OPERATOR_USER, &namespace);
    let before_reconciles = reconcile_count(operator).await;
    // A label change is not a spec change but triggers a reconcile.
    let patch = json!({"metadata": {"labels": {"touched": "yes"}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("label patch: {err}"));
    eventually("a reconcile after the label change", WAIT, || async {
        (reconcile_count(operator).await > before_reconciles).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_writes = writes_by(OPERATOR_USER, &namespace);
    assert_eq!(
        after_writes[before_writes.len()..],
        [] as [String; 0],
        "a reconcile of an unchanged tenant wrote to the apiserver"
    );
    assert!(
        !before_writes.is_empty(),
        "the audit log shows no operator writes at all: is auditing on?"
    );
    namespace
}

async fn a_restart_keeps_every_dkim_key(client: &Client, operator: Operator, namespace: &str) -> Operator {
    let before = key_secrets(client, namespace).await;
    assert!(!before.is_empty());
    let port = operator.admin_port;
    operator.kill();
    let operator = Operator::start(port + 1);
    // Force a reconcile through the new process and wait for it.
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), namespace);
    let name = api
        .list(&ListParams::default())
        .await
        .ok()
        .and_then(|l| l.items.first().map(ResourceExt::name_any))
        .unwrap_or_default();
    let patch = json!({"metadata": {"labels": {"restarted": "yes"}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    eventually("a reconcile by the restarted operator", WAIT, || async {
        (reconcile_count(&operator).await > 0).then_some(())
    })
    .await;
    assert_eq!(
        key_secrets(client, namespace).await,
        before,
        "DKIM keys changed across a restart"
    );
    operator
}

async fn a_deleted_key_secret_gets_a_new_selector(client: &Client, namespace: &str) {
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), namespace);
    let tenant = api
        .list(&ListParams::default())
        .await
        .ok()
        .and_then(|l| l.items.into_iter().next())
        .unwrap_or_else(|| panic!("no tenant"));
    let name = tenant.name_any();
    let status = tenant.status.clone().unwrap_or_default();
    let rsa = status
        .dkim_selectors
        .iter()
        .find(|s| s.selector.contains("-rsa-"))
        .unwrap_or_else(|| panic!("no RSA selector"))
        .clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let victim = key_secrets(client, namespace)
        .await
        .into_keys()
        .find(|secret| secret.ends_with(&rsa.selector))
        .unwrap_or_else(|| panic!("no Secret for {}", rsa.selector));
    secrets
        .delete(&victim, &DeleteParams::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));

    let replaced = eventually("a replacement selector", WAIT, || async {
        let tenant = api.get(&name).await.ok()?;
        let status = tenant.status.clone()?;
        let active: Vec<_> = status
            .dkim_selectors
            .iter()
            .filter(|s| s.state == DkimSelectorState::Active && s.domain == rsa.domain && s.algorithm == rsa.algorithm)
            .map(|s| s.selector.clone())
            .collect();
        (active.len() == 1 && active[0] != rsa.selector).then_some((tenant, active[0].clone()))
    })
    .await;
    let (tenant, new_selector) = replaced;
    assert!(new_selector.ends_with("-rsa-2"), "{new_selector}");
    let (_, reason, message) = condition(&tenant, "DkimReady").unwrap_or_default();
    assert_eq!(reason, "KeyReplaced");
    assert!(
        message.contains(&rsa.selector) && message.contains(&new_selector),
        "{message}"
    );
    let events = securemail_e2e::kubectl_ok(&["get", "events", "-n", namespace, "-o", "jsonpath={.items[*].reason}"]);
    assert!(events.contains("DkimKeyReplaced"), "{events}");
}

async fn the_later_tenant_loses_a_shared_address(client: &Client) {
    let first_ns = unique_namespace("conflict-a");
    let second_ns = unique_namespace("conflict-b");
    let first = create(client, &example("minimal.yaml", &first_ns)).await;
    reconciled(client, &first_ns, &first.name_any()).await;
    let mut second = example("strict-tls-overrides.yaml", &second_ns);
    second.spec.ip_pool.addresses[1].address = first.spec.ip_pool.addresses[0].address.clone();
    let second = create(client, &second).await;
    let second = reconciled(client, &second_ns, &second.name_any()).await;

    let (status, reason, message) = condition(&second, "IpPoolConflict").unwrap_or_default();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "AddressInUse"));
    assert!(
        message.contains(&format!("{first_ns}/{}", first.name_any())),
        "{message}"
    );
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &second_ns);
    let replicas = sts
        .get(&format!("{}-mta", second.name_any()))
        .await
        .ok()
        .and_then(|s| s.spec?.replicas);
    assert_eq!(replicas, Some(1), "no pod for the conflicting address");
    let first = reconciled(client, &first_ns, &first.name_any()).await;
    assert_eq!(
        condition(&first, "IpPoolConflict").map(|c| c.0),
        Some("False".to_owned())
    );
}

/// The orphan sweep (answered from the child caches' index by tenant): a child labelled and owned as the tenant's
/// that its spec does not produce is deleted; the same labels naming another tenant, or in another namespace, are not
/// the tenant's and stay.
async fn children_the_tenant_no_longer_needs_are_swept(client: &Client) {
    let namespace = unique_namespace("sweep");
    let elsewhere = unique_namespace("sweep-other");
    let tenant = create(client, &example("minimal.yaml", &namespace)).await;
    let tenant = reconciled(client, &namespace, &tenant.name_any()).await;
    let child = |child_namespace: &str, name: &str, owner: &str| -> ConfigMap {
        // Owned by the tenant where it can be (an owner is in its dependent's namespace), so creating it is a change
        // the tenant's reconcile sees.
        let owners = (child_namespace == namespace).then(|| {
            json!([{
                "apiVersion": "securemail.io/v1alpha1", "kind": "SecureMailTenant", "name": tenant.name_any(),
                "uid": tenant.uid().unwrap_or_default(), "controller": true
            }])
        });
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": child_namespace,
                "labels": {"app.kubernetes.io/managed-by": "securemail-operator", "securemail.io/tenant": owner},
                "ownerReferences": owners.unwrap_or_else(|| json!([]))
            }
        }))
        .unwrap_or_else(|err| panic!("config map: {err}"))
    };
    for (namespace, name, owner) in [
        (&namespace, "left-over", tenant.name_any()),
        (&namespace, "of-another-tenant", "another".to_owned()),
        (&elsewhere, "left-over", tenant.name_any()),
    ] {
        Api::<ConfigMap>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &child(namespace, name, &owner))
            .await
            .unwrap_or_else(|err| panic!("create {name}: {err}"));
    }
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    eventually("the left-over child swept", WAIT, || async {
        maps.get_opt("left-over").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        maps.get_opt("of-another-tenant")
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .is_some()
    );
    let other: Api<ConfigMap> = Api::namespaced(client.clone(), &elsewhere);
    assert!(
        other
            .get_opt("left-over")
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .is_some()
    );
    // The tenant's own ConfigMap is built again on every pass and stays.
    assert!(
        maps.get_opt(&format!("{}-mta-config", tenant.name_any()))
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .is_some()
    );
}

async fn a_paused_tenant_is_left_alone(client: &Client) {
    let namespace = unique_namespace("paused");
    let tenant = create(client, &example("minimal.yaml", &namespace)).await;
    let name = tenant.name_any();
    reconciled(client, &namespace, &name).await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let before = config_maps
        .get(&format!("{name}-mta-config"))
        .await
        .ok()
        .map(|cm| cm.resource_version());

    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    let domain = &tenant.spec.domains[0].name;
    let patch = json!({"spec": {"paused": true, "domains": [{"name": domain}, {"name": format!("other.{domain}")}]}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    // Paused: the status keeps describing the last reconciled generation and says it is paused.
    eventually("the Paused condition", WAIT, || async {
        (condition(&api.get(&name).await.ok()?, "Paused")?.0 == "True").then_some(())
    })
    .await;
    let after = config_maps
        .get(&format!("{name}-mta-config"))
        .await
        .ok()
        .map(|cm| cm.resource_version());
    assert_eq!(before, after, "a paused tenant's configuration changed");
    assert_eq!(
        key_secrets(client, &namespace).await.len(),
        1,
        "no key generated for the domain added while paused"
    );
}

/// The example's placement reaches the pod template; taken out of the spec, it leaves the StatefulSet (server-side
/// apply drops what the operator no longer asks for, as it does hostNetwork for a tenant stored with that egress
/// mode), which is updated in place: neither it nor a pod's volume claim is deleted.
async fn placement_follows_the_spec_and_leaves_the_volumes(client: &Client) {
    let namespace = unique_namespace("placement");
    let tenant = create(client, &example("dedicated-warmup.yaml", &namespace)).await;
    let name = tenant.name_any();
    reconciled(client, &namespace, &name).await;
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let placement = |stateful_set: &StatefulSet| {
        let pod = stateful_set.spec.as_ref()?.template.spec.clone()?;
        Some((
            pod.node_selector,
            pod.tolerations,
            pod.affinity,
            pod.topology_spread_constraints,
        ))
    };
    let placed = stateful_sets
        .get(&format!("{name}-mta"))
        .await
        .unwrap_or_else(|err| panic!("the StatefulSet: {err}"));
    let (node_selector, tolerations, affinity, spread) = placement(&placed).unwrap_or_default();
    let mta = &tenant.spec.mta;
    assert_eq!(node_selector.as_ref(), Some(&mta.node_selector));
    assert_eq!(tolerations.as_ref(), Some(&mta.tolerations));
    assert_eq!(affinity, mta.affinity);
    assert!(spread.is_some(), "the operator's spread over nodes");
    // The claim the StatefulSet controller (absent from this control plane) would have made for pod 0.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": format!("data-{name}-mta-0")},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap_or_else(|err| panic!("{err}"));
    let claim = claims
        .create(&PostParams::default(), &claim)
        .await
        .unwrap_or_else(|err| panic!("claim: {err}"));

    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    let patch = json!({"spec": {"mta": {"nodeSelector": null, "tolerations": null, "affinity": null}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let unplaced = eventually("the StatefulSet without placement", WAIT, || async {
        let stateful_set = stateful_sets.get(&format!("{name}-mta")).await.ok()?;
        let (node_selector, tolerations, affinity, _) = placement(&stateful_set)?;
        (node_selector.is_none() && tolerations.is_none() && affinity.is_none()).then_some(stateful_set)
    })
    .await;
    assert_eq!(
        unplaced.uid(),
        placed.uid(),
        "the StatefulSet was replaced, not updated"
    );
    assert_eq!(placement(&unplaced).and_then(|placement| placement.3), spread);
    let kept = claims
        .get_opt(&claim.name_any())
        .await
        .unwrap_or_else(|err| panic!("claim: {err}"));
    assert_eq!(
        kept.and_then(|kept| kept.uid()),
        claim.uid(),
        "the pod's volume claim went"
    );
}

/// A cluster-scoped StorageClass for the storage case; `default` marks it the cluster's default.
async fn create_class(
    classes: &Api<StorageClass>,
    name: &str,
    provisioner: &str,
    parameters: &[(&str, &str)],
    default: bool,
) {
    let annotations: BTreeMap<&str, &str> = default
        .then_some(("storageclass.kubernetes.io/is-default-class", "true"))
        .into_iter()
        .collect();
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "provisioner": provisioner,
        "parameters": parameters.iter().copied().collect::<BTreeMap<_, _>>(),
    }))
    .unwrap_or_else(|err| panic!("{err}"));
    classes
        .create(&PostParams::default(), &class)
        .await
        .unwrap_or_else(|err| panic!("StorageClass {name}: {err}"));
}

/// The minimal example in a namespace of its own, on `class` (the cluster default when `None`).
async fn storage_tenant(client: &Client, prefix: &str, class: Option<&str>, required: bool) -> (String, String) {
    let namespace = unique_namespace(prefix);
    let mut tenant = example("minimal.yaml", &namespace);
    tenant.spec.mta.storage.storage_class_name = class.map(str::to_owned);
    tenant.spec.mta.storage.require_encryption_at_rest = required;
    let name = create(client, &tenant).await.name_any();
    (namespace, name)
}

/// Waits for `QueueStorageEncrypted` with `reason` and a message containing `part`; returns the message.
async fn storage_condition(client: &Client, namespace: &str, name: &str, reason: &str, part: &str) -> String {
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), namespace);
    eventually(
        &format!("{namespace}/{name}: QueueStorageEncrypted {reason} with {part}"),
        WAIT,
        || async {
            let (_, got, message) = condition(&api.get(name).await.ok()?, "QueueStorageEncrypted")?;
            (got == reason && message.contains(part)).then_some(message)
        },
    )
    .await
}

/// Queue volumes hold deferred mail (PHI). `QueueStorageEncrypted` says whether their StorageClass encrypts at rest
/// (named, or the cluster default); a tenant that requires it gets no MTA pod or volume on a class not known to, and
/// an existing StatefulSet is neither scaled up nor down, until the platform team attests the class or the default
/// moves to one that encrypts.
async fn queue_volumes_are_made_only_on_a_class_known_to_encrypt_when_required(client: &Client) {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let prefix = unique_namespace("storage-classes");
    let (encrypting, plain) = (format!("{prefix}-ebs"), format!("{prefix}-plain"));
    create_class(
        &classes,
        &encrypting,
        "ebs.csi.aws.com",
        &[("encrypted", "true")],
        false,
    )
    .await;
    create_class(&classes, &plain, "example.org/plain-disk", &[], false).await;

    let (namespace, name) = storage_tenant(client, "storage-encrypted", Some(&encrypting), false).await;
    let message = storage_condition(client, &namespace, &name, "EncryptingStorageClass", &encrypting).await;
    assert!(message.contains(&format!("claim data-{name}-mta-0")), "{message}");
    assert!(
        message.contains("ebs.csi.aws.com with encrypted: \"true\""),
        "{message}"
    );

    // Not required: the condition informs, the StatefulSet is made and Ready does not take the storage reason.
    let (informed_ns, informed) = storage_tenant(client, "storage-plain", Some(&plain), false).await;
    let message = storage_condition(client, &informed_ns, &informed, "StorageClassNotKnownToEncrypt", &plain).await;
    assert!(message.contains("securemail.io/encrypted-at-rest"), "{message}");
    let informed_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &informed_ns);
    let informed_set = format!("{informed}-mta");
    eventually("the informed tenant's StatefulSet", WAIT, || async {
        informed_sets.get_opt(&informed_set).await.ok().flatten()
    })
    .await;
    let tenant = reconciled(client, &informed_ns, &informed).await;
    assert_eq!(
        condition(&tenant, "Ready").map(|c| c.1),
        Some("PodsNotReady".to_owned())
    );

    // Required on a class not known to encrypt: no StatefulSet, Ready names the condition, a Warning event.
    let (held_ns, held) = storage_tenant(client, "storage-required", Some(&plain), true).await;
    let tenants: Api<SecureMailTenant> = Api::namespaced(client.clone(), &held_ns);
    let ready = eventually("Ready naming QueueStorageEncrypted", WAIT, || async {
        let (status, reason, message) = condition(&tenants.get(&held).await.ok()?, "Ready")?;
        (status == "False" && reason == "StorageClassNotKnownToEncrypt").then_some(message)
    })
    .await;
    assert!(ready.starts_with("QueueStorageEncrypted is False: "), "{ready}");
    assert!(ready.contains("requireEncryptionAtRest is true"), "{ready}");
    let warnings = eventually("a Warning event", WAIT, || async {
        let events = Api::<Event>::namespaced(client.clone(), &held_ns)
            .list(&ListParams::default())
            .await
            .ok()?;
        let warnings: Vec<String> = events
            .into_iter()
            .filter(|event| {
                event.reason.as_deref() == Some("StorageClassNotKnownToEncrypt")
                    && event.type_.as_deref() == Some("Warning")
            })
            .filter_map(|event| event.note)
            .collect();
        (!warnings.is_empty()).then_some(warnings)
    })
    .await;
    assert!(warnings[0].contains(&plain), "{warnings:?}");
    let held_sets: Api<StatefulSet> = Api::namespaced(client.clone(), &held_ns);
    let held_set = format!("{held}-mta");
    assert!(
        held_sets
            .get_opt(&held_set)
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .is_none(),
        "a StatefulSet (and so volumes) on a class not known to encrypt"
    );
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &held_ns);
    assert!(
        config_maps
            .get_opt(&format!("{held}-mta-config"))
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .is_some(),
        "the other children are made as usual"
    );

    // An existing StatefulSet that starts to require it while its pool grows: kept at its size, not scaled up.
    let informed_api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &informed_ns);
    let mut addresses = tenant.spec.ip_pool.addresses.clone();
    let mut second = addresses[0].clone();
    second.address = match second.address.rsplit_once('.') {
        Some((network, _)) => format!("{network}.2"),
        None => panic!("the example's address {} is not IPv4", second.address),
    };
    second.hostname = format!("mta2.{}", tenant.spec.domains[0].name);
    addresses.push(second);
    let patch =
        json!({"spec": {"ipPool": {"addresses": addresses}, "mta": {"storage": {"requireEncryptionAtRest": true}}}});
    informed_api
        .patch(&informed, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    storage_condition(
        client,
        &informed_ns,
        &informed,
        "StorageClassNotKnownToEncrypt",
        "requireEncryptionAtRest is true",
    )
    .await;
    let grown = reconciled(client, &informed_ns, &informed).await;
    assert_eq!(grown.status.and_then(|status| status.ips).as_deref(), Some("1/2"));
    assert_eq!(
        replicas(client, &informed_ns, &informed_set).await,
        Some(1),
        "scaled while held"
    );

    // The platform team attests the class: the held tenant gets its StatefulSet, the grown one its second pod.
    let attest = json!({"metadata": {"annotations": {"securemail.io/encrypted-at-rest": "true"}}});
    classes
        .patch(&plain, &PatchParams::default(), &Patch::Merge(&attest))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    storage_condition(client, &held_ns, &held, "EncryptionAttested", &plain).await;
    eventually("the held tenant's StatefulSet", WAIT, || async {
        (replicas(client, &held_ns, &held_set).await? == 1).then_some(())
    })
    .await;
    eventually("the grown tenant's second pod", WAIT, || async {
        (replicas(client, &informed_ns, &informed_set).await? == 2).then_some(())
    })
    .await;

    // No class named: the cluster default decides, the newest default when there are several, as the apiserver
    // picks it for the claims.
    let (plain_default, encrypting_default) = (format!("{prefix}-default"), format!("{prefix}-default-gce"));
    create_class(&classes, &plain_default, "example.org/plain-disk", &[], true).await;
    let (default_ns, defaulted) = storage_tenant(client, "storage-default", None, true).await;
    let part = format!("the cluster's default StorageClass {plain_default} ");
    storage_condition(client, &default_ns, &defaulted, "StorageClassNotKnownToEncrypt", &part).await;
    let default_set = format!("{defaulted}-mta");
    assert_eq!(replicas(client, &default_ns, &default_set).await, None);
    // Creation times have a resolution of one second: make the second default the newer one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    create_class(&classes, &encrypting_default, "pd.csi.storage.gke.io", &[], true).await;
    storage_condition(
        client,
        &default_ns,
        &defaulted,
        "EncryptingStorageClass",
        &encrypting_default,
    )
    .await;
    eventually("the defaulted tenant's StatefulSet", WAIT, || async {
        (replicas(client, &default_ns, &default_set).await? == 1).then_some(())
    })
    .await;

    for class in [&encrypting, &plain, &plain_default, &encrypting_default] {
        classes
            .delete(class, &DeleteParams::default())
            .await
            .unwrap_or_else(|err| panic!("StorageClass {class}: {err}"));
    }
    // Without a default the claims' class is unknown; the tenant's StatefulSet and its claims stay.
    storage_condition(
        client,
        &default_ns,
        &defaulted,
        "NoDefaultStorageClass",
        "no default StorageClass",
    )
    .await;
    assert_eq!(replicas(client, &default_ns, &default_set).await, Some(1));
}

async fn a_missing_secret_makes_the_config_invalid_until_it_appears(client: &Client, operator: &Operator) {
    let namespace = unique_namespace("missing-secret");
    let tenant = example("minimal.yaml", &namespace);
    let ca = tenant.spec.submission.client_certificates.ca_secret_name.clone();
    let tls = tenant.spec.submission.tls.secret_name.clone().unwrap_or_default();
    create_secret(client, &namespace, &tls, "Opaque", &["tls.crt", "tls.key"]).await;
    let name = create_tenant(client, &tenant).await.name_any();
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);

    let tenant = reconciled(client, &namespace, &name).await;
    let (status, reason, message) = condition(&tenant, "ConfigValid").unwrap_or_default();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "SecretMissing"),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "Secret {ca} (spec.submission.clientCertificates.caSecretName) does not exist"
        )) && message.contains(&format!(
            "Secret {tls} (spec.submission.tls.secretName) must be of type kubernetes.io/tls"
        )),
        "{message}"
    );
    assert_eq!(condition(&tenant, "Ready").map(|c| c.0).as_deref(), Some("False"));
    assert_children(client, &tenant).await;

    // Fixed without touching the tenant: the operator looks again by itself.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    secrets
        .delete(&tls, &DeleteParams::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    create_secret(client, &namespace, &tls, "kubernetes.io/tls", &["tls.crt", "tls.key"]).await;
    create_secret(client, &namespace, &ca, "Opaque", &["ca.crt"]).await;
    let tenant = eventually("ConfigValid once the Secrets exist", WAIT, || async {
        let tenant = api.get(&name).await.ok()?;
        (condition(&tenant, "ConfigValid")?.0 == "True").then_some(tenant)
    })
    .await;
    // The certificate's expiry, for the expiring-certificate alert: in status and in the operator's metrics.
    let expires = tenant
        .status
        .and_then(|status| status.submission_certificate_expires)
        .unwrap_or_else(|| panic!("no submissionCertificateExpires in the status"));
    let days = expires.0.duration_since(clock::now()).as_hours() / 24;
    assert!(
        (88..=90).contains(&days),
        "the 90-day test certificate expires in {days} days"
    );
    let series = format!(
        "securemail_operator_submission_certificate_expiry_timestamp_seconds{{tenant=\"{namespace}/{name}\"}} {}",
        expires.0.as_second()
    );
    eventually("the certificate expiry in the operator's metrics", WAIT, || async {
        operator.metrics().await.contains(&series).then_some(())
    })
    .await;
}

/// The tenant's events with `reason`, as (note, repeated count) pairs.
async fn events_with_reason(client: &Client, namespace: &str, reason: &str) -> Vec<(String, Option<i32>)> {
    Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|err| panic!("events: {err}"))
        .into_iter()
        .filter(|event| event.reason.as_deref() == Some(reason))
        .map(|event| (event.note.unwrap_or_default(), event.series.map(|series| series.count)))
        .collect()
}

/// The value of the operator's `securemail_operator_tenant_mta_unavailable` series for the tenant, by reason.
async fn unavailable_series(operator: &Operator, tenant: &str) -> Vec<String> {
    let prefix = format!("securemail_operator_tenant_mta_unavailable{{tenant=\"{tenant}\",");
    operator
        .metrics()
        .await
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

/// No kubelet here: the test writes the MTA pod's status as a kubelet would for an image that cannot be pulled, an
/// unschedulable pod and a crash loop, and the tenant must name the pod and the cause each time, with one event per
/// cause, a metric for the alert, and no writes while nothing changes; then it recovers when the pod is ready.
async fn pods_that_cannot_run_say_why_until_they_are_ready(client: &Client, operator: &Operator) {
    let namespace = unique_namespace("pod-failures");
    let name = create(client, &example("minimal.yaml", &namespace)).await.name_any();
    reconciled(client, &namespace, &name).await;
    let pod = create_mta_pod(client, &namespace, &name, 0).await;
    let pod_name = pod.name_any();
    let image = |container: &str| {
        pod.spec
            .as_ref()
            .and_then(|spec| spec.containers.iter().find(|c| c.name == container))
            .and_then(|c| c.image.clone())
            .unwrap_or_else(|| panic!("no {container} container in the pod template"))
    };
    let (postfix, sidecar) = (image("postfix"), image("sidecar"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let set_status = |status: serde_json::Value| {
        let (pods, pod_name) = (pods.clone(), pod_name.clone());
        async move {
            pods.patch_status(
                &pod_name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
            .unwrap_or_else(|err| panic!("pod status: {err}"));
        }
    };
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    let mta_says = |reason: &'static str, needle: String| {
        let (api, name) = (api.clone(), name.clone());
        async move {
            eventually(&format!("MtaAvailable {reason} naming {needle}"), WAIT, || async {
                let tenant = api.get(&name).await.ok()?;
                let (status, found, message) = condition(&tenant, "MtaAvailable")?;
                (status == "False" && found == reason && message.contains(&needle)).then_some(tenant)
            })
            .await
        }
    };
    let scheduled = json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": clock::now().to_string()});
    let sandbox = json!({"type": "PodReadyToStartContainers", "status": "True"});
    let container = |name: &str, image: &str, ready: bool, restarts: i32, state: serde_json::Value| json!({"name": name, "image": image, "imageID": "", "ready": ready, "restartCount": restarts, "state": state});
    let creating = json!({"waiting": {"reason": "ContainerCreating"}});

    // The image cannot be pulled.
    let back_off = format!("Back-off pulling image \"{postfix}\"");
    set_status(json!({"phase": "Pending", "conditions": [scheduled, sandbox], "containerStatuses": [
        container("postfix", &postfix, false, 0, json!({"waiting": {"reason": "ImagePullBackOff", "message": back_off}})),
        container("sidecar", &sidecar, false, 0, creating.clone()),
    ]}))
    .await;
    let detail =
        format!("pod {pod_name}: container postfix: image {postfix} cannot be pulled (ImagePullBackOff: {back_off})");
    let tenant = mta_says("ImagePullFailed", detail.clone()).await;
    assert_eq!(
        condition(&tenant, "Ready").map(|c| (c.0, c.1)),
        Some(("False".to_owned(), "ImagePullFailed".to_owned())),
        "Ready carries the same reason"
    );
    let tenant_label = format!("{namespace}/{name}");
    eventually("the unavailable tenant in the operator's metrics", WAIT, || async {
        (unavailable_series(operator, &tenant_label).await == ["reason=\"ImagePullFailed\"} 1"]).then_some(())
    })
    .await;
    let events = eventually("an ImagePullFailed event", WAIT, || async {
        let events = events_with_reason(client, &namespace, "ImagePullFailed").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert!(events[0].0.contains(&detail), "{events:?}");

    // Nothing changed: a reconcile writes nothing, no event either.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_writes = writes_by(OPERATOR_USER, &namespace);
    let before_reconciles = reconcile_count(operator).await;
    let patch = json!({"metadata": {"labels": {"touched": "yes"}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("label patch: {err}"));
    eventually("a reconcile after the label change", WAIT, || async {
        (reconcile_count(operator).await > before_reconciles).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        writes_by(OPERATOR_USER, &namespace)[before_writes.len()..],
        [] as [String; 0],
        "a reconcile of a tenant whose pod still cannot pull its image wrote to the apiserver"
    );

    // The kubelet's next try: the message follows it, but the cause is the same, so no new event.
    let pull_error = format!("failed to pull and unpack image \"{postfix}\": not found");
    set_status(json!({"containerStatuses": [
        container("postfix", &postfix, false, 0, json!({"waiting": {"reason": "ErrImagePull", "message": pull_error}})),
        container("sidecar", &sidecar, false, 0, creating.clone()),
    ]}))
    .await;
    mta_says("ImagePullFailed", format!("(ErrImagePull: {pull_error})")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = events_with_reason(client, &namespace, "ImagePullFailed").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].1, None, "the event was repeated: {events:?}");

    // No node for it: the scheduler's message.
    let unbound = "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/3 nodes \
                   are available: 3 Preemption is not helpful for scheduling.";
    set_status(json!({"phase": "Pending", "containerStatuses": null, "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unbound,
         "lastTransitionTime": clock::now().to_string()}]}))
    .await;
    mta_says(
        "Unschedulable",
        format!("pod {pod_name}: not scheduled: 0/3 nodes are available: pod has unbound"),
    )
    .await;
    eventually("an Unschedulable event", WAIT, || async {
        let events = events_with_reason(client, &namespace, "Unschedulable").await;
        events.iter().any(|(note, _)| note.contains(&pod_name)).then_some(())
    })
    .await;

    // A crash loop: restarts and the last exit, not what the program wrote.
    let terminated = json!({"terminated": {"reason": "Error", "exitCode": 1, "message": "fatal: do-not-copy"}});
    let mut looping = container(
        "postfix",
        &postfix,
        false,
        3,
        json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}}),
    );
    looping["lastState"] = terminated;
    let running = json!({"running": {"startedAt": clock::now().to_string()}});
    set_status(
        json!({"phase": "Running", "conditions": [scheduled, sandbox], "containerStatuses": [
        looping, container("sidecar", &sidecar, true, 0, running.clone())]}),
    )
    .await;
    let tenant = mta_says(
        "CrashLooping",
        format!("pod {pod_name}: container postfix keeps exiting: restarted 3 time(s), last exit Error (code 1)"),
    )
    .await;
    assert!(
        !serde_json::to_string(&tenant.status)
            .unwrap_or_default()
            .contains("do-not-copy"),
        "the termination message reached the status"
    );
    eventually("a CrashLooping event", WAIT, || async {
        (!events_with_reason(client, &namespace, "CrashLooping").await.is_empty()).then_some(())
    })
    .await;

    // Fixed: the pod runs and is ready, and so is the StatefulSet.
    let ready = json!({"type": "Ready", "status": "True"});
    set_status(
        json!({"phase": "Running", "conditions": [scheduled, sandbox, ready], "containerStatuses": [
        container("postfix", &postfix, true, 3, running.clone()),
        container("sidecar", &sidecar, true, 0, running)]}),
    )
    .await;
    pods_become_ready(client, &namespace, &name).await;
    eventually("MtaAvailable and Ready again", WAIT, || async {
        let tenant = api.get(&name).await.ok()?;
        let available = condition(&tenant, "MtaAvailable")?;
        let ready = condition(&tenant, "Ready")?;
        (available.0 == "True" && available.1 == "PodsReady" && ready.0 == "True").then_some(())
    })
    .await;
    eventually("a PodsReady event", WAIT, || async {
        (!events_with_reason(client, &namespace, "PodsReady").await.is_empty()).then_some(())
    })
    .await;
    eventually("the tenant gone from the unavailable metric", WAIT, || async {
        unavailable_series(operator, &tenant_label)
            .await
            .is_empty()
            .then_some(())
    })
    .await;
}

async fn the_warmup_loop_judges_yesterday_from_the_pods_status(client: &Client, operator: &Operator) {
    let namespace = unique_namespace("warmup-loop");
    let tenant = create(client, &example("minimal.yaml", &namespace)).await;
    let name = tenant.name_any();
    let spec = tenant.spec.ip_pool.warmup.clone();
    let address = tenant.spec.ip_pool.addresses[0].address.clone();
    let tenant = reconciled(client, &namespace, &name).await;
    let first = tenant.status.clone().unwrap_or_default().ip_pool;
    assert_eq!(first[0].warmup_day, Some(1), "{first:?}");
    let pod = FakeMtaPod::start(client, &namespace, &format!("{name}-mta"), 0, "127.0.0.78", 0).await;
    pod.set_field("address", json!(address));

    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    let yesterday = clock::today().yesterday().unwrap_or_else(|err| panic!("{err}"));
    let results = |delivered: u64, deferred: u64, bounced: u64| {
        let counts = json!({"delivered": delivered, "deferred": deferred, "bounced": bounced});
        json!({"date": yesterday.to_string(), "providers": {"gmail": counts}})
    };
    // As if the address had reached day 5 and was last judged yesterday: the next reconcile judges again.
    let day_five_judged_yesterday = || {
        let mut entry = serde_json::to_value(&first[0]).unwrap_or_default();
        entry["warmupDay"] = json!(5);
        entry["dailyLimit"] = json!(securemail_api::warmup::daily_limit(&spec, 5));
        entry["lastEvaluated"] = json!(format!("{yesterday}T00:00:30Z"));
        json!({"status": {"ipPool": [entry]}})
    };
    let judged = |expected_state: &'static str| {
        let api = api.clone();
        let name = name.clone();
        async move {
            eventually(&format!("the address {expected_state}"), WAIT, || async {
                let tenant = api.get(&name).await.ok()?;
                let entry = tenant.status?.ip_pool.into_iter().next()?;
                (serde_json::to_value(entry.state).ok()? == json!(expected_state)).then_some(entry)
            })
            .await
        }
    };

    // 10% bounces, five times the threshold: rolled back three days.
    pod.set_field("yesterday", results(90, 0, 10));
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&day_five_judged_yesterday()),
    )
    .await
    .unwrap_or_else(|err| panic!("{err}"));
    let rolled_back = judged("RolledBack").await;
    assert_eq!(rolled_back.warmup_day, Some(2), "{rolled_back:?}");
    assert!(
        rolled_back
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("bounce rate 10.0%")),
        "{rolled_back:?}"
    );
    assert_eq!(rolled_back.last_sent.as_deref(), Some(yesterday.to_string().as_str()));
    // The alerts' source: addresses by state across tenants.
    eventually("a rolled-back address in the operator's metrics", WAIT, || async {
        let text = operator.metrics().await;
        text.lines()
            .filter(|line| line.starts_with("securemail_operator_pool_addresses{state=\"RolledBack\"}"))
            .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
            .find(|count| *count >= 1.0)
    })
    .await;
    let limit = securemail_api::warmup::daily_limit(&spec, 2).unwrap_or_default();
    let config: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    eventually("the rolled-back limit in sidecar.yaml", WAIT, || async {
        let sidecar = config
            .get(&format!("{name}-mta-config"))
            .await
            .ok()?
            .data?
            .remove("sidecar-0.yaml")?;
        sidecar.contains(&format!("dailyLimit: {limit}")).then_some(())
    })
    .await;
    // The dashboard's warmup panel: day and limit of each address.
    let series = format!("{{tenant=\"{namespace}/{name}\",source_ip=\"{address}\"}}");
    eventually(
        "the rolled-back day and limit in the operator's metrics",
        WAIT,
        || async {
            let text = operator.metrics().await;
            let day = format!("securemail_operator_pool_address_warmup_day{series} 2");
            let daily_limit = format!("securemail_operator_pool_address_daily_limit{series} {limit}");
            (text.contains(&day) && text.contains(&daily_limit)).then_some(())
        },
    )
    .await;

    // A clean day advances it.
    pod.set_field("yesterday", results(100, 0, 0));
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&day_five_judged_yesterday()),
    )
    .await
    .unwrap_or_else(|err| panic!("{err}"));
    let advanced = eventually("a clean day advancing the address to day 6", WAIT, || async {
        let entry = api.get(&name).await.ok()?.status?.ip_pool.into_iter().next()?;
        (entry.warmup_day == Some(6)).then_some(entry)
    })
    .await;
    assert_eq!(serde_json::to_value(advanced.state).ok(), Some(json!("Warming")));
    assert_eq!(advanced.daily_limit, securemail_api::warmup::daily_limit(&spec, 6));

    // A day a provider mostly deferred (its circuit breaker's 421 4.7.28 storm, as the sidecar counts it): held.
    pod.set_field("yesterday", results(60, 40, 0));
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(&day_five_judged_yesterday()),
    )
    .await
    .unwrap_or_else(|err| panic!("{err}"));
    let held = judged("Held").await;
    assert_eq!(held.warmup_day, Some(5), "{held:?}");
    assert!(
        held.reason
            .as_deref()
            .is_some_and(|r| r.contains("deferral rate 40.0% over")),
        "{held:?}"
    );
    drop(pod);
}

async fn a_listed_address_is_named_with_its_zone(client: &Client, blocklist: &BlocklistServer) {
    let namespace = unique_namespace("dnsbl");
    let mut tenant = example("dedicated-warmup.yaml", &namespace);
    tenant.spec.ip_pool.dnsbl.zones = vec!["bl.e2e.test".into(), "clean.e2e.test".into()];
    let listed = tenant.spec.ip_pool.addresses[1].address.clone();
    blocklist.list(
        listed.parse().unwrap_or_else(|err| panic!("{err}")),
        "bl.e2e.test",
        "127.0.0.2".parse().unwrap_or_else(|err| panic!("{err}")),
    );
    let name = create(client, &tenant).await.name_any();
    let tenant = reconciled(client, &namespace, &name).await;
    let (status, reason, message) = condition(&tenant, "IpListed").unwrap_or_default();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Listed"), "{message}");
    assert_eq!(message, format!("{listed} is listed on bl.e2e.test (127.0.0.2)"));
    assert_eq!(
        condition(&tenant, "Ready").map(|c| c.1),
        condition(&tenant, "MtaAvailable").map(|c| c.1),
        "a listing is reported beside Ready, not in it"
    );

    // A zone that cannot answer is Unknown, never "not listed".
    let namespace = unique_namespace("dnsbl-broken");
    let mut tenant = example("minimal.yaml", &namespace);
    tenant.spec.ip_pool.dnsbl.zones = vec!["broken.e2e.test".into()];
    blocklist.break_zone("broken.e2e.test");
    let name = create(client, &tenant).await.name_any();
    let tenant = reconciled(client, &namespace, &name).await;
    let (status, reason, message) = condition(&tenant, "IpListed").unwrap_or_default();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("Unknown", "CheckFailed"),
        "{message}"
    );
    assert!(message.contains("on broken.e2e.test"), "{message}");
}

async fn deletion_follows_the_deletion_policy(client: &Client) {
    for (policy, keeps_owner) in [("Orphan", false), ("Drain", true)] {
        let namespace = unique_namespace(&policy.to_lowercase());
        let mut tenant = example("minimal.yaml", &namespace);
        tenant.spec.deletion_policy = serde_json::from_value(json!(policy)).unwrap_or_default();
        let tenant = create(client, &tenant).await;
        let name = tenant.name_any();
        let reconciled_tenant = reconciled(client, &namespace, &name).await;
        assert!(
            reconciled_tenant
                .finalizers()
                .iter()
                .any(|f| f == "securemail.io/drain")
        );

        let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
        api.delete(&name, &DeleteParams::default())
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        eventually(&format!("{policy} tenant gone"), WAIT, || async {
            api.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await;
        let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
        let owners = sts
            .get(&format!("{name}-mta"))
            .await
            .map(|s| s.owner_references().to_vec())
            .unwrap_or_else(|err| panic!("{policy}: StatefulSet gone without a garbage collector: {err}"));
        assert_eq!(!owners.is_empty(), keeps_owner, "{policy}: owner references {owners:?}");
    }
}

/// Stands in for the kubelet and a sidecar: a Pod object with an IP on loopback, its volume claim, and an HTTP
/// server on that IP answering `/status` with a queue depth and further fields (`report`) the test controls.
struct FakeMtaPod {
    queued: Arc<AtomicU64>,
    report: Arc<std::sync::Mutex<serde_json::Value>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeMtaPod {
    async fn start(client: &Client, namespace: &str, statefulset: &str, ordinal: u32, ip: &str, queued: u64) -> Self {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let name = format!("{statefulset}-{ordinal}");
        let tenant = statefulset.trim_end_matches("-mta");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {
                "securemail.io/tenant": tenant, "app.kubernetes.io/component": "mta",
                "securemail.io/submission": "enabled", "apps.kubernetes.io/pod-index": ordinal.to_string()}},
            "spec": {"containers": [{"name": "sidecar", "image": "sidecar"}]}
        }))
        .unwrap_or_else(|err| panic!("{err}"));
        pods.create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|err| panic!("pod {name}: {err}"));
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|err| panic!("pod status {name}: {err}"));
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": format!("data-{name}")},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
        }))
        .unwrap_or_else(|err| panic!("{err}"));
        claims
            .create(&PostParams::default(), &claim)
            .await
            .unwrap_or_else(|err| panic!("claim: {err}"));

        let queued = Arc::new(AtomicU64::new(queued));
        let listener = tokio::net::TcpListener::bind((ip, 9090))
            .await
            .unwrap_or_else(|err| panic!("cannot listen on {ip}:9090: {err}"));
        let report = Arc::new(std::sync::Mutex::new(json!({"address": ip})));
        let (depth, fields) = (queued.clone(), report.clone());
        let server = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let mut body = fields.lock().map(|fields| fields.clone()).unwrap_or_default();
                body["queue"] = json!({"messages": depth.load(Ordering::Relaxed)});
                let body = body.to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        Self { queued, report, server }
    }

    fn set_queued(&self, messages: u64) {
        self.queued.store(messages, Ordering::Relaxed);
    }

    /// Sets a top-level field of `/status`, e.g. the address the sidecar sends from or yesterday's results.
    fn set_field(&self, field: &str, value: serde_json::Value) {
        if let Ok(mut report) = self.report.lock() {
            report[field] = value;
        }
    }
}

impl Drop for FakeMtaPod {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn replicas(client: &Client, namespace: &str, statefulset: &str) -> Option<i32> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    api.get(statefulset).await.ok()?.spec?.replicas
}

/// The retention marks on a claim kept as delivery evidence: (retain-until, retained-from), or `None` while unmarked.
async fn retention_marks(client: &Client, namespace: &str, claim: &str) -> Option<(Timestamp, String)> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let claim = api.get_opt(claim).await.ok()??;
    if claim.metadata.deletion_timestamp.is_some()
        || claim
            .labels()
            .get("securemail.io/evidence-retained")
            .map(String::as_str)
            != Some("true")
    {
        return None;
    }
    let annotations = claim.annotations();
    let until = annotations.get("securemail.io/evidence-retain-until")?.parse().ok()?;
    Some((until, annotations.get("securemail.io/evidence-retained-from")?.clone()))
}

/// Asserts that `claim` is kept as evidence until `retention_days` after the operator's clock now, give or take the
/// time the test took.
async fn assert_retained(client: &Client, namespace: &str, claim: &str, retention_days: i64, from: &str) {
    let (until, retained_from) = eventually(&format!("{claim} kept as evidence"), WAIT, || async {
        retention_marks(client, namespace, claim).await
    })
    .await;
    let expected = clock::now() + SignedDuration::from_hours(24 * retention_days);
    assert!(
        until.duration_since(expected).abs() < SignedDuration::from_mins(10),
        "{claim} retained until {until}, expected about {expected}"
    );
    assert!(retained_from.contains(from), "{claim}: {retained_from}");
}

async fn claim_gone(client: &Client, namespace: &str, claim: &str) -> bool {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(claim).await {
        Ok(None) => true,
        Ok(Some(claim)) => claim.metadata.deletion_timestamp.is_some(),
        Err(_) => false,
    }
}

async fn a_shrinking_pool_drains_before_the_pod_goes_and_keeps_its_volume_as_evidence(client: &Client) {
    let namespace = unique_namespace("drain-shrink");
    let tenant = create(client, &example("dedicated-warmup.yaml", &namespace)).await;
    let name = tenant.name_any();
    let sts = format!("{name}-mta");
    reconciled(client, &namespace, &name).await;
    assert_eq!(replicas(client, &namespace, &sts).await, Some(3));
    let top = FakeMtaPod::start(client, &namespace, &sts, 2, "127.0.0.77", 5).await;

    // The middle address leaves the pool.
    let mut addresses = tenant.spec.ip_pool.addresses.clone();
    let departed = addresses.remove(1);
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    let patch = json!({"spec": {"ipPool": {"addresses": addresses}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("{err}"));

    let draining = eventually("the top pod draining", WAIT, || async {
        let tenant = api.get(&name).await.ok()?;
        let (status, reason, message) = condition(&tenant, "Draining")?;
        (status == "True" && message.contains("5 message(s) queued")).then_some((tenant, reason))
    })
    .await;
    assert_eq!(draining.1, "Draining");
    let entry = draining
        .0
        .status
        .unwrap_or_default()
        .ip_pool
        .into_iter()
        .find(|e| e.address == departed.address);
    assert_eq!(entry.as_ref().and_then(|e| e.ordinal), Some(2), "{entry:?}");
    assert_eq!(
        replicas(client, &namespace, &sts).await,
        Some(3),
        "the draining pod must stay"
    );
    let config: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let sidecar_2 = config
        .get(&format!("{name}-mta-config"))
        .await
        .ok()
        .and_then(|cm| cm.data?.get("sidecar-2.yaml").cloned())
        .unwrap_or_default();
    assert!(
        sidecar_2.contains(&departed.address),
        "the draining pod sends from the departed address: {sidecar_2}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let label = pods
        .get(&format!("{sts}-2"))
        .await
        .ok()
        .and_then(|pod| pod.labels().get("securemail.io/submission").cloned());
    assert_eq!(
        label.as_deref(),
        Some("draining"),
        "the draining pod left the submission Service"
    );
    assert!(!claim_gone(client, &namespace, &format!("data-{sts}-2")).await);

    // One empty reading is not enough: mail that shows up during the confirmation keeps the pod.
    top.set_queued(0);
    let draining_message =
        || async { condition(&api.get(&name).await.ok()?, "Draining").map(|(_, _, message)| message) };
    eventually("the empty queue being confirmed", WAIT, || async {
        draining_message()
            .await
            .filter(|m| m.contains("queue empty, confirming at"))
    })
    .await;
    let marked = pods
        .get(&format!("{sts}-2"))
        .await
        .ok()
        .and_then(|pod| pod.annotations().get("securemail.io/queue-empty-since").cloned());
    assert!(marked.is_some(), "the first empty reading is kept on the pod");
    top.set_queued(1);
    eventually("the late message seen", WAIT, || async {
        draining_message().await.filter(|m| m.contains("1 message(s) queued"))
    })
    .await;
    assert_eq!(
        replicas(client, &namespace, &sts).await,
        Some(3),
        "a late message keeps the pod"
    );
    assert!(!claim_gone(client, &namespace, &format!("data-{sts}-2")).await);
    let cleared = pods
        .get(&format!("{sts}-2"))
        .await
        .ok()
        .and_then(|pod| pod.annotations().get("securemail.io/queue-empty-since").cloned());
    assert_eq!(cleared, None, "a non-empty reading restarts the confirmation");

    // The chain heads its sidecar publishes are kept with its volume once it goes.
    let heads = json!({"files": [{"file": "evidence-20261201T000000.000000000Z.jsonl", "records": 3,
        "lastHash": "9f".repeat(32), "lastRecordTime": "2026-12-01T10:00:00Z"}], "pruned": []});
    top.set_field("evidence", heads.clone());
    top.set_queued(0);
    eventually("the drained pod removed", WAIT, || async {
        (replicas(client, &namespace, &sts).await == Some(2)).then_some(())
    })
    .await;
    // Its volume holds its delivery evidence: kept for the tenant's retention, naming the pod and its address.
    assert_retained(
        client,
        &namespace,
        &format!("data-{sts}-2"),
        i64::from(tenant.spec.audit.retention_days),
        &format!("pod {sts}-2 (address 127.0.0.77): left the pool"),
    )
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    let kept: Option<serde_json::Value> = claims
        .get(&format!("data-{sts}-2"))
        .await
        .ok()
        .and_then(|claim| claim.annotations().get("securemail.io/evidence-heads").cloned())
        .and_then(|heads| serde_json::from_str(&heads).ok());
    assert_eq!(kept, Some(heads), "the drained pod's chain heads on its volume claim");
    eventually("Draining cleared", WAIT, || async {
        (condition(&api.get(&name).await.ok()?, "Draining")?.0 == "False").then_some(())
    })
    .await;
}

async fn deleting_a_drain_tenant_waits_for_empty_queues(client: &Client) {
    let namespace = unique_namespace("drain-delete");
    let tenant = create(client, &example("minimal.yaml", &namespace)).await;
    let name = tenant.name_any();
    let sts = format!("{name}-mta");
    reconciled(client, &namespace, &name).await;
    let pod = FakeMtaPod::start(client, &namespace, &sts, 0, "127.0.0.78", 2).await;

    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    api.delete(&name, &DeleteParams::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    eventually("the deleted tenant draining", WAIT, || async {
        let tenant = api.get(&name).await.ok()?;
        let (status, reason, _) = condition(&tenant, "Draining")?;
        (status == "True" && reason == "TenantDeleted").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        api.get_opt(&name).await.ok().flatten().is_some(),
        "the tenant went before its queue was empty"
    );
    assert!(!claim_gone(client, &namespace, &format!("data-{sts}-0")).await);

    pod.set_queued(0);
    eventually("the drained tenant gone", WAIT, || async {
        api.get_opt(&name).await.ok()?.is_none().then_some(())
    })
    .await;
    assert_retained(
        client,
        &namespace,
        &format!("data-{sts}-0"),
        i64::from(tenant.spec.audit.retention_days),
        &format!("pod {sts}-0 (address 127.0.0.78): tenant deleted"),
    )
    .await;
}

/// The sweep of retained evidence volumes (every 2 s in this suite): a claim whose retention ended and that no pod
/// uses is deleted; one whose retention has not ended, or whose date cannot be read, stays; one a pod uses again is
/// unmarked, live again, whatever its date.
async fn retained_evidence_volumes_go_only_when_their_retention_ended(client: &Client) {
    let namespace = unique_namespace("evidence-sweep");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    let now = clock::now();
    let day = SignedDuration::from_hours(24);
    let cases = [
        ("data-ended-mta-0", Some(now - day), false),
        ("data-running-mta-0", Some(now + day), false),
        ("data-unreadable-mta-0", None, false),
        ("data-back-mta-0", Some(now - day), true),
    ];
    for (name, until, _) in &cases {
        let until = until.map_or_else(|| "in six years".to_owned(), |until| format!("{until:.0}"));
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {
                "app.kubernetes.io/managed-by": "securemail-operator", "securemail.io/evidence-retained": "true"},
                "annotations": {"securemail.io/evidence-retain-until": until,
                    "securemail.io/evidence-retained-from": "pod x-mta-0: left the pool"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
        }))
        .unwrap_or_else(|err| panic!("{err}"));
        claims
            .create(&PostParams::default(), &claim)
            .await
            .unwrap_or_else(|err| panic!("claim {name}: {err}"));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "back-mta-0"},
        "spec": {"containers": [{"name": "sidecar", "image": "sidecar"}]}
    }))
    .unwrap_or_else(|err| panic!("{err}"));
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|err| panic!("pod: {err}"));

    eventually("the ended claim deleted", WAIT, || async {
        claim_gone(client, &namespace, "data-ended-mta-0").await.then_some(())
    })
    .await;
    eventually("the claim in use unmarked", WAIT, || async {
        let claim = claims.get("data-back-mta-0").await.ok()?;
        (!claim.labels().contains_key("securemail.io/evidence-retained")
            && !claim.annotations().contains_key("securemail.io/evidence-retain-until"))
        .then_some(())
    })
    .await;
    // Several sweeps later the others are still there, marked as they were.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for name in ["data-running-mta-0", "data-unreadable-mta-0"] {
        let claim = claims.get(name).await.unwrap_or_else(|err| panic!("{name}: {err}"));
        assert!(claim.metadata.deletion_timestamp.is_none(), "{name} is being deleted");
        assert_eq!(
            claim
                .labels()
                .get("securemail.io/evidence-retained")
                .map(String::as_str),
            Some("true"),
            "{name}"
        );
    }
    assert!(!claim_gone(client, &namespace, "data-back-mta-0").await);
}

async fn the_submission_certificate_comes_from_cert_manager(client: &Client) {
    let namespace = unique_namespace("cert-manager");
    let tenant = example("dedicated-warmup.yaml", &namespace);
    let issuer = tenant
        .spec
        .submission
        .tls
        .issuer_ref
        .clone()
        .unwrap_or_else(|| panic!("the example uses an issuer"));
    let ca = tenant.spec.submission.client_certificates.ca_secret_name.clone();
    create_secret(client, &namespace, &ca, "Opaque", &["ca.crt"]).await;
    let name = create_tenant(client, &tenant).await.name_any();
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    let tenant = reconciled(client, &namespace, &name).await;
    let (status, reason, message) = condition(&tenant, "ConfigValid").unwrap_or_default();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "CertManagerMissing"),
        "{message}"
    );
    assert!(message.contains("cert-manager.io/v1"), "{message}");

    // The real CRD, from cert-manager's own Go module.
    securemail_e2e::install_third_party_crd("cert-manager", "certificates.cert-manager.io");
    let patch = json!({"metadata": {"labels": {"crd-installed": "yes"}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let service = format!("{name}-submission");
    let certificate = eventually("the Certificate", WAIT, || async {
        let output = securemail_e2e::kubectl(&["get", "certificates", "-n", &namespace, &service, "-o", "json"]);
        serde_json::from_slice::<serde_json::Value>(&output.stdout).ok()
    })
    .await;
    let spec = &certificate["spec"];
    assert_eq!(spec["secretName"], format!("{service}-tls"));
    assert_eq!(spec["issuerRef"]["name"], issuer.name.as_str());
    assert_eq!(spec["dnsNames"][1], format!("{service}.{namespace}.svc"));
    assert_eq!(spec["privateKey"]["rotationPolicy"], "Always");
    assert_eq!(certificate["metadata"]["ownerReferences"][0]["name"], name.as_str());
    // Requested, not issued yet: the Secret is what is missing now.
    eventually("ConfigValid waiting for the issued Secret", WAIT, || async {
        let (status, reason, _) = condition(&api.get(&name).await.ok()?, "ConfigValid")?;
        (status == "False" && reason == "SecretMissing").then_some(())
    })
    .await;

    // cert-manager's part, played by the test: the issued Secret appears.
    create_secret(
        client,
        &namespace,
        &format!("{service}-tls"),
        "kubernetes.io/tls",
        &["tls.crt", "tls.key"],
    )
    .await;
    eventually("ConfigValid once the certificate is issued", WAIT, || async {
        (condition(&api.get(&name).await.ok()?, "ConfigValid")?.0 == "True").then_some(())
    })
    .await;
}

async fn dns_endpoints_follow_the_external_dns_crd(client: &Client) {
    let namespace = unique_namespace("external-dns");
    let tenant = create(client, &example("dedicated-warmup.yaml", &namespace)).await;
    let name = tenant.name_any();
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
    let missing = eventually("DnsPublished without the CRD", WAIT, || async {
        let (status, reason, message) = condition(&api.get(&name).await.ok()?, "DnsPublished")?;
        (status == "False").then_some((reason, message))
    })
    .await;
    assert_eq!(missing.0, "CrdMissing", "{missing:?}");
    assert!(missing.1.contains("externaldns.k8s.io"), "{missing:?}");

    // The real CRD, from external-dns's own Go module.
    securemail_e2e::install_third_party_crd("external-dns", "dnsendpoints.externaldns.k8s.io");
    let patch = json!({"metadata": {"labels": {"crd-installed": "yes"}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let published = eventually("DnsPublished with the CRD", WAIT, || async {
        let tenant = api.get(&name).await.ok()?;
        (condition(&tenant, "DnsPublished")?.0 == "True").then_some(tenant)
    })
    .await;
    let records = published.status.unwrap_or_default().dns_records;
    let endpoint = securemail_e2e::kubectl_ok(&[
        "get",
        "dnsendpoints",
        "-n",
        &namespace,
        &format!("{name}-mta"),
        "-o",
        "json",
    ]);
    let endpoint: serde_json::Value = serde_json::from_str(&endpoint).unwrap_or_else(|err| panic!("{err}"));
    let endpoints = endpoint["spec"]["endpoints"].as_array().cloned().unwrap_or_default();
    assert_eq!(endpoints.len(), records.len());
    for record in &records {
        assert!(
            endpoints.iter().any(|e| e["dnsName"] == record.name.as_str()),
            "{} missing from the DNSEndpoint",
            record.name
        );
    }
    let dkim = endpoints
        .iter()
        .find(|e| e["dnsName"].as_str().is_some_and(|n| n.contains("._domainkey.")))
        .unwrap_or_else(|| panic!("no DKIM endpoint"));
    assert!(
        dkim["targets"][0]
            .as_str()
            .is_some_and(|t| t.starts_with("v=DKIM1; k=") && !t.contains('"'))
    );
    assert_eq!(endpoint["metadata"]["ownerReferences"][0]["name"], name.as_str());
}

/// What a tenant publishes or signs for `domain`, from the apiserver: key Secrets, status selectors and records,
/// its DNSEndpoint, its sidecar signing config and Postfix's envelope-sender table. Empty when it has nothing.
async fn traces_of_domain(client: &Client, tenant: &SecureMailTenant, domain: &str) -> Vec<String> {
    let namespace = tenant.namespace().unwrap_or_default();
    let name = tenant.name_any();
    let in_domain = |dns_name: &str| dns_name == domain || dns_name.ends_with(&format!(".{domain}"));
    let mut traces = Vec::new();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    for secret in secrets
        .list(&ListParams::default().labels(&format!(
            "securemail.io/tenant={name},app.kubernetes.io/component=dkim-key"
        )))
        .await
        .unwrap_or_else(|err| panic!("key Secrets: {err}"))
    {
        if secret
            .annotations()
            .get("securemail.io/dkim-domain")
            .map(String::as_str)
            == Some(domain)
        {
            traces.push(format!("key Secret {}", secret.name_any()));
        }
    }
    let status = tenant.status.clone().unwrap_or_default();
    for selector in status.dkim_selectors.iter().filter(|s| s.domain == domain) {
        traces.push(format!("status selector {}", selector.selector));
    }
    for record in status.dns_records.iter().filter(|r| in_domain(&r.name)) {
        traces.push(format!("status record {}", record.name));
    }
    let endpoint = securemail_e2e::kubectl(&[
        "get",
        "dnsendpoints",
        "-n",
        &namespace,
        &format!("{name}-mta"),
        "-o",
        "json",
    ]);
    assert!(
        endpoint.status.success(),
        "{}",
        String::from_utf8_lossy(&endpoint.stderr)
    );
    let endpoint: serde_json::Value = serde_json::from_slice(&endpoint.stdout).unwrap_or_else(|err| panic!("{err}"));
    for entry in endpoint["spec"]["endpoints"].as_array().cloned().unwrap_or_default() {
        if entry["dnsName"].as_str().is_some_and(in_domain) {
            traces.push(format!("DNSEndpoint entry {}", entry["dnsName"]));
        }
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let config = config_maps
        .get(&format!("{name}-mta-config"))
        .await
        .unwrap_or_else(|err| panic!("{err}"))
        .data
        .unwrap_or_default();
    for (file, text) in &config {
        if file.starts_with("sidecar-") {
            let sidecar: serde_yaml::Value = serde_yaml::from_str(text).unwrap_or_else(|err| panic!("{file}: {err}"));
            let signing = sidecar["signing"].as_sequence().cloned().unwrap_or_default();
            if signing.iter().any(|entry| entry["domain"].as_str() == Some(domain)) {
                traces.push(format!("signing entry in {file}"));
            }
        }
    }
    if config
        .get("main.cf")
        .is_some_and(|main| main.contains(&format!("{{ {domain} = OK }}")))
    {
        traces.push("envelope sender allowed in main.cf".to_owned());
    }
    traces
}

/// Two tenants in two namespaces list one domain, both publishing through external-dns: the first holds it across an
/// operator restart, the later one is told who holds it and gets nothing for it (its own domain and its pods work),
/// and deleting the first hands the domain over.
async fn a_domain_belongs_to_one_tenant_at_a_time(client: &Client, operator: Operator) -> Operator {
    securemail_e2e::install_third_party_crd("external-dns", "dnsendpoints.externaldns.k8s.io");
    let first_ns = unique_namespace("domain-a");
    let second_ns = unique_namespace("domain-b");
    let mut first = example("minimal.yaml", &first_ns);
    first.spec.dns.external_dns = true;
    let shared = first.spec.domains[0].name.clone();
    let first = create(client, &first).await;
    let first_name = first.name_any();
    let first_api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &first_ns);
    let holds = |tenant: &SecureMailTenant| {
        condition(tenant, "DkimReady").is_some_and(|c| c.0 == "True")
            && condition(tenant, "DnsPublished").is_some_and(|c| c.0 == "True")
            && tenant
                .status
                .as_ref()
                .is_some_and(|s| s.dkim_selectors.iter().any(|k| k.domain == shared))
    };
    eventually("the first tenant holds the domain", WAIT, || async {
        first_api.get(&first_name).await.ok().filter(|t| holds(t))
    })
    .await;
    let first_keys = key_secrets(client, &first_ns).await;

    // The later tenant lists the shared domain beside one of its own.
    let mut second = example("strict-tls-overrides.yaml", &second_ns);
    second.spec.dns.external_dns = true;
    second.spec.domains[0].name = shared.clone();
    let own = second.spec.domains[1].name.clone();
    let second = create(client, &second).await;
    let second_name = second.name_any();
    let second_api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &second_ns);
    let in_conflict = |tenant: &SecureMailTenant| {
        condition(tenant, "DomainConflict").is_some_and(|c| c.0 == "True")
            && condition(tenant, "DnsPublished").is_some_and(|c| c.0 == "True")
            && tenant
                .status
                .as_ref()
                .is_some_and(|s| s.dkim_selectors.iter().any(|k| k.domain == own))
    };
    eventually("the later tenant is told the domain is held", WAIT, || async {
        second_api.get(&second_name).await.ok().filter(|t| in_conflict(t))
    })
    .await;

    // A restarted operator decides the same from what the apiserver stores; a spec change makes it write status.
    let port = operator.admin_port;
    operator.kill();
    let operator = Operator::start(port + 1);
    let patch = json!({"spec": {"domains": [{"name": shared}, {"name": own, "dmarc": {"policy": "none"}}]}});
    second_api
        .patch(&second_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let second = reconciled(client, &second_ns, &second_name).await;
    assert!(
        reconcile_count(&operator).await > 0,
        "not reconciled by the restarted operator"
    );
    let (status, reason, message) = condition(&second, "DomainConflict").unwrap_or_default();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "DomainInUse"), "{message}");
    assert!(
        message.contains(&shared) && message.contains(&format!("{first_ns}/{first_name}")),
        "the condition names the domain and its holder: {message}"
    );
    assert_eq!(
        traces_of_domain(client, &second, &shared).await,
        Vec::<String>::new(),
        "the later tenant has something for the held domain"
    );
    // Everything else of it works: its own domain is signed and published, and it has a pod per address.
    let own_traces = traces_of_domain(client, &second, &own).await;
    for expected in ["key Secret", "DNSEndpoint entry", "signing entry", "envelope sender"] {
        assert!(
            own_traces.iter().any(|trace| trace.starts_with(expected)),
            "no {expected} for its own domain: {own_traces:?}"
        );
    }
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &second_ns);
    let replicas = sts
        .get(&format!("{second_name}-mta"))
        .await
        .ok()
        .and_then(|s| s.spec?.replicas);
    assert_eq!(replicas, Some(2));
    // The holder kept its keys and publishes the domain.
    let first = first_api.get(&first_name).await.unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        condition(&first, "DomainConflict").map(|c| c.0),
        Some("False".to_owned())
    );
    assert_eq!(key_secrets(client, &first_ns).await, first_keys);
    let first_traces = traces_of_domain(client, &first, &shared).await;
    assert!(
        first_traces.iter().any(|trace| trace.starts_with("DNSEndpoint entry")),
        "{first_traces:?}"
    );

    // The holder goes: the later tenant gets the domain without being touched.
    first_api
        .delete(&first_name, &DeleteParams::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let second = eventually("the domain handed over", WAIT, || async {
        let tenant = second_api.get(&second_name).await.ok()?;
        let free = condition(&tenant, "DomainConflict").is_some_and(|c| c.0 == "False");
        let keyed = tenant
            .status
            .as_ref()
            .is_some_and(|s| s.dkim_selectors.iter().any(|k| k.domain == shared));
        (free && keyed).then_some(tenant)
    })
    .await;
    let traces = traces_of_domain(client, &second, &shared).await;
    for expected in ["key Secret", "DNSEndpoint entry", "signing entry", "envelope sender"] {
        assert!(
            traces.iter().any(|trace| trace.starts_with(expected)),
            "no {expected} for the handed-over domain: {traces:?}"
        );
    }
    assert!(
        events_with_reason(client, &second_ns, "DomainInUse").await.len() == 1,
        "one warning when the conflict began"
    );
    operator
}
