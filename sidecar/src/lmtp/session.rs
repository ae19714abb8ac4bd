//! One LMTP session over any byte stream: the command loop, the transaction state and the per-recipient replies
//! after DATA (RFC 2033 section 4.2).

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::command::{self, Command};
use super::data::DataDecoder;
use super::envelope::{self, Envelope};
use super::reply::Reply;
use super::{Backend, Limits, RcptDecision};

/// Longest command line including its CRLF (RFC 5321 section 4.5.3.1.4).
const MAX_COMMAND_LINE: usize = 512;
const READ_CHUNK: usize = 16 * 1024;
/// What the greeting and LHLO reply call this server; the socket is private to the pod, so no real name is needed.
const SERVER_NAME: &str = "localhost";

const OK: Reply = Reply::fixed(250, (2, 0, 0), "OK");
const RESET: Reply = Reply::fixed(250, (2, 0, 0), "reset");
const SENDER_OK: Reply = Reply::fixed(250, (2, 1, 0), "sender OK");
const RECIPIENT_OK: Reply = Reply::fixed(250, (2, 1, 5), "recipient OK");
const BYE: Reply = Reply::fixed(221, (2, 0, 0), "bye");
const CANNOT_VRFY: Reply = Reply::fixed(
    252,
    (2, 5, 0),
    "cannot VRFY user, but will accept message and attempt delivery",
);
const NEED_LHLO: Reply = Reply::fixed(503, (5, 5, 1), "send LHLO first");
const USE_LHLO: Reply = Reply::fixed(500, (5, 5, 1), "this is LMTP: greet with LHLO");
const NESTED_MAIL: Reply = Reply::fixed(503, (5, 5, 1), "a transaction is already in progress");
const NEED_MAIL: Reply = Reply::fixed(503, (5, 5, 1), "send MAIL first");
const NO_RECIPIENTS: Reply = Reply::fixed(503, (5, 5, 1), "no valid recipients");
const TOO_MANY_RECIPIENTS: Reply = Reply::fixed(452, (4, 5, 3), "too many recipients");
const SIZE_EXCEEDED: Reply = Reply::fixed(552, (5, 3, 4), "message size exceeds fixed maximum message size");
const LINE_TOO_LONG: Reply = Reply::fixed(500, (5, 5, 6), "command line too long");
const BARE_NEWLINE: Reply = Reply::fixed(500, (5, 5, 2), "bare CR or LF in command; lines must end in CRLF");
const BACKEND_FAILED: Reply = Reply::fixed(451, (4, 3, 0), "internal error; try again later");
const IDLE_TIMEOUT: Reply = Reply::fixed(421, (4, 4, 2), "idle timeout; closing connection");
const SHUTTING_DOWN: Reply = Reply::fixed(421, (4, 3, 2), "shutting down; try again later");

/// Serves one LMTP session on `stream` until the client quits or disconnects, the session is idle for too long,
/// or `shutdown` is cancelled while no transaction is in progress. Every reply to a recipient after DATA comes
/// from `backend`, except refusals of the content itself (size, line ends, line length) and 451 for a backend
/// that did not answer once per recipient. An error is an I/O failure of the stream.
pub async fn serve_session<S, B>(
    stream: S,
    backend: &B,
    limits: &Limits,
    shutdown: &CancellationToken,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Backend,
{
    let mut session = Session {
        io: Connection::new(stream, limits),
        backend,
        limits,
        greeted: false,
        transaction: None,
    };
    session.io.greet();
    loop {
        // Shutdown waits for a transaction in progress, but does not let a new one start.
        let interruptible = match session.transaction {
            Some(_) => None,
            None if shutdown.is_cancelled() => return session.io.close_with(&SHUTTING_DOWN).await,
            None => Some(shutdown),
        };
        match session.io.next_command(interruptible).await? {
            Input::Line(line) => {
                if let Flow::Quit = session.handle(&line).await? {
                    return session.io.flush().await;
                }
            }
            Input::TooLong => session.io.reply(&LINE_TOO_LONG),
            Input::BareNewline => session.io.reply(&BARE_NEWLINE),
            Input::Closed => return Ok(()),
            Input::TimedOut => return session.io.close_with(&IDLE_TIMEOUT).await,
            Input::ShuttingDown => return session.io.close_with(&SHUTTING_DOWN).await,
        }
    }
}

struct Session<'a, S, B> {
    io: Connection<S>,
    backend: &'a B,
    limits: &'a Limits,
    greeted: bool,
    transaction: Option<Envelope>,
}

enum Flow {
    Continue,
    Quit,
}

