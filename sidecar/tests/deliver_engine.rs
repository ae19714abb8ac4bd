//! The delivery engine end to end on loopback: Postfix's side spoken over LMTP into the real LMTP server, the
//! engine delivering over real TLS (rustls, rcgen certificates) to small in-test SMTP receivers that record every
//! byte they get. The TLS policy is a fixed in-test `PolicyLookup`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a panic is the failure report"
)]

mod common;

use std::collections::HashMap;
use std::io::BufReader as StdBufReader;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::digest;
use prometheus_client::registry::Registry;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use securemail_api::sidecar_config::WarmupCaps;
use securemail_api::tenant::{OnFailure, ProviderShares, TlsVersion};
use securemail_sidecar::deliver::{Engine, EngineConfig, WallClock};
use securemail_sidecar::evidence::{self, DomainName, EvidenceStore, EvidenceWriter, PolicySource};
use securemail_sidecar::lmtp::{Limits, serve_session};
use securemail_sidecar::metrics::Metrics;
use securemail_sidecar::policy::{DomainPolicy, LookupStage, MxCandidate, PeerAuth, PolicyError, PolicyLookup, Tlsa};
use securemail_sidecar::provider::{Provider, ProviderSuffix};
use securemail_sidecar::tls::TlsConfigs;
use securemail_sidecar::warmup::WarmupLimiter;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

const MESSAGE: &str = "From: Records <records@example.org>\r\nTo: patient@example.net\r\nSubject: Results\r\n\
    Message-ID: <m1@example.org>\r\n\r\nLine one\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n";

// ---------------------------------------------------------------------------------------------------------------
// Certificates

struct Pki {
    ca: CertificateDer<'static>,
    ca_issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

struct ServerCert {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
    spki: Vec<u8>,
}

impl Pki {
    fn new() -> Self {
        Self::named("SecureMail test CA")
    }

    fn named(common_name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        let ca = params.self_signed(&key).unwrap().der().clone();
        Self {
            ca,
            ca_issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn leaf(&self, name: &str) -> ServerCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &self.ca_issuer)
            .unwrap();
        ServerCert {
            chain: vec![cert.der().clone(), self.ca.clone()],
            key: key.serialize_der(),
            spki: rcgen::PublicKeyData::subject_public_key_info(&key),
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        roots
    }
}

fn self_signed(name: &str) -> ServerCert {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    ServerCert {
        chain: vec![cert.der().clone()],
        key: key.serialize_der(),
        spki: rcgen::PublicKeyData::subject_public_key_info(&key),
    }
}

fn server_config(cert: &ServerCert) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            cert.chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key.clone())),
        )
        .unwrap();
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------------------------------
// The receiving MX

#[derive(Clone)]
struct Behaviour {
    /// `None`: STARTTLS is not offered.
    tls: Option<Arc<rustls::ServerConfig>>,
    starttls_reply: &'static str,
    /// PIPELINING is announced.
    pipelining: bool,
    /// What MAIL gets: one reply, or more to misbehave.
    mail_reply: &'static str,
    /// The reply to a RCPT command line.
    rcpt: fn(&str) -> &'static str,
    /// What DATA gets; only a 354 starts the message.
    data_go_ahead: &'static str,
    /// The reply after the message; empty: hang up instead.
    data_reply: &'static str,
    /// Written 50 ms after the reply to a message, while the session is idle; a 421 is followed by the close.
    idle_noise: Option<&'static str>,
    /// Extra EHLO keywords, each line ending in CRLF, e.g. "250-REQUIRETLS\r\n".
    extensions: &'static str,
    /// Close the connection silently after this many messages, as a server ending an idle session does.
    messages_per_connection: Option<usize>,
}

impl Behaviour {
    fn tls(config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            tls: Some(config),
            starttls_reply: "220 2.0.0 ready\r\n",
            pipelining: true,
            mail_reply: "250 2.1.0 ok\r\n",
            rcpt: |_| "250 2.1.5 ok\r\n",
            data_go_ahead: "354 go ahead\r\n",
            data_reply: "250 2.0.0 Ok: queued as ABC123\r\n",
            idle_noise: None,
            extensions: "",
            messages_per_connection: None,
        }
    }

    fn plain() -> Self {
        Self {
            tls: None,
            ..Self::tls(server_config(&self_signed("mx.test")))
        }
    }
}

#[derive(Default)]
struct Log {
    connections: usize,
    /// Every command line, cleartext and TLS phase alike.
    commands: Vec<String>,
    /// Every byte received before TLS.
    cleartext: Vec<u8>,
    /// Message content as received: after DATA still dot-stuffed, terminator excluded; after BDAT the chunks.
    messages: Vec<Vec<u8>>,
}

struct Receiver {
    port: u16,
    log: Arc<Mutex<Log>>,
}

impl Receiver {
    async fn start(behaviour: Behaviour) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), behaviour).await
    }

    async fn start_on(address: SocketAddr, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind(address).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Log::default()));
        let shared = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, behaviour.clone(), Arc::clone(&shared)));
            }
        });
        Self { port, log }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap()
    }
}

async fn serve(stream: tokio::net::TcpStream, behaviour: Behaviour, log: Arc<Mutex<Log>>) {
    log.lock().unwrap().connections += 1;
    let mut plain = BufReader::new(stream);
    plain.write_all(b"220 mx.test ESMTP test\r\n").await.unwrap();
    if !commands(&mut plain, &behaviour, &log, true).await {
        return;
    }
    let Some(config) = behaviour.tls.clone() else { return };
    let Ok(tls) = TlsAcceptor::from(config).accept(plain.into_inner()).await else {
        return;
    };
    commands(&mut BufReader::new(tls), &behaviour, &log, false).await;
}

/// Answers commands until QUIT or EOF; `true` when the client asked for STARTTLS and got it. Like Postfix, replies
/// to a pipelined group go out together, once no more of the group's input is buffered.
async fn commands<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    behaviour: &Behaviour,
    log: &Mutex<Log>,
    cleartext: bool,
) -> bool {
    let mut pending = Vec::new();
    let mut messages = 0;
    let mut accepted_recipients = 0;
    let mut chunks = Vec::new();
    loop {
        let mut line = Vec::new();
        if stream.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
            return false;
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        {
            let mut log = log.lock().unwrap();
            if cleartext {
                log.cleartext.extend_from_slice(&line);
            }
            log.commands.push(text.clone());
        }
        let upper = text.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            let starttls = if cleartext && behaviour.tls.is_some() {
                "250-STARTTLS\r\n"
            } else {
                ""
            };
            let pipelining = if behaviour.pipelining { "250-PIPELINING\r\n" } else { "" };
            format!(
                "250-mx.test\r\n{pipelining}250-8BITMIME\r\n{starttls}{}250 SIZE 10000000\r\n",
                behaviour.extensions
            )
        } else if upper == "STARTTLS" && cleartext && behaviour.tls.is_some() {
            return send_out(stream, &mut pending, behaviour.starttls_reply).await;
        } else if upper.starts_with("MAIL FROM:") {
            accepted_recipients = 0;
            behaviour.mail_reply.to_owned()
        } else if upper.starts_with("RCPT TO:") {
            let reply = (behaviour.rcpt)(&text);
            accepted_recipients += usize::from(reply.starts_with('2'));
            reply.to_owned()
        } else if let Some(arguments) = upper.strip_prefix("BDAT ") {
            // RFC 3030: the chunk is read whatever the answer.
            let mut words = arguments.split_ascii_whitespace();
            let size: usize = words.next().and_then(|n| n.parse().ok()).unwrap();
            let last = words.next() == Some("LAST");
            let mut chunk = vec![0; size];
            if stream.read_exact(&mut chunk).await.is_err() {
                return false;
            }
            if accepted_recipients == 0 {
                chunks.clear();
                "554 5.5.1 no valid recipients\r\n".to_owned()
            } else if !last {
                chunks.extend_from_slice(&chunk);
                "250 2.0.0 chunk ok\r\n".to_owned()
            } else {
                chunks.extend_from_slice(&chunk);
                log.lock().unwrap().messages.push(std::mem::take(&mut chunks));
                if !answer_message(stream, &mut pending, behaviour).await {
                    return false;
                }
                continue;
            }
        } else if upper == "DATA" {
            if !send_out(stream, &mut pending, behaviour.data_go_ahead).await {
                return false;
            }
            if !behaviour.data_go_ahead.starts_with("354") {
                continue;
            }
            let mut message = Vec::new();
            loop {
                let mut data_line = Vec::new();
                if stream.read_until(b'\n', &mut data_line).await.unwrap_or(0) == 0 {
                    return false;
                }
                if data_line == b".\r\n" {
                    break;
                }
                message.extend_from_slice(&data_line);
            }
            log.lock().unwrap().messages.push(message);
            messages += 1;
            if behaviour.messages_per_connection == Some(messages) {
                send_out(stream, &mut pending, behaviour.data_reply).await;
                return false;
            }
            if !answer_message(stream, &mut pending, behaviour).await {
                return false;
            }
            continue;
        } else if upper == "RSET" {
            accepted_recipients = 0;
            chunks.clear();
            "250 2.0.0 ok\r\n".to_owned()
        } else if upper == "QUIT" {
            send_out(stream, &mut pending, "221 2.0.0 bye\r\n").await;
            return false;
        } else {
            "502 5.5.2 unknown\r\n".to_owned()
        };
        pending.extend_from_slice(reply.as_bytes());
        if stream.buffer().is_empty() && !send_out(stream, &mut pending, "").await {
            return false;
        }
    }
}

