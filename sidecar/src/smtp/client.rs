//! One SMTP session with one address of one MX host (RFC 5321), over TLS unless the policy explicitly allows
//! cleartext and the server offers no STARTTLS.
//!
//! - The socket is bound to the pod's source address before connecting: reputation is per address.
//! - STARTTLS is required; bytes the server sent after its 220 to STARTTLS are discarded before the handshake
//!   (they could be a man in the middle's injected replies, CVE-2011-0411 style), and EHLO is repeated over TLS.
//! - PIPELINING (RFC 2920): MAIL, all RCPTs and DATA go in one write; the message follows the 354.
//! - CHUNKING (RFC 3030) with PIPELINING: MAIL, the RCPTs and `BDAT <size> LAST` with the message go in one write,
//!   one round trip per message and no dot-stuffing; larger messages wait for the RCPT replies first.
//! - Timeouts per RFC 5321 section 4.5.3.2, in [`Timeouts`].
//! - Replies are matched to commands by position, so a reply to nothing would shift onto the next command and could
//!   make a refused recipient look accepted. Whenever every command sent has had its reply, anything more from the
//!   server (surplus replies, bytes waiting on an idle session about to be reused) is a protocol error, as is a
//!   reply no command can get (250 to DATA, 354 after the message): the transaction fails temporarily and the
//!   session is dropped, never pooled.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rustls::pki_types::{CertificateDer, ServerName};
use securemail_api::sidecar_config::Egress;
use securemail_api::tenant::TlsVersion;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::reply::{self, Reply, ReplyError};
use crate::egress::{self, ConnectError, EgressError};
use crate::evidence::{ProtocolError, Sha256Hex, Verification};
use crate::lmtp::{Body, MailParams, Mailbox, Recipient, Ret};
use crate::policy::PeerAuth;
use crate::tls::{HandshakeFailure, TlsConfigs, dane};

/// How long to wait for each step. Defaults are RFC 5321 section 4.5.3.2's; tests shorten them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub greeting: Duration,
    pub ehlo: Duration,
    /// STARTTLS reply and the handshake.
    pub starttls: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    /// The 354 after DATA.
    pub data_init: Duration,
    /// Each write of message data.
    pub data_block: Duration,
    /// The reply after the final dot.
    pub data_done: Duration,
    /// RSET after a transaction that ended early, and QUIT.
    pub rset: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        Self {
            connect: Duration::from_secs(30),
            greeting: minutes(5),
            ehlo: minutes(5),
            starttls: minutes(2),
            mail: minutes(5),
            rcpt: minutes(5),
            data_init: minutes(2),
            data_block: minutes(3),
            data_done: minutes(10),
            rset: minutes(1),
        }
    }
}

/// What every session of this pod shares.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// Sent with EHLO: the pod's public host name (matching the source address' PTR).
    pub helo_name: String,
    /// The pod's pool address; every connection leaves from it.
    pub source: IpAddr,
    /// How connections leave from `source`.
    pub egress: Egress,
    /// 25, except in tests.
    pub port: u16,
    pub timeouts: Timeouts,
}

/// Where to connect and how the server must authenticate.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The MX host name: SNI and the WebPKI reference name.
    pub host: &'a str,
    pub address: IpAddr,
    pub auth: &'a PeerAuth,
    pub min_version: TlsVersion,
    /// Deliver in cleartext when no STARTTLS is offered (approved override only).
    pub allow_cleartext: bool,
}

/// Why a session could not be used. None of these is the remote's verdict on the message.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: SocketAddr, reason: String },
    /// The connection could not leave from the pool address: the pod's fault, not the MX's.
    #[error(transparent)]
    Egress(EgressError),
    #[error("timed out waiting for {phase}")]
    Timeout { phase: &'static str },
    #[error("connection lost during {phase}: {reason}")]
    Io { phase: &'static str, reason: String },
    #[error("unintelligible reply to {phase}: {source}")]
    Malformed { phase: &'static str, source: ReplyError },
    #[error("{phase} answered {code}")]
    Refused {
        phase: &'static str,
        code: u16,
        reply: Reply,
    },
    #[error("no STARTTLS offered")]
    NoStartTls,
    /// The server broke the reply sequence; nothing it said in this session can be trusted.
    #[error("protocol error at {phase}: {violation}")]
    Protocol {
        phase: &'static str,
        violation: ProtocolError,
    },
    /// The idle session had been closed by the server: nothing of the transaction reached it.
    #[error("the reused session was closed by the server ({reason})")]
    Stale { reason: String },
    /// The certificate was refused, or the handshake failed.
    #[error("{}", .0.reason)]
    Handshake(HandshakeFailure),
    #[error("{0}")]
    TlsSetup(String),
}

/// The TLS session a delivery ran over, for evidence and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: TlsVersion,
    /// E.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    pub verification: Verification,
    /// SHA-256 of each presented certificate, leaf first.
    pub peer_chain_sha256: Vec<Sha256Hex>,
}

/// Extensions the server announced in its (last) EHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Extensions {
    starttls: bool,
    pipelining: bool,
    chunking: bool,
    /// `SIZE` with its limit; `Some(0)`: no fixed limit.
    size: Option<u64>,
    eight_bit_mime: bool,
    smtputf8: bool,
    dsn: bool,
    requiretls: bool,
}

