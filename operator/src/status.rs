//! Pure status logic: conditions shaped like metav1.Condition, the address conflict rule and per-address warmup
//! assignment. The reconcile loop gathers facts, these functions decide what status says.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use securemail_api::SecureMailTenant;
use securemail_api::tenant::{PoolAddress, PoolAddressState, PoolAddressStatus, WarmupSpec};
use securemail_api::warmup::state::{AddressWarmup, DayResults, Transition, WarmupState, evaluate};

use crate::build::PodAssignment;

pub const READY: &str = "Ready";
pub const CONFIG_VALID: &str = "ConfigValid";
pub const DKIM_READY: &str = "DkimReady";
pub const MTA_AVAILABLE: &str = "MtaAvailable";
pub const IP_POOL_CONFLICT: &str = "IpPoolConflict";
pub const DOMAIN_CONFLICT: &str = "DomainConflict";
pub const PAUSED: &str = "Paused";
pub const DRAINING: &str = "Draining";
pub const DNS_PUBLISHED: &str = "DnsPublished";
pub const IP_LISTED: &str = "IpListed";
pub const EGRESS_READY: &str = "EgressReady";
pub const QUEUE_STORAGE_ENCRYPTED: &str = "QueueStorageEncrypted";

/// The desired state of one condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionUpdate {
    pub type_: &'static str,
    /// `None`: Unknown (the facts could not be established).
    pub status: Option<bool>,
    pub reason: String,
    pub message: String,
}

impl ConditionUpdate {
    pub fn new(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: Some(status),
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// A condition whose status could not be established.
    pub fn unknown(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self {
            status: None,
            ..Self::new(type_, false, reason, message)
        }
    }
}

/// Sets a condition; `lastTransitionTime` changes only when the status does. Returns whether the status changed
/// (callers emit an event only then).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    update: ConditionUpdate,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = match update.status {
        Some(true) => "True",
        Some(false) => "False",
        None => "Unknown",
    }
    .to_owned();
    match conditions.iter_mut().find(|condition| condition.type_ == update.type_) {
        Some(existing) => {
            let transitioned = existing.status != status;
            if transitioned {
                existing.last_transition_time = Time(now);
            }
            existing.status = status;
            existing.reason = update.reason;
            existing.message = update.message;
            existing.observed_generation = generation;
            transitioned
        }
        None => {
            conditions.push(Condition {
                type_: update.type_.to_owned(),
                status,
                reason: update.reason,
                message: update.message,
                last_transition_time: Time(now),
                observed_generation: generation,
            });
            true
        }
    }
}

/// The Ready summary: true only when every typed condition is good; otherwise the first bad one explains why.
/// `EgressReady` counts only when False: Unknown means no sidecar could say, and `MtaAvailable` speaks for pods
/// that are not ready.
pub fn ready(updates: &[ConditionUpdate]) -> ConditionUpdate {
    let bad = updates.iter().find(|update| match update.type_ {
        IP_POOL_CONFLICT | DOMAIN_CONFLICT => update.status != Some(false),
        EGRESS_READY => update.status == Some(false),
        _ => update.status != Some(true),
    });
    match bad {
        // Only there when encryption is required; Ready names it, since its reasons alone do not say so.
        Some(update) if update.type_ == QUEUE_STORAGE_ENCRYPTED => {
            let status = if update.status == Some(false) {
                "False"
            } else {
                "Unknown"
            };
            let message = format!("{QUEUE_STORAGE_ENCRYPTED} is {status}: {}", update.message);
            ConditionUpdate::new(READY, false, &update.reason, message)
        }
        Some(update) => ConditionUpdate::new(READY, false, &update.reason, update.message.clone()),
        None => ConditionUpdate::new(
            READY,
            true,
            "Reconciled",
            "the tenant's MTA pods are configured and available",
        ),
    }
}

