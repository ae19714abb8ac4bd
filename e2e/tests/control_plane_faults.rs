//! Control-plane faults while tenants reconcile: the kube-apiserver, then etcd, is killed with SIGKILL and started
//! again with the same state a few times; two operator replicas with leader election start at once and the leader is
//! killed mid-way. Afterwards every tenant converges with exactly one DKIM key per domain and algorithm and exactly
//! its own children, and in the two-replica case the apiserver's audit log shows one writer at a time.
//!
//! The crash cases restart the shared control plane, so `make e2e` runs this suite last; its cases run one at a
//! time (they share the operator's Lease and the blocklist server's port).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_e2e::operator::{OPERATOR_USER, Operator};
use securemail_e2e::tenants::{assert_converged, converged_state, create_mix, is_converged};
use securemail_e2e::{AuditWrite, audit_writes, client, ensure_crd, eventually, kubectl, restart_control_plane};

const TENANTS: usize = 20;
/// Crashes of the component under test per case.
const RESTARTS: usize = 3;
/// The operator's Lease duration.
const LEASE_SECONDS: u64 = 15;
/// Longer than the operator's Lease, so it expires while the apiserver is gone.
const OUTAGE_SECONDS: u64 = 25;
/// Generous bound for convergence after the last fault; a healthy run needs a fraction of it.
const CONVERGE: Duration = Duration::from_secs(240);

/// Cases run one at a time: each restarts parts of the control plane or contends for the operator's Lease.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A small deterministic generator: the fault moments differ per run but need no extra crate.
fn next_delay(state: &mut u64) -> Duration {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    Duration::from_millis(200 + (*state >> 33) % 2_000)
}

/// What a Deployment does for an operator that exited: starts it again. An exit is accepted only when the operator
/// stopped on purpose because it could no longer be sure it held the Lease (exit status 1, said in its log); a
/// panic, a signal or any other failure fails the case.
fn supervise(mut operator: Operator, exits: &mut usize) -> Operator {
    let Some(status) = operator.exited() else {
        return operator;
    };
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    assert!(
        status.code() == Some(1) && log.contains("leader lease lost"),
        "the operator exited with {status}, not because it lost the Lease; last log lines (newest first):\n{}",
        tail.join("\n")
    );
    *exits += 1;
    operator.restart()
}

/// Waits, supervising the replicas, until every tenant in `tenants` converged.
async fn converge_supervised(
    client: &Client,
    tenants: &[SecureMailTenant],
    replicas: &mut Vec<Operator>,
    exits: &mut usize,
) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        *replicas = replicas.drain(..).map(|operator| supervise(operator, exits)).collect();
        let converged = converged_count(client, tenants).await;
        if converged == tenants.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {CONVERGE:?} only {converged} of {} tenants converged",
            tenants.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How many of `tenants` converged; a failed request (a component restarting) counts as none.
async fn converged_count(client: &Client, tenants: &[SecureMailTenant]) -> usize {
    let namespaces = namespaces_of(tenants);
    let api: Api<SecureMailTenant> = Api::all(client.clone());
    api.list(&ListParams::default()).await.map_or(0, |list| {
        list.items
            .iter()
            .filter(|tenant| namespaces.contains(&tenant.namespace().unwrap_or_default()) && is_converged(tenant))
            .count()
    })
}

fn namespaces_of(tenants: &[SecureMailTenant]) -> BTreeSet<String> {
    tenants
        .iter()
        .map(|tenant| tenant.namespace().unwrap_or_default())
        .collect()
}

/// The operator's writes in the tenants' namespaces, from the audit log.
fn writes_in(tenants: &[SecureMailTenant]) -> Vec<AuditWrite> {
    let namespaces = namespaces_of(tenants);
    audit_writes(OPERATOR_USER)
        .into_iter()
        .filter(|write| namespaces.contains(&write.namespace))
        .collect()
}

/// Whether `write` came from the replica named `identity` (the operator names it in its User-Agent).
fn from(write: &AuditWrite, identity: &str) -> bool {
    write.user_agent.ends_with(&format!("({identity})"))
}

