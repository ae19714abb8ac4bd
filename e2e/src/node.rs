//! Helpers for the suites on the test node (`make e2e-node`): MTA pods, their containers and logs, and waiting for a
//! tenant's conditions.
// Test support: a step that fails is a failed test, reported with the step's description.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use securemail_api::SecureMailTenant;

use crate::tenants::condition;
use crate::{kubeconfig, kubectl, kubectl_ok};

/// From `kubectl apply` to Ready, key generation and volume provisioning included; a warm node needs a fraction.
pub const TENANT_READY: Duration = Duration::from_secs(240);

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
}

/// Each container of `pod` with its image, ready flag and restart count.
pub fn containers(pod: &Pod) -> Vec<(String, String, bool, i32)> {
    pod.status
        .as_ref()
        .and_then(|status| status.container_statuses.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|container| {
            (
                container.name,
                container.image,
                container.ready,
                container.restart_count,
            )
        })
        .collect()
}

pub fn logs(namespace: &str, pod: &str, container: &str) -> String {
    kubectl_ok(&["logs", "-n", namespace, pod, "-c", container])
}

/// The MTA pods of tenant `namespace/tenant`.
pub async fn mta_pods(client: &Client, namespace: &str, tenant: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.list(&ListParams::default().labels(&format!(
        "app.kubernetes.io/component=mta,securemail.io/tenant={tenant}"
    )))
    .await
    .unwrap_or_else(|err| panic!("MTA pods of {namespace}/{tenant}: {err}"))
    .items
}

/// Waits until the tenant is Ready=True with MtaAvailable=True for its current generation.
pub async fn wait_ready(tenants: &Api<SecureMailTenant>, namespace: &str, name: &str) -> SecureMailTenant {
    wait_for_conditions(tenants, namespace, name, &[("Ready", "True"), ("MtaAvailable", "True")]).await
}

/// Waits up to [`TENANT_READY`] until each `(type, status)` of `wanted` holds for the tenant's current generation;
/// on timeout the panic shows its conditions, its pods and the namespace's events, which say why.
pub async fn wait_for_conditions(
    tenants: &Api<SecureMailTenant>,
    namespace: &str,
    name: &str,
    wanted: &[(&str, &str)],
) -> SecureMailTenant {
    let deadline = Instant::now() + TENANT_READY;
    loop {
        if let Ok(tenant) = tenants.get(name).await {
            let current = tenant
                .status
                .as_ref()
                .is_some_and(|status| status.observed_generation == tenant.metadata.generation);
            let holds = wanted
                .iter()
                .all(|(type_, want)| condition(&tenant, type_).is_some_and(|(status, _, _)| status == *want));
            if current && holds {
                return tenant;
            }
        }
        if Instant::now() > deadline {
            let show = |args: &[&str]| String::from_utf8_lossy(&kubectl(args).stdout).into_owned();
            panic!(
                "{namespace}/{name} not {wanted:?} after {TENANT_READY:?}\nconditions:\n{}\npods:\n{}\nevents:\n{}",
                show(&[
                    "get",
                    "smt",
                    "-n",
                    namespace,
                    name,
                    "-o",
                    "jsonpath={range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{\"\\n\"}{end}"
                ]),
                show(&["get", "pods", "-n", namespace, "-o", "wide"]),
                show(&["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"]),
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A StatefulSet pod's ordinal, from its name.
pub fn ordinal(pod: &str) -> usize {
    pod.rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse().ok())
        .unwrap_or_else(|| panic!("{pod} is not a StatefulSet pod"))
}

/// The test cluster's state directory (`SECUREMAIL_CLUSTER_DIR`), where its kubeconfig lives.
pub fn cluster_dir() -> PathBuf {
    Path::new(&kubeconfig())
        .parent()
        .map(Path::to_path_buf)
        .expect("the kubeconfig lives in the cluster directory")
}

/// Puts `address` on pod `namespace/pod`'s interface (`action` "add"), as a platform does for egress mode None, or
/// takes it away ("del"): `e2e/node/pod-address.sh`.
pub fn pod_address(action: &str, namespace: &str, pod: &str, address: &str) {
    let script = crate::repo_root().join("e2e/node/pod-address.sh");
    let output = Command::new(&script)
        .args([action, namespace, pod, address])
        .env("KUBECONFIG", kubeconfig())
        .env("SECUREMAIL_CLUSTER_DIR", cluster_dir())
        .output()
        .unwrap_or_else(|err| panic!("{}: {err}", script.display()));
    assert!(
        output.status.success(),
        "pod-address.sh {action} {namespace} {pod} {address}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The platform's part of egress mode None for a tenant on the test node: once its sidecars run and report they
/// cannot send (`EgressReady=False`), each MTA pod gets the pool address of its ordinal. Returns that tenant.
pub async fn give_pods_their_addresses(
    client: &Client,
    tenants: &Api<SecureMailTenant>,
    namespace: &str,
    name: &str,
) -> SecureMailTenant {
    let tenant = wait_for_conditions(tenants, namespace, name, &[("EgressReady", "False")]).await;
    for pod in mta_pods(client, namespace, name).await {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let address = &tenant.spec.ip_pool.addresses[ordinal(&pod_name)].address;
        pod_address("add", namespace, &pod_name, address);
    }
    tenant
}