impl<S: AsyncRead + AsyncWrite + Unpin, B: Backend> Session<'_, S, B> {
    async fn handle(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        let command = match command::parse(line) {
            Ok(command) => command,
            Err(reply) => {
                self.io.reply(&reply);
                return Ok(Flow::Continue);
            }
        };
        let reply = match command {
            Command::Lhlo => {
                self.greeted = true;
                self.transaction = None;
                self.io.reply_lhlo(self.limits.max_message_bytes);
                return Ok(Flow::Continue);
            }
            Command::SmtpGreeting => USE_LHLO,
            Command::Mail(argument) => self.mail(argument),
            Command::Rcpt(argument) => self.rcpt(argument).await,
            Command::Data => return self.data().await,
            Command::Rset => {
                self.transaction = None;
                RESET
            }
            Command::Noop => OK,
            Command::Vrfy => CANNOT_VRFY,
            Command::Quit => {
                self.io.reply(&BYE);
                return Ok(Flow::Quit);
            }
        };
        self.io.reply(&reply);
        Ok(Flow::Continue)
    }

    fn mail(&mut self, argument: &[u8]) -> Reply {
        if !self.greeted {
            return NEED_LHLO;
        }
        if self.transaction.is_some() {
            return NESTED_MAIL;
        }
        match envelope::parse_mail_from(argument) {
            Ok((_, params)) if params.size.is_some_and(|size| size > self.limits.max_message_bytes) => SIZE_EXCEEDED,
            Ok((sender, params)) => {
                self.transaction = Some(Envelope {
                    sender,
                    params,
                    recipients: Vec::new(),
                });
                SENDER_OK
            }
            Err(reply) => reply,
        }
    }

    async fn rcpt(&mut self, argument: &[u8]) -> Reply {
        let Some(envelope) = &mut self.transaction else {
            return NEED_MAIL;
        };
        let recipient = match envelope::parse_rcpt_to(argument, envelope.params.smtputf8) {
            Ok(recipient) => recipient,
            Err(reply) => return reply,
        };
        if envelope.recipients.len() >= self.limits.max_recipients {
            return TOO_MANY_RECIPIENTS;
        }
        match self.backend.check_recipient(envelope, &recipient).await {
            RcptDecision::Accept => {
                envelope.recipients.push(recipient);
                RECIPIENT_OK
            }
            RcptDecision::Refuse(reply) if reply.code() >= 400 => reply,
            RcptDecision::Refuse(_) => {
                tracing::error!("LMTP backend refused a recipient with a 2xx reply; answering 451");
                BACKEND_FAILED
            }
        }
    }

    async fn data(&mut self) -> std::io::Result<Flow> {
        let recipients = match &self.transaction {
            None => Err(NEED_MAIL),
            Some(envelope) if envelope.recipients.is_empty() => Err(NO_RECIPIENTS),
            Some(envelope) => Ok((envelope.recipients.len(), envelope.params.size)),
        };
        let (recipients, size_hint) = match recipients {
            Ok(found) => found,
            Err(reply) => {
                self.io.reply(&reply);
                return Ok(Flow::Continue);
            }
        };
        self.io.start_data();
        let max_bytes = usize::try_from(self.limits.max_message_bytes).unwrap_or(usize::MAX);
        // SIZE= is the client's count before unstuffing: at most a little more than the message needs.
        let size_hint = size_hint.map_or(0, |size| usize::try_from(size).unwrap_or(max_bytes));
        let mut decoder = DataDecoder::with_size_hint(max_bytes, size_hint);
        loop {
            if let Some(consumed) = decoder.feed(self.io.buffered()) {
                self.io.consume(consumed);
                break;
            }
            self.io.consume(self.io.buffered().len());
            match self.io.fill(None).await? {
                Fill::Data => {}
                // Nothing is delivered: the client sees no reply and keeps the message.
                Fill::Eof | Fill::Shutdown => return Ok(Flow::Quit),
                Fill::TimedOut => {
                    self.io.close_with(&IDLE_TIMEOUT).await?;
                    return Ok(Flow::Quit);
                }
            }
        }
        let Some(envelope) = self.transaction.take() else {
            return Ok(Flow::Continue);
        };
        let replies = match decoder.finish() {
            Err(refusal) => vec![refusal.reply(); recipients],
            Ok(message) => {
                let replies = self.backend.deliver(envelope, Bytes::from(message)).await;
                if replies.len() == recipients {
                    replies
                } else {
                    tracing::error!(
                        recipients,
                        replies = replies.len(),
                        "LMTP backend answered the wrong number of recipients; answering 451 for all"
                    );
                    vec![BACKEND_FAILED; recipients]
                }
            }
        };
        for reply in &replies {
            self.io.reply(reply);
        }
        Ok(Flow::Continue)
    }
}

