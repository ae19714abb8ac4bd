//! Delivery metrics for Prometheus and today's classified remote replies for `/status`. Labels are bounded (DESIGN.md): the
//! tenant and source address (constant per pod; a complaint's is the pool address its report names), provider class, result, policy source, TLS version, failure
//! class; never a recipient domain or address. The queue gauges are set by whoever counts Postfix's queue (the
//! admin server, at each scrape). Every family is listed in docs/metrics.md.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use jiff::civil::Date;
use jiff::tz::TimeZone;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use securemail_api::sidecar_status::{CircuitState, QueueStatus, ReplyCounts};
use securemail_api::tenant::TlsVersion;

use crate::deliver::WallClock;
use crate::evidence::{Outcome, PolicySource, Refusal};
use crate::policy::LookupStage;
use crate::provider::Provider;
use crate::reputation::{self, Reason};

/// Cheap to clone: every clone updates the same series.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    attempts: Family<AttemptLabels, Counter>,
    recipients: Family<ResultLabels, Counter>,
    duration: Family<ResultLabels, Histogram, fn() -> Histogram>,
    policy_lookups: Family<LookupLabels, Counter>,
    policy_temporary_failures: Family<StageLabels, Counter>,
    complaints: Family<ComplaintLabels, Counter>,
    tls_failures: Family<FailureLabels, Counter>,
    evidence_failures: Counter,
    config_rejections: Counter,
    remote_replies: Family<ReplyLabels, Counter>,
    circuit_state: Family<ProviderLabels, Gauge>,
    circuit_opens: Family<ProviderLabels, Counter>,
    warmup_refusals: Family<ProviderLabels, Counter>,
    header_from_refusals: Family<FailureLabels, Counter>,
    queue_messages: Family<NoLabels, Gauge>,
    queue_oldest_age: Family<NoLabels, Gauge>,
    queue_scan_failures: Counter,
    egress_ready: Gauge,
    today: Mutex<Today>,
    clock: Arc<dyn WallClock>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    provider: &'static str,
    result: &'static str,
    policy_source: &'static str,
    tls_version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    provider: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplyLabels {
    provider: &'static str,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: &'static str,
}

/// A gauge without labels of its own, kept in a family so that its one series can be removed while its value is
/// unknown.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NoLabels {}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

/// `source_ip` here is the pool address a complaint report names, which need not be this pod's: reports reach
/// whichever pod the submission Service picks.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComplaintLabels {
    source_ip: String,
    provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: &'static str,
}

/// Why no secure session came about, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    NoStartTls,
    /// WebPKI verification failed.
    Certificate,
    /// No TLSA record matched, or the DANE-TA chain or name check failed.
    Dane,
    /// No common TLS version or cipher suite, or another protocol error.
    Handshake,
}

impl TlsFailure {
    fn as_str(self) -> &'static str {
        match self {
            TlsFailure::NoStartTls => "no_starttls",
            TlsFailure::Certificate => "certificate",
            TlsFailure::Dane => "dane",
            TlsFailure::Handshake => "handshake",
        }
    }
}

/// Result of a policy lookup, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupResult {
    Ok,
    Temporary(LookupStage),
    NoSecurePath,
    Permanent,
}

struct Today {
    date: Date,
    replies: BTreeMap<Provider, ReplyCounts>,
}

fn duration_histogram() -> Histogram {
    // 0.1 s to about 27 minutes: beyond Postfix's 1200 s wait nothing is still pending.
    Histogram::new(exponential_buckets(0.1, 2.0, 15))
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Deferred => "deferred",
        Outcome::Bounced => "bounced",
    }
}

fn refusal_label(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::HeaderFromNotTenantDomain => "not_tenant_domain",
        Refusal::HeaderFromSeveralMailboxes => "several_mailboxes",
        Refusal::HeaderFromRepeated => "repeated",
        Refusal::HeaderFromMissing => "missing",
        Refusal::HeaderFromUnparsable => "unparsable",
    }
}

fn policy_label(source: Option<PolicySource>) -> &'static str {
    match source {
        Some(PolicySource::Dane) => "dane",
        Some(PolicySource::MtaSts) => "mta-sts",
        Some(PolicySource::Tenant) => "tenant",
        Some(PolicySource::Override) => "override",
        None => "none",
    }
}

fn tls_label(version: Option<TlsVersion>) -> &'static str {
    match version {
        Some(TlsVersion::Tls12) => "1.2",
        Some(TlsVersion::Tls13) => "1.3",
        None => "none",
    }
}

