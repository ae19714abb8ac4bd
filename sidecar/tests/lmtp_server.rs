//! The LMTP listener on a real Unix socket: how it takes over the socket path and how it shuts down.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers and backends: a panic is the failure report"
)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use securemail_sidecar::Error;
use securemail_sidecar::lmtp::{Backend, Envelope, Limits, LmtpListener, RcptDecision, Recipient, Reply};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

/// Accepts everyone and delivers after `delay`, long enough for a shutdown to arrive while it works.
struct SlowBackend {
    delay: Duration,
}

impl Backend for SlowBackend {
    async fn check_recipient(&self, _envelope: &Envelope, _recipient: &Recipient) -> RcptDecision {
        RcptDecision::Accept
    }

    async fn deliver(&self, envelope: Envelope, _message: Bytes) -> Vec<Reply> {
        tokio::time::sleep(self.delay).await;
        let delivered = Reply::new(250, Some((2, 0, 0)), "delivered").unwrap();
        vec![delivered; envelope.recipients.len()]
    }
}

async fn read_line(reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    line
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_opens_it_to_all_users_and_never_replaces_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lmtp.sock");
    let first = LmtpListener::bind(&path).unwrap();
    drop(first);
    assert!(
        path.exists(),
        "a dropped listener leaves its socket file, as a crash would"
    );
    let _second = LmtpListener::bind(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o666);
    UnixStream::connect(&path).await.unwrap();

    let regular = dir.path().join("not-a-socket");
    std::fs::write(&regular, "keep me").unwrap();
    let err = LmtpListener::bind(&regular).unwrap_err();
    assert!(matches!(err, Error::LmtpPathOccupied { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(&regular).unwrap(), "keep me");

    let err = LmtpListener::bind(&dir.path().join("missing-dir/lmtp.sock")).unwrap_err();
    assert!(err.to_string().contains("cannot bind"), "{err}");
}

#[tokio::test]
async fn shutdown_stops_accepting_closes_idle_sessions_and_waits_for_transactions_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lmtp.sock");
    let listener = LmtpListener::bind(&path).unwrap();
    let shutdown = CancellationToken::new();
    let backend = Arc::new(SlowBackend {
        delay: Duration::from_millis(300),
    });
    let server = tokio::spawn(listener.serve(backend, Limits::default(), shutdown.clone()));

    let (busy_read, mut busy) = UnixStream::connect(&path).await.unwrap().into_split();
    let mut busy_read = BufReader::new(busy_read);
    let (idle_read, _idle) = UnixStream::connect(&path).await.unwrap().into_split();
    let mut idle_read = BufReader::new(idle_read);
    assert!(read_line(&mut busy_read).await.starts_with("220 "));
    assert!(read_line(&mut idle_read).await.starts_with("220 "));

    busy.write_all(b"LHLO mta.example\r\nMAIL FROM:<>\r\nRCPT TO:<a@dest.example>\r\nDATA\r\nx\r\n.\r\n")
        .await
        .unwrap();
    while !read_line(&mut busy_read).await.starts_with("354 ") {}
    // The backend is now delivering.
    shutdown.cancel();

    assert_eq!(
        read_line(&mut idle_read).await,
        "421 4.3.2 shutting down; try again later\r\n"
    );
    assert_eq!(read_line(&mut busy_read).await, "250 2.0.0 delivered\r\n");
    assert_eq!(
        read_line(&mut busy_read).await,
        "421 4.3.2 shutting down; try again later\r\n"
    );
    assert_eq!(read_line(&mut busy_read).await, "");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
    assert!(!path.exists(), "the socket is removed so Postfix keeps its mail queued");
    assert!(UnixStream::connect(&path).await.is_err());
}
