//! The policy decision over already-gathered DNS and MTA-STS facts: DANE > MTA-STS > tenant, overrides, null MX,
//! TLSA usability and temporary failures.
#![allow(clippy::unwrap_used, reason = "tests: a panic is the failure report")]

use std::sync::Arc;

use securemail_api::tenant::{
    OnFailure, OverrideTlsMode, PolicyException, TlsMode, TlsOverride, TlsPolicySpec, TlsVersion,
};
use securemail_sidecar::evidence::PolicySource;
use securemail_sidecar::policy::decide::{DomainFacts, MxFacts, TlsaFact, decide, usable_tlsa};
use securemail_sidecar::policy::dns::MxRecord;
use securemail_sidecar::policy::mta_sts::{Mode, StsFact, StsPolicy};
use securemail_sidecar::policy::{LookupStage, PeerAuth, PolicyError, Tlsa};

const DOMAIN: &str = "clinic.example";

fn mx(hosts: &[(u16, &str)], secure: bool) -> MxFacts {
    MxFacts::Hosts {
        hosts: hosts
            .iter()
            .map(|(preference, exchange)| MxRecord {
                preference: *preference,
                exchange: (*exchange).to_owned(),
            })
            .collect(),
        secure,
    }
}

fn ee() -> Tlsa {
    Tlsa {
        usage: 3,
        selector: 1,
        matching: 1,
        data: vec![0xab; 32],
    }
}

fn secure_tlsa(records: Vec<Tlsa>) -> TlsaFact {
    TlsaFact::Secure {
        usable: usable_tlsa(&records),
        all: records,
    }
}

fn facts(mx: MxFacts, tlsa: Vec<(&str, TlsaFact)>, mta_sts: StsFact) -> DomainFacts {
    DomainFacts {
        domain: DOMAIN.to_owned(),
        mx,
        tlsa: tlsa.into_iter().map(|(h, f)| (h.to_owned(), f)).collect(),
        mta_sts,
        min_ttl: 300,
    }
}

fn sts(mode: Mode, patterns: &[&str]) -> StsFact {
    StsFact::Policy {
        id: "20250101".to_owned(),
        policy: Arc::new(StsPolicy {
            mode,
            mx: patterns.iter().map(|p| (*p).to_owned()).collect(),
            max_age: 86_400,
        }),
        stale_refresh: None,
    }
}

fn with_override(over: TlsOverride) -> TlsPolicySpec {
    TlsPolicySpec {
        overrides: vec![over],
        ..TlsPolicySpec::default()
    }
}

fn override_for(domain: &str) -> TlsOverride {
    TlsOverride {
        domain: domain.to_owned(),
        mode: None,
        min_version: None,
        allow_cleartext: None,
        exception: None,
    }
}

fn exception() -> Option<PolicyException> {
    Some(PolicyException {
        approved_by: "security-office/CHG-1".to_owned(),
        reason: "partner has no TLS yet".to_owned(),
    })
}

fn hosts(policy: &securemail_sidecar::policy::DomainPolicy) -> Vec<String> {
    policy.mx.iter().map(|c| String::from(c.host.clone())).collect()
}

#[test]
fn secure_mx_with_usable_tlsa_is_dane_with_the_mx_name_as_reference() {
    let f = facts(
        mx(&[(10, "mx1.clinic.example")], true),
        vec![("mx1.clinic.example", secure_tlsa(vec![ee()]))],
        StsFact::NotLooked,
    );
    let policy = decide(&TlsPolicySpec::default(), &f).unwrap();
    assert_eq!(policy.mx.len(), 1);
    assert_eq!(policy.mx[0].source, PolicySource::Dane);
    assert_eq!(
        policy.mx[0].auth,
        PeerAuth::Dane {
            tlsa: vec![ee()],
            reference_names: vec!["mx1.clinic.example".to_owned()]
        }
    );
}

