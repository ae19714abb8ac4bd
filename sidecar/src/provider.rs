//! The mailbox provider class of an MX host, by host-name suffix.

pub use securemail_api::provider::Provider;

/// MX host suffixes per provider; a host matches when it equals a suffix or ends with "." + suffix.
const SUFFIXES: [(&str, Provider); 9] = [
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

/// Classifies an MX host name (case and a trailing root dot are ignored). `protection.outlook.com` is covered
/// by `outlook.com`.
pub fn of_mx(host: &str) -> Provider {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    SUFFIXES
        .iter()
        .find(|(suffix, _)| host == *suffix || host.strip_suffix(suffix).is_some_and(|prefix| prefix.ends_with('.')))
        .map_or(Provider::Other, |&(_, provider)| provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mx_hosts_are_classified_by_suffix_on_label_boundaries() {
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
            assert_eq!(of_mx(host), provider, "{host}");
        }
    }
}
