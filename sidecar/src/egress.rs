//! Leaving the pod from its pool address: opening connections to MX hosts (bound directly, or through an egress
//! proxy whose reported source address is checked on every connection) and the self-check that keeps the pod
//! unready, and delivery paused, while it cannot send from its address.

pub mod socks5;

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use securemail_api::sidecar_config::{Egress, SidecarConfig};
use securemail_api::sidecar_status::EgressStatus;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Time between self-checks while the pod can send, and while it cannot (a fixed address comes back quickly).
const CHECK_INTERVAL: Duration = Duration::from_secs(30);
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// How long one self-check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a proxy seen sending from another address keeps the pod unready: the self-check cannot see the source
/// (see [`check`]), so after this the next delivery tries again, and closes its connection again if it must.
const WRONG_SOURCE_HOLD: jiff::SignedDuration = jiff::SignedDuration::from_mins(5);
/// SOCKS5 reply code "connection refused": the proxy tried to connect and the target refused.
const SOCKS5_CONNECTION_REFUSED: u8 = 5;
/// The SMTP port; the proxy must let the pods connect to it anywhere.
const SMTP_PORT: u16 = 25;

/// A public address to ask the routing table about (a.root-servers.net): connecting a UDP socket only looks the
/// route up, nothing is sent.
const ROUTE_PROBE_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 41, 0, 4));
const ROUTE_PROBE_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0x503, 0xba3e, 0, 0, 0, 2, 0x30));

/// Why a connection could not leave from the pool address. Never the remote's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot send from {address}: {reason}")]
pub struct EgressError {
    pub address: IpAddr,
    pub reason: String,
    /// The proxy connected from another address (the connection was closed before any SMTP).
    pub wrong_source: bool,
}

/// Why the connection failed: on the pod's side (its address) or the remote's.
#[derive(Debug)]
pub enum ConnectError {
    Egress(EgressError),
    Remote(String),
}

/// A TCP connection to `remote` that leaves from `source`, as `egress` says. A proxy that reports any other source
/// address gets its connection closed before a byte of SMTP crosses it.
pub async fn connect(
    egress: &Egress,
    source: IpAddr,
    remote: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let egress_error = |reason: String| {
        ConnectError::Egress(EgressError {
            address: source,
            reason,
            wrong_source: false,
        })
    };
    match egress {
        Egress::Direct => {
            let socket = bound_socket(source, remote.ip()).map_err(egress_error)?;
            tokio::time::timeout(timeout, socket.connect(remote))
                .await
                .map_err(|_| ConnectError::Remote("timed out".to_owned()))?
                .map_err(|err| match err.kind() {
                    // No route from the source address: the pod's network, not the MX.
                    ErrorKind::NetworkUnreachable => egress_error(format!("no route to {remote}")),
                    _ => ConnectError::Remote(err.to_string()),
                })
        }
        Egress::Socks5Proxy { proxy } => {
            let (stream, used) = tokio::time::timeout(timeout, through_proxy(*proxy, remote))
                .await
                .map_err(|_| ConnectError::Remote(format!("timed out (through proxy {proxy})")))?
                .map_err(|failure| match failure {
                    ProxyFailure::Unreachable(reason) => egress_error(reason),
                    // The proxy reached out and the MX's side failed: the remote's matter.
                    ProxyFailure::Refused(err @ socks5::Socks5Error::Refused(3..=6)) => {
                        ConnectError::Remote(format!("{err} (through proxy {proxy})"))
                    }
                    ProxyFailure::Refused(err) => egress_error(format!("proxy {proxy}: {err}")),
                })?;
            if used.ip() == source {
                Ok(stream)
            } else {
                Err(ConnectError::Egress(EgressError {
                    address: source,
                    reason: wrong_source(*proxy, used.ip()),
                    wrong_source: true,
                }))
            }
        }
    }
}

/// A TCP socket bound to `source`, of `remote`'s family.
fn bound_socket(source: IpAddr, remote: IpAddr) -> Result<TcpSocket, String> {
    if source.is_ipv4() != remote.is_ipv4() {
        return Err(format!("it cannot reach {remote}, of the other address family"));
    }
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|err| format!("cannot open a socket: {err}"))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|err| bind_failure(&err))?;
    Ok(socket)
}

fn bind_failure(err: &std::io::Error) -> String {
    match err.kind() {
        ErrorKind::AddrNotAvailable => "the address is not assigned to any interface of this pod".to_owned(),
        _ => format!("cannot bind it: {err}"),
    }
}

