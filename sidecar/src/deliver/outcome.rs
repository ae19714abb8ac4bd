//! Turning what happened at the MX hosts into Postfix's per-recipient answers.

use securemail_api::tenant::OnFailure;

use crate::error::Result;
use crate::evidence::{Outcome, ReplyText};
use crate::lmtp::Reply;
use crate::metrics::TlsFailure;
use crate::policy::{PeerAuth, PolicyError};
use crate::smtp::client::{SessionError, Target, TransactionOutcome};
use crate::smtp::reply::Reply as RemoteReply;
use crate::tls::HandshakeFailureKind;

/// One answer for Postfix, before it is checked into an LMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Answer {
    code: u16,
    enhanced: Option<(u8, u16, u16)>,
    text: String,
}

impl Answer {
    pub(super) fn local(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced: Some(enhanced),
            text: text.into(),
        }
    }

    /// The remote's reply passed on: its code and enhanced code, its text redacted (it may echo the recipient).
    /// A reply that is neither 4xx nor 5xx here is the remote breaking the protocol: try later.
    fn relay(host: &str, remote: &RemoteReply) -> Self {
        let text = format!("{host} said: {}", String::from(ReplyText::redacted(&remote.text())));
        match remote.class() {
            4 | 5 => Self {
                code: remote.code(),
                enhanced: remote.enhanced(),
                text,
            },
            _ => Self::local(
                451,
                (4, 5, 0),
                format!("unexpected reply {} from {host}", remote.code()),
            ),
        }
    }

    fn delivered(host: &str, remote: &RemoteReply) -> Self {
        let text = format!(
            "delivered to {host}: {}",
            String::from(ReplyText::redacted(&remote.text()))
        );
        Self::local(250, (2, 0, 0), text)
    }

    pub(super) fn code(&self) -> u16 {
        self.code
    }

    /// The LMTP reply; a remote code LMTP replies cannot carry becomes its class' generic code.
    pub(super) fn reply(&self) -> Result<Reply> {
        Reply::new(self.code, self.enhanced, &self.text).or_else(|_| {
            let (code, enhanced) = match self.code / 100 {
                5 => (554, (5, 0, 0)),
                _ => (451, (4, 0, 0)),
            };
            Reply::new(code, Some(enhanced), &self.text)
        })
    }
}

/// Why one MX address did not settle the transaction.
#[derive(Debug)]
pub(super) enum Failure {
    /// No secure path through this MX.
    Security { reason: String, class: TlsFailure },
    /// Try later, possibly another MX; `remote` is a refusal the MX sent before the transaction.
    Temporary {
        reason: String,
        remote: Option<(String, RemoteReply)>,
    },
}

impl Failure {
    pub(super) fn temporary(reason: String) -> Self {
        Failure::Temporary { reason, remote: None }
    }

    pub(super) fn of_session(target: &Target<'_>, err: &SessionError) -> Self {
        let host = target.host;
        let security = |reason: String, class| Failure::Security { reason, class };
        match err {
            SessionError::NoStartTls => security(
                format!("{host} offers no STARTTLS; secure delivery required"),
                TlsFailure::NoStartTls,
            ),
            SessionError::Handshake(failure) => match failure.kind {
                HandshakeFailureKind::Certificate => security(
                    format!(
                        "certificate of {host} failed verification ({}); secure delivery required",
                        failure.reason
                    ),
                    match target.auth {
                        PeerAuth::Dane { .. } => TlsFailure::Dane,
                        _ => TlsFailure::Certificate,
                    },
                ),
                HandshakeFailureKind::Protocol => security(
                    format!("{} with {host}; secure delivery required", failure.reason),
                    TlsFailure::Handshake,
                ),
                HandshakeFailureKind::Network => Failure::temporary(format!("{host}: {}", failure.reason)),
            },
            SessionError::Refused { phase, reply, .. } => Failure::Temporary {
                reason: format!("{host} refused {phase}"),
                remote: Some((host.to_owned(), reply.clone())),
            },
            other => Failure::temporary(format!("{host}: {other}")),
        }
    }

