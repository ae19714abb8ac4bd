//! The envelope of one LMTP transaction and the parser for the MAIL and RCPT arguments (RFC 5321 section 4.1.2,
//! RFC 6531 for SMTPUTF8, RFC 3461 for the DSN parameters, RFC 1870 SIZE, RFC 6152 BODY).
//!
//! Addresses are kept in their wire form (a quoted local part keeps its quotes) so they can be handed to the
//! next hop unchanged. `Debug` never shows a local part: envelopes end up in logs.

use std::fmt;

use super::reply::Reply;

/// The envelope of one transaction: the sender, its MAIL parameters, and the recipients accepted so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// `None` for the null reverse-path `<>` (bounces and other notifications).
    pub sender: Option<Mailbox>,
    pub params: MailParams,
    /// In RCPT order; `deliver` answers in this order.
    pub recipients: Vec<Recipient>,
}

/// Parameters of the MAIL command, passed through for the next hop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=`: the client's estimate of the message size in octets.
    pub size: Option<u64>,
    pub body: Option<Body>,
    /// The message or its envelope needs SMTPUTF8 from every hop.
    pub smtputf8: bool,
    /// `RET=` (RFC 3461): what a DSN should include.
    pub ret: Option<Ret>,
    /// `ENVID=` (RFC 3461), as received (xtext).
    pub envid: Option<String>,
    /// `REQUIRETLS` (RFC 8689): every hop must use verified TLS and support REQUIRETLS, or the message bounces.
    pub requiretls: bool,
}

/// `BODY=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// `RET=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    Full,
    Headers,
}

/// One recipient with its RCPT parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    pub mailbox: Mailbox,
    /// `NOTIFY=` (RFC 3461), upper-cased: `NEVER` or a comma list of `SUCCESS`, `FAILURE`, `DELAY`.
    pub notify: Option<String>,
    /// `ORCPT=` (RFC 3461).
    pub orcpt: Option<OriginalRecipient>,
}

impl Recipient {
    /// The recipient's domain: lower-case ASCII letters, U-labels as received. Safe to log.
    pub fn domain(&self) -> &str {
        self.mailbox.domain()
    }
}

/// `local-part@domain`. The domain is a host name (address literals are refused) with ASCII letters lower-cased.
#[derive(Clone, PartialEq, Eq)]
pub struct Mailbox {
    local_part: String,
    domain: String,
}

impl Mailbox {
    /// The local part in its wire form (with quotes, if it was quoted). Never log it.
    pub fn local_part(&self) -> &str {
        &self.local_part
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }
}

impl fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mailbox(<redacted>@{})", self.domain)
    }
}

/// The `ORCPT=` value, `addr-type;xtext`. It holds an address, so `Debug` shows only its type.
#[derive(Clone, PartialEq, Eq)]
pub struct OriginalRecipient(String);

impl OriginalRecipient {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OriginalRecipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr_type = self.0.split(';').next().unwrap_or_default();
        write!(f, "OriginalRecipient({addr_type};<redacted>)")
    }
}

const BAD_SENDER: Reply = Reply::fixed(501, (5, 1, 7), "bad sender address syntax");
const BAD_RECIPIENT: Reply = Reply::fixed(501, (5, 1, 3), "bad recipient address syntax");
const SENDER_LITERAL: Reply = Reply::fixed(553, (5, 1, 7), "address literals are not accepted; use a domain name");
const RECIPIENT_LITERAL: Reply = Reply::fixed(
    553,
    (5, 1, 3),
    "address literals are not accepted: secure delivery needs a domain name",
);
const NULL_RECIPIENT: Reply = Reply::fixed(501, (5, 1, 3), "the null address <> is not a recipient");
const NEEDS_SMTPUTF8: Reply = Reply::fixed(553, (5, 6, 7), "non-ASCII address without SMTPUTF8, or invalid UTF-8");
const BAD_PARAMETER: Reply = Reply::fixed(501, (5, 5, 4), "malformed or duplicate parameter");
const UNKNOWN_PARAMETER: Reply = Reply::fixed(555, (5, 5, 4), "unsupported parameter");