fn wrong_source(proxy: SocketAddr, used: IpAddr) -> String {
    format!("proxy {proxy} sends from {used} instead")
}

enum ProxyFailure {
    /// The proxy could not be reached or spoke nonsense: the pod's way out is broken.
    Unreachable(String),
    /// The proxy answered and declined.
    Refused(socks5::Socks5Error),
}

async fn through_proxy(proxy: SocketAddr, target: SocketAddr) -> Result<(TcpStream, SocketAddr), ProxyFailure> {
    let mut stream = TcpStream::connect(proxy)
        .await
        .map_err(|err| ProxyFailure::Unreachable(format!("cannot reach proxy {proxy}: {err}")))?;
    match socks5::connect(&mut stream, target).await {
        Ok(used) => Ok((stream, used)),
        Err(err @ socks5::Socks5Error::Refused(_)) => Err(ProxyFailure::Refused(err)),
        Err(err) => Err(ProxyFailure::Unreachable(format!("proxy {proxy}: {err}"))),
    }
}

/// The self-check: whether a connection can leave from `source` now.
/// - Direct: `source` is bound on an interface of the pod and the routing table has a route from it to the
///   Internet (asked of the kernel, nothing is sent).
/// - Through a proxy: the proxy answers on `source` (so the egress host owns the address), speaks SOCKS5 without
///   authentication, and connects to the SMTP port of its own address. Proxies refuse a CONNECT to their own
///   listener (Dante), and the check contacts no MX, so this is the one target every egress host has: nothing
///   listening there ("connection refused") still shows the proxy allowed and able to connect; something listening
///   there must see the connection come from `source`. Every delivery checks the source address as well.
pub async fn check(egress: &Egress, source: IpAddr) -> Result<(), String> {
    match egress {
        Egress::Direct => {
            let probe = if source.is_ipv4() {
                ROUTE_PROBE_V4
            } else {
                ROUTE_PROBE_V6
            };
            let socket = UdpSocket::bind(SocketAddr::new(source, 0)).map_err(|err| bind_failure(&err))?;
            socket
                .connect(SocketAddr::new(probe, 25))
                .map_err(|err| format!("no route from it to the Internet: {err}"))
        }
        Egress::Socks5Proxy { proxy } => {
            let target = SocketAddr::new(proxy.ip(), SMTP_PORT);
            let attempt = tokio::time::timeout(CHECK_TIMEOUT, through_proxy(*proxy, target))
                .await
                .map_err(|_| format!("proxy {proxy} did not answer within {}s", CHECK_TIMEOUT.as_secs()))?;
            match attempt {
                Ok((_stream, used)) if used.ip() == source => Ok(()),
                Ok((_stream, used)) => Err(wrong_source(*proxy, used.ip())),
                Err(ProxyFailure::Refused(socks5::Socks5Error::Refused(SOCKS5_CONNECTION_REFUSED))) => Ok(()),
                Err(ProxyFailure::Refused(err)) => Err(format!("proxy {proxy}: {err}")),
                Err(ProxyFailure::Unreachable(reason)) => Err(reason),
            }
        }
    }
}

/// What the last self-check (or a delivery that could not leave) found, shared by the checker, the delivery engine,
/// `/readyz`, `/status` and the metrics. Not ready until the first check passed.
#[derive(Clone, Debug, Default)]
pub struct EgressHealth {
    last: Arc<Mutex<Option<EgressStatus>>>,
    /// A proxy seen sending from another address, and when: unready for [`WRONG_SOURCE_HOLD`] whatever the
    /// self-check finds.
    wrong_source: Arc<Mutex<Option<(String, Timestamp)>>>,
    recheck: Arc<Notify>,
    /// Woken at every recorded result, for deliveries that arrive before the first check finished.
    checked: Arc<Notify>,
}

