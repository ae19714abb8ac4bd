//! The delivery engine behind the LMTP server: signs each message, delivers it per recipient domain over the
//! path the TLS policy allows, writes one evidence record per attempt, and answers Postfix per recipient.
//!
//! Answers: 2xx only after the remote MX accepted the recipient and the data after the final dot; remote 4xx,
//! timeouts and connection failures 4xx (Postfix retries); remote 5xx passed on with the remote's enhanced
//! code and redacted text; no secure path per the domain's `onFailure` (4.7.5 defer or 5.7.10 bounce). A header
//! From that is not one mailbox at one of the tenant's domains bounces the whole message (5.7.1, recorded and
//! counted); any other signing failure defers it. It is never sent unsigned.
//!
//! Recipients at the reserved feedback domain are never delivered: a report to the feedback address is taken in
//! as a spam complaint ([`crate::feedback`]), any other address there is refused.
//!
//! Remote refusals are classified ([`crate::reputation`]); while a provider's circuit breaker is open its
//! recipients are refused at RCPT time and deliveries to it are deferred without connecting (451 4.7.1).

mod outcome;
mod pool;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use jiff::Timestamp;
use securemail_api::sidecar_status::ResultCounts;
use securemail_api::tenant::OnFailure;

use crate::admin::ReadyFlag;
use crate::dkim::{KeyStore, SignError};
use crate::egress::{self, EgressHealth};
use crate::evidence::{
    Attempt, DomainName, EvidenceWriter, MessageIdHash, Outcome, Policy, Refusal, SmtpReply, TenantRef, TlsSession,
    Token,
};
use crate::feedback::{self, FeedbackReport};
use crate::lmtp::{Backend, Envelope, RcptDecision, Recipient, Reply};
use crate::metrics::{LookupResult, Metrics};
use crate::policy::{DomainPolicy, LookupStage, MxCandidate, PolicyError, PolicyLookup, clock};
use crate::provider::{self, Provider, ProviderSuffix};
use crate::reputation::{Admission, BreakerSettings, Breakers, Heard};
use crate::smtp::client::{Session, SessionError, SessionSettings, Target, Transaction, TransactionOutcome};
use crate::tls::TlsConfigs;
use crate::warmup::{CapReached, Reservation, WarmupLimiter};

use outcome::{Answer, Failure, Verdict};
use pool::SessionPool;

/// Wall-clock time (DKIM `t=`, evidence timestamps, the UTC day of `/status`), passed in so tests can set it.
pub trait WallClock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Settings of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub tenant: TenantRef,
    pub session: SessionSettings,
    /// The tenant's `onFailure`, for a domain whose policy lookup itself found no secure path.
    pub on_failure: OnFailure,
    /// Everything still pending after this long is answered 4xx: Postfix gives up waiting after 1200 s
    /// (`lmtp_data_done_timeout`) and would retry the whole message anyway.
    pub deadline: Duration,
    /// How long an idle verified session is kept for the next message to the same MX.
    pub idle_session_ttl: Duration,
    pub max_idle_sessions: usize,
    /// The tenant's MX host suffixes per provider, before the built-in table.
    pub provider_suffixes: Vec<ProviderSuffix>,
    /// Every pool address of the tenant: a complaint report must name one of them.
    pub pool_addresses: Vec<IpAddr>,
}

impl EngineConfig {
    /// Defaults for everything but who and where.
    pub fn new(tenant: TenantRef, session: SessionSettings, on_failure: OnFailure) -> Self {
        Self {
            tenant,
            on_failure,
            deadline: Duration::from_secs(1000),
            idle_session_ttl: Duration::from_secs(30),
            max_idle_sessions: 32,
            pool_addresses: vec![session.source],
            provider_suffixes: Vec::new(),
            session,
        }
    }

    /// The provider class of an MX host.
    pub fn provider(&self, mx_host: &str) -> Provider {
        provider::classify(mx_host, &self.provider_suffixes)
    }

    /// The provider class a domain's deliveries count against: that of its first MX, the one normally used.
    fn provider_of(&self, policy: &DomainPolicy) -> Provider {
        policy
            .mx
            .first()
            .map_or(Provider::Other, |mx| self.provider(&String::from(mx.host.clone())))
    }
}