    pub(super) fn tls_failure(&self) -> Option<TlsFailure> {
        match self {
            Failure::Security { class, .. } => Some(*class),
            Failure::Temporary { .. } => None,
        }
    }

    fn reason(&self) -> &str {
        match self {
            Failure::Security { reason, .. } | Failure::Temporary { reason, .. } => reason,
        }
    }
}

/// How a recipient domain's delivery ended.
#[derive(Debug)]
pub(super) enum Verdict {
    All(Answer),
    /// One answer per recipient, in order.
    Each(Vec<Answer>),
}

impl Verdict {
    pub(super) fn policy_error(domain: &str, err: &PolicyError, on_failure: OnFailure) -> Self {
        Verdict::All(match err {
            PolicyError::Temporary { reason, .. } => Answer::local(
                451,
                (4, 4, 3),
                format!("TLS policy of {domain} cannot be determined now: {reason}"),
            ),
            PolicyError::NoSecurePath { reason } => no_secure_path(on_failure, format!("{domain}: {reason}")),
            PolicyError::Permanent { reason } => {
                Answer::local(550, (5, 1, 2), format!("{domain} does not accept mail: {reason}"))
            }
        })
    }

    /// No MX address settled the transaction. Only when every one of them offered no secure path does the
    /// domain's `onFailure` decide; anything else may pass on a retry.
    pub(super) fn from_failures(failures: Vec<Failure>, on_failure: OnFailure) -> Self {
        let Some(first) = failures.first() else {
            return Verdict::All(Answer::local(451, (4, 4, 4), "no MX host to try"));
        };
        let more = match failures.len() {
            1 => String::new(),
            n => format!(" (and {} more attempts failed)", n - 1),
        };
        if failures.iter().all(|failure| failure.tls_failure().is_some()) {
            return Verdict::All(no_secure_path(on_failure, format!("{}{more}", first.reason())));
        }
        let remote = failures.iter().rev().find_map(|failure| match failure {
            Failure::Temporary {
                remote: Some((host, reply)),
                ..
            } => Some((host, reply)),
            _ => None,
        });
        Verdict::All(match remote {
            Some((host, reply)) if reply.class() == 4 => Answer::relay(host, reply),
            _ => {
                let reasons: Vec<&str> = failures.iter().map(Failure::reason).collect();
                Answer::local(451, (4, 4, 1), reasons.join("; "))
            }
        })
    }

    /// The remote's answers to a transaction that ran. A refused MAIL that is not permanent may pass through
    /// another MX, so it is a [`Failure`].
    pub(super) fn of_transaction(host: &str, outcome: &TransactionOutcome) -> Result<Self, Failure> {
        match outcome {
            TransactionOutcome::MailRefused(reply) if reply.class() == 5 => {
                Ok(Verdict::All(Answer::relay(host, reply)))
            }
            TransactionOutcome::MailRefused(reply) => Err(Failure::Temporary {
                reason: format!("{host} refused MAIL"),
                remote: Some((host.to_owned(), reply.clone())),
            }),
            TransactionOutcome::Replies { rcpt, data } => Ok(Verdict::Each(
                rcpt.iter()
                    .map(|rcpt| match (rcpt.class(), data) {
                        (2, Some(data)) if data.class() == 2 => Answer::delivered(host, data),
                        (2, Some(data)) => Answer::relay(host, data),
                        (2, None) => Answer::local(451, (4, 3, 0), "internal error: data was not sent"),
                        _ => Answer::relay(host, rcpt),
                    })
                    .collect(),
            )),
            TransactionOutcome::Unsupported { enhanced, reason } => {
                Ok(Verdict::All(Answer::local(554, *enhanced, format!("{host}: {reason}"))))
            }
        }
    }

