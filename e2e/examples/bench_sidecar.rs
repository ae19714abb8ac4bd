//! Sidecar benchmark (`make bench-sidecar`, started by `e2e/bench-sidecar.sh` inside a data-plane world it owns):
//! N messages of 10 KB to one TLS 1.3 receiver, first Postfix → LMTP → sidecar (DKIM RSA-2048, verified TLS) as
//! `MtaHost` starts them from the operator's render, then the anchor: a Postfix with the same rendered main.cf
//! and submission listener whose transport is Postfix's own `smtp` client (TLS `verify` against the test CA).
//! Both get the same submissions (bench_submit.py). Prints messages/s, p50/p99 latency, sidecar CPU per message,
//! the whole path's CPU per message against Postfix direct's, and the sidecar's RSS with 500 LMTP sessions open. Panics (non-zero exit) when the run itself breaks.
//! Usage: bench_sidecar [N]   (default 2000; needs SECUREMAIL_DATAPLANE_DIR, SECUREMAIL_{OPERATOR,SIDECAR}_BIN)
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "benchmark: a panic is the failure report"
)]

use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use securemail_e2e::dataplane::{
    MtaHost, World, cpu_seconds, in_netns, json_report, process_times, run_ok, status_kib, tenant_manifest, wait_until,
};
use securemail_e2e::repo_root;

const SENDER: &str = "alerts@sender.test";
const MESSAGE_BYTES: usize = 10 * 1024;
const SUBMIT_CONNECTIONS: usize = 8;
/// Messages each path delivers before the measured run: handshakes, policy cache, Postfix process pools.
const WARMUP_MESSAGES: usize = 40;
const SESSIONS: usize = 500;

/// The tenant of the data-plane suites (verified TLS, defer on failure), with a warmup schedule high enough that
/// caps never decide a benchmark.
fn manifest(world: &World) -> String {
    tenant_manifest(
        world,
        "bench",
        "    warmup:\n      schedule:\n        - day: 1\n          dailyLimit: 10000000\n",
        "    onFailure: defer\n",
    )
}

/// Where the receiver of `good.plain.test` delivers.
fn maildir(world: &World) -> PathBuf {
    let receiver = world.get("SMDP_CASE_GOOD_RX").to_ascii_uppercase().replace('-', "_");
    PathBuf::from(world.get(&format!("SMDP_RX_{receiver}_MAILDIR"))).join("new")
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir).map(|entries| entries.count()).unwrap_or(0)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A Postfix submission listener to submit to: its address and the TLS material of the rendered tenant.
struct Submitter<'a> {
    netns: &'a str,
    address: String,
    tls: PathBuf,
    recipient: String,
}

impl Submitter<'_> {
    /// Submits `count` messages tagged `tag`; returns the unix times of the first connection and of the last
    /// message accepted.
    fn submit(&self, tag: &str, count: usize) -> (f64, f64) {
        let tls = &self.tls;
        let output = in_netns(self.netns, "python3")
            .arg(repo_root().join("e2e/dataplane/bench_submit.py"))
            .args(["--host", &self.address, "--port", "587", "--from", SENDER])
            .args(["--to", &self.recipient, "--tag", tag])
            .args(["--count", &count.to_string()])
            .args(["--connections", &SUBMIT_CONNECTIONS.to_string()])
            .args(["--size", &MESSAGE_BYTES.to_string()])
            .arg("--ca")
            .arg(tls.join("server-ca.crt"))
            .arg("--cert")
            .arg(tls.join("client.crt"))
            .arg("--key")
            .arg(tls.join("client.key"))
            .output()
            .expect("run bench_submit.py");
        let report = json_report(&output, "bench_submit.py");
        assert!(output.status.success(), "submission failed: {report}");
        (
            report["start"].as_f64().expect("start time"),
            report["end"].as_f64().expect("end time"),
        )
    }
}

/// One measured path.
struct Phase {
    wall: f64,
    /// Seconds the submitter took to hand over every message.
    submit: f64,
    latencies: Vec<f64>,
    tls13: usize,
    dkim_signed: usize,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.wall
    }

    fn latency(&self, q: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
    }
}

