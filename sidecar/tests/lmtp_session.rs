//! The LMTP session state machine over an in-memory stream, with a backend whose answers depend on the
//! recipient's local part.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers and backends: a panic is the failure report"
)]

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use securemail_sidecar::lmtp::{Backend, Body, Envelope, Limits, RcptDecision, Recipient, Reply, Ret, serve_session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const LHLO_REPLY: [&str; 7] = [
    "250-localhost",
    "250-PIPELINING",
    "250-ENHANCEDSTATUSCODES",
    "250-8BITMIME",
    "250-SMTPUTF8",
    "250-REQUIRETLS",
    "250 SIZE 33554432",
];
const GREETING: &str = "220 localhost LMTP SecureMail sidecar ready";
const DELIVERED: &str = "250 2.0.0 delivered by test backend";

/// At RCPT: `capped` gets a warmup refusal, `bogus` a refusal with a (wrong) 2xx code, everyone else is accepted.
/// After DATA: `later*` 450, `never*` 550, `inject` a 2xx whose text tries to add a line, everyone else 2xx.
#[derive(Default)]
struct TestBackend {
    /// Answer one reply too few, as a buggy delivery engine might.
    short_count: bool,
    delivered: Mutex<Vec<(Envelope, Bytes)>>,
}

impl TestBackend {
    fn short_count() -> Self {
        Self {
            short_count: true,
            ..Self::default()
        }
    }

    fn delivered(&self) -> Vec<(Envelope, Bytes)> {
        self.delivered.lock().unwrap().clone()
    }
}

impl Backend for TestBackend {
    async fn check_recipient(&self, _envelope: &Envelope, recipient: &Recipient) -> RcptDecision {
        match recipient.mailbox.local_part() {
            "capped" => RcptDecision::Refuse(
                Reply::new(452, Some((4, 7, 1)), "daily warmup cap of 500 for gmail reached").unwrap(),
            ),
            "bogus" => RcptDecision::Refuse(Reply::new(250, None, "refused, but says 250").unwrap()),
            _ => RcptDecision::Accept,
        }
    }

    async fn deliver(&self, envelope: Envelope, message: Bytes) -> Vec<Reply> {
        let mut replies: Vec<Reply> = envelope
            .recipients
            .iter()
            .map(|recipient| match recipient.mailbox.local_part() {
                local if local.starts_with("later") => Reply::new(450, Some((4, 2, 0)), "mailbox busy"),
                local if local.starts_with("never") => Reply::new(550, Some((5, 1, 1)), "user unknown"),
                "inject" => Reply::new(250, Some((2, 0, 0)), "ok\r\n250 2.0.0 smuggled\r\n"),
                _ => Reply::new(250, Some((2, 0, 0)), "delivered by test backend"),
            })
            .collect::<Result<_, _>>()
            .unwrap();
        if self.short_count {
            replies.pop();
        }
        self.delivered.lock().unwrap().push((envelope, message));
        replies
    }
}

/// Sends `input` at once (pipelined), closes the sending side and returns the server's reply lines.
async fn run(backend: &TestBackend, limits: Limits, input: &[u8]) -> Vec<String> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let shutdown = CancellationToken::new();
    let session = async {
        let result = serve_session(server, backend, &limits, &shutdown).await;
        assert!(result.is_ok(), "{result:?}");
    };
    let send = async {
        // The server may stop reading (QUIT); what it did not read does not matter.
        let _ = to_server.write_all(input).await;
        let _ = to_server.shutdown().await;
    };
    let receive = async {
        let mut output = Vec::new();
        from_server.read_to_end(&mut output).await.unwrap();
        output
    };
    let ((), (), output) = tokio::join!(session, send, receive);
    reply_lines(&output)
}

async fn run_default(backend: &TestBackend, input: &str) -> Vec<String> {
    run(backend, Limits::default(), input.as_bytes()).await
}

