//! PolicyResolver over a fixed DNS and policy server: single-flight, cache expiry on a manual clock, bounded
//! caching of temporary failures, MTA-STS cache rules and DNSSEC requirements for DANE addresses.
#![allow(clippy::unwrap_used, reason = "tests: a panic is the failure report")]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use securemail_api::tenant::TlsPolicySpec;
use securemail_sidecar::evidence::PolicySource;
use securemail_sidecar::policy::clock::ManualClock;
use securemail_sidecar::policy::dns::{Answer, DnsFailure, DnsLookup, Found, MxRecord, Security};
use securemail_sidecar::policy::mta_sts::cache::StsCache;
use securemail_sidecar::policy::mta_sts::{FetchError, StsFetch};
use securemail_sidecar::policy::{
    LookupStage, PeerAuth, PolicyError, PolicyLookup, PolicyResolver, Tlsa, check_domain,
};

type Reply<T> = Result<Answer<T>, DnsFailure>;

/// Answers from tables; counts MX and address lookups; optionally slow so concurrent callers overlap.
#[derive(Default)]
struct FakeDns {
    mx: Mutex<HashMap<String, Reply<MxRecord>>>,
    tlsa: Mutex<HashMap<String, Reply<Tlsa>>>,
    txt: Mutex<HashMap<String, Reply<String>>>,
    ips: Mutex<HashMap<String, Reply<IpAddr>>>,
    mx_lookups: AtomicUsize,
    address_lookups: AtomicUsize,
    delay: Duration,
}

fn answer<T>(records: Vec<T>, security: Security, ttl: u32) -> Reply<T> {
    let found = if records.is_empty() {
        Found::NoData
    } else {
        Found::Records(records)
    };
    Ok(Answer { found, security, ttl })
}

fn failure<T>(name: &str) -> Reply<T> {
    Err(DnsFailure {
        name: name.to_owned(),
        rtype: "TEST",
        reason: "SERVFAIL".to_owned(),
    })
}

fn get<T: Clone>(table: &Mutex<HashMap<String, Reply<T>>>, name: &str) -> Reply<T> {
    table.lock().unwrap().get(name).cloned().unwrap_or(Ok(Answer {
        found: Found::NxDomain,
        security: Security::Insecure,
        ttl: 60,
    }))
}

impl DnsLookup for FakeDns {
    async fn mx(&self, domain: &str) -> Reply<MxRecord> {
        self.mx_lookups.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        get(&self.mx, domain)
    }
    async fn tlsa(&self, host: &str) -> Reply<Tlsa> {
        get(&self.tlsa, host)
    }
    async fn txt(&self, name: &str) -> Reply<String> {
        get(&self.txt, name)
    }
    async fn addresses(&self, host: &str) -> Reply<IpAddr> {
        self.address_lookups.fetch_add(1, Ordering::SeqCst);
        get(&self.ips, host)
    }
}

/// Serves one policy body per domain, or fails; counts fetches.
#[derive(Default)]
struct FakeFetch {
    bodies: Mutex<HashMap<String, Result<String, String>>>,
    fetches: AtomicUsize,
}

impl StsFetch for FakeFetch {
    async fn fetch(&self, domain: &str) -> Result<String, FetchError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let body = self.bodies.lock().unwrap().get(domain).cloned();
        body.unwrap_or_else(|| Err("404".to_owned()))
            .map_err(|reason| FetchError {
                domain: domain.to_owned(),
                reason,
            })
    }
}

fn mx_record(preference: u16, exchange: &str) -> MxRecord {
    MxRecord {
        preference,
        exchange: exchange.to_owned(),
    }
}

fn ee() -> Tlsa {
    Tlsa {
        usage: 3,
        selector: 1,
        matching: 1,
        data: vec![0x5a; 32],
    }
}

struct Setup {
    dns: Arc<FakeDns>,
    fetch: Arc<FakeFetch>,
    clock: Arc<ManualClock>,
    resolver: PolicyResolver<Arc<FakeDns>, Arc<FakeFetch>>,
}

