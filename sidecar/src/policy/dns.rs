//! DNS lookups for policy resolution, with DNSSEC validated in-process by hickory against our own trust anchors
//! (a resolver's AD bit is not trusted). Every answer is classified: records, NODATA or NXDOMAIN, each secure or
//! insecure; bogus answers, SERVFAIL, REFUSED and timeouts are temporary failures ([`DnsFailure`]), never "absent".

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use securemail_api::sidecar_config::DnsSettings;

use super::Tlsa;

/// Whether an answer was proven by a DNSSEC chain from the trust anchors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    Secure,
    /// Provably unsigned, or (for negative answers) no proof of nonexistence in hand: hickory keeps the NSEC
    /// proof only on some paths, so a negative answer is only called secure when the proof is there. Nothing
    /// security-relevant relies on a negative answer being secure (no TLSA means no DANE either way).
    Insecure,
}

/// What a name has for one record type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found<T> {
    Records(Vec<T>),
    /// The name exists, without records of this type.
    NoData,
    NxDomain,
}

/// One classified answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer<T> {
    pub found: Found<T>,
    pub security: Security,
    /// Smallest TTL in the answer (negative answers: a short default), in seconds.
    pub ttl: u32,
}

impl<T> Answer<T> {
    pub fn records(&self) -> &[T] {
        match &self.found {
            Found::Records(records) => records,
            Found::NoData | Found::NxDomain => &[],
        }
    }
}

/// One MX record; `exchange` is lowercase without the root dot, empty for the null MX (RFC 7505).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    pub exchange: String,
}

/// A lookup that could not be answered: try again later.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DNS {rtype} lookup for {name} failed: {reason}")]
pub struct DnsFailure {
    pub name: String,
    pub rtype: &'static str,
    pub reason: String,
}

/// TTL used for negative answers, whose SOA minimum hickory does not always pass on.
const NEGATIVE_TTL: u32 = 60;

/// The lookups policy resolution needs. [`HickoryDns`] in production; tests may serve fixed answers.
pub trait DnsLookup: Send + Sync + 'static {
    fn mx(&self, domain: &str) -> impl Future<Output = Result<Answer<MxRecord>, DnsFailure>> + Send;
    /// TLSA at `_25._tcp.<host>`, every record as published (usability is decided later).
    fn tlsa(&self, host: &str) -> impl Future<Output = Result<Answer<Tlsa>, DnsFailure>> + Send;
    /// TXT records, the strings of each record concatenated.
    fn txt(&self, name: &str) -> impl Future<Output = Result<Answer<String>, DnsFailure>> + Send;
    /// A and AAAA together: secure only if every family that returned addresses is secure.
    fn addresses(&self, host: &str) -> impl Future<Output = Result<Answer<IpAddr>, DnsFailure>> + Send;
}

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DnsSetupError {
    #[error(
        "DNSSEC trust anchor file {path}: {reason} (DNSKEY records in zone-file format are accepted; DS records \
         are not supported by the validator)"
    )]
    TrustAnchor { path: String, reason: String },
    #[error("cannot read /etc/resolv.conf (set dns.nameservers to avoid it): {0}")]
    SystemConfig(String),
    #[error("cannot build the DNS resolver: {0}")]
    Build(String),
}

/// hickory's resolver with DNSSEC validation always on.
#[derive(Clone)]
pub struct HickoryDns {
    resolver: Arc<TokioResolver>,
}

impl std::fmt::Debug for HickoryDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HickoryDns").finish_non_exhaustive()
    }
}

impl HickoryDns {
    pub fn from_settings(settings: &DnsSettings) -> Result<Self, DnsSetupError> {
        let (config, mut options) = if settings.nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(|error| DnsSetupError::SystemConfig(error.to_string()))?
        } else {
            let servers = settings
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            (
                ResolverConfig::from_parts(None, vec![], servers),
                ResolverOpts::default(),
            )
        };
        // Short per-try timeout with retries: a slow answer defers mail (4xx), it never downgrades the policy.
        options.timeout = Duration::from_secs(2);
        options.attempts = 3;
        options.edns0 = true;
        options.validate = true;
        options.try_tcp_on_error = true;
        // /etc/hosts entries would be unsigned and could shadow a recipient's MX.
        options.use_hosts_file = ResolveHosts::Never;
        options.ndots = 0;
        let anchors = match &settings.trust_anchor_file {
            Some(path) => TrustAnchors::from_file(path).map_err(|error| DnsSetupError::TrustAnchor {
                path: path.display().to_string(),
                reason: error.to_string(),
            })?,
            None => TrustAnchors::default(),
        };
        // The path option alone only switches validation on and keeps the IANA anchors: pass the keys themselves.
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .with_trust_anchor(Arc::new(anchors))
            .build()
            .map_err(|error| DnsSetupError::Build(error.to_string()))?;
        Ok(Self {
            resolver: Arc::new(resolver),
        })
    }

    async fn query(&self, name: &str, rtype: RecordType) -> Result<Answer<RData>, DnsFailure> {
        let failure = |reason: String| DnsFailure {
            name: name.to_owned(),
            rtype: rtype_name(rtype),
            reason,
        };
        let fqdn = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
            .map_err(|error| failure(format!("not a valid DNS name: {error}")))?;
        match self.resolver.lookup(fqdn, rtype).await {
            Ok(lookup) => classify_records(lookup.answers(), rtype).map_err(failure),
            Err(error) => classify_error(error).map_err(failure),
        }
    }
}