/// The delivery engine; implements [`Backend`].
pub struct Engine<P> {
    config: EngineConfig,
    policy: P,
    keys: Arc<KeyStore>,
    tls: Arc<TlsConfigs>,
    evidence: EvidenceWriter,
    /// Cleared after an evidence append failed: nothing more is delivered until a restart reopens the log. Shared
    /// with `/readyz` and across reloads (see [`Engine::with_evidence_writable`]).
    evidence_writable: ReadyFlag,
    metrics: Metrics,
    clock: Arc<dyn WallClock>,
    pool: SessionPool,
    breakers: Arc<Breakers>,
    /// Today's warmup caps; none in tests that do not exercise them.
    warmup: Option<Arc<WarmupLimiter>>,
    /// The egress self-check's verdict; none in tests that do not exercise it.
    egress: Option<EgressHealth>,
}

fn writable() -> ReadyFlag {
    let flag = ReadyFlag::default();
    flag.set(true);
    flag
}

/// How long RCPT waits for a recipient domain's policy while a breaker is not closed; a slower look-up accepts
/// the recipient and the delivery decides. Postfix waits 300 s for a RCPT reply (`lmtp_rcpt_timeout`).
const RCPT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

impl<P> std::fmt::Debug for Engine<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The message prepared once for every domain.
struct Prepared {
    /// The DKIM signatures and the message, ending in CRLF.
    content: Vec<u8>,
    message_id: MessageIdHash,
}

impl<P: PolicyLookup> Engine<P> {
    pub fn new(
        config: EngineConfig,
        policy: P,
        keys: Arc<KeyStore>,
        tls: Arc<TlsConfigs>,
        evidence: EvidenceWriter,
        metrics: Metrics,
        clock: Arc<dyn WallClock>,
    ) -> Self {
        let pool = SessionPool::new(config.idle_session_ttl, config.max_idle_sessions);
        metrics.expect_complaints_about(&config.pool_addresses);
        let breakers = Breakers::new(
            BreakerSettings::default(),
            Arc::new(clock::SystemClock),
            Arc::clone(&clock),
            metrics.clone(),
        );
        Self {
            config,
            policy,
            keys,
            tls,
            evidence,
            evidence_writable: writable(),
            metrics,
            clock,
            pool,
            breakers: Arc::new(breakers),
            warmup: None,
            egress: None,
        }
    }

    /// Delivers only while `health` says the pod can send from its address, and reports connections that could
    /// not leave from it there.
    pub fn with_egress(mut self, health: EgressHealth) -> Self {
        self.egress = Some(health);
        self
    }

    /// Reports evidence failures in `flag` (the sidecar's `/readyz` condition) and stops delivering while it is
    /// cleared, whichever engine cleared it: a reload's new engine does not deliver past a failed log.
    pub fn with_evidence_writable(mut self, flag: ReadyFlag) -> Self {
        self.evidence_writable = flag;
        self
    }

    /// Enforces the warmup caps counted by `limiter` (shared across reloads, like the breakers).
    pub fn with_warmup(mut self, limiter: Arc<WarmupLimiter>) -> Self {
        self.warmup = Some(limiter);
        self
    }

    /// Uses `breakers` instead of this engine's own, so their state outlives the engine (a reload builds a new
    /// one) and tests can drive their clock.
    pub fn with_breakers(mut self, breakers: Arc<Breakers>) -> Self {
        self.breakers = breakers;
        self
    }

    /// Signs the message. A header From the tenant may not send as is refused for good (5.7.1: a retry would be
    /// refused alike, so Postfix bounces at once with this text in the DSN); any other signing failure defers it.
    fn prepare(&self, message: &[u8]) -> Result<Prepared, Unsendable> {
        let signatures = self.keys.signer().sign(message, self.clock.now()).map_err(unsendable)?;
        let mut content = Vec::with_capacity(signatures.len() + message.len() + 2);
        content.extend_from_slice(&signatures);
        content.extend_from_slice(message);
        if !content.ends_with(b"\r\n") {
            content.extend_from_slice(b"\r\n");
        }
        Ok(Prepared {
            content,
            message_id: message_id(message),
        })
    }