/// Writes the replies held back and `more`; `false` when the client is gone.
async fn send_out<S: AsyncWrite + Unpin>(stream: &mut S, pending: &mut Vec<u8>, more: &str) -> bool {
    pending.extend_from_slice(more.as_bytes());
    let written = stream.write_all(pending).await.is_ok() && stream.flush().await.is_ok();
    pending.clear();
    written
}

/// The reply to a received message, then any idle noise; `false` when the connection is to end.
async fn answer_message<S: AsyncWrite + Unpin>(stream: &mut S, pending: &mut Vec<u8>, behaviour: &Behaviour) -> bool {
    if behaviour.data_reply.is_empty() {
        return false;
    }
    if !send_out(stream, pending, behaviour.data_reply).await {
        return false;
    }
    let Some(noise) = behaviour.idle_noise else {
        return true;
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let written = stream.write_all(noise.as_bytes()).await.is_ok() && stream.flush().await.is_ok();
    written && !noise.starts_with("421")
}

// ---------------------------------------------------------------------------------------------------------------
// Policy, engine, and Postfix's side

struct FixedPolicy {
    policy: Result<DomainPolicy, PolicyError>,
    addresses: HashMap<String, Vec<IpAddr>>,
}

impl PolicyLookup for FixedPolicy {
    async fn resolve(&self, _domain: &str) -> Result<Arc<DomainPolicy>, PolicyError> {
        self.policy.clone().map(Arc::new)
    }

    async fn addresses(&self, mx: &MxCandidate) -> Result<Vec<IpAddr>, PolicyError> {
        let host = String::from(mx.host.clone());
        self.addresses.get(&host).cloned().ok_or(PolicyError::Temporary {
            stage: LookupStage::Mx,
            reason: format!("no address for {host}"),
        })
    }
}

fn mx(host: &str, auth: PeerAuth) -> MxCandidate {
    MxCandidate {
        host: DomainName::new(host).unwrap(),
        preference: 10,
        auth,
        source: PolicySource::Tenant,
        policy_id: None,
    }
}

fn policy(mx: Vec<MxCandidate>, on_failure: OnFailure) -> FixedPolicy {
    let addresses = mx
        .iter()
        .map(|candidate| {
            let host = String::from(candidate.host.clone());
            let address = if host.starts_with("down.") {
                "127.0.0.2"
            } else {
                "127.0.0.1"
            };
            (host, vec![address.parse().unwrap()])
        })
        .collect();
    FixedPolicy {
        policy: Ok(DomainPolicy {
            mx,
            min_version: TlsVersion::Tls12,
            on_failure,
            allow_cleartext: false,
        }),
        addresses,
    }
}

struct Harness {
    engine: Arc<Engine<FixedPolicy>>,
    registry: Registry,
    /// A warm address's limiter (no caps), keeping the day's counts as in production.
    day_counts: Arc<WarmupLimiter>,
    /// The engine's wall clock: the day's counts are read on it.
    clock: Arc<NoonClock>,
    dir: tempfile::TempDir,
}

/// Noon UTC of the day the case starts, then ticking: the UTC day the engine counts in cannot change under a case,
/// whatever the time of day it runs.
#[derive(Debug)]
struct NoonClock {
    noon: jiff::Timestamp,
    started: std::time::Instant,
}

impl NoonClock {
    fn new() -> Self {
        let noon = jiff::Timestamp::now()
            .to_zoned(jiff::tz::TimeZone::UTC)
            .date()
            .at(12, 0, 0, 0)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp();
        Self {
            noon,
            started: std::time::Instant::now(),
        }
    }
}

impl WallClock for NoonClock {
    fn now(&self) -> jiff::Timestamp {
        self.noon
            .checked_add(jiff::SignedDuration::try_from(self.started.elapsed()).unwrap())
            .unwrap()
    }
}

fn harness(policy: FixedPolicy, roots: RootCertStore, port: u16) -> Harness {
    harness_classing(policy, roots, port, Vec::new())
}

/// The same, with the tenant's MX host suffixes per provider.
fn harness_classing(
    policy: FixedPolicy,
    roots: RootCertStore,
    port: u16,
    provider_suffixes: Vec<ProviderSuffix>,
) -> Harness {
    harness_for_pool(policy, roots, port, provider_suffixes, &[])
}

/// The same, for a tenant whose pool has `other_addresses` besides this pod's 127.0.0.1.
fn harness_for_pool(
    policy: FixedPolicy,
    roots: RootCertStore,
    port: u16,
    provider_suffixes: Vec<ProviderSuffix>,
    other_addresses: &[&str],
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let keys = common::signing_keys(dir.path());
    let clock = Arc::new(NoonClock::new());
    let session = common::session(port);
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry, "clinic-a/outbound", session.source, clock.clone());
    let mut config = EngineConfig {
        provider_suffixes,
        ..EngineConfig::new("clinic-a/outbound".parse().unwrap(), session, OnFailure::Defer)
    };
    config
        .pool_addresses
        .extend(other_addresses.iter().map(|address| address.parse::<IpAddr>().unwrap()));
    let evidence =
        EvidenceWriter::spawn(EvidenceStore::open(&dir.path().join("evidence"), clock.now()).unwrap()).unwrap();
    let warm = WarmupCaps {
        day: None,
        daily_limit: None,
        provider_shares: ProviderShares::default(),
    };
    let day_counts = Arc::new(WarmupLimiter::load(dir.path(), warm, clock.now(), &Default::default()).unwrap());
    let engine = Engine::new(
        config,
        policy,
        Arc::new(keys),
        Arc::new(TlsConfigs::with_roots(roots)),
        evidence,
        metrics,
        clock.clone(),
    )
    .with_warmup(Arc::clone(&day_counts));
    Harness {
        engine: Arc::new(engine),
        registry,
        day_counts,
        clock,
        dir,
    }
}

impl Harness {
    /// Postfix's side of one LMTP transaction; returns one reply line per recipient.
    async fn send(&self, recipients: &[&str], message: &str) -> Vec<String> {
        self.send_with(recipients, message, "").await
    }

