//! SMTP replies as the sidecar writes them to Postfix.

use std::borrow::Cow;

use crate::error::{Error, Result};

/// Longest reply text kept, in octets: with the code and enhanced code in front the line stays well inside the
/// 512 octets RFC 5321 allows for a reply line.
const MAX_TEXT_OCTETS: usize = 400;

/// One SMTP reply: a code, an optional enhanced status code (RFC 3463) and one line of ASCII text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    enhanced: Option<(u8, u16, u16)>,
    text: Cow<'static, str>,
}

impl Reply {
    /// A reply for Postfix, typically built from a remote MX's answer. The code must be 2xx, 4xx or 5xx and the
    /// enhanced code, if any, of the same class. The text is made safe to put on the wire: control characters
    /// (CR and LF among them) become spaces and non-ASCII characters '?', so a remote server's text can never
    /// add lines to the LMTP stream; it is cut at 400 octets.
    pub fn new(code: u16, enhanced: Option<(u8, u16, u16)>, text: &str) -> Result<Self> {
        let class = code / 100;
        if !matches!(class, 2 | 4 | 5) || code % 100 > 59 {
            return Err(Error::InvalidReply {
                reason: "the code must be 2xx, 4xx or 5xx",
            });
        }
        if let Some((enhanced_class, subject, detail)) = enhanced
            && (u16::from(enhanced_class) != class || subject > 999 || detail > 999)
        {
            return Err(Error::InvalidReply {
                reason: "the enhanced code must be class.subject.detail of the reply's class",
            });
        }
        let mut text: String = text
            .chars()
            .map(|c| match c {
                ' '..='~' => c,
                c if c.is_control() => ' ',
                _ => '?',
            })
            .collect();
        text.truncate(MAX_TEXT_OCTETS);
        Ok(Self {
            code,
            enhanced,
            text: Cow::Owned(text.trim().to_owned()),
        })
    }

    /// One of the server's own replies; the arguments are literals in this module's callers.
    pub(super) const fn fixed(code: u16, enhanced: (u8, u16, u16), text: &'static str) -> Self {
        Self {
            code,
            enhanced: Some(enhanced),
            text: Cow::Borrowed(text),
        }
    }

    /// The three-digit reply code.
    pub fn code(&self) -> u16 {
        self.code
    }

    pub(super) fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.code.to_string().as_bytes());
        if let Some((class, subject, detail)) = self.enhanced {
            out.extend_from_slice(format!(" {class}.{subject}.{detail}").as_bytes());
        }
        if !self.text.is_empty() {
            out.push(b' ');
            out.extend_from_slice(self.text.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(reply: &Reply) -> String {
        let mut out = Vec::new();
        reply.write_to(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn replies_are_written_with_code_enhanced_code_and_text() {
        let reply = Reply::new(550, Some((5, 1, 1)), "user unknown").unwrap();
        assert_eq!(wire(&reply), "550 5.1.1 user unknown\r\n");
        assert_eq!(wire(&Reply::new(250, None, "").unwrap()), "250\r\n");
        assert_eq!(reply.code(), 550);
    }

    #[test]
    fn remote_text_cannot_inject_lines_or_non_ascii() {
        let reply = Reply::new(
            451,
            Some((4, 7, 0)),
            "try later\r\n250 2.0.0 fake\rdelivered\n\u{e9}t\u{e9}",
        )
        .unwrap();
        assert_eq!(wire(&reply), "451 4.7.0 try later  250 2.0.0 fake delivered ?t?\r\n");
        let long = Reply::new(550, None, &"x".repeat(2000)).unwrap();
        assert_eq!(wire(&long).len(), "550 ".len() + MAX_TEXT_OCTETS + 2);
    }

    #[test]
    fn codes_outside_2xx_4xx_5xx_and_mismatched_enhanced_codes_are_refused() {
        for (code, enhanced) in [
            (354, None),
            (199, None),
            (600, None),
            (0, None),
            (260, None),
            (250, Some((5, 0, 0))),
            (450, Some((4, 1000, 0))),
            (550, Some((5, 1, 1000))),
        ] {
            assert!(Reply::new(code, enhanced, "x").is_err(), "{code} {enhanced:?}");
        }
        for (code, enhanced) in [(250, Some((2, 0, 0))), (421, Some((4, 7, 28))), (554, None)] {
            assert!(Reply::new(code, enhanced, "x").is_ok(), "{code} {enhanced:?}");
        }
    }
}