fn rtype_name(rtype: RecordType) -> &'static str {
    match rtype {
        RecordType::MX => "MX",
        RecordType::TLSA => "TLSA",
        RecordType::TXT => "TXT",
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        _ => "other",
    }
}

/// A positive answer: the records of the asked type (after any CNAME chain), secure only if the whole chain is.
fn classify_records(records: &[Record], rtype: RecordType) -> Result<Answer<RData>, String> {
    let relevant: Vec<&Record> = records
        .iter()
        .filter(|r| r.record_type() == rtype || r.record_type() == RecordType::CNAME)
        .collect();
    let security = combined_security(relevant.iter().map(|r| r.proof))?;
    let data: Vec<RData> = relevant
        .iter()
        .filter(|r| r.record_type() == rtype)
        .map(|r| r.data.clone())
        .collect();
    let ttl = relevant.iter().map(|r| r.ttl).min().unwrap_or(NEGATIVE_TTL);
    let found = if data.is_empty() {
        Found::NoData
    } else {
        Found::Records(data)
    };
    Ok(Answer { found, security, ttl })
}

fn combined_security(proofs: impl Iterator<Item = Proof>) -> Result<Security, String> {
    let mut security = Security::Secure;
    for proof in proofs {
        match proof {
            Proof::Secure => {}
            Proof::Insecure => security = Security::Insecure,
            Proof::Bogus => return Err("DNSSEC validation failed (bogus answer)".to_owned()),
            Proof::Indeterminate => return Err("DNSSEC status indeterminate".to_owned()),
        }
    }
    Ok(security)
}

fn classify_error(error: NetError) -> Result<Answer<RData>, String> {
    let negative = |code: ResponseCode, security| Answer {
        found: if code == ResponseCode::NXDomain {
            Found::NxDomain
        } else {
            Found::NoData
        },
        security,
        ttl: NEGATIVE_TTL,
    };
    match error {
        NetError::Dns(DnsError::NoRecordsFound(no_records)) => {
            // Validated negative answers keep their signed NSEC/NSEC3 records among the authorities.
            let proven = no_records.authorities.as_deref().is_some_and(|records| {
                records.iter().any(|r| {
                    r.proof == Proof::Secure && matches!(r.record_type(), RecordType::NSEC | RecordType::NSEC3)
                })
            });
            let security = if proven { Security::Secure } else { Security::Insecure };
            let ttl = no_records.negative_ttl.unwrap_or(NEGATIVE_TTL);
            Ok(Answer {
                ttl,
                ..negative(no_records.response_code, security)
            })
        }
        NetError::Dns(DnsError::Nsec { response, proof, .. }) => match proof {
            Proof::Insecure => Ok(negative(response.response_code, Security::Insecure)),
            Proof::Secure => Ok(negative(response.response_code, Security::Secure)),
            Proof::Bogus | Proof::Indeterminate => Err(format!("negative answer with {proof} proof")),
        },
        NetError::Dns(DnsError::DnssecBogus) => Err("DNSSEC validation failed (bogus answer)".to_owned()),
        NetError::Dns(DnsError::ResponseCode(code)) => Err(format!("server answered {code}")),
        NetError::Timeout => Err("timed out".to_owned()),
        other => Err(other.to_string()),
    }
}

