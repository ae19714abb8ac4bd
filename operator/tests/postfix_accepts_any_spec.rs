//! For any SecureMailTenant spec the apiserver admits, Debian's Postfix accepts the rendered main.cf and
//! master.cf: no warning from postconf, and `postfix check` passes. Specs are generated within the CRD's rules
//! (patterns, lengths, uniqueness, the CEL rules); the parts the Postfix files are made of (domains, submission
//! and its allowlist) vary freely, the rest comes from one of the examples. Needs root and Debian's postfix
//! (e2e/install-deps.sh).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a panic is the failure report"
)]

#[path = "../src/postfix/check.rs"]
mod check;

use proptest::prelude::*;
use securemail_api::tenant::{
    ClientCertificates, ClientIdentity, DkimAlgorithm, DkimSpec, DmarcPolicy, DmarcSpec, DomainSpec, IssuerKind,
    IssuerRef, SpfAll, SpfSpec, SubmissionSpec, SubmissionTls,
};
use securemail_api::{SecureMailTenant, SecureMailTenantSpec};
use securemail_operator::postfix::{main_cf, master_cf};

const EXAMPLES: [&str; 3] = [
    include_str!("../../examples/minimal.yaml"),
    include_str!("../../examples/dedicated-warmup.yaml"),
    include_str!("../../examples/strict-tls-overrides.yaml"),
];

/// A label of DNS_LABEL_PATTERN; short and all-digit labels are drawn often, since the edge cases live there.
fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]",
        "[0-9]{1,4}",
        "[a-z0-9][a-z0-9-]{0,8}[a-z0-9]",
        "[a-z0-9][a-z0-9-]{0,61}[a-z0-9]",
    ]
}

/// A name of DNS_NAME_PATTERN: at least two labels, the last starting with a letter, at most 253 characters.
fn dns_name() -> impl Strategy<Value = String> {
    let top_level = prop_oneof!["[a-z]", "[a-z][a-z0-9-]{0,61}[a-z0-9]"];
    (prop::collection::vec(label(), 1..=4), top_level)
        .prop_map(|(labels, top_level)| format!("{}.{top_level}", labels.join(".")))
        .prop_filter("longer than 253 characters", |name| name.len() <= 253)
}

/// A mailbox of MAILBOX_PATTERN.
fn mailbox() -> impl Strategy<Value = String> {
    ("[a-z0-9._+-]{1,20}", dns_name()).prop_map(|(local, domain)| format!("{local}@{domain}"))
}

fn domain(name: String) -> impl Strategy<Value = DomainSpec> {
    let algorithms = prop_oneof![
        Just(vec![DkimAlgorithm::RsaSha256]),
        Just(vec![DkimAlgorithm::RsaSha256, DkimAlgorithm::Ed25519Sha256]),
        Just(vec![DkimAlgorithm::Ed25519Sha256, DkimAlgorithm::RsaSha256]),
    ];
    let dkim = (
        algorithms,
        prop::sample::select(vec![2048, 3072, 4096]),
        7u32..=3650,
        "[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?",
    )
        .prop_map(
            |(algorithms, rsa_bits, rotation_period_days, selector_prefix)| DkimSpec {
                algorithms,
                rsa_bits,
                rotation_period_days,
                selector_prefix,
            },
        );
    let spf = (
        prop::collection::vec(dns_name(), 0..=8),
        prop_oneof![Just(SpfAll::Softfail), Just(SpfAll::Fail)],
    )
        .prop_map(|(includes, all)| SpfSpec { includes, all });
    let dmarc = (
        prop_oneof![
            Just(DmarcPolicy::None),
            Just(DmarcPolicy::Quarantine),
            Just(DmarcPolicy::Reject)
        ],
        prop::collection::vec(mailbox(), 0..=5),
        prop::collection::vec(mailbox(), 0..=5),
        1u8..=100,
    )
        .prop_map(
            |(policy, aggregate_reports_to, failure_reports_to, percent)| DmarcSpec {
                policy,
                aggregate_reports_to,
                failure_reports_to,
                percent,
            },
        );
    (dkim, spf, dmarc).prop_map(move |(dkim, spf, dmarc)| DomainSpec {
        name: name.clone(),
        dkim,
        spf,
        dmarc,
    })
}

