//! Mailbox provider classes. Warmup shares, caps and delivery counts are kept per class, so the set is small and
//! fixed (a bounded metric label). The sidecar decides the class from the MX host name: the tenant's own suffixes
//! first, then a built-in table.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The mailbox provider behind an MX host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Gmail,
    Microsoft,
    Yahoo,
    Apple,
    Other,
}

impl Provider {
    /// All classes, in the order `/status` and metrics list them.
    pub const ALL: [Provider; 5] = [
        Provider::Gmail,
        Provider::Microsoft,
        Provider::Yahoo,
        Provider::Apple,
        Provider::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Gmail => "gmail",
            Provider::Microsoft => "microsoft",
            Provider::Yahoo => "yahoo",
            Provider::Apple => "apple",
            Provider::Other => "other",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
/// An MX host suffix classed as one provider, checked before the built-in table: e.g. a provider's MX domain the
/// table lacks, or a gateway in front of one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderSuffix {
    /// A host equal to it, or ending in "." followed by it, matches; e.g. `mx.example-health.net`.
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::tenant::DNS_NAME_PATTERN))]
    pub suffix: String,
    pub provider: Provider,
}

/// The built-in MX host suffixes of the large providers.
pub const BUILT_IN_SUFFIXES: [(&str, Provider); 9] = [
    ("google.com", Provider::Gmail),
    ("googlemail.com", Provider::Gmail),
    ("outlook.com", Provider::Microsoft),
    ("hotmail.com", Provider::Microsoft),
    ("yahoodns.net", Provider::Yahoo),
    ("yahoo.com", Provider::Yahoo),
    ("icloud.com", Provider::Apple),
    ("me.com", Provider::Apple),
    ("apple.com", Provider::Apple),
];

/// Classifies an MX host name (case and a trailing root dot are ignored): the first of `configured` that matches,
/// else the built-in table (`protection.outlook.com` is covered by `outlook.com`), else `other`.
pub fn classify(host: &str, configured: &[ProviderSuffix]) -> Provider {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let matches = |suffix: &str| {
        let suffix = suffix.strip_suffix('.').unwrap_or(suffix);
        host.eq_ignore_ascii_case(suffix)
            || host
                .strip_suffix(&suffix.to_ascii_lowercase())
                .is_some_and(|prefix| prefix.ends_with('.'))
    };
    configured
        .iter()
        .find(|entry| matches(&entry.suffix))
        .map(|entry| entry.provider)
        .or_else(|| {
            BUILT_IN_SUFFIXES
                .iter()
                .find(|(suffix, _)| matches(suffix))
                .map(|&(_, provider)| provider)
        })
        .unwrap_or(Provider::Other)
}

#[cfg(test)]
mod classify_tests {
    use super::*;

    #[test]
    fn configured_suffixes_come_first_and_match_on_label_boundaries() {
        let configured = [
            ProviderSuffix {
                suffix: "mx.example-health.net".into(),
                provider: Provider::Microsoft,
            },
            ProviderSuffix {
                suffix: "relay.google.com".into(),
                provider: Provider::Other,
            },
        ];
        for (host, provider) in [
            ("in1.mx.example-health.net", Provider::Microsoft),
            ("MX.EXAMPLE-HEALTH.NET.", Provider::Microsoft),
            ("notmx.example-health.net", Provider::Other),
            ("smtp.relay.google.com", Provider::Other),
            ("gmail-smtp-in.l.google.com", Provider::Gmail),
            ("evilgoogle.com", Provider::Other),
        ] {
            assert_eq!(classify(host, &configured), provider, "{host}");
        }
        assert_eq!(classify("aspmx.l.google.com", &[]), Provider::Gmail);
    }

    #[test]
    fn the_built_in_table_classes_the_large_providers_on_label_boundaries() {
        for (host, provider) in [
            ("gmail-smtp-in.l.google.com", Provider::Gmail),
            ("ASPMX.L.GOOGLE.COM.", Provider::Gmail),
            ("alt1.gmr-smtp-in.l.googlemail.com", Provider::Gmail),
            ("example-net.mail.protection.outlook.com", Provider::Microsoft),
            ("hotmail-com.olc.protection.outlook.com", Provider::Microsoft),
            ("mx.hotmail.com", Provider::Microsoft),
            ("mta5.am0.yahoodns.net", Provider::Yahoo),
            ("mx-biz.mail.am0.yahoo.com", Provider::Yahoo),
            ("mx01.mail.icloud.com", Provider::Apple),
            ("mx.me.com", Provider::Apple),
            ("apple.com", Provider::Apple),
            ("mx.example.net", Provider::Other),
            ("notgoogle.com", Provider::Other),
            ("google.com.evil.example", Provider::Other),
            ("home.com", Provider::Other),
            ("", Provider::Other),
        ] {
            assert_eq!(classify(host, &[]), provider, "{host}");
        }
    }
}
