//! The circuit breaker end to end on loopback: Postfix's side spoken over LMTP into the real LMTP server, the
//! engine delivering over real TLS to an in-test receiver that plays Gmail (its MX host name is Gmail's, its
//! address 127.0.0.1) and answers most messages with Gmail's 421-4.7.28. The breaker's clock is a manual one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a panic is the failure report"
)]

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use securemail_api::sidecar_status::CircuitState;
use securemail_api::tenant::{OnFailure, TlsVersion};
use securemail_sidecar::deliver::{Engine, EngineConfig, WallClock};
use securemail_sidecar::evidence::{DomainName, EvidenceStore, EvidenceWriter, PolicySource};
use securemail_sidecar::lmtp::{Limits, serve_session};
use securemail_sidecar::metrics::Metrics;
use securemail_sidecar::policy::clock::ManualClock;
use securemail_sidecar::policy::{DomainPolicy, LookupStage, MxCandidate, PeerAuth, PolicyError, PolicyLookup};
use securemail_sidecar::provider::Provider;
use securemail_sidecar::reputation::{self, BreakerSettings, Breakers};
use securemail_sidecar::tls::TlsConfigs;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

const GMAIL_MX: &str = "gmail-smtp-in.l.google.com";
const OTHER_MX: &str = "mx.example.net";
const MESSAGE: &str = "From: Records <records@example.org>\r\nTo: patient@example.net\r\nSubject: Results\r\n\
    Message-ID: <m1@example.org>\r\n\r\nLine one\r\n";
/// Gmail's reply, as it sends it.
const RATE_LIMITED: &str = "421-4.7.28 [127.0.0.1      15] Our system has detected an unusual rate of\r\n\
    421-4.7.28 unsolicited mail originating from your IP address. To protect our\r\n\
    421-4.7.28 users from spam, mail sent from your IP address has been temporarily\r\n\
    421-4.7.28 rate limited. Please visit\r\n\
    421-4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to\r\n\
    421 4.7.28 review our Bulk Email Senders Guidelines. d2e1a72fcca58-7a1si123.456 - gsmtp\r\n";
const ACCEPTED: &str = "250 2.0.0 OK  1767225600 d2e1a72fcca58-7a1si123.456 - gsmtp\r\n";
/// 2026-01-01T00:00:00Z.
const WALL: i64 = 1_767_225_600;

// ---------------------------------------------------------------------------------------------------------------
// The receiving MX: TLS with a certificate for Gmail's MX name from a test CA.

/// Every fourth message accepted, the rest deferred.
const MOSTLY_DEFERRED: u8 = 0;
const ALL_DEFERRED: u8 = 1;
const ALL_ACCEPTED: u8 = 2;

struct Receiver {
    port: u16,
    mode: Arc<AtomicU8>,
    messages: Arc<AtomicUsize>,
}

struct Pki {
    roots: RootCertStore,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca: CertificateDer<'static> = params.self_signed(&ca_key).unwrap().der().clone();
    let issuer = rcgen::Issuer::new(params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![GMAIL_MX.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca).unwrap();
    Pki {
        roots,
        server: Arc::new(server),
    }
}

impl Receiver {
    async fn start(tls: Arc<rustls::ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(MOSTLY_DEFERRED));
        let messages = Arc::new(AtomicUsize::new(0));
        let (shared_mode, shared_messages) = (Arc::clone(&mode), Arc::clone(&messages));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (mode, messages, tls) = (Arc::clone(&shared_mode), Arc::clone(&shared_messages), Arc::clone(&tls));
                tokio::spawn(async move {
                    let mut plain = BufReader::new(stream);
                    plain
                        .write_all(b"220 mx.google.com ESMTP test - gsmtp\r\n")
                        .await
                        .unwrap();
                    if commands(&mut plain, &mode, &messages, true).await {
                        let Ok(secure) = TlsAcceptor::from(tls).accept(plain.into_inner()).await else {
                            return;
                        };
                        commands(&mut BufReader::new(secure), &mode, &messages, false).await;
                    }
                });
            }
        });
        Self { port, mode, messages }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn messages(&self) -> usize {
        self.messages.load(Ordering::SeqCst)
    }
}