enum Input {
    /// A command line without its CRLF.
    Line(Vec<u8>),
    TooLong,
    BareNewline,
    Closed,
    TimedOut,
    ShuttingDown,
}

enum Fill {
    Data,
    Eof,
    TimedOut,
    Shutdown,
}

/// The stream with an input buffer and an output buffer. Replies collect in the output buffer and are written
/// when the session would otherwise wait for input, so pipelined commands get their replies in one write and
/// in order (RFC 2920).
struct Connection<S> {
    stream: S,
    input: Vec<u8>,
    /// Start of the unconsumed part of `input`.
    start: usize,
    output: Vec<u8>,
    idle_timeout: std::time::Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    fn new(stream: S, limits: &Limits) -> Self {
        Self {
            stream,
            input: Vec::new(),
            start: 0,
            output: Vec::new(),
            idle_timeout: limits.idle_timeout,
        }
    }

    fn reply(&mut self, reply: &Reply) {
        reply.write_to(&mut self.output);
    }

    /// No enhanced code: they are only used once LHLO negotiated them (RFC 2034).
    fn greet(&mut self) {
        self.output
            .extend_from_slice(format!("220 {SERVER_NAME} LMTP SecureMail sidecar ready\r\n").as_bytes());
    }

    /// An intermediate reply: enhanced codes belong to final replies only (RFC 2034 section 3).
    fn start_data(&mut self) {
        self.output
            .extend_from_slice(b"354 send the message, end with <CRLF>.<CRLF>\r\n");
    }

    fn reply_lhlo(&mut self, max_message_bytes: u64) {
        let lines = [
            SERVER_NAME.to_owned(),
            "PIPELINING".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
            "8BITMIME".to_owned(),
            "SMTPUTF8".to_owned(),
            "REQUIRETLS".to_owned(),
            format!("SIZE {max_message_bytes}"),
        ];
        for (i, line) in lines.iter().enumerate() {
            let separator = if i + 1 == lines.len() { ' ' } else { '-' };
            self.output
                .extend_from_slice(format!("250{separator}{line}\r\n").as_bytes());
        }
    }

    async fn close_with(&mut self, reply: &Reply) -> std::io::Result<()> {
        self.reply(reply);
        self.flush().await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.output.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.output).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.idle_timeout, write).await {
            Ok(result) => result?,
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
        self.output.clear();
        Ok(())
    }

    fn buffered(&self) -> &[u8] {
        &self.input[self.start..]
    }

    fn consume(&mut self, len: usize) {
        self.start += len;
    }

    /// Writes pending replies, then waits for more input.
    async fn fill(&mut self, shutdown: Option<&CancellationToken>) -> std::io::Result<Fill> {
        self.flush().await?;
        self.input.drain(..self.start);
        self.start = 0;
        self.input.reserve(READ_CHUNK);
        let read = tokio::time::timeout(self.idle_timeout, self.stream.read_buf(&mut self.input));
        let read = match shutdown {
            // Reading is cancel-safe: nothing is lost if shutdown wins.
            Some(shutdown) => tokio::select! {
                read = read => read,
                () = shutdown.cancelled() => return Ok(Fill::Shutdown),
            },
            None => read.await,
        };
        match read {
            Err(_) => Ok(Fill::TimedOut),
            Ok(read) => Ok(if read? == 0 { Fill::Eof } else { Fill::Data }),
        }
    }

    /// The next command line. A line too long is read to its end and dropped, so the session stays in step.
    async fn next_command(&mut self, shutdown: Option<&CancellationToken>) -> std::io::Result<Input> {
        let mut too_long = false;
        loop {
            let pending = self.buffered();
            if let Some(lf) = pending.iter().position(|&b| b == b'\n') {
                let line = &pending[..=lf];
                let input = if too_long || line.len() > MAX_COMMAND_LINE {
                    Input::TooLong
                } else {
                    match line.strip_suffix(b"\r\n") {
                        Some(text) if !text.contains(&b'\r') => Input::Line(text.to_vec()),
                        _ => Input::BareNewline,
                    }
                };
                self.consume(lf + 1);
                return Ok(input);
            }
            if pending.len() > MAX_COMMAND_LINE {
                too_long = true;
                self.consume(pending.len());
            }
            match self.fill(shutdown).await? {
                Fill::Data => {}
                Fill::Eof => return Ok(Input::Closed),
                Fill::TimedOut => return Ok(Input::TimedOut),
                Fill::Shutdown => return Ok(Input::ShuttingDown),
            }
        }
    }
}
