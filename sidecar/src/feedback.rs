//! Spam-complaint intake. Tenants' feedback-loop processors (Yahoo CFL, Microsoft JMRP, any provider reporting to
//! the tenant's abuse mailbox) forward each ARF report (RFC 5965) through the tenant's authenticated submission
//! path to [`FEEDBACK_ADDRESS`]; Postfix hands it over LMTP like any other mail. The sidecar never delivers it:
//! it parses the report, counts a complaint against the pool address the report names, and answers 250, or 550
//! naming what is wrong so the processor sees the error.
//!
//! Nothing of a report is kept or logged beyond its Feedback-Type, the pool address and the provider class: the
//! complainer's address is PHI-adjacent. No evidence record is written either: evidence records delivery attempts,
//! and an intake attempts none.

use std::fmt;
use std::net::IpAddr;

use mail_parser::{MessageParser, MimeHeaders, PartType};
pub use securemail_api::feedback::{FEEDBACK_ADDRESS, FEEDBACK_DOMAIN, FEEDBACK_LOCAL_PART};

use crate::evidence::DomainName;
use crate::lmtp::Mailbox;

/// Longest piece of a report quoted back in a refusal (a Content-Type, a Source-IP value).
const MAX_QUOTED_CHARS: usize = 64;

/// Whether `mailbox` is the reserved feedback address (local part compared without case, as it is ours).
pub fn is_feedback_address(mailbox: &Mailbox) -> bool {
    mailbox.domain() == FEEDBACK_DOMAIN && mailbox.local_part().eq_ignore_ascii_case(FEEDBACK_LOCAL_PART)
}

/// RFC 5965 section 7.3's registered feedback types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedbackType {
    /// Unsolicited mail: the recipient pressed "this is spam".
    Abuse,
    /// Fraud or phishing: the recipient reported the message as a scam, weighed at least as heavily.
    Fraud,
    NotSpam,
    Virus,
    AuthFailure,
    Other,
    /// A type outside the registry (kept unnamed: the field is free text).
    Unregistered,
}

impl FeedbackType {
    fn parse(value: &str) -> Self {
        match value.trim().to_ascii_lowercase().as_str() {
            "abuse" => Self::Abuse,
            "fraud" => Self::Fraud,
            "not-spam" => Self::NotSpam,
            "virus" => Self::Virus,
            "auth-failure" => Self::AuthFailure,
            "other" => Self::Other,
            _ => Self::Unregistered,
        }
    }

    /// Whether the report is a complaint about the mail: what mailbox providers count in a sender's complaint
    /// rate. `not-spam`, `virus`, `auth-failure` and `other` say nothing about the recipients' view of it.
    pub fn is_complaint(self) -> bool {
        matches!(self, Self::Abuse | Self::Fraud)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Abuse => "abuse",
            Self::Fraud => "fraud",
            Self::NotSpam => "not-spam",
            Self::Virus => "virus",
            Self::AuthFailure => "auth-failure",
            Self::Other => "other",
            Self::Unregistered => "unregistered",
        }
    }
}

impl fmt::Display for FeedbackType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the intake takes from a report; everything else is dropped with the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedbackReport {
    pub feedback_type: FeedbackType,
    /// Where the reported message came from, in canonical form (an IPv4-mapped IPv6 address as IPv4).
    pub source_ip: IpAddr,
    /// The domain of `Original-Rcpt-To`, the complaining recipient's (its local part is never kept).
    pub recipient_domain: Option<DomainName>,
    /// The host of `Reporting-MTA`: the provider's own machine, for a report whose recipient is withheld.
    pub reporting_mta: Option<DomainName>,
}

