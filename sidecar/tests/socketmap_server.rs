//! The socketmap server over real loopback TCP, with fixed policy answers: request and reply framing, several
//! requests per connection, and bad input (broken framing, oversized requests, stalled clients, unknown map
//! names, too many connections), each answered with a PERM or TEMP naming the problem, without a panic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use securemail_api::tenant::{OnFailure, TlsVersion};
use securemail_sidecar::evidence::{DomainName, PolicySource};
use securemail_sidecar::policy::{DomainPolicy, LookupStage, MxCandidate, PeerAuth, PolicyError, PolicyLookup};
use securemail_sidecar::socketmap::{Limits, SocketmapError, SocketmapServer, netstring};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Policies by domain; a domain listed in `hang` never gets an answer.
#[derive(Default)]
struct FixedPolicies {
    answers: HashMap<String, Result<Arc<DomainPolicy>, PolicyError>>,
    hang: Vec<String>,
}

impl PolicyLookup for FixedPolicies {
    async fn resolve(&self, domain: &str) -> Result<Arc<DomainPolicy>, PolicyError> {
        if self.hang.iter().any(|d| d == domain) {
            std::future::pending::<()>().await;
        }
        self.answers.get(domain).cloned().unwrap_or_else(|| {
            Err(PolicyError::Permanent {
                reason: format!("recipient domain {domain} does not exist (NXDOMAIN)"),
            })
        })
    }

    async fn addresses(&self, _mx: &MxCandidate) -> Result<Vec<IpAddr>, PolicyError> {
        Ok(Vec::new())
    }

    fn mta_sts_patterns(&self, domain: &str, id: &str) -> Option<Vec<String>> {
        (domain == "sts.test" && id == "20261125").then(|| vec!["mx.sts.test".to_owned(), "*.sts.test".to_owned()])
    }
}

fn candidate(host: &str, auth: PeerAuth, source: PolicySource, id: Option<&str>) -> MxCandidate {
    MxCandidate {
        host: DomainName::new(host).unwrap(),
        preference: 10,
        auth,
        source,
        policy_id: id.map(str::to_owned),
    }
}

fn policy(mx: Vec<MxCandidate>) -> Result<Arc<DomainPolicy>, PolicyError> {
    Ok(Arc::new(DomainPolicy {
        mx,
        min_version: TlsVersion::Tls12,
        on_failure: OnFailure::Defer,
        allow_cleartext: false,
    }))
}

fn policies() -> FixedPolicies {
    let mut answers = HashMap::new();
    answers.insert(
        "sts.test".to_owned(),
        policy(vec![candidate(
            "mx.sts.test",
            PeerAuth::WebPki,
            PolicySource::MtaSts,
            Some("20261125"),
        )]),
    );
    answers.insert(
        "good.plain.test".to_owned(),
        policy(vec![candidate(
            "mx.good.plain.test",
            PeerAuth::WebPki,
            PolicySource::Tenant,
            None,
        )]),
    );
    answers.insert(
        "servfail.test".to_owned(),
        Err(PolicyError::Temporary {
            stage: LookupStage::Dane,
            reason: "TLSA lookup SERVFAIL".to_owned(),
        }),
    );
    answers.insert(
        "nomatch.test".to_owned(),
        Err(PolicyError::NoSecurePath {
            reason: "no MX host matches the MTA-STS policy".to_owned(),
        }),
    );
    FixedPolicies {
        answers,
        hang: vec!["slow.test".to_owned()],
    }
}

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(limits: Limits) -> Running {
    let server = SocketmapServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(Arc::new(policies()), OnFailure::Defer, limits, shutdown.clone()));
    Running { addr, shutdown, task }
}

fn short_limits() -> Limits {
    Limits {
        request: Duration::from_millis(300),
        lookup: Duration::from_millis(300),
        ..Limits::default()
    }
}

/// Reads one netstring reply; `None` at end of stream.
async fn read_reply(stream: &mut TcpStream) -> Option<String> {
    let mut buffer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if let Some((payload, _)) = netstring::decode(&buffer).expect("the server sends netstrings") {
            return Some(String::from_utf8(payload.to_vec()).unwrap());
        }
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("a reply or end of stream within 10 s")
            .unwrap();
        if read == 0 {
            assert!(buffer.is_empty(), "stream ended inside a reply: {buffer:?}");
            return None;
        }
        buffer.push(byte[0]);
    }
}

async fn ask(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(&netstring::encode(request.as_bytes())).await.unwrap();
    read_reply(stream).await.expect("a reply")
}

#[tokio::test]
async fn answers_many_lookups_on_one_connection_in_postfix_syntax() {
    let running = start(Limits::default()).await;
    let mut stream = TcpStream::connect(running.addr).await.unwrap();
    assert_eq!(
        ask(&mut stream, "postfix sts.test").await,
        "OK secure match=mx.sts.test:.sts.test servername=hostname protocols=>=TLSv1.2"
    );
    assert_eq!(
        ask(&mut stream, "postfix Good.Plain.Test.").await,
        "OK verify match=hostname servername=hostname protocols=>=TLSv1.2"
    );
    assert_eq!(
        ask(&mut stream, "postfix servfail.test").await,
        "TEMP dane lookup: TLSA lookup SERVFAIL"
    );
    assert_eq!(
        ask(&mut stream, "postfix nomatch.test").await,
        "TEMP no secure path: no MX host matches the MTA-STS policy"
    );
    assert_eq!(
        ask(&mut stream, "postfix gone.test").await,
        "PERM recipient domain gone.test does not exist (NXDOMAIN)"
    );
    assert_eq!(ask(&mut stream, "postfix .plain.test").await, "NOTFOUND ");
    // Two requests in one write get two replies, in order.
    let mut both = netstring::encode(b"postfix good.plain.test");
    both.extend(netstring::encode(b"postfix sts.test"));
    stream.write_all(&both).await.unwrap();
    assert!(read_reply(&mut stream).await.unwrap().starts_with("OK verify "));
    assert!(read_reply(&mut stream).await.unwrap().starts_with("OK secure "));
    running.shutdown.cancel();
    running.task.await.unwrap();
}