    /// Delivers to one recipient domain; one reply per recipient of `recipients`, in order.
    async fn deliver_domain(
        &self,
        envelope: &Envelope,
        domain: &str,
        recipients: &[&Recipient],
        prepared: &Prepared,
        deadline: Instant,
    ) -> Vec<Answer> {
        let started = Instant::now();
        let count = NonZeroU32::new(u32::try_from(recipients.len()).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let Ok(domain_name) = DomainName::new(domain) else {
            let answer = Answer::local(553, (5, 1, 2), "recipient domain is not a valid DNS name");
            return vec![answer; recipients.len()];
        };
        let record = |mx: Option<&MxCandidate>| Attempt {
            time: self.clock.now(),
            tenant: self.config.tenant.clone(),
            message_id_sha256: prepared.message_id,
            recipient_domain: domain_name.clone(),
            recipient_count: count,
            mx_host: mx.map(|mx| mx.host.clone()),
            mx_ip: None,
            source_ip: self.config.session.source,
            policy: mx.map(|mx| Policy {
                source: mx.source,
                id: mx.policy_id.as_deref().and_then(|id| Token::new(id).ok()),
            }),
            tls: None,
            smtp_reply: None,
            outcome: Outcome::Deferred,
            protocol_error: None,
            warmup: None,
            refusal: None,
        };

        let mut attempts = Vec::new();
        let mut heard = Heard::default();
        let mut breaker: Option<(Provider, Option<u64>)> = None;
        let mut warmup: Option<(Arc<WarmupLimiter>, Reservation)> = None;
        let lookup = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            self.policy.resolve(domain),
        );
        let resolved = lookup.await.unwrap_or_else(|_| {
            Err(PolicyError::Temporary {
                stage: LookupStage::Deadline,
                reason: "the lookup did not finish within the time Postfix waits".to_owned(),
            })
        });
        let verdict = match resolved {
            Err(err) => {
                self.metrics.policy_lookup(match err {
                    PolicyError::Temporary { stage, .. } => LookupResult::Temporary(stage),
                    PolicyError::NoSecurePath { .. } => LookupResult::NoSecurePath,
                    PolicyError::Permanent { .. } => LookupResult::Permanent,
                });
                attempts.push(record(None));
                Verdict::policy_error(domain, &err, self.config.on_failure)
            }
            Ok(policy) => {
                self.metrics.policy_lookup(LookupResult::Ok);
                let guarded = self.config.provider_of(&policy);
                let reserved = match &self.warmup {
                    Some(limiter) => limiter
                        .reserve(guarded, count.get(), self.clock.now())
                        .map(|reservation| Some((Arc::clone(limiter), reservation))),
                    None => Ok(None),
                };
                match reserved {
                    Err(refusal) => {
                        self.metrics.warmup_refused(guarded);
                        // Nothing is sent: the record names the MX but no address, as no connection was made.
                        attempts.push(record(policy.mx.first()));
                        Verdict::All(warmup_refused(&refusal))
                    }
                    Ok(reservation) => {
                        warmup = reservation;
                        match self.breakers.admit_delivery(guarded) {
                            Admission::Paused { retry_at } => {
                                // Nothing is sent: the record names the MX but no address, as no connection was
                                // made.
                                attempts.push(record(policy.mx.first()));
                                Verdict::All(paused(guarded, retry_at))
                            }
                            admission => {
                                let probe = match admission {
                                    Admission::Probe(id) => Some(id),
                                    _ => None,
                                };
                                breaker = Some((guarded, probe));
                                let transaction = Transaction {
                                    sender: envelope.sender.as_ref(),
                                    params: &envelope.params,
                                    recipients,
                                    content: &prepared.content,
                                };
                                self.try_candidates(&policy, &transaction, deadline, &record, &mut attempts, &mut heard)
                                    .await
                            }
                        }
                    }
                }
            }
        };
        let answers = verdict.answers(recipients.len());
        let final_outcome = outcome::outcome_of(&answers);
        let counted = warmup.and_then(|(limiter, reservation)| {
            // Recipients the provider answered (2xx or 5xx) count against the cap; deferred ones return to it.
            let sent = answers
                .iter()
                .filter(|answer| outcome::of_code(answer.code()) != Outcome::Deferred)
                .count();
            limiter.settle(reservation, u32::try_from(sent).unwrap_or(u32::MAX))
        });
        if attempts.is_empty() {
            // A policy without MX hosts: still one record, so every answer to Postfix has its evidence.
            attempts.push(record(None));
        }
        if let Some(last) = attempts.last_mut() {
            last.outcome = final_outcome;
            // The count's durable copy: a restart recounts it from the record (see `warmup`).
            last.warmup = counted;
        }
        if let Some((guarded, probe)) = breaker {
            self.breakers.record(guarded, heard.signal(final_outcome), probe);
        }

        let provider = attempts
            .iter()
            .rev()
            .find_map(|attempt| attempt.mx_host.as_ref())
            .map_or(Provider::Other, |host| {
                self.config.provider(&String::from(host.clone()))
            });
        for attempt in &attempts {
            let host = attempt.mx_host.clone().map(String::from);
            self.metrics.attempt(
                host.as_deref()
                    .map_or(Provider::Other, |host| self.config.provider(host)),
                attempt.outcome,
                attempt.policy.as_ref().map(|policy| policy.source),
                attempt.tls.as_ref().map(|tls| tls.version),
            );
        }
        let mut answered = ResultCounts::default();
        for answer in &answers {
            match outcome::of_code(answer.code()) {
                Outcome::Delivered => answered.delivered += 1,
                Outcome::Deferred => answered.deferred += 1,
                Outcome::Bounced => answered.bounced += 1,
            }
        }
        for (result, count) in [
            (Outcome::Delivered, answered.delivered),
            (Outcome::Deferred, answered.deferred),
            (Outcome::Bounced, answered.bounced),
        ] {
            if count > 0 {
                self.metrics.recipients(provider, result, count);
            }
        }
        if let Some(ledger) = &self.warmup {
            // The durable day counts /status reports and the operator's warmup loop judges.
            ledger.record(provider, answered, self.clock.now());
        }
        self.metrics
            .duration(provider, final_outcome, started.elapsed().as_secs_f64());
        // A delivery is already in the evidence log and the metrics; a line per delivered message would cost a
        // log write per message on the hot path. Deferrals and bounces, what an SRE looks into, stay at info.
        if final_outcome == Outcome::Delivered {
            tracing::debug!(domain, %provider, attempts = attempts.len(), "recipient domain answered: delivered");
        } else {
            tracing::info!(
                domain,
                %provider,
                outcome = ?final_outcome,
                attempts = attempts.len(),
                "recipient domain answered"
            );
        }
        // The evidence, with the warmup count, reaches the disk before Postfix hears the answer.
        self.append_evidence(attempts).await;
        answers
    }