fn reply_lines(output: &[u8]) -> Vec<String> {
    let text = String::from_utf8(output.to_vec()).unwrap();
    assert!(text.is_empty() || text.ends_with("\r\n"), "{text:?}");
    text.split_terminator("\r\n").map(str::to_owned).collect()
}

/// The replies after the greeting and the LHLO reply.
fn after_lhlo(lines: Vec<String>) -> Vec<String> {
    assert_eq!(lines[0], GREETING);
    assert_eq!(lines[1..8], LHLO_REPLY);
    lines[8..].to_vec()
}

fn transaction(recipients: &[&str], content: &str) -> String {
    let mut input = "MAIL FROM:<sender@origin.example>\r\n".to_owned();
    for recipient in recipients {
        input.push_str(&format!("RCPT TO:<{recipient}>\r\n"));
    }
    input.push_str("DATA\r\n");
    input.push_str(content);
    input
}

#[tokio::test]
async fn greeting_and_lhlo_advertise_the_extensions() {
    let lines = run_default(&TestBackend::default(), "LHLO mta.example\r\nQUIT\r\n").await;
    assert_eq!(after_lhlo(lines), ["221 2.0.0 bye"]);
}

#[tokio::test]
async fn pipelined_transaction_gets_one_reply_per_recipient_after_data_in_rcpt_order() {
    let backend = TestBackend::default();
    let input = format!(
        "LHLO mta.example\r\n{}QUIT\r\n",
        transaction(
            &[
                "ok@dest.example",
                "later@dest.example",
                "capped@gmail.example",
                "never@Dest.Example"
            ],
            "Subject: hi\r\n\r\nbody\r\n.\r\n"
        )
    );
    let lines = after_lhlo(run_default(&backend, &input).await);
    assert_eq!(
        lines,
        [
            "250 2.1.0 sender OK",
            "250 2.1.5 recipient OK",
            "250 2.1.5 recipient OK",
            "452 4.7.1 daily warmup cap of 500 for gmail reached",
            "250 2.1.5 recipient OK",
            "354 send the message, end with <CRLF>.<CRLF>",
            DELIVERED,
            "450 4.2.0 mailbox busy",
            "550 5.1.1 user unknown",
            "221 2.0.0 bye",
        ]
    );
    let delivered = backend.delivered();
    assert_eq!(delivered.len(), 1);
    let (envelope, message) = &delivered[0];
    let sender = envelope.sender.as_ref().unwrap();
    assert_eq!((sender.local_part(), sender.domain()), ("sender", "origin.example"));
    let recipients: Vec<(&str, &str)> = envelope
        .recipients
        .iter()
        .map(|recipient| (recipient.mailbox.local_part(), recipient.domain()))
        .collect();
    assert_eq!(
        recipients,
        [
            ("ok", "dest.example"),
            ("later", "dest.example"),
            ("never", "dest.example")
        ]
    );
    assert_eq!(&message[..], b"Subject: hi\r\n\r\nbody\r\n");
}

#[tokio::test]
async fn replies_are_sent_before_the_server_waits_for_more_input() {
    let backend = TestBackend::default();
    let (client, server) = tokio::io::duplex(4096);
    let shutdown = CancellationToken::new();
    let limits = Limits::default();
    let session = serve_session(server, &backend, &limits, &shutdown);
    let client = async {
        let (from_server, mut to_server) = tokio::io::split(client);
        let mut from_server = tokio::io::BufReader::new(from_server);
        let mut transcript = Vec::new();
        // Each step waits for the reply before sending more, as a client without pipelining would.
        for (command, last_line_prefix) in [
            ("", "220 "),
            ("LHLO mta.example\r\n", "250 SIZE"),
            ("MAIL FROM:<>\r\n", "250 "),
            ("RCPT TO:<ok@dest.example>\r\n", "250 "),
            ("DATA\r\n", "354 "),
            ("x\r\n.\r\n", "250 "),
            ("QUIT\r\n", "221 "),
        ] {
            to_server.write_all(command.as_bytes()).await.unwrap();
            loop {
                let mut line = String::new();
                tokio::io::AsyncBufReadExt::read_line(&mut from_server, &mut line)
                    .await
                    .unwrap();
                assert!(!line.is_empty(), "closed early: {transcript:?}");
                transcript.push(line.clone());
                if line.starts_with(last_line_prefix) {
                    break;
                }
            }
        }
        transcript
    };
    let (result, transcript) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(session, client) })
        .await
        .expect("the session stalled");
    result.unwrap();
    assert_eq!(transcript.last().map(String::as_str), Some("221 2.0.0 bye\r\n"));
    assert_eq!(backend.delivered()[0].0.sender, None);
}

