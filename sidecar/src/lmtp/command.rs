//! LMTP command lines (RFC 2033, RFC 5321 section 4.1.1).

use super::reply::Reply;

pub(super) enum Command<'a> {
    Lhlo,
    /// HELO and EHLO: SMTP's greetings, which LMTP replaces with LHLO.
    SmtpGreeting,
    /// The argument after `MAIL FROM:`.
    Mail(&'a [u8]),
    /// The argument after `RCPT TO:`.
    Rcpt(&'a [u8]),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
}

const UNRECOGNIZED: Reply = Reply::fixed(500, (5, 5, 1), "command not recognized");

/// Parses one command line without its CRLF. An `Err` is the reply to send instead.
pub(super) fn parse(line: &[u8]) -> Result<Command<'_>, Reply> {
    let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let (verb, argument) = line.split_at(verb_end);
    let mut verb: [u8; 4] = verb.try_into().map_err(|_| UNRECOGNIZED)?;
    verb.make_ascii_uppercase();
    let no_argument = |command, syntax| if argument.is_empty() { Ok(command) } else { Err(syntax) };
    match &verb {
        b"LHLO" if !argument.trim_ascii().is_empty() => Ok(Command::Lhlo),
        b"LHLO" => Err(Reply::fixed(501, (5, 5, 4), "syntax: LHLO hostname")),
        b"HELO" | b"EHLO" => Ok(Command::SmtpGreeting),
        b"MAIL" => strip_prefix_ignore_case(argument, b" FROM:")
            .map(Command::Mail)
            .ok_or(Reply::fixed(501, (5, 5, 4), "syntax: MAIL FROM:<address>")),
        b"RCPT" => strip_prefix_ignore_case(argument, b" TO:")
            .map(Command::Rcpt)
            .ok_or(Reply::fixed(501, (5, 5, 4), "syntax: RCPT TO:<address>")),
        b"DATA" => no_argument(Command::Data, Reply::fixed(501, (5, 5, 4), "syntax: DATA")),
        b"RSET" => no_argument(Command::Rset, Reply::fixed(501, (5, 5, 4), "syntax: RSET")),
        b"QUIT" => no_argument(Command::Quit, Reply::fixed(501, (5, 5, 4), "syntax: QUIT")),
        b"NOOP" => Ok(Command::Noop),
        b"VRFY" => Ok(Command::Vrfy),
        _ => Err(UNRECOGNIZED),
    }
}

fn strip_prefix_ignore_case<'a>(input: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = input.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &input[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(line: &str) -> Result<Command<'_>, u16> {
        parse(line.as_bytes()).map_err(|reply| reply.code())
    }

    #[test]
    fn verbs_are_case_insensitive_and_arguments_are_split_off() {
        assert!(matches!(parsed("lhlo mta.example"), Ok(Command::Lhlo)));
        assert!(matches!(
            parsed("Mail From:<a@b.example> SIZE=1"),
            Ok(Command::Mail(b"<a@b.example> SIZE=1"))
        ));
        assert!(matches!(
            parsed("RCPT TO:<c@d.example>"),
            Ok(Command::Rcpt(b"<c@d.example>"))
        ));
        assert!(matches!(parsed("data"), Ok(Command::Data)));
        assert!(matches!(parsed("NOOP anything"), Ok(Command::Noop)));
        assert!(matches!(parsed("VRFY someone"), Ok(Command::Vrfy)));
        assert!(matches!(parsed("EHLO x"), Ok(Command::SmtpGreeting)));
    }

    #[test]
    fn malformed_commands_get_the_matching_error() {
        for (line, code) in [
            ("", 500),
            ("LHLO", 501),
            ("LHLO   ", 501),
            ("MAIL <a@b.example>", 501),
            ("MAIL", 501),
            ("RCPT FROM:<a@b.example>", 501),
            ("DATA now", 501),
            ("QUIT please", 501),
            ("STARTTLS", 500),
            ("BDAT 10 LAST", 500),
            ("MAILFROM:<a@b.example>", 500),
            ("\u{e9}\u{e9}", 500),
        ] {
            assert_eq!(parsed(line).err(), Some(code), "{line}");
        }
    }
}
