//! Never lose queued mail: a pod goes only after its sidecar reports an empty queue, and reports it again at least
//! the confirmation period later (`--drain-confirmation-seconds`). Its volume then stays as delivery evidence
//! (crate::evidence_retention). One empty reading is
//! not enough: a submission accepted just before the pod left the Service, or a message Postfix is moving between
//! queues, can show up after it. The first empty reading is kept on the pod as an annotation, so an operator
//! restart neither loses nor shortens the wait; any non-empty or unknown reading clears it.
//!
//! Pods are removed from the top of the StatefulSet. When the pool shrinks, the surplus top pods keep running as
//! *draining* pods: they leave the submission Service and deliver what they hold, each from one of the addresses
//! that left the pool (so no address is ever used by two pods). Tenant deletion with `deletionPolicy: Drain` drains
//! every pod the same way before the finalizer lets go.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use securemail_api::tenant::{PoolAddress, PoolAddressState, PoolAddressStatus};
use serde_json::json;

use crate::build::PodAssignment;
use crate::context::Context;
use crate::evidence_retention::{self, LastReport};
use crate::names::{SUBMISSION_LABEL, TenantNames};
use crate::pod_status;
use crate::{Error, Result};

/// Postfix bounces anything it could not deliver within 5 days (`maximal_queue_lifetime`), so a queue that is still
/// not empty after 6 days means something is wrong: the `Draining` condition says so, but nothing is deleted.
pub const MAX_DRAIN: Duration = Duration::from_secs(6 * 24 * 3600);
/// Name of the StatefulSet's volume claim template.
pub const DATA_CLAIM: &str = "data";
/// On a draining pod: when its sidecar first reported an empty queue (RFC 3339), cleared by any other reading.
pub const QUEUE_EMPTY_SINCE: &str = "securemail.io/queue-empty-since";

/// What is known about one pod's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueState {
    /// The sidecar reported no queued messages.
    Empty,
    /// Neither pod nor volume exists: nothing can be queued.
    NoVolume,
    /// The sidecar reported this many queued messages.
    Holding(u64),
    /// Empty, but not yet for the whole confirmation period; confirmed at `until`.
    Confirming { until: Timestamp },
    /// The queue could not be read; it may hold mail.
    Unknown(String),
}

impl QueueState {
    /// True when removing the pod and its volume cannot lose mail.
    pub fn is_drained(&self) -> bool {
        matches!(self, Self::Empty | Self::NoVolume)
    }

    fn describe(&self) -> String {
        match self {
            Self::Empty | Self::NoVolume => "queue empty".to_owned(),
            Self::Holding(messages) => format!("{messages} message(s) queued"),
            Self::Confirming { until } => format!("queue empty, confirming at {until:.0}"),
            Self::Unknown(reason) => format!("queue unknown ({reason})"),
        }
    }
}

/// The pods of a tenant after taking draining pods into account.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolPlan {
    /// Every pod the StatefulSet keeps, in ordinal order: the pool's, then the draining ones.
    pub pods: Vec<PodAssignment>,
    /// Draining pods with their address and what their queue holds.
    pub draining: Vec<(u32, PoolAddress, QueueState)>,
    /// Ordinals that were drained and are now removed; their volumes can go.
    pub removed: Vec<u32>,
}

