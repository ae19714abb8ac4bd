//! The signing domain of a message: the domain of its one From: mailbox (RFC 5322 §3.6.2), the identifier
//! DMARC aligns d= with. Deliberately strict: input a receiver might read differently is refused, not guessed.

use super::SignError;

/// The domain of the one From: mailbox among a message's header `fields`, lowercased and in A-labels.
pub(super) fn from_domain(fields: &[(&[u8], &[u8])]) -> Result<String, SignError> {
    let mut fields = fields.iter().filter(|(name, _)| name.eq_ignore_ascii_case(b"from"));
    let value = fields.next().ok_or(SignError::MissingFrom)?.1;
    let extra = fields.count();
    if extra > 0 {
        return Err(SignError::RepeatedFrom { count: extra + 1 });
    }
    mailbox_domain(value)
}

/// DNS names compare case-insensitively, and d= carries A-labels (RFC 8616), so both sides are normalised alike.
pub(super) fn normalise_domain(domain: &str) -> Option<String> {
    idna::domain_to_ascii(domain).ok().filter(|ascii| !ascii.is_empty())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a [u8]),
    Quoted,
    Special(u8),
}

fn mailbox_domain(value: &[u8]) -> Result<String, SignError> {
    let unparsable = |reason| SignError::UnparsableFrom { reason };
    let tokens = tokenize(value).map_err(unparsable)?;
    if tokens.iter().any(|token| matches!(token, Token::Special(b':' | b';'))) {
        return Err(unparsable("group syntax"));
    }
    let mailboxes: Vec<&[Token<'_>]> = tokens
        .split(|token| *token == Token::Special(b','))
        .filter(|mailbox| !mailbox.is_empty())
        .collect();
    let mailbox = match mailboxes.as_slice() {
        [one] => *one,
        [] => return Err(unparsable("no address")),
        many => return Err(SignError::MultipleFromMailboxes { count: many.len() }),
    };
    let addr_spec = match mailbox.iter().position(|token| *token == Token::Special(b'<')) {
        None => mailbox,
        Some(open) => {
            let (display_name, angle_addr) = mailbox.split_at(open);
            if display_name.iter().any(|token| matches!(token, Token::Special(_))) {
                return Err(unparsable("unquoted special character in the display name"));
            }
            match angle_addr {
                [Token::Special(b'<'), inner @ .., Token::Special(b'>')] => inner,
                _ => return Err(unparsable("unbalanced angle brackets")),
            }
        }
    };
    match addr_spec {
        [local @ .., Token::Special(b'@'), Token::Word(domain)]
            if !local.is_empty()
                && local
                    .iter()
                    .all(|token| matches!(token, Token::Word(_) | Token::Quoted)) =>
        {
            std::str::from_utf8(domain)
                .ok()
                .and_then(normalise_domain)
                .ok_or(unparsable("the domain is not a valid DNS name"))
        }
        _ => Err(unparsable("the address is not local-part@domain")),
    }
}

/// RFC 5322 lexical tokens of a header value. Folding whitespace and comments separate tokens and are dropped;
/// quoted strings only matter as a whole; `.` stays inside words so dot-atoms are one token.
fn tokenize(value: &[u8]) -> Result<Vec<Token<'_>>, &'static str> {
    let mut tokens = Vec::new();
    let mut rest = value;
    while let Some((&byte, after)) = rest.split_first() {
        rest = match byte {
            b' ' | b'\t' | b'\r' | b'\n' => after,
            b'(' => skip_comment(after)?,
            b'"' => {
                tokens.push(Token::Quoted);
                skip_quoted(after)?
            }
            b'<' | b'>' | b',' | b':' | b';' | b'@' | b'[' | b']' | b'\\' | b')' => {
                tokens.push(Token::Special(byte));
                after
            }
            _ => {
                let end = rest.iter().position(|&b| ends_word(b)).unwrap_or(rest.len());
                let (word, after_word) = rest.split_at(end);
                tokens.push(Token::Word(word));
                after_word
            }
        };
    }
    Ok(tokens)
}

fn ends_word(byte: u8) -> bool {
    matches!(
        byte,
        b' ' | b'\t'
            | b'\r'
            | b'\n'
            | b'('
            | b')'
            | b'"'
            | b'<'
            | b'>'
            | b','
            | b':'
            | b';'
            | b'@'
            | b'['
            | b']'
            | b'\\'
    )
}

/// Skips a comment whose `(` was consumed; comments nest and may contain quoted pairs.
fn skip_comment(mut rest: &[u8]) -> Result<&[u8], &'static str> {
    let mut depth = 1_usize;
    while let Some((&byte, after)) = rest.split_first() {
        rest = match byte {
            b'\\' => after.get(1..).unwrap_or_default(),
            b'(' => {
                depth += 1;
                after
            }
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(after);
                }
                after
            }
            _ => after,
        };
    }
    Err("unterminated comment")
}