impl Extensions {
    fn of(ehlo: &Reply) -> Self {
        let mut ext = Self::default();
        for line in ehlo.lines().iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
            match keyword.as_str() {
                "STARTTLS" => ext.starttls = true,
                "PIPELINING" => ext.pipelining = true,
                "CHUNKING" => ext.chunking = true,
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "DSN" => ext.dsn = true,
                "REQUIRETLS" => ext.requiretls = true,
                _ => {}
            }
        }
        ext
    }
}

/// The message for one transaction.
#[derive(Clone, Copy, Debug)]
pub struct Transaction<'a> {
    /// `None`: the null reverse-path.
    pub sender: Option<&'a Mailbox>,
    pub params: &'a MailParams,
    pub recipients: &'a [&'a Recipient],
    /// The message as signed, ending in CRLF; dot-stuffed here when it goes with DATA.
    pub content: &'a [u8],
}

/// How the server answered a transaction; the session is in step with the server afterwards.
#[derive(Clone, Debug)]
pub enum TransactionOutcome {
    /// MAIL was refused: the reply holds for every recipient.
    MailRefused(Reply),
    /// One reply per recipient, in order; `data` is the reply to DATA (if refused) or to the final dot, absent
    /// when no recipient was accepted.
    Replies { rcpt: Vec<Reply>, data: Option<Reply> },
    /// The server lacks an extension the message needs; a permanent refusal made locally.
    Unsupported {
        enhanced: (u8, u16, u16),
        reason: &'static str,
    },
}

impl TransactionOutcome {
    /// The remote reply that decided the outcome: the refused MAIL, the reply to the message (or the refused DATA),
    /// else the last RCPT reply (every recipient refused, or a 421 that ended the session). Never a 354 or an
    /// accepted RCPT when the message was answered. `None`: decided locally.
    pub fn deciding_reply(&self) -> Option<&Reply> {
        match self {
            TransactionOutcome::MailRefused(reply) => Some(reply),
            TransactionOutcome::Replies { data: Some(data), .. } => Some(data),
            TransactionOutcome::Replies { rcpt, data: None } => rcpt.last(),
            TransactionOutcome::Unsupported { .. } => None,
        }
    }
}

/// The byte stream under a session: a TCP connection in production; anything that reads and writes, such as an
/// in-memory pipe, when a test or the fuzz target plays the server.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for T {}

enum Transport {
    Plain(Box<dyn Connection>),
    Tls(Box<TlsStream<Box<dyn Connection>>>),
    /// Only between taking the TCP stream for STARTTLS and the end of the handshake.
    Taken,
}

/// An open session, greeted, EHLO done, secured (unless cleartext was allowed and TLS was not offered).
pub struct Session {
    transport: Transport,
    /// Received but not yet parsed.
    buffer: Vec<u8>,
    extensions: Extensions,
    tls: Option<TlsInfo>,
    timeouts: Timeouts,
    /// Transactions started on this session; a session with any is a reused one.
    transactions: u32,
    /// The last transaction ended before its final reply (refused MAIL, no recipient, DATA refused).
    needs_reset: bool,
    /// The server said 421, or closed the connection: the session cannot carry another transaction.
    closed: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("extensions", &self.extensions)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

const READ_CHUNK: usize = 8 * 1024;
const DATA_CHUNK: usize = 64 * 1024;
/// The largest message sent in the same write as its envelope (BDAT); larger ones wait for the RCPT replies.
const PIPELINED_CHUNK: usize = 256 * 1024;

impl Session {
    /// Connects, reads the greeting, says EHLO, and secures the session as `target` requires.
    pub async fn open(
        settings: &SessionSettings,
        configs: &TlsConfigs,
        target: Target<'_>,
    ) -> Result<Self, SessionError> {
        let stream = connect(settings, target.address).await?;
        Self::over(stream, &settings.helo_name, settings.timeouts, configs, target).await
    }

