//! [`PolicyResolver`]: gathers DNS and MTA-STS facts, decides, caches the decision per domain and shares one
//! lookup among concurrent callers; caches MX hosts' addresses for their TTL.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use securemail_api::sidecar_config::SidecarConfig;
use securemail_api::tenant::{OverrideTlsMode, TlsPolicySpec};

use super::clock::{Clock, SystemClock};
use super::decide::{
    DomainFacts, MxFacts, TlsaFact, cleartext_excepted, dane_wanted, decide, find_override, mx_hosts, tlsa_fact,
};
use super::dns::{Answer, DnsLookup, DnsSetupError, Found, HickoryDns, Security};
use super::expiring::ExpiringMap;
use super::mta_sts::cache::StsCache;
use super::mta_sts::fetch::HttpsFetcher;
use super::mta_sts::{FetchError, MtaSts, StsFact, StsFetch};
use super::{DomainPolicy, LookupStage, MxCandidate, PeerAuth, PolicyError, PolicyLookup};
use crate::evidence::DomainName;

/// Cached decisions live between these bounds (the smallest DNS TTL decides within them).
pub const MIN_CACHE_TTL: Duration = Duration::from_secs(30);
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);
/// Temporary failures are remembered briefly, so a burst of mail does not hammer a failing server.
pub const TEMPORARY_CACHE_TTL: Duration = Duration::from_secs(5);
/// Most domains whose decision is kept, and most MX hosts whose addresses are.
pub const CACHE_CAPACITY: usize = 10_000;

type Outcome = Result<Arc<DomainPolicy>, PolicyError>;

/// Why the production resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Dns(#[from] DnsSetupError),
    #[error(transparent)]
    Https(#[from] FetchError),
}

/// Counters for metrics: `hits` answered from cache, `lookups` started, `joined` calls that waited on a lookup
/// another call had started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub lookups: u64,
    pub joined: u64,
    pub entries: usize,
}

struct State {
    cache: ExpiringMap<Outcome>,
    inflight: HashMap<String, Shared<BoxFuture<'static, Outcome>>>,
    /// Answers with addresses, by MX host: every delivery needs them, and a resolver may not cache them (hickory
    /// does not keep validated negative answers, such as an IPv4-only host's AAAA).
    addresses: ExpiringMap<Answer<IpAddr>>,
}

struct Inner<D, F> {
    spec: TlsPolicySpec,
    dns: D,
    sts: MtaSts<F>,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    hits: AtomicU64,
    lookups: AtomicU64,
    joined: AtomicU64,
}

/// The production [`PolicyLookup`].
pub struct PolicyResolver<D = HickoryDns, F = HttpsFetcher> {
    inner: Arc<Inner<D, F>>,
}

impl<D, F> std::fmt::Debug for PolicyResolver<D, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyResolver").finish_non_exhaustive()
    }
}

impl<D, F> Clone for PolicyResolver<D, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl PolicyResolver {
    /// From the sidecar configuration: DNSSEC-validating resolver per `dns`, system trust store for MTA-STS,
    /// MTA-STS policies kept in `sts_cache`.
    pub fn from_config(config: &SidecarConfig, sts_cache: Arc<StsCache>) -> Result<Self, SetupError> {
        let dns = HickoryDns::from_settings(&config.dns)?;
        let fetcher = HttpsFetcher::from_system(dns.clone())?;
        Ok(Self::with_sts_cache(
            config.tls_policy.clone(),
            dns,
            fetcher,
            Arc::new(SystemClock),
            sts_cache,
        ))
    }
}

impl<D: DnsLookup, F: StsFetch> PolicyResolver<D, F> {
    /// With an MTA-STS policy cache of its own, in memory.
    pub fn new(spec: TlsPolicySpec, dns: D, fetcher: F, clock: Arc<dyn Clock>) -> Self {
        let sts_cache = Arc::new(StsCache::in_memory(clock.clone()));
        Self::with_sts_cache(spec, dns, fetcher, clock, sts_cache)
    }

