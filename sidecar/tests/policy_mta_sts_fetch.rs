//! The MTA-STS HTTPS fetcher against a real TLS server on 127.0.0.1 with an rcgen-made CA: policy fetched, and
//! refused for redirects, oversize bodies, wrong Content-Type, untrusted certificates and hanging servers; a
//! failed refresh keeps the cached policy.
#![allow(clippy::unwrap_used, reason = "tests: a panic is the failure report")]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use securemail_sidecar::policy::Tlsa;
use securemail_sidecar::policy::clock::ManualClock;
use securemail_sidecar::policy::dns::{Answer, DnsFailure, DnsLookup, Found, MxRecord, Security};
use securemail_sidecar::policy::mta_sts::cache::StsCache;
use securemail_sidecar::policy::mta_sts::fetch::{HttpsFetcher, MAX_POLICY_BYTES};
use securemail_sidecar::policy::mta_sts::{Mode, MtaSts, StsFact, StsFetch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const POLICY: &str = "version: STSv1\r\nmode: enforce\r\nmx: *.good.example\r\nmax_age: 86400\r\n";

/// What the test server answers, by the domain in the SNI name `mta-sts.<domain>`.
fn response_for(domain: &str) -> Option<Vec<u8>> {
    let ok = |content_type: &str, body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    match domain {
        "good.example" => Some(ok("text/plain; charset=utf-8", POLICY)),
        "redirect.example" => Some(
            b"HTTP/1.1 301 Moved\r\nLocation: https://mta-sts.good.example/.well-known/mta-sts.txt\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
        ),
        "html.example" => Some(ok("text/html", POLICY)),
        "big.example" => Some(ok("text/plain", &"x".repeat(MAX_POLICY_BYTES + 1))),
        // No Content-Length: the size limit must hold while streaming.
        "stream.example" => {
            let mut response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n".to_vec();
            response.extend(std::iter::repeat_n(b'y', 200 * 1024));
            Some(response)
        }
        _ => None, // hang
    }
}

fn names() -> Vec<String> {
    ["good", "redirect", "html", "big", "stream", "hang"]
        .iter()
        .map(|d| format!("mta-sts.{d}.example"))
        .collect()
}

/// Starts the server; returns its port and the CA certificate that signed its leaf.
async fn server(leaf_names: Vec<String>) -> (u16, CertificateDer<'static>) {
    server_with(leaf_names, Arc::new(AtomicBool::new(false))).await
}

/// As [`server`]; while `broken` is set every request gets a 500.
async fn server_with(leaf_names: Vec<String>, broken: Arc<AtomicBool>) -> (u16, CertificateDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(leaf_names)
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            let broken = broken.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("").to_owned();
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let domain = sni.strip_prefix("mta-sts.").unwrap_or("");
                let response = if broken.load(Ordering::SeqCst) {
                    Some(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec())
                } else {
                    response_for(domain)
                };
                match response {
                    Some(response) => {
                        let _ = tls.write_all(&response).await;
                        let _ = tls.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(60)).await,
                }
            });
        }
    });
    (port, ca_cert.der().clone())
}

/// Every name resolves to the test server.
struct Loopback;

impl Resolve for Loopback {
    fn resolve(&self, _name: Name) -> Resolving {
        Box::pin(async {
            let addrs: Addrs = Box::new(std::iter::once(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)));
            Ok(addrs)
        })
    }
}

fn fetcher(port: u16, ca: &CertificateDer<'static>) -> HttpsFetcher {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    HttpsFetcher::new(Arc::new(Loopback), roots, port).unwrap()
}

#[tokio::test]
async fn fetches_a_policy_and_refuses_what_rfc_8461_refuses() {
    let (port, ca) = server(names()).await;
    let fetcher = fetcher(port, &ca);
    assert_eq!(fetcher.fetch("good.example").await.unwrap(), POLICY);

    let cases = [
        ("redirect.example", "redirects are not followed"),
        ("html.example", "expected text/plain"),
        ("big.example", "larger than 65536 bytes"),
        ("stream.example", "larger than 65536 bytes"),
    ];
    for (domain, expected) in cases {
        let error = fetcher.fetch(domain).await.unwrap_err();
        assert_eq!(error.domain, domain);
        assert!(error.to_string().contains(expected), "{domain}: {error}");
    }
}

#[tokio::test]
async fn refuses_a_certificate_for_another_name_or_from_an_unknown_ca() {
    let (port, ca) = server(vec!["mta-sts.other.example".to_owned()]).await;
    let error = fetcher(port, &ca).fetch("good.example").await.unwrap_err();
    assert!(error.to_string().to_lowercase().contains("certificate"), "{error}");

    let (port, _) = server(names()).await;
    let (_, unrelated_ca) = server(names()).await;
    let error = fetcher(port, &unrelated_ca).fetch("good.example").await.unwrap_err();
    assert!(error.to_string().to_lowercase().contains("certificate"), "{error}");
}