    /// The same with `mail_params` (e.g. " REQUIRETLS") after the MAIL FROM path.
    async fn send_with(&self, recipients: &[&str], message: &str, mail_params: &str) -> Vec<String> {
        let (client, server) = tokio::io::duplex(1 << 20);
        let engine = Arc::clone(&self.engine);
        let served = tokio::spawn(async move {
            serve_session(server, &*engine, &Limits::default(), &CancellationToken::new()).await
        });
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let mut commands = format!("LHLO postfix.test\r\nMAIL FROM:<records@example.org>{mail_params}\r\n");
        for recipient in recipients {
            commands.push_str(&format!("RCPT TO:<{recipient}>\r\n"));
        }
        commands.push_str("DATA\r\n");
        to_server.write_all(commands.as_bytes()).await.unwrap();
        let mut output = String::new();
        read_until(&mut from_server, &mut output, |out| out.contains("\r\n354 ")).await;
        let mut stuffed = String::new();
        for line in message.split_inclusive("\r\n") {
            if line.starts_with('.') {
                stuffed.push('.');
            }
            stuffed.push_str(line);
        }
        stuffed.push_str(".\r\n");
        to_server.write_all(stuffed.as_bytes()).await.unwrap();
        let after_354 = |out: &str| {
            let rest = &out[out.find("\r\n354 ").unwrap() + 2..];
            rest.split_terminator("\r\n")
                .skip(1)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        read_until(&mut from_server, &mut output, |out| {
            after_354(out).len() >= recipients.len()
        })
        .await;
        to_server.write_all(b"QUIT\r\n").await.unwrap();
        drop(to_server);
        let _ = tokio::time::timeout(Duration::from_secs(30), served).await;
        after_354(&output)
    }

    /// The metrics as `/metrics` serves them.
    fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    /// The one evidence file the harness writes.
    fn evidence_file(&self) -> std::path::PathBuf {
        let files = evidence::log_files(&self.dir.path().join("evidence")).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        files[0].clone()
    }

    fn evidence(&self) -> (evidence::VerifySummary, Vec<serde_json::Value>) {
        let path = self.evidence_file();
        let summary = evidence::verify(StdBufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
        let records = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        (summary, records)
    }
}

async fn read_until(from: &mut (impl tokio::io::AsyncRead + Unpin), output: &mut String, done: impl Fn(&str) -> bool) {
    let read = async {
        while !done(output) {
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

fn sha256(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, data).as_ref().to_vec()
}

fn webpki_policy(host: &str) -> FixedPolicy {
    policy(vec![mx(host, PeerAuth::WebPki)], OnFailure::Defer)
}

// ---------------------------------------------------------------------------------------------------------------
// Tests

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// What a receiver saw, cleartext and TLS phase, without the STARTTLS prelude.
fn commands_after_tls(log: &Log) -> Vec<String> {
    log.commands.iter().skip(2).cloned().collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn webpki_delivery_sends_the_signed_dot_stuffed_message_over_tls_and_records_evidence() {
    let pki = Pki::new();
    let cert = pki.leaf("mx.test");
    let receiver = Receiver::start(Behaviour::tls(server_config(&cert))).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let replies = harness.send(&["patient@example.net"], MESSAGE).await;

    assert_eq!(replies.len(), 1);
    assert!(replies[0].starts_with("250 2.0.0 delivered to mx.test"), "{replies:?}");
    assert!(replies[0].contains("queued as ABC123"), "{replies:?}");
    let log = receiver.log();
    // Nothing but EHLO and STARTTLS in cleartext.
    assert_eq!(
        String::from_utf8_lossy(&log.cleartext),
        "EHLO mta-0.sender.test\r\nSTARTTLS\r\n"
    );
    let after_tls = commands_after_tls(&log);
    assert_eq!(after_tls[0], "EHLO mta-0.sender.test");
    assert!(
        after_tls[1].starts_with("MAIL FROM:<records@example.org> SIZE="),
        "{after_tls:?}"
    );
    assert_eq!(after_tls[2..4], ["RCPT TO:<patient@example.net>", "DATA"]);

    // Signed, and stuffed exactly once: the receiver's copy unstuffed is the original after the signature.
    let received = String::from_utf8(log.messages[0].clone()).unwrap();
    assert!(
        received.starts_with("DKIM-Signature: v=1; a=ed25519-sha256;"),
        "{received}"
    );
    let body_start = received.find("From: Records").unwrap();
    assert_eq!(
        &received[body_start..],
        "From: Records <records@example.org>\r\nTo: patient@example.net\r\nSubject: Results\r\n\
         Message-ID: <m1@example.org>\r\n\r\nLine one\r\n..leading dot\r\n...two dots\r\n..\r\nend\r\n"
    );

    let (summary, records) = harness.evidence();
    assert_eq!(summary.records, 1);
    let record = &records[0];
    assert_eq!(record["outcome"], "delivered");
    assert_eq!(record["recipientDomain"], "example.net");
    assert_eq!(record["recipientCount"], 1);
    assert_eq!(record["mxHost"], "mx.test");
    assert_eq!(record["mxIp"], "127.0.0.1");
    assert_eq!(record["sourceIp"], "127.0.0.1");
    assert_eq!(record["policy"]["source"], "tenant");
    assert_eq!(record["tls"]["verification"], "webpki");
    assert_eq!(record["tls"]["version"], "1.3");
    assert_eq!(record["smtpReply"]["code"], 250);
    assert_eq!(record["messageIdSha256"], hex(&sha256(b"<m1@example.org>")));
    assert_eq!(record["tls"]["peerChainSha256"][0], hex(&sha256(&cert.chain[0])));
    assert_eq!(record["tls"]["peerChainSha256"][1], hex(&sha256(&pki.ca)));
    assert!(!serde_json::to_string(&records).unwrap().contains("patient"));

    let (today, _) = harness.day_counts.results(harness.clock.now());
    assert_eq!(today.providers[&Provider::Other].delivered, 1);
}

#[tokio::test]
async fn without_starttls_nothing_of_the_message_is_sent_and_on_failure_decides() {
    for (on_failure, expected) in [
        (
            OnFailure::Defer,
            "450 4.7.5 mx.test offers no STARTTLS; secure delivery required",
        ),
        (
            OnFailure::Bounce,
            "550 5.7.10 mx.test offers no STARTTLS; secure delivery required",
        ),
    ] {
        let receiver = Receiver::start(Behaviour::plain()).await;
        let harness = harness(
            policy(vec![mx("mx.test", PeerAuth::WebPki)], on_failure),
            RootCertStore::empty(),
            receiver.port,
        );

        let replies = harness
            .send(&["patient@example.net", "nurse@example.net"], MESSAGE)
            .await;

        assert_eq!(replies, [expected, expected]);
        let log = receiver.log();
        assert_eq!(log.commands, ["EHLO mta-0.sender.test"]);
        assert!(log.messages.is_empty());
        let (_, records) = harness.evidence();
        assert_eq!(records.len(), 1);
        assert!(records[0]["tls"].is_null());
        assert_eq!(records[0]["recipientCount"], 2);
        let outcome = if on_failure == OnFailure::Defer {
            "deferred"
        } else {
            "bounced"
        };
        assert_eq!(records[0]["outcome"], outcome);
    }
}

#[tokio::test]
async fn webpki_refuses_a_certificate_for_another_name() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour::tls(server_config(&pki.leaf("other.test")))).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let replies = harness.send(&["patient@example.net"], MESSAGE).await;

    assert_eq!(
        replies,
        ["450 4.7.5 certificate of mx.test failed verification (WebPKI: name mismatch); secure delivery required"]
    );
    let log = receiver.log();
    assert!(
        !log.commands.iter().any(|c| c.starts_with("MAIL")),
        "{:?}",
        log.commands
    );
    assert!(log.messages.is_empty());
}

#[tokio::test]
async fn webpki_refuses_an_untrusted_issuer() {
    let receiver = Receiver::start(Behaviour::tls(server_config(&Pki::new().leaf("mx.test")))).await;
    let harness = harness(
        webpki_policy("mx.test"),
        Pki::named("Another CA").roots(),
        receiver.port,
    );

    let replies = harness.send(&["patient@example.net"], MESSAGE).await;

    assert_eq!(
        replies,
        ["450 4.7.5 certificate of mx.test failed verification (WebPKI: unknown issuer); secure delivery required"]
    );
    assert!(receiver.log().messages.is_empty());
}

#[tokio::test]
async fn any_certificate_mode_delivers_to_a_self_signed_server() {
    let receiver = Receiver::start(Behaviour::tls(server_config(&self_signed("whatever.invalid")))).await;
    let harness = harness(
        policy(vec![mx("mx.test", PeerAuth::AnyCertificate)], OnFailure::Defer),
        RootCertStore::empty(),
        receiver.port,
    );

    let replies = harness.send(&["patient@example.net"], MESSAGE).await;

    assert!(replies[0].starts_with("250 2.0.0 delivered to mx.test"), "{replies:?}");
    let (_, records) = harness.evidence();
    assert_eq!(records[0]["tls"]["verification"], "unverified-encrypted");
}

#[tokio::test]
async fn dane_ee_delivers_on_a_matching_key_and_refuses_a_mismatch() {
    let cert = self_signed("unrelated.invalid");
    let receiver = Receiver::start(Behaviour::tls(server_config(&cert))).await;
    let dane = |data: Vec<u8>| PeerAuth::Dane {
        tlsa: vec![Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data,
        }],
        reference_names: vec!["mx.test".into()],
    };

    let matching = harness(
        policy(vec![mx("mx.test", dane(sha256(&cert.spki)))], OnFailure::Defer),
        RootCertStore::empty(),
        receiver.port,
    );
    let replies = matching.send(&["patient@example.net"], MESSAGE).await;
    assert!(replies[0].starts_with("250 2.0.0 delivered to mx.test"), "{replies:?}");
    let (_, records) = matching.evidence();
    assert_eq!(records[0]["tls"]["verification"], "dane-ee");

    let other_key = self_signed("mx.test");
    let mismatched = harness(
        policy(vec![mx("mx.test", dane(sha256(&other_key.spki)))], OnFailure::Bounce),
        RootCertStore::empty(),
        receiver.port,
    );
    let replies = mismatched.send(&["patient@example.net"], MESSAGE).await;
    assert_eq!(
        replies,
        [
            "550 5.7.10 certificate of mx.test failed verification (DANE: no TLSA record matches the presented \
             certificates); secure delivery required"
        ]
    );
    assert_eq!(receiver.log().messages.len(), 1, "only the matching engine delivered");
}

#[tokio::test]
async fn bytes_injected_after_the_starttls_reply_are_discarded() {
    let pki = Pki::new();
    let behaviour = Behaviour {
        starttls_reply: "220 2.0.0 ready\r\n250 injected\r\n",
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    };
    let receiver = Receiver::start(behaviour).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let replies = harness.send(&["patient@example.net"], MESSAGE).await;

    let log = receiver.log();
    if replies[0].starts_with("250 ") {
        // In step: every command after TLS got its own reply, and the message arrived once.
        assert_eq!(log.messages.len(), 1);
        let after_tls = commands_after_tls(&log);
        assert_eq!(after_tls[0], "EHLO mta-0.sender.test");
        assert_eq!(after_tls[2..4], ["RCPT TO:<patient@example.net>", "DATA"]);
    } else {
        // The injected bytes reached the TLS layer instead: refused, and nothing was sent.
        assert!(replies[0].starts_with("450 4.7.5 "), "{replies:?}");
        assert!(log.messages.is_empty());
    }
}

#[tokio::test]
async fn remote_replies_are_passed_on_per_recipient_with_addresses_redacted() {
    let pki = Pki::new();
    let behaviour = Behaviour {
        rcpt: |line| {
            if line.contains("<later@") {
                "451 4.2.0 <later@example.net> try again later\r\n"
            } else if line.contains("<gone@") {
                "550 5.1.1 <gone@example.net>: Recipient address rejected: User unknown\r\n"
            } else {
                "250 2.1.5 ok\r\n"
            }
        },
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    };
    let receiver = Receiver::start(behaviour).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let replies = harness
        .send(
            &["later@example.net", "patient@example.net", "gone@example.net"],
            MESSAGE,
        )
        .await;

    assert_eq!(replies[0], "451 4.2.0 mx.test said: [redacted] try again later");
    assert!(replies[1].starts_with("250 2.0.0 delivered to mx.test"), "{replies:?}");
    assert_eq!(
        replies[2],
        "550 5.1.1 mx.test said: [redacted] Recipient address rejected: User unknown"
    );
    // One transaction, pipelined: all three RCPTs, one DATA.
    let log = receiver.log();
    assert_eq!(log.messages.len(), 1);
    assert_eq!(log.commands.iter().filter(|c| c.starts_with("RCPT")).count(), 3);
    let (today, _) = harness.day_counts.results(harness.clock.now());
    let counts = today.providers[&Provider::Other];
    assert_eq!((counts.delivered, counts.deferred, counts.bounced), (1, 1, 1));
}

#[tokio::test]
async fn a_data_refusal_applies_to_every_accepted_recipient() {
    let pki = Pki::new();
    let behaviour = Behaviour {
        data_reply: "554 5.7.1 message refused\r\n",
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    };
    let receiver = Receiver::start(behaviour).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let replies = harness.send(&["a@example.net", "b@example.net"], MESSAGE).await;

    assert_eq!(replies, ["554 5.7.1 mx.test said: message refused"; 2]);
    let (_, records) = harness.evidence();
    assert_eq!(records[0]["outcome"], "bounced");
    assert_eq!(records[0]["smtpReply"]["enhancedStatus"], "5.7.1");
}

/// What a receiver saw from the RCPT of `unknown@` (which [`refuses_unknown`] refuses) on.
fn commands_from_refused_rcpt(log: &Log) -> Vec<&str> {
    log.commands
        .iter()
        .map(String::as_str)
        .skip_while(|c| !c.starts_with("RCPT TO:<unknown@"))
        .collect()
}

/// A receiver that offers CHUNKING (RFC 3030) besides PIPELINING, answering RCPT with `rcpt`.
fn chunking(cert: &ServerCert, rcpt: fn(&str) -> &'static str) -> Behaviour {
    Behaviour {
        extensions: "250-CHUNKING\r\n",
        rcpt,
        ..Behaviour::tls(server_config(cert))
    }
}

fn refuses_unknown(line: &str) -> &'static str {
    if line.contains("unknown@") {
        "550 5.1.1 no such user\r\n"
    } else {
        "250 2.1.5 ok\r\n"
    }
}

#[tokio::test]
async fn a_chunking_mx_gets_the_signed_message_unstuffed_in_one_bdat_after_the_envelope() {
    let pki = Pki::new();
    let receiver = Receiver::start(chunking(&pki.leaf("mx.test"), refuses_unknown)).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let replies = harness
        .send(&["patient@example.net", "unknown@example.net"], MESSAGE)
        .await;

    assert!(replies[0].starts_with("250 2.0.0 delivered to mx.test"), "{replies:?}");
    assert!(replies[1].starts_with("550 5.1.1 "), "{replies:?}");
    let log = receiver.log();
    let received = String::from_utf8(log.messages[0].clone()).unwrap();
    let after_tls = commands_after_tls(&log);
    assert!(
        after_tls[1].starts_with("MAIL FROM:<records@example.org> SIZE="),
        "{after_tls:?}"
    );
    assert_eq!(
        after_tls[2..4],
        ["RCPT TO:<patient@example.net>", "RCPT TO:<unknown@example.net>"]
    );
    // The count covers the signature and the message exactly, with no dot-stuffing and no terminator.
    assert_eq!(after_tls[4], format!("BDAT {} LAST", received.len()));
    assert!(
        after_tls[1].ends_with(&format!("SIZE={}", received.len())),
        "{after_tls:?}"
    );
    assert!(
        received.starts_with("DKIM-Signature: v=1; a=ed25519-sha256;"),
        "{received}"
    );
    assert!(received.ends_with(MESSAGE), "{received}");
    assert_eq!(harness.evidence().1[0]["outcome"], "delivered");
}

#[tokio::test]
async fn a_chunking_mx_that_refuses_every_recipient_sends_nothing_on_and_the_next_transaction_resets() {
    let pki = Pki::new();
    let receiver = Receiver::start(chunking(&pki.leaf("mx.test"), refuses_unknown)).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let refused = harness.send(&["unknown@example.net"], MESSAGE).await;
    let accepted = harness.send(&["nurse@example.net"], MESSAGE).await;

    assert_eq!(refused, ["550 5.1.1 mx.test said: no such user"], "{refused:?}");
    assert!(accepted[0].starts_with("250 "), "{accepted:?}");
    let log = receiver.log();
    assert_eq!(log.connections, 1);
    assert_eq!(log.messages.len(), 1, "only the accepted message was kept");
    let commands = commands_from_refused_rcpt(&log);
    assert!(
        commands[1].starts_with("BDAT ") && commands[2] == "RSET",
        "{commands:?}"
    );
    assert!(commands[3].starts_with("MAIL FROM:"), "{commands:?}");
}

#[tokio::test]
async fn a_large_message_to_a_chunking_mx_waits_for_the_envelope_replies() {
    let pki = Pki::new();
    let receiver = Receiver::start(chunking(&pki.leaf("mx.test"), refuses_unknown)).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);
    let large = format!(
        "{MESSAGE}{}",
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-\r\n".repeat(5000)
    );

