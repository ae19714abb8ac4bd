//! The admin server over a real TCP socket: probes, metrics and the `/status` the operator's drain relies on.
#![allow(clippy::unwrap_used, reason = "test set-up: a panic is the failure report")]

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use securemail_api::provider::Provider;
use securemail_api::sidecar_config::{
    DnsSettings, Egress, EvidenceSettings, Listen, SidecarConfig, SourceAddress, WarmupCaps,
};
use securemail_api::sidecar_status::{DeliveryDay, EgressStatus, QueueStatus, ResultCounts, SidecarStatus};
use securemail_api::tenant::{ProviderShares, TlsPolicySpec};
use securemail_sidecar::admin::{
    AdminServer, AdminState, OPENMETRICS_CONTENT_TYPE, Readiness, pod_status, queue_metrics, with_egress, with_evidence,
};
use securemail_sidecar::deliver::SystemClock;
use securemail_sidecar::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NOW: Duration = Duration::from_secs(1_767_225_600);

struct Response {
    status: u16,
    content_type: Option<String>,
    body: String,
}

/// A plain HTTP/1.1 GET, read to the end of the connection.
async fn get(addr: SocketAddr, path: &str) -> Response {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = lines
        .filter_map(|line| line.split_once(": "))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.to_owned());
    Response {
        status,
        content_type,
        body: body.to_owned(),
    }
}

fn config(queue_dir: Option<&Path>) -> SidecarConfig {
    SidecarConfig {
        tenant: "tenant-a/clinic".into(),
        source: SourceAddress {
            address: "192.0.2.10".parse().unwrap(),
            hostname: "mta1.example.org".into(),
        },
        listen: Listen {
            lmtp: "/run/securemail/lmtp.sock".into(),
            admin: "127.0.0.1:0".parse().unwrap(),
        },
        signing: Vec::new(),
        tls_policy: TlsPolicySpec::default(),
        warmup: WarmupCaps {
            day: None,
            daily_limit: None,
            provider_shares: ProviderShares::default(),
        },
        evidence: EvidenceSettings {
            dir: "/var/lib/securemail/evidence".into(),
            retention_days: 1,
        },
        state_dir: "/var/lib/securemail/state".into(),
        max_message_bytes: 1024,
        dns: DnsSettings::default(),
        postfix_queue_dir: queue_dir.map(Path::to_owned),
        provider_suffixes: Vec::new(),
        pool_addresses: Vec::new(),
        egress: Egress::Direct,
    }
}

/// Today's counts as the delivery engine's metrics would report them.
fn delivery_day(date: jiff::civil::Date) -> DeliveryDay {
    DeliveryDay {
        date,
        providers: [(
            Provider::Gmail,
            ResultCounts {
                delivered: 3,
                deferred: 1,
                bounced: 0,
            },
        )]
        .into(),
    }
}

struct Running {
    addr: SocketAddr,
    readiness: Readiness,
    config: watch::Sender<Arc<SidecarConfig>>,
    shutdown: CancellationToken,
    server: JoinHandle<securemail_sidecar::Result<()>>,
}

/// Serves `registry` with the sidecar's own metrics added, as `run` does.
async fn start(queue_dir: Option<&Path>, mut registry: Registry) -> Running {
    let (config, receiver) = watch::channel(Arc::new(config(queue_dir)));
    let readiness = Readiness::default();
    let metrics = Metrics::register(
        &mut registry,
        "tenant-a/clinic",
        "192.0.2.10".parse().unwrap(),
        Arc::new(SystemClock),
    );
    let state = AdminState {
        readiness: readiness.clone(),
        registry: Arc::new(registry),
        refresh_metrics: queue_metrics(receiver.clone(), || SystemTime::UNIX_EPOCH + NOW, metrics),
        status: with_egress(
            pod_status(
                receiver,
                || SystemTime::UNIX_EPOCH + NOW,
                || {
                    (
                        delivery_day(jiff::civil::date(2026, 11, 25)),
                        Some(delivery_day(jiff::civil::date(2026, 11, 24))),
                    )
                },
            ),
            readiness.egress.clone(),
        ),
    };
    let server = AdminServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(server.serve(state, shutdown.clone()));
    Running {
        addr,
        readiness,
        config,
        shutdown,
        server,
    }
}