fn setup(dns: FakeDns) -> Setup {
    let dns = Arc::new(dns);
    let fetch = Arc::new(FakeFetch::default());
    let clock = Arc::new(ManualClock::new());
    let resolver = PolicyResolver::new(TlsPolicySpec::default(), dns.clone(), fetch.clone(), clock.clone());
    Setup {
        dns,
        fetch,
        clock,
        resolver,
    }
}

fn dane_domain(dns: &FakeDns, mx_ttl: u32) {
    dns.mx.lock().unwrap().insert(
        "dane.example".into(),
        answer(vec![mx_record(10, "mx.dane.example")], Security::Secure, mx_ttl),
    );
    dns.tlsa
        .lock()
        .unwrap()
        .insert("mx.dane.example".into(), answer(vec![ee()], Security::Secure, 600));
}

#[tokio::test]
async fn concurrent_resolves_share_one_lookup() {
    let dns = FakeDns {
        delay: Duration::from_millis(200),
        ..FakeDns::default()
    };
    dane_domain(&dns, 300);
    let s = setup(dns);
    let calls = (0..50).map(|_| {
        let resolver = s.resolver.clone();
        tokio::spawn(async move { resolver.resolve("dane.example").await })
    });
    let results = futures::future::join_all(calls).await;
    for result in results {
        assert_eq!(result.unwrap().unwrap().mx[0].source, PolicySource::Dane);
    }
    assert_eq!(s.dns.mx_lookups.load(Ordering::SeqCst), 1);
    let stats = s.resolver.cache_stats();
    assert_eq!(stats.lookups, 1);
    assert_eq!(stats.hits + stats.joined, 49);
}