#[test]
fn tlsa_usability_follows_rfc_7672() {
    let unusable = vec![
        Tlsa { usage: 1, ..ee() },    // PKIX-EE: not for SMTP
        Tlsa { usage: 0, ..ee() },    // PKIX-TA
        Tlsa { selector: 2, ..ee() }, // unknown selector
        Tlsa { matching: 3, ..ee() }, // unknown matching type
        Tlsa {
            data: vec![1; 31],
            ..ee()
        }, // SHA-256 of the wrong length
        Tlsa { matching: 2, ..ee() }, // SHA-512 needs 64 bytes
    ];
    assert!(usable_tlsa(&unusable).is_empty());
    let usable = vec![
        ee(),
        Tlsa {
            usage: 2,
            selector: 0,
            matching: 2,
            data: vec![7; 64],
        },
        Tlsa {
            matching: 0,
            data: vec![1, 2, 3],
            ..ee()
        },
    ];
    assert_eq!(usable_tlsa(&usable), usable);

    // All unusable: as if there were no TLSA, so the tenant policy applies.
    let f = facts(
        mx(&[(10, "mx1.clinic.example")], true),
        vec![("mx1.clinic.example", secure_tlsa(unusable))],
        StsFact::Absent,
    );
    let policy = decide(&TlsPolicySpec::default(), &f).unwrap();
    assert_eq!(
        (policy.mx[0].source, &policy.mx[0].auth),
        (PolicySource::Tenant, &PeerAuth::WebPki)
    );
}

#[test]
fn insecure_mx_set_never_yields_dane() {
    let f = facts(
        mx(&[(10, "mx1.clinic.example")], false),
        vec![("mx1.clinic.example", secure_tlsa(vec![ee()]))],
        StsFact::Absent,
    );
    let policy = decide(&TlsPolicySpec::default(), &f).unwrap();
    assert_eq!(policy.mx[0].source, PolicySource::Tenant);
}

#[test]
fn dane_switched_off_by_the_tenant_is_ignored() {
    let spec = TlsPolicySpec {
        dane: false,
        ..TlsPolicySpec::default()
    };
    let f = facts(
        mx(&[(10, "mx1.clinic.example")], true),
        vec![("mx1.clinic.example", secure_tlsa(vec![ee()]))],
        StsFact::Absent,
    );
    assert_eq!(decide(&spec, &f).unwrap().mx[0].source, PolicySource::Tenant);
}

#[test]
fn tlsa_failure_skips_that_host_and_never_means_no_dane() {
    let f = facts(
        mx(&[(10, "mx1.clinic.example"), (20, "mx2.clinic.example")], true),
        vec![
            ("mx1.clinic.example", TlsaFact::Failed("SERVFAIL".to_owned())),
            ("mx2.clinic.example", secure_tlsa(vec![ee()])),
        ],
        StsFact::NotLooked,
    );
    let policy = decide(&TlsPolicySpec::default(), &f).unwrap();
    assert_eq!(hosts(&policy), vec!["mx2.clinic.example"]);

    let only_failed = facts(
        mx(&[(10, "mx1.clinic.example")], true),
        vec![("mx1.clinic.example", TlsaFact::Failed("timed out".to_owned()))],
        StsFact::Absent,
    );
    let error = decide(&TlsPolicySpec::default(), &only_failed).unwrap_err();
    assert!(
        matches!(&error, PolicyError::Temporary { stage: LookupStage::Dane, reason } if reason.contains("timed out")),
        "{error:?}"
    );
}

#[test]
fn mta_sts_enforce_keeps_matching_hosts_only() {
    let f = facts(
        mx(
            &[
                (10, "mx1.clinic.example"),
                (20, "backup.elsewhere.example"),
                (5, "mx0.clinic.example"),
            ],
            false,
        ),
        vec![],
        sts(Mode::Enforce, &["*.clinic.example"]),
    );
    let policy = decide(&TlsPolicySpec::default(), &f).unwrap();
    assert_eq!(hosts(&policy), vec!["mx0.clinic.example", "mx1.clinic.example"]);
    assert!(policy.mx.iter().all(|c| c.source == PolicySource::MtaSts
        && c.auth == PeerAuth::WebPki
        && c.policy_id.as_deref() == Some("20250101")));
}

