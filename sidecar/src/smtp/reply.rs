//! Parsing SMTP replies as a client reads them (RFC 5321 section 4.2, enhanced codes RFC 3463 / RFC 2034).
//!
//! Lenient where servers commonly deviate (a line may end in a bare LF, lines may run to [`MAX_LINE_OCTETS`]
//! although RFC 5321 says 512, text may be non-UTF-8), strict where confusion would be dangerous: every line must
//! start with the same three-digit code, and a reply is bounded in lines and octets. No input panics (fuzzed:
//! sidecar/fuzz/fuzz_targets/smtp_reply.rs).

use std::fmt;

/// Longest reply line accepted, terminator included.
pub const MAX_LINE_OCTETS: usize = 2048;
/// Most lines in one reply (EHLO answers have one per extension).
pub const MAX_LINES: usize = 100;

/// One complete reply.
#[derive(Clone, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    enhanced: Option<(u8, u16, u16)>,
    /// The text of each line after the code and separator, terminator removed; the enhanced code stays in.
    lines: Vec<String>,
}

/// Why bytes from the server are not a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line longer than {MAX_LINE_OCTETS} octets")]
    LineTooLong,
    #[error("reply with more than {MAX_LINES} lines")]
    TooManyLines,
    #[error("reply line does not start with a three-digit reply code (RFC 5321 section 4.2)")]
    BadCode,
    #[error("reply line has neither ' ' nor '-' after its code")]
    BadSeparator,
    #[error("continuation lines of one reply carry different codes")]
    MixedCodes,
}

impl Reply {
    pub fn code(&self) -> u16 {
        self.code
    }

    /// 2, 3, 4 or 5.
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    pub fn is_positive(&self) -> bool {
        matches!(self.class(), 2 | 3)
    }

    /// The enhanced status code of the first line when its class matches the reply code's.
    pub fn enhanced(&self) -> Option<(u8, u16, u16)> {
        self.enhanced
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// All text with the enhanced code of the first line removed, lines joined with '\n'. Remote text: may contain
    /// recipient addresses; redact before it goes anywhere but the wire.
    pub fn text(&self) -> String {
        let mut lines = self.lines.iter();
        let first = lines.next().map(String::as_str).unwrap_or_default();
        let first = match self.enhanced {
            Some(_) => first.split_once(' ').map_or("", |(_, rest)| rest),
            None => first,
        };
        std::iter::once(first)
            .chain(lines.map(String::as_str))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Debug for Reply {
    /// Code only: the text may name recipients.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced {
            Some((class, subject, detail)) => write!(f, "Reply({} {class}.{subject}.{detail})", self.code),
            None => write!(f, "Reply({})", self.code),
        }
    }
}

/// Parses the first reply in `input`. `Ok(None)`: incomplete so far, read more; `Ok(Some((reply, used)))`: the
/// reply and how many octets of `input` it took.
pub fn parse(input: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut code = None;
    let mut lines = Vec::new();
    let mut offset = 0;
    loop {
        let rest = &input[offset..];
        let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
            return if rest.len() >= MAX_LINE_OCTETS {
                Err(ReplyError::LineTooLong)
            } else {
                Ok(None)
            };
        };
        if newline + 1 > MAX_LINE_OCTETS {
            return Err(ReplyError::LineTooLong);
        }
        let line = &rest[..newline];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        offset += newline + 1;
        let (line_code, last, text) = parse_line(line)?;
        if *code.get_or_insert(line_code) != line_code {
            return Err(ReplyError::MixedCodes);
        }
        if lines.len() == MAX_LINES {
            return Err(ReplyError::TooManyLines);
        }
        lines.push(String::from_utf8_lossy(text).into_owned());
        if last {
            let code = line_code;
            let enhanced = lines.first().and_then(|first| enhanced_code(first, code));
            return Ok(Some((Reply { code, enhanced, lines }, offset)));
        }
    }
}

