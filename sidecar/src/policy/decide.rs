//! The policy decision as a pure function over DNS and MTA-STS facts already gathered, so every rule is testable
//! without a network: DANE (RFC 7672) > MTA-STS enforce (RFC 8461) > tenant mode, with per-domain overrides.

use securemail_api::tenant::{OverrideTlsMode, TlsMode, TlsOverride, TlsPolicySpec};

use super::dns::{MxRecord, Security};
use super::mta_sts::{Mode, StsFact};
use super::{DomainPolicy, LookupStage, MxCandidate, PeerAuth, PolicyError, Tlsa};
use crate::evidence::{DomainName, PolicySource};

/// The MX set as DNS gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MxFacts {
    /// `secure`: the MX RRset validated (DANE needs it).
    Hosts {
        hosts: Vec<MxRecord>,
        secure: bool,
    },
    /// No MX records: the domain itself is the MX (RFC 5321 section 5.1); `secure` if its addresses validated.
    Implicit {
        secure: bool,
    },
    /// A single "." MX (RFC 7505): the domain accepts no mail.
    Null,
    NxDomain,
}

/// The TLSA status of one MX host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsaFact {
    /// Not asked: DANE is off, or the MX RRset is not secure.
    NotLooked,
    /// A secure RRset; `usable` may be empty when every record is unusable, which counts as no TLSA.
    Secure { all: Vec<Tlsa>, usable: Vec<Tlsa> },
    /// Secure or unproven absence, or an insecure RRset: no DANE for this host.
    NoDane { reason: String },
    /// SERVFAIL, timeout or bogus: DANE cannot be ruled out, so this host is not used now.
    Failed(String),
}

/// Everything the decision needs about one recipient domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainFacts {
    pub domain: String,
    pub mx: MxFacts,
    /// Per MX host (the domain itself for an implicit MX), in MX order.
    pub tlsa: Vec<(String, TlsaFact)>,
    pub mta_sts: StsFact,
    /// Smallest DNS TTL seen, seconds.
    pub min_ttl: u32,
}

/// RFC 7672 section 3.1 / RFC 7671: usages 2 and 3, selectors 0 and 1, matching types 0, 1 and 2; matching
/// types 1 and 2 need a digest of the right length.
pub fn usable_tlsa(records: &[Tlsa]) -> Vec<Tlsa> {
    records
        .iter()
        .filter(|t| {
            matches!(t.usage, 2 | 3)
                && matches!(t.selector, 0 | 1)
                && match t.matching {
                    0 => !t.data.is_empty(),
                    1 => t.data.len() == 32,
                    2 => t.data.len() == 64,
                    _ => false,
                }
        })
        .cloned()
        .collect()
}

/// The override for `domain`, if the tenant has one.
pub fn find_override<'a>(spec: &'a TlsPolicySpec, domain: &str) -> Option<&'a TlsOverride> {
    let domain = domain.trim_end_matches('.');
    spec.overrides
        .iter()
        .find(|o| o.domain.trim_end_matches('.').eq_ignore_ascii_case(domain))
}

/// Whether DANE must be looked up for this domain.
pub fn dane_wanted(spec: &TlsPolicySpec, domain: &str) -> bool {
    spec.dane || find_override(spec, domain).is_some_and(|o| o.mode == Some(OverrideTlsMode::Dane))
}

/// Whether the tenant has an approved exception that allows cleartext to this domain. Its MX hosts' TLSA records
/// are then looked up even without DANE: a host that publishes them must get TLS (RFC 7672 section 2.2).
pub fn cleartext_excepted(spec: &TlsPolicySpec, domain: &str) -> bool {
    find_override(spec, domain).is_some_and(|o| o.allow_cleartext == Some(true) && o.exception.is_some())
}

/// MX hosts to consider, lowest preference first, without duplicates; `None` for a null MX or NXDOMAIN.
pub fn mx_hosts(facts: &DomainFacts) -> Vec<(u16, String)> {
    let mut hosts: Vec<(u16, String)> = match &facts.mx {
        MxFacts::Hosts { hosts, .. } => hosts
            .iter()
            // "." among real MX records is a misconfiguration (RFC 7505 section 3); ignore it.
            .filter(|mx| !mx.exchange.is_empty())
            .map(|mx| (mx.preference, mx.exchange.clone()))
            .collect(),
        MxFacts::Implicit { .. } => vec![(0, facts.domain.clone())],
        MxFacts::Null | MxFacts::NxDomain => Vec::new(),
    };
    hosts.sort_by_key(|(preference, _)| *preference);
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|(_, host)| seen.insert(host.clone()));
    hosts
}

