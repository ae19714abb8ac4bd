//! Arbitrary bytes from the client into one LMTP session over an in-memory stream. Run with
//! `cargo +nightly fuzz run lmtp_session` (from sidecar/) or, on stable, `sidecar/fuzz/run-stable.sh`. A panic, a
//! hang, or a reply line that is not `DDD[ -]text CRLF` in printable ASCII is a finding.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use securemail_sidecar::lmtp::{Backend, Envelope, Limits, RcptDecision, Recipient, Reply, serve_session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Refuses recipients whose domain starts with "capped", delivers to local parts starting with "ok", defers the
/// rest; answers one reply too few for three recipients, to exercise the wrong-count path.
struct DummyBackend;

impl Backend for DummyBackend {
    async fn check_recipient(&self, _envelope: &Envelope, recipient: &Recipient) -> RcptDecision {
        match Reply::new(452, Some((4, 7, 1)), "cap reached") {
            Ok(reply) if recipient.domain().starts_with("capped") => RcptDecision::Refuse(reply),
            _ => RcptDecision::Accept,
        }
    }

    async fn deliver(&self, envelope: Envelope, _message: Bytes) -> Vec<Reply> {
        let mut replies: Vec<Reply> = envelope
            .recipients
            .iter()
            .filter_map(|recipient| match recipient.mailbox.local_part().starts_with("ok") {
                true => Reply::new(250, Some((2, 0, 0)), "delivered").ok(),
                false => Reply::new(451, Some((4, 4, 1)), "no answer").ok(),
            })
            .collect();
        if replies.len() == 3 {
            replies.pop();
        }
        replies
    }
}

fuzz_target!(|input: &[u8]| {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    let limits = Limits {
        max_message_bytes: 4096,
        max_recipients: 4,
        ..Limits::default()
    };
    let output = runtime.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let shutdown = CancellationToken::new();
        let send = async {
            let _ = to_server.write_all(input).await;
            let _ = to_server.shutdown().await;
        };
        let receive = async {
            let mut output = Vec::new();
            let _ = from_server.read_to_end(&mut output).await;
            output
        };
        let (result, (), output) =
            tokio::join!(serve_session(server, &DummyBackend, &limits, &shutdown), send, receive);
        assert!(result.is_ok(), "session failed on an in-memory stream: {result:?}");
        output
    });
    assert!(output.is_empty() || output.ends_with(b"\r\n"));
    for line in output.split(|&b| b == b'\n').filter(|line| !line.is_empty()) {
        let line = line
            .strip_suffix(b"\r")
            .unwrap_or_else(|| panic!("bare LF in {output:?}"));
        let well_formed = line.len() >= 4
            && matches!(line[0], b'2'..=b'5')
            && line[1..3].iter().all(u8::is_ascii_digit)
            && matches!(line[3], b' ' | b'-')
            && line.iter().all(|b| (b' '..=b'~').contains(b));
        assert!(
            well_formed,
            "malformed reply line {:?}",
            line.escape_ascii().to_string()
        );
    }
});