/// Submits `count` messages, waits until all of them are in the receiver's Maildir and reads each one's
/// submission time (its header) and arrival time (its file's mtime).
fn run_phase(world: &World, submitter: &Submitter<'_>, tag: &str, count: usize, context: &dyn Fn() -> String) -> Phase {
    let new = maildir(world);
    let before = count_files(&new);
    let (submit_start, submit_end) = submitter.submit(tag, count);
    let timeout = Duration::from_secs(300 + count as u64 / 5);
    wait_until(
        timeout,
        &format!("{count} messages tagged {tag} in {}", new.display()),
        || count_files(&new) >= before + count,
        || format!("{} of {count} arrived\n{}", count_files(&new) - before, context()),
    );
    let needle = format!("<{tag}.");
    let (mut latencies, mut last, mut tls13, mut dkim_signed) = (Vec::new(), 0.0_f64, 0, 0);
    for entry in fs::read_dir(&new).expect("read Maildir").flatten() {
        let text = fs::read_to_string(entry.path()).unwrap_or_default();
        if !text.contains(&needle) {
            continue;
        }
        let metadata = entry.metadata().expect("stat a delivered message");
        let arrived = metadata.mtime() as f64 + metadata.mtime_nsec() as f64 / 1e9;
        let submitted: f64 = text
            .lines()
            .find_map(|line| line.strip_prefix("X-Bench-Submitted: "))
            .and_then(|value| value.trim().parse().ok())
            .expect("every benchmark message carries X-Bench-Submitted");
        latencies.push(arrived - submitted);
        last = last.max(arrived);
        tls13 += usize::from(text.contains("using TLSv1.3"));
        dkim_signed += usize::from(text.contains("DKIM-Signature:") && text.contains("a=rsa-sha256"));
    }
    assert_eq!(latencies.len(), count, "each message arrived exactly once ({tag})");
    Phase {
        wall: last - submit_start,
        submit: submit_end - submit_start,
        latencies,
        tls13,
        dkim_signed,
    }
}

/// Reads one (possibly multi-line) reply and returns its code.
fn reply(reader: &mut BufReader<UnixStream>) -> u16 {
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read an LMTP reply");
        assert!(line.len() >= 4, "short LMTP reply {line:?}");
        if line.as_bytes()[3] != b'-' {
            return line[..3].parse().expect("reply code");
        }
    }
}

/// Opens `count` LMTP sessions on `socket`, each left waiting for DATA after LHLO, MAIL and RCPT.
fn open_sessions(socket: &Path, count: usize, recipient: &str) -> Vec<BufReader<UnixStream>> {
    (0..count)
        .map(|n| {
            let stream = UnixStream::connect(socket).expect("connect to the LMTP socket");
            stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut session = BufReader::new(stream);
            assert_eq!(reply(&mut session), 220, "greeting of session {n}");
            for (command, code) in [
                ("LHLO bench.test".to_owned(), 250),
                (format!("MAIL FROM:<{SENDER}>"), 250),
                (format!("RCPT TO:<{recipient}>"), 250),
            ] {
                session
                    .get_mut()
                    .write_all(format!("{command}\r\n").as_bytes())
                    .unwrap();
                assert_eq!(reply(&mut session), code, "{command} in session {n}");
            }
            session
        })
        .collect()
}

/// The anchor: a Postfix with the tenant's rendered main.cf and master.cf (same submission listener, queue and
/// retry settings) whose transport is its own SMTP client with verified TLS. Stopped on drop.
struct DirectPostfix {
    conf: PathBuf,
    log: PathBuf,
    netns: String,
    child: Child,
}

