//! Splits CRLF mail into header fields and body the way DKIM verifiers do, for mail-auth's canonicaliser (whose
//! own splitter is crate-private) and for finding From:. Malformed input is refused, never re-interpreted:
//! a signature over bytes a receiver splits differently would fail there.

use mail_auth::common::headers::HeaderStream;

use super::SignError;

/// A parsed message: borrowed slices of the input, which is never modified.
pub(super) struct Message<'x> {
    /// Name and value of each field in order; the value runs from after the colon up to and including the CRLF
    /// that ends the field, folds included.
    pub(super) fields: Vec<(&'x [u8], &'x [u8])>,
    body: &'x [u8],
}

impl<'x> Message<'x> {
    pub(super) fn parse(message: &'x [u8]) -> Result<Self, SignError> {
        if has_bare_line_ending(message) {
            return Err(SignError::BareLineEnding);
        }
        let mut fields = Vec::new();
        let mut rest = message;
        loop {
            if let Some(body) = rest.strip_prefix(b"\r\n") {
                return Ok(Self { fields, body });
            }
            if rest.is_empty() {
                return Ok(Self { fields, body: rest });
            }
            let (field, after) = rest.split_at(field_end(rest));
            let colon = field.iter().position(|&byte| byte == b':');
            let (name, value) = match colon {
                // RFC 5322 §3.6.8: a field name is one or more printable ASCII characters other than the colon.
                Some(colon) if colon > 0 => (&field[..colon], &field[colon + 1..]),
                _ => return Err(SignError::MalformedHeader),
            };
            if !name.iter().all(|byte| (0x21..=0x7e).contains(byte)) {
                return Err(SignError::MalformedHeader);
            }
            fields.push((name, value));
            rest = after;
        }
    }

    /// The fields and body in the form mail-auth canonicalises.
    pub(super) fn stream(&self) -> impl HeaderStream<'x> + '_ {
        Stream {
            fields: self.fields.iter(),
            body: self.body,
        }
    }
}

struct Stream<'a, 'x> {
    fields: std::slice::Iter<'a, (&'x [u8], &'x [u8])>,
    body: &'x [u8],
}

impl<'x> HeaderStream<'x> for Stream<'_, 'x> {
    fn next_header(&mut self) -> Option<(&'x [u8], &'x [u8])> {
        self.fields.next().copied()
    }

    fn body(&mut self) -> &'x [u8] {
        self.body
    }
}

/// Length of the field at the start of `rest`: up to and including the first CRLF not followed by folding
/// whitespace, or all of `rest` when the header section is not terminated.
fn field_end(rest: &[u8]) -> usize {
    let mut from = 0;
    while let Some(offset) = rest[from..].windows(2).position(|pair| pair == b"\r\n") {
        let end = from + offset + 2;
        if !matches!(rest.get(end), Some(b' ' | b'\t')) {
            return end;
        }
        from = end;
    }
    rest.len()
}

fn has_bare_line_ending(message: &[u8]) -> bool {
    message.iter().enumerate().any(|(i, &byte)| match byte {
        b'\r' => message.get(i + 1) != Some(&b'\n'),
        b'\n' => i == 0 || message.get(i - 1) != Some(&b'\r'),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_fields_keep_their_folds_and_the_body_is_the_untouched_rest() {
        let raw = b"Subject: one\r\n two\r\n\tthree\r\nTo: a@example.net\r\n\r\nbody\r\n\r\n";
        let message = Message::parse(raw).unwrap();
        assert_eq!(
            message.fields,
            [
                (&b"Subject"[..], &b" one\r\n two\r\n\tthree\r\n"[..]),
                (&b"To"[..], &b" a@example.net\r\n"[..])
            ]
        );
        assert_eq!(message.stream().body(), b"body\r\n\r\n");
    }

    #[test]
    fn a_message_without_a_body_has_an_empty_one() {
        for raw in [
            &b"From: a@example.org\r\n"[..],
            b"From: a@example.org\r\n\r\n",
            b"From: a@example.org",
        ] {
            let message = Message::parse(raw).unwrap();
            assert_eq!(message.fields.len(), 1);
            assert_eq!(message.stream().body(), b"");
        }
    }

    #[test]
    fn lines_that_are_not_fields_are_refused() {
        for raw in [
            &b"From: a@example.org\r\nnot a header\r\n\r\nbody\r\n"[..],
            b" folded: before any field\r\n\r\n",
            b"From : a@example.org\r\n\r\n",
            b": no name\r\n\r\n",
        ] {
            assert!(
                matches!(Message::parse(raw), Err(SignError::MalformedHeader)),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn bare_cr_or_lf_anywhere_is_refused() {
        for raw in [
            &b"From: a@example.org\n\r\nbody\r\n"[..],
            b"From: a@example.org\r\n\r\nbody\n",
            b"From: a@example.org\r\n\r\nbo\rdy\r\n",
            b"\nFrom: a@example.org\r\n\r\n",
            b"From: a@example.org\r\n\r\nbody\r",
        ] {
            assert!(
                matches!(Message::parse(raw), Err(SignError::BareLineEnding)),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