#[tokio::test]
async fn cached_decision_expires_with_the_smallest_ttl_within_bounds() {
    let dns = FakeDns::default();
    dane_domain(&dns, 120);
    let s = setup(dns);
    s.resolver.resolve("dane.example").await.unwrap();
    s.clock.advance(Duration::from_secs(119));
    s.resolver.resolve("dane.example").await.unwrap();
    assert_eq!(
        s.dns.mx_lookups.load(Ordering::SeqCst),
        1,
        "fresh entry answered from cache"
    );
    assert_eq!(s.resolver.cache_stats().hits, 1);
    s.clock.advance(Duration::from_secs(2));
    s.resolver.resolve("dane.example").await.unwrap();
    assert_eq!(s.dns.mx_lookups.load(Ordering::SeqCst), 2, "expired after the MX TTL");

    // A 1-second TTL is floored at 30 s.
    dane_domain(&s.dns, 1);
    s.clock.advance(Duration::from_secs(200));
    s.resolver.resolve("dane.example").await.unwrap();
    s.clock.advance(Duration::from_secs(29));
    s.resolver.resolve("dane.example").await.unwrap();
    assert_eq!(s.dns.mx_lookups.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn temporary_failures_are_cached_only_briefly_and_tlsa_servfail_is_not_no_dane() {
    let dns = FakeDns::default();
    dns.mx.lock().unwrap().insert(
        "flaky.example".into(),
        answer(vec![mx_record(10, "mx.flaky.example")], Security::Secure, 3600),
    );
    dns.tlsa
        .lock()
        .unwrap()
        .insert("mx.flaky.example".into(), failure("_25._tcp.mx.flaky.example"));
    let s = setup(dns);
    let error = s.resolver.resolve("flaky.example").await.unwrap_err();
    assert!(
        matches!(&error, PolicyError::Temporary { stage: LookupStage::Dane, reason } if reason.contains("SERVFAIL")),
        "{error:?}"
    );
    s.resolver.resolve("flaky.example").await.unwrap_err();
    assert_eq!(s.dns.mx_lookups.load(Ordering::SeqCst), 1);
    s.clock.advance(Duration::from_secs(6));
    s.dns
        .tlsa
        .lock()
        .unwrap()
        .insert("mx.flaky.example".into(), answer(vec![ee()], Security::Secure, 600));
    let policy = s.resolver.resolve("flaky.example").await.unwrap();
    assert_eq!(policy.mx[0].source, PolicySource::Dane);
}

#[tokio::test]
async fn mx_failure_and_no_mx_and_null_mx() {
    let dns = FakeDns::default();
    dns.mx
        .lock()
        .unwrap()
        .insert("down.example".into(), failure("down.example"));
    dns.mx.lock().unwrap().insert(
        "null.example".into(),
        answer(vec![mx_record(0, "")], Security::Secure, 300),
    );
    dns.mx
        .lock()
        .unwrap()
        .insert("implicit.example".into(), answer(vec![], Security::Insecure, 300));
    dns.ips.lock().unwrap().insert(
        "implicit.example".into(),
        answer(vec!["192.0.2.7".parse().unwrap()], Security::Insecure, 300),
    );
    let s = setup(dns);
    assert!(matches!(
        s.resolver.resolve("down.example").await,
        Err(PolicyError::Temporary {
            stage: LookupStage::Mx,
            ..
        })
    ));
    assert!(matches!(
        s.resolver.resolve("null.example").await,
        Err(PolicyError::Permanent { .. })
    ));
    assert!(matches!(
        s.resolver.resolve("nothing.example").await,
        Err(PolicyError::Permanent { .. })
    ));
    let policy = s.resolver.resolve("implicit.example").await.unwrap();
    assert_eq!(String::from(policy.mx[0].host.clone()), "implicit.example");
    assert_eq!(policy.mx[0].auth, PeerAuth::WebPki);
    let error = s.resolver.resolve("someone@implicit.example").await.unwrap_err();
    assert!(!error.to_string().contains("someone"), "{error}");
}

#[tokio::test]
async fn dane_addresses_must_be_secure() {
    let dns = FakeDns::default();
    dane_domain(&dns, 300);
    dns.ips.lock().unwrap().insert(
        "mx.dane.example".into(),
        answer(vec!["192.0.2.1".parse().unwrap()], Security::Insecure, 300),
    );
    let s = setup(dns);
    let policy = s.resolver.resolve("dane.example").await.unwrap();
    let error = s.resolver.addresses(&policy.mx[0]).await.unwrap_err();
    assert!(matches!(error, PolicyError::Temporary { .. }), "{error:?}");
    s.dns.ips.lock().unwrap().insert(
        "mx.dane.example".into(),
        answer(vec!["192.0.2.1".parse().unwrap()], Security::Secure, 300),
    );
    // The insecure answer holds for its TTL, and is refused each time.
    assert!(s.resolver.addresses(&policy.mx[0]).await.is_err());
    s.clock.advance(Duration::from_secs(301));
    assert_eq!(
        s.resolver.addresses(&policy.mx[0]).await.unwrap(),
        vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(s.dns.address_lookups.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn addresses_are_cached_for_their_ttl_and_failures_are_not() {
    let dns = FakeDns::default();
    dane_domain(&dns, 300);
    dns.ips
        .lock()
        .unwrap()
        .insert("mx.dane.example".into(), failure("mx.dane.example"));
    let s = setup(dns);
    let policy = s.resolver.resolve("dane.example").await.unwrap();
    let lookups = || s.dns.address_lookups.load(Ordering::SeqCst);
    assert!(s.resolver.addresses(&policy.mx[0]).await.is_err());
    assert!(s.resolver.addresses(&policy.mx[0]).await.is_err());
    assert_eq!(lookups(), 2, "a failure is asked again");
    s.dns.ips.lock().unwrap().insert(
        "mx.dane.example".into(),
        answer(vec!["192.0.2.1".parse().unwrap()], Security::Secure, 120),
    );
    for _ in 0..3 {
        s.resolver.addresses(&policy.mx[0]).await.unwrap();
    }
    assert_eq!(lookups(), 3, "one lookup serves the TTL");
    s.clock.advance(Duration::from_secs(121));
    s.resolver.addresses(&policy.mx[0]).await.unwrap();
    assert_eq!(lookups(), 4, "asked again once the TTL ran out");
}

const POLICY_V1: &str = "version: STSv1\nmode: enforce\nmx: mx.sts.example\nmax_age: 3600\n";

fn sts_domain(dns: &FakeDns, id: &str) {
    dns.mx.lock().unwrap().insert(
        "sts.example".into(),
        answer(
            vec![mx_record(10, "mx.sts.example"), mx_record(20, "mx.rogue.example")],
            Security::Insecure,
            30,
        ),
    );
    dns.txt.lock().unwrap().insert(
        "_mta-sts.sts.example".into(),
        answer(vec![format!("v=STSv1; id={id};")], Security::Insecure, 30),
    );
}

#[tokio::test]
async fn mta_sts_cache_by_id_and_max_age_survives_failed_refresh() {
    let dns = FakeDns::default();
    sts_domain(&dns, "one");
    let s = setup(dns);
    s.fetch
        .bodies
        .lock()
        .unwrap()
        .insert("sts.example".into(), Ok(POLICY_V1.to_owned()));

    let policy = s.resolver.resolve("sts.example").await.unwrap();
    assert_eq!(policy.mx.len(), 1, "the rogue MX is left out");
    assert_eq!(policy.mx[0].policy_id.as_deref(), Some("one"));
    assert_eq!(s.fetch.fetches.load(Ordering::SeqCst), 1);

    // Same id, policy unexpired: no fetch.
    s.clock.advance(Duration::from_secs(60));
    s.resolver.resolve("sts.example").await.unwrap();
    assert_eq!(s.fetch.fetches.load(Ordering::SeqCst), 1);

    // New id, but the server fails: the unexpired cached policy stays in force.
    sts_domain(&s.dns, "two");
    s.fetch
        .bodies
        .lock()
        .unwrap()
        .insert("sts.example".into(), Err("connection refused".to_owned()));
    s.clock.advance(Duration::from_secs(60));
    let policy = s.resolver.resolve("sts.example").await.unwrap();
    assert_eq!(s.fetch.fetches.load(Ordering::SeqCst), 2);
    assert_eq!(policy.mx[0].policy_id.as_deref(), Some("one"));
    let report = check_domain(&s.resolver, "sts.example").await.to_string();
    assert!(report.contains("refresh failed"), "{report}");

    // Once max_age has run out and the fetch still fails: defer, never fall back to the tenant policy.
    s.clock.advance(Duration::from_secs(3600));
    let error = s.resolver.resolve("sts.example").await.unwrap_err();
    assert!(
        matches!(&error, PolicyError::Temporary { stage: LookupStage::MtaSts, reason } if reason.contains("connection refused")),
        "{error:?}"
    );
}

#[tokio::test]
async fn check_domain_report_names_policy_mx_and_tlsa() {
    let dns = FakeDns::default();
    dane_domain(&dns, 300);
    let s = setup(dns);
    let report = check_domain(&s.resolver, "dane.example").await.to_string();
    for expected in [
        "Recipient domain: dane.example",
        "MX records (DNSSEC-secure):",
        "   10 mx.dane.example",
        "TLSA _25._tcp.mx.dane.example (secure, 1 of 1 usable):",
        "3 1 1 5a5a5a",
        "mx.dane.example: DANE (1 TLSA records) [from DANE]",
    ] {
        assert!(report.contains(expected), "missing {expected:?} in:\n{report}");
    }
}

#[tokio::test]
async fn mta_sts_patterns_are_those_of_the_policy_in_force_and_never_looked_up() {
    let dns = FakeDns::default();
    sts_domain(&dns, "one");
    let s = setup(dns);
    s.fetch.bodies.lock().unwrap().insert(
        "sts.example".into(),
        Ok("version: STSv1\nmode: enforce\nmx: mx.sts.example\nmx: *.backup.example\nmax_age: 3600\n".to_owned()),
    );
    assert_eq!(
        s.resolver.mta_sts_patterns("sts.example", "one"),
        None,
        "nothing cached yet"
    );
    assert_eq!(s.fetch.fetches.load(Ordering::SeqCst), 0);
    s.resolver.resolve("sts.example").await.unwrap();
    assert_eq!(
        s.resolver.mta_sts_patterns("STS.example.", "one"),
        Some(vec!["mx.sts.example".to_owned(), "*.backup.example".to_owned()])
    );
    assert_eq!(
        s.resolver.mta_sts_patterns("sts.example", "two"),
        None,
        "another policy id"
    );
    s.clock.advance(Duration::from_secs(3601));
    assert_eq!(
        s.resolver.mta_sts_patterns("sts.example", "one"),
        None,
        "max_age ran out"
    );
    assert_eq!(s.fetch.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_cleartext_exception_looks_up_tlsa_even_without_dane_and_yields_to_it() {
    use securemail_api::tenant::{OverrideTlsMode, PolicyException, TlsOverride};
    let dns = FakeDns::default();
    dane_domain(&dns, 300);
    // Only a PKIX-EE record: unusable for DANE, yet it says the host does TLS.
    dns.tlsa.lock().unwrap().insert(
        "mx.dane.example".into(),
        answer(vec![Tlsa { usage: 1, ..ee() }], Security::Secure, 600),
    );
    let dns = Arc::new(dns);
    let spec = |domain: &str| TlsPolicySpec {
        dane: false,
        overrides: vec![TlsOverride {
            domain: domain.to_owned(),
            mode: Some(OverrideTlsMode::Encrypted),
            min_version: None,
            allow_cleartext: Some(true),
            exception: Some(PolicyException {
                approved_by: "security-office/CHG-1".to_owned(),
                reason: "partner has no TLS yet".to_owned(),
            }),
        }],
        ..TlsPolicySpec::default()
    };
    let resolver = |domain: &str| {
        PolicyResolver::new(
            spec(domain),
            dns.clone(),
            Arc::new(FakeFetch::default()),
            Arc::new(ManualClock::new()),
        )
    };

    let policy = resolver("dane.example").resolve("dane.example").await.unwrap();
    assert!(!policy.allow_cleartext, "{policy:?}");
    assert_eq!(policy.mx[0].auth, PeerAuth::AnyCertificate);

    // The same exception for a domain whose host publishes no TLSA applies.
    dns.mx.lock().unwrap().insert(
        "plain.example".into(),
        answer(vec![mx_record(10, "mx.plain.example")], Security::Secure, 300),
    );
    let policy = resolver("plain.example").resolve("plain.example").await.unwrap();
    assert!(policy.allow_cleartext, "{policy:?}");
}

#[tokio::test]
async fn a_restarted_resolver_enforces_the_persisted_mta_sts_policy_while_the_policy_server_is_down() {
    let state = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let dns = FakeDns::default();
    sts_domain(&dns, "one");
    let dns = Arc::new(dns);
    let resolver = |fetch: Arc<FakeFetch>| {
        PolicyResolver::with_sts_cache(
            TlsPolicySpec::default(),
            dns.clone(),
            fetch,
            clock.clone(),
            Arc::new(StsCache::persistent(state.path(), clock.clone())),
        )
    };
    let serving = Arc::new(FakeFetch::default());
    serving
        .bodies
        .lock()
        .unwrap()
        .insert("sts.example".into(), Ok(POLICY_V1.to_owned()));
    assert_eq!(resolver(serving).resolve("sts.example").await.unwrap().mx.len(), 1);

    // The restarted sidecar's policy server answers nothing.
    clock.advance(Duration::from_secs(600));
    let down = Arc::new(FakeFetch::default());
    let policy = resolver(down.clone()).resolve("sts.example").await.unwrap();
    assert_eq!(
        down.fetches.load(Ordering::SeqCst),
        0,
        "same id: served from the persisted cache"
    );
    assert_eq!(policy.mx.len(), 1, "the rogue MX stays excluded");
    assert_eq!(
        (policy.mx[0].source, policy.mx[0].policy_id.as_deref()),
        (PolicySource::MtaSts, Some("one"))
    );

    // Past max_age (3600 s) a restart defers rather than fall back to the tenant policy.
    clock.advance(Duration::from_secs(3600));
    let error = resolver(down).resolve("sts.example").await.unwrap_err();
    assert!(
        matches!(
            &error,
            PolicyError::Temporary {
                stage: LookupStage::MtaSts,
                ..
            }
        ),
        "{error:?}"
    );
}