/// Why a message is not an ARF report the intake can use. The text goes back to the processor in a 550 reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("the message has no header section")]
    NotAMessage,
    #[error(
        "Content-Type is {found}, expected multipart/report; report-type=feedback-report (send the report itself, not \
         a message that forwards it as an attachment)"
    )]
    NotAReport { found: String },
    #[error("multipart/report has report-type {found}, expected feedback-report")]
    WrongReportType { found: String },
    #[error("no message/feedback-report part")]
    NoFeedbackPart,
    #[error("{0} message/feedback-report parts, expected one")]
    SeveralFeedbackParts(usize),
    #[error("the returned message (message/rfc822) or its headers (text/rfc822-headers) are missing")]
    NoReturnedMessage,
    #[error("the feedback-report part has no {0} field")]
    MissingField(&'static str),
    #[error("the feedback-report part has more than one {0} field")]
    RepeatedField(&'static str),
    #[error("Source-IP {0} is not an IP address")]
    InvalidSourceIp(String),
}

/// Parses an ARF report (RFC 5965 section 2): a `multipart/report; report-type=feedback-report` message with one
/// `message/feedback-report` part carrying `Feedback-Type` and `Source-IP`, and the returned message or its
/// headers. Other fields the RFC requires (`User-Agent`, `Version`) are not checked: providers fill them
/// inconsistently and the count does not need them.
pub fn parse_report(message: &[u8]) -> Result<FeedbackReport, ReportError> {
    let parsed = MessageParser::new().parse(message).ok_or(ReportError::NotAMessage)?;
    let root = parsed.root_part();
    let content_type = root.content_type();
    let is_report = content_type.is_some_and(|ct| {
        ct.ctype().eq_ignore_ascii_case("multipart") && ct.subtype().is_some_and(|s| s.eq_ignore_ascii_case("report"))
    });
    if !is_report {
        let found = content_type.map_or_else(
            || "absent (text/plain)".to_owned(),
            |ct| quoted(&format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or_default())),
        );
        return Err(ReportError::NotAReport { found });
    }
    let report_type = content_type
        .and_then(|ct| ct.attributes())
        .and_then(|attributes| {
            attributes
                .iter()
                .find(|attribute| attribute.name.eq_ignore_ascii_case("report-type"))
        })
        .map(|attribute| attribute.value.as_ref());
    match report_type {
        Some(value) if value.eq_ignore_ascii_case("feedback-report") => {}
        other => {
            return Err(ReportError::WrongReportType {
                found: other.map_or_else(|| "absent".to_owned(), quoted),
            });
        }
    }

    let children = || {
        root.sub_parts()
            .unwrap_or_default()
            .iter()
            .filter_map(|&id| parsed.parts.get(usize::try_from(id).ok()?))
    };
    let feedback_parts: Vec<_> = children()
        .filter(|part| part.is_content_type("message", "feedback-report"))
        .collect();
    let feedback_part = match feedback_parts.as_slice() {
        [] => return Err(ReportError::NoFeedbackPart),
        [one] => *one,
        several => return Err(ReportError::SeveralFeedbackParts(several.len())),
    };
    let returned = children().any(|part| {
        matches!(part.body, PartType::Message(_)) && part.is_content_type("message", "rfc822")
            || part.is_content_type("text", "rfc822-headers")
    });
    if !returned {
        return Err(ReportError::NoReturnedMessage);
    }
    fields(feedback_part.contents())
}

/// The feedback-report part's fields, a header block (RFC 5965 section 3.1).
fn fields(block: &[u8]) -> Result<FeedbackReport, ReportError> {
    let parsed = MessageParser::new().parse_headers(block);
    let raw: Vec<(&str, &str)> = parsed.as_ref().map(|m| m.headers_raw().collect()).unwrap_or_default();
    // Folded values are unfolded; a field may appear at most once where RFC 5965 says so.
    let single = |name: &'static str| -> Result<Option<String>, ReportError> {
        let mut values = raw
            .iter()
            .filter(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.split_whitespace().collect::<Vec<_>>().join(" "));
        let first = values.next();
        match values.next() {
            Some(_) => Err(ReportError::RepeatedField(name)),
            None => Ok(first),
        }
    };
    let first = |name: &str| {
        raw.iter()
            .find(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim())
    };

    let feedback_type = single("Feedback-Type")?
        .map(|value| FeedbackType::parse(&value))
        .ok_or(ReportError::MissingField("Feedback-Type"))?;
    let source_ip = single("Source-IP")?.ok_or(ReportError::MissingField("Source-IP"))?;
    let source_ip = source_ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map_err(|_| ReportError::InvalidSourceIp(quoted(&source_ip)))?
        .to_canonical();
    // Several recipients may be listed; they share one report, so the first one's domain stands for all.
    let recipient_domain = first("Original-Rcpt-To").and_then(address_domain);
    // "dns; mta.example.net" (RFC 3464 section 2.2.2); other name types are not host names.
    let reporting_mta = first("Reporting-MTA")
        .and_then(|value| value.split_once(';'))
        .filter(|(kind, _)| kind.trim().eq_ignore_ascii_case("dns"))
        .and_then(|(_, host)| DomainName::new(host.trim()).ok());
    Ok(FeedbackReport {
        feedback_type,
        source_ip,
        recipient_domain,
        reporting_mta,
    })
}