impl EgressHealth {
    /// The last result; `None` before the first check.
    pub fn status(&self) -> Option<EgressStatus> {
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Returns once a first result is recorded, or after `limit`: a delivery that arrives while the sidecar starts
    /// waits for the verdict instead of being deferred for Postfix's whole retry interval.
    pub async fn first_check(&self, limit: Duration) {
        let notified = self.checked.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.status().is_none() {
            let _ = tokio::time::timeout(limit, notified).await;
        }
    }

    /// Why the pod cannot send now; `None` when it can.
    pub fn problem(&self) -> Option<String> {
        match self.status() {
            Some(EgressStatus { ready: true, .. }) => None,
            Some(EgressStatus { reason, .. }) => Some(reason.unwrap_or_else(|| "egress self-check failed".to_owned())),
            None => Some("egress not checked yet".to_owned()),
        }
    }

    /// A delivery could not leave from the address: unready at once, and a self-check soon decides when it can
    /// again.
    pub fn connection_failed(&self, err: &EgressError, now: Timestamp) {
        if err.wrong_source {
            *self
                .wrong_source
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((err.reason.clone(), now));
        }
        self.record(Err(err.reason.clone()), now);
        self.recheck.notify_one();
    }

    /// The self-check's `result` at `now`, unless a delivery recently saw the proxy send from another address.
    pub fn judge(&self, result: Result<(), String>, now: Timestamp) -> Result<(), String> {
        let mut held = self
            .wrong_source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match held.as_ref() {
            Some((reason, since)) if now < since.saturating_add(WRONG_SOURCE_HOLD).unwrap_or(*since) => Err(format!(
                "{reason} (seen on a delivery; tried again {} minutes later)",
                WRONG_SOURCE_HOLD.as_mins()
            )),
            Some(_) => {
                *held = None;
                result
            }
            None => result,
        }
    }

    /// Records a self-check's result; true when readiness changed.
    pub fn record(&self, result: Result<(), String>, now: Timestamp) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let was_ready = last.as_ref().map(|status| status.ready);
        *last = Some(EgressStatus {
            ready: result.is_ok(),
            reason: result.err(),
            checked_at: now,
        });
        self.checked.notify_waiters();
        was_ready != Some(last.as_ref().is_some_and(|status| status.ready))
    }
}