    let refused = harness.send(&["unknown@example.net"], &large).await;
    let accepted = harness.send(&["nurse@example.net"], &large).await;

    assert!(refused[0].starts_with("550 "), "{refused:?}");
    assert!(accepted[0].starts_with("250 "), "{accepted:?}");
    let log = receiver.log();
    let bdat: Vec<&String> = log.commands.iter().filter(|c| c.starts_with("BDAT ")).collect();
    // Nothing of the message went to the transaction without a recipient.
    assert_eq!(bdat.len(), 1, "{bdat:?}");
    assert!(log.messages[0].ends_with(large.as_bytes()));
}

#[tokio::test]
async fn the_next_mx_is_tried_when_the_first_is_down() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour::tls(server_config(&pki.leaf("mx2.test")))).await;
    // down.test resolves to 127.0.0.2, where nothing listens on the receiver's port.
    let harness = harness(
        policy(
            vec![mx("down.test", PeerAuth::WebPki), mx("mx2.test", PeerAuth::WebPki)],
            OnFailure::Defer,
        ),
        pki.roots(),
        receiver.port,
    );

    let replies = harness.send(&["patient@example.net"], MESSAGE).await;

    assert!(replies[0].starts_with("250 2.0.0 delivered to mx2.test"), "{replies:?}");
    let (summary, records) = harness.evidence();
    assert_eq!(summary.records, 2);
    assert_eq!(
        (&records[0]["mxHost"], &records[0]["mxIp"], &records[0]["outcome"]),
        (&"down.test".into(), &serde_json::Value::Null, &"deferred".into())
    );
    assert_eq!(
        (&records[1]["mxHost"], &records[1]["outcome"]),
        (&"mx2.test".into(), &"delivered".into())
    );
}