impl Metrics {
    /// Registers the families in `registry` with `tenant` and `source_ip` as constant labels; `clock` decides
    /// when today's reply counts start over (UTC midnight).
    pub fn register(registry: &mut Registry, tenant: &str, source_ip: IpAddr, clock: Arc<dyn WallClock>) -> Self {
        // Complaints carry the reported pool address as their own `source_ip`, so they get the tenant label only.
        let complaints = Family::<ComplaintLabels, Counter>::default();
        registry
            .sub_registry_with_label((Cow::Borrowed("tenant"), Cow::Owned(tenant.to_owned())))
            .register(
                "securemail_complaints",
                "Spam complaints (ARF reports of Feedback-Type abuse or fraud) by the pool address they name and \
                 the complaining recipient's provider class",
                complaints.clone(),
            );
        let registry = registry.sub_registry_with_labels(
            [
                (Cow::Borrowed("tenant"), Cow::Owned(tenant.to_owned())),
                (Cow::Borrowed("source_ip"), Cow::Owned(source_ip.to_string())),
            ]
            .into_iter(),
        );
        let date = utc_date(clock.as_ref());
        let inner = Inner {
            attempts: Family::default(),
            recipients: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            policy_lookups: Family::default(),
            policy_temporary_failures: Family::default(),
            complaints,
            tls_failures: Family::default(),
            evidence_failures: Counter::default(),
            config_rejections: Counter::default(),
            remote_replies: Family::default(),
            circuit_state: Family::default(),
            circuit_opens: Family::default(),
            warmup_refusals: Family::default(),
            header_from_refusals: Family::default(),
            queue_messages: Family::default(),
            queue_oldest_age: Family::default(),
            queue_scan_failures: Counter::default(),
            egress_ready: Gauge::default(),
            today: Mutex::new(Today {
                date,
                replies: BTreeMap::new(),
            }),
            clock,
        };
        // Counter names without `_total`: the encoder appends it.
        registry.register(
            "securemail_delivery_attempts",
            "Delivery attempts, one per message, recipient domain and MX address tried",
            inner.attempts.clone(),
        );
        registry.register(
            "securemail_recipients",
            "Recipients answered to Postfix, by final result",
            inner.recipients.clone(),
        );
        registry.register(
            "securemail_delivery_duration_seconds",
            "Time from the start of delivery to a recipient domain until its answer",
            inner.duration.clone(),
        );
        registry.register(
            "securemail_policy_lookups",
            "TLS policy lookups by result",
            inner.policy_lookups.clone(),
        );
        registry.register(
            "securemail_policy_temporary_failures",
            "TLS policy lookups that failed temporarily, by the step that failed",
            inner.policy_temporary_failures.clone(),
        );
        registry.register(
            "securemail_tls_failures",
            "MX sessions that found no secure path, by reason",
            inner.tls_failures.clone(),
        );
        registry.register(
            "securemail_evidence_append_failures",
            "Evidence records that could not be written; new deliveries are deferred after one",
            inner.evidence_failures.clone(),
        );
        registry.register(
            "securemail_egress_ready",
            "1 while the last egress self-check found this pod can send from its pool address, 0 while it cannot \
             (delivery paused, the pod unready)",
            inner.egress_ready.clone(),
        );
        registry.register(
            "securemail_config_reload_failures",
            "Changed sidecar.yaml files or DKIM keys that were refused; the running configuration stays",
            inner.config_rejections.clone(),
        );
        registry.register(
            "securemail_remote_replies",
            "Remote 4xx and 5xx replies by provider class and reason",
            inner.remote_replies.clone(),
        );
        registry.register(
            "securemail_circuit_state",
            "Local circuit breaker per provider class: 0 closed, 1 half-open, 2 open",
            inner.circuit_state.clone(),
        );
        registry.register(
            "securemail_circuit_opens",
            "Times the local circuit breaker of a provider class opened",
            inner.circuit_opens.clone(),
        );
        registry.register(
            "securemail_warmup_refusals",
            "Recipients refused with 452 4.7.1 because this hour's warmup allowance for their provider is used up",
            inner.warmup_refusals.clone(),
        );
        registry.register(
            "securemail_header_from_refusals",
            "Messages the sidecar refused with 5.7.1 before sending because their header From is not one mailbox at \
             one of the tenant's sending domains, by reason",
            inner.header_from_refusals.clone(),
        );
        registry.register(
            "securemail_queue_messages",
            "Messages in Postfix's incoming, active, deferred, hold and maildrop queues at the last scrape; absent \
             while the queue cannot be counted",
            inner.queue_messages.clone(),
        );
        registry.register(
            "securemail_queue_oldest_message_age_seconds",
            "Age of the oldest message in Postfix's queue at the last scrape, 0 when empty; absent while the queue \
             cannot be counted",
            inner.queue_oldest_age.clone(),
        );
        registry.register(
            "securemail_queue_scan_failures",
            "Scrapes at which Postfix's queue directory could not be counted",
            inner.queue_scan_failures.clone(),
        );
        // Counters that alerts take `increase()` of exist at 0 from the start: a series born at 1 hides its first
        // increment.
        for stage in [
            LookupStage::Mx,
            LookupStage::Dane,
            LookupStage::MtaSts,
            LookupStage::Deadline,
        ] {
            inner
                .policy_temporary_failures
                .get_or_create(&StageLabels { stage: stage.as_str() })
                .inc_by(0);
        }
        for refusal in Refusal::ALL {
            inner
                .header_from_refusals
                .get_or_create(&FailureLabels {
                    reason: refusal_label(refusal),
                })
                .inc_by(0);
        }
        // Every breaker starts closed; the series exist before the first transition.
        for provider in reputation::GUARDED {
            inner
                .circuit_state
                .get_or_create(&ProviderLabels {
                    provider: provider.as_str(),
                })
                .set(0);
        }
        Self { inner: Arc::new(inner) }
    }