/// 1 to 50 domains with distinct names, in any order.
fn domains() -> impl Strategy<Value = Vec<DomainSpec>> {
    prop::collection::btree_set(dns_name(), 1..=50)
        .prop_flat_map(|names| names.into_iter().map(domain).collect::<Vec<_>>())
        .prop_shuffle()
}

/// 64 hex digits in either case, with colons anywhere (the CEL rule removes them before matching), at most 95
/// characters.
fn public_key_sha256() -> impl Strategy<Value = String> {
    (
        prop::collection::vec((0u8..16, any::<bool>()), 64),
        prop::collection::btree_set(1usize..64, 0..=31),
    )
        .prop_map(|(digits, colons_before)| {
            let mut text = String::new();
            for (index, (digit, upper)) in digits.into_iter().enumerate() {
                if colons_before.contains(&index) {
                    text.push(':');
                }
                let digit = char::from_digit(u32::from(digit), 16).unwrap();
                text.push(if upper { digit.to_ascii_uppercase() } else { digit });
            }
            text
        })
}

fn submission() -> impl Strategy<Value = SubmissionSpec> {
    let tls = prop_oneof![
        "[a-z0-9][a-z0-9.-]{0,40}".prop_map(|name| SubmissionTls {
            secret_name: Some(name),
            issuer_ref: None,
        }),
        (
            "[a-z0-9][a-z0-9.-]{0,40}",
            prop_oneof![Just(IssuerKind::Issuer), Just(IssuerKind::ClusterIssuer)]
        )
            .prop_map(|(name, kind)| SubmissionTls {
                secret_name: None,
                issuer_ref: Some(IssuerRef { name, kind }),
            }),
    ];
    let allowed = prop::collection::btree_map("[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", public_key_sha256(), 0..=40)
        .prop_map(|identities| {
            identities
                .into_iter()
                .map(|(name, public_key_sha256)| ClientIdentity {
                    name,
                    public_key_sha256,
                })
                .collect::<Vec<_>>()
        })
        .prop_shuffle();
    (
        1u16..=65535,
        tls,
        "[a-z0-9][a-z0-9.-]{0,40}",
        allowed,
        prop::collection::vec("[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", 0..=64),
    )
        .prop_map(
            |(port, tls, ca_secret_name, allowed, allowed_namespaces)| SubmissionSpec {
                port,
                tls,
                client_certificates: ClientCertificates {
                    ca_secret_name,
                    allowed,
                },
                allowed_namespaces,
            },
        )
}

fn spec() -> impl Strategy<Value = SecureMailTenantSpec> {
    (
        prop::sample::select(EXAMPLES.to_vec()),
        domains(),
        submission(),
        any::<bool>(),
    )
        .prop_map(|(example, domains, submission, paused)| {
            let mut spec = serde_yaml::from_str::<SecureMailTenant>(example).unwrap().spec;
            spec.domains = domains;
            spec.submission = submission;
            spec.paused = paused;
            spec
        })
}

proptest! {
    // Each case runs postconf four times and `postfix check` once (about 1.5 s, most of it Postfix's own checks
    // of its installation): 32 cases take about a minute.
    #![proptest_config(ProptestConfig { cases: 32, max_shrink_time: 120_000, ..ProptestConfig::default() })]

    #[test]
    fn postfix_accepts_the_files_rendered_for_any_valid_spec(spec in spec()) {
        check::assert_postfix_reads_without_warnings("property", &main_cf(&spec), &master_cf(&spec));
    }
}