/// Longest domain, as in DNS.
const MAX_DOMAIN_OCTETS: usize = 255;
/// Longest ENVID (RFC 3461 section 4.4).
const MAX_ENVID_OCTETS: usize = 100;

/// The argument of `MAIL FROM:`, i.e. what follows the colon.
pub(super) fn parse_mail_from(argument: &[u8]) -> Result<(Option<Mailbox>, MailParams), Reply> {
    let (path, rest) = parse_path(argument).ok_or(BAD_SENDER)?;
    let mut params = MailParams::default();
    for (keyword, value) in parameters(rest)? {
        let duplicate = match (keyword.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(value)) => params.size.replace(parse_size(value)?).is_some(),
            ("BODY", Some(value)) => {
                let body = match value.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    _ => return Err(BAD_PARAMETER),
                };
                params.body.replace(body).is_some()
            }
            ("SMTPUTF8", None) => std::mem::replace(&mut params.smtputf8, true),
            ("REQUIRETLS", None) => std::mem::replace(&mut params.requiretls, true),
            ("RET", Some(value)) => {
                let ret = match value.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Headers,
                    _ => return Err(BAD_PARAMETER),
                };
                params.ret.replace(ret).is_some()
            }
            ("ENVID", Some(value)) if value.len() <= MAX_ENVID_OCTETS && is_xtext(value) => {
                params.envid.replace(value.to_owned()).is_some()
            }
            ("SIZE" | "BODY" | "SMTPUTF8" | "REQUIRETLS" | "RET" | "ENVID", _) => return Err(BAD_PARAMETER),
            _ => return Err(UNKNOWN_PARAMETER),
        };
        if duplicate {
            return Err(BAD_PARAMETER);
        }
    }
    let sender = match path {
        Path::Null => None,
        Path::Literal => return Err(SENDER_LITERAL),
        Path::Mailbox(raw) => Some(raw.into_mailbox(params.smtputf8)?),
    };
    Ok((sender, params))
}

/// The argument of `RCPT TO:`. `smtputf8` is whether the transaction's MAIL command carried SMTPUTF8.
pub(super) fn parse_rcpt_to(argument: &[u8], smtputf8: bool) -> Result<Recipient, Reply> {
    let (path, rest) = parse_path(argument).ok_or(BAD_RECIPIENT)?;
    let mut notify = None;
    let mut orcpt = None;
    for (keyword, value) in parameters(rest)? {
        let duplicate = match (keyword.to_ascii_uppercase().as_str(), value) {
            ("NOTIFY", Some(value)) => notify.replace(parse_notify(value)?).is_some(),
            ("ORCPT", Some(value)) if is_orcpt(value) => orcpt.replace(OriginalRecipient(value.to_owned())).is_some(),
            ("NOTIFY" | "ORCPT", _) => return Err(BAD_PARAMETER),
            _ => return Err(UNKNOWN_PARAMETER),
        };
        if duplicate {
            return Err(BAD_PARAMETER);
        }
    }
    let mailbox = match path {
        Path::Null => return Err(NULL_RECIPIENT),
        Path::Literal => return Err(RECIPIENT_LITERAL),
        Path::Mailbox(raw) => raw.into_mailbox(smtputf8)?,
    };
    Ok(Recipient { mailbox, notify, orcpt })
}

enum Path<'a> {
    Null,
    /// `user@[192.0.2.1]`: syntactically fine, but not deliverable under a TLS policy that needs a name.
    Literal,
    Mailbox(RawMailbox<'a>),
}

/// A syntactically valid mailbox whose non-ASCII octets (allowed by the grammar) are not yet checked.
struct RawMailbox<'a> {
    local_part: &'a [u8],
    domain: &'a [u8],
}

impl RawMailbox<'_> {
    fn into_mailbox(self, smtputf8: bool) -> Result<Mailbox, Reply> {
        let ascii = self.local_part.is_ascii() && self.domain.is_ascii();
        if !ascii && !smtputf8 {
            return Err(NEEDS_SMTPUTF8);
        }
        match (std::str::from_utf8(self.local_part), std::str::from_utf8(self.domain)) {
            (Ok(local_part), Ok(domain)) => Ok(Mailbox {
                local_part: local_part.to_owned(),
                domain: domain.to_ascii_lowercase(),
            }),
            _ => Err(NEEDS_SMTPUTF8),
        }
    }
}