/// Decides the policy. Logs (never errors on) MTA-STS `testing`/`none` and skipped hosts.
pub fn decide(spec: &TlsPolicySpec, facts: &DomainFacts) -> Result<DomainPolicy, PolicyError> {
    let domain = facts.domain.as_str();
    match &facts.mx {
        MxFacts::NxDomain => {
            return Err(PolicyError::Permanent {
                reason: format!("recipient domain {domain} does not exist (NXDOMAIN)"),
            });
        }
        MxFacts::Null => {
            return Err(PolicyError::Permanent {
                reason: format!("recipient domain {domain} publishes a null MX (RFC 7505): it accepts no mail"),
            });
        }
        MxFacts::Hosts { hosts, .. } if hosts.iter().all(|mx| mx.exchange.is_empty()) => {
            return Err(PolicyError::Permanent {
                reason: format!("recipient domain {domain} publishes a null MX (RFC 7505): it accepts no mail"),
            });
        }
        MxFacts::Hosts { .. } | MxFacts::Implicit { .. } => {}
    }
    let over = find_override(spec, domain);
    let dane_required = over.is_some_and(|o| o.mode == Some(OverrideTlsMode::Dane));
    let tlsa_of = |host: &str| {
        facts
            .tlsa
            .iter()
            .find(|(h, _)| h == host)
            .map_or(&TlsaFact::NotLooked, |(_, fact)| fact)
    };

    // DANE needs the MX RRset (or, for an implicit MX, the domain's addresses) to be secure (RFC 7672 2.2.1).
    let mx_secure = dane_wanted(spec, domain)
        && matches!(
            facts.mx,
            MxFacts::Hosts { secure: true, .. } | MxFacts::Implicit { secure: true }
        );
    let mut failures = Vec::new();
    let mut dane = Vec::new();
    let mut rest = Vec::new();
    for (preference, host) in mx_hosts(facts) {
        match tlsa_of(&host) {
            TlsaFact::Secure { usable, .. } if mx_secure && !usable.is_empty() => {
                dane.push((preference, host, usable.clone()))
            }
            TlsaFact::Failed(reason) if mx_secure => {
                // RFC 7672 section 2.2: a host whose TLSA lookup fails is skipped, never used without DANE.
                tracing::warn!(domain, mx = %host, %reason, "skipping MX host: TLSA lookup failed");
                failures.push(format!("MX {host}: {reason}"));
            }
            _ => rest.push((preference, host)),
        }
    }

    let mut candidates = Vec::new();
    for (preference, host, tlsa) in dane {
        candidates.push(candidate(
            &host,
            preference,
            PeerAuth::Dane {
                tlsa,
                reference_names: vec![host.clone()],
            },
            PolicySource::Dane,
            None,
        )?);
    }

    if dane_required {
        if candidates.is_empty() {
            return Err(no_path_or_temporary(
                &failures,
                format!(
                    "recipient domain {domain} publishes no usable DANE TLSA records; the tenant's policy requires \
                     DANE"
                ),
            ));
        }
        if !rest.is_empty() {
            tracing::info!(
                domain,
                skipped = rest.len(),
                "DANE required: MX hosts without usable TLSA left out"
            );
        }
    } else if !rest.is_empty() {
        non_dane_candidates(spec, facts, over, &rest, &mut candidates, &failures)?;
    }

    if candidates.is_empty() {
        // Only failed TLSA lookups keep every host out of both lists.
        let stage = if failures.is_empty() {
            LookupStage::Mx
        } else {
            LookupStage::Dane
        };
        return Err(PolicyError::Temporary {
            stage,
            reason: format!("no usable MX host for {domain}: {}", failures.join("; ")),
        });
    }
    candidates.sort_by_key(|c| c.preference);

    let min_version = over
        .and_then(|o| o.min_version)
        .map_or(spec.min_version, |v| v.max(spec.min_version));
    // Cleartext only with an approved exception, never where DANE or MTA-STS asks for authenticated TLS, and never
    // to a domain with a host that publishes TLSA records, usable or not, or whose TLSA lookup failed: RFC 7672
    // section 2.2 makes TLS mandatory for such a host, and the policy table Postfix reads is per domain.
    let tls_published = facts
        .tlsa
        .iter()
        .any(|(_, fact)| matches!(fact, TlsaFact::Secure { .. } | TlsaFact::Failed(_)));
    let allow_cleartext = cleartext_excepted(spec, domain)
        && !tls_published
        && candidates
            .iter()
            .all(|c| matches!(c.source, PolicySource::Tenant | PolicySource::Override));
    if cleartext_excepted(spec, domain) && tls_published {
        tracing::info!(
            domain,
            "cleartext exception not applied: an MX host publishes TLSA records"
        );
    }
    Ok(DomainPolicy {
        mx: candidates,
        min_version,
        on_failure: spec.on_failure,
        allow_cleartext,
    })
}