    /// [`Session::open`] over a connection already made to `target`.
    pub async fn over(
        stream: impl Connection,
        helo_name: &str,
        timeouts: Timeouts,
        configs: &TlsConfigs,
        target: Target<'_>,
    ) -> Result<Self, SessionError> {
        let mut session = Self {
            transport: Transport::Plain(Box::new(stream)),
            buffer: Vec::new(),
            extensions: Extensions::default(),
            tls: None,
            timeouts,
            transactions: 0,
            needs_reset: false,
            closed: false,
        };
        session.expect("greeting", timeouts.greeting, 2).await?;
        session.drained("greeting")?;
        session.ehlo(helo_name).await?;
        if !session.extensions.starttls {
            return if target.allow_cleartext {
                Ok(session)
            } else {
                Err(SessionError::NoStartTls)
            };
        }
        session
            .command("STARTTLS", b"STARTTLS\r\n", timeouts.starttls, 2)
            .await?;
        // Anything after the 220 was sent before the handshake, so no one can vouch for it.
        session.buffer.clear();
        session.start_tls(configs, target).await?;
        session.ehlo(helo_name).await?;
        Ok(session)
    }

    /// The TLS session, absent only for an allowed cleartext delivery.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// The server announced it is closing the session (421), or closed it: it cannot carry another transaction.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Notes a 421 (RFC 5321 section 3.8: the server closes the channel after it); true when `reply` is one.
    fn closing(&mut self, reply: &Reply) -> bool {
        self.closed |= reply.code() == 421;
        reply.code() == 421
    }

    /// QUIT, best effort: the transaction is already settled.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT", b"QUIT\r\n", self.timeouts.rset, 2).await;
        if let Transport::Tls(stream) = &mut self.transport {
            let _ = tokio::time::timeout(self.timeouts.rset, stream.shutdown()).await;
        }
    }

    /// Runs one transaction. An `Err` leaves the session unusable; `Ok` leaves it ready for the next one unless
    /// [`Session::is_closed`]. [`SessionError::Stale`]: a reused session turned out closed before anything was
    /// sent; a fresh one may carry the same transaction.
    pub async fn send(&mut self, transaction: &Transaction<'_>) -> Result<TransactionOutcome, SessionError> {
        if self.transactions > 0 {
            self.check_idle()?;
        }
        let outcome = self.transact(transaction).await?;
        if !self.closed {
            self.drained("end of transaction")?;
        }
        Ok(outcome)
    }

    async fn transact(&mut self, transaction: &Transaction<'_>) -> Result<TransactionOutcome, SessionError> {
        let ext = &self.extensions;
        let params = transaction.params;
        if params.smtputf8 && !ext.smtputf8 {
            return Ok(TransactionOutcome::Unsupported {
                enhanced: (5, 6, 7),
                reason: "the recipient's MX does not support SMTPUTF8, which this message needs",
            });
        }
        // RFC 8689 section 4.2.1: a REQUIRETLS message goes only to a hop that promises the same, over a session
        // whose certificate was verified (DANE or WebPKI).
        if params.requiretls && !ext.requiretls {
            return Ok(TransactionOutcome::Unsupported {
                enhanced: (5, 7, 30),
                reason: "REQUIRETLS support required: the recipient's MX does not offer it, which the sender required",
            });
        }
        let verified = self
            .tls
            .as_ref()
            .is_some_and(|tls| tls.verification != Verification::UnverifiedEncrypted);
        if params.requiretls && !verified {
            return Ok(TransactionOutcome::Unsupported {
                enhanced: (5, 7, 30),
                reason: "REQUIRETLS needs a verified TLS session; the recipient's MX certificate was not verified",
            });
        }
        if params.body == Some(Body::EightBitMime) && !ext.eight_bit_mime {
            return Ok(TransactionOutcome::Unsupported {
                enhanced: (5, 6, 3),
                reason: "the recipient's MX does not accept 8-bit content (no 8BITMIME)",
            });
        }
        if ext
            .size
            .is_some_and(|limit| limit > 0 && u64::try_from(transaction.content.len()).is_ok_and(|size| size > limit))
        {
            return Ok(TransactionOutcome::Unsupported {
                enhanced: (5, 3, 4),
                reason: "message exceeds the size limit of the recipient's MX",
            });
        }
        let mail = mail_command(transaction, ext);
        let rcpts: Vec<Vec<u8>> = transaction
            .recipients
            .iter()
            .map(|recipient| rcpt_command(recipient, ext))
            .collect();

        let reused = self.transactions > 0;
        self.transactions += 1;
        // Until the final reply arrives the server is mid-transaction: the next transaction starts with RSET.
        let reset = std::mem::replace(&mut self.needs_reset, true);
        if ext.pipelining && ext.chunking {
            self.send_chunked(transaction, &mail, &rcpts, reset, reused).await
        } else if ext.pipelining {
            self.send_pipelined(transaction, &mail, &rcpts, reset, reused).await
        } else {
            self.send_in_steps(transaction, &mail, &rcpts, reset, reused).await
        }
    }