/// Decides which pods stay. `pool` are the pods the spec wants (ordinals 0..n); `live_replicas` the StatefulSet's
/// current size; `recorded` the previous `status.ipPool`; `queues` what each surplus pod's queue holds.
pub fn plan(
    pool: Vec<PodAssignment>,
    live_replicas: u32,
    recorded: &[PoolAddressStatus],
    queues: &BTreeMap<u32, QueueState>,
) -> PoolPlan {
    let wanted = u32::try_from(pool.len()).unwrap_or(u32::MAX);
    let in_pool = |address: &str| pool.iter().any(|pod| pod.address.address == address);
    // Addresses that left the pool, in their old pod order: each draining pod sends from one of them.
    let mut departed: Vec<&PoolAddressStatus> = recorded
        .iter()
        .filter(|status| status.ordinal.is_some() && !in_pool(&status.address))
        .collect();
    departed.sort_by_key(|status| status.ordinal);
    let surplus: Vec<u32> = (wanted..live_replicas).collect();
    // The StatefulSet can only drop its top pods: keep everything up to the highest one not yet drained.
    let keep = surplus
        .iter()
        .rev()
        .find(|ordinal| !queues.get(ordinal).is_some_and(QueueState::is_drained))
        .map_or(wanted, |ordinal| ordinal + 1);

    let mut pods = pool;
    let mut draining = Vec::new();
    for (index, ordinal) in (wanted..keep).enumerate() {
        let previous = recorded.iter().find(|status| status.ordinal == Some(ordinal));
        let address = departed.get(index).or(previous.as_ref()).map(|status| PoolAddress {
            address: status.address.clone(),
            hostname: status.hostname.clone().unwrap_or_default(),
        });
        let Some(address) = address else { continue };
        let state = queues
            .get(&ordinal)
            .cloned()
            .unwrap_or(QueueState::Unknown("not checked".to_owned()));
        pods.push(PodAssignment {
            ordinal,
            address: address.clone(),
            warmup_day: previous.and_then(|status| status.warmup_day),
            daily_limit: previous.and_then(|status| status.daily_limit),
            draining: true,
        });
        draining.push((ordinal, address, state));
    }
    PoolPlan {
        pods,
        draining,
        removed: (keep..live_replicas).collect(),
    }
}

/// Status entries of draining pods (the pool's own entries are built by `status::pool_status`).
pub fn draining_status(plan: &PoolPlan, recorded: &[PoolAddressStatus], now: Timestamp) -> Vec<PoolAddressStatus> {
    plan.draining
        .iter()
        .map(|(ordinal, address, state)| {
            let previous = recorded
                .iter()
                .find(|status| status.address == address.address && status.state == PoolAddressState::Draining);
            let since = previous
                .and_then(|status| status.last_evaluated.clone())
                .unwrap_or(Time(now));
            let overdue = now.duration_since(since.0).unsigned_abs() > MAX_DRAIN;
            let mut reason = format!("leaving the pool: {}", state.describe());
            if overdue {
                reason.push_str("; still not empty after the maximum drain time, inspect the pod's queue");
            }
            PoolAddressStatus {
                address: address.address.clone(),
                hostname: Some(address.hostname.clone()),
                ordinal: Some(*ordinal),
                warmup_start: previous.and_then(|status| status.warmup_start.clone()),
                warmup_day: previous.and_then(|status| status.warmup_day),
                daily_limit: previous.and_then(|status| status.daily_limit),
                state: PoolAddressState::Draining,
                reason: Some(reason),
                // Draining since: kept from the first time the address was seen draining.
                last_evaluated: Some(since),
                last_sent: previous.and_then(|status| status.last_sent.clone()),
            }
        })
        .collect()
}

/// When to look at the draining pods again: just after the earliest pending confirmation, at the latest after
/// `recheck`.
pub fn recheck_after(plan: &PoolPlan, now: Timestamp, recheck: Duration) -> Duration {
    plan.draining
        .iter()
        .filter_map(|(_, _, state)| match state {
            QueueState::Confirming { until } => {
                Some(Duration::try_from(until.duration_since(now)).unwrap_or(Duration::ZERO) + Duration::from_secs(1))
            }
            _ => None,
        })
        .fold(recheck, Duration::min)
}

/// True when a draining pod has waited longer than [`MAX_DRAIN`].
pub fn overdue(status: &[PoolAddressStatus], now: Timestamp) -> Vec<String> {
    status
        .iter()
        .filter(|entry| entry.state == PoolAddressState::Draining)
        .filter(|entry| {
            entry
                .last_evaluated
                .as_ref()
                .is_some_and(|since| now.duration_since(since.0).unsigned_abs() > MAX_DRAIN)
        })
        .map(|entry| entry.address.clone())
        .collect()
}

/// What [`probe`] learnt: each pod's queue, and what each readable sidecar reported about its address and evidence
/// (kept on its volume claim if the pod goes).
#[derive(Debug, Default)]
pub struct Probe {
    pub queues: BTreeMap<u32, QueueState>,
    pub reports: BTreeMap<u32, LastReport>,
    /// Pods that never ran, whose claim was never bound: their claim holds nothing, not even evidence.
    pub never_used: std::collections::BTreeSet<u32>,
}