#[test]
fn mta_sts_enforce_without_matching_host_is_no_secure_path() {
    let f = facts(
        mx(&[(10, "mx.other.example")], false),
        vec![],
        sts(Mode::Enforce, &["mail.clinic.example"]),
    );
    let error = decide(&TlsPolicySpec::default(), &f).unwrap_err();
    assert!(
        matches!(&error, PolicyError::NoSecurePath { reason } if reason.contains("none of the MX hosts [mx.other.example]")),
        "{error:?}"
    );
}

#[test]
fn mta_sts_testing_falls_through_to_the_tenant_mode() {
    let spec = TlsPolicySpec {
        mode: TlsMode::Encrypted,
        ..TlsPolicySpec::default()
    };
    let f = facts(
        mx(&[(10, "mx.other.example")], false),
        vec![],
        sts(Mode::Testing, &["mail.clinic.example"]),
    );
    let policy = decide(&spec, &f).unwrap();
    assert_eq!(
        (policy.mx[0].source, &policy.mx[0].auth),
        (PolicySource::Tenant, &PeerAuth::AnyCertificate)
    );
}

#[test]
fn mta_sts_switched_off_is_ignored() {
    let spec = TlsPolicySpec {
        mta_sts: false,
        ..TlsPolicySpec::default()
    };
    let f = facts(
        mx(&[(10, "mx.other.example")], false),
        vec![],
        sts(Mode::Enforce, &["mail.clinic.example"]),
    );
    assert_eq!(decide(&spec, &f).unwrap().mx[0].source, PolicySource::Tenant);
}

#[test]
fn unobtainable_mta_sts_policy_defers() {
    let f = facts(
        mx(&[(10, "mx1.clinic.example")], false),
        vec![],
        StsFact::Failed("connection refused".to_owned()),
    );
    let error = decide(&TlsPolicySpec::default(), &f).unwrap_err();
    assert!(
        matches!(&error, PolicyError::Temporary { stage: LookupStage::MtaSts, reason } if reason.contains("connection refused")),
        "{error:?}"
    );
}

#[test]
fn null_mx_and_nxdomain_are_permanent() {
    for mx_facts in [mx(&[(0, "")], true), MxFacts::Null, MxFacts::NxDomain] {
        let error = decide(&TlsPolicySpec::default(), &facts(mx_facts, vec![], StsFact::NotLooked)).unwrap_err();
        assert!(matches!(error, PolicyError::Permanent { .. }), "{error:?}");
    }
}

#[test]
fn implicit_mx_is_the_domain_itself() {
    let f = facts(
        MxFacts::Implicit { secure: true },
        vec![(DOMAIN, secure_tlsa(vec![ee()]))],
        StsFact::NotLooked,
    );
    let policy = decide(&TlsPolicySpec::default(), &f).unwrap();
    assert_eq!(hosts(&policy), vec![DOMAIN]);
    assert_eq!(policy.mx[0].source, PolicySource::Dane);
}