    /// RFC 2920: [RSET,] MAIL, every RCPT and DATA in one write, then their replies; the message follows the 354.
    /// Two round trips per message on a reused session.
    async fn send_pipelined(
        &mut self,
        transaction: &Transaction<'_>,
        mail: &[u8],
        rcpts: &[Vec<u8>],
        reset: bool,
        reused: bool,
    ) -> Result<TransactionOutcome, SessionError> {
        let mut batch = envelope_batch(mail, rcpts, reset, 6);
        batch.extend_from_slice(b"DATA\r\n");
        let (mail_reply, rcpt_replies) = match self.pipelined_envelope(&batch, rcpts.len(), reset, reused).await? {
            Ok(replies) => replies,
            Err(early) => return Ok(early),
        };
        let data_reply = self.read_data_reply().await?;
        if !self.closing(&data_reply) {
            // Every command of the batch has had its reply.
            self.drained("DATA")?;
        }
        let accepted = mail_reply.class() == 2 && any_accepted(&rcpt_replies);
        if data_reply.code() == 354 && !accepted {
            // A server that lets DATA through without a recipient gets an empty message it cannot deliver.
            self.write("end of data", b".\r\n", self.timeouts.data_block).await?;
            self.read_final("end of data", self.timeouts.data_done).await?;
        } else if data_reply.code() == 354 {
            return self.send_data(transaction, rcpt_replies).await;
        }
        Ok(envelope_outcome(mail_reply, rcpt_replies, Some(data_reply)))
    }

    /// RFC 3030 over RFC 2920: [RSET,] MAIL, every RCPT and `BDAT <size> LAST` followed by the message in one
    /// write, then all their replies: one round trip per message. A server that refuses the envelope still reads
    /// the chunk and answers the BDAT with an error. A message over [`PIPELINED_CHUNK`] waits for the envelope's
    /// replies instead, so no megabytes go to a server that refused every recipient.
    async fn send_chunked(
        &mut self,
        transaction: &Transaction<'_>,
        mail: &[u8],
        rcpts: &[Vec<u8>],
        reset: bool,
        reused: bool,
    ) -> Result<TransactionOutcome, SessionError> {
        let content = transaction.content;
        let bdat = format!("BDAT {} LAST\r\n", content.len());
        let inline = content.len() <= PIPELINED_CHUNK;
        let mut batch = envelope_batch(mail, rcpts, reset, if inline { bdat.len() + content.len() } else { 0 });
        if inline {
            batch.extend_from_slice(bdat.as_bytes());
            batch.extend_from_slice(content);
        }
        let (mail_reply, rcpt_replies) = match self.pipelined_envelope(&batch, rcpts.len(), reset, reused).await? {
            Ok(replies) => replies,
            Err(early) => return Ok(early),
        };
        let accepted = mail_reply.class() == 2 && any_accepted(&rcpt_replies);
        if !inline {
            if !accepted {
                return Ok(envelope_outcome(mail_reply, rcpt_replies, None));
            }
            self.drained("RCPT")?;
            self.write("BDAT", bdat.as_bytes(), self.timeouts.data_block).await?;
            for chunk in content.chunks(DATA_CHUNK) {
                self.write("message data", chunk, self.timeouts.data_block).await?;
            }
        }
        let done = self.read_final("end of data", self.timeouts.data_done).await?;
        self.closing(&done);
        // RFC 3030 section 2: after a refused chunk the transaction must be reset.
        self.needs_reset = done.class() != 2;
        Ok(envelope_outcome(mail_reply, rcpt_replies, Some(done)))
    }