impl DirectPostfix {
    fn start(world: &World, rendered_conf: &Path, netns: &str, address: &str) -> Self {
        let dir = world.dir.join("direct");
        let _ = fs::remove_dir_all(&dir);
        let conf = dir.join("conf");
        for sub in ["conf", "queue", "data"] {
            fs::create_dir_all(dir.join(sub)).expect("direct Postfix directories");
        }
        fs::copy(rendered_conf.join("main.cf"), conf.join("main.cf")).expect("copy main.cf");
        let mut master = fs::read_to_string(rendered_conf.join("master.cf")).expect("read master.cf");
        master.push_str(
            "smtp       unix       -       -      n      -      -       smtp\n\
             tlsproxy   unix       -       -      n      -      0       tlsproxy\n",
        );
        fs::write(conf.join("master.cf"), master).expect("write master.cf");
        run_ok(Command::new("postconf").arg("-c").arg(&conf).args([
            "-e",
            &format!("queue_directory={}", dir.join("queue").display()),
            &format!("data_directory={}", dir.join("data").display()),
            "default_transport=smtp",
            "relay_transport=smtp",
            "virtual_transport=smtp",
            "smtp_tls_security_level=verify",
            &format!("smtp_tls_CAfile={}", world.get("SMDP_CA_FILE")),
            "smtp_tls_protocols=>=TLSv1.2",
            "smtp_tls_mandatory_protocols=>=TLSv1.2",
            // Several deliveries per TLS connection, as the sidecar's session pool does.
            "smtp_tls_connection_reuse=yes",
            "smtp_tls_loglevel=1",
        ]));
        run_ok(Command::new("chown").arg("postfix").arg(dir.join("data")));
        let log_path = dir.join("maillog");
        let log = fs::File::create(&log_path).expect("maillog");
        let child = in_netns(netns, "postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start-fg")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the direct Postfix");
        wait_until(
            Duration::from_secs(30),
            "the direct Postfix's submission listener",
            || {
                in_netns(netns, "bash")
                    .args(["-c", &format!("exec 3<>/dev/tcp/{address}/587")])
                    .stderr(Stdio::null())
                    .output()
                    .is_ok_and(|output| output.status.success())
            },
            || fs::read_to_string(&log_path).unwrap_or_default(),
        );
        Self {
            conf,
            log: log_path,
            netns: netns.to_owned(),
            child,
        }
    }