    /// Tries each MX and each of its addresses until one settles the transaction.
    async fn try_candidates(
        &self,
        policy: &DomainPolicy,
        transaction: &Transaction<'_>,
        deadline: Instant,
        record: &impl Fn(Option<&MxCandidate>) -> Attempt,
        attempts: &mut Vec<Attempt>,
        heard: &mut Heard,
    ) -> Verdict {
        let mut failures = Vec::new();
        for mx in &policy.mx {
            let host = String::from(mx.host.clone());
            let remaining = deadline.saturating_duration_since(Instant::now());
            let addresses = match tokio::time::timeout(remaining, self.policy.addresses(mx)).await {
                Ok(Ok(addresses)) => addresses,
                Err(_) => {
                    attempts.push(record(Some(mx)));
                    failures.push(Failure::temporary(format!(
                        "address lookup of {host} did not finish within the time Postfix waits"
                    )));
                    return Verdict::from_failures(failures, policy.on_failure);
                }
                Ok(Err(err)) => {
                    attempts.push(record(Some(mx)));
                    failures.push(Failure::temporary(format!("cannot resolve {host}: {err}")));
                    continue;
                }
            };
            let usable: Vec<IpAddr> = addresses
                .into_iter()
                .filter(|address| address.is_ipv4() == self.config.session.source.is_ipv4())
                .collect();
            if usable.is_empty() {
                attempts.push(record(Some(mx)));
                failures.push(Failure::temporary(format!(
                    "{host} has no address of the source address' family"
                )));
                continue;
            }
            for address in usable {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let mut attempt = record(Some(mx));
                let target = Target {
                    host: &host,
                    address,
                    auth: &mx.auth,
                    min_version: policy.min_version,
                    allow_cleartext: policy.allow_cleartext,
                };
                let result =
                    tokio::time::timeout(remaining, self.attempt(target, transaction, &mut attempt, heard)).await;
                attempt.time = self.clock.now();
                attempts.push(attempt);
                match result {
                    Ok(Ok(verdict)) => return verdict,
                    Ok(Err(failure)) => {
                        if let Some(class) = failure.tls_failure() {
                            self.metrics.tls_failure(class);
                        }
                        failures.push(failure);
                    }
                    Err(_) => {
                        failures.push(Failure::temporary(format!(
                            "delivery to {host} did not finish within the time Postfix waits"
                        )));
                        return Verdict::from_failures(failures, policy.on_failure);
                    }
                }
            }
        }
        Verdict::from_failures(failures, policy.on_failure)
    }

