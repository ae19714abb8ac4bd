//! Nothing lost on the test node (`make e2e-node`, the data-plane world linked as the node's Internet): a tenant with
//! two MTA pods sending through the world's SOCKS5 proxy to its DANE receiver, which answers 4xx for a while.
//! - Queued mail survives what happens to pods: one pod deleted (kubelet stops it with SIGTERM, the StatefulSet
//!   recreates it on the same volume), the other pod's containers killed with SIGKILL through the node's containerd
//!   (kubelet restarts them). Once the receiver accepts, every message is delivered exactly once, from the address
//!   of the pod that queued it, with one evidence record on that pod's volume.
//! - The pool shrinks while the departing pod holds mail: the pod leaves the submission Service, stays while its
//!   queue holds mail (the tenant's status says it is draining and what it holds), delivers from the address that
//!   left once the receiver accepts, and only then goes; the other pod is untouched. Its volume stays as delivery
//!   evidence, marked with its retention date and the chain heads its sidecar last published, and the evidence on it
//!   verifies against those heads (`securemail-sidecar evidence verify --heads`).
// Test support: a step that fails is a failed test, reported with the step's description.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::{Api, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_api::tenant::PoolAddressState;
use securemail_e2e::dataplane::{ReceiverSetting, World, run_ok, sidecar_bin};
use securemail_e2e::node::{TENANT_READY, cluster_dir, containers, mta_pods, ordinal, pod_ready, wait_for_conditions};
use securemail_e2e::node_mail::{
    MailTenant, Mode, NAMESPACE, evidence_of_delivery, onboard, pod_ip, proxy_addresses, publish_dns, queued, received,
    send_queued_now, submit, volume_dir, wait_delivered,
};
use securemail_e2e::{client, kubectl_ok};

const TENANT: &str = "queue-keeper";
/// The world's DANE receiver (`SMDP_RECEIVERS`), where the tenant's recipient lives.
const RECEIVER: &str = "dane";
/// Postfix's 4xx when the receiver refuses the tenant's addresses: Postfix keeps the message and retries.
const REFUSAL: &str = "421 4.3.2 System not accepting network messages";

/// The receiver answers 4xx to sessions from `addresses` until the returned setting is dropped. Sessions already
/// open (the sidecars keep delivery sessions for reuse) are ended, so the refusal applies at once.
fn refuse_from(world: &World, addresses: &[&str]) -> ReceiverSetting {
    let entries: Vec<String> = addresses
        .iter()
        .map(|address| format!("{{ {address} = {REFUSAL} }}"))
        .collect();
    let setting = ReceiverSetting::set(
        world,
        RECEIVER,
        "smtpd_client_restrictions",
        &format!("check_client_access inline:{{ {} }}", entries.join(", ")),
    );
    setting.end_open_sessions();
    setting
}

/// Waits until pod `pod`'s queue holds `count` messages, each deferred by the receiver's 4xx.
fn wait_deferred(pod: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let queue = queued(pod);
        let deferred = queue
            .iter()
            .filter(|entry| {
                entry["recipients"].as_array().into_iter().flatten().any(|recipient| {
                    recipient["delay_reason"]
                        .as_str()
                        .is_some_and(|reason| reason.contains("4.3.2"))
                })
            })
            .count();
        if deferred == count && queue.len() == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pod}: expected {count} messages deferred by the receiver's 4xx, the queue holds {queue:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Waits until pod `name` is Ready and `back` says it is back (recreated, or its containers restarted).
