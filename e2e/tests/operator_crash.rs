//! Crash safety: the operator is killed with SIGKILL at random moments while 20 tenants reconcile, 20 times.
//! Afterwards every tenant converges with exactly one DKIM key per domain and algorithm (none lost, none
//! duplicated, the one in status is the one stored) and exactly its own children (no orphans).

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_api::tenant::DkimSelectorState;
use securemail_e2e::operator::Operator;
use securemail_e2e::tenants::{assert_children, condition, create, example};
use securemail_e2e::{client, ensure_crd, eventually, unique_namespace};

const TENANTS: usize = 20;
const KILLS: usize = 20;

/// A small deterministic generator: the kill moments differ per run but need no extra crate.
fn next_delay(state: &mut u64) -> Duration {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    Duration::from_millis(50 + (*state >> 33) % 1_500)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_operators_leave_no_lost_duplicate_or_orphaned_keys() {
    ensure_crd();
    let client = client().await;
    // Every address is "not listed" here; without a server, DNSBL lookups would only wait for their timeout.
    let _blocklist = securemail_e2e::dnsbl::BlocklistServer::start().await;
    let mut seed = u64::from(std::process::id()) ^ 0x005e_c04e_4a11;
    let mut tenants = Vec::new();
    for index in 0..TENANTS {
        let namespace = unique_namespace("crash");
        // Every third tenant dual-signs, so some reconciles generate two keys.
        let file = if index % 3 == 0 {
            "dedicated-warmup.yaml"
        } else {
            "minimal.yaml"
        };
        tenants.push(create(&client, &example(file, &namespace)).await);
    }

    for kill in 0..KILLS {
        let operator = Operator::start_single(18_300 + u16::try_from(kill).unwrap_or(0));
        tokio::time::sleep(next_delay(&mut seed)).await;
        operator.kill();
    }

    let _survivor = Operator::start_single(18_299);
    for tenant in &tenants {
        let namespace = tenant.namespace().unwrap_or_default();
        let name = tenant.name_any();
        let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &namespace);
        let converged = eventually(
            &format!("{namespace}/{name} converged"),
            Duration::from_secs(120),
            || async {
                let tenant = api.get(&name).await.ok()?;
                let current = tenant.status.as_ref()?.observed_generation == tenant.metadata.generation;
                (current && condition(&tenant, "DkimReady")?.0 == "True").then_some(tenant)
            },
        )
        .await;
        assert_children(&client, &converged).await;

        let status = converged.status.clone().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let stored: Vec<String> = secrets
            .list(&ListParams::default().labels("app.kubernetes.io/component=dkim-key"))
            .await
            .unwrap_or_else(|err| panic!("key Secrets: {err}"))
            .iter()
            .filter_map(|secret| secret.labels().get("securemail.io/dkim-selector").cloned())
            .collect();
        let mut recorded: Vec<String> = status
            .dkim_selectors
            .iter()
            .filter(|selector| selector.state == DkimSelectorState::Active)
            .map(|selector| selector.selector.clone())
            .collect();
        recorded.sort();
        let mut stored_sorted = stored.clone();
        stored_sorted.sort();
        assert_eq!(stored_sorted, recorded, "{namespace}: stored keys and status disagree");
        assert!(
            recorded.iter().all(|selector| selector.ends_with("-1")),
            "{namespace}: a key was generated more than once: {recorded:?}"
        );
    }
}
