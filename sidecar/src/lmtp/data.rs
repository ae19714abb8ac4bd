//! The message content after DATA: dot-unstuffing, the end-of-data marker, and the checks that make the sidecar
//! refuse a message rather than pass on something a later hop could read differently (SMTP smuggling).
//!
//! Only CRLF ends a line. The end-of-data marker is exactly CRLF "." CRLF (the CRLF of the DATA command counts as
//! the first). A bare LF or a bare CR anywhere refuses the message with 550 5.6.0: normalising would change what
//! the sender signed and meant, and passing either on lets a receiver that treats it as a line end see a different
//! end of data than we did. Mail from the operator-configured Postfix never carries either (its smtpd reads a
//! bare LF as CRLF and turns a bare CR into a space: see tests/lmtp_postfix.rs), so the refusal is a second line
//! of defence against other clients and configuration drift.
//! A line over 998 octets (RFC 5321 section 4.5.3.1.6; Postfix folds longer lines before LMTP) refuses the message
//! with 550 5.6.0 too: the next hop may cut or refuse it. After a refusal the rest of the content is read and
//! dropped, so the client gets its per-recipient replies on a stream still in step.

use super::reply::Reply;

/// Longest text line without its CRLF.
const MAX_LINE_OCTETS: usize = 998;
/// Most octets reserved up front on the strength of the client's `SIZE=`.
const MAX_SIZE_HINT: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    TooBig,
    BareCr,
    BareLf,
    LineTooLong,
}

impl Refusal {
    pub(super) fn reply(self) -> Reply {
        match self {
            Self::TooBig => Reply::fixed(552, (5, 3, 4), "message size exceeds fixed maximum message size"),
            Self::BareCr => Reply::fixed(
                550,
                (5, 6, 0),
                "message refused: bare CR in content; lines must end in CRLF",
            ),
            Self::BareLf => Reply::fixed(
                550,
                (5, 6, 0),
                "message refused: bare LF in content; lines must end in CRLF",
            ),
            Self::LineTooLong => Reply::fixed(550, (5, 6, 0), "message refused: a line is longer than 998 octets"),
        }
    }
}

#[derive(Clone, Copy)]
enum State {
    LineStart,
    /// A '.' at the start of a line.
    Dot,
    /// ".\r" at the start of a line: the end marker if LF follows.
    DotCr,
    InLine,
    /// A CR inside a line: a line end if LF follows.
    Cr,
}

/// Decodes content fed in pieces of any size.
pub(super) struct DataDecoder {
    state: State,
    line_len: usize,
    message: Vec<u8>,
    max_bytes: usize,
    refusal: Option<Refusal>,
}

impl DataDecoder {
    #[cfg(test)]
    pub(super) fn new(max_bytes: usize) -> Self {
        Self::with_size_hint(max_bytes, 0)
    }

    /// Like [`Self::new`], with room for `expected` octets (the client's `SIZE=`) made at once rather than by
    /// growing the buffer line by line. The claim is only trusted up to [`MAX_SIZE_HINT`]: larger messages grow
    /// as they arrive, so a client cannot make the server reserve memory it never sends.
    pub(super) fn with_size_hint(max_bytes: usize, expected: usize) -> Self {
        Self {
            state: State::LineStart,
            line_len: 0,
            message: Vec::with_capacity(expected.min(max_bytes).min(MAX_SIZE_HINT)),
            max_bytes,
            refusal: None,
        }
    }