/// Reads the queue of each pod in `ordinals`: the pod's sidecar `/status` (an empty queue confirmed as described
/// in the module docs), or `NoVolume` when neither pod nor volume exists, the pod never ran and its claim was never
/// bound, or the pod is gone and its claim is retained evidence (it was drained before it went). Draining pods are
/// also taken out of the submission Service.
pub async fn probe(
    ctx: &Context,
    namespace: &str,
    names: &TenantNames,
    ordinals: impl IntoIterator<Item = u32>,
) -> Result<Probe> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let mut probe = Probe::default();
    let states = &mut probe.queues;
    for ordinal in ordinals {
        let pod_name = format!("{}-{ordinal}", names.mta());
        let state = match pods.get_opt(&pod_name).await? {
            Some(pod) => {
                stop_submissions(&pods, &pod).await?;
                if never_ran(&pod) && never_bound(&claims, names, ordinal).await? {
                    states.insert(ordinal, QueueState::NoVolume);
                    probe.never_used.insert(ordinal);
                    continue;
                }
                let (reading, report) = read_queue(&pod).await;
                if let Some(report) = report {
                    probe.reports.insert(ordinal, report);
                }
                let empty_since = pod
                    .annotations()
                    .get(QUEUE_EMPTY_SINCE)
                    .and_then(|since| since.parse::<Timestamp>().ok());
                let (state, mark) = confirm(reading, empty_since, ctx.clock.now(), ctx.settings.drain_confirmation);
                if mark != empty_since {
                    mark_empty_since(&pods, &pod_name, mark).await?;
                }
                state
            }
            None => match claims.get_opt(&claim_name(names, ordinal)).await? {
                None => QueueState::NoVolume,
                Some(claim) if evidence_retention::is_retained(&claim) => QueueState::NoVolume,
                Some(_) => QueueState::Unknown("the pod is gone but its volume is still there".to_owned()),
            },
        };
        states.insert(ordinal, state);
    }
    Ok(probe)
}

/// A pod still `Pending` (or without a phase): none of its containers has started.
fn never_ran(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .is_none_or(|phase| phase == "Pending")
}

/// True when pod `ordinal`'s volume claim exists but was never bound to a volume. With a pod that never ran (a
/// volume binds before its pod starts), nothing was ever queued: such a pod (unschedulable, say) drains at once
/// instead of waiting for a queue reading it can never give.
async fn never_bound(claims: &Api<PersistentVolumeClaim>, names: &TenantNames, ordinal: u32) -> Result<bool> {
    Ok(claims
        .get_opt(&claim_name(names, ordinal))
        .await?
        .is_some_and(|claim| claim.spec.and_then(|spec| spec.volume_name).is_none()))
}

/// The volume claim of pod `ordinal` (StatefulSet naming: `<template>-<statefulset>-<ordinal>`).
pub fn claim_name(names: &TenantNames, ordinal: u32) -> String {
    format!("{DATA_CLAIM}-{}-{ordinal}", names.mta())
}

/// Turns one reading into a queue state, given when the queue was first seen empty (`empty_since`). Returns the
/// state and the first-empty time to keep on the pod.
pub fn confirm(
    reading: QueueState,
    empty_since: Option<Timestamp>,
    now: Timestamp,
    confirmation: Duration,
) -> (QueueState, Option<Timestamp>) {
    if reading != QueueState::Empty {
        return (reading, None);
    }
    // A first-empty time in the future (a clock set back) restarts the wait rather than shortening it.
    let since = empty_since.filter(|since| *since <= now).unwrap_or(now);
    let until = since
        .checked_add(SignedDuration::try_from(confirmation).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX);
    let state = if now >= until {
        QueueState::Empty
    } else {
        QueueState::Confirming { until }
    };
    (state, Some(since))
}