    /// With `sts_cache`, which outlives this resolver: on the state volume it survives restarts, and the resolver
    /// a configuration reload builds uses the same one.
    pub fn with_sts_cache(
        spec: TlsPolicySpec,
        dns: D,
        fetcher: F,
        clock: Arc<dyn Clock>,
        sts_cache: Arc<StsCache>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                spec,
                dns,
                sts: MtaSts::with_cache(fetcher, sts_cache),
                clock,
                state: Mutex::new(State {
                    cache: ExpiringMap::new(CACHE_CAPACITY),
                    inflight: HashMap::new(),
                    addresses: ExpiringMap::new(CACHE_CAPACITY),
                }),
                hits: AtomicU64::new(0),
                lookups: AtomicU64::new(0),
                joined: AtomicU64::new(0),
            }),
        }
    }

    pub fn spec(&self) -> &TlsPolicySpec {
        &self.inner.spec
    }

    pub fn cache_stats(&self) -> CacheStats {
        let entries = self.inner.lock().cache.count();
        CacheStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            lookups: self.inner.lookups.load(Ordering::Relaxed),
            joined: self.inner.joined.load(Ordering::Relaxed),
            entries,
        }
    }

    /// Fresh facts for `domain`, bypassing the decision cache (the MTA-STS policy cache still applies).
    pub async fn facts(&self, domain: &str) -> Result<DomainFacts, PolicyError> {
        self.inner.gather(&normalize(domain)?).await
    }
}

impl<D, F> Inner<D, F> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn normalize(domain: &str) -> Result<String, PolicyError> {
    DomainName::new(domain)
        .map(String::from)
        .map_err(|error| PolicyError::Permanent {
            reason: format!("recipient domain is not a valid DNS name: {error}"),
        })
}

fn temporary(stage: LookupStage, error: impl std::fmt::Display) -> PolicyError {
    PolicyError::Temporary {
        stage,
        reason: error.to_string(),
    }
}

impl<D: DnsLookup, F: StsFetch> Inner<D, F> {
    async fn gather(&self, domain: &str) -> Result<DomainFacts, PolicyError> {
        let spec = &self.spec;
        let dane_on = dane_wanted(spec, domain);
        let mx = self
            .dns
            .mx(domain)
            .await
            .map_err(|failure| temporary(LookupStage::Mx, failure))?;
        let mut min_ttl = mx.ttl;
        let mx_facts = match mx.found {
            Found::NxDomain => MxFacts::NxDomain,
            Found::Records(hosts) if hosts.iter().all(|h| h.exchange.is_empty()) => MxFacts::Null,
            Found::Records(hosts) => MxFacts::Hosts {
                hosts,
                secure: mx.security == Security::Secure,
            },
            Found::NoData => {
                // Implicit MX: DANE applies when the domain's own addresses validate.
                let secure = match self.dns.addresses(domain).await {
                    Ok(answer) => {
                        min_ttl = min_ttl.min(answer.ttl);
                        answer.security == Security::Secure && !answer.records().is_empty()
                    }
                    Err(failure) if dane_on => return Err(temporary(LookupStage::Mx, failure)),
                    Err(_) => false,
                };
                MxFacts::Implicit { secure }
            }
        };
        let mut facts = DomainFacts {
            domain: domain.to_owned(),
            mx: mx_facts,
            tlsa: Vec::new(),
            mta_sts: StsFact::NotLooked,
            min_ttl,
        };
        let hosts = mx_hosts(&facts);
        let mx_secure = matches!(
            facts.mx,
            MxFacts::Hosts { secure: true, .. } | MxFacts::Implicit { secure: true }
        );
        let dane_applies = dane_on && mx_secure;
        if dane_applies || cleartext_excepted(spec, domain) {
            let answers = futures::future::join_all(hosts.iter().map(|(_, host)| self.dns.tlsa(host))).await;
            for ((_, host), answer) in hosts.iter().zip(answers) {
                if let Ok(answer) = &answer {
                    facts.min_ttl = facts.min_ttl.min(answer.ttl);
                }
                facts.tlsa.push((host.clone(), tlsa_fact(answer)));
            }
        }
        let dane_required = find_override(spec, domain).is_some_and(|o| o.mode == Some(OverrideTlsMode::Dane));
        let all_dane = dane_applies
            && facts
                .tlsa
                .iter()
                .all(|(_, fact)| matches!(fact, TlsaFact::Secure { usable, .. } if !usable.is_empty()))
            && facts.tlsa.len() == hosts.len();
        if spec.mta_sts && !dane_required && !all_dane && !hosts.is_empty() {
            facts.mta_sts = self.sts.lookup(&self.dns, domain).await;
        }
        Ok(facts)
    }

