//! The TLS policy for a recipient domain, strongest source first (DESIGN.md, "TLS policy"): DNSSEC-validated DANE
//! (RFC 7672), else MTA-STS (RFC 8461), else the tenant's `verified` / `encrypted` mode, with per-domain overrides.
//! The answer names, for every MX host to try, how its certificate must be authenticated; the delivery engine has
//! no other way to decide that, so no path leads around the policy.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use securemail_api::tenant::{OnFailure, TlsVersion};

use crate::evidence::{DomainName, PolicySource};

/// How one MX host's certificate must be authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerAuth {
    /// RFC 7672: the presented chain must match one of these usable TLSA records (usages 2 and 3 only). For usage
    /// 2 the leaf must also carry one of `reference_names` (the MX host name, RFC 7672 section 3.2.2).
    Dane {
        tlsa: Vec<Tlsa>,
        reference_names: Vec<String>,
    },
    /// A WebPKI chain valid for the MX host name (MTA-STS, tenant mode `verified`).
    WebPki,
    /// Any certificate, TLS still mandatory (tenant mode `encrypted`).
    AnyCertificate,
}

/// One TLSA record (RFC 6698), already checked to be DNSSEC-secure and usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tlsa {
    /// 2 (DANE-TA) or 3 (DANE-EE).
    pub usage: u8,
    /// 0: full certificate, 1: SubjectPublicKeyInfo.
    pub selector: u8,
    /// 0: exact, 1: SHA-256, 2: SHA-512.
    pub matching: u8,
    pub data: Vec<u8>,
}

/// One MX host to try, with the policy that governs a delivery to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxCandidate {
    pub host: DomainName,
    pub preference: u16,
    pub auth: PeerAuth,
    /// Which source decided `auth` (recorded in evidence and metrics).
    pub source: PolicySource,
    /// The policy's identifier, e.g. the MTA-STS `id`.
    pub policy_id: Option<String>,
}

/// Everything the delivery engine needs to know about a recipient domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainPolicy {
    /// MX hosts in the order to try them (lowest preference first). Hosts a policy excludes (e.g. not matching an
    /// MTA-STS `enforce` policy) are not in the list.
    pub mx: Vec<MxCandidate>,
    pub min_version: TlsVersion,
    pub on_failure: OnFailure,
    /// Only with an approved `allowCleartext` override: deliver in cleartext when the MX offers no STARTTLS.
    /// TLS is still used whenever offered.
    pub allow_cleartext: bool,
}

/// Why no policy could be decided.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Try later (Postfix keeps the mail): DNS SERVFAIL, timeout or bogus answers, an MTA-STS policy that cannot
    /// be fetched while its TXT record says one exists, ...
    #[error("{reason}")]
    Temporary { stage: LookupStage, reason: String },
    /// The domain's policy leaves no secure path (e.g. an override requires DANE and the domain has none, or no MX
    /// matches an `enforce` MTA-STS policy); the tenant's `onFailure` decides between defer and bounce.
    #[error("{reason}")]
    NoSecurePath { reason: String },
    /// The domain cannot receive mail at all (NXDOMAIN, null MX per RFC 7505).
    #[error("{reason}")]
    Permanent { reason: String },
}

/// The step of a policy lookup that failed temporarily. DNS resolution, DANE and MTA-STS break for different
/// reasons and are fixed by different people, so each has its own metric label and alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupStage {
    /// The MX RRset, or the addresses of an implicit MX or an MX host.
    Mx,
    /// The MX hosts' TLSA records (SERVFAIL, timeout, bogus), or the addresses of a DANE host that did not
    /// validate.
    Dane,
    /// The `_mta-sts` TXT record or the HTTPS policy fetch, with no cached policy to fall back on.
    MtaSts,
    /// The lookup as a whole did not finish before the delivery's deadline.
    Deadline,
}

impl LookupStage {
    pub fn as_str(self) -> &'static str {
        match self {
            LookupStage::Mx => "mx",
            LookupStage::Dane => "dane",
            LookupStage::MtaSts => "mta_sts",
            LookupStage::Deadline => "deadline",
        }
    }
}

/// Where the delivery engine gets policies and addresses from. The production implementation resolves through
/// DNS(SEC) and HTTPS; tests of the engine may serve fixed answers.
pub trait PolicyLookup: Send + Sync + 'static {
    /// The policy for `domain` (an A-label, lowercase), from cache when fresh. Concurrent calls for one domain
    /// share one lookup.
    fn resolve(&self, domain: &str) -> impl Future<Output = Result<Arc<DomainPolicy>, PolicyError>> + Send;

    /// The addresses of an MX host. For a host whose policy is DANE the A/AAAA answers must be DNSSEC-secure.
    fn addresses(&self, mx: &MxCandidate) -> impl Future<Output = Result<Vec<IpAddr>, PolicyError>> + Send;

    /// The `mx` patterns of MTA-STS policy `id` of `domain` when they are at hand without a lookup: Postfix's TLS
    /// policy table names certificate patterns, where a [`DomainPolicy`] names the hosts that matched them.
    fn mta_sts_patterns(&self, _domain: &str, _id: &str) -> Option<Vec<String>> {
        None
    }
}

pub mod check;
pub mod clock;
pub mod decide;
pub mod dns;
pub mod expiring;
pub mod mta_sts;
pub mod resolver;

pub use check::{DomainReport, check_domain};
pub use resolver::{CacheStats, PolicyResolver, SetupError};