/// Skips a quoted string whose opening `"` was consumed.
fn skip_quoted(mut rest: &[u8]) -> Result<&[u8], &'static str> {
    while let Some((&byte, after)) = rest.split_first() {
        rest = match byte {
            b'\\' => after.get(1..).unwrap_or_default(),
            b'"' => return Ok(after),
            _ => after,
        };
    }
    Err("unterminated quoted string")
}

#[cfg(test)]
mod tests {
    use super::super::message::Message;
    use super::*;

    fn domain_of(from: &str) -> Result<String, SignError> {
        domain_in(format!("To: b@example.net\r\nFrom:{from}\r\nSubject: s\r\n\r\nbody\r\n").as_bytes())
    }

    fn domain_in(message: &[u8]) -> Result<String, SignError> {
        from_domain(&Message::parse(message)?.fields)
    }

    #[test]
    fn display_names_quoted_strings_comments_and_folding_resolve_to_the_address_domain() {
        let cases = [
            (" records@example.org", "example.org"),
            (" Records <records@example.org>", "example.org"),
            (" \"Dr. Smith, Cardiology\" <smith@clinic.example>", "clinic.example"),
            (" \"someone@evil.example\" <billing@clinic.example>", "clinic.example"),
            (" \"a@evil.example\"@clinic.example", "clinic.example"),
            (
                " =?UTF-8?B?S2xpbmlrIE3DvGxsZXI=?= <info@clinic.example>",
                "clinic.example",
            ),
            (
                " Records (via evil@evil.example, or <x@y>) <records@example.org> (trailing)",
                "example.org",
            ),
            (" Patient Portal\r\n <portal@example.org>", "example.org"),
            ("\r\n\t\"Folded\r\n Name\" <portal@example.org>", "example.org"),
            (" <Records@Example.ORG>", "example.org"),
            (" info@bücher.example", "xn--bcher-kva.example"),
        ];
        for (from, expected) in cases {
            assert_eq!(domain_of(from).as_deref(), Ok(expected), "From:{from}");
        }
    }

    #[test]
    fn several_mailboxes_are_refused() {
        for (from, count) in [
            (" a@example.org, b@example.org", 2),
            (" \"Last, First\" <a@example.org>, Other <b@evil.example>", 2),
            (" a@example.org,\r\n b@example.org,\r\n c@example.org", 3),
        ] {
            assert_eq!(
                domain_of(from),
                Err(SignError::MultipleFromMailboxes { count }),
                "From:{from}"
            );
        }
    }

    #[test]
    fn missing_and_repeated_from_fields_are_refused() {
        assert_eq!(
            domain_in(b"To: b@example.net\r\n\r\nbody\r\n"),
            Err(SignError::MissingFrom)
        );
        let repeated = b"From: a@example.org\r\nTo: b@example.net\r\nfrom: c@evil.example\r\n\r\nbody\r\n";
        assert_eq!(domain_in(repeated), Err(SignError::RepeatedFrom { count: 2 }));
        // A From: line in the body is body text, not a header.
        let in_body = b"From: a@example.org\r\n\r\nFrom: c@evil.example\r\n";
        assert_eq!(domain_in(in_body).as_deref(), Ok("example.org"));
    }

    #[test]
    fn ambiguous_or_malformed_addresses_are_refused_with_a_reason() {
        for from in [
            "",
            " ",
            " a@example.org <b@evil.example>",
            " <a@example.org> <b@evil.example>",
            " <a@example.org",
            " a@example.org>",
            " undisclosed-recipients:;",
            " team: a@example.org;",
            " a@[192.0.2.1]",
            " @example.org",
            " a@",
            " a@b@example.org",
            " a@example .org",
            " (unterminated a@example.org",
            " \"unterminated <a@example.org>",
            " <@relay.example:a@example.org>",
        ] {
            match domain_of(from) {
                Err(SignError::UnparsableFrom { reason }) => assert!(!reason.is_empty()),
                other => panic!("From:{from} gave {other:?}"),
            }
        }
    }
}
