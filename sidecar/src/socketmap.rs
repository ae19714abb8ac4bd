//! A Postfix socketmap server (socketmap_table(5)) answering `smtp_tls_policy_maps` lookups with the same
//! policy resolution the delivery path uses (DANE > MTA-STS > tenant policy and overrides), for sites that keep
//! Postfix's own SMTP client delivering:
//!
//! ```text
//! smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix
//! ```
//!
//! The answers are unauthenticated, so the server listens on loopback only. Bad input (broken framing, an
//! oversized request, a client that stalls mid-request or stops reading) gets one PERM reply naming the problem
//! and the connection is closed; a malformed but well-framed request gets PERM and the connection stays usable.

mod answer;
pub mod netstring;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use securemail_api::tenant::OnFailure;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use answer::{Reply, lookup_domain, postfix_policy, reply_for};

use crate::evidence::PolicySource;
use crate::policy::{LookupStage, PolicyError, PolicyLookup};

/// The map name this server answers, the last field of `socketmap:inet:HOST:PORT:postfix`; the same name
/// postfix-mta-sts-resolver uses, so switching between the two is a change of port.
pub const MAP_NAME: &str = "postfix";

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// After refusing a client, how long and how much of its further input is read and discarded before closing.
const DRAIN_TIME: Duration = Duration::from_secs(2);
const DRAIN_BYTES: usize = 4 << 20;

/// Time limits and the connection bound.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A connection without a request in progress is closed after this long (Postfix closes its own idle
    /// socketmap connections after 10 s).
    pub idle: Duration,
    /// A request must arrive whole within this long of its first byte.
    pub request: Duration,
    /// A reply must be written within this long.
    pub write: Duration,
    /// A policy lookup that takes longer is answered TEMP (Postfix waits up to 100 s for a reply).
    pub lookup: Duration,
    /// More simultaneous connections are answered TEMP and closed.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            request: Duration::from_secs(10),
            write: Duration::from_secs(10),
            lookup: Duration::from_secs(30),
            max_connections: 256,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum SocketmapError {
    #[error(
        "socketmap listen address {0} is not a loopback address: its answers are unauthenticated, so only \
         local clients may ask (use 127.0.0.1 or [::1])"
    )]
    NotLoopback(SocketAddr),
    #[error("socketmap on {addr}: cannot bind: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A bound socketmap listener, ready to [`serve`](Self::serve).
#[derive(Debug)]
pub struct SocketmapServer {
    listener: TcpListener,
}

impl SocketmapServer {
    /// Binds `addr`, which must be a loopback address. Must be called within a tokio runtime.
    pub async fn bind(addr: SocketAddr) -> Result<Self, SocketmapError> {
        if !addr.ip().is_loopback() {
            return Err(SocketmapError::NotLoopback(addr));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SocketmapError::Bind { addr, source })?;
        Ok(Self { listener })
    }

    /// The bound address (with the port the system chose for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers lookups from `lookup` until `shutdown` is cancelled, then returns once every connection has
    /// ended (idle ones are closed at once, lookups in progress are answered first). `on_failure` is the
    /// tenant's: it decides between TEMP and PERM for a domain without a secure path.
    pub async fn serve<L: PolicyLookup>(
        self,
        lookup: Arc<L>,
        on_failure: OnFailure,
        limits: Limits,
        shutdown: CancellationToken,
    ) {
        let connections = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                            tracing::warn!(%peer, limit = limits.max_connections, "socketmap connection refused: too many connections");
                            connections.spawn(refuse(stream, limits));
                            continue;
                        };
                        let (lookup, shutdown) = (Arc::clone(&lookup), shutdown.clone());
                        connections.spawn(async move {
                            let connection = Connection { stream, lookup: &*lookup, on_failure, limits };
                            if let Err(problem) = connection.serve(&shutdown).await {
                                tracing::warn!(%peer, %problem, "socketmap connection closed");
                            }
                            drop(slot);
                        });
                    }
                    Err(err) => {
                        tracing::warn!(%err, "cannot accept a socketmap connection");
                        tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    }
                },
            }
        }
        drop(self.listener);
        connections.close();
        connections.wait().await;
    }
}

async fn refuse(mut stream: TcpStream, limits: Limits) {
    let reply = Reply::Temp(format!(
        "socketmap server busy: {} connections already open",
        limits.max_connections
    ));
    reply_and_close(&mut stream, &reply, limits.write).await;
}

