//! `check-domain`: what the resolver sees for a recipient domain and the policy it would apply, for people.

use std::fmt::{self, Display, Formatter, Write as _};

use super::decide::{DomainFacts, MxFacts, TlsaFact, decide, find_override};
use super::dns::DnsLookup;
use super::mta_sts::{StsFact, StsFetch};
use super::resolver::PolicyResolver;
use super::{DomainPolicy, PeerAuth, PolicyError, Tlsa};
use crate::evidence::PolicySource;
use securemail_api::tenant::{OnFailure, TlsVersion};

/// Facts and decision for one domain, fresh from DNS (the MTA-STS policy cache still applies).
#[derive(Clone, Debug)]
pub struct DomainReport {
    pub domain: String,
    /// The tenant override for this domain, described.
    pub override_note: Option<String>,
    pub facts: Result<DomainFacts, PolicyError>,
    /// Absent when the facts could not be gathered.
    pub decision: Option<Result<DomainPolicy, PolicyError>>,
}

/// Looks `domain` up without using or filling the decision cache.
pub async fn check_domain<D: DnsLookup, F: StsFetch>(resolver: &PolicyResolver<D, F>, domain: &str) -> DomainReport {
    let spec = resolver.spec();
    let override_note = find_override(spec, domain).map(|o| {
        let mut note = format!("override for {}:", o.domain);
        if let Some(mode) = o.mode {
            let _ = write!(note, " mode {mode:?}");
        }
        if let Some(version) = o.min_version {
            let _ = write!(note, " minVersion {version:?}");
        }
        if o.allow_cleartext == Some(true) {
            let _ = write!(note, " allowCleartext");
        }
        if let Some(exception) = &o.exception {
            let _ = write!(note, " (exception approved by {})", exception.approved_by);
        }
        note
    });
    let facts = resolver.facts(domain).await;
    let decision = facts.as_ref().ok().map(|facts| decide(spec, facts));
    DomainReport {
        domain: domain.to_owned(),
        override_note,
        facts,
        decision,
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().fold(String::with_capacity(data.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn tlsa_line(t: &Tlsa) -> String {
    format!("{} {} {} {}", t.usage, t.selector, t.matching, hex(&t.data))
}

fn source_name(source: PolicySource) -> &'static str {
    match source {
        PolicySource::Dane => "DANE",
        PolicySource::MtaSts => "MTA-STS",
        PolicySource::Tenant => "tenant policy",
        PolicySource::Override => "domain override",
    }
}

impl Display for DomainReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(f, "Recipient domain: {}", self.domain)?;
        if let Some(note) = &self.override_note {
            writeln!(f, "Tenant {note}")?;
        }
        let facts = match &self.facts {
            Ok(facts) => facts,
            Err(error) => return writeln!(f, "Lookup failed: {error}"),
        };
        match &facts.mx {
            MxFacts::Hosts { hosts, secure } => {
                let status = if *secure { "DNSSEC-secure" } else { "not DNSSEC-secure" };
                writeln!(f, "MX records ({status}):")?;
                for mx in hosts {
                    let name = if mx.exchange.is_empty() { "." } else { &mx.exchange };
                    writeln!(f, "  {:>5} {name}", mx.preference)?;
                }
            }
            MxFacts::Implicit { secure } => {
                let status = if *secure { "DNSSEC-secure" } else { "not DNSSEC-secure" };
                writeln!(f, "MX records: none; the domain itself is the MX (addresses {status})")?;
            }
            MxFacts::Null => writeln!(f, "MX records: null MX (RFC 7505), no mail accepted")?,
            MxFacts::NxDomain => writeln!(f, "MX records: the domain does not exist (NXDOMAIN)")?,
        }
        if facts.tlsa.is_empty() {
            writeln!(f, "TLSA: not looked up (DANE off, or the MX set is not DNSSEC-secure)")?;
        }
        for (host, fact) in &facts.tlsa {
            match fact {
                TlsaFact::NotLooked => writeln!(f, "TLSA _25._tcp.{host}: not looked up")?,
                TlsaFact::Secure { all, usable } => {
                    writeln!(
                        f,
                        "TLSA _25._tcp.{host} (secure, {} of {} usable):",
                        usable.len(),
                        all.len()
                    )?;
                    for t in all {
                        let mark = if usable.contains(t) { "" } else { "  [unusable]" };
                        writeln!(f, "  {}{mark}", tlsa_line(t))?;
                    }
                }
                TlsaFact::NoDane { reason } => writeln!(f, "TLSA _25._tcp.{host}: {reason}")?,
                TlsaFact::Failed(reason) => writeln!(f, "TLSA _25._tcp.{host}: TEMPORARY FAILURE: {reason}")?,
            }
        }
        match &facts.mta_sts {
            StsFact::NotLooked => writeln!(f, "MTA-STS: not looked up")?,
            StsFact::Absent => writeln!(f, "MTA-STS: no policy published")?,
            StsFact::Policy {
                id,
                policy,
                stale_refresh,
            } => {
                writeln!(
                    f,
                    "MTA-STS: id {id}, mode {}, max_age {} s",
                    policy.mode, policy.max_age
                )?;
                for pattern in &policy.mx {
                    writeln!(f, "  mx: {pattern}")?;
                }
                if let Some(reason) = stale_refresh {
                    writeln!(f, "  (cached policy in use; refresh failed: {reason})")?;
                }
            }
            StsFact::Failed(reason) => writeln!(f, "MTA-STS: TEMPORARY FAILURE: {reason}")?,
        }
        match &self.decision {
            None => Ok(()),
            Some(Err(PolicyError::Temporary { reason, .. })) => writeln!(f, "Policy: none yet, try later: {reason}"),
            Some(Err(PolicyError::NoSecurePath { reason })) => {
                writeln!(f, "Policy: no secure path (tenant onFailure applies): {reason}")
            }
            Some(Err(PolicyError::Permanent { reason })) => writeln!(f, "Policy: undeliverable: {reason}"),
            Some(Ok(policy)) => {
                writeln!(
                    f,
                    "Policy: TLS >= {}, on failure {}{}",
                    match policy.min_version {
                        TlsVersion::Tls12 => "1.2",
                        TlsVersion::Tls13 => "1.3",
                    },
                    match policy.on_failure {
                        OnFailure::Defer => "defer (4.7.x, stays queued)",
                        OnFailure::Bounce => "bounce (5.7.x)",
                    },
                    if policy.allow_cleartext {
                        ", cleartext allowed when no STARTTLS (exception)"
                    } else {
                        ""
                    }
                )?;
                for mx in &policy.mx {
                    let auth = match &mx.auth {
                        PeerAuth::Dane { tlsa, .. } => format!("DANE ({} TLSA records)", tlsa.len()),
                        PeerAuth::WebPki => "WebPKI certificate valid for the MX name".to_owned(),
                        PeerAuth::AnyCertificate => "any certificate, TLS mandatory".to_owned(),
                    };
                    let id = mx
                        .policy_id
                        .as_deref()
                        .map(|id| format!(", policy id {id}"))
                        .unwrap_or_default();
                    writeln!(
                        f,
                        "  {:>5} {}: {auth} [from {}{id}]",
                        mx.preference,
                        String::from(mx.host.clone()),
                        source_name(mx.source)
                    )?;
                }
                Ok(())
            }
        }
    }
}