#[tokio::test]
async fn livez_answers_and_readyz_follows_every_readiness_flag() {
    let running = start(None, Registry::default()).await;
    let livez = get(running.addr, "/livez").await;
    assert_eq!(livez.status, 200);

    let readyz = get(running.addr, "/readyz").await;
    assert_eq!(readyz.status, 503);
    for reason in [
        "configuration not loaded",
        "LMTP socket not listening",
        "evidence log not writable",
        "cannot send from the pool address: egress not checked yet",
    ] {
        assert!(
            readyz.body.contains(reason),
            "{reason:?} missing from {:?}",
            readyz.body
        );
    }

    running.readiness.config_loaded.set(true);
    running.readiness.lmtp_listening.set(true);
    running.readiness.egress.record(Ok(()), jiff::Timestamp::UNIX_EPOCH);
    let readyz = get(running.addr, "/readyz").await;
    assert_eq!(
        (readyz.status, readyz.body.trim()),
        (503, "not ready: evidence log not writable")
    );

    running.readiness.evidence_writable.set(true);
    assert_eq!(get(running.addr, "/readyz").await.status, 200);

    // An evidence append failed: not ready again.
    running.readiness.evidence_writable.set(false);
    assert_eq!(get(running.addr, "/readyz").await.status, 503);
    running.readiness.evidence_writable.set(true);

    // The pod lost its address: not ready, and the reason is given.
    running.readiness.egress.record(
        Err("the address is not assigned to any interface of this pod".to_owned()),
        jiff::Timestamp::UNIX_EPOCH,
    );
    let readyz = get(running.addr, "/readyz").await;
    assert_eq!(
        (readyz.status, readyz.body.trim()),
        (
            503,
            "not ready: cannot send from the pool address: the address is not assigned to any interface of this pod"
        )
    );
    assert_eq!(get(running.addr, "/nope").await.status, 404);
}

#[tokio::test]
async fn metrics_are_openmetrics_text_with_the_registered_metrics() {
    let mut registry = Registry::default();
    let counter = Counter::<u64>::default();
    registry.register(
        "securemail_config_reload_errors",
        "Refused sidecar.yaml files",
        counter.clone(),
    );
    counter.inc_by(3);
    let running = start(None, registry).await;

    let metrics = get(running.addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(metrics.content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
    assert!(
        metrics
            .body
            .contains("# TYPE securemail_config_reload_errors counter\n"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains("\nsecuremail_config_reload_errors_total 3\n"),
        "{}",
        metrics.body
    );
    assert!(metrics.body.ends_with("# EOF\n"), "{}", metrics.body);
}

#[tokio::test]
async fn status_reports_the_address_and_the_queue_and_follows_the_current_config() {
    let dir = tempfile::tempdir().unwrap();
    let queue = dir.path().join("spool");
    let deferred = queue.join("deferred/4");
    std::fs::create_dir_all(&deferred).unwrap();
    File::create(deferred.join("42F00D"))
        .unwrap()
        .set_modified(SystemTime::UNIX_EPOCH + NOW - Duration::from_secs(90))
        .unwrap();
    let running = start(Some(&queue), Registry::default()).await;
    let checked_at = jiff::Timestamp::from_second(1_790_000_000).unwrap();
    running.readiness.egress.record(
        Err("proxy 192.0.2.1:1080 sends from 192.0.2.11 instead".to_owned()),
        checked_at,
    );

    let response = get(running.addr, "/status").await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.content_type.as_deref(), Some("application/json"));
    let status: SidecarStatus = serde_json::from_str(&response.body).unwrap();
    assert_eq!(
        status,
        SidecarStatus {
            address: "192.0.2.10".parse().unwrap(),
            queue: QueueStatus {
                messages: 1,
                oldest_age_seconds: Some(90),
            },
            today: Some(delivery_day(jiff::civil::date(2026, 11, 25))),
            yesterday: Some(delivery_day(jiff::civil::date(2026, 11, 24))),
            reputation: None,
            evidence: None,
            egress: Some(EgressStatus {
                ready: false,
                reason: Some("proxy 192.0.2.1:1080 sends from 192.0.2.11 instead".to_owned()),
                checked_at,
            }),
        }
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&response.body).unwrap(),
        serde_json::json!({
            "address": "192.0.2.10",
            "queue": {"messages": 1, "oldestAgeSeconds": 90},
            "today": {
                "date": "2026-11-25",
                "providers": {"gmail": {"delivered": 3, "deferred": 1, "bounced": 0}},
            },
            "yesterday": {
                "date": "2026-11-24",
                "providers": {"gmail": {"delivered": 3, "deferred": 1, "bounced": 0}},
            },
            "egress": {
                "ready": false,
                "reason": "proxy 192.0.2.1:1080 sends from 192.0.2.11 instead",
                "checkedAt": "2026-09-21T14:13:20Z",
            },
        })
    );

    // A reload pointing at an empty queue directory is used by the next request.
    let empty = dir.path().join("empty-spool");
    std::fs::create_dir(&empty).unwrap();
    running.config.send_replace(Arc::new(config(Some(&empty))));
    let status: SidecarStatus = serde_json::from_str(&get(running.addr, "/status").await.body).unwrap();
    assert!(status.queue.is_empty());
    assert_eq!(status.queue.oldest_age_seconds, None);
}

#[tokio::test]
async fn status_is_503_with_the_reason_when_the_queue_cannot_be_counted() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(None, Registry::default()).await;
    let response = get(running.addr, "/status").await;
    assert_eq!(response.status, 503);
    assert!(
        response.body.contains("queue directory not configured"),
        "{}",
        response.body
    );

    // A queue that cannot be listed (a file stands in for a directory the sidecar may not read).
    let queue = dir.path().join("spool");
    std::fs::create_dir(&queue).unwrap();
    std::fs::write(queue.join("active"), "").unwrap();
    running.config.send_replace(Arc::new(config(Some(&queue))));
    let response = get(running.addr, "/status").await;
    assert_eq!(response.status, 503);
    assert!(
        response.body.contains(queue.join("active").to_str().unwrap()),
        "{}",
        response.body
    );

    // A queue directory that is not mounted is not an empty queue.
    running
        .config
        .send_replace(Arc::new(config(Some(&dir.path().join("not-mounted")))));
    let response = get(running.addr, "/status").await;
    assert_eq!(response.status, 503);
    assert!(response.body.contains("not-mounted"), "{}", response.body);
}

