//! Crash safety: the operator is killed with SIGKILL at random moments while 20 tenants reconcile, 20 times.
//! Afterwards every tenant converges with exactly one DKIM key per domain and algorithm (none lost, none
//! duplicated, the one in status is the one stored) and exactly its own children (no orphans).

use std::time::Duration;

use securemail_e2e::operator::Operator;
use securemail_e2e::tenants::{assert_converged, create_mix};
use securemail_e2e::{client, ensure_crd};

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
    let _blocklist = securemail_e2e::dnsbl::BlocklistServer::start();
    let mut seed = u64::from(std::process::id()) ^ 0x005e_c04e_4a11;
    let tenants = create_mix(&client, "crash", TENANTS).await;

    for kill in 0..KILLS {
        let operator = Operator::start_single(18_300 + u16::try_from(kill).unwrap_or(0));
        tokio::time::sleep(next_delay(&mut seed)).await;
        operator.kill();
    }

    let _survivor = Operator::start_single(18_299);
    for tenant in &tenants {
        assert_converged(&client, tenant, Duration::from_secs(120)).await;
    }
}