    /// One session with one address (reused when one is idle), recording what happened in `attempt`.
    async fn attempt(
        &self,
        target: Target<'_>,
        transaction: &Transaction<'_>,
        attempt: &mut Attempt,
        heard: &mut Heard,
    ) -> Result<Verdict, Failure> {
        let provider = self.config.provider(target.host);
        let mut hear = |reply: &crate::smtp::reply::Reply| {
            if let Some(reason) = heard.note(reply) {
                self.metrics.remote_reply(provider, reason);
            }
        };
        let key = pool::key(&target);
        let (session, sent) = loop {
            let mut session = match self.pool.take(&key) {
                Some(session) => session,
                None => match Session::open(&self.config.session, &self.tls, target).await {
                    Ok(session) => session,
                    Err(err) => {
                        if let (SessionError::Egress(failure), Some(health)) = (&err, &self.egress) {
                            health.connection_failed(failure, self.clock.now());
                        }
                        if !matches!(err, SessionError::Connect { .. } | SessionError::Egress(_)) {
                            attempt.mx_ip = Some(target.address);
                        }
                        if let SessionError::Refused { reply, .. } = &err {
                            hear(reply);
                        }
                        record_failure(attempt, &err);
                        return Err(Failure::of_session(&target, &err));
                    }
                },
            };
            match session.send(transaction).await {
                // Closed while idle, before taking anything: the next idle session, or a fresh one, goes instead.
                Err(SessionError::Stale { .. }) => continue,
                sent => break (session, sent),
            }
        };
        attempt.mx_ip = Some(target.address);
        attempt.tls = session.tls().and_then(|tls| {
            // rustls' suite names are always valid tokens; the fallback only keeps this total.
            let cipher = Token::new(&tls.cipher).or_else(|_| Token::new("unknown")).ok()?;
            Some(TlsSession {
                version: tls.version,
                cipher,
                verification: tls.verification,
                peer_chain_sha256: tls.peer_chain_sha256.clone(),
            })
        });
        match &sent {
            Ok(outcome) => attempt.smtp_reply = outcome.deciding_reply().and_then(remote_reply),
            Err(err) => record_failure(attempt, err),
        }
        match &sent {
            Ok(TransactionOutcome::MailRefused(reply)) | Err(SessionError::Refused { reply, .. }) => hear(reply),
            Ok(TransactionOutcome::Replies { rcpt, data }) => rcpt.iter().chain(data).for_each(&mut hear),
            Ok(TransactionOutcome::Unsupported { .. }) | Err(_) => {}
        }
        match sent {
            Ok(outcome) => {
                let verdict = Verdict::of_transaction(target.host, &outcome);
                match outcome {
                    // The session is useless for this message anyway; a fresh one costs little.
                    TransactionOutcome::Unsupported { .. } => session.quit().await,
                    // The server ended the session with a 421.
                    _ if session.is_closed() => {}
                    _ => self.pool.put(key, session),
                }
                verdict
            }
            Err(err) => {
                if let SessionError::Protocol { violation, .. } = &err {
                    tracing::warn!(mx = target.host, %violation, "MX broke the SMTP reply sequence; session dropped");
                }
                Err(Failure::of_session(&target, &err))
            }
        }
    }

    async fn append_evidence(&self, attempts: Vec<Attempt>) {
        let Err(error) = self.evidence.append(attempts).await else {
            return;
        };
        // The remote already has what it accepted: answering 4xx now would deliver it twice. New messages are
        // deferred instead until the log is reopened.
        self.evidence_writable.set(false);
        self.metrics.evidence_failure();
        tracing::error!(%error, "cannot write evidence; deferring all further deliveries until restart");
    }
}