/// The value of the one series of `name` in a scrape, `None` when the series is absent.
fn series(body: &str, name: &str) -> Option<String> {
    let prefix = format!("{name}{{tenant=\"tenant-a/clinic\",source_ip=\"192.0.2.10\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(str::to_owned)
}

#[tokio::test]
async fn each_scrape_counts_the_queue_and_a_failed_count_is_absent_never_zero() {
    let dir = tempfile::tempdir().unwrap();
    let queue = dir.path().join("spool");
    let deferred = queue.join("deferred/4");
    std::fs::create_dir_all(&deferred).unwrap();
    File::create(deferred.join("42F00D"))
        .unwrap()
        .set_modified(SystemTime::UNIX_EPOCH + NOW - Duration::from_secs(5400))
        .unwrap();
    let running = start(Some(&queue), Registry::default()).await;
    let scrape = || async { get(running.addr, "/metrics").await.body };

    let body = scrape().await;
    assert_eq!(
        series(&body, "securemail_queue_messages").as_deref(),
        Some("1"),
        "{body}"
    );
    assert_eq!(
        series(&body, "securemail_queue_oldest_message_age_seconds").as_deref(),
        Some("5400"),
        "{body}"
    );
    assert_eq!(
        series(&body, "securemail_queue_scan_failures_total").as_deref(),
        Some("0"),
        "{body}"
    );

    // A message queued since the last scrape shows in the next one.
    File::create(queue.join("deferred/4/43F00D")).unwrap();
    let body = scrape().await;
    assert_eq!(
        series(&body, "securemail_queue_messages").as_deref(),
        Some("2"),
        "{body}"
    );

    // A queue the sidecar cannot list: unknown, not empty.
    let unreadable = dir.path().join("unreadable-spool");
    std::fs::create_dir(&unreadable).unwrap();
    std::fs::write(unreadable.join("active"), "").unwrap();
    running.config.send_replace(Arc::new(config(Some(&unreadable))));
    let body = scrape().await;
    assert_eq!(series(&body, "securemail_queue_messages"), None, "{body}");
    assert_eq!(
        series(&body, "securemail_queue_oldest_message_age_seconds"),
        None,
        "{body}"
    );
    assert_eq!(
        series(&body, "securemail_queue_scan_failures_total").as_deref(),
        Some("1"),
        "{body}"
    );

    // So is a queue directory missing from the configuration.
    running.config.send_replace(Arc::new(config(None)));
    let body = scrape().await;
    assert_eq!(series(&body, "securemail_queue_messages"), None, "{body}");
    assert_eq!(
        series(&body, "securemail_queue_scan_failures_total").as_deref(),
        Some("2"),
        "{body}"
    );

    // Back to a readable, empty queue: counted again, the oldest age 0.
    let empty = dir.path().join("empty-spool");
    std::fs::create_dir(&empty).unwrap();
    running.config.send_replace(Arc::new(config(Some(&empty))));
    let body = scrape().await;
    assert_eq!(
        series(&body, "securemail_queue_messages").as_deref(),
        Some("0"),
        "{body}"
    );
    assert_eq!(
        series(&body, "securemail_queue_oldest_message_age_seconds").as_deref(),
        Some("0"),
        "{body}"
    );
    assert_eq!(
        series(&body, "securemail_queue_scan_failures_total").as_deref(),
        Some("2"),
        "{body}"
    );
}

#[tokio::test]
async fn shutdown_stops_the_server_and_frees_the_port() {
    let running = start(None, Registry::default()).await;
    assert_eq!(get(running.addr, "/livez").await.status, 200);
    running.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), running.server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(running.addr).await.is_err());

    let err = AdminServer::bind("192.0.2.1:9090".parse().unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("192.0.2.1:9090"), "{err}");
}