/// Sends a last reply, best effort (the client may be the reason it cannot be delivered). Closing a socket with
/// unread input sends a reset, which can destroy the reply before the client has read it: so the replies are
/// ended first, and what the client still sends is read and discarded, for a bounded time and amount.
async fn reply_and_close(stream: &mut TcpStream, reply: &Reply, write: Duration) {
    match tokio::time::timeout(write, stream.write_all(&reply.encode())).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let _ = stream.shutdown().await;
    let mut discard = [0u8; 4096];
    let mut left = DRAIN_BYTES;
    let drain = async {
        while left > 0 {
            match stream.read(&mut discard).await {
                Ok(0) | Err(_) => break,
                Ok(read) => left = left.saturating_sub(read),
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

/// Why a connection was closed by the server.
#[derive(Debug, thiserror::Error)]
enum Problem {
    #[error("malformed request: {0}")]
    Frame(#[from] netstring::FrameError),
    #[error("request not completed within {} s of its first byte", .0.as_secs())]
    SlowRequest(Duration),
    #[error("client closed the connection in the middle of a request")]
    Truncated,
    #[error("reply not written within {} s", .0.as_secs())]
    SlowReader(Duration),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

struct Connection<'a, L> {
    stream: TcpStream,
    lookup: &'a L,
    on_failure: OnFailure,
    limits: Limits,
}

impl<L: PolicyLookup> Connection<'_, L> {
    /// Reads netstrings and answers each in order until the client leaves, stays idle too long, or misbehaves.
    async fn serve(mut self, shutdown: &CancellationToken) -> Result<(), Problem> {
        // Holds at most one incomplete request and one read's worth: complete requests are answered before the
        // next read, and an over-long length is refused from its digits.
        let mut buffer: Vec<u8> = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        let mut request_started: Option<Instant> = None;
        loop {
            let mut answered = false;
            loop {
                match netstring::decode(&buffer) {
                    Ok(Some((payload, used))) => {
                        let reply = self.answer(payload).await;
                        buffer.drain(..used);
                        self.write(&reply).await?;
                        answered = true;
                    }
                    Ok(None) => break,
                    Err(err) => {
                        let problem = Problem::Frame(err);
                        self.close_with(&problem).await;
                        return Err(problem);
                    }
                }
            }
            // A request's clock starts with its first byte, which may have come with the previous one's last.
            request_started = match (buffer.is_empty(), answered) {
                (true, _) => None,
                (false, true) => Some(Instant::now()),
                (false, false) => request_started.or_else(|| Some(Instant::now())),
            };
            let deadline = match request_started {
                Some(started) => started + self.limits.request,
                None => Instant::now() + self.limits.idle,
            };
            let read = tokio::select! {
                () = shutdown.cancelled(), if request_started.is_none() => return Ok(()),
                read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)) => read,
            };
            match read {
                Err(_) if request_started.is_none() => return Ok(()),
                Err(_) => {
                    let problem = Problem::SlowRequest(self.limits.request);
                    self.close_with(&problem).await;
                    return Err(problem);
                }
                Ok(Ok(0)) if buffer.is_empty() => return Ok(()),
                Ok(Ok(0)) => return Err(Problem::Truncated),
                Ok(Ok(read)) => buffer.extend_from_slice(&chunk[..read]),
                Ok(Err(err)) => return Err(Problem::Io(err)),
            }
        }
    }

    async fn write(&mut self, reply: &Reply) -> Result<(), Problem> {
        match tokio::time::timeout(self.limits.write, self.stream.write_all(&reply.encode())).await {
            Ok(written) => Ok(written?),
            Err(_) => Err(Problem::SlowReader(self.limits.write)),
        }
    }

    /// One PERM reply naming the problem, then the connection is closed.
    async fn close_with(&mut self, problem: &Problem) {
        reply_and_close(&mut self.stream, &Reply::Perm(problem.to_string()), self.limits.write).await;
    }

    async fn answer(&self, payload: &[u8]) -> Reply {
        let request = match netstring::parse_request(payload) {
            Ok(request) => request,
            Err(err) => return Reply::Perm(format!("malformed request: {err}")),
        };
        if request.name != MAP_NAME {
            return Reply::Perm(format!(
                "unknown map name {:?}: this server answers socketmap:inet:HOST:PORT:{MAP_NAME}",
                request.name
            ));
        }
        let domain = match lookup_domain(request.key) {
            Ok(domain) => String::from(domain),
            Err(reply) => return reply,
        };
        let resolved = tokio::time::timeout(self.limits.lookup, self.lookup.resolve(&domain))
            .await
            .unwrap_or_else(|_| {
                Err(PolicyError::Temporary {
                    stage: LookupStage::Deadline,
                    reason: format!("the lookup did not finish within {} s", self.limits.lookup.as_secs()),
                })
            });
        let patterns = resolved.as_ref().ok().and_then(|policy| {
            let id = policy
                .mx
                .iter()
                .find(|mx| mx.source == PolicySource::MtaSts)?
                .policy_id
                .as_deref()?;
            self.lookup.mta_sts_patterns(&domain, id)
        });
        let reply = reply_for(resolved.as_deref(), patterns.as_deref(), self.on_failure);
        match &reply {
            Reply::Ok(policy) => tracing::debug!(domain, policy, "socketmap answer"),
            Reply::Temp(reason) | Reply::Perm(reason) => tracing::info!(domain, reason, "socketmap: no policy"),
            Reply::NotFound => {}
        }
        reply
    }
}
