//! Remote 4xx/5xx replies classified by reason. The first matching rule of [`RULES`] decides; each rule says
//! which provider's reply it covers. Words are matched whole, case-insensitively, over all lines of the reply.

use std::ops::RangeInclusive;

use super::Reason;
use crate::smtp::reply::Reply;

enum Test {
    /// A provider's bracketed code, e.g. `[TSS04]`.
    Tag(&'static str),
    /// Enhanced code `x.subject.detail` of either class.
    Code { subject: u16, detail: RangeInclusive<u16> },
    /// Enhanced code and a phrase, where the code alone means something else elsewhere.
    CodeWith {
        subject: u16,
        detail: u16,
        phrase: &'static str,
    },
    /// A phrase, any 4xx/5xx.
    Phrase(&'static str),
    /// A phrase in a temporary 4.7.x reply (security or policy status, RFC 3463).
    Temporary7(&'static str),
}

struct Rule {
    test: Test,
    reason: Reason,
}

const fn rule(test: Test, reason: Reason) -> Rule {
    Rule { test, reason }
}

const fn code(subject: u16, detail: RangeInclusive<u16>) -> Test {
    Test::Code { subject, detail }
}

use Reason::{Authentication, Policy, RateLimited, ReputationBlock};
use Test::{CodeWith, Phrase, Tag, Temporary7};

/// In order of precedence: provider codes, then enhanced codes, then words.
const RULES: [Rule; 36] = [
    // Yahoo, postmaster.yahooinc.com/error-codes: "421 4.7.0 [TSS04] Messages from <ip> temporarily deferred due
    // to unexpected volume or user complaints"; "[TSS09] All messages from <ip> will be permanently deferred".
    rule(Tag("tss04"), RateLimited),
    rule(Tag("tss09"), ReputationBlock),
    // Apple, support.apple.com/HT204137: "[CS01] Message rejected due to local policy"; "[HM08]" is a refusal
    // of the sending address.
    rule(Tag("cs01"), Policy),
    rule(Tag("hm08"), ReputationBlock),
    // Gmail, support.google.com/a/answer/3726730: "421-4.7.28 ... unusual rate of unsolicited mail ...
    // temporarily rate limited"; "452-4.2.1 ... receiving mail at a rate that prevents additional messages"
    // (4.2.1 alone is RFC 3463's "mailbox disabled").
    rule(code(7, 28..=28), RateLimited),
    rule(
        CodeWith {
            subject: 2,
            detail: 1,
            phrase: "rate",
        },
        RateLimited,
    ),
    // RFC 7372: x.7.20-24 DKIM and SPF failures, x.7.25 reverse DNS (Gmail "550-5.7.25 ... does not have a PTR
    // record"), x.7.26 several checks failed (Gmail "550-5.7.26 This mail is unauthenticated", DMARC); Gmail
    // uses x.7.27 for SPF failures (RFC 7505's null MX otherwise, also about the sender's domain).
    rule(code(7, 20..=27), Authentication),
    // Microsoft, learn.microsoft.com "Email non-delivery reports in Exchange Online": "550 5.7.515 Access
    // denied, sending domain ... doesn't meet the required authentication level"; "451 4.7.650 The mail server
    // [<ip>] has been temporarily rate limited due to IP reputation"; "451 4.7.500 Server busy. Please try again
    // later"; "550 5.7.606-649 Access denied, banned sending IP"; "550 5.7.511 Access denied, banned sender".
    rule(code(7, 515..=515), Authentication),
    rule(code(7, 650..=650), RateLimited),
    rule(code(7, 500..=500), RateLimited),
    rule(code(7, 606..=649), ReputationBlock),
    rule(code(7, 511..=511), ReputationBlock),
    // Yahoo: "554 5.7.9 Message not accepted for policy reasons" (RFC 4954's x.7.9 is a weak AUTH mechanism).
    rule(
        CodeWith {
            subject: 7,
            detail: 9,
            phrase: "policy reasons",
        },
        Policy,
    ),
    // DNS blocklists: Postfix-style receivers "Client host [<ip>] blocked using zen.spamhaus.org"; Microsoft
    // "part of their network is on our block list (S3150)"; others "listed in", "RBL", "blacklisted".
    rule(Phrase("blocked using"), ReputationBlock),
    rule(Phrase("spamhaus"), ReputationBlock),
    rule(Phrase("block list"), ReputationBlock),
    rule(Phrase("blocklist"), ReputationBlock),
    rule(Phrase("blocklisted"), ReputationBlock),
    rule(Phrase("blacklist"), ReputationBlock),
    rule(Phrase("blacklisted"), ReputationBlock),
    rule(Phrase("rbl"), ReputationBlock),
    rule(Phrase("listed"), ReputationBlock),
    // Generic throttling in a temporary 4.7.x: Gmail's older "421-4.7.0 ... unusual rate of unsolicited mail",
    // "421 4.7.0 Too many connections", "slow down". Before the reputation words, which such texts also carry.
    rule(Temporary7("rate"), RateLimited),
    rule(Temporary7("ratelimited"), RateLimited),
    rule(Temporary7("too many"), RateLimited),
    rule(Temporary7("throttled"), RateLimited),
    rule(Temporary7("throttling"), RateLimited),
    rule(Temporary7("slow down"), RateLimited),
    // Gmail "550-5.7.1 ... likely unsolicited mail"; "421-4.7.0 ... very low reputation of the sending IP".
    rule(Phrase("unsolicited"), ReputationBlock),
    rule(Phrase("reputation"), ReputationBlock),
    // Receivers that name the failed check without an RFC 7372 code.
    rule(Phrase("dmarc"), Authentication),
    rule(Phrase("spf"), Authentication),
    rule(Phrase("dkim"), Authentication),
    rule(Phrase("unauthenticated"), Authentication),
    rule(Phrase("reverse dns"), Authentication),
    // "Message rejected due to local policy", "policy violation".
    rule(Phrase("policy"), Policy),
];

/// The reason of a 4xx or 5xx reply; `None` for any other (a 2xx is a delivery, not a sensor reading).
pub fn classify(reply: &Reply) -> Option<Reason> {
    let class = reply.class();
    if !matches!(class, 4 | 5) {
        return None;
    }
    let words = words(reply);
    let has = |phrase: &str| words.contains(&format!(" {phrase} "));
    let enhanced = reply.enhanced();
    let matches = |test: &Test| match test {
        Test::Tag(tag) | Test::Phrase(tag) => has(tag),
        Test::Code { subject, detail } => enhanced.is_some_and(|(_, s, d)| s == *subject && detail.contains(&d)),
        Test::CodeWith {
            subject,
            detail,
            phrase,
        } => enhanced == Some((u8::try_from(class).unwrap_or(0), *subject, *detail)) && has(phrase),
        Test::Temporary7(phrase) => class == 4 && enhanced.is_some_and(|(_, s, _)| s == 7) && has(phrase),
    };
    Some(
        RULES
            .iter()
            .find(|rule| matches(&rule.test))
            .map_or(Reason::Unknown, |rule| rule.reason),
    )
}

/// All lines' words, lower-cased, each surrounded by single spaces so whole words and phrases match.
fn words(reply: &Reply) -> String {
    let mut out = String::from(" ");
    for word in reply
        .lines()
        .iter()
        .flat_map(|line| line.split(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|word| !word.is_empty())
    {
        out.push_str(&word.to_ascii_lowercase());
        out.push(' ');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::parse;

    fn reason(wire: &str) -> Option<Reason> {
        let (reply, used) = parse(wire.as_bytes()).unwrap().unwrap();
        assert_eq!(used, wire.len(), "{wire:?} is not one reply");
        classify(&reply)
    }

    #[test]
    fn gmail_replies() {
        let rate_limited = "421-4.7.28 [192.0.2.10      15] Our system has detected an unusual rate of\r\n\
            421-4.7.28 unsolicited mail originating from your IP address. To protect our\r\n\
            421-4.7.28 users from spam, mail sent from your IP address has been temporarily\r\n\
            421-4.7.28 rate limited. Please visit\r\n\
            421-4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to\r\n\
            421 4.7.28 review our Bulk Email Senders Guidelines. d2e1a72fcca58-7a1si123.456 - gsmtp\r\n";
        assert_eq!(reason(rate_limited), Some(RateLimited));

        let unsolicited = "550-5.7.1 [192.0.2.10      12] Our system has detected that this message is\r\n\
            550-5.7.1 likely unsolicited mail. To reduce the amount of spam sent to Gmail,\r\n\
            550-5.7.1 this message has been blocked. Please visit\r\n\
            550-5.7.1  https://support.google.com/mail/?p=UnsolicitedMessageError\r\n\
            550 5.7.1  for more information. d2e1a72fcca58-7a1si123.456 - gsmtp\r\n";
        assert_eq!(reason(unsolicited), Some(ReputationBlock));

        let dmarc = "550-5.7.26 This mail is unauthenticated, which poses a security risk to the\r\n\
            550-5.7.26 sender and Gmail users, and has been blocked. The sender must\r\n\
            550-5.7.26 authenticate with at least one of SPF or DKIM. For this message,\r\n\
            550-5.7.26 DKIM checks did not pass and SPF check for [example.org] did not\r\n\
            550-5.7.26 pass with ip: [192.0.2.10]. To best protect our users from spam, the\r\n\
            550-5.7.26 message has been blocked. Please visit\r\n\
            550-5.7.26  https://support.google.com/mail/answer/81126#authentication for more\r\n\
            550 5.7.26 information. d2e1a72fcca58-7a1si123.456 - gsmtp\r\n";
        assert_eq!(reason(dmarc), Some(Authentication));

        let spf = "550-5.7.27 This mail has been blocked because the sender is unauthenticated.\r\n\
            550-5.7.27 Gmail requires all senders to authenticate with either SPF or DKIM.\r\n\
            550-5.7.27\r\n\
            550-5.7.27  Authentication results:\r\n\
            550-5.7.27  SPF [example.org] with ip: [192.0.2.10] = did not pass\r\n\
            550 5.7.27  https://support.google.com/mail/answer/81126#authentication - gsmtp\r\n";
        assert_eq!(reason(spf), Some(Authentication));

        let ptr = "550-5.7.25 [192.0.2.10] The IP address sending this message does not have a\r\n\
            550-5.7.25 PTR record setup, or the corresponding forward DNS entry does not\r\n\
            550-5.7.25 point to the sending IP. As a policy, Gmail does not accept messages\r\n\
            550-5.7.25 from IPs with missing PTR records. Please visit\r\n\
            550-5.7.25  https://support.google.com/mail/answer/81126#ip-practices for more\r\n\
            550 5.7.25 information. d2e1a72fcca58-7a1si123.456 - gsmtp\r\n";
        assert_eq!(reason(ptr), Some(Authentication));

        let receiving_rate = "452-4.2.1 The user you are trying to contact is receiving mail at a rate that\r\n\
            452-4.2.1 prevents additional messages from being delivered. Please resend your\r\n\
            452-4.2.1 message at a later time. If the user is able to receive mail at that\r\n\
            452-4.2.1 time, your message will be delivered. For more information, please\r\n\
            452-4.2.1 visit\r\n\
            452 4.2.1  https://support.google.com/mail/?p=ReceivingRate d2e1a72fcca58-7a1si123.456 - gsmtp\r\n";
        assert_eq!(reason(receiving_rate), Some(RateLimited));

        let low_reputation = "421-4.7.0 This message is suspicious due to the very low reputation of the\r\n\
            421-4.7.0 sending domain. To best protect our users from spam, the message has\r\n\
            421-4.7.0 been blocked. Please visit\r\n\
            421 4.7.0  https://support.google.com/mail/answer/188131 for more information. - gsmtp\r\n";
        assert_eq!(reason(low_reputation), Some(ReputationBlock));
    }

    #[test]
    fn microsoft_replies() {
        assert_eq!(
            reason(
                "550 5.7.515 Access denied, sending domain [EXAMPLE.ORG] doesn't meet the required authentication \
                 level. The sender's domain in the 5322.From address doesn't meet the authentication requirements \
                 defined for the sender. To learn more, go to https://go.microsoft.com/fwlink/?linkid=2293221\r\n"
            ),
            Some(Authentication)
        );
        assert_eq!(
            reason(
                "451 4.7.650 The mail server [192.0.2.10] has been temporarily rate limited due to IP reputation. \
                 For e-mail delivery information, see https://postmaster.live.com (S775) [Name=Protocol Filter \
                 Agent][AGT=PFA][MxId=11BA7D0C2B1C44D1] [DM6NAM12FT045.eop-nam12.prod.protection.outlook.com]\r\n"
            ),
            Some(RateLimited)
        );
        assert_eq!(
            reason(
                "550 5.7.606 Access denied, banned sending IP [192.0.2.10]. To request removal from this list \
                 please visit https://sender.office.com/ and follow the directions. For more information please go \
                 to  http://go.microsoft.com/fwlink/?LinkID=526655 AS(1430)\r\n"
            ),
            Some(ReputationBlock)
        );
        assert_eq!(
            reason(
                "550 5.7.1 Unfortunately, messages from [192.0.2.10] weren't sent. Please contact your Internet \
                 service provider since part of their network is on our block list (S3150). You can also refer \
                 your provider to http://mail.live.com/mail/troubleshooting.aspx#errors. \
                 [AM4PEPF00027A5F.eurprd04.prod.outlook.com 2026-01-01T00:00:00.000Z 08DE2C1B5A7F3D21]\r\n"
            ),
            Some(ReputationBlock)
        );
        assert_eq!(
            reason(
                "451 4.7.500 Server busy. Please try again later from [192.0.2.10]. (S77719) [BN8NAM12FT022.eop-nam12.prod.protection.outlook.com]\r\n"
            ),
            Some(RateLimited)
        );
    }

    #[test]
    fn yahoo_and_apple_replies() {
        assert_eq!(
            reason(
                "421 4.7.0 [TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user \
                 complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes\r\n"
            ),
            Some(RateLimited)
        );
        assert_eq!(
            reason(
                "421 4.7.0 [TSS09] All messages from 192.0.2.10 will be permanently deferred; Retrying will NOT \
                 succeed. See https://postmaster.yahooinc.com/error-codes\r\n"
            ),
            Some(ReputationBlock)
        );
        assert_eq!(
            reason(
                "554 5.7.9 Message not accepted for policy reasons.  See https://postmaster.yahooinc.com/error-codes\r\n"
            ),
            Some(Policy)
        );
        assert_eq!(
            reason(
                "550 5.7.1 [CS01] Message rejected due to local policy. Please visit \
                 https://support.apple.com/en-us/HT204137\r\n"
            ),
            Some(Policy)
        );
        assert_eq!(
            reason(
                "550 5.7.1 [HM08] Message rejected due to local policy. Please visit \
                 https://support.apple.com/en-us/HT204137\r\n"
            ),
            Some(ReputationBlock)
        );
    }

    #[test]
    fn blocklists_generic_throttling_and_the_rest() {
        assert_eq!(
            reason(
                "554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using zen.spamhaus.org; \
                 https://www.spamhaus.org/query/ip/192.0.2.10\r\n"
            ),
            Some(ReputationBlock)
        );
        assert_eq!(
            reason("550 Your IP 192.0.2.10 is listed in bl.example-rbl.net\r\n"),
            Some(ReputationBlock)
        );
        assert_eq!(
            reason("421 4.7.0 mx.example.net Error: too many connections from 192.0.2.10\r\n"),
            Some(RateLimited)
        );
        assert_eq!(
            reason("450 4.7.1 Rate limit exceeded for 192.0.2.10, slow down\r\n"),
            Some(RateLimited)
        );
        // Outside 4.7.x the same words are not the sender's rate: Postfix's own per-transaction limit.
        assert_eq!(
            reason("452 4.5.3 Error: too many recipients\r\n"),
            Some(Reason::Unknown)
        );
        assert_eq!(
            reason(
                "450 4.2.0 <a@example.net>: Recipient address rejected: Greylisted, see \
                 http://postgrey.schweikert.ch/help/example.net.html\r\n"
            ),
            Some(Reason::Unknown)
        );
        assert_eq!(
            reason(
                "550 5.1.1 <gone@example.net>: Recipient address rejected: User unknown in virtual mailbox table\r\n"
            ),
            Some(Reason::Unknown)
        );
        assert_eq!(
            reason("554 5.7.1 Rejected by DMARC policy for example.org\r\n"),
            Some(Authentication)
        );
        // "unlisted" is not "listed": words match whole.
        assert_eq!(reason("550 5.1.1 unlisted mailbox\r\n"), Some(Reason::Unknown));
        assert_eq!(reason("250 2.0.0 OK 1767225600 a1si123 - gsmtp\r\n"), None);
        assert_eq!(reason("354 go ahead\r\n"), None);
    }
}