/// Addresses of `tenant` already claimed by another tenant that claimed them first (earlier creation, then
/// namespace/name order), mapped to that tenant's `namespace/name`.
pub fn claimed_elsewhere(tenant: &SecureMailTenant, all: &[impl AsRef<SecureMailTenant>]) -> BTreeMap<String, String> {
    // Runs over every tenant at each reconcile: borrowed keys, and the order is asked only for a shared address.
    let key = crate::ownership::claim_order;
    let mine = &tenant.spec.ip_pool.addresses;
    let mut claimed = BTreeMap::new();
    for other in all.iter().map(AsRef::as_ref) {
        for address in &other.spec.ip_pool.addresses {
            if !mine.iter().any(|a| a.address == address.address)
                || other.metadata.uid == tenant.metadata.uid
                || key(other) >= key(tenant)
            {
                continue;
            }
            let (_, namespace, name) = key(other);
            claimed
                .entry(address.address.clone())
                .or_insert_with(|| format!("{namespace}/{name}"));
        }
    }
    claimed
}

/// One usable address with its pod and where it is in its warmup.
#[derive(Debug, Clone, PartialEq)]
pub struct Assigned {
    pub pod: PodAssignment,
    /// First day of the address's schedule.
    pub start: Date,
    pub warmup: AddressWarmup,
    /// What today's evaluation did, when one ran on this pass.
    pub transition: Option<Transition>,
}

/// Addresses whose warmup has not been evaluated today, with the ordinal of the pod that sent from them: the
/// reconcile loop asks those pods for yesterday's results.
pub fn due_for_evaluation(recorded: &[PoolAddressStatus], today: Date) -> Vec<(String, u32)> {
    recorded
        .iter()
        .filter(|status| status.state != PoolAddressState::Draining)
        .filter_map(|status| {
            let warmup = recorded_warmup(status)?;
            let due = warmup.last_evaluated.is_none_or(|evaluated| evaluated < today);
            Some((status.address.clone(), status.ordinal?)).filter(|_| due)
        })
        .collect()
}

/// Assigns pods to the usable addresses in pool order and decides each address's warmup day and limit.
///
/// A new address begins its schedule: on the tenant's first reconcile (nothing recorded yet) on the spec's start
/// date, which may lie in the past for addresses already warming elsewhere; an address added later starts today, or
/// on the start date if that is still ahead. A recorded address keeps its day until the once-a-day evaluation
/// (`warmup::state::evaluate`) judges yesterday's results, which `yesterday` holds for each address whose pod
/// reported them; an address without results keeps its state until they can be read.
pub fn assign_pods(
    spec: &WarmupSpec,
    usable: &[&PoolAddress],
    recorded: &[PoolAddressStatus],
    today: Date,
    yesterday: &BTreeMap<String, DayResults>,
    listed: &BTreeSet<String>,
) -> Vec<Assigned> {
    let spec_start = spec.start_date.as_deref().and_then(|date| date.parse::<Date>().ok());
    usable
        .iter()
        .zip(0u32..)
        .map(|(address, ordinal)| {
            let previous = recorded.iter().find(|status| status.address == address.address);
            let start = previous
                .and_then(|status| status.warmup_start.as_deref()?.parse::<Date>().ok())
                .unwrap_or_else(|| {
                    let first_reconcile = recorded.is_empty();
                    spec_start
                        .filter(|start| first_reconcile || *start > today)
                        .unwrap_or(today)
                });
            let (warmup, transition) = match previous.and_then(recorded_warmup) {
                None => (AddressWarmup::begin(spec, start, today), None),
                Some(recorded) => match yesterday.get(&address.address) {
                    Some(results) => {
                        let listed = listed.contains(&address.address);
                        let (next, transition) = evaluate(&recorded, results, listed, spec, today);
                        (next, Some(transition).filter(|t| *t != Transition::AlreadyEvaluated))
                    }
                    None => (recorded, None),
                },
            };
            let daily_limit = warmup.daily_limit(spec);
            let pod = PodAssignment {
                ordinal,
                address: (*address).clone(),
                warmup_day: daily_limit.map(|_| warmup.day),
                daily_limit,
                draining: false,
            };
            Assigned {
                pod,
                start,
                warmup,
                transition,
            }
        })
        .collect()
}

