//! The LMTP server behind Debian's real Postfix: each per-recipient answer after DATA must become Postfix's
//! delivered / deferred / bounced for that recipient, deferred mail must stay in Postfix's queue, and smuggling
//! attempts submitted to Postfix must reach the backend as one CRLF-only message. Needs root (Postfix's daemons
//! start as root and drop to the postfix user) and the postfix package (e2e/install-deps.sh).
#![allow(
    clippy::unwrap_used,
    reason = "test helpers and backends: a panic is the failure report"
)]

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use securemail_sidecar::lmtp::{Backend, Envelope, Limits, LmtpListener, RcptDecision, Recipient, Reply};
use tokio_util::sync::CancellationToken;

/// At RCPT `capped` hits a warmup cap; after DATA `later` is deferred, `never` bounced, everyone else delivered.
/// Records what it was asked to deliver as (recipient local parts, message).
#[derive(Default)]
struct RecordingBackend {
    deliveries: Mutex<Vec<(Vec<String>, Bytes)>>,
}

impl Backend for RecordingBackend {
    async fn check_recipient(&self, _envelope: &Envelope, recipient: &Recipient) -> RcptDecision {
        match recipient.mailbox.local_part() {
            "capped" => {
                RcptDecision::Refuse(Reply::new(452, Some((4, 7, 1)), "warmup cap of 50 per hour reached").unwrap())
            }
            _ => RcptDecision::Accept,
        }
    }

    async fn deliver(&self, envelope: Envelope, message: Bytes) -> Vec<Reply> {
        let locals: Vec<String> = envelope
            .recipients
            .iter()
            .map(|recipient| recipient.mailbox.local_part().to_owned())
            .collect();
        let replies = locals
            .iter()
            .map(|local| match local.as_str() {
                "later" => Reply::new(450, Some((4, 2, 0)), "remote mailbox busy"),
                "never" => Reply::new(550, Some((5, 1, 1)), "remote says user unknown"),
                _ => Reply::new(250, Some((2, 0, 0)), "accepted by remote MX"),
            })
            .collect::<Result<_, _>>()
            .unwrap();
        self.deliveries.lock().unwrap().push((locals, message));
        replies
    }
}

impl RecordingBackend {
    /// The messages delivered to a recipient with this local part.
    fn messages_for(&self, local: &str) -> Vec<Bytes> {
        let deliveries = self.deliveries.lock().unwrap();
        deliveries
            .iter()
            .filter(|(locals, _)| locals.iter().any(|l| l == local))
            .map(|(_, message)| message.clone())
            .collect()
    }
}