    /// Consumes `input` up to the end-of-data marker. `Some(n)`: the marker ends after `n` octets, the rest is
    /// not content. `None`: all of `input` was content.
    pub(super) fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        // Every arm either consumes an octet or moves to InLine, which always consumes one.
        while let Some(&byte) = input.get(i) {
            match self.state {
                State::LineStart if byte == b'.' => {
                    self.state = State::Dot;
                    i += 1;
                }
                State::Dot if byte == b'\r' => {
                    self.state = State::DotCr;
                    i += 1;
                }
                State::DotCr if byte == b'\n' => return Some(i + 1),
                State::Cr if byte == b'\n' => {
                    self.append(b"\r\n");
                    self.line_len = 0;
                    self.state = State::LineStart;
                    i += 1;
                }
                // The first dot of a line is stuffing (RFC 5321 section 4.5.2): dropped.
                State::LineStart | State::Dot => self.state = State::InLine,
                State::DotCr | State::Cr => {
                    self.refuse(Refusal::BareCr);
                    self.state = State::InLine;
                }
                State::InLine => {
                    let text_len = input[i..]
                        .iter()
                        .position(|&b| b == b'\r' || b == b'\n')
                        .unwrap_or(input.len() - i);
                    self.line_len += text_len;
                    if self.line_len > MAX_LINE_OCTETS {
                        self.refuse(Refusal::LineTooLong);
                    }
                    self.append(&input[i..i + text_len]);
                    i += text_len;
                    match input.get(i) {
                        Some(b'\r') => self.state = State::Cr,
                        Some(_) => self.refuse(Refusal::BareLf),
                        None => {}
                    }
                    i += 1;
                }
            }
        }
        None
    }

    /// The unstuffed message with CRLF line ends, or why it is refused.
    pub(super) fn finish(self) -> Result<Vec<u8>, Refusal> {
        match self.refusal {
            Some(refusal) => Err(refusal),
            None => Ok(self.message),
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.refusal.is_some() {
            return;
        }
        if self.message.len() + bytes.len() > self.max_bytes {
            self.refuse(Refusal::TooBig);
        } else {
            self.message.extend_from_slice(bytes);
        }
    }

    /// The first reason sticks; the content read so far is released, since it will not be delivered.
    fn refuse(&mut self, refusal: Refusal) {
        if self.refusal.is_none() {
            self.refusal = Some(refusal);
            self.message = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Feeds `input` whole and returns (decoded message or refusal, octets consumed).
    fn decode(input: &[u8], max_bytes: usize) -> (Result<Vec<u8>, Refusal>, Option<usize>) {
        let mut decoder = DataDecoder::new(max_bytes);
        let consumed = decoder.feed(input);
        (decoder.finish(), consumed)
    }

    #[test]
    fn dots_are_unstuffed_and_only_crlf_dot_crlf_ends_the_data() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.x\r\n. \r\n.\r\nNEXT";
        let (message, consumed) = decode(input, 1000);
        assert_eq!(message.unwrap(), b"Subject: x\r\n\r\n.leading dot\r\nx\r\n \r\n");
        assert_eq!(consumed, Some(input.len() - b"NEXT".len()));

        let (message, consumed) = decode(b".\r\n", 1000);
        assert_eq!((message.unwrap(), consumed), (Vec::new(), Some(3)));
    }

    #[test]
    fn bare_line_ends_never_end_the_data_and_refuse_the_message() {
        for (input, refusal) in [
            (&b"a\n.\nMAIL FROM:<x@y.example>\r\n.\r\n"[..], Refusal::BareLf),
            (b"a\r\n.\n\r\n.\r\n", Refusal::BareLf),
            (b"\n.\r\n.\r\n", Refusal::BareLf),
            (b"a\r.\r\r\n.\r\n", Refusal::BareCr),
            (b"a\r\n.\rX\r\n.\r\n", Refusal::BareCr),
            (b"a\r\r\n.\r\n", Refusal::BareCr),
            (b"\r.\r\n.\r\n", Refusal::BareCr),
        ] {
            let (message, consumed) = decode(input, 1000);
            assert_eq!(message, Err(refusal), "{}", input.escape_ascii());
            assert_eq!(consumed, Some(input.len()), "{}", input.escape_ascii());
        }
    }

    #[test]
    fn long_lines_and_large_messages_are_refused_after_the_end_marker() {
        let line_998 = [b"x".repeat(998), b"\r\n.\r\n".to_vec()].concat();
        assert!(decode(&line_998, 2000).0.is_ok());
        let stuffed_998 = [b".".to_vec(), b"x".repeat(998), b"\r\n.\r\n".to_vec()].concat();
        assert!(decode(&stuffed_998, 2000).0.is_ok());
        let line_999 = [b"x".repeat(999), b"\r\n.\r\n".to_vec()].concat();
        assert_eq!(
            decode(&line_999, 2000),
            (Err(Refusal::LineTooLong), Some(line_999.len()))
        );

        let exactly = b"0123456789\r\n.\r\n";
        assert_eq!(decode(exactly, 12).0.unwrap(), b"0123456789\r\n");
        assert_eq!(decode(exactly, 11), (Err(Refusal::TooBig), Some(exactly.len())));
    }

    #[test]
    fn a_size_hint_reserves_at_most_the_cap_and_changes_no_result() {
        let input = b"Subject: x\r\n\r\n..dot\r\n.\r\n";
        for hint in [0, 5, 10_000, usize::MAX] {
            let mut decoder = DataDecoder::with_size_hint(1000, hint);
            assert!(decoder.message.capacity() <= 1000);
            assert_eq!(decoder.feed(input), Some(input.len()));
            assert_eq!(decoder.finish().unwrap(), b"Subject: x\r\n\r\n.dot\r\n");
        }
        let decoder = DataDecoder::with_size_hint(usize::MAX, usize::MAX);
        assert!(decoder.message.capacity() <= MAX_SIZE_HINT);
    }

    #[test]
    fn an_unfinished_message_consumes_everything() {
        assert_eq!(decode(b"a\r\n.", 100).1, None);
        assert_eq!(decode(b"a\r\n.\r", 100).1, None);
    }

    proptest! {
        /// Content arriving in pieces decodes exactly as content arriving at once.
        #[test]
        fn splitting_the_input_changes_nothing(
            input in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'.'), any::<u8>()], 0..300),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            max_bytes in 0usize..300,
        ) {
            let whole = decode(&input, max_bytes);
            let mut offsets: Vec<usize> = cuts.iter().map(|cut| cut.index(input.len() + 1)).collect();
            offsets.push(0);
            offsets.push(input.len());
            offsets.sort_unstable();
            let mut decoder = DataDecoder::new(max_bytes);
            let mut consumed = None;
            for piece in offsets.windows(2) {
                if let Some(n) = decoder.feed(&input[piece[0]..piece[1]]) {
                    consumed = Some(piece[0] + n);
                    break;
                }
            }
            prop_assert_eq!((decoder.finish(), consumed), whole);
        }
    }
}