#[tokio::test]
async fn all_mx_down_is_a_temporary_failure() {
    let harness = harness(
        policy(vec![mx("down.test", PeerAuth::WebPki)], OnFailure::Bounce),
        RootCertStore::empty(),
        // Nothing listens on port 9 of 127.0.0.2.
        9,
    );

    let replies = harness.send(&["patient@example.net"], MESSAGE).await;

    assert!(
        replies[0].starts_with("451 4.4.1 down.test: cannot connect to 127.0.0.2:9"),
        "{replies:?}"
    );
}

#[tokio::test]
async fn policy_errors_map_to_their_reply_classes() {
    for (error, expected) in [
        (
            PolicyError::Temporary {
                stage: LookupStage::Mx,
                reason: "DNS SERVFAIL".into(),
            },
            "451 4.4.3 TLS policy of example.net cannot be determined now: DNS SERVFAIL",
        ),
        (
            PolicyError::NoSecurePath {
                reason: "DANE required, none published".into(),
            },
            "450 4.7.5 example.net: DANE required, none published",
        ),
        (
            PolicyError::Permanent {
                reason: "null MX".into(),
            },
            "550 5.1.2 example.net does not accept mail: null MX",
        ),
    ] {
        let fixed = FixedPolicy {
            policy: Err(error),
            addresses: HashMap::new(),
        };
        let harness = harness(fixed, RootCertStore::empty(), 9);
        let replies = harness.send(&["patient@example.net"], MESSAGE).await;
        assert_eq!(replies, [expected]);
        let (_, records) = harness.evidence();
        assert!(records[0]["mxHost"].is_null() && records[0]["policy"].is_null());
    }
}

#[tokio::test]
async fn a_header_from_the_tenant_may_not_send_as_bounces_at_once_recorded_and_counted() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour::tls(server_config(&pki.leaf("mx.test")))).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);
    let from = "From: Records <records@example.org>";
    for (header_from, expected, reason) in [
        (
            "From: Billing <billing@Unsigned.example> (via the portal)",
            "550 5.7.1 header From domain unsigned.example is not one of this tenant's sending domains; the message \
             was not sent",
            "not_tenant_domain",
        ),
        (
            "From: records@example.org, billing@example.org",
            "550 5.7.1 From: names 2 mailboxes; the signing domain must be unambiguous; the message was not sent",
            "several_mailboxes",
        ),
        (
            "From: records@example.org\r\nFrom: billing@example.org",
            "550 5.7.1 message has 2 From: headers; exactly one is allowed; the message was not sent",
            "repeated",
        ),
        (
            "X-No-From: records@example.org",
            "550 5.7.1 message has no From: header; the message was not sent",
            "missing",
        ),
        (
            "From: undisclosed-senders:;",
            "550 5.7.1 From: header cannot be parsed: group syntax; the message was not sent",
            "unparsable",
        ),
    ] {
        let message = MESSAGE.replace(from, header_from);
        let replies = harness
            .send(
                &["patient@example.net", "nurse@example.net", "gp@example.com"],
                &message,
            )
            .await;
        assert_eq!(replies, [expected; 3], "{header_from}");
        let metrics = harness.metrics();
        let counted = format!(
            "securemail_header_from_refusals_total{{tenant=\"clinic-a/outbound\",source_ip=\"127.0.0.1\",\
             reason=\"{reason}\"}} 1\n"
        );
        assert!(metrics.contains(&counted), "{counted} missing from\n{metrics}");
    }
    assert_eq!(receiver.log().connections, 0, "nothing was sent");

    // One record per message and recipient domain, saying why and that nothing was sent; no bounced recipients
    // counted against the address, which no provider saw.
    let (summary, records) = harness.evidence();
    assert_eq!(summary.records, 10);
    let first: Vec<(&str, u64, &str)> = records[..2]
        .iter()
        .map(|record| {
            assert_eq!(record["outcome"], "bounced", "{record}");
            for absent in ["mxHost", "mxIp", "policy", "tls", "smtpReply"] {
                assert!(record[absent].is_null(), "{absent}: {record}");
            }
            (
                record["recipientDomain"].as_str().unwrap(),
                record["recipientCount"].as_u64().unwrap(),
                record["refusal"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        first,
        [
            ("example.com", 1, "header-from-not-tenant-domain"),
            ("example.net", 2, "header-from-not-tenant-domain")
        ]
    );
    let refusals: Vec<&str> = records
        .iter()
        .map(|record| record["refusal"].as_str().unwrap())
        .collect();
    for refusal in [
        "header-from-several-mailboxes",
        "header-from-repeated",
        "header-from-missing",
        "header-from-unparsable",
    ] {
        assert_eq!(refusals.iter().filter(|r| **r == refusal).count(), 2, "{refusals:?}");
    }
    assert!(
        !harness.metrics().contains("result=\"bounced\""),
        "{}",
        harness.metrics()
    );
}

#[tokio::test]
async fn a_message_that_cannot_be_signed_for_another_reason_is_deferred_and_never_sent() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour::tls(server_config(&pki.leaf("mx.test")))).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);
    // A header line that is not a header field: the message cannot be signed as it is, but the From is fine.
    let malformed = MESSAGE.replace("Subject: Results", "Subject: Results\r\nnot a header field");

    let replies = harness.send(&["patient@example.net"], &malformed).await;

    assert_eq!(
        replies,
        [
            "451 4.7.0 DKIM signing failed: message header section has a line that is not a header field; the message \
          was not sent"
        ]
    );
    assert_eq!(receiver.log().connections, 0);
    assert!(!harness.metrics().contains("securemail_header_from_refusals_total{tenant=\"clinic-a/outbound\",source_ip=\"127.0.0.1\",reason=\"not_tenant_domain\"} 1"));
}

#[tokio::test]
async fn a_second_message_to_the_same_mx_reuses_the_verified_session() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour::tls(server_config(&pki.leaf("mx.test")))).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let first = harness.send(&["patient@example.net"], MESSAGE).await;
    let second = harness.send(&["nurse@example.net"], MESSAGE).await;

    assert!(
        first[0].starts_with("250 ") && second[0].starts_with("250 "),
        "{first:?} {second:?}"
    );
    let log = receiver.log();
    assert_eq!(log.connections, 1);
    assert_eq!(log.messages.len(), 2);
    // A finished transaction leaves the session ready: no RSET, the next MAIL goes in the same write as RCPT
    // and DATA.
    assert_eq!(log.commands.iter().filter(|c| *c == "RSET").count(), 0);
    assert_eq!(log.commands.iter().filter(|c| c.starts_with("STARTTLS")).count(), 1);
    let (summary, records) = harness.evidence();
    assert_eq!(summary.records, 2);
    assert_eq!(records[0]["tls"], records[1]["tls"]);
}

#[tokio::test]
async fn a_warming_address_counts_in_the_evidence_record_which_a_restart_recounts() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour::tls(server_config(&pki.leaf("mx.test")))).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);
    let warming = WarmupCaps {
        day: Some(1),
        daily_limit: Some(1_000_000),
        provider_shares: ProviderShares::default(),
    };
    harness.day_counts.set_caps(warming.clone());

    let first = harness
        .send(&["patient@example.net", "nurse@example.net"], MESSAGE)
        .await;
    let second = harness.send(&["ward@example.net"], MESSAGE).await;
    assert!(
        first.iter().chain(&second).all(|reply| reply.starts_with("250 ")),
        "{first:?} {second:?}"
    );
    let (_, records) = harness.evidence();
    let counted: Vec<_> = records.iter().map(|record| record["warmup"].clone()).collect();
    assert_eq!(
        counted,
        [
            serde_json::json!({"provider": "other", "recipients": 2}),
            serde_json::json!({"provider": "other", "recipients": 1})
        ]
    );

    // A pod whose counters file missed the last writes: the records alone give the day's count back.
    let restarted = tempfile::tempdir().unwrap();
    std::fs::copy(
        harness.evidence_file(),
        restarted.path().join("evidence-20261126T000000.000000000Z.jsonl"),
    )
    .unwrap();
    let now = harness.clock.now();
    let day_start = now
        .to_zoned(jiff::tz::TimeZone::UTC)
        .start_of_day()
        .unwrap()
        .timestamp();
    let recount = evidence::warmup_counts(restarted.path(), day_start).unwrap();
    let limiter = WarmupLimiter::load(restarted.path(), warming, now, &recount.counts).unwrap();
    assert_eq!(limiter.sent_today(now), [(Provider::Other, 3)].into());
}

#[tokio::test]
async fn a_session_the_server_closed_while_idle_is_replaced_and_the_message_still_goes() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour {
        messages_per_connection: Some(1),
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    })
    .await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let first = harness.send(&["patient@example.net"], MESSAGE).await;
    // Let the close arrive, so the idle session is known-dead only when it is written to.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = harness.send(&["nurse@example.net"], MESSAGE).await;

    assert!(
        first[0].starts_with("250 ") && second[0].starts_with("250 "),
        "{first:?} {second:?}"
    );
    let log = receiver.log();
    assert_eq!((log.connections, log.messages.len()), (2, 2));
    let (summary, _) = harness.evidence();
    assert_eq!(
        summary.records, 2,
        "one attempt per message: the dead session is not an attempt"
    );
}