/// Records written through the sidecar's evidence writer, one per UTC time, all else fixed.
fn evidence_attempt(time: &str) -> securemail_sidecar::evidence::Attempt {
    serde_json::from_value(serde_json::json!({
        "time": time,
        "tenant": "tenant-a/clinic",
        "messageIdSha256": securemail_sidecar::evidence::Sha256Hex::of(time.as_bytes()),
        "recipientDomain": "example.net",
        "recipientCount": 1,
        "mxHost": null,
        "mxIp": null,
        "sourceIp": "192.0.2.10",
        "policy": null,
        "tls": null,
        "smtpReply": null,
        "outcome": "deferred",
    }))
    .unwrap()
}

fn run_verify(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_securemail-sidecar"))
        .args(["evidence", "verify"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8(output.stdout).unwrap() + &stderr,
    )
}

#[tokio::test]
async fn status_publishes_evidence_heads_that_evidence_verify_confirms() {
    use securemail_sidecar::evidence::{EvidenceStore, EvidenceWriter};

    let dir = tempfile::tempdir().unwrap();
    let evidence_dir = dir.path().join("evidence");
    // A closed file written before this start, read back from disk by the store.
    {
        let mut earlier = EvidenceStore::open(&evidence_dir, "2026-10-30T00:00:00Z".parse().unwrap()).unwrap();
        earlier.append_all(&[evidence_attempt("2026-10-30T08:00:00Z")]).unwrap();
        earlier.append_all(&[evidence_attempt("2026-10-31T08:00:00Z")]).unwrap();
    }
    let writer =
        EvidenceWriter::spawn(EvidenceStore::open(&evidence_dir, "2026-11-01T00:00:00Z".parse().unwrap()).unwrap())
            .unwrap();
    // November's first record starts a new file.
    writer
        .append(vec![evidence_attempt("2026-11-01T09:00:00Z")])
        .await
        .unwrap();

    let state = AdminState {
        readiness: Readiness::default(),
        registry: Arc::new(Registry::default()),
        refresh_metrics: Arc::new(|| {}),
        // Without a queue directory the queue cannot be counted: the heads are added to a source that answers.
        status: with_evidence(
            Arc::new(|| {
                Ok(SidecarStatus {
                    address: "192.0.2.10".parse().unwrap(),
                    queue: QueueStatus::default(),
                    today: None,
                    yesterday: None,
                    reputation: None,
                    egress: None,
                    evidence: None,
                })
            }),
            writer.heads(),
        ),
    };
    let server = AdminServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(server.serve(state, shutdown.clone()));

    let body = get(addr, "/status").await.body;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let heads = status["evidence"].clone();
    let files = heads["files"].as_array().unwrap().clone();
    assert_eq!(files.len(), 2, "{heads}");
    assert_eq!(heads["pruned"], serde_json::json!([]));
    let names: Vec<&str> = files.iter().map(|file| file["file"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "evidence-20261030T000000.000000000Z.jsonl",
            "evidence-20261101T090000.000000000Z.jsonl"
        ]
    );
    assert_eq!(files[0]["firstRecordTime"], "2026-10-30T08:00:00Z");
    assert_eq!(files[0]["lastRecordTime"], "2026-10-31T08:00:00Z");
    // Each head is exactly what verifying the file alone reports.
    for file in &files {
        let path = evidence_dir.join(file["file"].as_str().unwrap());
        let (code, output) = run_verify(&[path.as_os_str()]);
        assert_eq!(code, 0, "{output}");
        assert_eq!(
            output,
            format!(
                "ok: {} records, last hash {}\n",
                file["records"],
                file["lastHash"].as_str().unwrap()
            )
        );
    }

    // The operator keeps the object as it came; the directory verifies against it, also after more appends.
    let heads_path = dir.path().join("heads.json");
    std::fs::write(&heads_path, serde_json::to_vec(&heads).unwrap()).unwrap();
    writer
        .append(vec![evidence_attempt("2026-11-01T10:00:00Z")])
        .await
        .unwrap();
    let (code, output) = run_verify(&[
        std::ffi::OsStr::new("--heads"),
        heads_path.as_os_str(),
        evidence_dir.as_os_str(),
    ]);
    assert_eq!(code, 0, "{output}");

    // The current file's head follows every append.
    let later: SidecarStatus = serde_json::from_str(&get(addr, "/status").await.body).unwrap();
    let later = later.evidence.unwrap();
    assert_eq!(later.files[1].records, 2);
    assert_eq!(
        later.files[1].last_record_time,
        Some("2026-11-01T10:00:00Z".parse().unwrap())
    );
    assert_ne!(later.files[1].last_hash, files[1]["lastHash"].as_str().unwrap());

    shutdown.cancel();
    served.await.unwrap().unwrap();
}