async fn mark_empty_since(pods: &Api<Pod>, pod_name: &str, since: Option<Timestamp>) -> Result<()> {
    let value = since.map(|since| format!("{since:.0}"));
    let patch = json!({"metadata": {"annotations": {QUEUE_EMPTY_SINCE: value}}});
    pods.patch(pod_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn stop_submissions(pods: &Api<Pod>, pod: &Pod) -> Result<()> {
    if pod.labels().get(SUBMISSION_LABEL).map(String::as_str) == Some("draining") {
        return Ok(());
    }
    let patch = json!({"metadata": {"labels": {SUBMISSION_LABEL: "draining"}}});
    pods.patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

async fn read_queue(pod: &Pod) -> (QueueState, Option<LastReport>) {
    match pod_status::read(pod.status.as_ref()).await {
        Ok(status) => {
            let state = if status.queue.is_empty() {
                QueueState::Empty
            } else {
                QueueState::Holding(status.queue.messages)
            };
            let report = LastReport {
                address: Some(status.address.to_string()),
                heads: status.evidence,
            };
            (state, Some(report))
        }
        Err(reason) => (QueueState::Unknown(reason), None),
    }
}

/// Every ordinal whose volume may still exist: up to the StatefulSet's size and any claim left behind.
pub async fn claimed_ordinals(ctx: &Context, namespace: &str, names: &TenantNames, replicas: u32) -> Result<Vec<u32>> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let prefix = format!("{DATA_CLAIM}-{}-", names.mta());
    let mut ordinals: Vec<u32> = (0..replicas).collect();
    for claim in claims.list_metadata(&ListParams::default()).await? {
        if let Some(ordinal) = claim
            .name_any()
            .strip_prefix(&prefix)
            .and_then(|rest| rest.parse().ok())
            && !ordinals.contains(&ordinal)
        {
            ordinals.push(ordinal);
        }
    }
    Ok(ordinals)
}

/// Error that keeps the finalizer while queues drain.
pub fn still_draining(states: &BTreeMap<u32, QueueState>) -> Option<Error> {
    let pending: Vec<String> = states
        .iter()
        .filter(|(_, state)| !state.is_drained())
        .map(|(ordinal, state)| format!("pod {ordinal}: {}", state.describe()))
        .collect();
    (!pending.is_empty()).then(|| Error::Draining(pending.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_queue_counts_only_after_a_second_reading_the_confirmation_period_later() {
        let minute = Duration::from_secs(60);
        let t0: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let at = |secs: i64| t0.checked_add(SignedDuration::from_secs(secs)).unwrap();
        let until = at(60);

        // First empty reading: remembered, not drained yet.
        assert_eq!(
            confirm(QueueState::Empty, None, t0, minute),
            (QueueState::Confirming { until }, Some(t0))
        );
        assert_eq!(
            confirm(QueueState::Empty, Some(t0), at(59), minute),
            (QueueState::Confirming { until }, Some(t0))
        );
        assert_eq!(
            confirm(QueueState::Empty, Some(t0), at(60), minute),
            (QueueState::Empty, Some(t0))
        );
        // Mail in between starts the wait over.
        assert_eq!(
            confirm(QueueState::Holding(2), Some(t0), at(30), minute),
            (QueueState::Holding(2), None)
        );
        let unknown = QueueState::Unknown("timeout".into());
        assert_eq!(confirm(unknown.clone(), Some(t0), at(90), minute), (unknown, None));
        // A first-empty time from the future (clock moved back) does not shorten the wait.
        assert_eq!(
            confirm(QueueState::Empty, Some(at(3600)), t0, minute),
            (QueueState::Confirming { until }, Some(t0))
        );
        assert!(!QueueState::Confirming { until }.is_drained());
    }

    fn pod(ordinal: u32, address: &str) -> PodAssignment {
        PodAssignment {
            ordinal,
            address: PoolAddress {
                address: address.to_owned(),
                hostname: format!("mta{ordinal}.example.org"),
            },
            warmup_day: Some(3),
            daily_limit: Some(400),
            draining: false,
        }
    }

    fn recorded(ordinal: u32, address: &str) -> PoolAddressStatus {
        PoolAddressStatus {
            address: address.to_owned(),
            hostname: Some(format!("old{ordinal}.example.org")),
            ordinal: Some(ordinal),
            warmup_start: None,
            warmup_day: Some(5),
            daily_limit: Some(700),
            state: PoolAddressState::Warming,
            reason: None,
            last_evaluated: None,
            last_sent: None,
        }
    }

    #[test]
    fn a_shrinking_pool_keeps_the_top_pod_until_its_queue_is_empty() {
        // 192.0.2.2 (pod 1) left a pool of three: pods 0-1 get the remaining addresses, pod 2 drains from .2.
        let pool = vec![pod(0, "192.0.2.1"), pod(1, "192.0.2.3")];
        let before = [
            recorded(0, "192.0.2.1"),
            recorded(1, "192.0.2.2"),
            recorded(2, "192.0.2.3"),
        ];
        let holding = BTreeMap::from([(2, QueueState::Holding(7))]);
        let plan = plan(pool.clone(), 3, &before, &holding);
        assert_eq!(plan.pods.len(), 3);
        assert!(plan.pods[2].draining);
        assert_eq!(
            plan.pods[2].address.address, "192.0.2.2",
            "the departed address, used by no other pod"
        );
        assert_eq!(plan.pods[2].address.hostname, "old1.example.org");
        assert!(plan.removed.is_empty());

        let empty = BTreeMap::from([(2, QueueState::Empty)]);
        let plan = plan_after(pool, &before, &empty);
        assert_eq!(plan.pods.len(), 2);
        assert_eq!(plan.removed, [2]);
    }

    fn plan_after(
        pool: Vec<PodAssignment>,
        before: &[PoolAddressStatus],
        queues: &BTreeMap<u32, QueueState>,
    ) -> PoolPlan {
        plan(pool, 3, before, queues)
    }

    #[test]
    fn an_unreadable_queue_is_never_treated_as_empty() {
        let pool = vec![pod(0, "192.0.2.1")];
        let before = [recorded(0, "192.0.2.1"), recorded(1, "192.0.2.2")];
        let unknown = BTreeMap::from([(1, QueueState::Unknown("unreachable".into()))]);
        let plan = plan(pool, 2, &before, &unknown);
        assert_eq!(plan.pods.len(), 2);
        assert!(plan.removed.is_empty());
    }

    #[test]
    fn only_the_top_pods_can_go() {
        // Pods 1 and 2 drain; the top one (2) is empty, so it goes while 1 keeps delivering.
        let pool = vec![pod(0, "192.0.2.1")];
        let before = [
            recorded(0, "192.0.2.1"),
            recorded(1, "192.0.2.2"),
            recorded(2, "192.0.2.3"),
        ];
        let queues = BTreeMap::from([(1, QueueState::Holding(1)), (2, QueueState::Empty)]);
        let plan = plan(pool, 3, &before, &queues);
        assert_eq!(plan.removed, [2]);
        assert_eq!(plan.pods.len(), 2);
        // Reversed: the top one holds mail, so the empty one below it has to stay too.
        let queues = BTreeMap::from([(1, QueueState::Empty), (2, QueueState::Holding(1))]);
        let kept = super::plan(vec![pod(0, "192.0.2.1")], 3, &before, &queues);
        assert!(kept.removed.is_empty());
        assert_eq!(kept.pods.len(), 3);
    }

    #[test]
    fn a_growing_or_unchanged_pool_drains_nothing() {
        let pool = vec![pod(0, "192.0.2.1"), pod(1, "192.0.2.2")];
        let plan = plan(pool.clone(), 1, &[], &BTreeMap::new());
        assert_eq!(plan.pods, pool);
        assert!(plan.draining.is_empty() && plan.removed.is_empty());
    }

    #[test]
    fn pending_queues_keep_the_finalizer() {
        let states = BTreeMap::from([
            (0, QueueState::Empty),
            (1, QueueState::Holding(3)),
            (2, QueueState::NoVolume),
        ]);
        let waiting = still_draining(&states).map(|err| err.to_string()).unwrap_or_default();
        assert!(waiting.contains("pod 1: 3 message(s) queued"), "{waiting}");
        assert!(!waiting.contains("pod 0") && !waiting.contains("pod 2"), "{waiting}");
        assert!(still_draining(&BTreeMap::from([(0, QueueState::NoVolume)])).is_none());
    }
}