/// The domain of an address such as `<user@example.net>` or `rfc822; user@example.net`; `None` if there is no
/// valid one. The local part is dropped here, before anything else sees it.
fn address_domain(value: &str) -> Option<DomainName> {
    let (_, domain) = value.rsplit_once('@')?;
    DomainName::new(domain.trim().trim_end_matches('>').trim()).ok()
}

/// Report text quoted in a reply: short, and printable ASCII only (the reply sanitises again).
fn quoted(text: &str) -> String {
    let printable: String = text
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .take(MAX_QUOTED_CHARS)
        .collect();
    format!("{printable:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ARF report as Yahoo's or Microsoft's feedback loops send them, with `fields` as its
    /// message/feedback-report part and the returned message attached.
    fn report(fields: &str) -> String {
        report_with(
            "multipart/report; report-type=feedback-report;\r\n boundary=\"arf-1\"",
            fields,
            RETURNED,
        )
    }

    const RETURNED: &str = "--arf-1\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n\
        Received: from mta-0.notify.example.org (mta-0.notify.example.org [192.0.2.10])\r\n\
        From: Records <records@example.org>\r\nTo: patient@example.net\r\nSubject: Your results\r\n\
        Message-ID: <m1@example.org>\r\n\r\nThe body.\r\n";

    fn report_with(content_type: &str, fields: &str, returned: &str) -> String {
        format!(
            "Received: from submission (submission [10.0.0.7])\r\n\tby mta-1.notify.example.org (Postfix)\r\n\
             From: Feedback Loop <fbl@example.org>\r\nTo: feedback@feedback.securemail.invalid\r\n\
             Subject: FW: Complaint about message from 192.0.2.10\r\nMIME-Version: 1.0\r\n\
             Content-Type: {content_type}\r\n\r\n\
             --arf-1\r\nContent-Type: text/plain; charset=\"US-ASCII\"\r\n\r\n\
             This is an email abuse report for an email message received from IP 192.0.2.10.\r\n\r\n\
             --arf-1\r\nContent-Type: message/feedback-report\r\n\r\n{fields}\r\n{returned}--arf-1--\r\n"
        )
    }

    const ABUSE: &str = "Feedback-Type: abuse\r\nUser-Agent: YahooMailFBL/1.0\r\nVersion: 1\r\n\
        Original-Mail-From: <bounces@example.org>\r\nOriginal-Rcpt-To: <patient@example.net>\r\n\
        Arrival-Date: Thu, 8 Mar 2026 14:00:00 EDT\r\nReporting-MTA: dns; mta1.fbl.yahoo.com\r\n\
        Source-IP: 192.0.2.10\r\nReported-Domain: example.org\r\n";

    #[test]
    fn an_abuse_report_yields_its_type_source_and_the_recipients_domain_only() {
        let parsed = parse_report(report(ABUSE).as_bytes()).unwrap();
        assert_eq!(
            parsed,
            FeedbackReport {
                feedback_type: FeedbackType::Abuse,
                source_ip: "192.0.2.10".parse().unwrap(),
                recipient_domain: Some(DomainName::new("example.net").unwrap()),
                reporting_mta: Some(DomainName::new("mta1.fbl.yahoo.com").unwrap()),
            }
        );
        assert!(!format!("{parsed:?}").contains("patient"));
    }

    #[test]
    fn field_names_and_types_are_case_insensitive_and_values_may_be_folded() {
        let fields = "feedback-type:\r\n ABUSE\r\nuser-agent: Hotmail FBL\r\nversion: 0.1\r\n\
            source-ip: [::ffff:192.0.2.11]\r\n";
        let parsed = parse_report(report(fields).as_bytes()).unwrap();
        assert_eq!(parsed.feedback_type, FeedbackType::Abuse);
        assert_eq!(parsed.source_ip, "192.0.2.11".parse::<IpAddr>().unwrap());
        assert_eq!(parsed.recipient_domain, None);
        assert_eq!(parsed.reporting_mta, None);
    }

    #[test]
    fn the_returned_headers_alone_and_a_base64_feedback_part_are_accepted() {
        let headers = "--arf-1\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: records@example.org\r\n\
            To: redacted@example.net\r\nSubject: Your results\r\n\r\n";
        let text = report_with(
            "multipart/report; report-type=\"Feedback-Report\"; boundary=arf-1",
            "Feedback-Type: fraud\r\nVersion: 1\r\nSource-IP: 2001:db8::10\r\n",
            headers,
        );
        let parsed = parse_report(text.as_bytes()).unwrap();
        assert_eq!(parsed.feedback_type, FeedbackType::Fraud);
        assert_eq!(parsed.source_ip, "2001:db8::10".parse::<IpAddr>().unwrap());

        // "Feedback-Type: abuse\r\nSource-IP: 192.0.2.12\r\n" in base64.
        let encoded = report(ABUSE).replace(
            &format!("Content-Type: message/feedback-report\r\n\r\n{ABUSE}"),
            "Content-Type: message/feedback-report\r\nContent-Transfer-Encoding: base64\r\n\r\n\
             RmVlZGJhY2stVHlwZTogYWJ1c2UNClNvdXJjZS1JUDogMTkyLjAuMi4xMg0K\r\n",
        );
        let parsed = parse_report(encoded.as_bytes()).unwrap();
        assert_eq!(parsed.source_ip, "192.0.2.12".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn other_feedback_types_parse_and_only_abuse_and_fraud_are_complaints() {
        for (value, expected) in [
            ("not-spam", FeedbackType::NotSpam),
            ("virus", FeedbackType::Virus),
            ("auth-failure", FeedbackType::AuthFailure),
            ("other", FeedbackType::Other),
            ("opt-out", FeedbackType::Unregistered),
        ] {
            let fields = format!("Feedback-Type: {value}\r\nSource-IP: 192.0.2.10\r\n");
            let parsed = parse_report(report(&fields).as_bytes()).unwrap();
            assert_eq!(parsed.feedback_type, expected, "{value}");
            assert!(!parsed.feedback_type.is_complaint(), "{value}");
        }
        assert!(FeedbackType::Abuse.is_complaint() && FeedbackType::Fraud.is_complaint());
    }

    #[test]
    fn malformed_reports_are_refused_naming_what_is_wrong() {
        let wrapped = report_with("multipart/mixed; boundary=arf-1", ABUSE, RETURNED);
        let delivery_status = report_with(
            "multipart/report; report-type=delivery-status; boundary=arf-1",
            ABUSE,
            RETURNED,
        );
        let no_report_type = report_with("multipart/report; boundary=arf-1", ABUSE, RETURNED);
        let no_returned = report_with(
            "multipart/report; report-type=feedback-report; boundary=arf-1",
            ABUSE,
            "",
        );
        let two_parts = report(&format!(
            "{ABUSE}\r\n--arf-1\r\nContent-Type: message/feedback-report\r\n\r\n{ABUSE}"
        ));
        let no_feedback_part = report(ABUSE).replace("message/feedback-report", "text/plain");
        for (message, expected) in [
            ("".to_owned(), ReportError::NotAMessage),
            (
                "Subject: spam\r\n\r\nplease count this\r\n".to_owned(),
                ReportError::NotAReport {
                    found: "absent (text/plain)".into(),
                },
            ),
            (
                wrapped,
                ReportError::NotAReport {
                    found: "\"multipart/mixed\"".into(),
                },
            ),
            (
                delivery_status,
                ReportError::WrongReportType {
                    found: "\"delivery-status\"".into(),
                },
            ),
            (no_report_type, ReportError::WrongReportType { found: "absent".into() }),
            (no_returned, ReportError::NoReturnedMessage),
            (two_parts, ReportError::SeveralFeedbackParts(2)),
            (no_feedback_part, ReportError::NoFeedbackPart),
            (
                report("User-Agent: x\r\nSource-IP: 192.0.2.10\r\n"),
                ReportError::MissingField("Feedback-Type"),
            ),
            (
                report("Feedback-Type: abuse\r\nUser-Agent: x\r\n"),
                ReportError::MissingField("Source-IP"),
            ),
            (
                report("Feedback-Type: abuse\r\nSource-IP: 192.0.2.10\r\nSource-IP: 192.0.2.11\r\n"),
                ReportError::RepeatedField("Source-IP"),
            ),
            (
                report("Feedback-Type: abuse\r\nSource-IP: mta-0.notify.example.org\r\n"),
                ReportError::InvalidSourceIp("\"mta-0.notify.example.org\"".into()),
            ),
        ] {
            let text = String::from_utf8_lossy(message.as_bytes()).into_owned();
            assert_eq!(parse_report(message.as_bytes()), Err(expected), "{text}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let sample = report(ABUSE);
        let bytes = sample.as_bytes();
        for cut in 0..bytes.len() {
            let _ = parse_report(&bytes[..cut]);
        }
        let _ = parse_report(&[0xff, 0xfe, b'\r', b'\n', 0, 0x80]);
    }
}