/// The warmup an address's status entry records; `None` for an entry without one (a conflicting address, or a
/// draining pod's).
fn recorded_warmup(status: &PoolAddressStatus) -> Option<AddressWarmup> {
    let reason = status.reason.clone().unwrap_or_default();
    let day = status.warmup_day;
    let state = match status.state {
        PoolAddressState::Warm => WarmupState::Warm,
        PoolAddressState::Warming => WarmupState::Warming { reason: None },
        PoolAddressState::Held if day.is_some() => WarmupState::Held { reason },
        PoolAddressState::RolledBack => WarmupState::RolledBack {
            from: day.unwrap_or(1),
            reason,
        },
        PoolAddressState::Held | PoolAddressState::Draining => return None,
    };
    Some(AddressWarmup {
        // A warm address records no day; `evaluate` goes by its state.
        day: day.unwrap_or(1),
        state,
        last_sent: status.last_sent.as_deref().and_then(|date| date.parse().ok()),
        last_evaluated: status
            .last_evaluated
            .as_ref()
            .map(|time| time.0.to_zoned(TimeZone::UTC).date()),
    })
}

/// `status.ipPool`: usable addresses with their pod and warmup, conflicting ones without a pod.
pub fn pool_status(
    addresses: &[PoolAddress],
    assigned: &[Assigned],
    conflicts: &BTreeMap<String, String>,
    recorded: &[PoolAddressStatus],
    now: Timestamp,
) -> Vec<PoolAddressStatus> {
    addresses
        .iter()
        .map(|address| {
            if let Some(owner) = conflicts.get(&address.address) {
                return PoolAddressStatus {
                    address: address.address.clone(),
                    hostname: Some(address.hostname.clone()),
                    ordinal: None,
                    warmup_start: None,
                    warmup_day: None,
                    daily_limit: None,
                    state: PoolAddressState::Held,
                    reason: Some(format!("address is already used by tenant {owner}")),
                    last_evaluated: Some(Time(now)),
                    last_sent: None,
                };
            }
            let assigned = assigned
                .iter()
                .find(|entry| entry.pod.address.address == address.address);
            let previous = recorded.iter().find(|status| status.address == address.address);
            let (state, reason) = match assigned {
                Some(entry) => {
                    let reason = entry
                        .warmup
                        .state
                        .reason()
                        .map(str::to_owned)
                        .or_else(|| entry.pod.warmup_day.map(|day| format!("warmup day {day}")));
                    (PoolAddressState::from(&entry.warmup.state), reason)
                }
                None => (PoolAddressState::Held, None),
            };
            // Only an evaluation or a change is news; rewriting the time on every pass would make every reconcile
            // a status write.
            let evaluated = assigned.is_some_and(|entry| entry.transition.is_some());
            let unchanged = previous.is_some_and(|previous| {
                previous.state == state
                    && previous.warmup_day == assigned.and_then(|entry| entry.pod.warmup_day)
                    && previous.daily_limit == assigned.and_then(|entry| entry.pod.daily_limit)
            });
            PoolAddressStatus {
                address: address.address.clone(),
                hostname: Some(address.hostname.clone()),
                ordinal: assigned.map(|entry| entry.pod.ordinal),
                warmup_start: assigned.map(|entry| entry.start.to_string()),
                warmup_day: assigned.and_then(|entry| entry.pod.warmup_day),
                daily_limit: assigned.and_then(|entry| entry.pod.daily_limit),
                state,
                reason,
                last_evaluated: if unchanged && !evaluated {
                    previous.and_then(|previous| previous.last_evaluated.clone())
                } else {
                    Some(Time(now))
                },
                last_sent: assigned
                    .and_then(|entry| entry.warmup.last_sent)
                    .map(|date| date.to_string()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;
    use securemail_api::warmup;

    fn tenant(name: &str, created_secs: i64, addresses: &[&str]) -> SecureMailTenant {
        let mut tenant: SecureMailTenant = serde_json::from_value(serde_json::json!({
            "apiVersion": "securemail.io/v1alpha1",
            "kind": "SecureMailTenant",
            "metadata": {"name": name, "namespace": "ns", "uid": name},
            "spec": {
                "domains": [{"name": "example.org"}],
                "ipPool": {"addresses": addresses.iter().enumerate()
                    .map(|(i, a)| serde_json::json!({"address": a, "hostname": format!("mta{i}.example.org")}))
                    .collect::<Vec<_>>()},
                "submission": {"tls": {"secretName": "s"}, "clientCertificates": {"caSecretName": "ca"}}
            }
        }))
        .expect("tenant");
        tenant.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created_secs).expect("time")));
        tenant
    }

    #[test]
    fn the_later_tenant_loses_a_shared_address() {
        let first = tenant("first", 100, &["192.0.2.1", "192.0.2.2"]);
        let second = tenant("second", 200, &["192.0.2.2", "192.0.2.3"]);
        let all = [std::sync::Arc::new(first.clone()), std::sync::Arc::new(second.clone())];
        assert!(claimed_elsewhere(&first, &all).is_empty());
        assert_eq!(
            claimed_elsewhere(&second, &all),
            BTreeMap::from([("192.0.2.2".to_owned(), "ns/first".to_owned())])
        );
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let mut conditions = Vec::new();
        let t0 = Timestamp::from_second(1_000).expect("time");
        let t1 = Timestamp::from_second(2_000).expect("time");
        assert!(set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, false, "Pending", "a"),
            Some(1),
            t0
        ));
        assert!(!set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, false, "Other", "b"),
            Some(2),
            t1
        ));
        assert_eq!(conditions[0].last_transition_time, Time(t0));
        assert_eq!(conditions[0].reason, "Other");
        assert!(set_condition(
            &mut conditions,
            ConditionUpdate::new(READY, true, "Ok", "c"),
            Some(2),
            t1
        ));
        assert_eq!(conditions[0].last_transition_time, Time(t1));
    }

    #[test]
    fn ready_names_the_first_problem() {
        let updates = [
            ConditionUpdate::new(CONFIG_VALID, true, "Valid", ""),
            ConditionUpdate::new(IP_POOL_CONFLICT, true, "AddressInUse", "192.0.2.2 is used by ns/first"),
        ];
        let summary = ready(&updates);
        assert_eq!(summary.status, Some(false));
        assert_eq!(summary.reason, "AddressInUse");
    }

    #[test]
    fn a_pod_that_cannot_send_makes_the_tenant_unready_but_an_unknown_egress_does_not() {
        let available = ConditionUpdate::new(MTA_AVAILABLE, true, "PodsReady", "2/2 MTA pods ready");
        let not_checked = ConditionUpdate::unknown(EGRESS_READY, "NotChecked", "no sidecar running");
        assert_eq!(ready(&[not_checked, available.clone()]).status, Some(true));
        let failing = ConditionUpdate::new(EGRESS_READY, false, "CannotSendFromAddress", "pod t-mta-1 …");
        let summary = ready(&[failing, available]);
        assert_eq!(summary.status, Some(false));
        assert_eq!(summary.reason, "CannotSendFromAddress");
    }

    #[test]
    fn required_encryption_makes_ready_name_the_storage_condition() {
        let available = ConditionUpdate::new(MTA_AVAILABLE, false, "PodsNotReady", "0/1 MTA pods ready");
        let storage = ConditionUpdate::unknown(QUEUE_STORAGE_ENCRYPTED, "StorageClassNotFound", "claims name fast");
        let summary = ready(&[storage, available]);
        assert_eq!(summary.status, Some(false));
        assert_eq!(summary.reason, "StorageClassNotFound");
        assert_eq!(summary.message, "QueueStorageEncrypted is Unknown: claims name fast");
    }

    fn no_results() -> BTreeMap<String, DayResults> {
        BTreeMap::new()
    }

    #[test]
    fn new_addresses_begin_their_schedule_and_recorded_ones_keep_their_day_until_judged() {
        let pool = tenant("t", 1, &["192.0.2.1", "192.0.2.2"]);
        let spec = &pool.spec.ip_pool.warmup;
        let addresses: Vec<&PoolAddress> = pool.spec.ip_pool.addresses.iter().collect();
        let recorded = [PoolAddressStatus {
            address: "192.0.2.1".into(),
            hostname: None,
            ordinal: Some(0),
            warmup_start: Some("2026-11-20".into()),
            warmup_day: Some(5),
            daily_limit: warmup::daily_limit(spec, 5),
            state: PoolAddressState::Warming,
            reason: None,
            last_evaluated: Some(Time("2026-11-24T00:00:10Z".parse().unwrap())),
            last_sent: None,
        }];
        let today = date(2026, 11, 25);
        assert_eq!(due_for_evaluation(&recorded, today), [("192.0.2.1".to_owned(), 0)]);

        // Yesterday's results not read yet: the recorded day holds, nothing is news.
        let assigned = assign_pods(spec, &addresses, &recorded, today, &no_results(), &BTreeSet::new());
        assert_eq!((assigned[0].pod.warmup_day, assigned[0].transition), (Some(5), None));
        assert_eq!(
            assigned[1].pod.warmup_day,
            Some(1),
            "an address added later starts today"
        );
        assert_eq!(assigned[1].start, today);

        // A clean yesterday advances the day and its limit.
        let clean = DayResults {
            attempts: 100,
            delivered: 99,
            deferred: 1,
            ..DayResults::default()
        };
        let results = BTreeMap::from([("192.0.2.1".to_owned(), clean)]);
        let assigned = assign_pods(spec, &addresses, &recorded, today, &results, &BTreeSet::new());
        assert_eq!(assigned[0].transition, Some(Transition::Advanced { from: 5, to: 6 }));
        assert_eq!(assigned[0].pod.daily_limit, warmup::daily_limit(spec, 6));
        let status = pool_status(
            &pool.spec.ip_pool.addresses,
            &assigned,
            &BTreeMap::new(),
            &recorded,
            "2026-11-25T00:01:00Z".parse().unwrap(),
        );
        assert_eq!(status[0].warmup_day, Some(6));
        assert_eq!(status[0].last_sent.as_deref(), Some("2026-11-24"));
        // Evaluated today: not due again until tomorrow.
        assert!(due_for_evaluation(&status, today).is_empty());
        assert_eq!(due_for_evaluation(&status, date(2026, 11, 26)).len(), 2);

        // Bounces over the threshold hold the day, and status says why.
        let bouncing = DayResults {
            attempts: 100,
            delivered: 97,
            bounced: 3,
            ..DayResults::default()
        };
        let results = BTreeMap::from([("192.0.2.1".to_owned(), bouncing)]);
        let assigned = assign_pods(spec, &addresses, &recorded, today, &results, &BTreeSet::new());
        assert_eq!(
            (assigned[0].transition, assigned[0].pod.warmup_day),
            (Some(Transition::Held), Some(5))
        );
        let status = pool_status(
            &pool.spec.ip_pool.addresses,
            &assigned,
            &BTreeMap::new(),
            &recorded,
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(status[0].state, PoolAddressState::Held);
        assert!(
            status[0]
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("bounce rate 3.0% over")),
            "{status:?}"
        );
        // Held is read back as held: the next day's clean results advance it again.
        let next = assign_pods(
            spec,
            &addresses,
            &status,
            date(2026, 11, 26),
            &BTreeMap::from([("192.0.2.1".to_owned(), clean)]),
            &BTreeSet::new(),
        );
        assert_eq!(next[0].transition, Some(Transition::Advanced { from: 5, to: 6 }));

        // Clean results, but the address is on a blocklist: rolled back.
        let results = BTreeMap::from([("192.0.2.1".to_owned(), clean)]);
        let listed = BTreeSet::from(["192.0.2.1".to_owned()]);
        let assigned = assign_pods(spec, &addresses, &recorded, today, &results, &listed);
        assert_eq!(assigned[0].transition, Some(Transition::RolledBack { from: 5, to: 2 }));
        assert_eq!(assigned[0].warmup.state.reason(), Some("listed on a DNS blocklist"));
    }

    #[test]
    fn a_past_start_date_counts_on_the_first_reconcile_only() {
        let mut pool = tenant("t", 1, &["192.0.2.1", "192.0.2.2"]);
        pool.spec.ip_pool.warmup.start_date = Some("2026-11-20".into());
        let addresses: Vec<&PoolAddress> = pool.spec.ip_pool.addresses.iter().collect();
        let today = date(2026, 11, 25);
        let first = assign_pods(
            &pool.spec.ip_pool.warmup,
            &addresses,
            &[],
            today,
            &no_results(),
            &BTreeSet::new(),
        );
        assert_eq!(first[0].pod.warmup_day, Some(6), "already warming since the start date");
        let recorded = pool_status(
            &pool.spec.ip_pool.addresses[..1],
            &first[..1],
            &BTreeMap::new(),
            &[],
            Timestamp::UNIX_EPOCH,
        );
        let later = assign_pods(
            &pool.spec.ip_pool.warmup,
            &addresses,
            &recorded,
            today,
            &no_results(),
            &BTreeSet::new(),
        );
        assert_eq!(later[0].pod.warmup_day, Some(6));
        assert_eq!(later[1].pod.warmup_day, Some(1), "an address added later starts today");
    }
}
