//! What one delivery attempt leaves behind, in types that cannot carry a recipient address: recipients appear
//! only as a domain and a count, the Message-ID only as a hash, and remote reply text is redacted. No field of a
//! serialized record can contain '@'.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;

use jiff::Timestamp;
use securemail_api::provider::Provider;
use securemail_api::tenant::TlsVersion;
use serde::{Deserialize, Serialize};

use super::Sha256Hex;
use crate::error::{Error, Result};

/// One delivery attempt of one message to one recipient domain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    /// When the attempt ended; written as RFC 3339 UTC.
    pub time: Timestamp,
    pub tenant: TenantRef,
    pub message_id_sha256: MessageIdHash,
    pub recipient_domain: DomainName,
    pub recipient_count: NonZeroU32,
    /// Absent when the attempt stopped before an MX was chosen (e.g. the MX lookup failed).
    pub mx_host: Option<DomainName>,
    /// Absent when no address of the MX was reached.
    pub mx_ip: Option<IpAddr>,
    pub source_ip: IpAddr,
    /// Absent when the attempt stopped before a policy applied (e.g. a DNS failure, which never means "no DANE").
    pub policy: Option<Policy>,
    /// Absent when no TLS session was established: nothing was sent, or, only under an approved `allowCleartext`
    /// override, the message went in cleartext.
    pub tls: Option<TlsSession>,
    /// The remote reply that decided the outcome (the reply to the message, a refused MAIL or DATA, the last RCPT
    /// reply when every recipient was refused); absent when none did, e.g. the connection closed after the data.
    pub smtp_reply: Option<SmtpReply>,
    pub outcome: Outcome,
    /// Why the attempt was abandoned when the MX broke the SMTP reply sequence. Absent otherwise, and in records of
    /// earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_error: Option<ProtocolError>,
    /// Recipients this attempt counted against the address's warmup allowance: the durable copy of the count, read
    /// back on start (see `warmup`). Absent when nothing counted, and in records of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<WarmupCount>,
    /// Why the sidecar refused the message itself, before any MX was chosen: nothing was sent, and Postfix was
    /// answered 5.7.1 for the recipients of this domain. Absent otherwise, and in records of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

/// Why the sidecar refused a message before delivering it: the header From, which picks the DKIM signing domain,
/// is not one mailbox at one of the tenant's sending domains. Permanent: the same message would be refused again.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    /// The header From domain is not one of the tenant's sending domains (or another tenant holds it).
    HeaderFromNotTenantDomain,
    /// The header From names several mailboxes.
    HeaderFromSeveralMailboxes,
    /// The message has more than one From header.
    HeaderFromRepeated,
    /// The message has no From header.
    HeaderFromMissing,
    /// The header From cannot be parsed unambiguously.
    HeaderFromUnparsable,
}

impl Refusal {
    /// Every refusal, for metric series that exist from the start.
    pub const ALL: [Refusal; 5] = [
        Refusal::HeaderFromNotTenantDomain,
        Refusal::HeaderFromSeveralMailboxes,
        Refusal::HeaderFromRepeated,
        Refusal::HeaderFromMissing,
        Refusal::HeaderFromUnparsable,
    ];
}

/// Recipients a provider answered (2xx or 5xx), which count against its share of today's warmup limit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WarmupCount {
    pub provider: Provider,
    pub recipients: NonZeroU32,
}

/// The TLS policy that governed the attempt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub source: PolicySource,
    /// E.g. the MTA-STS policy id.
    pub id: Option<Token>,
}

/// Where the TLS policy came from, strongest first.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PolicySource {
    Dane,
    MtaSts,
    Tenant,
    Override,
}

/// The TLS session an attempt ran over.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSession {
    pub version: TlsVersion,
    /// Negotiated cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: Token,
    pub verification: Verification,
    /// SHA-256 of each certificate the peer presented (DER), leaf first.
    pub peer_chain_sha256: Vec<Sha256Hex>,
}

/// How the peer was authenticated.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Verification {
    /// DANE, TLSA usage 2 (trust anchor).
    DaneTa,
    /// DANE, TLSA usage 3 (end entity).
    DaneEe,
    /// WebPKI chain valid for the MX name.
    Webpki,
    /// Encrypted, certificate not checked (tenant mode `encrypted`).
    UnverifiedEncrypted,
}