#[tokio::test]
async fn a_backend_answering_the_wrong_number_of_recipients_gets_451_for_all() {
    let backend = TestBackend::short_count();
    let input = format!(
        "LHLO mta.example\r\n{}",
        transaction(&["ok@dest.example", "ok2@dest.example"], "x\r\n.\r\n")
    );
    let lines = after_lhlo(run_default(&backend, &input).await);
    assert_eq!(
        lines[4..],
        [
            "451 4.3.0 internal error; try again later",
            "451 4.3.0 internal error; try again later"
        ]
    );
    assert_eq!(backend.delivered().len(), 1);
}

#[tokio::test]
async fn backend_replies_are_checked_and_sanitised() {
    let backend = TestBackend::default();
    let input = format!(
        "LHLO mta.example\r\n{}NOOP\r\n",
        transaction(&["bogus@dest.example", "inject@dest.example"], "x\r\n.\r\n")
    );
    let lines = after_lhlo(run_default(&backend, &input).await);
    assert_eq!(
        lines,
        [
            "250 2.1.0 sender OK",
            "451 4.3.0 internal error; try again later",
            "250 2.1.5 recipient OK",
            "354 send the message, end with <CRLF>.<CRLF>",
            "250 2.0.0 ok  250 2.0.0 smuggled",
            "250 2.0.0 OK",
        ]
    );
}

#[tokio::test]
async fn commands_out_of_sequence_get_503_and_smtp_greetings_500() {
    let backend = TestBackend::default();
    let input = "MAIL FROM:<a@origin.example>\r\n\
                 EHLO mta.example\r\n\
                 HELO mta.example\r\n\
                 LHLO mta.example\r\n\
                 RCPT TO:<ok@dest.example>\r\n\
                 DATA\r\n\
                 MAIL FROM:<a@origin.example>\r\n\
                 MAIL FROM:<a@origin.example>\r\n\
                 DATA\r\n\
                 RCPT TO:<capped@dest.example>\r\n\
                 DATA\r\n\
                 VRFY someone\r\n\
                 FOO\r\n\
                 QUIT\r\n";
    let lines = run_default(&backend, input).await;
    assert_eq!(
        lines[1..4],
        [
            "503 5.5.1 send LHLO first",
            "500 5.5.1 this is LMTP: greet with LHLO",
            "500 5.5.1 this is LMTP: greet with LHLO"
        ]
    );
    assert_eq!(
        lines[11..],
        [
            "503 5.5.1 send MAIL first",
            "503 5.5.1 send MAIL first",
            "250 2.1.0 sender OK",
            "503 5.5.1 a transaction is already in progress",
            "503 5.5.1 no valid recipients",
            "452 4.7.1 daily warmup cap of 500 for gmail reached",
            "503 5.5.1 no valid recipients",
            "252 2.5.0 cannot VRFY user, but will accept message and attempt delivery",
            "500 5.5.1 command not recognized",
            "221 2.0.0 bye",
        ]
    );
    assert!(backend.delivered().is_empty());
}

