//! MTA-STS (RFC 8461): the `_mta-sts` TXT record, the policy file, and the per-domain policy cache.

pub mod cache;
pub mod fetch;

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use super::clock::Clock;
use super::dns::{DnsLookup, Found};
use cache::{Cached, StsCache};

/// Longest `max_age` RFC 8461 allows (about one year), in seconds; a longer one is cut to it.
pub const MAX_MAX_AGE: u64 = 31_557_600;

/// The policy's `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Testing => "testing",
            Self::None => "none",
        })
    }
}

/// A parsed policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StsPolicy {
    pub mode: Mode,
    /// `mx` patterns, lowercase, without a trailing dot; a leading `*.` matches exactly one label.
    pub mx: Vec<String>,
    pub max_age: u64,
}

impl StsPolicy {
    /// Whether `host` (lowercase, no root dot) matches one of the `mx` patterns (RFC 8461 section 4.1).
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|pattern| match pattern.strip_prefix("*.") {
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => *pattern == host,
        })
    }

    /// The policy in RFC 8461 syntax; [`parse_policy`] reads it back as the same policy.
    pub fn text(&self) -> String {
        let mut text = format!("version: STSv1\nmode: {}\n", self.mode);
        for pattern in &self.mx {
            text.push_str(&format!("mx: {pattern}\n"));
        }
        text.push_str(&format!("max_age: {}\n", self.max_age));
        text
    }
}

/// RFC 8461 section 3.1: 1 to 32 letters or digits.
fn valid_id(id: &str) -> bool {
    (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A refused TXT record or policy file; the message names the record, line or field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Picks the one `v=STSv1` record among a name's TXT records and returns its `id`.
pub fn parse_txt(records: &[String]) -> Result<String, ParseError> {
    let sts: Vec<&String> = records.iter().filter(|r| r.starts_with("v=STSv1")).collect();
    let record = match sts.as_slice() {
        [one] => *one,
        [] => return Err(ParseError("no TXT record starts with v=STSv1".to_owned())),
        many => {
            return Err(ParseError(format!(
                "{} TXT records start with v=STSv1; exactly one is allowed",
                many.len()
            )));
        }
    };
    let mut fields = record.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next() != Some("v=STSv1") {
        return Err(ParseError(format!(
            "TXT record {record:?} must begin with the field v=STSv1"
        )));
    }
    let mut id = None;
    for field in fields {
        let Some((key, value)) = field.split_once('=') else {
            return Err(ParseError(format!("TXT field {field:?} is not key=value")));
        };
        if key == "id" {
            if !valid_id(value) {
                return Err(ParseError(format!(
                    "TXT field id={value:?} must be 1 to 32 letters or digits"
                )));
            }
            if id.replace(value.to_owned()).is_some() {
                return Err(ParseError("TXT record has more than one id field".to_owned()));
            }
        }
        // Other extension fields are ignored (RFC 8461 section 3.1).
    }
    id.ok_or_else(|| ParseError(format!("TXT record {record:?} has no id field")))
}

/// Parses a policy file (RFC 8461 section 3.2); CRLF or LF line ends.
pub fn parse_policy(text: &str) -> Result<StsPolicy, ParseError> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for (index, raw) in text.split('\n').enumerate() {
        let line_no = index + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(ParseError(format!("policy line {line_no}: expected \"key: value\"")));
        };
        let (key, value) = (key.trim(), value.trim());
        let once = |seen: bool| {
            if seen {
                Err(ParseError(format!("policy line {line_no}: field {key} appears twice")))
            } else {
                Ok(())
            }
        };
        match key {
            "version" => {
                once(version.is_some())?;
                if value != "STSv1" {
                    return Err(ParseError(format!("policy line {line_no}: version must be STSv1")));
                }
                version = Some(());
            }
            "mode" => {
                once(mode.is_some())?;
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    _ => {
                        return Err(ParseError(format!(
                            "policy line {line_no}: mode must be enforce, testing or none"
                        )));
                    }
                });
            }
            "max_age" => {
                once(max_age.is_some())?;
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ParseError(format!(
                        "policy line {line_no}: max_age must be a number of seconds"
                    )));
                }
                // Above the RFC 8461 section 3.2 maximum (or beyond u64): capped, so the policy still applies.
                max_age = Some(value.parse::<u64>().map_or(MAX_MAX_AGE, |v| v.min(MAX_MAX_AGE)));
            }
            "mx" => {
                mx.push(parse_mx_pattern(value).map_err(|why| ParseError(format!("policy line {line_no}: {why}")))?)
            }
            // Unknown fields are ignored (RFC 8461 section 3.2).
            _ => {}
        }
    }
    if version.is_none() {
        return Err(ParseError("policy has no version field".to_owned()));
    }
    let mode = mode.ok_or_else(|| ParseError("policy has no mode field".to_owned()))?;
    let max_age = max_age.ok_or_else(|| ParseError("policy has no max_age field".to_owned()))?;
    if mx.is_empty() && mode != Mode::None {
        return Err(ParseError(format!("policy in mode {mode} has no mx field")));
    }
    Ok(StsPolicy { mode, mx, max_age })
}