    pub fn attempt(
        &self,
        provider: Provider,
        outcome: Outcome,
        policy_source: Option<PolicySource>,
        tls_version: Option<TlsVersion>,
    ) {
        self.inner
            .attempts
            .get_or_create(&AttemptLabels {
                provider: provider.as_str(),
                result: outcome_label(outcome),
                policy_source: policy_label(policy_source),
                tls_version: tls_label(tls_version),
            })
            .inc();
    }

    /// `count` recipients answered with `outcome`; also counted for today.
    pub fn recipients(&self, provider: Provider, outcome: Outcome, count: u64) {
        let labels = ResultLabels {
            provider: provider.as_str(),
            result: outcome_label(outcome),
        };
        self.inner.recipients.get_or_create(&labels).inc_by(count);
    }

    pub fn duration(&self, provider: Provider, outcome: Outcome, seconds: f64) {
        let labels = ResultLabels {
            provider: provider.as_str(),
            result: outcome_label(outcome),
        };
        self.inner.duration.get_or_create(&labels).observe(seconds);
    }

    /// One policy lookup; a temporary failure is also counted by the step that failed.
    pub fn policy_lookup(&self, result: LookupResult) {
        let result = match result {
            LookupResult::Ok => "ok",
            LookupResult::Temporary(stage) => {
                self.inner
                    .policy_temporary_failures
                    .get_or_create(&StageLabels { stage: stage.as_str() })
                    .inc();
                "temporary"
            }
            LookupResult::NoSecurePath => "no_secure_path",
            LookupResult::Permanent => "permanent",
        };
        self.inner.policy_lookups.get_or_create(&LookupLabels { result }).inc();
    }

    /// Creates the complaint series of `pool` at 0 (see `register`), one per provider class: few and bounded.
    pub fn expect_complaints_about(&self, pool: &[IpAddr]) {
        for &source_ip in pool {
            for provider in Provider::ALL {
                self.inner
                    .complaints
                    .get_or_create(&ComplaintLabels {
                        source_ip: source_ip.to_string(),
                        provider: provider.as_str(),
                    })
                    .inc_by(0);
            }
        }
    }

    /// A spam complaint about mail sent from `source_ip`, a pool address of the tenant.
    pub fn complaint(&self, source_ip: IpAddr, provider: Provider) {
        let labels = ComplaintLabels {
            source_ip: source_ip.to_string(),
            provider: provider.as_str(),
        };
        self.inner.complaints.get_or_create(&labels).inc();
    }