/// `<...>` at the start of `input` (spaces before it tolerated), and what follows it.
fn parse_path(input: &[u8]) -> Option<(Path<'_>, &[u8])> {
    let input = input.trim_ascii_start();
    let input = input.strip_prefix(b"<")?;
    if let Some(rest) = input.strip_prefix(b">") {
        return Some((Path::Null, rest));
    }
    // A source route (`@a.example,@b.example:`) is obsolete and must be ignored (RFC 5321 section 4.1.2).
    let input = match input.first() {
        Some(b'@') => {
            let colon = input.iter().position(|&b| b == b':')?;
            let route = &input[..colon];
            let valid = route
                .split(|&b| b == b',')
                .all(|hop| hop.strip_prefix(b"@").is_some_and(is_domain));
            if !valid {
                return None;
            }
            &input[colon + 1..]
        }
        _ => input,
    };
    let local_end = local_part_len(input)?;
    let (local_part, rest) = input.split_at(local_end);
    let rest = rest.strip_prefix(b"@")?;
    let domain_end = rest.iter().position(|&b| b == b'>')?;
    let (domain, rest) = rest.split_at(domain_end);
    let rest = &rest[1..];
    let path = if domain.starts_with(b"[") && domain.ends_with(b"]") && domain.len() > 2 {
        Path::Literal
    } else if is_domain(domain) {
        Path::Mailbox(RawMailbox { local_part, domain })
    } else {
        return None;
    };
    Some((path, rest))
}

/// Length of the Dot-string or Quoted-string at the start of `input`. Octets above 127 are allowed wherever RFC
/// 6531 allows UTF-8; whether they may be used is decided later.
fn local_part_len(input: &[u8]) -> Option<usize> {
    if let Some(quoted) = input.strip_prefix(b"\"") {
        let mut i = 0;
        loop {
            match *quoted.get(i)? {
                b'"' => return Some(i + 2),
                b'\\' => {
                    let escaped = *quoted.get(i + 1)?;
                    if !(b' '..=b'~').contains(&escaped) {
                        return None;
                    }
                    i += 2;
                }
                byte if byte == b' ' || byte == b'!' || (b'#'..=b'~').contains(&byte) || byte >= 0x80 => i += 1,
                _ => return None,
            }
        }
    }
    let len = input
        .iter()
        .position(|&b| !(is_atext(b) || b == b'.'))
        .unwrap_or(input.len());
    let dot_string = &input[..len];
    let valid = !dot_string.is_empty() && dot_string.split(|&b| b == b'.').all(|atom| !atom.is_empty());
    valid.then_some(len)
}

fn is_atext(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&byte) || byte >= 0x80
}

/// Letters, digits and inner hyphens per label (U-labels allowed), 1 to 63 octets each.
fn is_domain(domain: &[u8]) -> bool {
    domain.len() <= MAX_DOMAIN_OCTETS
        && domain.split(|&b| b == b'.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80)
                && !label.starts_with(b"-")
                && !label.ends_with(b"-")
        })
}

/// `keyword[=value]` pairs separated by spaces, after the path. Values are printable ASCII without '='.
fn parameters(input: &[u8]) -> Result<Vec<(&str, Option<&str>)>, Reply> {
    if input.is_empty() {
        return Ok(Vec::new());
    }
    if !input.starts_with(b" ") {
        return Err(BAD_PARAMETER);
    }
    let text = std::str::from_utf8(input).map_err(|_| BAD_PARAMETER)?;
    text.split(' ')
        .filter(|parameter| !parameter.is_empty())
        .map(|parameter| {
            let (keyword, value) = match parameter.split_once('=') {
                Some((keyword, value)) => (keyword, Some(value)),
                None => (parameter, None),
            };
            let keyword_valid = keyword.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && keyword.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            let value_valid = value.is_none_or(|value| {
                !value.is_empty() && value.bytes().all(|b| (b'!'..=b'~').contains(&b) && b != b'=')
            });
            if keyword_valid && value_valid {
                Ok((keyword, value))
            } else {
                Err(BAD_PARAMETER)
            }
        })
        .collect()
}