fn parse_mx_pattern(value: &str) -> Result<String, String> {
    let pattern = value.trim_end_matches('.').to_ascii_lowercase();
    let name = pattern.strip_prefix("*.").unwrap_or(&pattern);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(pattern)
    } else {
        Err(format!(
            "mx pattern {value:?} is not a host name (a wildcard is allowed only as the whole leftmost label, \"*.\")"
        ))
    }
}

/// Why a policy file could not be fetched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("MTA-STS policy for {domain}: {reason}")]
pub struct FetchError {
    pub domain: String,
    pub reason: String,
}

/// Fetches `https://mta-sts.<domain>/.well-known/mta-sts.txt`; [`fetch::HttpsFetcher`] in production.
pub trait StsFetch: Send + Sync + 'static {
    fn fetch(&self, domain: &str) -> impl Future<Output = Result<String, FetchError>> + Send;
}

impl<T: StsFetch> StsFetch for Arc<T> {
    fn fetch(&self, domain: &str) -> impl Future<Output = Result<String, FetchError>> + Send {
        (**self).fetch(domain)
    }
}

/// What MTA-STS says about a domain right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StsFact {
    /// MTA-STS is switched off for this tenant, or no MX host needed it.
    NotLooked,
    /// No (valid) `_mta-sts` TXT record and nothing cached.
    Absent,
    Policy {
        id: String,
        policy: Arc<StsPolicy>,
        /// Served from the cache because a refresh failed (the reason).
        stale_refresh: Option<String>,
    },
    /// A policy should exist but could not be obtained, and nothing is cached.
    Failed(String),
}

/// Policies by domain, refreshed when the TXT id changes or `max_age` runs out.
pub struct MtaSts<F> {
    fetcher: F,
    cache: Arc<StsCache>,
}

impl<F: StsFetch> MtaSts<F> {
    /// With a cache of its own, in memory.
    pub fn new(fetcher: F, clock: Arc<dyn Clock>) -> Self {
        Self::with_cache(fetcher, Arc::new(StsCache::in_memory(clock)))
    }

    /// With `cache`, which may be kept on disk and shared with the resolvers that replace this one.
    pub fn with_cache(fetcher: F, cache: Arc<StsCache>) -> Self {
        Self { fetcher, cache }
    }

    fn cached(&self, domain: &str) -> Option<Cached> {
        self.cache.get(domain)
    }

    /// The unexpired cached policy of `domain` if its identifier is `id`; never looks anything up.
    pub fn cached_policy(&self, domain: &str, id: &str) -> Option<Arc<StsPolicy>> {
        self.cached(domain)
            .filter(|cached| cached.id == id)
            .map(|cached| cached.policy)
    }

    /// The policy for `domain`: TXT first, then cache or HTTPS fetch (RFC 8461 section 5).
    pub async fn lookup<D: DnsLookup>(&self, dns: &D, domain: &str) -> StsFact {
        let from_cache = |cached: Cached, stale_refresh| StsFact::Policy {
            id: cached.id,
            policy: cached.policy,
            stale_refresh,
        };
        let cached = self.cached(domain);
        let txt_name = format!("_mta-sts.{domain}");
        let id = match dns.txt(&txt_name).await {
            Err(failure) => {
                return match cached {
                    Some(cached) => from_cache(cached, Some(failure.to_string())),
                    None => StsFact::Failed(failure.to_string()),
                };
            }
            Ok(answer) => match answer.found {
                Found::Records(records) => match parse_txt(&records) {
                    Ok(id) => id,
                    Err(error) => {
                        // An invalid record counts as none (RFC 8461 section 3.1); a cached policy still holds.
                        tracing::info!(domain, %error, "ignoring invalid MTA-STS TXT record");
                        return cached.map_or(StsFact::Absent, |c| from_cache(c, None));
                    }
                },
                Found::NoData | Found::NxDomain => return cached.map_or(StsFact::Absent, |c| from_cache(c, None)),
            },
        };
        if let Some(cached) = &cached
            && cached.id == id
        {
            return from_cache(cached.clone(), None);
        }
        let fetched = match self.fetcher.fetch(domain).await {
            Ok(body) => parse_policy(&body).map_err(|error| format!("MTA-STS policy for {domain}: {error}")),
            Err(error) => Err(error.to_string()),
        };
        match fetched {
            Ok(policy) => {
                let policy = Arc::new(policy);
                self.cache.insert(domain, id.clone(), policy.clone()).await;
                StsFact::Policy {
                    id,
                    policy,
                    stale_refresh: None,
                }
            }
            // A failed refresh never erases an unexpired policy (RFC 8461 section 5.1).
            Err(reason) => match cached {
                Some(cached) => from_cache(cached, Some(reason)),
                None => StsFact::Failed(reason),
            },
        }
    }
}

impl<F> fmt::Debug for MtaSts<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtaSts").finish_non_exhaustive()
    }
}
