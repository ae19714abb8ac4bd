//! Policy-cache hit latency (`make bench-sidecar`): `PolicyResolver::resolve` for domains whose decision is cached,
//! over fixed in-memory DNS answers, against the same loop over a plain `HashMap` lookup measured in the same run.
//! Usage: policy_cache_bench [CALLS]   (default 100000; 1000 cached domains, called round-robin)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark: a panic is the failure report"
)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use securemail_api::tenant::TlsPolicySpec;
use securemail_sidecar::policy::clock::SystemClock;
use securemail_sidecar::policy::dns::{Answer, DnsFailure, DnsLookup, Found, MxRecord, Security};
use securemail_sidecar::policy::mta_sts::{FetchError, StsFetch};
use securemail_sidecar::policy::{DomainPolicy, PolicyLookup, PolicyResolver, Tlsa};

const DOMAINS: usize = 1000;
const TASKS: usize = 16;
const TARGET_P99: Duration = Duration::from_millis(1);

/// Every domain has one insecure MX `mx.<domain>` and no MTA-STS record, so the tenant's `verified` mode
/// decides; TTLs are long enough that nothing expires during the run.
struct FixedDns;

fn answer<T>(records: Vec<T>) -> Result<Answer<T>, DnsFailure> {
    let found = if records.is_empty() {
        Found::NxDomain
    } else {
        Found::Records(records)
    };
    Ok(Answer {
        found,
        security: Security::Insecure,
        ttl: 3600,
    })
}

impl DnsLookup for FixedDns {
    async fn mx(&self, domain: &str) -> Result<Answer<MxRecord>, DnsFailure> {
        answer(vec![MxRecord {
            preference: 10,
            exchange: format!("mx.{domain}"),
        }])
    }
    async fn tlsa(&self, _host: &str) -> Result<Answer<Tlsa>, DnsFailure> {
        answer(Vec::new())
    }
    async fn txt(&self, _name: &str) -> Result<Answer<String>, DnsFailure> {
        answer(Vec::new())
    }
    async fn addresses(&self, _host: &str) -> Result<Answer<IpAddr>, DnsFailure> {
        answer(vec![IpAddr::from([192, 0, 2, 25])])
    }
}

struct NoPolicies;

impl StsFetch for NoPolicies {
    async fn fetch(&self, domain: &str) -> Result<String, FetchError> {
        Err(FetchError {
            domain: domain.to_owned(),
            reason: "no policy server in this benchmark".to_owned(),
        })
    }
}

struct Percentiles {
    p50: Duration,
    p99: Duration,
    p999: Duration,
}

fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
    }
}

/// The same round-robin loop for the resolver and the anchor: `calls` timed lookups starting at domain `first`,
/// optionally yielding to the scheduler between calls (untimed) so concurrent tasks interleave.
async fn timed_loop<L, Fut>(
    lookup: L,
    domains: Arc<Vec<String>>,
    first: usize,
    calls: usize,
    yield_between: bool,
) -> Vec<Duration>
where
    L: Fn(Arc<Vec<String>>, usize) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let index = (first + i) % domains.len();
        let start = Instant::now();
        let found = lookup(domains.clone(), index).await;
        samples.push(start.elapsed());
        assert!(found, "domain {index} is cached");
        if yield_between {
            tokio::task::yield_now().await;
        }
    }
    samples
}

async fn concurrent<L, Fut>(lookup: L, domains: &Arc<Vec<String>>, calls: usize) -> Vec<Duration>
where
    L: Fn(Arc<Vec<String>>, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (lookup, domains) = (lookup.clone(), domains.clone());
            let first = task * domains.len() / TASKS;
            tokio::spawn(timed_loop(lookup, domains, first, calls / TASKS, true))
        })
        .collect();
    let mut samples = Vec::with_capacity(calls);
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    samples
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn report(label: &str, resolver: &Percentiles, anchor: &Percentiles) {
    let verdict = if resolver.p99 <= TARGET_P99 { "PASS" } else { "MISS" };
    println!(
        "{label:<44} p50 {:>6.2} us  p99 {:>6.2} us  p99.9 {:>6.2} us | HashMap p99 {:>5.2} us | ratio p99 {:>5.1}x | \
         target p99 <= 1 ms: {verdict}",
        micros(resolver.p50),
        micros(resolver.p99),
        micros(resolver.p999),
        micros(anchor.p99),
        resolver.p99.as_secs_f64() / anchor.p99.as_secs_f64().max(1e-9),
    );
}

#[tokio::main]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .map(|arg| arg.parse().expect("CALLS is a number"))
        .unwrap_or(100_000);
    let domains: Arc<Vec<String>> = Arc::new((0..DOMAINS).map(|i| format!("d{i}.bench.example")).collect());
    let resolver = PolicyResolver::new(TlsPolicySpec::default(), FixedDns, NoPolicies, Arc::new(SystemClock));
    let mut anchor_map: HashMap<String, Arc<DomainPolicy>> = HashMap::new();
    for domain in domains.iter() {
        let policy = resolver
            .resolve(domain)
            .await
            .expect("every benchmark domain has a policy");
        anchor_map.insert(domain.clone(), policy);
    }
    let anchor_map = Arc::new(anchor_map);
    let stats_before = resolver.cache_stats();

    let cached = {
        let resolver = resolver.clone();
        move |domains: Arc<Vec<String>>, index: usize| {
            let resolver = resolver.clone();
            async move { resolver.resolve(&domains[index]).await.is_ok() }
        }
    };
    let plain = {
        let map = anchor_map.clone();
        move |domains: Arc<Vec<String>>, index: usize| {
            let map = map.clone();
            async move { map.get(&domains[index]).cloned().is_some() }
        }
    };

    // One untimed pass each to warm caches and the allocator.
    timed_loop(cached.clone(), domains.clone(), 0, DOMAINS, false).await;
    timed_loop(plain.clone(), domains.clone(), 0, DOMAINS, false).await;

    let single = percentiles(timed_loop(cached.clone(), domains.clone(), 0, calls, false).await);
    let single_anchor = percentiles(timed_loop(plain.clone(), domains.clone(), 0, calls, false).await);
    let many = percentiles(concurrent(cached, &domains, calls).await);
    let many_anchor = percentiles(concurrent(plain, &domains, calls).await);

    let stats = resolver.cache_stats();
    assert_eq!(
        stats.lookups, stats_before.lookups,
        "every timed call was a cache hit (no new lookups)"
    );
    println!(
        "policy cache: {calls} resolve() calls per case over {DOMAINS} cached domains, {} worker threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    report("policy cache hit, 1 task", &single, &single_anchor);
    report(
        &format!("policy cache hit, {TASKS} concurrent tasks"),
        &many,
        &many_anchor,
    );
}