    /// Writes a pipelined batch that starts with [RSET,] MAIL and the RCPTs and reads those replies. `Err` is the
    /// outcome when the server closed the session (421) before the rest of the batch was answered.
    async fn pipelined_envelope(
        &mut self,
        batch: &[u8],
        recipients: usize,
        reset: bool,
        reused: bool,
    ) -> Result<Result<(Reply, Vec<Reply>), TransactionOutcome>, SessionError> {
        let first_phase = if reset { "RSET" } else { "MAIL" };
        self.write(first_phase, batch, self.timeouts.mail)
            .await
            .map_err(|err| stale_if(reused, err))?;
        if reset {
            self.expect("RSET", self.timeouts.rset, 2)
                .await
                .map_err(|err| stale_if(reused, err))?;
        }
        let mail_reply = self
            .read_final("MAIL", self.timeouts.mail)
            .await
            .map_err(|err| stale_if(reused && !reset, err))?;
        if self.closing(&mail_reply) {
            return Ok(Err(TransactionOutcome::MailRefused(mail_reply)));
        }
        let mut rcpt_replies = Vec::with_capacity(recipients);
        for _ in 0..recipients {
            let reply = self.read_final("RCPT", self.timeouts.rcpt).await?;
            if self.closing(&reply) {
                return Ok(Err(closed_at_rcpt(rcpt_replies, reply, recipients)));
            }
            rcpt_replies.push(reply);
        }
        Ok(Ok((mail_reply, rcpt_replies)))
    }

    /// Without PIPELINING: one command, one reply, and nothing more before the next command.
    async fn send_in_steps(
        &mut self,
        transaction: &Transaction<'_>,
        mail: &[u8],
        rcpts: &[Vec<u8>],
        reset: bool,
        reused: bool,
    ) -> Result<TransactionOutcome, SessionError> {
        if reset {
            self.command("RSET", b"RSET\r\n", self.timeouts.rset, 2)
                .await
                .map_err(|err| stale_if(reused, err))?;
            self.drained("RSET")?;
        }
        self.write("MAIL", mail, self.timeouts.mail)
            .await
            .map_err(|err| stale_if(reused, err))?;
        let mail_reply = self
            .read_final("MAIL", self.timeouts.mail)
            .await
            .map_err(|err| stale_if(reused && !reset, err))?;
        if mail_reply.class() != 2 {
            self.closing(&mail_reply);
            return Ok(TransactionOutcome::MailRefused(mail_reply));
        }
        self.drained("MAIL")?;
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        for rcpt in rcpts {
            self.write("RCPT", rcpt, self.timeouts.rcpt).await?;
            let reply = self.read_final("RCPT", self.timeouts.rcpt).await?;
            if self.closing(&reply) {
                return Ok(closed_at_rcpt(rcpt_replies, reply, rcpts.len()));
            }
            self.drained("RCPT")?;
            rcpt_replies.push(reply);
        }
        if !any_accepted(&rcpt_replies) {
            return Ok(TransactionOutcome::Replies {
                rcpt: rcpt_replies,
                data: None,
            });
        }
        self.write("DATA", b"DATA\r\n", self.timeouts.data_init).await?;
        let go_ahead = self.read_data_reply().await?;
        if go_ahead.code() != 354 {
            self.closing(&go_ahead);
            return Ok(TransactionOutcome::Replies {
                rcpt: rcpt_replies,
                data: Some(go_ahead),
            });
        }
        self.drained("DATA")?;
        self.send_data(transaction, rcpt_replies).await
    }

    /// After the 354: the message, then the server's verdict on it, which ends the transaction.
    async fn send_data(
        &mut self,
        transaction: &Transaction<'_>,
        rcpt_replies: Vec<Reply>,
    ) -> Result<TransactionOutcome, SessionError> {
        for chunk in dot_stuff(transaction.content).chunks(DATA_CHUNK) {
            self.write("message data", chunk, self.timeouts.data_block).await?;
        }
        let done = self.read_final("end of data", self.timeouts.data_done).await?;
        self.closing(&done);
        self.needs_reset = false;
        Ok(TransactionOutcome::Replies {
            rcpt: rcpt_replies,
            data: Some(done),
        })
    }

    async fn ehlo(&mut self, helo_name: &str) -> Result<(), SessionError> {
        let command = format!("EHLO {helo_name}\r\n");
        let reply = self.command("EHLO", command.as_bytes(), self.timeouts.ehlo, 2).await?;
        self.drained("EHLO")?;
        self.extensions = Extensions::of(&reply);
        Ok(())
    }