#[test]
fn dane_override_without_tlsa_is_no_secure_path() {
    let spec = with_override(TlsOverride {
        mode: Some(OverrideTlsMode::Dane),
        ..override_for(DOMAIN)
    });
    let f = facts(
        mx(&[(10, "mx1.clinic.example")], true),
        vec![(
            "mx1.clinic.example",
            TlsaFact::NoDane {
                reason: "none".to_owned(),
            },
        )],
        sts(Mode::Enforce, &["mx1.clinic.example"]),
    );
    let error = decide(&spec, &f).unwrap_err();
    assert_eq!(
        error,
        PolicyError::NoSecurePath {
            reason: "recipient domain clinic.example publishes no usable DANE TLSA records; the tenant's policy \
                     requires DANE"
                .to_owned()
        }
    );
    // With DANE on one host only, the other host is left out.
    let f = facts(
        mx(&[(10, "mx1.clinic.example"), (20, "mx2.clinic.example")], true),
        vec![
            (
                "mx1.clinic.example",
                TlsaFact::NoDane {
                    reason: "none".to_owned(),
                },
            ),
            ("mx2.clinic.example", secure_tlsa(vec![ee()])),
        ],
        StsFact::NotLooked,
    );
    assert_eq!(hosts(&decide(&spec, &f).unwrap()), vec!["mx2.clinic.example"]);
}

#[test]
fn override_modes_versions_and_cleartext() {
    let plain = facts(mx(&[(10, "mx1.clinic.example")], false), vec![], StsFact::Absent);

    // verified override on an encrypted tenant: WebPKI, decided by the override.
    let mut spec = with_override(TlsOverride {
        mode: Some(OverrideTlsMode::Verified),
        min_version: Some(TlsVersion::Tls13),
        ..override_for("CLINIC.example")
    });
    spec.mode = TlsMode::Encrypted;
    spec.on_failure = OnFailure::Bounce;
    let policy = decide(&spec, &plain).unwrap();
    assert_eq!(
        (policy.mx[0].source, &policy.mx[0].auth),
        (PolicySource::Override, &PeerAuth::WebPki)
    );
    assert_eq!(policy.min_version, TlsVersion::Tls13);
    assert_eq!(policy.on_failure, OnFailure::Bounce);
    assert!(!policy.allow_cleartext);

    // min_version is the stricter of tenant and override.
    let mut spec = with_override(TlsOverride {
        min_version: Some(TlsVersion::Tls12),
        exception: exception(),
        ..override_for(DOMAIN)
    });
    spec.min_version = TlsVersion::Tls13;
    assert_eq!(decide(&spec, &plain).unwrap().min_version, TlsVersion::Tls13);

    // encrypted override loosening a verified tenant: only with an exception.
    let no_exception = with_override(TlsOverride {
        mode: Some(OverrideTlsMode::Encrypted),
        allow_cleartext: Some(true),
        ..override_for(DOMAIN)
    });
    let policy = decide(&no_exception, &plain).unwrap();
    assert_eq!(
        (policy.mx[0].source, &policy.mx[0].auth),
        (PolicySource::Tenant, &PeerAuth::WebPki)
    );
    assert!(!policy.allow_cleartext, "allowCleartext needs an exception");

    let approved = with_override(TlsOverride {
        mode: Some(OverrideTlsMode::Encrypted),
        allow_cleartext: Some(true),
        exception: exception(),
        ..override_for(DOMAIN)
    });
    let policy = decide(&approved, &plain).unwrap();
    assert_eq!(
        (policy.mx[0].source, &policy.mx[0].auth),
        (PolicySource::Override, &PeerAuth::AnyCertificate)
    );
    assert!(policy.allow_cleartext);

    // An override for another domain changes nothing.
    let other = with_override(TlsOverride {
        mode: Some(OverrideTlsMode::Dane),
        ..override_for("other.example")
    });
    assert_eq!(decide(&other, &plain).unwrap().mx[0].source, PolicySource::Tenant);
}

#[test]
fn cleartext_exception_never_applies_over_mta_sts() {
    let spec = with_override(TlsOverride {
        allow_cleartext: Some(true),
        exception: exception(),
        ..override_for(DOMAIN)
    });
    let f = facts(
        mx(&[(10, "mx1.clinic.example")], false),
        vec![],
        sts(Mode::Enforce, &["mx1.clinic.example"]),
    );
    let policy = decide(&spec, &f).unwrap();
    assert_eq!(policy.mx[0].source, PolicySource::MtaSts);
    assert!(!policy.allow_cleartext);
}