#[tokio::test]
async fn a_hanging_server_times_out() {
    let (port, ca) = server(names()).await;
    let started = Instant::now();
    let error = fetcher(port, &ca).fetch("hang.example").await.unwrap_err();
    assert!(
        error.to_string().contains("timed out") || error.to_string().contains("timeout"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up only after {:?}",
        started.elapsed()
    );
}

/// TXT records per name, switchable during the test.
#[derive(Default)]
struct TxtOnly {
    txt: Mutex<HashMap<String, String>>,
}

impl DnsLookup for TxtOnly {
    async fn mx(&self, _domain: &str) -> Result<Answer<MxRecord>, DnsFailure> {
        unreachable!("MtaSts asks for TXT only")
    }
    async fn tlsa(&self, _host: &str) -> Result<Answer<Tlsa>, DnsFailure> {
        unreachable!("MtaSts asks for TXT only")
    }
    async fn txt(&self, name: &str) -> Result<Answer<String>, DnsFailure> {
        let record = self.txt.lock().unwrap().get(name).cloned();
        Ok(Answer {
            found: record.map_or(Found::NxDomain, |r| Found::Records(vec![r])),
            security: Security::Insecure,
            ttl: 300,
        })
    }
    async fn addresses(&self, _host: &str) -> Result<Answer<IpAddr>, DnsFailure> {
        unreachable!("MtaSts asks for TXT only")
    }
}

#[tokio::test]
async fn failed_refresh_keeps_the_cached_unexpired_policy() {
    let broken = Arc::new(AtomicBool::new(false));
    let (port, ca) = server_with(names(), broken.clone()).await;
    let dns = TxtOnly::default();
    let clock = Arc::new(ManualClock::new());
    let sts = MtaSts::new(fetcher(port, &ca), clock.clone());
    let set_id = |id: &str| {
        dns.txt
            .lock()
            .unwrap()
            .insert("_mta-sts.good.example".into(), format!("v=STSv1; id={id};"))
    };
    set_id("first");
    let fact = sts.lookup(&dns, "good.example").await;
    assert!(
        matches!(&fact, StsFact::Policy { id, stale_refresh: None, .. } if id == "first"),
        "{fact:?}"
    );

    // The id changes but the server now answers 500: the cached, unexpired policy stays in force.
    set_id("second");
    broken.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(3600));
    let fact = sts.lookup(&dns, "good.example").await;
    let StsFact::Policy { id, stale_refresh, .. } = &fact else {
        panic!("cached policy expected: {fact:?}")
    };
    assert_eq!(id, "first");
    assert!(stale_refresh.as_deref().is_some_and(|r| r.contains("500")), "{fact:?}");

    // Past max_age nothing is left to fall back on.
    clock.advance(Duration::from_secs(86_400));
    let fact = sts.lookup(&dns, "good.example").await;
    assert!(
        matches!(&fact, StsFact::Failed(reason) if reason.contains("500")),
        "{fact:?}"
    );

    // Repaired: the new id is fetched.
    broken.store(false, Ordering::SeqCst);
    let fact = sts.lookup(&dns, "good.example").await;
    assert!(
        matches!(&fact, StsFact::Policy { id, stale_refresh: None, .. } if id == "second"),
        "{fact:?}"
    );
}

#[tokio::test]
async fn a_restart_during_an_https_outage_keeps_the_unexpired_enforce_policy_from_the_state_volume() {
    let state = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let dns = TxtOnly::default();
    dns.txt
        .lock()
        .unwrap()
        .insert("_mta-sts.good.example".into(), "v=STSv1; id=first;".into());
    let (port, ca) = server(names()).await;
    {
        let cache = Arc::new(StsCache::persistent(state.path(), clock.clone()));
        let sts = MtaSts::with_cache(fetcher(port, &ca), cache);
        let fact = sts.lookup(&dns, "good.example").await;
        assert!(matches!(&fact, StsFact::Policy { id, .. } if id == "first"), "{fact:?}");
    }

    // Restarted an hour later; the policy host is gone (nothing listens where it was) and the id has changed.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone_port = gone.local_addr().unwrap().port();
    drop(gone);
    clock.advance(Duration::from_secs(3600));
    dns.txt
        .lock()
        .unwrap()
        .insert("_mta-sts.good.example".into(), "v=STSv1; id=second;".into());
    let restarted = MtaSts::with_cache(
        fetcher(gone_port, &ca),
        Arc::new(StsCache::persistent(state.path(), clock.clone())),
    );
    let fact = restarted.lookup(&dns, "good.example").await;
    let StsFact::Policy {
        id,
        policy,
        stale_refresh,
    } = &fact
    else {
        panic!("the persisted policy expected: {fact:?}")
    };
    assert_eq!((id.as_str(), policy.mode), ("first", Mode::Enforce));
    assert!(policy.matches("mx1.good.example") && !policy.matches("mx.rogue.example"));
    assert!(stale_refresh.is_some(), "{fact:?}");

    // A restart after max_age (86400 s) finds nothing to fall back on.
    clock.advance(Duration::from_secs(86_400));
    let expired = MtaSts::with_cache(
        fetcher(gone_port, &ca),
        Arc::new(StsCache::persistent(state.path(), clock.clone())),
    );
    let fact = expired.lookup(&dns, "good.example").await;
    assert!(matches!(&fact, StsFact::Failed(_)), "{fact:?}");
}