#[tokio::test]
async fn the_tenants_suffixes_class_an_mx_before_the_built_in_table() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour::tls(server_config(&pki.leaf("mx.test")))).await;
    let suffixes = vec![ProviderSuffix {
        suffix: "mx.test".into(),
        provider: Provider::Microsoft,
    }];
    let harness = harness_classing(webpki_policy("mx.test"), pki.roots(), receiver.port, suffixes);

    let replies = harness.send(&["patient@example.net"], MESSAGE).await;

    assert!(replies[0].starts_with("250 "), "{replies:?}");
    let (today, _) = harness.day_counts.results(harness.clock.now());
    assert_eq!(today.providers[&Provider::Microsoft].delivered, 1);
    assert_eq!(today.providers[&Provider::Other].delivered, 0);
}

#[tokio::test]
async fn a_421_at_rcpt_defers_with_the_remote_text_and_the_session_is_not_reused() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour {
        rcpt: |_| "421 4.7.28 unusual rate of unsolicited mail\r\n",
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    })
    .await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let first = harness
        .send(&["patient@example.net", "nurse@example.net"], MESSAGE)
        .await;
    let second = harness.send(&["patient@example.net"], MESSAGE).await;

    // Both recipients get the closing reply, though the server answered only the first before it closed.
    assert_eq!(first.len(), 2);
    for reply in first.iter().chain(&second) {
        assert!(
            reply.starts_with("421 4.7.28") && reply.contains("unusual rate"),
            "{reply}"
        );
    }
    let log = receiver.log();
    assert_eq!(log.connections, 2, "a session the server closed with 421 is not reused");
    assert!(log.messages.is_empty(), "no message content was sent");
}

#[tokio::test]
async fn after_refused_recipients_the_next_transaction_starts_with_rset() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour {
        rcpt: refuses_unknown,
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    })
    .await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let refused = harness.send(&["unknown@example.net"], MESSAGE).await;
    let accepted = harness.send(&["nurse@example.net"], MESSAGE).await;

    assert!(refused[0].starts_with("550 "), "{refused:?}");
    assert!(accepted[0].starts_with("250 "), "{accepted:?}");
    let log = receiver.log();
    // This receiver answers DATA with 354 even without a recipient: the client ends that data at once, empty.
    assert_eq!(log.connections, 1);
    assert!(log.messages[0].is_empty() && !log.messages[1].is_empty());
    let commands = commands_from_refused_rcpt(&log);
    assert_eq!(commands[1..3], ["DATA", "RSET"][..], "{commands:?}");
    assert!(commands[3].starts_with("MAIL FROM:"), "{commands:?}");
}

#[tokio::test]
async fn domains_are_delivered_separately() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour::tls(server_config(&pki.leaf("mx.test")))).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let replies = harness
        .send(&["a@example.net", "b@example.com", "c@example.net"], MESSAGE)
        .await;

    assert!(replies.iter().all(|reply| reply.starts_with("250 ")), "{replies:?}");
    let (_, records) = harness.evidence();
    let mut domains: Vec<(String, u64)> = records
        .iter()
        .map(|r| {
            (
                r["recipientDomain"].as_str().unwrap().to_owned(),
                r["recipientCount"].as_u64().unwrap(),
            )
        })
        .collect();
    domains.sort();
    assert_eq!(domains, [("example.com".to_owned(), 1), ("example.net".to_owned(), 2)]);
    assert_eq!(receiver.log().messages.len(), 2);
}

#[tokio::test]
async fn dane_ta_delivers_when_the_leaf_chains_to_the_published_anchor_and_names_the_mx() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour::tls(server_config(&pki.leaf("mx.test")))).await;
    let dane = |reference: &str| PeerAuth::Dane {
        tlsa: vec![Tlsa {
            usage: 2,
            selector: 0,
            matching: 1,
            data: sha256(&pki.ca),
        }],
        reference_names: vec![reference.into()],
    };

    let good = harness(
        policy(vec![mx("mx.test", dane("mx.test"))], OnFailure::Defer),
        RootCertStore::empty(),
        receiver.port,
    );
    let replies = good.send(&["patient@example.net"], MESSAGE).await;
    assert!(replies[0].starts_with("250 2.0.0 delivered to mx.test"), "{replies:?}");
    assert_eq!(good.evidence().1[0]["tls"]["verification"], "dane-ta");

    let wrong_name = harness(
        policy(vec![mx("mx.test", dane("mx.elsewhere.test"))], OnFailure::Defer),
        RootCertStore::empty(),
        receiver.port,
    );
    let replies = wrong_name.send(&["patient@example.net"], MESSAGE).await;
    assert_eq!(
        replies,
        [
            "450 4.7.5 certificate of mx.test failed verification (DANE-TA: the certificate is not valid for the \
             MX host name); secure delivery required"
        ]
    );
}

#[tokio::test]
async fn a_tls_1_3_minimum_refuses_a_tls_1_2_only_server() {
    let pki = Pki::new();
    let cert = pki.leaf("mx.test");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls12_only = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            cert.chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key.clone())),
        )
        .unwrap();
    let receiver = Receiver::start(Behaviour::tls(Arc::new(tls12_only))).await;

    let mut strict = webpki_policy("mx.test");
    if let Ok(policy) = &mut strict.policy {
        policy.min_version = TlsVersion::Tls13;
    }
    let harness_13 = harness(strict, pki.roots(), receiver.port);
    let replies = harness_13.send(&["patient@example.net"], MESSAGE).await;
    assert!(
        replies[0].starts_with("450 4.7.5 TLS handshake failed: "),
        "{replies:?}"
    );
    assert!(
        replies[0].ends_with(" with mx.test; secure delivery required"),
        "{replies:?}"
    );

    let harness_12 = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);
    let replies = harness_12.send(&["patient@example.net"], MESSAGE).await;
    assert!(replies[0].starts_with("250 "), "{replies:?}");
    assert_eq!(harness_12.evidence().1[0]["tls"]["version"], "1.2");
    assert_eq!(receiver.log().messages.len(), 1);
}

#[tokio::test]
async fn an_approved_cleartext_override_delivers_without_starttls_and_says_so_in_evidence() {
    let receiver = Receiver::start(Behaviour::plain()).await;
    let mut open = policy(vec![mx("mx.test", PeerAuth::WebPki)], OnFailure::Defer);
    if let Ok(policy) = &mut open.policy {
        policy.allow_cleartext = true;
    }
    let harness = harness(open, RootCertStore::empty(), receiver.port);

    let replies = harness.send(&["patient@example.net"], MESSAGE).await;

    assert!(replies[0].starts_with("250 "), "{replies:?}");
    let (_, records) = harness.evidence();
    assert!(records[0]["tls"].is_null());
    assert_eq!(records[0]["outcome"], "delivered");
}

#[tokio::test]
async fn requiretls_goes_only_to_a_verified_mx_that_offers_it() {
    let ca = Pki::new();
    let offering = Behaviour {
        extensions: "250-REQUIRETLS\r\n",
        ..Behaviour::tls(server_config(&ca.leaf("mx.test")))
    };
    let receiver = Receiver::start(offering).await;
    let first = harness(webpki_policy("mx.test"), ca.roots(), receiver.port);
    let replies = first.send_with(&["patient@example.net"], MESSAGE, " REQUIRETLS").await;
    assert!(replies[0].starts_with("250 "), "{replies:?}");
    let mail = commands_after_tls(&receiver.log())
        .into_iter()
        .find(|command| command.starts_with("MAIL FROM:"))
        .unwrap();
    assert!(mail.ends_with(" REQUIRETLS"), "{mail}");

    // A verified MX that does not offer REQUIRETLS: RFC 8689's 5.7.30, and no transaction is started.
    let silent = Receiver::start(Behaviour::tls(server_config(&ca.leaf("mx.test")))).await;
    let second = harness(webpki_policy("mx.test"), ca.roots(), silent.port);
    let replies = second.send_with(&["patient@example.net"], MESSAGE, " REQUIRETLS").await;
    assert!(replies[0].starts_with("554 5.7.30 "), "{replies:?}");
    assert!(
        !silent
            .log()
            .commands
            .iter()
            .any(|command| command.starts_with("MAIL FROM:"))
    );

    // An MX that offers it, but whose certificate the tenant's `encrypted` mode does not verify.
    let unverified = Receiver::start(Behaviour {
        extensions: "250-REQUIRETLS\r\n",
        ..Behaviour::tls(server_config(&self_signed("whatever.invalid")))
    })
    .await;
    let third = harness(
        policy(vec![mx("mx.test", PeerAuth::AnyCertificate)], OnFailure::Defer),
        RootCertStore::empty(),
        unverified.port,
    );
    let replies = third.send_with(&["patient@example.net"], MESSAGE, " REQUIRETLS").await;
    assert!(replies[0].starts_with("554 5.7.30 "), "{replies:?}");
    assert!(
        !unverified
            .log()
            .commands
            .iter()
            .any(|command| command.starts_with("MAIL FROM:"))
    );
}