#[tokio::test]
async fn rset_and_lhlo_end_the_transaction() {
    let backend = TestBackend::default();
    let input = "LHLO mta.example\r\n\
                 MAIL FROM:<a@origin.example>\r\n\
                 RCPT TO:<ok@dest.example>\r\n\
                 RSET\r\n\
                 RCPT TO:<ok@dest.example>\r\n\
                 DATA\r\n\
                 MAIL FROM:<a@origin.example>\r\n\
                 LHLO again.example\r\n\
                 RCPT TO:<ok@dest.example>\r\n";
    let lines = after_lhlo(run_default(&backend, input).await);
    assert_eq!(
        lines[..6],
        [
            "250 2.1.0 sender OK",
            "250 2.1.5 recipient OK",
            "250 2.0.0 reset",
            "503 5.5.1 send MAIL first",
            "503 5.5.1 send MAIL first",
            "250 2.1.0 sender OK",
        ]
    );
    assert_eq!(lines[6..13], LHLO_REPLY);
    assert_eq!(lines[13..], ["503 5.5.1 send MAIL first"]);
}

#[tokio::test]
async fn dot_stuffing_is_removed_and_only_crlf_dot_crlf_ends_the_message() {
    let backend = TestBackend::default();
    let content = "..leading dot\r\n.x\r\n. \r\n.. \r\nend\r\n.\r\n";
    let input = format!(
        "LHLO mta.example\r\n{}NOOP\r\n",
        transaction(&["ok@dest.example"], content)
    );
    let lines = after_lhlo(run_default(&backend, &input).await);
    assert_eq!(lines[3..], [DELIVERED, "250 2.0.0 OK"]);
    assert_eq!(
        &backend.delivered()[0].1[..],
        b".leading dot\r\nx\r\n \r\n. \r\nend\r\n"
    );
}

#[tokio::test]
async fn bare_cr_or_lf_in_content_refuses_the_message_and_smuggled_commands_stay_content() {
    for content in [
        "a\n.\nMAIL FROM:<evil@origin.example>\r\nRCPT TO:<victim@dest.example>\r\nDATA\r\nx\r\n.\r\n",
        "a\r\n.\nRSET\r\n.\r\n",
        "a\r.\rMAIL FROM:<evil@origin.example>\r\n.\r\n",
        "a\rb\r\n.\r\n",
    ] {
        let backend = TestBackend::default();
        let input = format!(
            "LHLO mta.example\r\n{}{}",
            transaction(&["ok@dest.example", "later@dest.example"], content),
            transaction(&["ok@dest.example"], "clean\r\n.\r\n"),
        );
        let lines = after_lhlo(run_default(&backend, &input).await);
        let refusal = if content.contains("\r.\r") || content.contains("a\rb") {
            "550 5.6.0 message refused: bare CR in content; lines must end in CRLF"
        } else {
            "550 5.6.0 message refused: bare LF in content; lines must end in CRLF"
        };
        assert_eq!(lines[4..6], [refusal, refusal], "{content:?}");
        // The next transaction is the one after the real end marker, not one smuggled inside the content.
        assert_eq!(
            lines[6..],
            [
                "250 2.1.0 sender OK",
                "250 2.1.5 recipient OK",
                lines[3].as_str(),
                DELIVERED
            ]
        );
        let delivered = backend.delivered();
        assert_eq!(delivered.len(), 1, "{content:?}");
        assert_eq!(&delivered[0].1[..], b"clean\r\n");
    }
}

#[tokio::test]
async fn bare_cr_or_lf_in_a_command_gets_500_and_the_session_continues() {
    let input = "LHLO mta.example\r\nNOOP\n\
                 NOOP\rRSET\r\n\
                 \n\
                 NOOP\r\r\n\
                 NOOP\r\n";
    let lines = after_lhlo(run_default(&TestBackend::default(), input).await);
    let bare = "500 5.5.2 bare CR or LF in command; lines must end in CRLF";
    assert_eq!(lines, [bare, bare, bare, bare, "250 2.0.0 OK"]);
}