    async fn start_tls(&mut self, configs: &TlsConfigs, target: Target<'_>) -> Result<(), SessionError> {
        let config = configs
            .client_config(target.auth, target.min_version)
            .map_err(|err| SessionError::TlsSetup(err.to_string()))?;
        let name = ServerName::try_from(target.host.to_owned())
            .map_err(|_| SessionError::TlsSetup(format!("MX host {} is not a DNS name", target.host)))?;
        let Transport::Plain(tcp) = std::mem::replace(&mut self.transport, Transport::Taken) else {
            return Err(SessionError::TlsSetup("session is already secured".to_owned()));
        };
        let handshake = TlsConnector::from(Arc::clone(&config)).connect(name, tcp);
        let stream = tokio::time::timeout(self.timeouts.starttls, handshake)
            .await
            .map_err(|_| SessionError::Timeout { phase: "TLS handshake" })?
            .map_err(|err| SessionError::Handshake(HandshakeFailure::of(&err)))?;
        let (_, connection) = stream.get_ref();
        let version = match connection.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => TlsVersion::Tls13,
            Some(rustls::ProtocolVersion::TLSv1_2) => TlsVersion::Tls12,
            other => return Err(SessionError::TlsSetup(format!("unexpected TLS version {other:?}"))),
        };
        let cipher = connection
            .negotiated_cipher_suite()
            .map(|suite| {
                let suite = suite.suite();
                suite.as_str().map_or_else(|| format!("{suite:?}"), str::to_owned)
            })
            .unwrap_or_default();
        let chain: Vec<CertificateDer<'static>> = connection.peer_certificates().unwrap_or_default().to_vec();
        let verification = match target.auth {
            PeerAuth::WebPki => Verification::Webpki,
            PeerAuth::AnyCertificate => Verification::UnverifiedEncrypted,
            // The verifier passed; with no digest match in the chain the anchor was a bare public key (DANE-TA).
            PeerAuth::Dane { tlsa, .. } => dane::matching_usage(tlsa, &chain).unwrap_or(Verification::DaneTa),
        };
        self.tls = Some(TlsInfo {
            version,
            cipher,
            verification,
            peer_chain_sha256: chain.iter().map(|cert| Sha256Hex::of(cert)).collect(),
        });
        self.transport = Transport::Tls(Box::new(stream));
        Ok(())
    }

    /// Sends `line` and expects a reply of class `class`.
    async fn command(
        &mut self,
        phase: &'static str,
        line: &[u8],
        timeout: Duration,
        class: u16,
    ) -> Result<Reply, SessionError> {
        self.write(phase, line, timeout).await?;
        self.expect(phase, timeout, class).await
    }

    async fn expect(&mut self, phase: &'static str, timeout: Duration, class: u16) -> Result<Reply, SessionError> {
        let reply = self.read(phase, timeout).await?;
        if reply.class() == class {
            Ok(reply)
        } else {
            Err(SessionError::Refused {
                phase,
                code: reply.code(),
                reply,
            })
        }
    }

    async fn read(&mut self, phase: &'static str, timeout: Duration) -> Result<Reply, SessionError> {
        tokio::time::timeout(timeout, self.read_reply(phase))
            .await
            .map_err(|_| SessionError::Timeout { phase })?
    }

    /// A reply that ends a command (MAIL, RCPT, the message): 2xx, 4xx or 5xx; a 1xx or 3xx answers nothing here.
    async fn read_final(&mut self, phase: &'static str, timeout: Duration) -> Result<Reply, SessionError> {
        let reply = self.read(phase, timeout).await?;
        if matches!(reply.class(), 2 | 4 | 5) {
            Ok(reply)
        } else {
            Err(unexpected(phase))
        }
    }

    /// The reply to DATA: 354, or a refusal. A 2xx would read as the message accepted before it was sent.
    async fn read_data_reply(&mut self) -> Result<Reply, SessionError> {
        let reply = self.read("DATA", self.timeouts.data_init).await?;
        if reply.code() == 354 || matches!(reply.class(), 4 | 5) {
            Ok(reply)
        } else {
            Err(unexpected("DATA"))
        }
    }

    /// Called when every command sent has had its reply: any byte already received, or waiting on the connection,
    /// answers nothing the client asked. A closed connection is noted, not an error: the replies so far stand.
    fn drained(&mut self, phase: &'static str) -> Result<(), SessionError> {
        if self.buffer.is_empty() {
            match self.poll_pending() {
                Pending::Nothing => return Ok(()),
                Pending::Closed => {
                    self.closed = true;
                    return Ok(());
                }
                Pending::Bytes => {}
            }
        }
        Err(SessionError::Protocol {
            phase,
            violation: ProtocolError::SurplusReply,
        })
    }

    /// Before an idle session carries another transaction. A server that closed it meanwhile (EOF, or a lone 421
    /// per RFC 5321 section 4.5.3.2) leaves it stale: a fresh session may carry the transaction. Anything else it
    /// sent while nothing was asked is a protocol error.
    fn check_idle(&mut self) -> Result<(), SessionError> {
        let pending = if self.buffer.is_empty() {
            self.poll_pending()
        } else {
            Pending::Bytes
        };
        match pending {
            Pending::Nothing => return Ok(()),
            Pending::Closed => {
                return Err(SessionError::Stale {
                    reason: "connection closed while idle".to_owned(),
                });
            }
            Pending::Bytes => {}
        }
        match reply::parse(&self.buffer) {
            Ok(Some((reply, used))) if reply.code() == 421 && used == self.buffer.len() => Err(SessionError::Stale {
                reason: "the server closed the idle session with 421".to_owned(),
            }),
            _ => Err(SessionError::Protocol {
                phase: "idle session",
                violation: ProtocolError::UnsolicitedWhileIdle,
            }),
        }
    }

    /// Reads what the connection has already received, without waiting, into the buffer.
    fn poll_pending(&mut self) -> Pending {
        let mut chunk = [0; READ_CHUNK];
        let read = match &mut self.transport {
            Transport::Plain(stream) => stream.read(&mut chunk).now_or_never(),
            Transport::Tls(stream) => stream.read(&mut chunk).now_or_never(),
            Transport::Taken => return Pending::Closed,
        };
        match read {
            None => Pending::Nothing,
            Some(Ok(0) | Err(_)) => Pending::Closed,
            Some(Ok(n)) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                Pending::Bytes
            }
        }
    }

    async fn read_reply(&mut self, phase: &'static str) -> Result<Reply, SessionError> {
        loop {
            match reply::parse(&self.buffer) {
                Ok(Some((reply, used))) => {
                    self.buffer.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => return Err(SessionError::Malformed { phase, source }),
            }
            let mut chunk = [0; READ_CHUNK];
            let read = match &mut self.transport {
                Transport::Plain(stream) => stream.read(&mut chunk).await,
                Transport::Tls(stream) => stream.read(&mut chunk).await,
                Transport::Taken => Err(io::Error::from(io::ErrorKind::NotConnected)),
            };
            match read {
                Ok(0) => {
                    return Err(SessionError::Io {
                        phase,
                        reason: "connection closed by the server".to_owned(),
                    });
                }
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(err) => return Err(io_error(phase, &err)),
            }
        }
    }

    async fn write(&mut self, phase: &'static str, data: &[u8], timeout: Duration) -> Result<(), SessionError> {
        let write = async {
            match &mut self.transport {
                Transport::Plain(stream) => {
                    stream.write_all(data).await?;
                    stream.flush().await
                }
                Transport::Tls(stream) => {
                    stream.write_all(data).await?;
                    stream.flush().await
                }
                Transport::Taken => Err(io::Error::from(io::ErrorKind::NotConnected)),
            }
        };
        tokio::time::timeout(timeout, write)
            .await
            .map_err(|_| SessionError::Timeout { phase })?
            .map_err(|err| io_error(phase, &err))
    }
}