#[tokio::test]
async fn temporary_policy_failures_are_counted_by_the_stage_that_failed() {
    for (stage, label) in [
        (LookupStage::Mx, "mx"),
        (LookupStage::Dane, "dane"),
        (LookupStage::MtaSts, "mta_sts"),
    ] {
        let fixed = FixedPolicy {
            policy: Err(PolicyError::Temporary {
                stage,
                reason: "SERVFAIL".into(),
            }),
            addresses: HashMap::new(),
        };
        let harness = harness(fixed, RootCertStore::empty(), 9);
        harness.send(&["patient@example.net"], MESSAGE).await;
        let metrics = harness.metrics();
        let series = |stage: &str| {
            format!(
                "securemail_policy_temporary_failures_total{{tenant=\"clinic-a/outbound\",source_ip=\"127.0.0.1\",stage=\"{stage}\"}} 1\n"
            )
        };
        assert!(metrics.contains(&series(label)), "{metrics}");
        let failed_stages = metrics
            .lines()
            .filter(|line| line.starts_with("securemail_policy_temporary_failures_total{") && !line.ends_with(" 0"))
            .count();
        assert_eq!(failed_stages, 1, "{metrics}");
        assert!(metrics.contains("result=\"temporary\"} 1\n"), "{metrics}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Spam-complaint intake: ARF reports to the reserved feedback address

const FEEDBACK_ADDRESS: &str = "feedback@feedback.securemail.invalid";
/// This tenant's other pool address, which sent the complained-about message.
const OTHER_POOL_ADDRESS: &str = "192.0.2.11";

/// An ARF report (RFC 5965) as a feedback-loop processor forwards it, about mail to `patient@example.net`.
fn arf_report(feedback_type: &str, source_ip: &str) -> String {
    format!(
        "From: FBL processor <fbl@example.org>\r\nTo: {FEEDBACK_ADDRESS}\r\nSubject: Abuse report\r\n\
         Message-ID: <arf-1@example.org>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=feedback-report; boundary=\"arf\"\r\n\r\n\
         --arf\r\nContent-Type: text/plain\r\n\r\nA recipient reported this message as spam.\r\n\r\n\
         --arf\r\nContent-Type: message/feedback-report\r\n\r\n\
         Feedback-Type: {feedback_type}\r\nUser-Agent: ExampleFBL/1.0\r\nVersion: 1\r\n\
         Original-Rcpt-To: <patient@example.net>\r\nSource-IP: {source_ip}\r\nReported-Domain: example.org\r\n\r\n\
         --arf\r\nContent-Type: message/rfc822\r\n\r\n\
         From: Records <records@example.org>\r\nTo: patient@example.net\r\nSubject: Results\r\n\
         Message-ID: <m1@example.org>\r\n\r\nLine one\r\n.leading dot\r\n\r\n--arf--\r\n"
    )
}

/// A tenant whose pool also holds 192.0.2.11 and whose MX `mx.test` is classed as yahoo.
async fn feedback_harness() -> (Receiver, Harness) {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour::tls(server_config(&pki.leaf("mx.test")))).await;
    let suffixes = vec![ProviderSuffix {
        suffix: "mx.test".into(),
        provider: Provider::Yahoo,
    }];
    let harness = harness_for_pool(
        webpki_policy("mx.test"),
        pki.roots(),
        receiver.port,
        suffixes,
        &[OTHER_POOL_ADDRESS],
    );
    (receiver, harness)
}

fn complaints(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|line| line.starts_with("securemail_complaints_total{") && !line.ends_with(" 0"))
        .collect()
}

#[tokio::test]
async fn a_complaint_report_is_counted_for_the_pool_address_it_names_and_never_sent_or_recorded() {
    let (receiver, harness) = feedback_harness().await;

    let replies = harness
        .send(&[FEEDBACK_ADDRESS], &arf_report("abuse", OTHER_POOL_ADDRESS))
        .await;
    assert_eq!(replies, ["250 2.0.0 complaint counted against 192.0.2.11"]);
    let replies = harness
        .send(&[FEEDBACK_ADDRESS], &arf_report("fraud", OTHER_POOL_ADDRESS))
        .await;
    assert_eq!(replies, ["250 2.0.0 complaint counted against 192.0.2.11"]);

    // The provider is the complaining recipient's, by its domain's MX (mx.test, classed yahoo).
    let metrics = harness.metrics();
    assert_eq!(
        complaints(&metrics),
        [r#"securemail_complaints_total{tenant="clinic-a/outbound",source_ip="192.0.2.11",provider="yahoo"} 2"#]
    );
    assert!(
        !metrics.contains("patient") && !metrics.contains("example.net"),
        "{metrics}"
    );
    assert_eq!(
        receiver.log().connections,
        0,
        "nothing is sent for the feedback address"
    );
    let (summary, _) = harness.evidence();
    assert_eq!(summary.records, 0, "an intake is not a delivery attempt");
    assert!(!metrics.contains("securemail_recipients_total{"), "{metrics}");
    // Every pool address's series exist before their first complaint, so increase() sees that one too.
    assert!(
        metrics.contains(
            r#"securemail_complaints_total{tenant="clinic-a/outbound",source_ip="127.0.0.1",provider="gmail"} 0"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn reports_the_intake_cannot_use_are_refused_naming_the_fault_and_other_feedback_is_ignored() {
    let (receiver, harness) = feedback_harness().await;
    let not_a_report = "From: records@example.org\r\nSubject: spam complaint\r\n\r\nPlease count this.\r\n";

    let mut replies = Vec::new();
    for message in [
        not_a_report.to_owned(),
        arf_report("abuse", "203.0.113.9"),
        arf_report("abuse", "mta-0.notify.example.org"),
        arf_report("not-spam", OTHER_POOL_ADDRESS),
    ] {
        replies.extend(harness.send(&[FEEDBACK_ADDRESS], &message).await);
    }

    assert_eq!(
        replies,
        [
            "550 5.6.0 not a usable ARF feedback report: Content-Type is absent (text/plain), expected \
             multipart/report; report-type=feedback-report (send the report itself, not a message that forwards \
             it as an attachment)",
            "550 5.6.0 feedback report refused: Source-IP 203.0.113.9 is not a pool address of tenant \
             clinic-a/outbound",
            "550 5.6.0 not a usable ARF feedback report: Source-IP \"mta-0.notify.example.org\" is not an IP address",
            "250 2.0.0 feedback report accepted; Feedback-Type not-spam is not counted as a complaint",
        ]
    );
    assert!(complaints(&harness.metrics()).is_empty(), "{}", harness.metrics());
    assert_eq!(receiver.log().connections, 0);
    assert_eq!(harness.evidence().0.records, 0);
}

#[tokio::test]
async fn a_transaction_with_the_feedback_address_and_a_mailbox_answers_each_on_its_own() {
    let (receiver, harness) = feedback_harness().await;

    let replies = harness
        .send(
            &["abuse-desk@example.net", FEEDBACK_ADDRESS],
            &arf_report("abuse", "127.0.0.1"),
        )
        .await;

    assert!(replies[0].starts_with("250 2.0.0 delivered to mx.test"), "{replies:?}");
    assert_eq!(replies[1], "250 2.0.0 complaint counted against 127.0.0.1");
    let log = receiver.log();
    assert_eq!(log.messages.len(), 1);
    assert!(
        commands_after_tls(&log)
            .iter()
            .all(|command| !command.contains("securemail.invalid")),
        "{:?}",
        log.commands
    );
    let (summary, records) = harness.evidence();
    assert_eq!(summary.records, 1);
    assert_eq!(records[0]["recipientDomain"], "example.net");
    assert_eq!(records[0]["recipientCount"], 1);
    assert_eq!(
        complaints(&harness.metrics()),
        [r#"securemail_complaints_total{tenant="clinic-a/outbound",source_ip="127.0.0.1",provider="yahoo"} 1"#]
    );
}

#[tokio::test]
async fn other_addresses_at_the_feedback_domain_are_refused_at_rcpt() {
    let (receiver, harness) = feedback_harness().await;
    let (client, server) = tokio::io::duplex(1 << 16);
    let engine = Arc::clone(&harness.engine);
    tokio::spawn(async move { serve_session(server, &*engine, &Limits::default(), &CancellationToken::new()).await });
    let (mut from_server, mut to_server) = tokio::io::split(client);
    to_server
        .write_all(
            b"LHLO postfix.test\r\nMAIL FROM:<records@example.org>\r\nRCPT TO:<fedback@feedback.securemail.invalid>\r\n\
              RCPT TO:<FeedBack@feedback.securemail.invalid>\r\nQUIT\r\n",
        )
        .await
        .unwrap();
    let mut output = String::new();
    read_until(&mut from_server, &mut output, |out| out.contains("\r\n221 ")).await;

    assert!(
        output.contains(
            "\r\n550 5.1.1 no such address in the reserved feedback domain; complaint reports go to \
             feedback@feedback.securemail.invalid\r\n250 2.1.5 recipient OK\r\n"
        ),
        "{output}"
    );
    assert_eq!(receiver.log().connections, 0);
}

// ---------------------------------------------------------------------------------------------------------------
// A remote MX that breaks the reply sequence

/// One message to a receiver behaving as `behaviour`: the answer and the evidence record.
async fn one_message(behaviour: Behaviour, pki: &Pki) -> (Vec<String>, serde_json::Value, Receiver, Harness) {
    let receiver = Receiver::start(behaviour).await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);
    let replies = harness.send(&["patient@example.net"], MESSAGE).await;
    let (_, records) = harness.evidence();
    (replies, records[0].clone(), receiver, harness)
}

#[tokio::test]
async fn surplus_replies_that_would_make_a_refused_recipient_look_accepted_defer_and_drop_the_session() {
    let pki = Pki::new();
    // Two replies too many to MAIL: read by position, the RCPT's 550 and the BDAT's 554 would become 250s.
    let behaviour = Behaviour {
        mail_reply: "250 2.1.0 ok\r\n250 2.1.0 ok\r\n250 2.1.0 ok\r\n",
        ..chunking(&pki.leaf("mx.test"), |_| "550 5.1.1 no such user\r\n")
    };
    let (replies, record, receiver, harness) = one_message(behaviour, &pki).await;

    assert_eq!(replies.len(), 1);
    assert!(
        replies[0].starts_with("451 4.4.1 mx.test: protocol error at end of transaction: surplus reply"),
        "{replies:?}"
    );
    assert_eq!(record["outcome"], "deferred");
    assert_eq!(record["protocolError"], "surplus-reply");
    assert!(record["smtpReply"].is_null(), "{record}");
    // The dropped session is not reused.
    let next = harness.send(&["nurse@example.net"], MESSAGE).await;
    assert!(next[0].starts_with("451 "), "{next:?}");
    assert_eq!(receiver.log().connections, 2);
}

#[tokio::test]
async fn a_surplus_reply_after_the_message_defers_it_and_the_next_message_gets_a_fresh_session() {
    let pki = Pki::new();
    for pipelining in [true, false] {
        let behaviour = Behaviour {
            pipelining,
            data_reply: "250 2.0.0 Ok: queued as ABC123\r\n550 5.7.1 second thoughts\r\n",
            ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
        };
        let (replies, record, receiver, harness) = one_message(behaviour, &pki).await;

        assert!(replies[0].starts_with("451 "), "pipelining {pipelining}: {replies:?}");
        assert_eq!(record["outcome"], "deferred");
        assert_eq!(record["protocolError"], "surplus-reply");
        assert!(record["smtpReply"].is_null(), "{record}");
        harness.send(&["nurse@example.net"], MESSAGE).await;
        assert_eq!(receiver.log().connections, 2, "pipelining {pipelining}");
    }
}

#[tokio::test]
async fn a_surplus_reply_in_lock_step_is_caught_before_the_next_command() {
    let pki = Pki::new();
    // Without PIPELINING the extra 250 would answer the RCPT, which the server refuses.
    let behaviour = Behaviour {
        pipelining: false,
        mail_reply: "250 2.1.0 ok\r\n250 2.1.5 ok\r\n",
        rcpt: |_| "550 5.1.1 no such user\r\n",
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    };
    let (replies, record, receiver, _harness) = one_message(behaviour, &pki).await;

    assert!(
        replies[0].starts_with("451 4.4.1 mx.test: protocol error at MAIL: surplus reply"),
        "{replies:?}"
    );
    assert_eq!(record["protocolError"], "surplus-reply");
    let log = receiver.log();
    assert!(
        !log.commands.iter().any(|c| c.starts_with("RCPT")),
        "{:?}",
        log.commands
    );
    assert!(log.messages.is_empty());
}

#[tokio::test]
async fn a_2xx_to_data_is_never_read_as_the_message_accepted() {
    let pki = Pki::new();
    let behaviour = Behaviour {
        data_go_ahead: "250 2.0.0 ok\r\n",
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    };
    let (replies, record, receiver, _harness) = one_message(behaviour, &pki).await;

    assert!(
        replies[0].starts_with("451 4.4.1 mx.test: protocol error at DATA: a reply the command cannot have"),
        "{replies:?}"
    );
    assert_eq!(record["protocolError"], "unexpected-reply");
    assert!(record["smtpReply"].is_null(), "{record}");
    assert!(receiver.log().messages.is_empty());
}

#[tokio::test]
async fn a_connection_closed_after_the_message_defers_with_no_deciding_reply() {
    let pki = Pki::new();
    for behaviour in [
        Behaviour {
            data_reply: "",
            ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
        },
        Behaviour {
            data_reply: "",
            ..chunking(&pki.leaf("mx.test"), |_| "250 2.1.5 ok\r\n")
        },
    ] {
        let (replies, record, receiver, _harness) = one_message(behaviour, &pki).await;

        assert!(replies[0].starts_with("451 "), "{replies:?}");
        assert_eq!(receiver.log().messages.len(), 1, "the message went");
        assert_eq!(record["outcome"], "deferred");
        // Neither the 354 nor the RCPT's 250 decided anything.
        assert!(record["smtpReply"].is_null(), "{record}");
        assert!(record["protocolError"].is_null(), "{record}");
    }
}

#[tokio::test]
async fn the_deciding_reply_is_recorded_not_the_last_one_read() {
    let pki = Pki::new();
    // Every recipient refused: the pipelined DATA still gets its 554, which decided nothing.
    let behaviour = Behaviour {
        rcpt: |_| "550 5.1.1 no such user\r\n",
        data_go_ahead: "554 5.5.1 no valid recipients\r\n",
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    };
    let (replies, record, _receiver, _harness) = one_message(behaviour, &pki).await;

    assert_eq!(replies, ["550 5.1.1 mx.test said: no such user"]);
    assert_eq!(record["smtpReply"]["code"], 550);
    assert_eq!(record["smtpReply"]["enhancedStatus"], "5.1.1");
}

#[tokio::test]
async fn bytes_sent_on_an_idle_session_fail_the_transaction_that_would_reuse_it() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour {
        idle_noise: Some("250 2.0.0 Ok: queued as LATE\r\n"),
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    })
    .await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let first = harness.send(&["patient@example.net"], MESSAGE).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = harness.send(&["nurse@example.net"], MESSAGE).await;
    let third = harness.send(&["ward@example.net"], MESSAGE).await;

    assert!(first[0].starts_with("250 "), "{first:?}");
    assert!(
        second[0].starts_with("451 4.4.1 mx.test: protocol error at idle session: unsolicited bytes"),
        "{second:?}"
    );
    assert!(third[0].starts_with("250 "), "{third:?}");
    let log = receiver.log();
    assert_eq!(
        (log.connections, log.messages.len()),
        (2, 2),
        "nothing of the second went on the noisy session"
    );
    let (_, records) = harness.evidence();
    assert_eq!(records[1]["outcome"], "deferred");
    assert_eq!(records[1]["protocolError"], "unsolicited-while-idle");
    assert!(records[1]["smtpReply"].is_null());
}

#[tokio::test]
async fn a_421_on_an_idle_session_is_a_close_not_a_protocol_error() {
    let pki = Pki::new();
    let receiver = Receiver::start(Behaviour {
        idle_noise: Some("421 4.4.2 mx.test idle timeout\r\n"),
        ..Behaviour::tls(server_config(&pki.leaf("mx.test")))
    })
    .await;
    let harness = harness(webpki_policy("mx.test"), pki.roots(), receiver.port);

    let first = harness.send(&["patient@example.net"], MESSAGE).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = harness.send(&["nurse@example.net"], MESSAGE).await;

    assert!(
        first[0].starts_with("250 ") && second[0].starts_with("250 "),
        "{first:?} {second:?}"
    );
    assert_eq!(receiver.log().connections, 2);
    let (summary, records) = harness.evidence();
    assert_eq!(summary.records, 2);
    assert!(records[1]["protocolError"].is_null());
}