    async fn lookup(self: Arc<Self>, domain: String) -> Outcome {
        let (outcome, ttl) = match self.gather(&domain).await {
            Ok(facts) => {
                let ttl = Duration::from_secs(u64::from(facts.min_ttl)).clamp(MIN_CACHE_TTL, MAX_CACHE_TTL);
                (decide(&self.spec, &facts).map(Arc::new), ttl)
            }
            Err(error) => (Err(error), TEMPORARY_CACHE_TTL),
        };
        let ttl = match &outcome {
            Err(PolicyError::Temporary { reason, .. }) => {
                tracing::warn!(domain, %reason, "TLS policy lookup failed temporarily");
                TEMPORARY_CACHE_TTL
            }
            _ => ttl,
        };
        let now = self.clock.now();
        let mut state = self.lock();
        state.cache.insert(domain.clone(), outcome.clone(), now + ttl, now);
        state.inflight.remove(&domain);
        outcome
    }

    /// A host's addresses, from the cache while their TTL (clamped like decisions) lasts. Failures and empty
    /// answers are not kept: the next delivery asks again.
    async fn addresses(&self, host: &str) -> Result<Answer<IpAddr>, PolicyError> {
        if let Some(answer) = self.lock().addresses.get(host, self.clock.now()) {
            return Ok(answer.clone());
        }
        let answer = self
            .dns
            .addresses(host)
            .await
            .map_err(|failure| temporary(LookupStage::Mx, failure))?;
        if !answer.records().is_empty() {
            let ttl = Duration::from_secs(u64::from(answer.ttl)).clamp(MIN_CACHE_TTL, MAX_CACHE_TTL);
            let now = self.clock.now();
            self.lock()
                .addresses
                .insert(host.to_owned(), answer.clone(), now + ttl, now);
        }
        Ok(answer)
    }
}

impl<D: DnsLookup, F: StsFetch> PolicyLookup for PolicyResolver<D, F> {
    fn resolve(&self, domain: &str) -> impl Future<Output = Result<Arc<DomainPolicy>, PolicyError>> + Send {
        let inner = self.inner.clone();
        let domain = normalize(domain);
        async move {
            let domain = domain?;
            let shared = {
                let mut state = inner.lock();
                let now = inner.clock.now();
                if let Some(outcome) = state.cache.get(&domain, now) {
                    inner.hits.fetch_add(1, Ordering::Relaxed);
                    return outcome.clone();
                }
                if let Some(running) = state.inflight.get(&domain) {
                    inner.joined.fetch_add(1, Ordering::Relaxed);
                    running.clone()
                } else {
                    inner.lookups.fetch_add(1, Ordering::Relaxed);
                    let running = inner.clone().lookup(domain.clone()).boxed().shared();
                    state.inflight.insert(domain, running.clone());
                    running
                }
            };
            shared.await
        }
    }

    fn addresses(&self, mx: &MxCandidate) -> impl Future<Output = Result<Vec<IpAddr>, PolicyError>> + Send {
        let inner = self.inner.clone();
        let host = String::from(mx.host.clone());
        let dane = matches!(mx.auth, PeerAuth::Dane { .. });
        async move {
            let answer = inner.addresses(&host).await?;
            let addresses = answer.records().to_vec();
            if addresses.is_empty() {
                return Err(PolicyError::Temporary {
                    stage: LookupStage::Mx,
                    reason: format!("MX host {host} has no A or AAAA records"),
                });
            }
            if dane && answer.security != Security::Secure {
                return Err(PolicyError::Temporary {
                    stage: LookupStage::Dane,
                    reason: format!(
                        "MX host {host} has DANE TLSA records but its A/AAAA answers are not DNSSEC-secure"
                    ),
                });
            }
            Ok(addresses)
        }
    }

    fn mta_sts_patterns(&self, domain: &str, id: &str) -> Option<Vec<String>> {
        let domain = normalize(domain).ok()?;
        self.inner
            .sts
            .cached_policy(&domain, id)
            .map(|policy| policy.mx.clone())
    }
}