/// What a connection holds that has not been read, learned without waiting.
enum Pending {
    Nothing,
    Bytes,
    Closed,
}

fn unexpected(phase: &'static str) -> SessionError {
    SessionError::Protocol {
        phase,
        violation: ProtocolError::UnexpectedReply,
    }
}

/// [RSET,] MAIL and every RCPT, with room for `more` bytes after them.
fn envelope_batch(mail: &[u8], rcpts: &[Vec<u8>], reset: bool, more: usize) -> Vec<u8> {
    let mut batch = Vec::with_capacity(6 + mail.len() + rcpts.iter().map(Vec::len).sum::<usize>() + more);
    if reset {
        batch.extend_from_slice(b"RSET\r\n");
    }
    batch.extend_from_slice(mail);
    rcpts.iter().for_each(|rcpt| batch.extend_from_slice(rcpt));
    batch
}

/// Whether any recipient was accepted: only then does the message itself go.
fn any_accepted(rcpt_replies: &[Reply]) -> bool {
    rcpt_replies.iter().any(|reply| reply.class() == 2)
}

/// A transaction's outcome from the replies to MAIL, the RCPTs and the end of the message (or a refused DATA).
fn envelope_outcome(mail: Reply, rcpt: Vec<Reply>, data: Option<Reply>) -> TransactionOutcome {
    if mail.class() != 2 {
        TransactionOutcome::MailRefused(mail)
    } else if !any_accepted(&rcpt) {
        TransactionOutcome::Replies { rcpt, data: None }
    } else {
        TransactionOutcome::Replies { rcpt, data }
    }
}

/// The outcome when a RCPT got a 421: nothing more comes, so the recipients not answered share that reply.
fn closed_at_rcpt(mut replies: Vec<Reply>, closing: Reply, recipients: usize) -> TransactionOutcome {
    replies.resize(recipients, closing);
    TransactionOutcome::Replies {
        rcpt: replies,
        data: None,
    }
}