#[tokio::test]
async fn command_lines_over_512_octets_get_500_and_are_skipped_whole() {
    let longest = format!("NOOP {}\r\n", "x".repeat(512 - 7));
    assert_eq!(longest.len(), 512);
    let too_long = format!("NOOP {}\r\n", "x".repeat(512 - 6));
    let much_too_long = format!("MAIL FROM:<{}@origin.example>\r\n", "x".repeat(100_000));
    let input = format!("LHLO mta.example\r\n{longest}{too_long}{much_too_long}NOOP\r\n");
    let lines = after_lhlo(run_default(&TestBackend::default(), &input).await);
    let too_long = "500 5.5.6 command line too long";
    assert_eq!(lines, ["250 2.0.0 OK", too_long, too_long, "250 2.0.0 OK"]);
}

#[tokio::test]
async fn content_lines_over_998_octets_refuse_the_message() {
    let backend = TestBackend::default();
    let content = format!("{}\r\n.\r\n", "y".repeat(999));
    let input = format!(
        "LHLO mta.example\r\n{}NOOP\r\n",
        transaction(&["ok@dest.example"], &content)
    );
    let lines = after_lhlo(run_default(&backend, &input).await);
    assert_eq!(
        lines[3..],
        [
            "550 5.6.0 message refused: a line is longer than 998 octets",
            "250 2.0.0 OK"
        ]
    );
    assert!(backend.delivered().is_empty());
}

#[tokio::test]
async fn oversize_messages_get_552_at_mail_or_after_the_end_marker() {
    let backend = TestBackend::default();
    let limits = Limits {
        max_message_bytes: 100,
        ..Limits::default()
    };
    let big = format!("{}\r\n.\r\n", "z".repeat(200));
    let input = format!(
        "LHLO mta.example\r\n\
         MAIL FROM:<a@origin.example> SIZE=101\r\n\
         MAIL FROM:<a@origin.example> SIZE=100\r\n\
         RCPT TO:<ok@dest.example>\r\n\
         RCPT TO:<later@dest.example>\r\n\
         DATA\r\n\
         {big}{}",
        transaction(&["ok@dest.example"], "small\r\n.\r\n")
    );
    let lines = run(&backend, limits, input.as_bytes()).await;
    assert_eq!(lines[7], "250 SIZE 100");
    let too_big = "552 5.3.4 message size exceeds fixed maximum message size";
    assert_eq!(
        lines[8..],
        [
            too_big,
            "250 2.1.0 sender OK",
            "250 2.1.5 recipient OK",
            "250 2.1.5 recipient OK",
            "354 send the message, end with <CRLF>.<CRLF>",
            too_big,
            too_big,
            "250 2.1.0 sender OK",
            "250 2.1.5 recipient OK",
            "354 send the message, end with <CRLF>.<CRLF>",
            DELIVERED,
        ]
    );
    let delivered = backend.delivered();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].0.params.size, None);
    assert_eq!(&delivered[0].1[..], b"small\r\n");
}

#[tokio::test]
async fn recipients_beyond_the_limit_get_452() {
    let backend = TestBackend::default();
    let limits = Limits {
        max_recipients: 2,
        ..Limits::default()
    };
    let input = format!(
        "LHLO mta.example\r\n{}",
        transaction(
            &["ok1@dest.example", "ok2@dest.example", "ok3@dest.example"],
            "x\r\n.\r\n"
        )
    );
    let lines = after_lhlo(run(&backend, limits, input.as_bytes()).await);
    assert_eq!(lines[3], "452 4.5.3 too many recipients");
    assert_eq!(lines[5..], [DELIVERED, DELIVERED]);
    assert_eq!(backend.delivered()[0].0.recipients.len(), 2);
}