impl<P: PolicyLookup> Backend for Engine<P> {
    /// Refuses recipients of a provider whose breaker is open. Only then is the domain's policy looked up here
    /// (from the resolver's cache, or a look-up the delivery would make anyway); when every breaker is closed,
    /// RCPT costs nothing.
    async fn check_recipient(&self, _envelope: &Envelope, recipient: &Recipient) -> RcptDecision {
        if recipient.domain() == feedback::FEEDBACK_DOMAIN {
            if feedback::is_feedback_address(&recipient.mailbox) {
                return RcptDecision::Accept;
            }
            // Should the reply not build, the delivery refuses the address the same way.
            return not_the_feedback_address()
                .reply()
                .map_or(RcptDecision::Accept, RcptDecision::Refuse);
        }
        let warmup = self.warmup.as_ref().filter(|limiter| limiter.is_active());
        if self.breakers.all_closed() && warmup.is_none() {
            return RcptDecision::Accept;
        }
        let domain = recipient.domain();
        let Ok(Ok(policy)) = tokio::time::timeout(RCPT_LOOKUP_TIMEOUT, self.policy.resolve(domain)).await else {
            // The delivery looks again and answers properly.
            return RcptDecision::Accept;
        };
        let provider = self.config.provider_of(&policy);
        let refusal = match warmup.map(|limiter| limiter.check(provider, self.clock.now())) {
            Some(Err(refusal)) => {
                self.metrics.warmup_refused(provider);
                warmup_refused(&refusal)
            }
            _ => match self.breakers.admit_recipient(provider) {
                Ok(()) => return RcptDecision::Accept,
                Err(retry_at) => paused(provider, retry_at),
            },
        };
        match refusal.reply() {
            Ok(reply) => RcptDecision::Refuse(reply),
            Err(err) => {
                tracing::error!(error = %err, "cannot build the RCPT refusal; accepting");
                RcptDecision::Accept
            }
        }
    }

    async fn deliver(&self, envelope: Envelope, message: Bytes) -> Vec<Reply> {
        let answers = self.answers(&envelope, &message).await;
        // An answer LMTP cannot carry is a bug; an empty list makes the LMTP server defer every recipient.
        answers
            .iter()
            .map(Answer::reply)
            .collect::<crate::Result<Vec<_>>>()
            .unwrap_or_else(|err| {
                tracing::error!(error = %err, "cannot build LMTP replies; deferring the message");
                Vec::new()
            })
    }
}

impl<P: PolicyLookup> Engine<P> {
    /// One answer per recipient: the feedback address's from the intake, the others' from delivery.
    async fn answers(&self, envelope: &Envelope, message: &[u8]) -> Vec<Answer> {
        let mut answers: Vec<Option<Answer>> = vec![None; envelope.recipients.len()];
        let mut to_deliver = Vec::new();
        let mut intake: Option<Answer> = None;
        for (index, recipient) in envelope.recipients.iter().enumerate() {
            if recipient.domain() != feedback::FEEDBACK_DOMAIN {
                to_deliver.push(index);
            } else if feedback::is_feedback_address(&recipient.mailbox) {
                // Listed twice, the report still counts once.
                if intake.is_none() {
                    intake = Some(self.take_in_feedback(message).await);
                }
                answers[index] = intake.clone();
            } else {
                answers[index] = Some(not_the_feedback_address());
            }
        }
        if !to_deliver.is_empty() {
            for (index, answer) in self.deliver_message(envelope, &to_deliver, message).await {
                answers[index] = Some(answer);
            }
        }
        answers
            .into_iter()
            .map(|answer| answer.unwrap_or_else(|| Answer::local(451, (4, 3, 0), "internal error: no answer")))
            .collect()
    }