#[test]
fn unobtainable_mta_sts_policy_leaves_the_dane_hosts() {
    let f = facts(
        mx(&[(10, "mx1.clinic.example"), (20, "mx2.clinic.example")], true),
        vec![
            (
                "mx1.clinic.example",
                TlsaFact::NoDane {
                    reason: "none".to_owned(),
                },
            ),
            ("mx2.clinic.example", secure_tlsa(vec![ee()])),
        ],
        StsFact::Failed("timed out".to_owned()),
    );
    let policy = decide(&TlsPolicySpec::default(), &f).unwrap();
    assert_eq!(hosts(&policy), vec!["mx2.clinic.example"]);
    assert_eq!(policy.mx[0].source, PolicySource::Dane);
}

/// An approved cleartext exception for [`DOMAIN`], under a tenant with DANE on or off.
fn cleartext_exception(dane: bool) -> TlsPolicySpec {
    let mut spec = with_override(TlsOverride {
        mode: Some(OverrideTlsMode::Encrypted),
        allow_cleartext: Some(true),
        exception: exception(),
        ..override_for(DOMAIN)
    });
    spec.dane = dane;
    spec
}

#[test]
fn a_host_publishing_only_unusable_tlsa_records_still_gets_tls_under_a_cleartext_exception() {
    // PKIX usages only: no DANE authentication, but RFC 7672 section 2.2 still makes TLS mandatory.
    let pkix_only = secure_tlsa(vec![Tlsa { usage: 1, ..ee() }, Tlsa { usage: 0, ..ee() }]);
    for (dane, mx_secure) in [(true, true), (false, true), (false, false)] {
        let f = facts(
            mx(&[(10, "mx1.clinic.example")], mx_secure),
            vec![("mx1.clinic.example", pkix_only.clone())],
            StsFact::Absent,
        );
        let policy = decide(&cleartext_exception(dane), &f).unwrap();
        assert_eq!(hosts(&policy), ["mx1.clinic.example"]);
        assert_eq!(
            (policy.mx[0].source, &policy.mx[0].auth),
            (PolicySource::Override, &PeerAuth::AnyCertificate),
            "dane {dane}, mx secure {mx_secure}"
        );
        assert!(!policy.allow_cleartext, "dane {dane}, mx secure {mx_secure}");
    }

    // One host of the domain with TLSA is enough: the policy Postfix reads is per domain.
    let mixed = facts(
        mx(&[(10, "mx1.clinic.example"), (20, "mx2.clinic.example")], true),
        vec![
            (
                "mx1.clinic.example",
                TlsaFact::NoDane {
                    reason: "none".to_owned(),
                },
            ),
            ("mx2.clinic.example", secure_tlsa(vec![ee()])),
        ],
        StsFact::Absent,
    );
    assert!(!decide(&cleartext_exception(false), &mixed).unwrap().allow_cleartext);
}

#[test]
fn a_failed_tlsa_lookup_keeps_tls_mandatory_and_without_dane_does_not_skip_the_host() {
    let failed = facts(
        mx(&[(10, "mx1.clinic.example")], false),
        vec![("mx1.clinic.example", TlsaFact::Failed("SERVFAIL".to_owned()))],
        StsFact::Absent,
    );
    let policy = decide(&cleartext_exception(false), &failed).unwrap();
    assert_eq!(hosts(&policy), ["mx1.clinic.example"]);
    assert!(!policy.allow_cleartext);

    // The control: no TLSA at all, and the exception applies.
    let none = facts(
        mx(&[(10, "mx1.clinic.example")], true),
        vec![(
            "mx1.clinic.example",
            TlsaFact::NoDane {
                reason: "secure denial".to_owned(),
            },
        )],
        StsFact::Absent,
    );
    assert!(decide(&cleartext_exception(true), &none).unwrap().allow_cleartext);
}