/// A reused session whose server is gone (it closed the idle connection) fails its first write or read with an I/O
/// error; before any reply nothing was accepted, so the transaction may go again on a fresh session.
fn stale_if(reused: bool, err: SessionError) -> SessionError {
    match err {
        SessionError::Io { phase, reason } if reused => SessionError::Stale {
            reason: format!("{phase}: {reason}"),
        },
        other => other,
    }
}

fn io_error(phase: &'static str, err: &io::Error) -> SessionError {
    SessionError::Io {
        phase,
        reason: err.kind().to_string(),
    }
}

/// A TCP connection from the pod's source address.
async fn connect(settings: &SessionSettings, address: IpAddr) -> Result<TcpStream, SessionError> {
    let remote = SocketAddr::new(address, settings.port);
    egress::connect(&settings.egress, settings.source, remote, settings.timeouts.connect)
        .await
        .map_err(|err| match err {
            ConnectError::Egress(err) => SessionError::Egress(err),
            ConnectError::Remote(reason) => SessionError::Connect {
                address: remote,
                reason,
            },
        })
}

fn mail_command(transaction: &Transaction<'_>, ext: &Extensions) -> Vec<u8> {
    let mut line = b"MAIL FROM:".to_vec();
    push_path(&mut line, transaction.sender);
    let params = transaction.params;
    if ext.size.is_some() {
        line.extend_from_slice(format!(" SIZE={}", transaction.content.len()).as_bytes());
    }
    match params.body {
        Some(Body::EightBitMime) => line.extend_from_slice(b" BODY=8BITMIME"),
        Some(Body::SevenBit) if ext.eight_bit_mime => line.extend_from_slice(b" BODY=7BIT"),
        _ => {}
    }
    if params.smtputf8 {
        line.extend_from_slice(b" SMTPUTF8");
    }
    if params.requiretls {
        line.extend_from_slice(b" REQUIRETLS");
    }
    if ext.dsn {
        match params.ret {
            Some(Ret::Full) => line.extend_from_slice(b" RET=FULL"),
            Some(Ret::Headers) => line.extend_from_slice(b" RET=HDRS"),
            None => {}
        }
        if let Some(envid) = &params.envid {
            line.extend_from_slice(format!(" ENVID={envid}").as_bytes());
        }
    }
    line.extend_from_slice(b"\r\n");
    line
}

fn rcpt_command(recipient: &Recipient, ext: &Extensions) -> Vec<u8> {
    let mut line = b"RCPT TO:".to_vec();
    push_path(&mut line, Some(&recipient.mailbox));
    if ext.dsn {
        if let Some(notify) = &recipient.notify {
            line.extend_from_slice(format!(" NOTIFY={notify}").as_bytes());
        }
        if let Some(orcpt) = &recipient.orcpt {
            line.extend_from_slice(format!(" ORCPT={}", orcpt.as_str()).as_bytes());
        }
    }
    line.extend_from_slice(b"\r\n");
    line
}

fn push_path(line: &mut Vec<u8>, mailbox: Option<&Mailbox>) {
    line.push(b'<');
    if let Some(mailbox) = mailbox {
        line.extend_from_slice(mailbox.local_part().as_bytes());
        line.push(b'@');
        line.extend_from_slice(mailbox.domain().as_bytes());
    }
    line.push(b'>');
}

/// `content` as SMTP DATA content: a '.' added before every line that starts with one, a CRLF added if the
/// content does not end with one, and the terminating "." CRLF appended.
fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + content.len() / 64 + 5);
    // Whole lines are copied at once: only a line's first byte needs a look.
    for line in content.split_inclusive(|&byte| byte == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_terminates() {
        let stuffed = dot_stuff(b"DKIM: x\r\n.hidden\r\nmid.dot\r\n.\r\n..two\r\nend");
        assert_eq!(
            stuffed,
            b"DKIM: x\r\n..hidden\r\nmid.dot\r\n..\r\n...two\r\nend\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
        // A bare LF ends a line too, so a dot after it is stuffed.
        assert_eq!(dot_stuff(b"a\n.b\r\n"), b"a\n..b\r\n.\r\n");
    }

    #[test]
    fn extensions_are_read_from_ehlo_lines_after_the_first() {
        let (reply, _) =
            reply::parse(b"250-mx.example STARTTLS\r\n250-pipelining\r\n250-CHUNKING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-REQUIRETLS\r\n250 DSN\r\n")
                .unwrap()
                .unwrap();
        let ext = Extensions::of(&reply);
        assert_eq!(
            ext,
            Extensions {
                starttls: false,
                pipelining: true,
                chunking: true,
                size: Some(1000),
                eight_bit_mime: true,
                smtputf8: false,
                dsn: true,
                requiretls: true,
            }
        );
    }
}