    /// Delivers `message` to the recipients at `indices` of `envelope`; their answers, by index.
    async fn deliver_message(&self, envelope: &Envelope, indices: &[usize], message: &[u8]) -> Vec<(usize, Answer)> {
        let all = |answer: Answer| indices.iter().map(|&index| (index, answer.clone())).collect();
        if !self.evidence_writable.get() {
            return all(Answer::local(
                451,
                (4, 3, 0),
                "evidence log unavailable; delivery paused until the sidecar restarts",
            ));
        }
        if let Some(health) = &self.egress {
            health.first_check(egress::CHECK_TIMEOUT + Duration::from_secs(1)).await;
        }
        if let Some(problem) = self.egress.as_ref().and_then(EgressHealth::problem) {
            // Postfix keeps the message and retries; the pod is unready meanwhile, so new mail goes elsewhere.
            return all(Answer::local(
                451,
                (4, 4, 0),
                format!(
                    "cannot send from {}: {problem}; delivery paused",
                    self.config.session.source
                ),
            ));
        }
        let mut by_domain: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for &index in indices {
            by_domain
                .entry(envelope.recipients[index].domain())
                .or_default()
                .push(index);
        }
        let prepared = match self.prepare(message) {
            Ok(prepared) => prepared,
            Err(Unsendable { answer, refusal }) => {
                if let Some(refusal) = refusal {
                    self.record_refusal(&by_domain, message, refusal).await;
                }
                return all(answer);
            }
        };
        let deadline = Instant::now() + self.config.deadline;
        let prepared = &prepared;
        let deliveries = by_domain.iter().map(|(domain, indices)| async move {
            let recipients: Vec<&Recipient> = indices.iter().map(|&i| &envelope.recipients[i]).collect();
            let answers = self
                .deliver_domain(envelope, domain, &recipients, prepared, deadline)
                .await;
            indices.iter().copied().zip(answers).collect::<Vec<_>>()
        });
        futures::future::join_all(deliveries)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// A message refused before delivery: counted once, and one evidence record per recipient domain (the log's
    /// unit) saying why and that nothing was sent, on disk before Postfix hears the refusal. Not counted as bounced
    /// recipients: no provider saw the message, so it says nothing of the address's reputation.
    async fn record_refusal(&self, by_domain: &BTreeMap<&str, Vec<usize>>, message: &[u8], refusal: Refusal) {
        self.metrics.header_from_refused(refusal);
        let message_id_sha256 = message_id(message);
        let attempts = by_domain
            .iter()
            .filter_map(|(domain, indices)| {
                Some(Attempt {
                    time: self.clock.now(),
                    tenant: self.config.tenant.clone(),
                    message_id_sha256,
                    recipient_domain: DomainName::new(domain).ok()?,
                    recipient_count: NonZeroU32::new(u32::try_from(indices.len()).unwrap_or(u32::MAX))
                        .unwrap_or(NonZeroU32::MIN),
                    mx_host: None,
                    mx_ip: None,
                    source_ip: self.config.session.source,
                    policy: None,
                    tls: None,
                    smtp_reply: None,
                    outcome: Outcome::Bounced,
                    protocol_error: None,
                    warmup: None,
                    refusal: Some(refusal),
                })
            })
            .collect();
        self.append_evidence(attempts).await;
    }

    /// Takes in a report sent to the feedback address: counts a complaint, ignores other feedback, refuses what
    /// the intake cannot use with 550 5.6.0 naming the fault. Nothing is sent and no evidence is written.
    async fn take_in_feedback(&self, message: &[u8]) -> Answer {
        let report = match feedback::parse_report(message) {
            Ok(report) => report,
            Err(error) => {
                tracing::info!(%error, "refused a message to the feedback address");
                return Answer::local(550, (5, 6, 0), format!("not a usable ARF feedback report: {error}"));
            }
        };
        if !self.config.pool_addresses.contains(&report.source_ip) {
            tracing::info!(source_ip = %report.source_ip, "refused a feedback report about an address outside the pool");
            return Answer::local(
                550,
                (5, 6, 0),
                format!(
                    "feedback report refused: Source-IP {} is not a pool address of tenant {}",
                    report.source_ip, self.config.tenant
                ),
            );
        }
        if !report.feedback_type.is_complaint() {
            tracing::debug!(feedback_type = %report.feedback_type, "feedback report accepted, not a complaint");
            return Answer::local(
                250,
                (2, 0, 0),
                format!(
                    "feedback report accepted; Feedback-Type {} is not counted as a complaint",
                    report.feedback_type
                ),
            );
        }
        let provider = self.complainer_provider(&report).await;
        self.metrics.complaint(report.source_ip, provider);
        tracing::info!(source_ip = %report.source_ip, %provider, feedback_type = %report.feedback_type, "spam complaint counted");
        Answer::local(
            250,
            (2, 0, 0),
            format!("complaint counted against {}", report.source_ip),
        )
    }

    /// The complaining recipient's provider class, decided as for deliveries: by the first MX of its domain (so a
    /// hosted domain counts as its host), by the domain's own name when the lookup fails, else by the reporting
    /// MTA's host name.
    async fn complainer_provider(&self, report: &FeedbackReport) -> Provider {
        if let Some(domain) = &report.recipient_domain {
            let domain = String::from(domain.clone());
            return match tokio::time::timeout(RCPT_LOOKUP_TIMEOUT, self.policy.resolve(&domain)).await {
                Ok(Ok(policy)) => self.config.provider_of(&policy),
                _ => self.config.provider(&domain),
            };
        }
        report.reporting_mta.as_ref().map_or(Provider::Other, |host| {
            self.config.provider(&String::from(host.clone()))
        })
    }
}

/// Why a message is not sent at all: the answer for every recipient, and the refusal to record when it is one.
struct Unsendable {
    answer: Answer,
    refusal: Option<Refusal>,
}

/// The answer to a message that cannot be signed: 550 5.7.1 for a header From problem, 451 4.7.0 for any other.
fn unsendable(err: SignError) -> Unsendable {
    match header_from_refusal(&err) {
        Some(refusal) => {
            tracing::info!(error = %err, "header From refused; the message bounces");
            Unsendable {
                answer: Answer::local(550, (5, 7, 1), format!("{err}; the message was not sent")),
                refusal: Some(refusal),
            }
        }
        None => {
            tracing::warn!(error = %err, "DKIM signing failed; deferring the message");
            Unsendable {
                answer: Answer::local(
                    451,
                    (4, 7, 0),
                    format!("DKIM signing failed: {err}; the message was not sent"),
                ),
                refusal: None,
            }
        }
    }
}

/// The header From problems no retry can cure: the message must bounce, naming the problem. A tenant domain without
/// an active key yet, a malformed message or a key that fails to sign is not the header From's fault.
fn header_from_refusal(err: &SignError) -> Option<Refusal> {
    match err {
        SignError::ForeignDomain { .. } => Some(Refusal::HeaderFromNotTenantDomain),
        SignError::MultipleFromMailboxes { .. } => Some(Refusal::HeaderFromSeveralMailboxes),
        SignError::RepeatedFrom { .. } => Some(Refusal::HeaderFromRepeated),
        SignError::MissingFrom => Some(Refusal::HeaderFromMissing),
        SignError::UnparsableFrom { .. } => Some(Refusal::HeaderFromUnparsable),
        SignError::NoKeyForDomain { .. }
        | SignError::BareLineEnding
        | SignError::MalformedHeader
        | SignError::Crypto { .. } => None,
    }
}

/// The answer for any address at the reserved feedback domain but the feedback address.
fn not_the_feedback_address() -> Answer {
    Answer::local(
        550,
        (5, 1, 1),
        format!(
            "no such address in the reserved feedback domain; complaint reports go to {}",
            feedback::FEEDBACK_ADDRESS
        ),
    )
}

/// The answer while a provider's warmup allowance is used up: Postfix keeps the mail and retries.
fn warmup_refused(refusal: &CapReached) -> Answer {
    Answer::local(452, (4, 7, 1), refusal.to_string())
}

/// The answer while `provider`'s breaker keeps deliveries from this address paused.
fn paused(provider: Provider, retry_at: jiff::Timestamp) -> Answer {
    Answer::local(
        451,
        (4, 7, 1),
        format!(
            "deliveries to {provider} from this address are paused after repeated deferrals (local circuit \
             breaker); retry after {}",
            retry_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        ),
    )
}

/// What a failed session leaves in its evidence: the refusal that ended it, or the protocol error; no reply when
/// the connection failed or closed before a deciding one.
fn record_failure(attempt: &mut Attempt, err: &SessionError) {
    attempt.smtp_reply = match err {
        SessionError::Refused { reply, .. } => remote_reply(reply),
        _ => None,
    };
    attempt.protocol_error = match err {
        SessionError::Protocol { violation, .. } => Some(*violation),
        _ => None,
    };
}

/// A remote reply for evidence (redacted there).
fn remote_reply(reply: &crate::smtp::reply::Reply) -> Option<SmtpReply> {
    SmtpReply::from_remote(reply.code(), &reply.lines().join("\n")).ok()
}

/// The hash of the Message-ID header (unfolded), or of the empty string when the message has none.
fn message_id(message: &[u8]) -> MessageIdHash {
    let header_end = message
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map_or(message.len(), |end| end + 2);
    let mut value: Option<String> = None;
    for line in message[..header_end].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = String::from_utf8_lossy(line);
        match (&mut value, line.starts_with([' ', '\t'])) {
            (Some(value), true) => value.push_str(&line),
            (Some(_), false) => break,
            (None, _) => {
                if let Some((name, rest)) = line.split_once(':')
                    && name.trim().eq_ignore_ascii_case("message-id")
                {
                    value = Some(rest.to_owned());
                }
            }
        }
    }
    MessageIdHash::of_header_value(value.as_deref().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_taken_from_the_header_section_only() {
        let message =
            b"From: a@example.org\r\nMessage-id:\r\n <1@example.org>\r\nSubject: x\r\n\r\nMessage-ID: <2@x>\r\n";
        assert_eq!(message_id(message), MessageIdHash::of_header_value("<1@example.org>"));
        assert_eq!(
            message_id(b"Subject: x\r\n\r\nMessage-ID: <2@x>\r\n"),
            MessageIdHash::of_header_value("")
        );
    }
}