async fn wait_back(pods: &Api<Pod>, name: &str, back: impl Fn(&Pod) -> bool) -> Pod {
    let deadline = Instant::now() + TENANT_READY;
    loop {
        if let Some(pod) = pods.get_opt(name).await.expect("pod lookup")
            && back(&pod)
            && pod_ready(&pod)
        {
            return pod;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not back and Ready within {TENANT_READY:?}:\n{}",
            kubectl_ok(&["get", "pods", "-n", NAMESPACE, "-o", "wide"])
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// SIGKILL to every container of `pod` through the node's containerd, as when the node's processes die.
fn kill_containers(pod: &Pod) {
    let socket = cluster_dir().join("node/containerd/containerd.sock");
    let ids: Vec<String> = pod
        .status
        .as_ref()
        .and_then(|status| status.container_statuses.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|container| {
            let id = container.container_id.expect("a running container has an id");
            id.strip_prefix("containerd://")
                .unwrap_or_else(|| panic!("{id} is not a containerd container"))
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 2, "postfix and the sidecar");
    for id in ids {
        run_ok(
            Command::new("ctr")
                .arg("-a")
                .arg(&socket)
                .args(["-n", "k8s.io", "tasks", "kill", "-a", "-s", "SIGKILL", &id]),
        );
    }
}

/// Submits `count` messages to pod `pod` directly; returns their ids.
fn submit_to(tls: &Path, mail: &MailTenant, pod: &Pod, what: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|index| {
            let id = format!("{TENANT}-{}-{what}-{index}", std::process::id());
            submit(tls, mail, &pod_ip(pod), &id);
            id
        })
        .collect()
}

/// Asserts each message was received exactly once, from the address of pod `ordinal`, with one delivery record in
/// the evidence log on that pod's volume.
fn assert_delivered_once_by(world: &World, mail: &MailTenant, volume: &Path, ordinal: usize, ids: &[String]) {
    let (address, hostname) = &mail.pool[ordinal];
    for id in ids {
        assert_eq!(
            received(world, mail, id),
            [(address.clone(), hostname.clone())],
            "{id}: delivered once, from pod {ordinal}'s address"
        );
        let records = evidence_of_delivery(volume, mail, id);
        assert_eq!(
            records.len(),
            1,
            "{id}: one delivery record on pod {ordinal}'s volume: {records:?}"
        );
        assert_eq!(records[0]["sourceIp"].as_str(), Some(address.as_str()), "{id}");
    }
}

#[tokio::test]
async fn queued_mail_survives_a_deleted_pod_killed_containers_and_a_shrinking_pool_and_is_delivered_once() {
    let world = World::load();
    let client = client().await;
    let mail = MailTenant::new(
        Mode::Socks5Proxy,
        TENANT,
        "keeper.tenant.test",
        "keeper",
        &proxy_addresses(&world, 1),
    );
    let tls = onboard(&world, &mail);
    let tenants: Api<SecureMailTenant> = Api::namespaced(client.clone(), NAMESPACE);
    let tenant = wait_for_conditions(
        &tenants,
        NAMESPACE,
        TENANT,
        &[("Ready", "True"), ("MtaAvailable", "True"), ("EgressReady", "True")],
    )
    .await;
    publish_dns(&world, &mail, &tenant);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut mta = mta_pods(&client, NAMESPACE, TENANT).await;
    mta.sort_by_key(|pod| ordinal(&pod.name_any()));
    let names: Vec<String> = mta.iter().map(ResourceExt::name_any).collect();
    let volumes = [volume_dir(&client, &mail, 0).await, volume_dir(&client, &mail, 1).await];
    let addresses: Vec<&str> = mail.pool.iter().map(|(address, _)| address.as_str()).collect();

    // Both pods hold mail the receiver refuses for now.
    let refusing = refuse_from(&world, &addresses);
    let held: Vec<Vec<String>> = mta
        .iter()
        .map(|pod| submit_to(&tls, &mail, pod, &pod.name_any(), 3))
        .collect();
    for name in &names {
        wait_deferred(name, 3);
    }

    // Pod 0 deleted: kubelet stops it with SIGTERM and the StatefulSet recreates it on the same volume.
    let old_uid = mta[0].uid();
    kubectl_ok(&["delete", "pod", "-n", NAMESPACE, &names[0], "--timeout=60s"]);
    let recreated = wait_back(&pods, &names[0], |pod| pod.uid() != old_uid).await;
    assert_eq!(
        volume_dir(&client, &mail, 0).await,
        volumes[0],
        "the recreated pod's volume"
    );
    wait_deferred(&names[0], 3);
    println!(
        "{}: deleted, recreated on its volume, still holds its 3 messages",
        names[0]
    );

    // Pod 1's containers killed: kubelet restarts both in the same pod.
    let restarts = |pod: &Pod| {
        containers(pod)
            .iter()
            .map(|(_, _, _, count)| *count)
            .collect::<Vec<i32>>()
    };
    let before = restarts(&mta[1]);
    kill_containers(&mta[1]);
    wait_back(&pods, &names[1], |pod| {
        restarts(pod).iter().zip(&before).all(|(now, then)| now > then)
    })
    .await;
    wait_deferred(&names[1], 3);
    println!(
        "{}: both containers killed and restarted, still holds its 3 messages",
        names[1]
    );

    // The receiver accepts again: each message once, from the pod that held it.
    drop(refusing);
    for name in &names {
        send_queued_now(name);
    }
    let all: Vec<String> = held.concat();
    wait_delivered(&world, &mail, &all);
    for (index, ids) in held.iter().enumerate() {
        assert_delivered_once_by(&world, &mail, &volumes[index], index, ids);
    }
    for name in &names {
        assert!(queued(name).is_empty(), "{name}'s queue is empty after delivery");
    }

    // The pool shrinks while pod 1 holds mail the receiver refuses.
    let refusing = refuse_from(&world, &addresses[1..]);
    let mta1 = pods.get(&names[1]).await.expect("pod 1");
    let draining_ids = submit_to(&tls, &mail, &mta1, "draining", 3);
    wait_deferred(&names[1], 3);
    kubectl_ok(&[
        "patch",
        "smt",
        "-n",
        NAMESPACE,
        TENANT,
        "--type=json",
        "-p",
        r#"[{"op": "remove", "path": "/spec/ipPool/addresses/1"}]"#,
    ]);
    // The tenant says the address is draining with its mail queued; the pod leaves the submission Service and
    // stays, longer than the operator's drain confirmation, while its queue holds mail.
    let draining = |tenant: &SecureMailTenant| {
        tenant
            .status
            .as_ref()
            .into_iter()
            .flat_map(|status| status.ip_pool.iter())
            .find(|entry| entry.address == addresses[1] && entry.state == PoolAddressState::Draining)
            .and_then(|entry| entry.reason.clone())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tenant = tenants.get(TENANT).await.expect("tenant");
        if draining(&tenant).is_some_and(|reason| reason.contains("3 message(s) queued")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} not draining with 3 messages queued: {:?}",
            addresses[1],
            tenant.status.map(|status| status.ip_pool)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let held_since = Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let still = pods
        .get(&names[1])
        .await
        .expect("the draining pod stays while its queue holds mail");
    assert_eq!(still.uid(), mta1.uid(), "the draining pod was not replaced");
    assert_eq!(
        still.labels().get("securemail.io/submission").map(String::as_str),
        Some("draining"),
        "the draining pod left the submission Service"
    );
    wait_deferred(&names[1], 3);
    println!(
        "{}: draining with 3 messages queued, still there after {:?}",
        names[1],
        held_since.elapsed()
    );

    // The receiver accepts: the draining pod delivers from the address that left, then goes; pod 0 stays as it was.
    drop(refusing);
    send_queued_now(&names[1]);
    wait_delivered(&world, &mail, &draining_ids);
    assert_delivered_once_by(&world, &mail, &volumes[1], 1, &draining_ids);
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), NAMESPACE);
    let deadline = Instant::now() + TENANT_READY;
    while pods.get_opt(&names[1]).await.expect("pod lookup").is_some() {
        assert!(
            Instant::now() < deadline,
            "the drained pod {} still runs after {TENANT_READY:?}",
            names[1]
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let replicas = statefulsets
        .get(&format!("{TENANT}-mta"))
        .await
        .expect("the StatefulSet")
        .spec
        .and_then(|spec| spec.replicas);
    assert_eq!(replicas, Some(1), "one pod for the one address left");
    let remaining = pods.get(&names[0]).await.expect("pod 0");
    assert_eq!(remaining.uid(), recreated.uid(), "pod 0 was left alone");
    let tenant = wait_for_conditions(&tenants, NAMESPACE, TENANT, &[("Ready", "True")]).await;
    let pool: BTreeMap<String, PoolAddressState> = tenant
        .status
        .map(|status| {
            status
                .ip_pool
                .into_iter()
                .map(|entry| (entry.address, entry.state))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        pool.len() == 1 && pool.contains_key(addresses[0]),
        "the pool after the shrink: {pool:?}"
    );
    println!("{}: drained, delivered its 3 messages once, then removed", names[1]);
    evidence_kept_with_its_heads(&client, &volumes[1], &format!("data-{}", names[1])).await;
    assert_delivered_once_by(&world, &mail, &volumes[1], 1, &draining_ids);
    kubectl_ok(&["delete", "smt", "-n", NAMESPACE, TENANT, "--wait=false"]);
    std::fs::remove_dir_all(&tls).ok();
}

/// The volume claim `claim` of a pod that left is kept as delivery evidence: labelled, with a retention date and the
/// chain heads its sidecar last published, against which the evidence directory on `volume` verifies.
async fn evidence_kept_with_its_heads(client: &kube::Client, volume: &Path, claim: &str) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NAMESPACE);
    let kept = claims
        .get(claim)
        .await
        .expect("the departed pod's volume claim is kept");
    assert!(kept.metadata.deletion_timestamp.is_none(), "{claim} is being deleted");
    assert_eq!(
        kept.labels().get("securemail.io/evidence-retained").map(String::as_str),
        Some("true"),
        "{claim} marked as evidence"
    );
    let annotations = kept.annotations();
    assert!(
        annotations.contains_key("securemail.io/evidence-retain-until"),
        "{claim}: {annotations:?}"
    );
    let heads = annotations
        .get("securemail.io/evidence-heads")
        .unwrap_or_else(|| panic!("{claim} has no evidence heads: {annotations:?}"));
    let heads_file = cluster_dir().join(format!("{claim}-heads.json"));
    std::fs::write(&heads_file, heads).expect("heads written");
    let verified = run_ok(
        Command::new(sidecar_bin())
            .args(["evidence", "verify", "--heads"])
            .arg(&heads_file)
            .arg(volume.join("sidecar/evidence")),
    );
    println!("{claim}: kept as evidence; verify --heads: {}", verified.trim());
}