/// How a remote MX broke the reply sequence (RFC 5321 section 4.2, RFC 2920 section 3.1: one reply per command,
/// in order). Replies are matched to commands by position, so any of these could make a refused message look
/// accepted: the attempt is deferred and its session dropped.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[serde(rename_all = "kebab-case")]
pub enum ProtocolError {
    /// Bytes after the reply to the last command sent: more replies than commands.
    #[error("surplus reply: the server sent more replies than commands")]
    SurplusReply,
    /// Bytes waiting on an idle session when it was about to carry the next transaction.
    #[error("unsolicited bytes on the idle session before its reuse")]
    UnsolicitedWhileIdle,
    /// A reply the command cannot have, such as 2xx to DATA or 354 after the message.
    #[error("a reply the command cannot have")]
    UnexpectedReply,
}

/// What the attempt did to the message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Delivered,
    Deferred,
    Bounced,
}

/// `namespace/name` of a SecureMailTenant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub struct TenantRef {
    namespace: String,
    name: String,
}

impl FromStr for TenantRef {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self> {
        let (namespace, name) = value.split_once('/').ok_or(Error::InvalidField {
            field: "tenant",
            reason: "must be namespace/name",
        })?;
        check_object_name("tenant namespace", namespace, 63)?;
        check_object_name("tenant name", name, 253)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

fn check_object_name(field: &'static str, value: &str, max_len: usize) -> Result<()> {
    let valid = !value.is_empty()
        && value.len() <= max_len
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidField {
            field,
            reason: "must be a Kubernetes object name (lowercase letters, digits, '-', '.')",
        })
    }
}

impl fmt::Display for TenantRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl TryFrom<String> for TenantRef {
    type Error = Error;

    fn try_from(value: String) -> Result<Self> {
        value.parse()
    }
}

impl From<TenantRef> for String {
    fn from(tenant: TenantRef) -> Self {
        tenant.to_string()
    }
}

/// SHA-256 of a Message-ID header value; the value itself (which names the sending host and often a user) is
/// never stored.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct MessageIdHash(Sha256Hex);

impl MessageIdHash {
    /// Hashes the header value with surrounding whitespace removed, angle brackets kept: for
    /// `Message-ID: <a1@host.example>` that is the SHA-256 of `<a1@host.example>`, so anyone holding the message
    /// can find its records with `printf '%s' '<a1@host.example>' | sha256sum`.
    pub fn of_header_value(raw: &str) -> Self {
        Self(Sha256Hex::of(raw.trim().as_bytes()))
    }
}

/// A DNS name: a recipient domain or an MX host. Lowercased, without the root dot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(String);

impl DomainName {
    /// Refuses anything with '@' rather than stripping a local part: a caller passing an address is a bug to
    /// surface, not to guess around.
    pub fn new(raw: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidField {
            field: "domain name",
            reason,
        };
        if raw.contains('@') {
            return Err(invalid("contains '@': pass the domain only, never an address"));
        }
        let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
        if name.is_empty() || name.len() > 253 {
            return Err(invalid("must be 1 to 253 bytes long"));
        }
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(invalid("every label must be 1 to 63 bytes long"));
            }
            // U-labels are allowed: Postfix may hand over an internationalized domain as is.
            let allowed =
                |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (!c.is_ascii() && c.is_alphanumeric());
            if !label.chars().all(allowed) {
                return Err(invalid("may contain only letters, digits, '-', '_' and '.'"));
            }
        }
        Ok(Self(name))
    }
}

impl TryFrom<String> for DomainName {
    type Error = Error;

    fn try_from(value: String) -> Result<Self> {
        Self::new(&value)
    }
}

impl From<DomainName> for String {
    fn from(domain: DomainName) -> Self {
        domain.0
    }
}

/// A short identifier such as a cipher suite name or a policy id: 1 to 128 printable ASCII characters, no
/// spaces, '@', '"' or '\'.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub struct Token(String);

impl Token {
    pub fn new(raw: &str) -> Result<Self> {
        let valid = (1..=128).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'@' | b'"' | b'\\'));
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Error::InvalidField {
                field: "identifier (cipher suite or policy id)",
                reason: "must be 1 to 128 printable ASCII characters without spaces, '@', '\"' or '\\'",
            })
        }
    }
}