#[tokio::test]
async fn non_ascii_addresses_need_smtputf8() {
    let backend = TestBackend::default();
    let input = "LHLO mta.example\r\n\
                 MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example>\r\n\
                 MAIL FROM:<a@origin.example>\r\n\
                 RCPT TO:<\u{fc}ser@dest.example>\r\n\
                 RSET\r\n\
                 MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example> SMTPUTF8\r\n\
                 RCPT TO:<\u{fc}ser@d\u{e9}st.example>\r\n";
    let mut input = input.as_bytes().to_vec();
    input.extend_from_slice(b"RCPT TO:<\xff\xfe@dest.example>\r\nDATA\r\n\xc3\xa9t\xc3\xa9\r\n.\r\n");
    let lines = after_lhlo(run(&backend, Limits::default(), &input).await);
    let needs_utf8 = "553 5.6.7 non-ASCII address without SMTPUTF8, or invalid UTF-8";
    assert_eq!(
        lines,
        [
            needs_utf8,
            "250 2.1.0 sender OK",
            needs_utf8,
            "250 2.0.0 reset",
            "250 2.1.0 sender OK",
            "250 2.1.5 recipient OK",
            needs_utf8,
            "354 send the message, end with <CRLF>.<CRLF>",
            DELIVERED,
        ]
    );
    let (envelope, message) = &backend.delivered()[0];
    assert!(envelope.params.smtputf8);
    assert_eq!(envelope.recipients[0].domain(), "d\u{e9}st.example");
    assert_eq!(&message[..], "\u{e9}t\u{e9}\r\n".as_bytes());
}

#[tokio::test]
async fn envelope_parameters_are_passed_to_the_backend() {
    let backend = TestBackend::default();
    let input = "LHLO mta.example\r\n\
                 MAIL FROM:<a@origin.example> SIZE=3 BODY=8BITMIME RET=HDRS ENVID=id+2B1\r\n\
                 RCPT TO:<ok@dest.example> NOTIFY=FAILURE,DELAY ORCPT=rfc822;ok+40dest.example\r\n\
                 RCPT TO:<\"odd one\"@dest.example>\r\n\
                 DATA\r\nx\r\n.\r\n";
    let lines = after_lhlo(run_default(&backend, input).await);
    assert_eq!(lines[4..], [DELIVERED, DELIVERED]);
    let (envelope, _) = &backend.delivered()[0];
    assert_eq!(envelope.params.size, Some(3));
    assert_eq!(envelope.params.body, Some(Body::EightBitMime));
    assert_eq!(envelope.params.ret, Some(Ret::Headers));
    assert_eq!(envelope.params.envid.as_deref(), Some("id+2B1"));
    let first = &envelope.recipients[0];
    assert_eq!(first.notify.as_deref(), Some("FAILURE,DELAY"));
    assert_eq!(
        first.orcpt.as_ref().map(|orcpt| orcpt.as_str()),
        Some("rfc822;ok+40dest.example")
    );
    assert_eq!(envelope.recipients[1].mailbox.local_part(), "\"odd one\"");
}

#[tokio::test]
async fn an_idle_client_is_disconnected_with_421() {
    let backend = TestBackend::default();
    let limits = Limits {
        idle_timeout: Duration::from_millis(50),
        ..Limits::default()
    };
    let (client, server) = tokio::io::duplex(4096);
    let shutdown = CancellationToken::new();
    let session = serve_session(server, &backend, &limits, &shutdown);
    let client = async {
        let (mut from_server, mut to_server) = tokio::io::split(client);
        to_server
            .write_all(b"LHLO mta.example\r\nMAIL FROM:<>\r\n")
            .await
            .unwrap();
        let mut output = Vec::new();
        from_server.read_to_end(&mut output).await.unwrap();
        // Keep the sending side open until the server closed: the timeout, not EOF, ends the session.
        drop(to_server);
        output
    };
    let (result, output) = tokio::join!(session, client);
    result.unwrap();
    let lines = after_lhlo(reply_lines(&output));
    assert_eq!(
        lines,
        ["250 2.1.0 sender OK", "421 4.4.2 idle timeout; closing connection"]
    );
}