/// MTA-STS enforce, else the tenant's (or the override's) mode, for the hosts without DANE.
fn non_dane_candidates(
    spec: &TlsPolicySpec,
    facts: &DomainFacts,
    over: Option<&TlsOverride>,
    rest: &[(u16, String)],
    candidates: &mut Vec<MxCandidate>,
    failures: &[String],
) -> Result<(), PolicyError> {
    let domain = facts.domain.as_str();
    if spec.mta_sts {
        match &facts.mta_sts {
            StsFact::Policy { id, policy, .. } if policy.mode == Mode::Enforce => {
                for (preference, host) in rest {
                    if policy.matches(host) {
                        candidates.push(candidate(
                            host,
                            *preference,
                            PeerAuth::WebPki,
                            PolicySource::MtaSts,
                            Some(id.clone()),
                        )?);
                    }
                }
                if candidates.is_empty() {
                    let hosts: Vec<&str> = rest.iter().map(|(_, h)| h.as_str()).collect();
                    return Err(no_path_or_temporary(
                        failures,
                        format!(
                            "MTA-STS policy {id} of {domain} is in enforce mode, but none of the MX hosts [{}] \
                             matches its mx patterns [{}]",
                            hosts.join(", "),
                            policy.mx.join(", ")
                        ),
                    ));
                }
                return Ok(());
            }
            StsFact::Policy { id, policy, .. } => {
                tracing::info!(domain, policy_id = %id, mode = %policy.mode, "MTA-STS policy not enforced; using the tenant policy");
            }
            // RFC 8461 treats an unfetchable policy as none; for PHI we defer rather than risk a downgrade.
            StsFact::Failed(reason) if !candidates.is_empty() => {
                tracing::warn!(domain, %reason, "MTA-STS policy unobtainable: delivering to the DANE hosts only");
                return Ok(());
            }
            StsFact::Failed(reason) => {
                return Err(PolicyError::Temporary {
                    stage: LookupStage::MtaSts,
                    reason: format!("{domain} announces an MTA-STS policy that cannot be obtained: {reason}"),
                });
            }
            StsFact::NotLooked | StsFact::Absent => {}
        }
    }
    let tenant_mode = spec.mode;
    let (mode, source) = match over.and_then(|o| o.mode) {
        Some(OverrideTlsMode::Verified) => (TlsMode::Verified, PolicySource::Override),
        Some(OverrideTlsMode::Encrypted)
            if tenant_mode == TlsMode::Verified && over.is_some_and(|o| o.exception.is_none()) =>
        {
            // The CRD refuses this; should it get through anyway, the looser mode is not honoured.
            tracing::warn!(domain, "override mode encrypted without an exception ignored");
            (tenant_mode, PolicySource::Tenant)
        }
        Some(OverrideTlsMode::Encrypted) => (TlsMode::Encrypted, PolicySource::Override),
        Some(OverrideTlsMode::Dane) | None => (tenant_mode, PolicySource::Tenant),
    };
    let auth = match mode {
        TlsMode::Verified => PeerAuth::WebPki,
        TlsMode::Encrypted => PeerAuth::AnyCertificate,
    };
    for (preference, host) in rest {
        candidates.push(candidate(host, *preference, auth.clone(), source, None)?);
    }
    Ok(())
}

/// A domain without a secure path, unless a TLSA failure might have hidden one.
fn no_path_or_temporary(failures: &[String], reason: String) -> PolicyError {
    if failures.is_empty() {
        PolicyError::NoSecurePath { reason }
    } else {
        PolicyError::Temporary {
            stage: LookupStage::Dane,
            reason: format!("{reason}; and lookups failed: {}", failures.join("; ")),
        }
    }
}

fn candidate(
    host: &str,
    preference: u16,
    auth: PeerAuth,
    source: PolicySource,
    policy_id: Option<String>,
) -> Result<MxCandidate, PolicyError> {
    let host = DomainName::new(host).map_err(|error| PolicyError::Temporary {
        stage: LookupStage::Mx,
        reason: format!("MX host name {host:?} refused: {error}"),
    })?;
    Ok(MxCandidate {
        host,
        preference,
        auth,
        source,
        policy_id,
    })
}

/// Classifies a TLSA answer for a host whose MX RRset is secure.
pub fn tlsa_fact(answer: Result<super::dns::Answer<Tlsa>, super::dns::DnsFailure>) -> TlsaFact {
    match answer {
        Err(failure) => TlsaFact::Failed(failure.to_string()),
        Ok(answer) => match answer.security {
            Security::Secure if !answer.records().is_empty() => TlsaFact::Secure {
                usable: usable_tlsa(answer.records()),
                all: answer.records().to_vec(),
            },
            Security::Secure => TlsaFact::NoDane {
                reason: "no TLSA records (secure denial)".to_owned(),
            },
            Security::Insecure if answer.records().is_empty() => TlsaFact::NoDane {
                reason: "no TLSA records".to_owned(),
            },
            Security::Insecure => TlsaFact::NoDane {
                reason: "TLSA records are not DNSSEC-signed".to_owned(),
            },
        },
    }
}