    fn maillog(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DirectPostfix {
    fn drop(&mut self) {
        let _ = in_netns(&self.netns, "postfix")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .output();
        let _ = self.child.wait();
    }
}

/// CPU seconds the Postfix instance with queue directory `queue` has used so far: its master, the daemons running
/// now, and (the master's child times) the daemons that exited, which the master reaps. Postfix daemons start no
/// processes of their own on these paths.
fn postfix_cpu_seconds(queue: &Path) -> f64 {
    let master: u32 = fs::read_to_string(queue.join("pid/master.pid"))
        .expect("the Postfix master's pid file")
        .trim()
        .parse()
        .expect("a pid in master.pid");
    let times = process_times(master).expect("the Postfix master is running");
    let mut seconds = times.own + times.reaped_children;
    for entry in fs::read_dir("/proc").expect("list /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse().ok()) else {
            continue;
        };
        // A daemon that exits meanwhile is gone from here and counted in the master's child times next time.
        if let Some(daemon) = process_times(pid)
            && daemon.parent == master
        {
            seconds += daemon.own;
        }
    }
    seconds
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .map(|arg| arg.parse().expect("N is a number"))
        .unwrap_or(2000);
    let world = World::load();
    let netns = world.get("SMDP_MTA_NETNS").to_owned();
    let address = world.get("SMDP_MTA_ADDR").to_owned();
    let recipient = format!("patient@{}", world.get("SMDP_CASE_GOOD"));
    let run = format!("bench{}", unix_now() as u64);

    eprintln!("bench-sidecar: SecureMail path: Postfix → LMTP → sidecar → {recipient}");
    let mta = MtaHost::start(&world, "bench", &manifest(&world));
    let submitter = Submitter {
        netns: &netns,
        address: address.clone(),
        tls: mta.dir.join("tls"),
        recipient: recipient.clone(),
    };
    let pid = mta.sidecar_pid();
    let context = || {
        format!(
            "sidecar log:\n{}\nmaillog:\n{}",
            tail(&mta.sidecar_log(), 20),
            tail(&mta.maillog(), 20)
        )
    };
    let mta_queue = mta.dir.join("queue");
    run_phase(&world, &submitter, &format!("{run}-warm-sm"), WARMUP_MESSAGES, &context);
    let cpu_before = cpu_seconds(pid);
    let postfix_before = postfix_cpu_seconds(&mta_queue);
    eprintln!("bench-sidecar: {count} messages through the sidecar");
    let securemail = run_phase(&world, &submitter, &format!("{run}-sm"), count, &context);
    let cpu_per_message = (cpu_seconds(pid) - cpu_before) / count as f64;
    let postfix_per_message = (postfix_cpu_seconds(&mta_queue) - postfix_before) / count as f64;
    let queue_left = mta.queue().len();
    assert_eq!(queue_left, 0, "Postfix's queue is empty after the run");

    eprintln!("bench-sidecar: {SESSIONS} concurrent LMTP sessions");
    let idle_rss = status_kib(pid, "VmRSS");
    let sessions = open_sessions(&mta.dir.join("run/lmtp.sock"), SESSIONS, &recipient);
    std::thread::sleep(Duration::from_secs(1));
    let sessions_rss = status_kib(pid, "VmRSS");
    let peak_rss = status_kib(pid, "VmHWM");
    for mut session in sessions {
        let _ = session.get_mut().write_all(b"QUIT\r\n");
        let _ = reply(&mut session);
    }
    let rendered_conf = mta.dir.join("conf");
    drop(mta);

    eprintln!("bench-sidecar: anchor: Postfix smtp (TLS verify) → {recipient}");
    let direct = DirectPostfix::start(&world, &rendered_conf, &netns, &address);
    let direct_context = || format!("direct maillog:\n{}", tail(&direct.maillog(), 20));
    run_phase(
        &world,
        &submitter,
        &format!("{run}-warm-direct"),
        WARMUP_MESSAGES,
        &direct_context,
    );
    eprintln!("bench-sidecar: {count} messages through Postfix's smtp client");
    let direct_queue = direct.conf.with_file_name("queue");
    let direct_before = postfix_cpu_seconds(&direct_queue);
    let anchor = run_phase(&world, &submitter, &format!("{run}-direct"), count, &direct_context);
    let direct_per_message = (postfix_cpu_seconds(&direct_queue) - direct_before) / count as f64;
    drop(direct);

    assert_eq!(
        securemail.dkim_signed, count,
        "every message through the sidecar is DKIM-signed"
    );
    let ratio = securemail.rate() / anchor.rate();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "sidecar benchmark: {count} messages of {MESSAGE_BYTES} bytes to {recipient}, {SUBMIT_CONNECTIONS} submission connections"
    );
    for (name, phase) in [("Postfix direct (anchor)", &anchor), ("Postfix → sidecar", &securemail)] {
        println!(
            "{name:<24} {:>7.1} msg/s  wall {:>6.1} s (submission {:>5.1} s)  latency p50 {:>6.0} ms  p99 {:>6.0} ms  TLS 1.3 {}/{count}  DKIM {}/{count}",
            phase.rate(),
            phase.wall,
            phase.submit,
            phase.latency(0.50) * 1e3,
            phase.latency(0.99) * 1e3,
            phase.tls13,
            phase.dkim_signed,
        );
    }
    println!(
        "ratio sidecar / direct            {ratio:.2}   (target >= 0.8): {}",
        verdict(ratio >= 0.8)
    );
    println!(
        "sidecar CPU per message           {:.3} ms   (target <= 0.5 ms): {}",
        cpu_per_message * 1e3,
        verdict(cpu_per_message <= 0.0005)
    );
    println!(
        "whole path CPU per message        Postfix → sidecar {:.3} ms (Postfix {:.3} + sidecar {:.3}, DKIM signing \
         included) vs Postfix direct {:.3} ms: {:+.3} ms",
        (postfix_per_message + cpu_per_message) * 1e3,
        postfix_per_message * 1e3,
        cpu_per_message * 1e3,
        direct_per_message * 1e3,
        (postfix_per_message + cpu_per_message - direct_per_message) * 1e3,
    );
    println!(
        "sidecar RSS, {SESSIONS} LMTP sessions      {:.1} MiB   (idle {:.1} MiB, peak over the run {:.1} MiB; target <= 64 MiB): {}",
        mib(sessions_rss),
        mib(idle_rss),
        mib(peak_rss),
        verdict(mib(sessions_rss) <= 64.0)
    );
}