/// Answers until QUIT or EOF; `true` when STARTTLS was asked for and granted.
async fn commands<S: AsyncBufRead + AsyncWrite + Unpin>(
    stream: &mut S,
    mode: &AtomicU8,
    messages: &AtomicUsize,
    cleartext: bool,
) -> bool {
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
            return false;
        }
        let upper = line.trim_end().to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            let starttls = if cleartext { "250-STARTTLS\r\n" } else { "" };
            format!("250-mx.google.com at your service\r\n250-PIPELINING\r\n{starttls}250 SIZE 157286400\r\n")
        } else if upper == "STARTTLS" {
            stream.write_all(b"220 2.0.0 Ready to start TLS\r\n").await.unwrap();
            stream.flush().await.unwrap();
            return true;
        } else if upper == "DATA" {
            stream.write_all(b"354 Go ahead - gsmtp\r\n").await.unwrap();
            stream.flush().await.unwrap();
            loop {
                let mut data = String::new();
                if stream.read_line(&mut data).await.unwrap_or(0) == 0 {
                    return false;
                }
                if data == ".\r\n" {
                    break;
                }
            }
            let n = messages.fetch_add(1, Ordering::SeqCst) + 1;
            let accept = match mode.load(Ordering::SeqCst) {
                MOSTLY_DEFERRED => n.is_multiple_of(4),
                ALL_DEFERRED => false,
                _ => true,
            };
            (if accept { ACCEPTED } else { RATE_LIMITED }).to_owned()
        } else if upper == "QUIT" {
            let _ = stream.write_all(b"221 2.0.0 closing connection - gsmtp\r\n").await;
            return false;
        } else {
            "250 2.1.0 OK - gsmtp\r\n".to_owned()
        };
        if stream.write_all(reply.as_bytes()).await.is_err() || stream.flush().await.is_err() {
            return false;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Policy: every `*.gmail.test` domain's MX is Gmail's, `other.test`'s an unrelated host, anything else fails.

struct Policies;

impl PolicyLookup for Policies {
    async fn resolve(&self, domain: &str) -> Result<Arc<DomainPolicy>, PolicyError> {
        let host = if domain.ends_with(".gmail.test") {
            GMAIL_MX
        } else if domain == "other.test" {
            OTHER_MX
        } else {
            return Err(PolicyError::Temporary {
                stage: LookupStage::Mx,
                reason: "SERVFAIL".into(),
            });
        };
        Ok(Arc::new(DomainPolicy {
            mx: vec![MxCandidate {
                host: DomainName::new(host).unwrap(),
                preference: 5,
                auth: PeerAuth::WebPki,
                source: PolicySource::Tenant,
                policy_id: None,
            }],
            min_version: TlsVersion::Tls12,
            on_failure: OnFailure::Defer,
            allow_cleartext: false,
        }))
    }

    async fn addresses(&self, _mx: &MxCandidate) -> Result<Vec<IpAddr>, PolicyError> {
        Ok(vec!["127.0.0.1".parse().unwrap()])
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Engine and Postfix's side

struct FixedWall;

impl WallClock for FixedWall {
    fn now(&self) -> Timestamp {
        Timestamp::from_second(WALL).unwrap()
    }
}

struct Harness {
    engine: Arc<Engine<Policies>>,
    metrics: Metrics,
    registry: Registry,
    breakers: Arc<Breakers>,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

fn harness(roots: RootCertStore, port: u16) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let keys = common::signing_keys(dir.path());
    let wall: Arc<dyn WallClock> = Arc::new(FixedWall);
    let session = common::session(port);
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry, "clinic-a/outbound", session.source, Arc::clone(&wall));
    let clock = Arc::new(ManualClock::new());
    let breakers = Arc::new(Breakers::new(
        BreakerSettings::default(),
        clock.clone(),
        Arc::clone(&wall),
        metrics.clone(),
    ));
    let evidence = EvidenceWriter::spawn(EvidenceStore::open(dir.path(), wall.now()).unwrap()).unwrap();
    let engine = Engine::new(
        EngineConfig::new("clinic-a/outbound".parse().unwrap(), session, OnFailure::Defer),
        Policies,
        Arc::new(keys),
        Arc::new(TlsConfigs::with_roots(roots)),
        evidence,
        metrics.clone(),
        wall,
    )
    .with_breakers(Arc::clone(&breakers));
    Harness {
        engine: Arc::new(engine),
        metrics,
        registry,
        breakers,
        clock,
        _dir: dir,
    }
}

/// Final reply lines in `output` (a multi-line reply counts once).
fn final_lines(output: &str) -> Vec<&str> {
    output
        .split_terminator("\r\n")
        .filter(|line| line.as_bytes().get(3) != Some(&b'-'))
        .collect()
}

impl Harness {
    /// One LMTP transaction as Postfix runs it: the RCPT replies, then (when any was accepted) the message and
    /// one reply per accepted recipient.
    async fn transaction(&self, recipients: &[&str]) -> (Vec<String>, Vec<String>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let engine = Arc::clone(&self.engine);
        let served = tokio::spawn(async move {
            serve_session(server, &*engine, &Limits::default(), &CancellationToken::new()).await
        });
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let mut commands = String::from("LHLO postfix.test\r\nMAIL FROM:<records@example.org>\r\n");
        for recipient in recipients {
            commands.push_str(&format!("RCPT TO:<{recipient}>\r\n"));
        }
        to_server.write_all(commands.as_bytes()).await.unwrap();
        let mut output = String::new();
        let greeting_lhlo_mail = 3;
        read_until(&mut from_server, &mut output, greeting_lhlo_mail + recipients.len()).await;
        let rcpt: Vec<String> = final_lines(&output)[greeting_lhlo_mail..]
            .iter()
            .map(|line| (*line).to_owned())
            .collect();
        let accepted = rcpt.iter().filter(|reply| reply.starts_with("250 ")).count();
        let mut data = Vec::new();
        if accepted > 0 {
            to_server.write_all(b"DATA\r\n").await.unwrap();
            let before = final_lines(&output).len();
            read_until(&mut from_server, &mut output, before + 1).await;
            to_server.write_all(format!("{MESSAGE}.\r\n").as_bytes()).await.unwrap();
            read_until(&mut from_server, &mut output, before + 1 + accepted).await;
            data = final_lines(&output)[before + 1..]
                .iter()
                .map(|line| (*line).to_owned())
                .collect();
        }
        to_server.write_all(b"QUIT\r\n").await.unwrap();
        drop(to_server);
        let _ = tokio::time::timeout(Duration::from_secs(30), served).await;
        (rcpt, data)
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).unwrap();
        text
    }

    fn circuit(&self) -> CircuitState {
        reputation::status(&self.metrics, &self.breakers).circuits[&Provider::Gmail].state
    }
}

async fn read_until(from: &mut (impl tokio::io::AsyncRead + Unpin), output: &mut String, replies: usize) {
    let read = async {
        while final_lines(output).len() < replies {
            let mut chunk = [0; 4096];
            let n = from.read(&mut chunk).await.unwrap();
            assert!(n > 0, "LMTP server closed early; so far: {output}");
            output.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .unwrap_or_else(|_| panic!("no complete answer; so far: {output}"));
}

fn series(text: &str, name_and_labels: &str) -> String {
    let prefix = name_and_labels.replacen('{', "{tenant=\"clinic-a/outbound\",source_ip=\"127.0.0.1\",", 1);
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix).map(|value| value.trim().to_owned()))
        .unwrap_or_else(|| panic!("{prefix} missing from\n{text}"))
}

// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn mostly_rate_limited_gmail_opens_the_breaker_and_one_probe_per_pause_closes_it() {
    let pki = pki();
    let receiver = Receiver::start(Arc::clone(&pki.server)).await;
    let harness = harness(pki.roots.clone(), receiver.port);

    // Ten messages, three of every four answered 421-4.7.28: the tenth sample crosses 50% deferred in the window.
    for n in 1..=10_u32 {
        assert_eq!(harness.circuit(), CircuitState::Closed, "message {n}");
        let (rcpt, data) = harness.transaction(&["patient@clinic.gmail.test"]).await;
        assert_eq!(rcpt, ["250 2.1.5 recipient OK"], "message {n}");
        let expected = if n.is_multiple_of(4) {
            "250 2.0.0 delivered to "
        } else {
            "421 4.7.28 "
        };
        assert!(data[0].starts_with(expected), "message {n}: {data:?}");
    }
    assert_eq!(receiver.messages(), 10);
    assert_eq!(harness.circuit(), CircuitState::Open);

    // Open: Gmail's recipients are refused at RCPT, naming the provider and the retry time; nothing is sent.
    // Other providers' recipients, and a domain whose policy cannot be looked up now, are accepted.
    let paused = "451 4.7.1 deliveries to gmail from this address are paused after repeated deferrals (local \
                  circuit breaker); retry after 2026-01-01T00:01:00Z";
    let (rcpt, data) = harness
        .transaction(&["a@clinic.gmail.test", "b@other.test", "c@unresolvable.test"])
        .await;
    assert_eq!(rcpt[0], paused);
    assert_eq!(rcpt[1..], ["250 2.1.5 recipient OK", "250 2.1.5 recipient OK"]);
    assert!(data.iter().all(|reply| reply.starts_with("4")), "{data:?}");
    assert_eq!(receiver.messages(), 10);

    let text = harness.metrics_text();
    assert_eq!(
        series(
            &text,
            r#"securemail_remote_replies_total{provider="gmail",class="rate_limited"}"#
        ),
        "8"
    );
    assert_eq!(series(&text, r#"securemail_circuit_state{provider="gmail"}"#), "2");
    assert_eq!(series(&text, r#"securemail_circuit_state{provider="microsoft"}"#), "0");
    assert_eq!(
        series(&text, r#"securemail_circuit_opens_total{provider="gmail"}"#),
        "1"
    );
    let status = reputation::status(&harness.metrics, &harness.breakers);
    assert_eq!(status.replies[&Provider::Gmail].rate_limited, 8);
    assert_eq!(status.replies[&Provider::Gmail].reputation_block, 0);
    assert_eq!(
        status.circuits[&Provider::Gmail].retry_at,
        Some(Timestamp::from_second(WALL + 60).unwrap())
    );
    assert!(!status.circuits.contains_key(&Provider::Other));

    // After the pause: half-open. Of two Gmail domains in one transaction exactly one is sent, as the probe;
    // it is deferred again, so the breaker re-opens with the pause doubled.
    receiver.set(ALL_DEFERRED);
    harness.clock.advance(Duration::from_secs(60));
    assert_eq!(harness.circuit(), CircuitState::HalfOpen);
    assert_eq!(
        series(&harness.metrics_text(), r#"securemail_circuit_state{provider="gmail"}"#),
        "1"
    );
    let (rcpt, data) = harness.transaction(&["a@one.gmail.test", "b@two.gmail.test"]).await;
    assert_eq!(rcpt, ["250 2.1.5 recipient OK", "250 2.1.5 recipient OK"]);
    assert_eq!(receiver.messages(), 11, "exactly one probe");
    let mut data = data;
    data.sort();
    assert!(data[0].starts_with("421 4.7.28 "), "{data:?}");
    assert!(data[1].starts_with("451 4.7.1 deliveries to gmail "), "{data:?}");
    assert_eq!(harness.circuit(), CircuitState::Open);
    let (rcpt, _) = harness.transaction(&["a@clinic.gmail.test"]).await;
    assert!(rcpt[0].ends_with("retry after 2026-01-01T00:02:00Z"), "{rcpt:?}");

    // One minute is no longer enough; two are. A 250 to the probe closes the breaker.
    receiver.set(ALL_ACCEPTED);
    harness.clock.advance(Duration::from_secs(60));
    assert_eq!(harness.circuit(), CircuitState::Open);
    harness.clock.advance(Duration::from_secs(60));
    let (rcpt, data) = harness.transaction(&["a@clinic.gmail.test"]).await;
    assert_eq!(rcpt, ["250 2.1.5 recipient OK"]);
    assert!(
        data[0].starts_with("250 2.0.0 delivered to gmail-smtp-in.l.google.com"),
        "{data:?}"
    );
    assert_eq!(receiver.messages(), 12);
    assert_eq!(harness.circuit(), CircuitState::Closed);
    let text = harness.metrics_text();
    assert_eq!(series(&text, r#"securemail_circuit_state{provider="gmail"}"#), "0");
    assert_eq!(
        series(&text, r#"securemail_circuit_opens_total{provider="gmail"}"#),
        "2"
    );
    let status = reputation::status(&harness.metrics, &harness.breakers);
    assert_eq!(status.circuits[&Provider::Gmail].pause_seconds, 60);
    assert_eq!(status.replies[&Provider::Gmail].rate_limited, 9);
    let (rcpt, _) = harness
        .transaction(&["a@clinic.gmail.test", "b@clinic.gmail.test"])
        .await;
    assert_eq!(rcpt, ["250 2.1.5 recipient OK", "250 2.1.5 recipient OK"]);
}