/// Checks at start, whenever the configuration changes, after a delivery could not leave, and every
/// [`CHECK_INTERVAL`] ([`RETRY_INTERVAL`] while failing), until `shutdown`.
pub async fn run_checks(
    mut config: watch::Receiver<Arc<SidecarConfig>>,
    health: EgressHealth,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let current = Arc::clone(&config.borrow_and_update());
        let source = current.source.address;
        let now = Timestamp::now();
        let result = health.judge(check(&current.egress, source).await, now);
        let ready = result.is_ok();
        let changed = health.record(result.clone(), now);
        metrics.egress_checked(ready);
        match result {
            Err(reason) if changed => {
                tracing::error!(%source, %reason, "cannot send from the pool address; delivery paused")
            }
            Ok(()) if changed => tracing::info!(%source, "egress self-check passed; delivering"),
            _ => {}
        }
        let wait = if ready { CHECK_INTERVAL } else { RETRY_INTERVAL };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = config.changed() => if changed.is_err() { return },
            () = health.recheck.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn direct_needs_the_address_on_an_interface() {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        // Loopback is on an interface, but has no route to the Internet.
        let err = check(&Egress::Direct, loopback).await.unwrap_err();
        assert!(err.starts_with("no route from it to the Internet"), "{err}");
        let absent = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77));
        assert_eq!(
            check(&Egress::Direct, absent).await.unwrap_err(),
            "the address is not assigned to any interface of this pod"
        );
        match connect(&Egress::Direct, absent, "127.0.0.1:25".parse().unwrap(), CHECK_TIMEOUT).await {
            Err(ConnectError::Egress(err)) => assert_eq!(
                err.to_string(),
                "cannot send from 192.0.2.77: the address is not assigned to any interface of this pod"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// A proxy on loopback that answers every CONNECT with `reported` as its source address and then echoes.
    async fn proxy_reporting(reported: [u8; 4]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut greeting = [0u8; 3];
                    stream.read_exact(&mut greeting).await.unwrap();
                    stream.write_all(&[5, 0]).await.unwrap();
                    let mut request = [0u8; 10];
                    stream.read_exact(&mut request).await.unwrap();
                    let mut reply = vec![5, 0, 0, 1];
                    reply.extend_from_slice(&reported);
                    reply.extend_from_slice(&[0x9c, 0x40]);
                    stream.write_all(&reply).await.unwrap();
                    let mut byte = [0u8; 1];
                    while stream.read(&mut byte).await.is_ok_and(|n| n > 0) {
                        stream.write_all(&byte).await.unwrap();
                    }
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn a_proxy_must_send_from_the_pool_address() {
        let pool = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 21));
        let proxy = proxy_reporting([198, 51, 100, 21]).await;
        let egress = Egress::Socks5Proxy { proxy };
        assert_eq!(check(&egress, pool).await, Ok(()));
        let remote: SocketAddr = "192.0.2.25:25".parse().unwrap();
        let mut stream = connect(&egress, pool, remote, CHECK_TIMEOUT).await.unwrap();
        stream.write_all(b"x").await.unwrap();
        assert_eq!(stream.read_u8().await.unwrap(), b'x');

        let elsewhere = proxy_reporting([198, 51, 100, 22]).await;
        let egress = Egress::Socks5Proxy { proxy: elsewhere };
        let expected = format!("proxy {elsewhere} sends from 198.51.100.22 instead");
        assert_eq!(check(&egress, pool).await, Err(expected.clone()));
        match connect(&egress, pool, remote, CHECK_TIMEOUT).await {
            Err(ConnectError::Egress(err)) => assert_eq!(err.reason, expected),
            other => panic!("{other:?}"),
        }
    }

    /// A proxy on loopback that answers every CONNECT with reply `code` and closes.
    async fn proxy_refusing(code: u8) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut greeting = [0u8; 3];
                stream.read_exact(&mut greeting).await.unwrap();
                stream.write_all(&[5, 0]).await.unwrap();
                let mut request = [0u8; 10];
                stream.read_exact(&mut request).await.unwrap();
                assert_eq!(&request[8..], &[0, 25], "the check asks for the SMTP port");
                stream.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
            }
        });
        address
    }

    #[tokio::test]
    async fn a_proxy_that_tried_to_connect_passes_and_one_that_may_not_fails() {
        let pool = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 21));
        // Nothing listens on the egress host's port 25: the proxy tried, as it would for an MX.
        let refused = proxy_refusing(SOCKS5_CONNECTION_REFUSED).await;
        assert_eq!(check(&Egress::Socks5Proxy { proxy: refused }, pool).await, Ok(()));
        let ruleset = proxy_refusing(2).await;
        assert_eq!(
            check(&Egress::Socks5Proxy { proxy: ruleset }, pool).await,
            Err(format!(
                "proxy {ruleset}: the proxy refused the connection: connection not allowed by ruleset (reply 2)"
            ))
        );
    }

    #[tokio::test]
    async fn an_unreachable_proxy_is_the_pods_problem() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let egress = Egress::Socks5Proxy { proxy: closed };
        let pool = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 21));
        let err = check(&egress, pool).await.unwrap_err();
        assert!(err.starts_with(&format!("cannot reach proxy {closed}: ")), "{err}");
    }

    #[test]
    fn health_is_unready_until_checked_and_tracks_transitions() {
        let health = EgressHealth::default();
        let now = Timestamp::UNIX_EPOCH;
        assert_eq!(health.problem().as_deref(), Some("egress not checked yet"));
        assert!(health.record(Ok(()), now));
        assert_eq!(health.problem(), None);
        assert!(!health.record(Ok(()), now));
        let source = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 21));
        health.connection_failed(
            &EgressError {
                address: source,
                reason: "gone".to_owned(),
                wrong_source: false,
            },
            now,
        );
        assert_eq!(health.problem().as_deref(), Some("gone"));
        assert_eq!(
            health.judge(Ok(()), now),
            Ok(()),
            "a lost connection does not outlive a passing check"
        );
        assert!(health.record(Ok(()), now));
    }

    #[tokio::test]
    async fn a_delivery_at_start_waits_for_the_first_verdict() {
        let health = EgressHealth::default();
        let recorder = health.clone();
        let waiting = tokio::spawn(async move { health.first_check(Duration::from_secs(30)).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no verdict yet");
        recorder.record(Ok(()), Timestamp::UNIX_EPOCH);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        // Once checked, it does not wait at all.
        tokio::time::timeout(
            Duration::from_millis(100),
            recorder.first_check(Duration::from_secs(30)),
        )
        .await
        .unwrap();
    }

    #[test]
    fn a_proxy_seen_sending_from_elsewhere_keeps_the_pod_unready_for_a_while() {
        let health = EgressHealth::default();
        let now = Timestamp::UNIX_EPOCH;
        health.connection_failed(
            &EgressError {
                address: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 21)),
                reason: "proxy 198.51.100.21:1080 sends from 198.51.100.22 instead".to_owned(),
                wrong_source: true,
            },
            now,
        );
        let later = now.saturating_add(jiff::SignedDuration::from_mins(4)).unwrap();
        let held = health.judge(Ok(()), later).unwrap_err();
        assert!(
            held.starts_with("proxy 198.51.100.21:1080 sends from 198.51.100.22 instead"),
            "{held}"
        );
        let after = now.saturating_add(WRONG_SOURCE_HOLD).unwrap();
        assert_eq!(health.judge(Ok(()), after), Ok(()));
        assert_eq!(health.judge(Ok(()), later), Ok(()), "the hold is over once passed");
    }
}