    pub fn tls_failure(&self, reason: TlsFailure) {
        self.inner
            .tls_failures
            .get_or_create(&FailureLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// A message refused for its header From (one per message, whatever its recipients).
    pub fn header_from_refused(&self, refusal: Refusal) {
        self.inner
            .header_from_refusals
            .get_or_create(&FailureLabels {
                reason: refusal_label(refusal),
            })
            .inc();
    }

    pub fn evidence_failure(&self) {
        self.inner.evidence_failures.inc();
    }

    /// The egress self-check ran.
    pub fn egress_checked(&self, ready: bool) {
        self.inner.egress_ready.set(i64::from(ready));
    }

    /// A changed configuration or key file was refused.
    pub fn config_rejected(&self) {
        self.inner.config_rejections.inc();
    }

    /// A remote 4xx or 5xx reply from `provider`'s MX; also counted for today.
    pub fn remote_reply(&self, provider: Provider, reason: Reason) {
        let labels = ReplyLabels {
            provider: provider.as_str(),
            class: reason.as_str(),
        };
        self.inner.remote_replies.get_or_create(&labels).inc();
        reason.count(self.lock_today().replies.entry(provider).or_default());
    }

    pub fn circuit_state(&self, provider: Provider, state: CircuitState) {
        let value = match state {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        };
        let labels = ProviderLabels {
            provider: provider.as_str(),
        };
        self.inner.circuit_state.get_or_create(&labels).set(value);
    }

    /// A recipient was refused because its provider's warmup allowance is used up.
    pub fn warmup_refused(&self, provider: Provider) {
        let labels = ProviderLabels {
            provider: provider.as_str(),
        };
        self.inner.warmup_refusals.get_or_create(&labels).inc();
    }

    pub fn circuit_opened(&self, provider: Provider) {
        let labels = ProviderLabels {
            provider: provider.as_str(),
        };
        self.inner.circuit_opens.get_or_create(&labels).inc();
    }

    /// Postfix's queue as just counted.
    pub fn queue_counted(&self, queue: &QueueStatus) {
        let age = queue.oldest_age_seconds.unwrap_or(0);
        self.inner
            .queue_messages
            .get_or_create(&NoLabels {})
            .set(i64::try_from(queue.messages).unwrap_or(i64::MAX));
        self.inner
            .queue_oldest_age
            .get_or_create(&NoLabels {})
            .set(i64::try_from(age).unwrap_or(i64::MAX));
    }

    /// The queue could not be counted. Its gauges go absent: a stale or zero value would read as a queue that is
    /// fine, and alerts on the gauges would stay silent while the queue grows.
    pub fn queue_scan_failed(&self) {
        self.inner.queue_messages.clear();
        self.inner.queue_oldest_age.clear();
        self.inner.queue_scan_failures.inc();
    }

    /// Today's classified remote replies per provider, every provider listed.
    pub fn replies_today(&self) -> (Date, BTreeMap<Provider, ReplyCounts>) {
        let today = self.lock_today();
        let replies = Provider::ALL
            .iter()
            .map(|&provider| (provider, today.replies.get(&provider).copied().unwrap_or_default()))
            .collect();
        (today.date, replies)
    }

    /// Today's counts, started over if the UTC date changed since the last use.
    fn lock_today(&self) -> std::sync::MutexGuard<'_, Today> {
        // Counts are plain integers: a panic elsewhere cannot leave them half-updated.
        let mut today = self.inner.today.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let date = utc_date(self.inner.clock.as_ref());
        if date != today.date {
            today.date = date;
            today.replies.clear();
        }
        today
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn utc_date(clock: &dyn WallClock) -> Date {
    clock.now().to_zoned(TimeZone::UTC).date()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use jiff::Timestamp;
    use prometheus_client::encoding::text::encode;

    use super::*;

    struct FixedClock(AtomicI64);

    impl WallClock for FixedClock {
        fn now(&self) -> Timestamp {
            Timestamp::from_second(self.0.load(Ordering::SeqCst)).unwrap()
        }
    }

    #[test]
    fn families_encode_with_bounded_labels_and_today_resets_at_utc_midnight() {
        let clock = Arc::new(FixedClock(AtomicI64::new(1_767_225_600 + 86_399)));
        let mut registry = Registry::default();
        let metrics = Metrics::register(
            &mut registry,
            "clinic-a/outbound",
            "192.0.2.10".parse().unwrap(),
            clock.clone(),
        );
        metrics.attempt(
            Provider::Gmail,
            Outcome::Delivered,
            Some(PolicySource::Dane),
            Some(TlsVersion::Tls13),
        );
        metrics.recipients(Provider::Gmail, Outcome::Delivered, 2);
        metrics.recipients(Provider::Other, Outcome::Bounced, 1);
        metrics.duration(Provider::Gmail, Outcome::Delivered, 1.5);
        metrics.policy_lookup(LookupResult::Temporary(LookupStage::Dane));
        metrics.policy_lookup(LookupResult::Temporary(LookupStage::MtaSts));
        metrics.complaint("192.0.2.11".parse().unwrap(), Provider::Yahoo);
        metrics.tls_failure(TlsFailure::NoStartTls);
        metrics.evidence_failure();
        metrics.header_from_refused(Refusal::HeaderFromNotTenantDomain);

        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for expected in [
            r#"securemail_delivery_attempts_total{tenant="clinic-a/outbound",source_ip="192.0.2.10",provider="gmail",result="delivered",policy_source="dane",tls_version="1.3"} 1"#,
            r#"securemail_recipients_total{tenant="clinic-a/outbound",source_ip="192.0.2.10",provider="gmail",result="delivered"} 2"#,
            r#"securemail_delivery_duration_seconds_count{tenant="clinic-a/outbound",source_ip="192.0.2.10",provider="gmail",result="delivered"} 1"#,
            r#"securemail_policy_lookups_total{tenant="clinic-a/outbound",source_ip="192.0.2.10",result="temporary"} 2"#,
            r#"securemail_policy_temporary_failures_total{tenant="clinic-a/outbound",source_ip="192.0.2.10",stage="dane"} 1"#,
            r#"securemail_policy_temporary_failures_total{tenant="clinic-a/outbound",source_ip="192.0.2.10",stage="mta_sts"} 1"#,
            r#"securemail_complaints_total{tenant="clinic-a/outbound",source_ip="192.0.2.11",provider="yahoo"} 1"#,
            r#"securemail_tls_failures_total{tenant="clinic-a/outbound",source_ip="192.0.2.10",reason="no_starttls"} 1"#,
            r#"securemail_evidence_append_failures_total{tenant="clinic-a/outbound",source_ip="192.0.2.10"} 1"#,
            r#"securemail_header_from_refusals_total{tenant="clinic-a/outbound",source_ip="192.0.2.10",reason="not_tenant_domain"} 1"#,
            r#"securemail_header_from_refusals_total{tenant="clinic-a/outbound",source_ip="192.0.2.10",reason="several_mailboxes"} 0"#,
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }

        assert_eq!(metrics.replies_today().0, Date::constant(2026, 1, 1));
        clock.0.fetch_add(1, Ordering::SeqCst);
        assert_eq!(metrics.replies_today().0, Date::constant(2026, 1, 2));
    }
    #[test]
    fn queue_gauges_follow_the_last_count_and_go_absent_when_it_fails() {
        let clock = Arc::new(FixedClock(AtomicI64::new(1_767_225_600)));
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry, "clinic-a/outbound", "192.0.2.10".parse().unwrap(), clock);
        let encoded = || {
            let mut text = String::new();
            encode(&mut text, &registry).unwrap();
            text
        };
        let messages = r#"securemail_queue_messages{tenant="clinic-a/outbound",source_ip="192.0.2.10"}"#;
        let age = r#"securemail_queue_oldest_message_age_seconds{tenant="clinic-a/outbound",source_ip="192.0.2.10"}"#;
        let failures = r#"securemail_queue_scan_failures_total{tenant="clinic-a/outbound",source_ip="192.0.2.10"}"#;

        // Not counted yet: unknown, not empty.
        let text = encoded();
        assert!(!text.contains(messages) && !text.contains(age), "{text}");
        assert!(text.contains(&format!("{failures} 0\n")), "{text}");

        metrics.queue_counted(&QueueStatus {
            messages: 5,
            oldest_age_seconds: Some(7200),
        });
        let text = encoded();
        assert!(text.contains(&format!("{messages} 5\n")), "{text}");
        assert!(text.contains(&format!("{age} 7200\n")), "{text}");

        metrics.queue_scan_failed();
        let text = encoded();
        assert!(!text.contains(messages) && !text.contains(age), "{text}");
        assert!(text.contains(&format!("{failures} 1\n")), "{text}");

        // An empty queue has no oldest message: age 0, so an age alert reads it as healthy.
        metrics.queue_counted(&QueueStatus::default());
        let text = encoded();
        assert!(text.contains(&format!("{messages} 0\n")), "{text}");
        assert!(text.contains(&format!("{age} 0\n")), "{text}");
        assert!(text.contains(&format!("{failures} 1\n")), "{text}");
    }
}