/// The LMTP server on a socket in `dir`, on its own runtime; stopped on drop.
struct Sidecar {
    backend: Arc<RecordingBackend>,
    shutdown: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Sidecar {
    fn start(socket: &Path) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let backend = Arc::new(RecordingBackend::default());
        let shutdown = CancellationToken::new();
        let listener = {
            let _context = runtime.enter();
            LmtpListener::bind(socket).unwrap()
        };
        runtime.spawn(listener.serve(Arc::clone(&backend), Limits::default(), shutdown.clone()));
        Self {
            backend,
            shutdown,
            runtime: Some(runtime),
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// Postfix from a scratch configuration: an smtpd on a free loopback port without TLS that relays for
/// 127.0.0.0/8, and every message to the LMTP socket, except mail to origin.example (the senders' domain, where
/// Postfix's own bounce notices would go), which is discarded.
struct Postfix {
    dir: tempfile::TempDir,
    port: u16,
    master: Child,
}

impl Postfix {
    fn start(label: &str) -> (Self, Sidecar) {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata("/proc/self").unwrap().uid(),
            0,
            "running Postfix needs root (its daemons start as root and drop to the postfix user)"
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("securemail-lmtp-{label}-"))
            .tempdir()
            .unwrap();
        // Postfix's daemons run as the postfix user and must reach the queue and the socket.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let (conf, queue, data) = (
            dir.path().join("conf"),
            dir.path().join("queue"),
            dir.path().join("data"),
        );
        for path in [&conf, &queue, &data] {
            fs::create_dir(path).unwrap();
        }
        run(Command::new("chown").arg("postfix").arg(&data));
        let socket = dir.path().join("lmtp.sock");
        let sidecar = Sidecar::start(&socket);

        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let transport = format!("lmtp:unix:{}", socket.display());
        let main_cf = [
            "compatibility_level = 3.6".to_owned(),
            format!("queue_directory = {}", queue.display()),
            format!("data_directory = {}", data.display()),
            "maillog_file = /dev/stdout".to_owned(),
            "myhostname = mta.test.example".to_owned(),
            "mydestination =".to_owned(),
            "local_recipient_maps =".to_owned(),
            "alias_maps =".to_owned(),
            "alias_database =".to_owned(),
            "inet_protocols = ipv4".to_owned(),
            "mynetworks = 127.0.0.0/8".to_owned(),
            "smtpd_relay_restrictions = permit_mynetworks, reject".to_owned(),
            // As the operator renders it: bare LF in submissions is read as CRLF, and only CRLF.CRLF ends DATA,
            // for every client (the default exclusion is $mynetworks, which is where this test submits from).
            "smtpd_forbid_bare_newline = normalize".to_owned(),
            "smtpd_forbid_bare_newline_exclusions =".to_owned(),
            format!("default_transport = {transport}"),
            format!("relay_transport = {transport}"),
            "transport_maps = inline:{ { origin.example = discard: } }".to_owned(),
            "lmtp_destination_recipient_limit = 20".to_owned(),
            "notify_classes =".to_owned(),
        ]
        .join("\n");
        let master_cf = [
            format!("127.0.0.1:{port} inet n - n - - smtpd"),
            "cleanup unix n - n - 0 cleanup".to_owned(),
            "qmgr unix n - n 300 1 qmgr".to_owned(),
            "rewrite unix - - n - - trivial-rewrite".to_owned(),
            "bounce unix - - n - 0 bounce".to_owned(),
            "defer unix - - n - 0 bounce".to_owned(),
            "trace unix - - n - 0 bounce".to_owned(),
            "flush unix n - n 1000? 0 flush".to_owned(),
            "showq unix n - n - - showq".to_owned(),
            "error unix - - n - - error".to_owned(),
            "retry unix - - n - - error".to_owned(),
            "discard unix - - n - - discard".to_owned(),
            "lmtp unix - - n - - lmtp".to_owned(),
            "anvil unix - - n - 1 anvil".to_owned(),
            "scache unix - - n - 1 scache".to_owned(),
            "postlog unix-dgram n - n - 1 postlogd".to_owned(),
        ]
        .join("\n");
        fs::write(conf.join("main.cf"), main_cf + "\n").unwrap();
        fs::write(conf.join("master.cf"), master_cf + "\n").unwrap();

        let log = fs::File::create(dir.path().join("maillog")).unwrap();
        let master = postfix_tool("postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start-fg")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut postfix = Self { dir, port, master };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = postfix.master.try_wait().unwrap().is_some();
            assert!(
                !exited && Instant::now() < deadline,
                "Postfix did not start:\n{}",
                postfix.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        (postfix, sidecar)
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// The delivery log line for `recipient`, waiting up to 30 seconds for it.
    fn delivery_of(&self, recipient: &str) -> String {
        let needle = format!("to=<{recipient}>");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(line) = log
                .lines()
                .find(|line| line.contains(&needle) && line.contains("status="))
            {
                return line.to_owned();
            }
            assert!(Instant::now() < deadline, "no delivery to {recipient} logged:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Speaks SMTP: sends each item as is (each carries its own line ends) and returns the final line of the
    /// reply to each.
    fn submit(&self, items: &[&[u8]]) -> Vec<String> {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut from_server = BufReader::new(stream.try_clone().unwrap());
        assert!(final_reply(&mut from_server).starts_with("220 "));
        let replies = items
            .iter()
            .map(|item| {
                (&stream).write_all(item).unwrap();
                final_reply(&mut from_server)
            })
            .collect();
        let _ = (&stream).write_all(b"QUIT\r\n");
        replies
    }

    /// Submits one message from sender@origin.example and asserts that Postfix queued it.
    fn submit_message(&self, recipients: &[&str], content: &[u8]) {
        let rcpts: Vec<String> = recipients.iter().map(|r| format!("RCPT TO:<{r}>\r\n")).collect();
        let mut items: Vec<&[u8]> = vec![
            b"EHLO client.test.example\r\n",
            b"MAIL FROM:<sender@origin.example>\r\n",
        ];
        items.extend(rcpts.iter().map(|rcpt| rcpt.as_bytes()));
        items.extend([&b"DATA\r\n"[..], content]);
        let replies = self.submit(&items);
        assert!(
            replies
                .iter()
                .take(replies.len() - 2)
                .all(|reply| reply.starts_with("250 "))
                && replies[replies.len() - 2].starts_with("354 ")
                && replies[replies.len() - 1].starts_with("250 2.0.0 Ok: queued"),
            "{replies:?}\n{}",
            self.log()
        );
    }

    /// The recipients of each message in Postfix's queue.
    fn queued_recipients(&self) -> Vec<Vec<String>> {
        let output = run(postfix_tool("postqueue").arg("-c").arg(self.conf()).arg("-j"));
        output
            .lines()
            .map(|line| {
                let entry: serde_json::Value = serde_json::from_str(line).unwrap();
                let mut recipients: Vec<String> = entry["recipients"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|recipient| recipient["address"].as_str().unwrap().to_owned())
                    .collect();
                recipients.sort();
                recipients
            })
            .collect()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = postfix_tool("postfix").arg("-c").arg(self.conf()).arg("stop").output();
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.master.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}

/// A Postfix tool from Debian's postfix package (`/usr/sbin` is often missing from a user's PATH).
fn postfix_tool(tool: &str) -> Command {
    let search_path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search_path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .map(Command::new)
        .unwrap_or_else(|| panic!("{tool} is not installed: run e2e/install-deps.sh (installs Debian's postfix)"))
}

/// Runs a command to success and returns its stdout.
fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The last line of a (possibly multi-line) SMTP reply, or "" at end of stream.
fn final_reply(from_server: &mut impl BufRead) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        if from_server.read_line(&mut line).unwrap_or(0) == 0 {
            return String::new();
        }
        let line = line.trim_end();
        if line.len() >= 4 && line.as_bytes()[3] == b' ' {
            return line.to_owned();
        }
    }
}

/// Every CR is followed by LF and every LF preceded by CR.
fn crlf_only(message: &[u8]) -> bool {
    message.iter().enumerate().all(|(i, &byte)| match byte {
        b'\r' => message.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && message[i - 1] == b'\r',
        _ => true,
    })
}

#[test]
fn postfix_delivers_defers_and_bounces_each_recipient_as_the_lmtp_replies_say() {
    let (postfix, sidecar) = Postfix::start("replies");
    postfix.submit_message(
        &[
            "ok@dest.example",
            "later@dest.example",
            "never@dest.example",
            "capped@dest.example",
        ],
        b"Subject: per-recipient replies\r\n\r\nhello\r\n.\r\n",
    );

    let sent = postfix.delivery_of("ok@dest.example");
    assert!(sent.contains("status=sent (250 2.0.0 accepted by remote MX)"), "{sent}");
    let deferred = postfix.delivery_of("later@dest.example");
    assert!(
        deferred.contains("status=deferred") && deferred.contains("450 4.2.0 remote mailbox busy"),
        "{deferred}"
    );
    let bounced = postfix.delivery_of("never@dest.example");
    assert!(
        bounced.contains("status=bounced") && bounced.contains("550 5.1.1 remote says user unknown"),
        "{bounced}"
    );
    let capped = postfix.delivery_of("capped@dest.example");
    assert!(
        capped.contains("status=deferred")
            && capped.contains("452 4.7.1 warmup cap of 50 per hour reached (in reply to RCPT TO command)"),
        "{capped}"
    );

    assert_eq!(
        postfix.queued_recipients(),
        [["capped@dest.example", "later@dest.example"]],
        "{}",
        postfix.log()
    );
    let messages = sidecar.backend.messages_for("ok");
    assert_eq!(messages.len(), 1);
    assert!(messages[0].ends_with(b"\r\n\r\nhello\r\n"), "{:?}", messages[0]);
    assert!(sidecar.backend.messages_for("capped").is_empty());
}

#[test]
fn smuggling_and_overlong_lines_through_postfix_reach_the_backend_as_single_crlf_messages() {
    let (postfix, sidecar) = Postfix::start("smuggling");
    // A bare-LF end marker followed by a second transaction, and lines that start with dots (sent stuffed).
    postfix.submit_message(
        &["smuggle@dest.example"],
        b"Subject: smuggling\r\n\r\nbefore\n.\nMAIL FROM:<evil@origin.example>\r\nRCPT TO:<victim@dest.example>\r\n\
          DATA\r\nsmuggled\r\n.\n..leading dot\r\n...\r\nafter\r\n.\r\n",
    );
    // A bare-CR end marker. Postfix's smtpd already turns bare CRs into spaces (the sidecar would refuse them:
    // see the session tests), so this is delivered as one line.
    postfix.submit_message(
        &["barecr@dest.example"],
        b"Subject: bare CR\r\n\r\nbefore\r.\rafter\r\n.\r\n",
    );

    // A 1500-octet line: Postfix's LMTP client folds it (lmtp_line_length_limit = 998), so the sidecar's limit
    // on content lines never bounces mail Postfix accepted.
    let long_line = format!("Subject: long line\r\n\r\n{}\r\n.\r\n", "x".repeat(1500));
    postfix.submit_message(&["longline@dest.example"], long_line.as_bytes());

    let sent = postfix.delivery_of("longline@dest.example");
    assert!(sent.contains("status=sent"), "{sent}");
    let messages = sidecar.backend.messages_for("longline");
    assert_eq!(messages.len(), 1, "{}", postfix.log());
    let body = String::from_utf8_lossy(&messages[0]);
    assert!(body.lines().all(|line| line.len() <= 998), "{body}");
    let (_, text) = body.split_once("\r\n\r\n").unwrap();
    assert_eq!(text.replace(char::is_whitespace, ""), "x".repeat(1500), "{body}");

    let sent = postfix.delivery_of("smuggle@dest.example");
    assert!(sent.contains("status=sent"), "{sent}");
    let sent = postfix.delivery_of("barecr@dest.example");
    assert!(sent.contains("status=sent"), "{sent}");

    let messages = sidecar.backend.messages_for("smuggle");
    assert_eq!(messages.len(), 1, "{}", postfix.log());
    let message = &messages[0];
    assert!(crlf_only(message), "{:?}", message);
    let body = String::from_utf8_lossy(message);
    // The smuggled commands are content of the one message (Postfix drops the bare-LF "." lines themselves),
    // and dot-stuffing survives both hops.
    assert!(
        body.contains("\r\n\r\nbefore\r\n")
            && body.contains(
                "\r\nMAIL FROM:<evil@origin.example>\r\nRCPT TO:<victim@dest.example>\r\nDATA\r\nsmuggled\r\n"
            )
            && body.ends_with("\r\n.leading dot\r\n..\r\nafter\r\n"),
        "{body}"
    );
    assert!(sidecar.backend.messages_for("victim").is_empty());

    let messages = sidecar.backend.messages_for("barecr");
    assert_eq!(messages.len(), 1, "{}", postfix.log());
    assert!(crlf_only(&messages[0]), "{:?}", messages[0]);
    let body = String::from_utf8_lossy(&messages[0]);
    assert!(
        body.lines()
            .any(|line| line.starts_with("before") && line.ends_with("after")),
        "{body}"
    );
}