impl TryFrom<String> for Token {
    type Error = Error;

    fn try_from(value: String) -> Result<Self> {
        Self::new(&value)
    }
}

impl From<Token> for String {
    fn from(token: Token) -> Self {
        token.0
    }
}

/// The remote MX's reply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SmtpReply {
    pub code: ReplyCode,
    pub enhanced_status: Option<EnhancedStatus>,
    pub text: ReplyText,
}

impl SmtpReply {
    /// From a reply as received: its code and the text after the code (continuation lines joined with '\n').
    /// A leading enhanced status code (RFC 2034) whose class matches the reply code is split off; the rest is
    /// redacted and truncated (see [`ReplyText::redacted`]).
    pub fn from_remote(code: u16, text: &str) -> Result<Self> {
        let code = ReplyCode::try_from(code)?;
        let text = text.trim_start();
        let first_word = text.split(char::is_whitespace).next().unwrap_or_default();
        let enhanced_status = first_word
            .parse::<EnhancedStatus>()
            .ok()
            .filter(|status| status.class() == code.class());
        let rest = match enhanced_status {
            Some(_) => &text[first_word.len()..],
            None => text,
        };
        Ok(Self {
            code,
            enhanced_status,
            text: ReplyText::redacted(rest),
        })
    }
}

/// A three-digit SMTP reply code, 200 to 599.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(try_from = "u16", into = "u16")]
pub struct ReplyCode(u16);

impl ReplyCode {
    fn class(self) -> u16 {
        self.0 / 100
    }
}

impl TryFrom<u16> for ReplyCode {
    type Error = Error;

    fn try_from(code: u16) -> Result<Self> {
        if (200..=599).contains(&code) {
            Ok(Self(code))
        } else {
            Err(Error::InvalidField {
                field: "SMTP reply code",
                reason: "must be 200 to 599",
            })
        }
    }
}

impl From<ReplyCode> for u16 {
    fn from(code: ReplyCode) -> Self {
        code.0
    }
}

/// An enhanced mail system status code (RFC 3463), e.g. `5.7.1`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub struct EnhancedStatus(String);

impl EnhancedStatus {
    fn class(&self) -> u16 {
        match self.0.as_bytes().first() {
            Some(b'2') => 2,
            Some(b'4') => 4,
            _ => 5,
        }
    }
}

impl FromStr for EnhancedStatus {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self> {
        let number = |part: &str| (1..=3).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit());
        let mut parts = value.split('.');
        let valid = matches!(parts.next(), Some("2" | "4" | "5"))
            && parts.next().is_some_and(number)
            && parts.next().is_some_and(number)
            && parts.next().is_none();
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(Error::InvalidField {
                field: "enhanced status code",
                reason: "must be class.subject.detail, e.g. 5.7.1",
            })
        }
    }
}

impl TryFrom<String> for EnhancedStatus {
    type Error = Error;

    fn try_from(value: String) -> Result<Self> {
        value.parse()
    }
}

impl From<EnhancedStatus> for String {
    fn from(status: EnhancedStatus) -> Self {
        status.0
    }
}

/// Longest reply text kept, in characters; remote servers can send kilobytes of banner.
pub const MAX_REPLY_TEXT_CHARS: usize = 256;

const REDACTED: &str = "[redacted]";
const TRUNCATED: char = '…';

/// Remote reply text: single line, at most [`MAX_REPLY_TEXT_CHARS`] characters, no '@'.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub struct ReplyText(String);

impl ReplyText {
    /// Replies often echo the recipient (`550 5.1.1 <jane@example.net>: user unknown`), so every word containing
    /// '@' becomes `[redacted]` (a quoted local part with spaces counts as one word). Control characters become
    /// spaces, runs of whitespace one space, and text beyond the limit is cut and marked with '…'.
    pub fn redacted(raw: &str) -> Self {
        let cleaned: String = raw.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        let text = words(&cleaned)
            .into_iter()
            .map(|word| if word.contains('@') { REDACTED } else { word })
            .collect::<Vec<_>>()
            .join(" ");
        if text.chars().count() <= MAX_REPLY_TEXT_CHARS {
            Self(text)
        } else {
            let mut cut: String = text.chars().take(MAX_REPLY_TEXT_CHARS - 1).collect();
            cut.push(TRUNCATED);
            Self(cut)
        }
    }
}

