//! What the socketmap answers: the lookup key classified, and a decided [`DomainPolicy`] (or the reason there
//! is none) written in Postfix's `smtp_tls_policy_maps` syntax (postconf(5), TLS_README "TLS policy table").
//! Pure functions: every mapping rule is unit-tested without a network.

use securemail_api::tenant::{OnFailure, TlsVersion};

use super::netstring;
use crate::evidence::{DomainName, PolicySource};
use crate::policy::{DomainPolicy, PeerAuth, PolicyError};

/// Longest reason text sent back; Postfix logs it with the deferral.
const MAX_REASON_BYTES: usize = 400;

/// One socketmap reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A TLS policy, e.g. `dane-only protocols=>=TLSv1.2`.
    Ok(String),
    NotFound,
    /// Postfix defers the delivery and tries again later.
    Temp(String),
    /// A lookup that will not succeed when repeated; Postfix still defers (a TLS policy table cannot bounce).
    Perm(String),
}

impl Reply {
    /// The reply as one netstring. Reasons are reduced to printable text of bounded length, as they end up in
    /// Postfix's log and in deferral notices.
    pub fn encode(&self) -> Vec<u8> {
        let text = match self {
            Reply::Ok(policy) => format!("OK {policy}"),
            Reply::NotFound => "NOTFOUND ".to_owned(),
            Reply::Temp(reason) => format!("TEMP {}", printable(reason)),
            Reply::Perm(reason) => format!("PERM {}", printable(reason)),
        };
        netstring::encode(text.as_bytes())
    }
}

fn printable(reason: &str) -> String {
    let mut text: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The recipient domain a lookup key names, or the reply for a key that names none:
///
/// - `.example.org` (a parent domain) is NOTFOUND: Postfix asks for parent domains only after every table said
///   NOTFOUND for the domain itself, which this map never does for a valid domain;
/// - `[host]`, `[host]:port`, `host:port` and IP addresses are explicit relays, not recipient domains: PERM, so
///   they get their own entry ahead of this map rather than a silent default;
/// - anything else that is not a DNS name is PERM, naming what is wrong (never repeating the key: a mistaken
///   lookup could carry a recipient address).
pub fn lookup_domain(key: &str) -> Result<DomainName, Reply> {
    if key.starts_with('[') || key.contains(':') || key.parse::<std::net::IpAddr>().is_ok() {
        return Err(Reply::Perm(
            "explicit next hops ([host]:port, relays) have no recipient-domain policy here: list them in a table \
             ahead of this socketmap in smtp_tls_policy_maps"
                .to_owned(),
        ));
    }
    let invalid = |err: crate::Error| Reply::Perm(format!("key is not a recipient domain: {err}"));
    match key.strip_prefix('.') {
        Some(parent) => match DomainName::new(parent) {
            Ok(_) => Err(Reply::NotFound),
            Err(err) => Err(invalid(err)),
        },
        None => DomainName::new(key).map_err(invalid),
    }
}

/// The reply for a resolved domain. `sts_patterns` are the `mx` patterns of the MTA-STS policy behind the
/// policy's MTA-STS hosts, when known. A domain without a secure path is TEMP under the tenant's `onFailure:
/// defer` and PERM under `bounce`; Postfix defers on both (a TLS policy table cannot bounce), so under `bounce`
/// only the queue lifetime turns it into a bounce.
pub fn reply_for(
    resolved: Result<&DomainPolicy, &PolicyError>,
    sts_patterns: Option<&[String]>,
    on_failure: OnFailure,
) -> Reply {
    match resolved {
        Ok(policy) => Reply::Ok(postfix_policy(policy, sts_patterns)),
        Err(PolicyError::Temporary { stage, reason }) => Reply::Temp(format!("{} lookup: {reason}", stage.as_str())),
        Err(PolicyError::NoSecurePath { reason }) => match on_failure {
            OnFailure::Defer => Reply::Temp(format!("no secure path: {reason}")),
            OnFailure::Bounce => Reply::Perm(format!("no secure path: {reason}")),
        },
        Err(PolicyError::Permanent { reason }) => Reply::Perm(reason.clone()),
    }
}

/// A decided policy as a Postfix TLS policy (`level attribute=value ...`), never weaker than the policy:
///
/// - any DANE host ⇒ `dane-only` (Postfix then uses only the hosts with usable TLSA records, which is stricter
///   than the sidecar when a domain mixes DANE and other hosts);
/// - else any MTA-STS host ⇒ `secure match=<policy patterns> servername=hostname` (`*.example.com` becomes
///   Postfix's `.example.com`; without the patterns at hand, the matched hosts' names);
/// - else an approved `allowCleartext` exception ⇒ `may`, the only Postfix level that permits cleartext;
/// - else a WebPKI host (tenant or override `verified`) ⇒ `verify match=hostname servername=hostname`;
/// - else (`encrypted`) ⇒ `encrypt`;
///
/// each with `protocols=` from the policy's minimum TLS version.
pub fn postfix_policy(policy: &DomainPolicy, sts_patterns: Option<&[String]>) -> String {
    let protocols = match policy.min_version {
        TlsVersion::Tls12 => "protocols=>=TLSv1.2",
        TlsVersion::Tls13 => "protocols=>=TLSv1.3",
    };
    let any = |wanted: fn(&crate::policy::MxCandidate) -> bool| policy.mx.iter().any(wanted);
    if any(|mx| matches!(mx.auth, PeerAuth::Dane { .. })) {
        return format!("dane-only {protocols}");
    }
    if any(|mx| mx.source == PolicySource::MtaSts) {
        let patterns: Vec<String> = match sts_patterns {
            Some(patterns) if !patterns.is_empty() => patterns.iter().map(|p| postfix_match(p)).collect(),
            _ => policy
                .mx
                .iter()
                .filter(|mx| mx.source == PolicySource::MtaSts)
                .map(|mx| String::from(mx.host.clone()))
                .collect(),
        };
        let mut unique = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            if !unique.contains(&pattern) {
                unique.push(pattern);
            }
        }
        return format!("secure match={} servername=hostname {protocols}", unique.join(":"));
    }
    if policy.allow_cleartext {
        return format!("may {protocols}");
    }
    if any(|mx| mx.auth == PeerAuth::WebPki) {
        return format!("verify match=hostname servername=hostname {protocols}");
    }
    format!("encrypt {protocols}")
}

