//! Reputation sensors: remote 4xx/5xx replies classified by reason ([`classify`]), and a short local circuit
//! breaker per provider class ([`Breakers`]) that stops sending to a provider whose deferrals spike, before the
//! provider escalates from throttling to blocking this address (DESIGN.md, "Warmup and reputation").

mod breaker;
mod classify;

use std::collections::BTreeMap;

use securemail_api::sidecar_status::{ReplyCounts, ReputationStatus};

use crate::evidence::Outcome;
use crate::metrics::Metrics;
use crate::smtp::reply::Reply;

pub use breaker::{Admission, BreakerSettings, Breakers, GUARDED, Signal};
pub use classify::classify;

/// Why a remote MX deferred or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    Unknown,
    Policy,
    Authentication,
    RateLimited,
    /// Ordered last: the strongest signal about the sending address.
    ReputationBlock,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::RateLimited,
        Reason::ReputationBlock,
        Reason::Policy,
        Reason::Authentication,
        Reason::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RateLimited => "rate_limited",
            Reason::ReputationBlock => "reputation_block",
            Reason::Policy => "policy",
            Reason::Authentication => "authentication",
            Reason::Unknown => "unknown",
        }
    }

    /// Whether the provider is slowing or blocking this address (as opposed to refusing one message).
    pub fn is_about_the_sender(self) -> bool {
        matches!(self, Reason::RateLimited | Reason::ReputationBlock)
    }

    pub(crate) fn count(self, counts: &mut ReplyCounts) {
        let field = match self {
            Reason::RateLimited => &mut counts.rate_limited,
            Reason::ReputationBlock => &mut counts.reputation_block,
            Reason::Policy => &mut counts.policy,
            Reason::Authentication => &mut counts.authentication,
            Reason::Unknown => &mut counts.unknown,
        };
        *field += 1;
    }
}

/// The negative replies heard during one recipient domain's delivery.
#[derive(Clone, Copy, Debug, Default)]
pub struct Heard {
    strongest: Option<Reason>,
}

impl Heard {
    /// Classifies `reply`; `None` for a reply that is neither 4xx nor 5xx.
    pub fn note(&mut self, reply: &Reply) -> Option<Reason> {
        let reason = classify(reply)?;
        self.strongest = self.strongest.max(Some(reason));
        Some(reason)
    }

    /// What the delivery tells the breaker. A deferral or bounce without a remote refusal (connection, TLS or
    /// DNS failure, or a local decision) says nothing about the provider's view of this address.
    pub fn signal(&self, outcome: Outcome) -> Signal {
        match (outcome, self.strongest) {
            (Outcome::Delivered, _) => Signal::Delivered,
            (_, None) => Signal::NoAnswer,
            (Outcome::Deferred, Some(reason)) => Signal::Deferred(reason),
            (Outcome::Bounced, Some(reason)) => Signal::Refused(reason),
        }
    }
}

/// `/status`'s reputation part: today's classified replies and the breakers now.
pub fn status(metrics: &Metrics, breakers: &Breakers) -> ReputationStatus {
    let (date, replies) = metrics.replies_today();
    ReputationStatus {
        date,
        replies,
        circuits: breakers.status().into_iter().collect::<BTreeMap<_, _>>(),
    }
}