/// 20 tenants, one operator with leader election (as the chart deploys it), `component` crashed and restarted
/// [`RESTARTS`] times at random moments while reconciles are in flight, the last time after `outage_seconds` down;
/// then every tenant converges with exactly one key per domain and algorithm and no
/// orphans, and the operator either kept running or exited only on purpose.
async fn crash_during_reconciles(component: &str, prefix: &str, admin_port: u16, outage_seconds: u64) {
    ensure_crd();
    let client = client().await;
    // Every address is "not listed" here; without a server, DNSBL lookups would only wait for their timeout.
    let _blocklist = securemail_e2e::dnsbl::BlocklistServer::start();
    let mut seed = u64::from(std::process::id()) ^ 0x00c0_417a_0e5e;
    let tenants = create_mix(&client, prefix, TENANTS).await;

    let mut operator = Operator::start(admin_port);
    let mut exits = 0;
    let mut downtimes = Vec::new();
    // Tenants already converged at each crash: fewer than all shows reconciles were in flight.
    let mut converged_before = Vec::new();
    for restart in 1..=RESTARTS {
        tokio::time::sleep(next_delay(&mut seed)).await;
        converged_before.push(converged_count(&client, &tenants).await);
        let component = component.to_owned();
        let down = if restart == RESTARTS { outage_seconds } else { 0 };
        let gone = tokio::task::spawn_blocking(move || restart_control_plane(&component, down))
            .await
            .unwrap_or_else(|err| panic!("restart: {err}"));
        downtimes.push(gone);
        operator = supervise(operator, &mut exits);
    }
    let after_last = Instant::now();
    let mut replicas = vec![operator];
    converge_supervised(&client, &tenants, &mut replicas, &mut exits).await;
    let converge_seconds = after_last.elapsed().as_secs_f64();
    assert!(
        outage_seconds <= LEASE_SECONDS || exits > 0,
        "the operator kept running through a {outage_seconds} s outage, longer than its {LEASE_SECONDS} s Lease: it \
         must stop before a standby may take the Lease over"
    );
    for tenant in &tenants {
        assert_converged(&client, tenant, CONVERGE).await;
    }
    let writes = writes_in(&tenants);
    assert!(
        writes.iter().all(|write| from(write, &replicas[0].identity())),
        "a write in a tenant namespace came from another client than the operator replica"
    );
    println!(
        "{component}: {RESTARTS} SIGKILL restarts (the last after {outage_seconds} s down) with {converged_before:?} of {TENANTS} tenants converged, apiserver \
         ready again after {downtimes:?} s; all converged {converge_seconds:.1} s after the last restart; operator \
         exits {exits}; operator writes {}",
        writes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_crashes_during_reconciles_converge_without_duplicates_or_orphans() {
    let _serial = SERIAL.lock().await;
    crash_during_reconciles("apiserver", "cp-apiserver", 18_701, 0).await;
}

/// The apiserver stays gone longer than the Lease: the operator cannot renew it, so it must stop before a standby
/// could take the Lease over (and is started again, as its Deployment would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_outage_longer_than_the_lease_converges() {
    let _serial = SERIAL.lock().await;
    crash_during_reconciles("apiserver", "cp-outage", 18_703, OUTAGE_SECONDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_crashes_during_reconciles_converge_without_duplicates_or_orphans() {
    let _serial = SERIAL.lock().await;
    crash_during_reconciles("etcd", "cp-etcd", 18_702, 0).await;
}

/// The holder of the operator's Lease, if any.
fn lease_holder() -> Option<String> {
    let output = kubectl(&[
        "get",
        "lease",
        "securemail-operator",
        "-n",
        "securemail-system",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    let holder = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !holder.is_empty()).then_some(holder)
}

/// Sums the operator's reconciles of every result.
async fn reconciles(operator: &Operator) -> u64 {
    operator
        .metrics()
        .await
        .lines()
        .filter(|line| line.starts_with("securemail_operator_reconciles_total{"))
        .filter_map(|line| line.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// Starts two replicas with leader election at once; returns them as (leader, standby) once one holds the Lease.
async fn two_replicas(first_port: u16, second_port: u16) -> (Operator, Operator) {
    let first = Operator::start(first_port);
    let second = Operator::start(second_port);
    let identities = [first.identity(), second.identity()];
    // A Lease left by an earlier case's killed operator expires first.
    let holder = eventually("one of the two replicas holds the Lease", CONVERGE, || async {
        lease_holder().filter(|holder| identities.contains(holder))
    })
    .await;
    if holder == first.identity() {
        (first, second)
    } else {
        (second, first)
    }
}

/// The replica a write came from: the operator names its identity in parentheses at the end of its User-Agent.
fn identity_of(write: &AuditWrite) -> &str {
    write
        .user_agent
        .rsplit_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_default()
}

/// One writer at a time, from the apiserver's audit log in the order it logged requests: every write in the tenants'
/// namespaces comes from the replica whose Lease write (acquiring, renewing or releasing it) succeeded last, so a
/// replica that lost the Lease writes nothing until it holds it again.
fn assert_one_writer(tenants: &[SecureMailTenant]) {
    let namespaces = namespaces_of(tenants);
    let mut holder: Option<String> = None;
    for write in audit_writes(OPERATOR_USER) {
        if write.namespace == "securemail-system" && write.resource == "leases" && write.name == "securemail-operator" {
            if (200..300).contains(&write.code) {
                holder = Some(identity_of(&write).to_owned());
            }
        } else if namespaces.contains(&write.namespace) {
            assert_eq!(
                holder.as_deref(),
                Some(identity_of(&write)),
                "a write from a replica that did not hold the Lease: {write:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_have_one_writer_and_the_standby_finishes_what_a_killed_leader_started() {
    let _serial = SERIAL.lock().await;
    ensure_crd();
    let client = client().await;
    let _blocklist = securemail_e2e::dnsbl::BlocklistServer::start();
    let tenants = create_mix(&client, "cp-replicas", TENANTS).await;

    let (leader, standby) = two_replicas(18_711, 18_712).await;
    let (leader_id, standby_id) = (leader.identity(), standby.identity());

    // Mid-way: the leader has started writing for the new tenants.
    eventually("the leader's first write for the new tenants", CONVERGE, || async {
        writes_in(&tenants)
            .iter()
            .any(|write| from(write, &leader_id))
            .then_some(())
    })
    .await;
    let converged_at_kill = converged_count(&client, &tenants).await;
    let killed_at = leader.kill();

    let mut exits = 0;
    let mut replicas = vec![standby];
    converge_supervised(&client, &tenants, &mut replicas, &mut exits).await;
    let converge_seconds = jiff::Timestamp::now().duration_since(killed_at).as_secs_f64();
    assert_eq!(exits, 0, "the standby exited after taking over");
    assert_eq!(lease_holder().as_deref(), Some(standby_id.as_str()));
    let mut states = Vec::new();
    for tenant in &tenants {
        let converged = assert_converged(&client, tenant, CONVERGE).await;
        states.push(converged_state(&client, &converged).await);
    }

    let writes = writes_in(&tenants);
    let by_leader: Vec<&AuditWrite> = writes.iter().filter(|write| from(write, &leader_id)).collect();
    let by_standby: Vec<&AuditWrite> = writes.iter().filter(|write| from(write, &standby_id)).collect();
    assert_eq!(
        by_leader.len() + by_standby.len(),
        writes.len(),
        "writes from neither replica: {writes:?}"
    );
    // One writer at a time: the standby wrote nothing before the leader died, the leader nothing afterwards.
    let late: Vec<_> = by_leader.iter().filter(|write| write.received >= killed_at).collect();
    assert!(late.is_empty(), "the killed leader wrote after its death: {late:?}");
    let early: Vec<_> = by_standby.iter().filter(|write| write.received <= killed_at).collect();
    assert!(
        early.is_empty(),
        "the standby wrote while the leader held the Lease: {early:?}"
    );
    assert_one_writer(&tenants);
    let takeover = by_standby
        .first()
        .map(|write| write.received.duration_since(killed_at).as_secs_f64());

    // Identical to what one operator produces: a fresh single replica finds nothing to change for these tenants
    // (it writes whenever a child's desired content or the status differs), and the state reads the same.
    drop(replicas);
    let single = Operator::start_single(18_713);
    let total = Api::<SecureMailTenant>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|err| panic!("tenants: {err}"))
        .items
        .len();
    eventually("a single replica's pass over every tenant", CONVERGE, || async {
        (reconciles(&single).await >= u64::try_from(total).unwrap_or(u64::MAX)).then_some(())
    })
    .await;
    let single_writes: Vec<AuditWrite> = writes_in(&tenants)
        .into_iter()
        .filter(|write| from(write, &single.identity()))
        .collect();
    assert!(
        single_writes.is_empty(),
        "a single operator changed what the two replicas left: {single_writes:?}"
    );
    for (tenant, state) in tenants.iter().zip(&states) {
        assert_eq!(
            &converged_state(&client, tenant).await,
            state,
            "{}: the state changed under a single operator",
            tenant.namespace().unwrap_or_default()
        );
    }
    println!(
        "two replicas: leader {leader_id} killed after {} writes ({converged_at_kill} of {TENANTS} tenants converged); standby {standby_id} first wrote {takeover:?} s \
         later, made {} writes, all {TENANTS} tenants converged {converge_seconds:.1} s after the kill; \
         a single operator's pass over {total} tenants wrote 0",
        by_leader.len(),
        by_standby.len()
    );
}