#[tokio::test]
async fn shutdown_lets_the_transaction_in_progress_finish_and_then_closes() {
    let backend = TestBackend::default();
    let limits = Limits::default();
    let shutdown = CancellationToken::new();
    let (client, server) = tokio::io::duplex(4096);
    let session = serve_session(server, &backend, &limits, &shutdown);
    let client = async {
        let (from_server, mut to_server) = tokio::io::split(client);
        let mut from_server = tokio::io::BufReader::new(from_server);
        let mut line = String::new();
        let mut read_until = async |prefix: &str| loop {
            line.clear();
            tokio::io::AsyncBufReadExt::read_line(&mut from_server, &mut line)
                .await
                .unwrap();
            if line.is_empty() || line.starts_with(prefix) {
                return line.clone();
            }
        };
        to_server
            .write_all(b"LHLO mta.example\r\nMAIL FROM:<>\r\nRCPT TO:<ok@dest.example>\r\n")
            .await
            .unwrap();
        read_until("250 2.1.5").await;
        shutdown.cancel();
        to_server
            .write_all(b"DATA\r\nx\r\n.\r\nMAIL FROM:<>\r\n")
            .await
            .unwrap();
        [
            read_until("354").await,
            read_until("").await,
            read_until("").await,
            read_until("").await,
        ]
    };
    let (result, lines) = tokio::join!(session, client);
    result.unwrap();
    assert_eq!(
        lines,
        [
            "354 send the message, end with <CRLF>.<CRLF>\r\n",
            &format!("{DELIVERED}\r\n"),
            "421 4.3.2 shutting down; try again later\r\n",
            ""
        ]
    );
    assert_eq!(backend.delivered().len(), 1);
}

// ---- Random input ------------------------------------------------------------------------------------------------

/// Answers 2xx only for recipients whose local part starts with "ok", and one reply too few for transactions of
/// exactly three recipients. Counts the 2xx replies it gave in answers of the right length.
#[derive(Default)]
struct CountingBackend {
    honoured_2xx: Mutex<usize>,
}

impl Backend for CountingBackend {
    async fn check_recipient(&self, _envelope: &Envelope, recipient: &Recipient) -> RcptDecision {
        if recipient.domain().starts_with("capped") {
            RcptDecision::Refuse(Reply::new(452, Some((4, 7, 1)), "cap").unwrap())
        } else {
            RcptDecision::Accept
        }
    }

    async fn deliver(&self, envelope: Envelope, _message: Bytes) -> Vec<Reply> {
        let mut replies: Vec<Reply> = envelope
            .recipients
            .iter()
            .map(|recipient| match recipient.mailbox.local_part() {
                local if local.starts_with("ok") => Reply::new(250, Some((2, 0, 0)), "backend-delivered"),
                local if local.starts_with('t') => Reply::new(451, Some((4, 4, 1)), "no answer"),
                _ => Reply::new(550, Some((5, 1, 1)), "user unknown"),
            })
            .collect::<Result<_, _>>()
            .unwrap();
        if replies.len() == 3 {
            replies.pop();
        } else {
            *self.honoured_2xx.lock().unwrap() += replies.iter().filter(|reply| reply.code() < 300).count();
        }
        replies
    }
}