/// Lowercase, without the root dot.
fn host_name(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

fn map_answer<T>(answer: Answer<RData>, f: impl Fn(RData) -> Option<T>) -> Answer<T> {
    let found = match answer.found {
        Found::Records(records) => {
            let mapped: Vec<T> = records.into_iter().filter_map(f).collect();
            if mapped.is_empty() {
                Found::NoData
            } else {
                Found::Records(mapped)
            }
        }
        Found::NoData => Found::NoData,
        Found::NxDomain => Found::NxDomain,
    };
    Answer {
        found,
        security: answer.security,
        ttl: answer.ttl,
    }
}

impl DnsLookup for HickoryDns {
    async fn mx(&self, domain: &str) -> Result<Answer<MxRecord>, DnsFailure> {
        let answer = self.query(domain, RecordType::MX).await?;
        Ok(map_answer(answer, |rdata| match rdata {
            RData::MX(mx) => Some(MxRecord {
                preference: mx.preference,
                exchange: host_name(&mx.exchange),
            }),
            _ => None,
        }))
    }

    async fn tlsa(&self, host: &str) -> Result<Answer<Tlsa>, DnsFailure> {
        let answer = self.query(&format!("_25._tcp.{host}"), RecordType::TLSA).await?;
        Ok(map_answer(answer, |rdata| match rdata {
            RData::TLSA(tlsa) => Some(Tlsa {
                usage: tlsa.cert_usage.into(),
                selector: tlsa.selector.into(),
                matching: tlsa.matching.into(),
                data: tlsa.cert_data,
            }),
            _ => None,
        }))
    }

    async fn txt(&self, name: &str) -> Result<Answer<String>, DnsFailure> {
        let answer = self.query(name, RecordType::TXT).await?;
        Ok(map_answer(answer, |rdata| match rdata {
            RData::TXT(txt) => {
                let bytes: Vec<u8> = txt.txt_data.iter().flat_map(|s| s.iter().copied()).collect();
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            _ => None,
        }))
    }

    async fn addresses(&self, host: &str) -> Result<Answer<IpAddr>, DnsFailure> {
        let (v4, v6) = futures::join!(self.query(host, RecordType::A), self.query(host, RecordType::AAAA));
        let to_ip = |rdata| match rdata {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        };
        merge_families(v4.map(|a| map_answer(a, to_ip)), v6.map(|a| map_answer(a, to_ip)))
    }
}

/// One family failing is fine when the other has addresses; both empty with a failure is a failure.
fn merge_families(
    v4: Result<Answer<IpAddr>, DnsFailure>,
    v6: Result<Answer<IpAddr>, DnsFailure>,
) -> Result<Answer<IpAddr>, DnsFailure> {
    let (ok, failure): (Vec<_>, Vec<_>) = [v4, v6].into_iter().partition(Result::is_ok);
    let answers: Vec<Answer<IpAddr>> = ok.into_iter().flatten().collect();
    let addresses: Vec<IpAddr> = answers.iter().flat_map(|a| a.records().iter().copied()).collect();
    if addresses.is_empty()
        && let Some(Err(failure)) = failure.into_iter().next()
    {
        return Err(failure);
    }
    let with_records = answers.iter().filter(|a| !a.records().is_empty());
    let security = if with_records.clone().all(|a| a.security == Security::Secure) {
        Security::Secure
    } else {
        Security::Insecure
    };
    let ttl = answers.iter().map(|a| a.ttl).min().unwrap_or(NEGATIVE_TTL);
    let found = if !addresses.is_empty() {
        Found::Records(addresses)
    } else if answers.iter().all(|a| a.found == Found::NxDomain) {
        Found::NxDomain
    } else {
        Found::NoData
    };
    // Without any address there is nothing to be secure about; keep the negative answers' own status.
    let security = if matches!(found, Found::Records(_)) {
        security
    } else if answers.iter().all(|a| a.security == Security::Secure) {
        Security::Secure
    } else {
        Security::Insecure
    };
    Ok(Answer { found, security, ttl })
}

/// Lets one lookup implementation be shared (e.g. with the MTA-STS fetcher, or a test that inspects it).
impl<T: DnsLookup> DnsLookup for Arc<T> {
    fn mx(&self, domain: &str) -> impl Future<Output = Result<Answer<MxRecord>, DnsFailure>> + Send {
        (**self).mx(domain)
    }
    fn tlsa(&self, host: &str) -> impl Future<Output = Result<Answer<Tlsa>, DnsFailure>> + Send {
        (**self).tlsa(host)
    }
    fn txt(&self, name: &str) -> impl Future<Output = Result<Answer<String>, DnsFailure>> + Send {
        (**self).txt(name)
    }
    fn addresses(&self, host: &str) -> impl Future<Output = Result<Answer<IpAddr>, DnsFailure>> + Send {
        (**self).addresses(host)
    }
}