fn parse_size(value: &str) -> Result<u64, Reply> {
    if value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BAD_PARAMETER);
    }
    value.parse().map_err(|_| BAD_PARAMETER)
}

fn parse_notify(value: &str) -> Result<String, Reply> {
    let value = value.to_ascii_uppercase();
    let mut seen = Vec::new();
    for item in value.split(',') {
        if !matches!(item, "NEVER" | "SUCCESS" | "FAILURE" | "DELAY") || seen.contains(&item) {
            return Err(BAD_PARAMETER);
        }
        seen.push(item);
    }
    if seen.contains(&"NEVER") && seen.len() > 1 {
        return Err(BAD_PARAMETER);
    }
    Ok(value)
}

/// `addr-type;xtext`, e.g. `rfc822;jane+40example.net` (RFC 3461 section 4.2).
fn is_orcpt(value: &str) -> bool {
    value.split_once(';').is_some_and(|(addr_type, address)| {
        !addr_type.is_empty()
            && addr_type.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !address.is_empty()
            && is_xtext(address)
    })
}

/// Printable ASCII other than '+' and '=', with '+' only as the start of a `+XX` hex escape.
fn is_xtext(value: &str) -> bool {
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                let hex = |j: usize| {
                    bytes
                        .get(j)
                        .is_some_and(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b))
                };
                if !(hex(i + 1) && hex(i + 2)) {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if bytes[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(argument: &str) -> Result<(Option<Mailbox>, MailParams), Reply> {
        parse_mail_from(argument.as_bytes())
    }

    fn recipient(argument: &[u8], smtputf8: bool) -> Result<Recipient, Reply> {
        parse_rcpt_to(argument, smtputf8)
    }

    fn code(result: Result<impl fmt::Debug, Reply>) -> u16 {
        result.unwrap_err().code()
    }

    #[test]
    fn plain_quoted_routed_and_null_paths() {
        let (mailbox, params) = sender("<Jane.Doe+tag@Example.ORG>").unwrap();
        let mailbox = mailbox.unwrap();
        assert_eq!(
            (mailbox.local_part(), mailbox.domain()),
            ("Jane.Doe+tag", "example.org")
        );
        assert_eq!(params, MailParams::default());

        assert_eq!(sender("<>").unwrap().0, None);
        assert_eq!(sender(" <>").unwrap().0, None);

        let quoted = recipient(br#"<"john \"jd\" doe"@example.net>"#, false).unwrap();
        assert_eq!(quoted.mailbox.local_part(), r#""john \"jd\" doe""#);
        assert_eq!(quoted.domain(), "example.net");

        let routed = recipient(b"<@relay.example,@hop.example:user@example.net>", false).unwrap();
        assert_eq!((routed.mailbox.local_part(), routed.domain()), ("user", "example.net"));
    }

    #[test]
    fn malformed_paths_are_syntax_errors() {
        for bad in [
            &b"user@example.net"[..],
            b"<user@example.net",
            b"<user>",
            b"<@example.net>",
            b"<user@>",
            b"<.user@example.net>",
            b"<user.@example.net>",
            b"<us..er@example.net>",
            b"<us er@example.net>",
            b"<user@-example.net>",
            b"<user@example-.net>",
            b"<user@example..net>",
            b"<user@exa_mple.net>",
            b"<\"unterminated@example.net>",
            b"<\"bad\x07char\"@example.net>",
            b"<@relay..example:user@example.net>",
            b"<user@example.net>junk",
            b"<>",
        ] {
            assert_eq!(code(recipient(bad, true)), 501, "{}", String::from_utf8_lossy(bad));
        }
        let long_label = format!("<user@{}.example>", "a".repeat(64));
        assert_eq!(code(recipient(long_label.as_bytes(), false)), 501);
        let long_domain = format!("<user@{}example>", "a.".repeat(128));
        assert_eq!(code(recipient(long_domain.as_bytes(), false)), 501);
        assert_eq!(code(sender("<user@[192.0.2.1]>")), 553);
        assert_eq!(code(recipient(b"<user@[IPv6:2001:db8::1]>", false)), 553);
    }

    #[test]
    fn non_ascii_addresses_need_smtputf8_and_valid_utf8() {
        let utf8 = "<j\u{f6}rg@b\u{fc}cher.example>";
        assert_eq!(code(recipient(utf8.as_bytes(), false)), 553);
        let accepted = recipient(utf8.as_bytes(), true).unwrap();
        assert_eq!(accepted.domain(), "b\u{fc}cher.example");
        assert_eq!(code(recipient(b"<j\xff\xfe@example.net>", true)), 553);
        assert_eq!(code(recipient(b"<jane@ex\xc3ample.net>", true)), 553);

        assert_eq!(code(sender(&format!("{utf8} BODY=8BITMIME"))), 553);
        let (mailbox, params) = sender(&format!("{utf8} SMTPUTF8 BODY=8BITMIME")).unwrap();
        assert_eq!(mailbox.unwrap().local_part(), "j\u{f6}rg");
        assert!(params.smtputf8);
    }

    #[test]
    fn mail_parameters_are_parsed_and_checked() {
        let (_, params) =
            sender("<a@example.org> size=1234  BODY=8bitmime SMTPUTF8 RET=HDRS ENVID=QQ314159+2B1 requiretls").unwrap();
        assert_eq!(
            params,
            MailParams {
                size: Some(1234),
                body: Some(Body::EightBitMime),
                smtputf8: true,
                ret: Some(Ret::Headers),
                envid: Some("QQ314159+2B1".to_owned()),
                requiretls: true,
            }
        );
        for bad in [
            "<a@example.org> SIZE=",
            "<a@example.org> SIZE=12a",
            "<a@example.org> SIZE=99999999999999999999999",
            "<a@example.org> SIZE=1 SIZE=2",
            "<a@example.org> BODY=BINARYMIME",
            "<a@example.org> SMTPUTF8=yes",
            "<a@example.org> REQUIRETLS=yes",
            "<a@example.org> REQUIRETLS REQUIRETLS",
            "<a@example.org> RET=ALL",
            "<a@example.org> ENVID=a+zz",
            "<a@example.org> ENVID=a=b",
            "<a@example.org>SIZE=1",
            "<a@example.org> =1",
        ] {
            assert_eq!(code(sender(bad)), 501, "{bad}");
        }
        assert_eq!(code(sender("<a@example.org> AUTH=<>")), 555);
        assert_eq!(code(sender("<a@example.org> XFORWARD=1")), 555);
    }

    #[test]
    fn rcpt_parameters_are_parsed_and_checked() {
        let rcpt = recipient(
            b"<b@example.net> NOTIFY=success,delay ORCPT=rfc822;b+40example.net",
            false,
        )
        .unwrap();
        assert_eq!(rcpt.notify.as_deref(), Some("SUCCESS,DELAY"));
        assert_eq!(
            rcpt.orcpt.as_ref().map(OriginalRecipient::as_str),
            Some("rfc822;b+40example.net")
        );
        for bad in [
            &b"<b@example.net> NOTIFY=NEVER,SUCCESS"[..],
            b"<b@example.net> NOTIFY=SOMETIMES",
            b"<b@example.net> NOTIFY=DELAY,DELAY",
            b"<b@example.net> ORCPT=b@example.net",
            b"<b@example.net> ORCPT=rfc822;",
            b"<b@example.net> NOTIFY=NEVER NOTIFY=NEVER",
        ] {
            assert_eq!(code(recipient(bad, false)), 501, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(code(recipient(b"<b@example.net> SIZE=1", false)), 555);
    }

    #[test]
    fn debug_output_never_shows_local_parts() {
        let rcpt = recipient(
            b"<secret.person@example.net> ORCPT=rfc822;secret.person+40example.net",
            false,
        )
        .unwrap();
        let envelope = Envelope {
            sender: sender("<hidden.sender@example.org>").unwrap().0,
            params: MailParams::default(),
            recipients: vec![rcpt],
        };
        let debug = format!("{envelope:?} {envelope:#?}");
        assert!(!debug.contains("secret") && !debug.contains("hidden"), "{debug}");
        assert!(debug.contains("example.net") && debug.contains("rfc822"), "{debug}");
    }
}
