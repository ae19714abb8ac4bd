//! HickoryDns and the resolver against a real BIND `named` serving a test root zone signed with its own KSK
//! (given to us as the trust anchor): DANE from a secure TLSA RRset, secure denial, an unsigned delegation, a
//! bogus signature (temporary failure, never "no DANE"), null MX, implicit MX and NXDOMAIN. Skipped, with a
//! message, when Debian's bind9 and bind9-dnsutils are not installed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use securemail_api::sidecar_config::DnsSettings;
use securemail_api::tenant::TlsPolicySpec;
use securemail_sidecar::evidence::PolicySource;
use securemail_sidecar::policy::clock::SystemClock;
use securemail_sidecar::policy::dns::{DnsLookup, Found, HickoryDns, Security};
use securemail_sidecar::policy::mta_sts::fetch::{HttpsFetcher, OurResolver};
use securemail_sidecar::policy::{PeerAuth, PolicyError, PolicyLookup, PolicyResolver};

const GOOD_HASH: &str = "4444444444444444444444444444444444444444444444444444444444444444";
const BOGUS_HASH: &str = "1111111111111111111111111111111111111111111111111111111111111111";

struct Named(Child);

impl Drop for Named {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tools_present() -> bool {
    ["named", "dnssec-keygen", "dnssec-signzone"].iter().all(|tool| {
        Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    })
}

fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let output = Command::new(program).current_dir(dir).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Signs the zones, starts named; returns it, its address and the trust anchor file.
fn start_named(dir: &Path) -> (Named, SocketAddr, PathBuf) {
    let ksk = run(
        dir,
        "dnssec-keygen",
        &["-q", "-a", "ECDSAP256SHA256", "-f", "KSK", "-K", ".", "."],
    );
    run(dir, "dnssec-keygen", &["-q", "-a", "ECDSAP256SHA256", "-K", ".", "."]);
    let root = format!(
        "$TTL 300
. IN SOA ns.root-servers.test. hostmaster.test. 1 3600 600 86400 300
. IN NS ns.root-servers.test.
ns.root-servers.test. IN A 127.0.0.1
dane.test. IN MX 10 mx.dane.test.
mx.dane.test. IN A 192.0.2.10
_25._tcp.mx.dane.test. IN TLSA 3 1 1 {GOOD_HASH}
_25._tcp.mx.dane.test. IN TLSA 1 1 1 {GOOD_HASH}
notlsa.test. IN MX 10 mx.notlsa.test.
mx.notlsa.test. IN A 192.0.2.11
implicit.test. IN A 192.0.2.12
nullmx.test. IN MX 0 .
bogus.test. IN MX 10 mx.bogus.test.
mx.bogus.test. IN A 192.0.2.13
_25._tcp.mx.bogus.test. IN TLSA 3 1 1 {BOGUS_HASH}
insecure.test. IN NS ns.insecure.test.
ns.insecure.test. IN A 127.0.0.1
"
    );
    std::fs::write(dir.join("root.db"), root).unwrap();
    std::fs::write(
        dir.join("insecure.db"),
        format!(
            "$TTL 300
@ IN SOA ns.insecure.test. hostmaster.insecure.test. 1 3600 600 86400 300
@ IN NS ns.insecure.test.
ns IN A 127.0.0.1
@ IN MX 10 mx.insecure.test.
mx IN A 192.0.2.14
_25._tcp.mx IN TLSA 3 1 1 {GOOD_HASH}
"
        ),
    )
    .unwrap();
    run(
        dir,
        "dnssec-signzone",
        &[
            "-q",
            "-K",
            ".",
            "-S",
            "-O",
            "full",
            "-o",
            ".",
            "-f",
            "root.signed",
            "root.db",
        ],
    );
    // Break one signature: the TLSA data changes after signing.
    let signed = std::fs::read_to_string(dir.join("root.signed")).unwrap();
    let mut tampered = 0;
    let lines: Vec<String> = signed
        .lines()
        .map(|line| match line.split_once("IN TLSA\t3 1 1 ") {
            // The signer splits the hex with spaces.
            Some((head, data)) if line.starts_with("_25._tcp.mx.bogus.test.") => {
                tampered += 1;
                format!("{head}IN TLSA\t3 1 1 {}", data.replace('1', "2"))
            }
            _ => line.to_owned(),
        })
        .collect();
    assert_eq!(tampered, 1, "signed zone lost the TLSA record:\n{signed}");
    std::fs::write(dir.join("root.signed"), lines.join("\n")).unwrap();

    // named serves DNS on UDP and TCP: the port must be free for both (a port free for UDP can be the local end of
    // some TCP connection, and named then starts without TCP and the test waits for it in vain).
    let port = (0..100)
        .find_map(|_| {
            let tcp = TcpListener::bind("127.0.0.1:0").ok()?;
            let port = tcp.local_addr().ok()?.port();
            UdpSocket::bind(("127.0.0.1", port)).ok().map(|_| port)
        })
        .expect("a loopback port free for UDP and TCP");
    let d = dir.display();
    std::fs::write(
        dir.join("named.conf"),
        format!(
            "options {{ directory \"{d}\"; listen-on port {port} {{ 127.0.0.1; }}; listen-on-v6 {{ none; }};
  recursion no; dnssec-validation no; pid-file \"{d}/named.pid\"; session-keyfile \"{d}/session.key\";
  managed-keys-directory \"{d}\"; }};
controls {{ }};
zone \".\" {{ type primary; file \"{d}/root.signed\"; }};
zone \"insecure.test\" {{ type primary; file \"{d}/insecure.db\"; }};
"
        ),
    )
    .unwrap();
    let child = Command::new("named")
        .args(["-g", "-c"])
        .arg(dir.join("named.conf"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("named.log")).unwrap())
        .spawn()
        .unwrap();
    let named = Named(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "named did not start: {}",
            std::fs::read_to_string(dir.join("named.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (named, addr, dir.join(format!("{ksk}.key")))
}

#[tokio::test]
async fn dnssec_classification_against_real_named() {
    if !tools_present() {
        eprintln!(
            "SKIPPED: named / dnssec-keygen / dnssec-signzone not installed (apt-get install bind9 bind9-dnsutils)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_named, addr, anchor) = start_named(dir.path());
    let dns = HickoryDns::from_settings(&DnsSettings {
        nameservers: vec![addr],
        trust_anchor_file: Some(anchor),
    })
    .unwrap();

    // Raw classification.
    let mx = dns.mx("dane.test").await.unwrap();
    assert_eq!(mx.security, Security::Secure, "{mx:?}");
    let tlsa = dns.tlsa("mx.notlsa.test").await.unwrap();
    assert_eq!(
        (tlsa.found.clone(), tlsa.security),
        (Found::NxDomain, Security::Secure),
        "{tlsa:?}"
    );
    let nodata = dns.txt("dane.test").await.unwrap();
    assert_eq!((nodata.found, nodata.security), (Found::NoData, Security::Secure));
    let insecure_mx = dns.mx("insecure.test").await.unwrap();
    assert_eq!(insecure_mx.security, Security::Insecure, "{insecure_mx:?}");
    let insecure = dns.tlsa("mx.insecure.test").await.unwrap();
    assert_eq!(
        (insecure.security, insecure.records().len()),
        (Security::Insecure, 1),
        "{insecure:?}"
    );
    let bogus = dns.tlsa("mx.bogus.test").await;
    assert!(bogus.is_err(), "a bad signature must be a failure: {bogus:?}");

    let fetcher = HttpsFetcher::new(Arc::new(OurResolver(dns.clone())), RootCertStore::empty(), 443).unwrap();
    let resolver = PolicyResolver::new(TlsPolicySpec::default(), dns, fetcher, Arc::new(SystemClock));

    let policy = resolver.resolve("dane.test").await.unwrap();
    let PeerAuth::Dane { tlsa, reference_names } = &policy.mx[0].auth else {
        panic!("DANE expected: {policy:?}")
    };
    assert_eq!(tlsa.len(), 1, "the PKIX-EE record is unusable and left out");
    assert_eq!(reference_names, &vec!["mx.dane.test".to_owned()]);
    let ips = resolver.addresses(&policy.mx[0]).await.unwrap();
    assert_eq!(ips, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);

    for (domain, source) in [
        ("notlsa.test", PolicySource::Tenant),
        ("insecure.test", PolicySource::Tenant),
    ] {
        let policy = resolver.resolve(domain).await.unwrap();
        assert_eq!(
            (policy.mx[0].source, &policy.mx[0].auth),
            (source, &PeerAuth::WebPki),
            "{domain}"
        );
    }
    let implicit = resolver.resolve("implicit.test").await.unwrap();
    assert_eq!(String::from(implicit.mx[0].host.clone()), "implicit.test");

    let error = resolver.resolve("bogus.test").await.unwrap_err();
    assert!(matches!(error, PolicyError::Temporary { .. }), "{error:?}");
    for domain in ["nullmx.test", "nosuchdomain.test"] {
        let error = resolver.resolve(domain).await.unwrap_err();
        assert!(matches!(error, PolicyError::Permanent { .. }), "{domain}: {error:?}");
    }
}
