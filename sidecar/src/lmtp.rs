//! The LMTP server (RFC 2033) Postfix delivers every message to. Postfix keeps each message queued until this
//! server answers for each recipient after DATA: 2xx delivered, 4xx try later, 5xx bounce. Those answers come from
//! a [`Backend`] (the delivery engine), which must not answer 2xx before the remote MX accepted the recipient.
//! Recipients are also put to the backend at RCPT time, so that warmup caps can refuse them with 452 4.7.1.
//!
//! Input is handled strictly, and no input makes the server panic (fuzzed: sidecar/fuzz, and a proptest):
//! - only CRLF ends a line. A bare CR or LF in a command line gets 500 5.5.2 and the session goes on; in the
//!   content it refuses the message for every recipient with 550 5.6.0 (never normalised, never passed on: SMTP
//!   smuggling). The end of data is exactly CRLF "." CRLF; leading dots are unstuffed.
//! - a command line over 512 octets gets 500 5.5.6; a content line over 998 octets refuses the message with
//!   550 5.6.0 (Postfix folds longer lines, so only a broken client sends one); a message over
//!   [`Limits::max_message_bytes`] gets 552 5.3.4 for every recipient. Refused content is still read to its end
//!   marker, so the client gets its replies on a stream that is still in step.
//! - recipients beyond [`Limits::max_recipients`] get 452 4.5.3; non-ASCII addresses without SMTPUTF8, or invalid
//!   UTF-8, get 553 5.6.7.

mod command;
mod data;
mod envelope;
mod reply;
mod server;
mod session;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

pub use envelope::{Body, Envelope, MailParams, Mailbox, OriginalRecipient, Recipient, Ret};
pub use reply::Reply;
pub use server::LmtpListener;
pub use session::serve_session;

/// The delivery engine behind the LMTP server.
pub trait Backend: Send + Sync + 'static {
    /// Decides at RCPT time whether `recipient` may join the transaction; `envelope.recipients` holds those
    /// accepted so far. A refusal must be 4xx or 5xx; anything else is answered with 451 4.3.0.
    fn check_recipient(&self, envelope: &Envelope, recipient: &Recipient) -> impl Future<Output = RcptDecision> + Send;

    /// Delivers `message` (dot-unstuffed, CRLF line ends) and answers with exactly one reply per recipient, in the
    /// order of `envelope.recipients`: 2xx only once the remote MX accepted that recipient. A wrong number of
    /// replies is answered with 451 4.3.0 for every recipient. Postfix waits 1200 s for these answers
    /// (`lmtp_data_done_timeout`) and then retries the whole message, so the backend must answer 4xx for any
    /// recipient still pending well before then.
    fn deliver(&self, envelope: Envelope, message: Bytes) -> impl Future<Output = Vec<Reply>> + Send;
}

/// The backend's answer to RCPT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptDecision {
    Accept,
    /// Refuse with this 4xx or 5xx reply, e.g. 452 4.7.1 when a warmup cap is reached.
    Refuse(Reply),
}

/// Per-session limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest message accepted (unstuffed, CRLF line ends), advertised as SIZE.
    pub max_message_bytes: u64,
    /// Recipients per transaction; more get 452 4.5.3 and Postfix sends them in a later transaction.
    pub max_recipients: usize,
    /// How long to wait for the client's next input (or for it to take our replies) before closing with 421.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    /// Postfix's limit is 25 MiB (`message_size_limit`) counted as Postfix counts; what it sends over LMTP adds
    /// its own Received: header and CRLF line ends, so the sidecar allows a margin rather than bounce mail Postfix
    /// has already queued. RFC 5321 asks servers to take at least 100 recipients; Postfix sends at most 20 here.
    /// Five minutes of idleness is RFC 5321's server timeout.
    fn default() -> Self {
        Self {
            max_message_bytes: 32 * 1024 * 1024,
            max_recipients: 1000,
            idle_timeout: Duration::from_secs(300),
        }
    }
}