/// An MTA-STS `mx` pattern in Postfix's `match=` syntax: `*.example.com` is `.example.com` there. (Postfix's
/// `.example.com` also matches deeper names; the certificate must still be valid for the host connected to.)
fn postfix_match(pattern: &str) -> String {
    match pattern.strip_prefix("*.") {
        Some(parent) => format!(".{parent}"),
        None => pattern.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LookupStage, MxCandidate, Tlsa};

    fn mx(host: &str, auth: PeerAuth, source: PolicySource) -> MxCandidate {
        MxCandidate {
            host: DomainName::new(host).expect("host name"),
            preference: 10,
            auth,
            source,
            policy_id: (source == PolicySource::MtaSts).then(|| "20261125".to_owned()),
        }
    }

    fn dane() -> PeerAuth {
        PeerAuth::Dane {
            tlsa: vec![Tlsa {
                usage: 3,
                selector: 1,
                matching: 1,
                data: vec![0; 32],
            }],
            reference_names: vec!["mx.dane.test".to_owned()],
        }
    }

    fn policy(mx: Vec<MxCandidate>) -> DomainPolicy {
        DomainPolicy {
            mx,
            min_version: TlsVersion::Tls12,
            on_failure: OnFailure::Defer,
            allow_cleartext: false,
        }
    }

    #[test]
    fn dane_hosts_make_the_domain_dane_only() {
        let only_dane = policy(vec![mx("mx.dane.test", dane(), PolicySource::Dane)]);
        assert_eq!(postfix_policy(&only_dane, None), "dane-only protocols=>=TLSv1.2");
        // Mixed with an MTA-STS host: Postfix's dane-only uses the DANE host alone, never a weaker one.
        let mixed = policy(vec![
            mx("mx.dane.test", dane(), PolicySource::Dane),
            mx("mx2.dane.test", PeerAuth::WebPki, PolicySource::MtaSts),
        ]);
        assert_eq!(
            postfix_policy(&mixed, Some(&["mx2.dane.test".to_owned()])),
            "dane-only protocols=>=TLSv1.2"
        );
    }

    #[test]
    fn mta_sts_enforce_names_the_policy_patterns_in_postfix_syntax() {
        let sts = policy(vec![
            mx("mx1.example.com", PeerAuth::WebPki, PolicySource::MtaSts),
            mx("mx2.example.com", PeerAuth::WebPki, PolicySource::MtaSts),
        ]);
        let patterns = [
            "*.example.com".to_owned(),
            "mx.example.net".to_owned(),
            "*.example.com".to_owned(),
        ];
        assert_eq!(
            postfix_policy(&sts, Some(&patterns)),
            "secure match=.example.com:mx.example.net servername=hostname protocols=>=TLSv1.2"
        );
        // Without the policy at hand: the hosts that matched it, which is never looser.
        assert_eq!(
            postfix_policy(&sts, None),
            "secure match=mx1.example.com:mx2.example.com servername=hostname protocols=>=TLSv1.2"
        );
    }

    #[test]
    fn tenant_modes_map_to_verify_and_encrypt() {
        let verified = policy(vec![mx("mx.good.test", PeerAuth::WebPki, PolicySource::Tenant)]);
        assert_eq!(
            postfix_policy(&verified, None),
            "verify match=hostname servername=hostname protocols=>=TLSv1.2"
        );
        let override_verified = policy(vec![mx("mx.good.test", PeerAuth::WebPki, PolicySource::Override)]);
        assert_eq!(
            postfix_policy(&override_verified, None),
            postfix_policy(&verified, None)
        );
        let encrypted = policy(vec![mx(
            "mx.any.test",
            PeerAuth::AnyCertificate,
            PolicySource::Override,
        )]);
        assert_eq!(postfix_policy(&encrypted, None), "encrypt protocols=>=TLSv1.2");
    }

    #[test]
    fn tls_minimum_becomes_protocols() {
        let mut strict = policy(vec![mx("mx.good.test", PeerAuth::AnyCertificate, PolicySource::Tenant)]);
        strict.min_version = TlsVersion::Tls13;
        assert_eq!(postfix_policy(&strict, None), "encrypt protocols=>=TLSv1.3");
    }

    #[test]
    fn cleartext_only_with_the_approved_exception() {
        let mut excepted = policy(vec![mx("mx.old.test", PeerAuth::WebPki, PolicySource::Override)]);
        excepted.allow_cleartext = true;
        assert_eq!(postfix_policy(&excepted, None), "may protocols=>=TLSv1.2");
        // No answer without the exception flag permits cleartext: every other level requires TLS.
        for auth in [PeerAuth::WebPki, PeerAuth::AnyCertificate, dane()] {
            for source in [
                PolicySource::Dane,
                PolicySource::MtaSts,
                PolicySource::Tenant,
                PolicySource::Override,
            ] {
                let answer = postfix_policy(&policy(vec![mx("mx.x.test", auth.clone(), source)]), None);
                let level = answer.split(' ').next().unwrap_or_default();
                assert!(
                    ["dane-only", "secure", "verify", "encrypt"].contains(&level),
                    "{answer}"
                );
            }
        }
    }

    #[test]
    fn failures_become_temp_or_perm() {
        let temporary = PolicyError::Temporary {
            stage: LookupStage::Dane,
            reason: "TLSA SERVFAIL".to_owned(),
        };
        assert_eq!(
            reply_for(Err(&temporary), None, OnFailure::Bounce),
            Reply::Temp("dane lookup: TLSA SERVFAIL".to_owned())
        );
        let gone = PolicyError::Permanent {
            reason: "NXDOMAIN".to_owned(),
        };
        assert_eq!(
            reply_for(Err(&gone), None, OnFailure::Defer),
            Reply::Perm("NXDOMAIN".to_owned())
        );
        let no_path = PolicyError::NoSecurePath {
            reason: "no MX matches".to_owned(),
        };
        assert_eq!(
            reply_for(Err(&no_path), None, OnFailure::Defer),
            Reply::Temp("no secure path: no MX matches".to_owned())
        );
        assert_eq!(
            reply_for(Err(&no_path), None, OnFailure::Bounce),
            Reply::Perm("no secure path: no MX matches".to_owned())
        );
    }

    #[test]
    fn replies_are_netstrings_with_printable_bounded_reasons() {
        assert_eq!(Reply::NotFound.encode(), b"9:NOTFOUND ,");
        assert_eq!(Reply::Ok("encrypt".to_owned()).encode(), b"10:OK encrypt,");
        assert_eq!(Reply::Temp("a\r\nb".to_owned()).encode(), b"9:TEMP a  b,");
        let long = Reply::Perm("é".repeat(1000)).encode();
        let (payload, _) = netstring::decode(&long).ok().flatten().expect("one netstring");
        assert!(payload.len() <= "PERM ".len() + MAX_REASON_BYTES);
        assert!(std::str::from_utf8(payload).is_ok());
    }

    #[test]
    fn keys_name_a_domain_or_get_their_reply() {
        assert_eq!(
            lookup_domain("Example.ORG."),
            Ok(DomainName::new("example.org").expect("domain"))
        );
        assert_eq!(lookup_domain(".example.org"), Err(Reply::NotFound));
        for next_hop in [
            "[mx.example.org]",
            "[mx.example.org]:587",
            "example.org:587",
            "192.0.2.1",
            "2001:db8::1",
        ] {
            assert!(
                matches!(lookup_domain(next_hop), Err(Reply::Perm(reason)) if reason.contains("explicit next hops")),
                "{next_hop}"
            );
        }
        for invalid in ["user@example.org", "a..b", "exa mple.org", "..org", "."] {
            match lookup_domain(invalid) {
                Err(Reply::Perm(reason)) => {
                    assert!(reason.starts_with("key is not a recipient domain"), "{reason}");
                    assert!(!reason.contains("user@"), "{reason}");
                }
                other => panic!("{invalid}: {other:?}"),
            }
        }
    }
}