/// Splits on whitespace outside double quotes.
fn words(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() && !quoted {
            if let Some(s) = start.take() {
                words.push(&text[s..i]);
            }
        } else {
            start.get_or_insert(i);
            if c == '"' {
                quoted = !quoted;
            }
        }
    }
    if let Some(s) = start {
        words.push(&text[s..]);
    }
    words
}

impl TryFrom<String> for ReplyText {
    type Error = Error;

    /// Strict: a stored text must already be in the form [`ReplyText::redacted`] produces.
    fn try_from(text: String) -> Result<Self> {
        let valid = text.chars().count() <= MAX_REPLY_TEXT_CHARS && !text.chars().any(|c| c == '@' || c.is_control());
        if valid {
            Ok(Self(text))
        } else {
            Err(Error::InvalidField {
                field: "SMTP reply text",
                reason: "must be at most 256 characters without '@' or control characters",
            })
        }
    }
}

impl From<ReplyText> for String {
    fn from(text: ReplyText) -> Self {
        text.0
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A fully populated attempt, used across the evidence tests.
    pub(in crate::evidence) fn sample_attempt() -> Attempt {
        Attempt {
            time: "2025-01-15T09:30:00Z".parse().unwrap(),
            tenant: "clinic-a/outbound".parse().unwrap(),
            message_id_sha256: MessageIdHash::of_header_value(" <a1@host.example>"),
            recipient_domain: DomainName::new("Example.NET.").unwrap(),
            recipient_count: NonZeroU32::new(2).unwrap(),
            mx_host: Some(DomainName::new("mx1.example.net").unwrap()),
            mx_ip: Some("203.0.113.25".parse().unwrap()),
            source_ip: "192.0.2.10".parse().unwrap(),
            policy: Some(Policy {
                source: PolicySource::MtaSts,
                id: Some(Token::new("20250101T000000").unwrap()),
            }),
            tls: Some(TlsSession {
                version: TlsVersion::Tls13,
                cipher: Token::new("TLS13_AES_256_GCM_SHA384").unwrap(),
                verification: Verification::Webpki,
                peer_chain_sha256: vec![Sha256Hex::of(b"leaf"), Sha256Hex::of(b"intermediate")],
            }),
            smtp_reply: Some(SmtpReply::from_remote(250, "2.0.0 Ok: queued as 4XyZ").unwrap()),
            outcome: Outcome::Delivered,
            protocol_error: None,
            warmup: Some(WarmupCount {
                provider: Provider::Microsoft,
                recipients: NonZeroU32::new(2).unwrap(),
            }),
            refusal: None,
        }
    }

    #[test]
    fn record_serializes_to_the_documented_shape() {
        let json = serde_json::to_string(&sample_attempt()).unwrap();
        let expected = concat!(
            r#"{"time":"2025-01-15T09:30:00Z","tenant":"clinic-a/outbound","#,
            r#""messageIdSha256":"527a8802f1bc7c7f75a758ef89659e6564342727d6ca2f254021e17f5acf2128","#,
            r#""recipientDomain":"example.net","recipientCount":2,"mxHost":"mx1.example.net","#,
            r#""mxIp":"203.0.113.25","sourceIp":"192.0.2.10","#,
            r#""policy":{"source":"mta-sts","id":"20250101T000000"},"#,
            r#""tls":{"version":"1.3","cipher":"TLS13_AES_256_GCM_SHA384","verification":"webpki","#,
            r#""peerChainSha256":["#,
            r#""9f91161f43433e49a6de6db680d79f60159f2e4ac9172621a12846428158440b","#,
            r#""94e6f02a5aca51e44a2c057e9c0f3ced80814c198de8a84b4f5cab7e06ea2094"]},"#,
            r#""smtpReply":{"code":250,"enhancedStatus":"2.0.0","text":"Ok: queued as 4XyZ"},"#,
            r#""outcome":"delivered","warmup":{"provider":"microsoft","recipients":2}}"#
        );
        assert_eq!(json, expected);
        let back: Attempt = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sample_attempt());
    }

