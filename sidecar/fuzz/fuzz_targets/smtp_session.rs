//! The SMTP client's reply matching against a scripted MX in memory. Run with `cargo +nightly fuzz run smtp_session`
//! (from sidecar/) or `sidecar/fuzz/run-stable.sh smtp_session`.
//!
//! The input is the MX's script: segments separated by `|`, each written in answer to one thing the client sends
//! (the connection, a command line, a message after a 354, a BDAT chunk), or, once between the two transactions,
//! while the session is idle. A segment may hold one reply, none (a missing reply), several (surplus) or garbage.
//! The client opens a session (cleartext allowed), sends a transaction with two recipients and, on the same session
//! if it is still usable, one with one recipient.
//!
//! Replies are matched to commands by position, so the only honest reading of the MX's output is positional: the
//! k-th reply answers the k-th thing the client sent, whichever segment it came in. A finding is a panic, a hang,
//! or a recipient reported delivered unless, once the MX had taken in the message (and answered it, if it did), it
//! had written exactly one reply per thing received and nothing more (no surplus, nothing missing, nothing while
//! idle), the reply in the message's position is 2xx and the reply in that recipient's RCPT position is 2xx.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rustls::RootCertStore;
use securemail_api::tenant::TlsVersion;
use securemail_sidecar::lmtp::{Backend, Envelope, Limits, RcptDecision, Recipient, Reply, serve_session};
use securemail_sidecar::policy::PeerAuth;
use securemail_sidecar::smtp::client::{Session, Target, Timeouts, Transaction, TransactionOutcome};
use securemail_sidecar::smtp::reply;
use securemail_sidecar::tls::TlsConfigs;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What the client sent, as the MX saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    Connect,
    Mail,
    Rcpt,
    /// A message after DATA, or a BDAT chunk marked LAST.
    Message,
    /// A segment written while the session was idle: answers nothing.
    Idle,
    Other,
}

#[derive(Default)]
struct MxLog {
    /// Each unit and the length of `written` after its segment.
    units: Vec<(Unit, usize)>,
    written: Vec<u8>,
}

/// Answers each unit with the next segment. It reads the client as the client reads it: after DATA it takes a
/// message only when the reply in DATA's position is a 354. Once the script has run out it still takes in what the
/// client has already sent (a pipelined group is sent whole), answering nothing, then closes.
async fn mx(stream: DuplexStream, script: Vec<Vec<u8>>, log: Arc<Mutex<MxLog>>, idle: Arc<Notify>) {
    let mut segments = script.into_iter();
    let mut stream = BufReader::new(stream);
    // Logs the unit as received, answered (when `speak`) or not: the client cannot tell which segment a reply came
    // in. `false` when nothing more will be answered.
    let mut answer = async |stream: &mut BufReader<DuplexStream>, unit: Unit, speak: bool| -> bool {
        let segment = if speak { segments.next() } else { None };
        {
            let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(segment) = &segment {
                log.written.extend_from_slice(segment);
            }
            let end = log.written.len();
            log.units.push((unit, end));
        }
        match segment {
            Some(segment) => stream.write_all(&segment).await.is_ok(),
            None => false,
        }
    };
    let mut answering = answer(&mut stream, Unit::Connect, true).await;
    loop {
        let mut line = Vec::new();
        if answering {
            tokio::select! {
                read = stream.read_until(b'\n', &mut line) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return;
                    }
                }
                () = idle.notified() => {
                    answering = answer(&mut stream, Unit::Idle, true).await;
                    continue;
                }
            }
        } else {
            let read = tokio::time::timeout(Duration::ZERO, stream.read_until(b'\n', &mut line)).await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                return;
            }
        }
        let upper = String::from_utf8_lossy(&line).trim_end().to_ascii_uppercase();
        let unit = if upper.starts_with("MAIL FROM:") {
            Unit::Mail
        } else if upper.starts_with("RCPT TO:") {
            Unit::Rcpt
        } else if let Some(arguments) = upper.strip_prefix("BDAT ") {
            let mut words = arguments.split_ascii_whitespace();
            let size: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let mut chunk = vec![0; size.min(1 << 20)];
            if stream.read_exact(&mut chunk).await.is_err() {
                return;
            }
            if words.next() == Some("LAST") {
                Unit::Message
            } else {
                Unit::Other
            }
        } else {
            Unit::Other
        };
        answering = answer(&mut stream, unit, answering).await;
        // Data mode until the lone dot when the reply in DATA's position, as the client reads it, is a 354.
        let go_ahead = upper == "DATA" && {
            let log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let position = log
                .units
                .iter()
                .filter(|(unit, _)| *unit != Unit::Idle)
                .count()
                .saturating_sub(1);
            replies(&log.written)
                .get(position)
                .is_some_and(|&(code, _)| code == 354)
        };
        if go_ahead {
            loop {
                let mut data_line = Vec::new();
                if !matches!(stream.read_until(b'\n', &mut data_line).await, Ok(n) if n > 0) {
                    return;
                }
                if data_line == b".\r\n" {
                    break;
                }
            }
            answering = answer(&mut stream, Unit::Message, answering).await;
        }
    }
}

/// Takes the envelope Postfix would hand over: the public way to make `Recipient`s.
struct Capture(Mutex<Option<Envelope>>);

impl Backend for Capture {
    async fn check_recipient(&self, _envelope: &Envelope, _recipient: &Recipient) -> RcptDecision {
        RcptDecision::Accept
    }