fn fragment() -> impl Strategy<Value = Vec<u8>> {
    let fixed = prop::sample::select(vec![
        "LHLO mta.example\r\n",
        "EHLO mta.example\r\n",
        "MAIL FROM:<a@origin.example>\r\n",
        "MAIL FROM:<> SIZE=10 BODY=8BITMIME\r\n",
        "MAIL FROM:<a@origin.example> SMTPUTF8\r\n",
        "RCPT TO:<ok@dest.example>\r\n",
        "RCPT TO:<ok2@dest.example> NOTIFY=NEVER\r\n",
        "RCPT TO:<temp@dest.example>\r\n",
        "RCPT TO:<no@dest.example>\r\n",
        "RCPT TO:<ok@capped.example>\r\n",
        "RCPT TO:<\u{fc}@dest.example>\r\n",
        "DATA\r\n",
        "RSET\r\n",
        "NOOP\r\n",
        "VRFY x\r\n",
        "QUIT\r\n",
        "Subject: x\r\n\r\n",
        "..dot\r\n",
        ".\r\n",
        "\r\n.\r\n",
        "\r",
        "\n",
        ".",
        "\r\n",
    ])
    .prop_map(|fragment| fragment.as_bytes().to_vec());
    let recipient = prop::sample::select(vec!["ok", "ok2", "temp", "no"]);
    let content = prop::sample::select(vec!["Subject: x\r\n", "\r\n", "..dot\r\n", "body\r\n", "a\rb\r\n"]);
    let whole_transaction = (
        proptest::collection::vec(recipient, 1..=4),
        proptest::collection::vec(content, 0..4),
    )
        .prop_map(|(recipients, lines)| {
            let mut transaction = "MAIL FROM:<a@origin.example>\r\n".to_owned();
            for recipient in recipients {
                transaction.push_str(&format!("RCPT TO:<{recipient}@dest.example>\r\n"));
            }
            transaction.push_str("DATA\r\n");
            transaction.push_str(&lines.concat());
            transaction.push_str(".\r\n");
            transaction.into_bytes()
        });
    prop_oneof![
        4 => fixed,
        3 => whole_transaction,
        1 => proptest::collection::vec(any::<u8>(), 0..40),
        1 => proptest::collection::vec(prop_oneof![Just(b'x'), Just(b'\r'), Just(b'\n')], 500..1200),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever arrives: no panic, only well-formed reply lines, and after DATA a 2xx for a recipient only where
    /// the backend gave one in an answer of the right length.
    #[test]
    fn random_input_never_yields_malformed_replies_or_unearned_2xx(
        fragments in proptest::collection::vec(fragment(), 0..40),
        small_limits in any::<bool>(),
    ) {
        let input = fragments.concat();
        let limits = if small_limits {
            Limits { max_message_bytes: 64, max_recipients: 3, ..Limits::default() }
        } else {
            Limits::default()
        };
        let backend = CountingBackend::default();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let output = runtime.block_on(async {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let (mut from_server, mut to_server) = tokio::io::split(client);
            let shutdown = CancellationToken::new();
            let send = async {
                let _ = to_server.write_all(&input).await;
                let _ = to_server.shutdown().await;
            };
            let receive = async {
                let mut output = Vec::new();
                from_server.read_to_end(&mut output).await.unwrap();
                output
            };
            let (result, (), output) = tokio::join!(serve_session(server, &backend, &limits, &shutdown), send, receive);
            prop_assert!(result.is_ok(), "{result:?}");
            Ok(output)
        })?;

        prop_assert!(output.is_empty() || output.ends_with(b"\r\n"));
        let text = String::from_utf8(output).map_err(|err| TestCaseError::fail(err.to_string()))?;
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        for line in &lines {
            let bytes = line.as_bytes();
            prop_assert!(
                bytes.len() >= 4
                    && bytes.len() <= 510
                    && matches!(bytes[0], b'2'..=b'5')
                    && bytes[1..3].iter().all(u8::is_ascii_digit)
                    && matches!(bytes[3], b' ' | b'-')
                    && bytes.iter().all(|b| (b' '..=b'~').contains(b)),
                "malformed reply line {:?}", line
            );
        }

        // Replay the transaction state from the replies: each command has one reply, so after "354" come as many
        // replies as recipients were accepted since the transaction began.
        let mut accepted = 0;
        let mut delivered_replies = 0;
        let mut pending_data_replies = 0;
        for line in &lines {
            if pending_data_replies > 0 {
                pending_data_replies -= 1;
                let earned = *line == "250 2.0.0 backend-delivered";
                prop_assert!(earned || line.starts_with('4') || line.starts_with('5'), "unearned {:?}", line);
                delivered_replies += usize::from(earned);
                continue;
            }
            match *line {
                "250 2.1.0 sender OK" | "250 2.0.0 reset" | "250-localhost" => accepted = 0,
                "250 2.1.5 recipient OK" => accepted += 1,
                l if l.starts_with("354 ") => {
                    pending_data_replies = accepted;
                    accepted = 0;
                }
                l => prop_assert!(l != "250 2.0.0 backend-delivered", "2xx outside DATA replies"),
            }
        }
        prop_assert_eq!(delivered_replies, *backend.honoured_2xx.lock().unwrap());
    }
}