    #[test]
    fn a_refused_message_records_why_and_that_nothing_was_sent() {
        let refused = Attempt {
            mx_host: None,
            mx_ip: None,
            policy: None,
            tls: None,
            smtp_reply: None,
            outcome: Outcome::Bounced,
            warmup: None,
            refusal: Some(Refusal::HeaderFromNotTenantDomain),
            ..sample_attempt()
        };
        let json = serde_json::to_string(&refused).unwrap();
        assert!(
            json.ends_with(r#""outcome":"bounced","refusal":"header-from-not-tenant-domain"}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Attempt>(&json).unwrap(), refused);
        // Records of deliveries, and of earlier versions, have no such field.
        assert!(!serde_json::to_string(&sample_attempt()).unwrap().contains("refusal"));
    }

    #[test]
    fn message_id_hash_is_the_sha256_of_the_trimmed_header_value() {
        assert_eq!(
            MessageIdHash::of_header_value("  <a1@host.example>\r\n"),
            MessageIdHash(Sha256Hex::of(b"<a1@host.example>"))
        );
    }

    #[test]
    fn domain_with_an_at_sign_is_refused_without_repeating_it() {
        for address in [
            "jane@example.net",
            "@example.net",
            "example.net@",
            "\"j d\"@example.net",
        ] {
            let err = DomainName::new(address).unwrap_err();
            let message = err.to_string();
            assert!(message.contains("never an address"), "{message}");
            assert!(!message.contains("example.net"), "{message}");
        }
    }

    #[test]
    fn domain_names_are_normalized_and_checked() {
        assert_eq!(
            String::from(DomainName::new("MX1.Example.NET.").unwrap()),
            "mx1.example.net"
        );
        assert_eq!(
            String::from(DomainName::new("bücher.example").unwrap()),
            "bücher.example"
        );
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            "a b",
            "a/b",
            "<a>",
            &"a".repeat(64),
            &"a.".repeat(128),
        ] {
            assert!(DomainName::new(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn tenant_ref_is_namespace_slash_name() {
        let tenant: TenantRef = "clinic-a/outbound".parse().unwrap();
        assert_eq!(tenant.to_string(), "clinic-a/outbound");
        for bad in ["clinic-a", "/x", "x/", "a/b/c", "A/b", "a@b/c"] {
            assert!(bad.parse::<TenantRef>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn reply_splits_a_matching_enhanced_status_only() {
        let reply = SmtpReply::from_remote(550, "5.7.1 Relaying denied").unwrap();
        assert_eq!(reply.enhanced_status, Some("5.7.1".parse().unwrap()));
        assert_eq!(String::from(reply.text), "Relaying denied");

        let mismatched = SmtpReply::from_remote(451, "5.7.1 odd server").unwrap();
        assert_eq!(mismatched.enhanced_status, None);
        assert_eq!(String::from(mismatched.text), "5.7.1 odd server");

        assert!(SmtpReply::from_remote(199, "x").is_err());
        assert!(SmtpReply::from_remote(600, "x").is_err());
    }

    #[test]
    fn reply_text_redacts_addresses_and_is_bounded() {
        let reply = SmtpReply::from_remote(
            550,
            "5.1.1 <jane.doe@example.net>: Recipient address rejected:\r\n \"jane doe\"@example.net unknown",
        )
        .unwrap();
        assert_eq!(
            String::from(reply.text),
            "[redacted] Recipient address rejected: [redacted] unknown"
        );

        let long = ReplyText::redacted(&"x".repeat(1000));
        let long = String::from(long);
        assert_eq!(long.chars().count(), MAX_REPLY_TEXT_CHARS);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn stored_reply_text_must_already_be_clean() {
        let with_at = r#"{"code":550,"enhancedStatus":null,"text":"jane@example.net"}"#;
        assert!(serde_json::from_str::<SmtpReply>(with_at).is_err());
        let with_newline = r#"{"code":550,"enhancedStatus":null,"text":"a\nb"}"#;
        assert!(serde_json::from_str::<SmtpReply>(with_newline).is_err());
    }

    /// Attempts with every optional part present or absent and caller text full of addresses.
    pub(in crate::evidence) fn arb_attempt() -> impl Strategy<Value = Attempt> {
        let domain = || "[a-z0-9]{1,12}(\\.[a-z0-9-]{1,12}){0,3}".prop_map(|d| DomainName::new(&d).unwrap());
        let policy = (
            prop_oneof![
                Just(PolicySource::Dane),
                Just(PolicySource::MtaSts),
                Just(PolicySource::Tenant),
                Just(PolicySource::Override),
            ],
            proptest::option::of("[a-zA-Z0-9]{1,32}".prop_map(|id| Token::new(&id).unwrap())),
        )
            .prop_map(|(source, id)| Policy { source, id });
        let tls = (
            prop_oneof![Just(TlsVersion::Tls12), Just(TlsVersion::Tls13)],
            "[A-Z0-9_]{1,40}".prop_map(|cipher| Token::new(&cipher).unwrap()),
            prop_oneof![
                Just(Verification::DaneTa),
                Just(Verification::DaneEe),
                Just(Verification::Webpki),
                Just(Verification::UnverifiedEncrypted),
            ],
            prop::collection::vec(any::<[u8; 8]>().prop_map(|der| Sha256Hex::of(&der)), 0..4),
        )
            .prop_map(|(version, cipher, verification, peer_chain_sha256)| TlsSession {
                version,
                cipher,
                verification,
                peer_chain_sha256,
            });
        let reply =
            (200u16..600, any::<String>()).prop_map(|(code, text)| SmtpReply::from_remote(code, &text).unwrap());
        let outcome = prop_oneof![
            Just(Outcome::Delivered),
            Just(Outcome::Deferred),
            Just(Outcome::Bounced)
        ];
        let warmup = (proptest::sample::select(Provider::ALL.to_vec()), 1u32..10_000).prop_map(|(provider, count)| {
            WarmupCount {
                provider,
                recipients: NonZeroU32::new(count).unwrap(),
            }
        });
        (
            (0i64..4_000_000_000, "[a-z0-9]{1,10}/[a-z0-9.-]{1,20}", any::<String>()),
            (domain(), 1u32..10_000, proptest::option::of(domain())),
            (proptest::option::of(any::<IpAddr>()), any::<IpAddr>()),
            (
                proptest::option::of(policy),
                proptest::option::of(tls),
                proptest::option::of(reply),
                outcome,
                proptest::option::of(warmup),
                proptest::option::of(prop_oneof![
                    Just(ProtocolError::SurplusReply),
                    Just(ProtocolError::UnsolicitedWhileIdle),
                    Just(ProtocolError::UnexpectedReply),
                ]),
                proptest::option::of(proptest::sample::select(Refusal::ALL.to_vec())),
            ),
        )
            .prop_map(
                |(
                    (second, tenant, message_id),
                    (recipient_domain, count, mx_host),
                    (mx_ip, source_ip),
                    (policy, tls, smtp_reply, outcome, warmup, protocol_error, refusal),
                )| Attempt {
                    time: Timestamp::from_second(second).unwrap(),
                    tenant: tenant.parse().unwrap(),
                    message_id_sha256: MessageIdHash::of_header_value(&format!("<{message_id}@host.example>")),
                    recipient_domain,
                    recipient_count: NonZeroU32::new(count).unwrap(),
                    mx_host,
                    mx_ip,
                    source_ip,
                    policy,
                    tls,
                    smtp_reply,
                    outcome,
                    protocol_error,
                    warmup,
                    refusal,
                },
            )
    }

    proptest! {
        #[test]
        fn serialized_attempts_round_trip_and_never_contain_an_at_sign(attempt in arb_attempt()) {
            let json = serde_json::to_string(&attempt).unwrap();
            prop_assert!(!json.contains('@'), "{}", json);
            prop_assert_eq!(serde_json::from_str::<Attempt>(&json).unwrap(), attempt);
        }

        #[test]
        fn any_text_with_an_at_sign_is_never_a_domain(local in "[^@]{0,20}", domain in "[^@]{0,20}") {
            let address = format!("{local}@{domain}");
            prop_assert!(DomainName::new(&address).is_err());
        }

        #[test]
        fn redacted_reply_text_is_always_storable_and_has_no_at_sign(raw in any::<String>()) {
            let text = ReplyText::redacted(&raw);
            let stored = String::from(text.clone());
            prop_assert!(!stored.contains('@'));
            prop_assert_eq!(ReplyText::try_from(stored).unwrap(), text);
        }
    }
}