    async fn deliver(&self, envelope: Envelope, _message: Bytes) -> Vec<Reply> {
        let count = envelope.recipients.len();
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(envelope);
        Reply::new(250, Some((2, 0, 0)), "ok").map_or_else(|_| Vec::new(), |reply| vec![reply; count])
    }
}

fn envelope(runtime: &tokio::runtime::Runtime) -> Envelope {
    let capture = Capture(Mutex::new(None));
    runtime.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let session = b"LHLO postfix.test\r\nMAIL FROM:<records@example.org>\r\nRCPT TO:<a@example.net>\r\n\
            RCPT TO:<b@example.net>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n";
        let send = async {
            let _ = to_server.write_all(session).await;
            let _ = to_server.shutdown().await;
        };
        let receive = async {
            let mut output = Vec::new();
            let _ = from_server.read_to_end(&mut output).await;
        };
        let (limits, shutdown) = (Limits::default(), CancellationToken::new());
        let _ = tokio::join!(serve_session(server, &capture, &limits, &shutdown), send, receive);
    });
    let captured = capture.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
    captured.expect("the LMTP session hands over the envelope")
}

/// Which recipients the outcome reports delivered.
fn delivered(outcome: &TransactionOutcome) -> Vec<bool> {
    match outcome {
        TransactionOutcome::Replies { rcpt, data: Some(data) } if data.class() == 2 => {
            rcpt.iter().map(|reply| reply.class() == 2).collect()
        }
        _ => Vec::new(),
    }
}

/// The complete replies in what the MX wrote, in order: code and where each ends.
fn replies(written: &[u8]) -> Vec<(u16, usize)> {
    let mut replies = Vec::new();
    let mut offset = 0;
    while let Ok(Some((reply, used))) = reply::parse(&written[offset..]) {
        offset += used;
        replies.push((reply.code(), offset));
    }
    replies
}

/// Asserts that a recipient the client reported delivered in transaction `index` is delivered in the positional
/// reading of everything the MX wrote.
fn check(log: &MxLog, index: usize, claims: &[bool]) {
    if !claims.contains(&true) {
        return;
    }
    let replies = replies(&log.written);
    let answered: Vec<(Unit, usize)> = log
        .units
        .iter()
        .copied()
        .filter(|(unit, _)| *unit != Unit::Idle)
        .collect();
    let starts: Vec<usize> = (0..answered.len()).filter(|&k| answered[k].0 == Unit::Mail).collect();
    let start = *starts.get(index).expect("a transaction reported delivered was sent");
    let end = starts.get(index + 1).copied().unwrap_or(answered.len());
    let message = (start..end)
        .rfind(|&k| answered[k].0 == Unit::Message)
        .expect("a transaction reported delivered had its message received");
    // Idle segments count in `written`: any byte of theirs before the message's answer breaks the alignment.
    let aligned = replies.get(message).is_some_and(|&(_, end)| end == answered[message].1);
    assert!(
        aligned,
        "delivered, but the MX's replies and the client's units were not one to one"
    );
    assert_eq!(
        replies[message].0 / 100,
        2,
        "delivered, but the message's reply was {}",
        replies[message].0
    );
    let rcpts: Vec<usize> = (start..message).filter(|&k| answered[k].0 == Unit::Rcpt).collect();
    for (recipient, claimed) in claims.iter().enumerate() {
        if *claimed {
            let code = rcpts
                .get(recipient)
                .and_then(|&position| replies.get(position))
                .map(|&(code, _)| code);
            assert_eq!(
                code.map(|code| code / 100),
                Some(2),
                "recipient {recipient} delivered, its RCPT got {code:?}"
            );
        }
    }
}

fuzz_target!(|input: &[u8]| {
    static ENVELOPE: OnceLock<Envelope> = OnceLock::new();
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
    else {
        return;
    };
    let envelope = ENVELOPE.get_or_init(|| envelope(&runtime));
    let script: Vec<Vec<u8>> = input.split(|&b| b == b'|').map(<[u8]>::to_vec).collect();
    let log = Arc::new(Mutex::new(MxLog::default()));
    let idle = Arc::new(Notify::new());
    let claims = runtime.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(tokio::task::unconstrained(mx(
            server,
            script,
            log.clone(),
            idle.clone(),
        )));
        let configs = TlsConfigs::with_roots(RootCertStore::empty());
        let target = Target {
            host: "mx.example.net",
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            auth: &PeerAuth::AnyCertificate,
            min_version: TlsVersion::Tls12,
            allow_cleartext: true,
        };
        let timeouts = Timeouts {
            starttls: Duration::from_secs(1),
            ..Timeouts::default()
        };
        let mut claims = Vec::new();
        if let Ok(mut session) = Session::over(client, "fuzz.example", timeouts, &configs, target).await {
            let first = [&envelope.recipients[0], &envelope.recipients[1]];
            let second = [&envelope.recipients[1]];
            for (index, recipients) in [&first[..], &second[..]].into_iter().enumerate() {
                let transaction = Transaction {
                    sender: envelope.sender.as_ref(),
                    params: &envelope.params,
                    recipients,
                    content: b"Subject: fuzz\r\n\r\n.body\r\n",
                };
                match session.send(&transaction).await {
                    Ok(outcome) => claims.push((index, delivered(&outcome))),
                    Err(_) => break,
                }
                if session.is_closed() {
                    break;
                }
                idle.notify_one();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        server.abort();
        let _ = server.await;
        claims
    });
    let log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for (index, claimed) in claims {
        check(&log, index, &claimed);
    }
});
