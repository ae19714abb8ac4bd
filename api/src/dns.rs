//! The DNS records a tenant must publish: SPF, DMARC, DKIM and reverse DNS (PTR). Pure rendering, no lookups.
//!
//! Owner names are fully qualified without a trailing dot (`_dmarc.example.org`), the form external-dns and most
//! DNS provider APIs take.
//!
//! Every TXT `value` is in zone-file presentation form: one or more double-quoted character-strings separated by
//! a single space, each holding at most 255 bytes (RFC 1035 §3.3.14), with `"` and `\` escaped as `\"` and `\\`
//! and control characters as `\DDD`. A value longer than 255 bytes is split into several strings; receivers
//! concatenate them without a separator (RFC 7208 §3.3, RFC 6376 §3.6.2.2), so the split may fall anywhere.
//! Short values are a single quoted string, so the value can be pasted into a zone file as it is.

use std::net::IpAddr;

use thiserror::Error;

use crate::tenant::{DkimAlgorithm, DmarcPolicy, DnsRecord, DnsRecordType, DomainSpec, PoolAddress, SpfAll};

/// Longest character-string a TXT record can hold (one length octet).
pub const MAX_CHARACTER_STRING: usize = 255;

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Why a record could not be rendered or a TXT value could not be read back.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DnsError {
    /// A pool address that is not an IPv4 or IPv6 address (the CRD schema normally refuses it first).
    #[error("pool address {address:?} is not an IPv4 or IPv6 address")]
    InvalidAddress { address: String },
    /// Text that is not a sequence of quoted character-strings.
    #[error("malformed TXT presentation at byte {offset}: {reason}")]
    MalformedTxt { offset: usize, reason: &'static str },
}

/// SPF for `domain`: the pool's addresses in pool order, then the domain's `include:`s, then `~all` or `-all`.
///
/// The value is TXT presentation form (see the module docs); a large pool yields several strings.
pub fn spf(domain: &DomainSpec, pool: &[PoolAddress]) -> Result<DnsRecord, DnsError> {
    let mut text = String::from("v=spf1");
    for address in pool {
        let ip = parse_address(address)?;
        let mechanism = if ip.is_ipv4() { "ip4" } else { "ip6" };
        text.push_str(&format!(" {mechanism}:{ip}"));
    }
    for include in &domain.spf.includes {
        text.push_str(" include:");
        text.push_str(include);
    }
    text.push_str(match domain.spf.all {
        SpfAll::Softfail => " ~all",
        SpfAll::Fail => " -all",
    });
    Ok(txt(domain.name.clone(), &text, "spf"))
}

/// DMARC for `domain` at `_dmarc.<domain>`: `v=DMARC1; p=…; pct=…`, then `rua=` and `ruf=` (with `fo=1`, report
/// on any failing mechanism) when report addresses are set.
///
/// Report addresses become `mailto:` URIs; characters a mailto URI or DMARC's own `,`/`!`/`;` syntax would
/// misread are percent-encoded (RFC 7489 §6.4, RFC 6068). The value is TXT presentation form (see the module docs).
pub fn dmarc(domain: &DomainSpec) -> DnsRecord {
    let spec = &domain.dmarc;
    let policy = match spec.policy {
        DmarcPolicy::None => "none",
        DmarcPolicy::Quarantine => "quarantine",
        DmarcPolicy::Reject => "reject",
    };
    let mut text = format!("v=DMARC1; p={policy}; pct={}", spec.percent);
    if !spec.aggregate_reports_to.is_empty() {
        text.push_str("; rua=");
        text.push_str(&mailto_list(&spec.aggregate_reports_to));
    }
    if !spec.failure_reports_to.is_empty() {
        text.push_str("; ruf=");
        text.push_str(&mailto_list(&spec.failure_reports_to));
        text.push_str("; fo=1");
    }
    txt(format!("_dmarc.{}", domain.name), &text, "dmarc")
}

/// DKIM key record at `<selector>._domainkey.<domain>`: `v=DKIM1; k=rsa|ed25519; p=<public_key_base64>`.
///
/// `public_key_base64` is the base64 SubjectPublicKeyInfo for RSA and the raw 32-byte key for Ed25519
/// (RFC 8463). The value is TXT presentation form (see the module docs): an RSA key of 2048 bits or more does not
/// fit one string and is split.
pub fn dkim(domain: &str, selector: &str, algorithm: DkimAlgorithm, public_key_base64: &str) -> DnsRecord {
    let key_type = match algorithm {
        DkimAlgorithm::RsaSha256 => "rsa",
        DkimAlgorithm::Ed25519Sha256 => "ed25519",
    };
    let text = format!("v=DKIM1; k={key_type}; p={public_key_base64}");
    txt(format!("{selector}._domainkey.{domain}"), &text, "dkim")
}

/// Reverse DNS for a pool address: `10.2.0.192.in-addr.arpa`, or 32 nibbles under `ip6.arpa` for IPv6.
///
/// The value is the hostname with a trailing dot (`mta1.example.org.`): a PTR target pasted into a zone file
/// without it would be read relative to the reverse zone's origin.
pub fn ptr(address: &PoolAddress) -> Result<DnsRecord, DnsError> {
    let name = match parse_address(address)? {
        IpAddr::V4(ip) => {
            let [a, b, c, d] = ip.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        IpAddr::V6(ip) => {
            let mut name = String::with_capacity(72);
            for byte in ip.octets().iter().rev() {
                for nibble in [byte & 0x0f, byte >> 4] {
                    name.push(char::from(HEX_DIGITS[usize::from(nibble)]));
                    name.push('.');
                }
            }
            name.push_str("ip6.arpa");
            name
        }
    };
    Ok(DnsRecord {
        name,
        record_type: DnsRecordType::Ptr,
        value: format!("{}.", address.hostname),
        purpose: "ptr".to_owned(),
    })
}

/// Splits a TXT value into character-strings of at most 255 bytes, never inside a UTF-8 character. An empty
/// value is one empty string.
pub fn split_txt(value: &str) -> Vec<&str> {
    let mut chunks = Vec::with_capacity(value.len() / MAX_CHARACTER_STRING + 1);
    let mut rest = value;
    while rest.len() > MAX_CHARACTER_STRING {
        let mut end = MAX_CHARACTER_STRING;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (chunk, tail) = rest.split_at(end);
        chunks.push(chunk);
        rest = tail;
    }
    chunks.push(rest);
    chunks
}

/// TXT presentation form of `value`: its [`split_txt`] chunks, each quoted and escaped, joined by one space.
pub fn render_txt(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for (i, chunk) in split_txt(value).into_iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push('"');
        for c in chunk.chars() {
            match c {
                '"' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                // Only ASCII controls: every other character is copied as its UTF-8 bytes.
                c if c.is_ascii_control() => {
                    out.push_str(&format!("\\{:03}", u32::from(c)));
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

/// The character-strings of a TXT presentation value (the inverse of [`render_txt`]'s quoting), unescaped.
pub fn parse_txt_strings(presentation: &str) -> Result<Vec<String>, DnsError> {
    let bytes = presentation.as_bytes();
    let malformed = |offset, reason| DnsError::MalformedTxt { offset, reason };
    let mut strings = Vec::new();
    let mut i = 0;
    loop {
        if bytes.get(i) != Some(&b'"') {
            return Err(malformed(i, "expected '\"'"));
        }
        i += 1;
        let mut content = Vec::new();
        loop {
            match bytes.get(i) {
                None => return Err(malformed(i, "unterminated string")),
                Some(b'"') => break,
                Some(b'\\') => {
                    let digits = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(u8::is_ascii_digit));
                    if let Some(digits) = digits {
                        let code = digits.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
                        let byte = u8::try_from(code).map_err(|_| malformed(i, "\\DDD escape above 255"))?;
                        content.push(byte);
                        i += 4;
                    } else {
                        let escaped = bytes.get(i + 1).ok_or_else(|| malformed(i, "unterminated escape"))?;
                        content.push(*escaped);
                        i += 2;
                    }
                }
                Some(byte) => {
                    content.push(*byte);
                    i += 1;
                }
            }
        }
        i += 1; // closing quote
        let string = String::from_utf8(content).map_err(|_| malformed(i, "not UTF-8"))?;
        strings.push(string);
        match bytes.get(i) {
            None => return Ok(strings),
            Some(b' ') => i += 1,
            Some(_) => return Err(malformed(i, "expected ' ' between strings")),
        }
    }
}

/// The TXT value a resolver hands to SPF/DKIM/DMARC: the character-strings concatenated.
pub fn parse_txt(presentation: &str) -> Result<String, DnsError> {
    Ok(parse_txt_strings(presentation)?.concat())
}

fn txt(name: String, text: &str, purpose: &str) -> DnsRecord {
    DnsRecord {
        name,
        record_type: DnsRecordType::Txt,
        value: render_txt(text),
        purpose: purpose.to_owned(),
    }
}

fn parse_address(address: &PoolAddress) -> Result<IpAddr, DnsError> {
    address.address.parse().map_err(|_| DnsError::InvalidAddress {
        address: address.address.clone(),
    })
}

/// `mailto:a,mailto:b` with each local part percent-encoded where RFC 6068 or DMARC's separators require it.
fn mailto_list(addresses: &[String]) -> String {
    let mut out = String::new();
    for (i, address) in addresses.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("mailto:");
        // The schema guarantees exactly one '@' followed by a DNS name, which needs no encoding.
        let (local, domain) = address.rsplit_once('@').unwrap_or((address, ""));
        for byte in local.bytes() {
            // RFC 6068 qchar minus DMARC's separators '!', ',' and ';'.
            if byte.is_ascii_alphanumeric() || b"-._~$'()*+:".contains(&byte) {
                out.push(char::from(byte));
            } else {
                out.push_str(&format!("%{byte:02X}"));
            }
        }
        if !domain.is_empty() {
            out.push('@');
            out.push_str(domain);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::{DkimSpec, DmarcSpec, SpfSpec};
    use proptest::prelude::*;

    fn domain(name: &str) -> DomainSpec {
        DomainSpec {
            name: name.to_owned(),
            dkim: DkimSpec::default(),
            spf: SpfSpec::default(),
            dmarc: DmarcSpec::default(),
        }
    }

    fn pool_address(address: &str, hostname: &str) -> PoolAddress {
        PoolAddress {
            address: address.to_owned(),
            hostname: hostname.to_owned(),
        }
    }

    #[test]
    fn spf_lists_pool_addresses_in_order_then_includes_then_all() {
        let mut d = domain("notify.example.org");
        d.spf.includes = vec!["_spf.tickets.example.com".to_owned()];
        d.spf.all = SpfAll::Fail;
        let pool = [
            pool_address("2001:db8::10", "mta1.example.org"),
            pool_address("192.0.2.10", "mta2.example.org"),
        ];
        let record = spf(&d, &pool).unwrap();
        assert_eq!(
            record,
            DnsRecord {
                name: "notify.example.org".to_owned(),
                record_type: DnsRecordType::Txt,
                value: "\"v=spf1 ip6:2001:db8::10 ip4:192.0.2.10 include:_spf.tickets.example.com -all\"".to_owned(),
                purpose: "spf".to_owned(),
            }
        );
    }

    #[test]
    fn spf_defaults_to_softfail() {
        let pool = [pool_address("192.0.2.10", "mta1.example.org")];
        let record = spf(&domain("example.org"), &pool).unwrap();
        assert_eq!(record.value, "\"v=spf1 ip4:192.0.2.10 ~all\"");
    }

    #[test]
    fn spf_for_a_large_pool_splits_into_several_strings() {
        let pool: Vec<_> = (1..=64)
            .map(|i| pool_address(&format!("2001:db8:ffff:ffff::{i:x}"), "mta.example.org"))
            .collect();
        let record = spf(&domain("example.org"), &pool).unwrap();
        let strings = parse_txt_strings(&record.value).unwrap();
        assert!(strings.len() > 1);
        assert!(strings.iter().all(|s| s.len() <= MAX_CHARACTER_STRING));
        let text = strings.concat();
        assert!(text.starts_with("v=spf1 ip6:2001:db8:ffff:ffff::1 ip6:"));
        assert!(text.ends_with(" ip6:2001:db8:ffff:ffff::40 ~all"));
    }

    #[test]
    fn spf_refuses_a_pool_address_that_is_not_an_ip() {
        let pool = [pool_address("192.0.2.300", "mta1.example.org")];
        let err = spf(&domain("example.org"), &pool).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pool address \"192.0.2.300\" is not an IPv4 or IPv6 address"
        );
    }

    #[test]
    fn dmarc_without_report_addresses_has_policy_and_percent_only() {
        let record = dmarc(&domain("notify.example.org"));
        assert_eq!(record.name, "_dmarc.notify.example.org");
        assert_eq!(record.record_type, DnsRecordType::Txt);
        assert_eq!(record.purpose, "dmarc");
        assert_eq!(record.value, "\"v=DMARC1; p=quarantine; pct=100\"");
    }

    #[test]
    fn dmarc_lists_report_uris_and_asks_for_failure_detail_only_with_ruf() {
        let mut d = domain("example.org");
        d.dmarc = DmarcSpec {
            policy: DmarcPolicy::Reject,
            aggregate_reports_to: vec!["dmarc@example.org".to_owned(), "agg@reports.example.net".to_owned()],
            failure_reports_to: vec![],
            percent: 50,
        };
        assert_eq!(
            dmarc(&d).value,
            "\"v=DMARC1; p=reject; pct=50; rua=mailto:dmarc@example.org,mailto:agg@reports.example.net\""
        );
        d.dmarc.failure_reports_to = vec!["forensic@example.org".to_owned()];
        d.dmarc.policy = DmarcPolicy::None;
        assert_eq!(
            dmarc(&d).value,
            "\"v=DMARC1; p=none; pct=50; rua=mailto:dmarc@example.org,mailto:agg@reports.example.net; \
             ruf=mailto:forensic@example.org; fo=1\""
        );
    }

    #[test]
    fn dmarc_percent_encodes_separators_in_local_parts() {
        let mut d = domain("example.org");
        d.dmarc.aggregate_reports_to = vec!["a,b!c;d%e=f+tag@example.org".to_owned()];
        assert_eq!(
            parse_txt(&dmarc(&d).value).unwrap(),
            "v=DMARC1; p=quarantine; pct=100; rua=mailto:a%2Cb%21c%3Bd%25e%3Df+tag@example.org"
        );
    }

    #[test]
    fn dkim_ed25519_fits_one_string() {
        let key = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
        let record = dkim("example.com", "brisbane", DkimAlgorithm::Ed25519Sha256, key);
        assert_eq!(
            record,
            DnsRecord {
                name: "brisbane._domainkey.example.com".to_owned(),
                record_type: DnsRecordType::Txt,
                value: format!("\"v=DKIM1; k=ed25519; p={key}\""),
                purpose: "dkim".to_owned(),
            }
        );
    }

    #[test]
    fn dkim_rsa_4096_splits_into_at_least_three_strings_that_join_to_the_record() {
        // A 4096-bit SubjectPublicKeyInfo is 550 bytes DER, 736 characters of base64.
        let key: String = (0..736)
            .map(|i| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i % 64]))
            .collect();
        let record = dkim("example.org", "sm-rsa-1", DkimAlgorithm::RsaSha256, &key);
        assert_eq!(record.name, "sm-rsa-1._domainkey.example.org");
        let strings = parse_txt_strings(&record.value).unwrap();
        assert!(strings.len() >= 3, "{} strings", strings.len());
        assert!(strings.iter().all(|s| s.len() <= MAX_CHARACTER_STRING));
        assert_eq!(strings.concat(), format!("v=DKIM1; k=rsa; p={key}"));
        // Presentation form: quoted strings separated by exactly one space.
        assert_eq!(record.value.matches("\" \"").count(), strings.len() - 1);
        assert!(record.value.starts_with("\"v=DKIM1; k=rsa; p=") && record.value.ends_with('"'));
    }

    #[test]
    fn ptr_for_ipv4_reverses_the_octets() {
        let record = ptr(&pool_address("192.0.2.10", "mta1.notify.example.org")).unwrap();
        assert_eq!(
            record,
            DnsRecord {
                name: "10.2.0.192.in-addr.arpa".to_owned(),
                record_type: DnsRecordType::Ptr,
                value: "mta1.notify.example.org.".to_owned(),
                purpose: "ptr".to_owned(),
            }
        );
    }

    #[test]
    fn ptr_for_ipv6_lists_all_32_nibbles_reversed() {
        let record = ptr(&pool_address("2001:db8::567:89ab", "mta2.example.org")).unwrap();
        assert_eq!(
            record.name,
            "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
        assert_eq!(record.value, "mta2.example.org.");
    }

    #[test]
    fn ptr_refuses_an_address_that_is_not_an_ip() {
        let err = ptr(&pool_address("mta1.example.org", "mta1.example.org")).unwrap_err();
        assert_eq!(
            err,
            DnsError::InvalidAddress {
                address: "mta1.example.org".to_owned()
            }
        );
    }

    #[test]
    fn render_txt_escapes_quotes_backslashes_and_controls() {
        assert_eq!(render_txt(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(render_txt("tab\there"), r#""tab\009here""#);
        assert_eq!(render_txt(""), r#""""#);
    }

    #[test]
    fn split_counts_content_bytes_not_escapes() {
        // 255 quotes are 255 bytes of content although they take 510 characters once escaped.
        let value = "\"".repeat(256);
        let strings = parse_txt_strings(&render_txt(&value)).unwrap();
        assert_eq!(strings.iter().map(String::len).collect::<Vec<_>>(), [255, 1]);
    }

    #[test]
    fn split_never_cuts_a_utf8_character() {
        let value = format!("{}é", "a".repeat(254));
        assert_eq!(split_txt(&value), ["a".repeat(254).as_str(), "é"]);
    }

    #[test]
    fn parse_txt_refuses_malformed_text() {
        for bad in ["", "abc", "\"abc", "\"a\"\"b\"", "\"a\"  \"b\"", "\"\\256\"", "\"a\\"] {
            assert!(
                matches!(parse_txt(bad), Err(DnsError::MalformedTxt { .. })),
                "{bad:?} accepted"
            );
        }
    }

    proptest! {
        #[test]
        fn split_then_join_is_the_identity(value in any::<String>()) {
            let chunks = split_txt(&value);
            prop_assert!(chunks.iter().all(|c| c.len() <= MAX_CHARACTER_STRING));
            prop_assert!(chunks.len() == 1 || chunks.iter().all(|c| !c.is_empty()));
            prop_assert_eq!(chunks.concat(), value);
        }

        #[test]
        fn rendered_txt_reads_back_as_the_value(value in "[ -~\t\"\\\\é€]{0,1200}") {
            let strings = parse_txt_strings(&render_txt(&value)).unwrap();
            prop_assert!(strings.iter().all(|s| s.len() <= MAX_CHARACTER_STRING));
            prop_assert_eq!(strings.concat(), value);
        }
    }
}