/// Code, whether this is the last line, and the text.
fn parse_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    let digits = line.get(..3).ok_or(ReplyError::BadCode)?;
    let valid = matches!(digits[0], b'1'..=b'5') && matches!(digits[1], b'0'..=b'5') && digits[2].is_ascii_digit();
    if !valid {
        return Err(ReplyError::BadCode);
    }
    let code = digits.iter().fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'));
    match line.get(3) {
        None => Ok((code, true, &[])),
        Some(b' ') => Ok((code, true, &line[4..])),
        Some(b'-') => Ok((code, false, &line[4..])),
        Some(_) => Err(ReplyError::BadSeparator),
    }
}

/// `class.subject.detail` at the start of `text` (RFC 3463: subject and detail 1 to 3 digits) when the class
/// matches the reply code's.
fn enhanced_code(text: &str, code: u16) -> Option<(u8, u16, u16)> {
    let word = text.split(' ').next()?;
    let mut parts = word.split('.');
    let number = |part: Option<&str>| {
        part.filter(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
    };
    let class = number(parts.next())?;
    let subject = number(parts.next())?;
    let detail = number(parts.next())?;
    if parts.next().is_some() || class != code / 100 || !matches!(class, 2 | 4 | 5) {
        return None;
    }
    Some((u8::try_from(class).ok()?, subject, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &str) -> Reply {
        let (reply, used) = parse(input.as_bytes()).unwrap().unwrap();
        assert_eq!(used, input.len(), "{input:?}");
        reply
    }

    #[test]
    fn single_and_multi_line_replies_with_enhanced_codes() {
        let reply = one("250 2.1.0 Ok\r\n");
        assert_eq!((reply.code(), reply.enhanced()), (250, Some((2, 1, 0))));
        assert_eq!(reply.text(), "Ok");

        let ehlo = one("250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 STARTTLS\r\n");
        assert_eq!(ehlo.lines(), ["mx.example.net", "PIPELINING", "SIZE 1000", "STARTTLS"]);
        assert_eq!(ehlo.enhanced(), None);

        let bare = one("354\n");
        assert_eq!((bare.code(), bare.text()), (354, String::new()));

        let mismatched = one("451 5.7.1 odd\r\n");
        assert_eq!(
            (mismatched.enhanced(), mismatched.text()),
            (None, "5.7.1 odd".to_owned())
        );

        let long = one("550-5.1.1 <a@example.net> no\r\n550 5.1.1 such user\r\n");
        assert_eq!(long.text(), "<a@example.net> no\n5.1.1 such user");
        assert_eq!(format!("{long:?}"), "Reply(550 5.1.1)");
    }

    #[test]
    fn incomplete_input_asks_for_more_and_extra_input_is_left() {
        assert_eq!(parse(b"").unwrap(), None);
        assert_eq!(parse(b"250-first\r\n250 sec").unwrap(), None);
        let (reply, used) = parse(b"220 ready\r\n250 injected\r\n").unwrap().unwrap();
        assert_eq!((reply.code(), used), (220, 11));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        for (input, error) in [
            (&b"hello\r\n"[..], ReplyError::BadCode),
            (b"25\r\n", ReplyError::BadCode),
            (b"650 x\r\n", ReplyError::BadCode),
            (b"2a0 x\r\n", ReplyError::BadCode),
            (b"250x\r\n", ReplyError::BadSeparator),
            (b"250-a\r\n251 b\r\n", ReplyError::MixedCodes),
        ] {
            assert_eq!(parse(input), Err(error), "{}", String::from_utf8_lossy(input));
        }
        assert_eq!(parse(&[b'2'; MAX_LINE_OCTETS]), Err(ReplyError::LineTooLong));
        let long_line = format!("250 {}\r\n", "x".repeat(MAX_LINE_OCTETS));
        assert_eq!(parse(long_line.as_bytes()), Err(ReplyError::LineTooLong));
        let tolerated = format!("250 {}\r\n", "x".repeat(1000));
        assert!(parse(tolerated.as_bytes()).unwrap().is_some());
        let many = "250-x\r\n".repeat(MAX_LINES + 1);
        assert_eq!(parse(many.as_bytes()), Err(ReplyError::TooManyLines));
    }

    proptest::proptest! {
        #[test]
        fn any_input_parses_or_errors_without_panicking(input in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            if let Ok(Some((reply, used))) = parse(&input) {
                proptest::prop_assert!(used <= input.len());
                proptest::prop_assert!((100..600).contains(&reply.code()));
            }
        }
    }
}