    /// One answer per recipient of `count`.
    pub(super) fn answers(self, count: usize) -> Vec<Answer> {
        match self {
            Verdict::All(answer) => vec![answer; count],
            Verdict::Each(answers) => answers,
        }
    }
}

fn no_secure_path(on_failure: OnFailure, reason: String) -> Answer {
    match on_failure {
        OnFailure::Defer => Answer::local(450, (4, 7, 5), reason),
        OnFailure::Bounce => Answer::local(550, (5, 7, 10), reason),
    }
}

/// What a set of answers did to the message: delivered if any recipient was, bounced if all were refused for
/// good, deferred otherwise.
pub(super) fn outcome_of(answers: &[Answer]) -> Outcome {
    if answers.iter().any(|answer| answer.code / 100 == 2) {
        Outcome::Delivered
    } else if !answers.is_empty() && answers.iter().all(|answer| answer.code / 100 == 5) {
        Outcome::Bounced
    } else {
        Outcome::Deferred
    }
}

/// The result class of one answer.
pub(super) fn of_code(code: u16) -> Outcome {
    match code / 100 {
        2 => Outcome::Delivered,
        5 => Outcome::Bounced,
        _ => Outcome::Deferred,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn security(reason: &str) -> Failure {
        Failure::Security {
            reason: reason.to_owned(),
            class: TlsFailure::NoStartTls,
        }
    }

    fn remote(wire: &[u8]) -> RemoteReply {
        crate::smtp::reply::parse(wire).unwrap().unwrap().0
    }

    fn only(verdict: Verdict) -> Answer {
        match verdict {
            Verdict::All(answer) => answer,
            Verdict::Each(answers) => panic!("expected one answer for all, got {answers:?}"),
        }
    }

    #[test]
    fn on_failure_decides_only_when_every_mx_lacked_a_secure_path() {
        let all_insecure = Verdict::from_failures(vec![security("a"), security("b")], OnFailure::Bounce);
        assert_eq!(
            only(all_insecure),
            Answer::local(550, (5, 7, 10), "a (and 1 more attempts failed)")
        );
        let deferred = Verdict::from_failures(vec![security("a")], OnFailure::Defer);
        assert_eq!(only(deferred), Answer::local(450, (4, 7, 5), "a"));

        let mixed = Verdict::from_failures(
            vec![
                security("mx1 offers no STARTTLS"),
                Failure::temporary("mx2: timed out".into()),
            ],
            OnFailure::Bounce,
        );
        assert_eq!(
            only(mixed),
            Answer::local(451, (4, 4, 1), "mx1 offers no STARTTLS; mx2: timed out")
        );
    }

    #[test]
    fn a_temporary_remote_refusal_is_passed_on_and_a_permanent_one_before_mail_is_not() {
        let refused = |wire: &[u8]| Failure::Temporary {
            reason: "mx.test refused greeting".into(),
            remote: Some(("mx.test".into(), remote(wire))),
        };
        let rate_limited = Verdict::from_failures(
            vec![refused(b"421 4.7.28 <a@b.example> slow down\r\n")],
            OnFailure::Bounce,
        );
        let answer = only(rate_limited);
        assert_eq!((answer.code, answer.enhanced), (421, Some((4, 7, 28))));
        assert_eq!(answer.text, "mx.test said: [redacted] slow down");

        let greeting_554 = only(Verdict::from_failures(
            vec![refused(b"554 no service\r\n")],
            OnFailure::Bounce,
        ));
        assert_eq!(greeting_554.code, 451);
    }

    #[test]
    fn remote_codes_lmtp_cannot_carry_become_their_class_generic_code() {
        let odd = Answer {
            code: 599,
            enhanced: Some((5, 0, 0)),
            text: "odd".into(),
        };
        assert_eq!(odd.reply().unwrap().code(), 554);
        let unexpected = Answer::relay("mx.test", &remote(b"354 go on\r\n"));
        assert_eq!(unexpected.code, 451);
    }
}