#[tokio::test]
async fn malformed_requests_get_perm_and_the_connection_stays_usable() {
    let running = start(Limits::default()).await;
    let mut stream = TcpStream::connect(running.addr).await.unwrap();
    let reply = ask(&mut stream, "other sts.test").await;
    assert!(reply.starts_with("PERM unknown map name \"other\""), "{reply}");
    let reply = ask(&mut stream, "postfix").await;
    assert!(reply.starts_with("PERM malformed request: request must be"), "{reply}");
    let reply = ask(&mut stream, "postfix [mx.relay.test]:587").await;
    assert!(reply.starts_with("PERM explicit next hops"), "{reply}");
    let reply = ask(&mut stream, "postfix someone@sts.test").await;
    assert!(reply.starts_with("PERM key is not a recipient domain"), "{reply}");
    assert!(!reply.contains("someone"), "the local part is never repeated: {reply}");
    assert!(ask(&mut stream, "postfix sts.test").await.starts_with("OK secure "));
    running.shutdown.cancel();
    running.task.await.unwrap();
}

#[tokio::test]
async fn broken_framing_is_answered_once_and_the_connection_closed() {
    let running = start(Limits::default()).await;
    for (input, expected) in [
        (
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            "PERM malformed request: netstring length must be decimal digits",
        ),
        (
            b"5:abcdefg",
            "PERM malformed request: netstring of 5 bytes is not followed by ','",
        ),
        (
            b"999999999:",
            "PERM malformed request: request of 999999999 bytes exceeds the limit of 1024 bytes",
        ),
        (
            b"0000000000",
            "PERM malformed request: netstring length has a leading zero",
        ),
        (b":x,", "PERM malformed request: netstring has no length"),
    ] {
        let mut stream = TcpStream::connect(running.addr).await.unwrap();
        stream.write_all(input).await.unwrap();
        let reply = read_reply(&mut stream).await.expect("a reply");
        assert!(reply.starts_with(expected), "{reply}");
        assert_eq!(read_reply(&mut stream).await, None, "connection closed after {reply}");
    }
    // The server still answers others.
    let mut stream = TcpStream::connect(running.addr).await.unwrap();
    assert!(ask(&mut stream, "postfix sts.test").await.starts_with("OK "));
    running.shutdown.cancel();
    running.task.await.unwrap();
}

#[tokio::test]
async fn an_oversized_request_is_refused_without_reading_it() {
    let running = start(Limits::default()).await;
    let mut stream = TcpStream::connect(running.addr).await.unwrap();
    let huge = netstring::encode(&vec![b'a'; 1 << 20]);
    // The server refuses after the length; the rest of the write may fail once it has closed.
    let _ = stream.write_all(&huge).await;
    let reply = read_reply(&mut stream).await.expect("a reply");
    assert_eq!(
        reply,
        "PERM malformed request: request of 1048576 bytes exceeds the limit of 1024 bytes"
    );
    running.shutdown.cancel();
    running.task.await.unwrap();
}

#[tokio::test]
async fn a_client_stalling_mid_request_is_told_and_disconnected() {
    let running = start(short_limits()).await;
    let mut stream = TcpStream::connect(running.addr).await.unwrap();
    stream.write_all(b"16:postfix sts").await.unwrap();
    let reply = read_reply(&mut stream).await.expect("a reply");
    assert!(reply.starts_with("PERM request not completed within"), "{reply}");
    assert_eq!(read_reply(&mut stream).await, None);
    running.shutdown.cancel();
    running.task.await.unwrap();
}

#[tokio::test]
async fn a_lookup_past_its_deadline_is_temp() {
    let running = start(short_limits()).await;
    let mut stream = TcpStream::connect(running.addr).await.unwrap();
    let reply = ask(&mut stream, "postfix slow.test").await;
    assert!(
        reply.starts_with("TEMP deadline lookup: the lookup did not finish"),
        "{reply}"
    );
    running.shutdown.cancel();
    running.task.await.unwrap();
}

#[tokio::test]
async fn connections_beyond_the_limit_get_temp() {
    let running = start(Limits {
        max_connections: 1,
        ..Limits::default()
    })
    .await;
    let mut first = TcpStream::connect(running.addr).await.unwrap();
    assert!(ask(&mut first, "postfix sts.test").await.starts_with("OK "));
    let mut second = TcpStream::connect(running.addr).await.unwrap();
    assert_eq!(
        read_reply(&mut second).await.as_deref(),
        Some("TEMP socketmap server busy: 1 connections already open")
    );
    assert_eq!(read_reply(&mut second).await, None);
    // The first connection is unaffected.
    assert!(ask(&mut first, "postfix good.plain.test").await.starts_with("OK "));
    running.shutdown.cancel();
    running.task.await.unwrap();
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_returns() {
    let running = start(Limits::default()).await;
    let mut stream = TcpStream::connect(running.addr).await.unwrap();
    assert!(ask(&mut stream, "postfix sts.test").await.starts_with("OK "));
    running.shutdown.cancel();
    running.task.await.unwrap();
    assert_eq!(read_reply(&mut stream).await, None);
}

#[tokio::test]
async fn only_loopback_addresses_are_accepted() {
    let addr: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let err = SocketmapServer::bind(addr).await.unwrap_err();
    assert!(matches!(err, SocketmapError::NotLoopback(_)));
    assert!(err.to_string().contains("is not a loopback address"), "{err}");
}
