//! The data-plane world started by `e2e/dataplane/up.sh` (DNSSEC-signed zones behind a validating resolver,
//! receiving MX hosts, an MTA-STS web server, each in its own network namespace) and an MTA host inside it:
//! Debian's Postfix and the sidecar, both configured from the operator's `render` output, with only the paths and
//! addresses that must differ outside a pod changed; and Debian's Prometheus scraping that sidecar with the alert
//! pack loaded.
// Test support: a step that fails is a failed test, reported with the step's description.
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_yaml::Value;

use crate::leaks::{self, Secrets};
use crate::repo_root;

/// The running world, described by `<dir>/world.env`.
#[derive(Debug)]
pub struct World {
    pub dir: PathBuf,
    vars: BTreeMap<String, String>,
}

impl World {
    /// Loads the world named by `SECUREMAIL_DATAPLANE_DIR`; panics with a hint when the suite was started without
    /// one, so a green run proves the real components were exercised.
    pub fn load() -> Self {
        let dir = match std::env::var("SECUREMAIL_DATAPLANE_DIR") {
            Ok(dir) if Path::new(&dir).join("world.env").is_file() => PathBuf::from(dir),
            _ => panic!(
                "SECUREMAIL_DATAPLANE_DIR does not name a running data-plane world; run the suite with \
                 `make e2e-dataplane`, which starts it"
            ),
        };
        let text = fs::read_to_string(dir.join("world.env")).expect("world.env is readable");
        let vars = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.trim().to_owned(), value.trim().trim_matches('"').to_owned()))
            .collect();
        Self { dir, vars }
    }

    /// A value from world.env; panics naming the key when the world does not define it.
    pub fn get(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("world.env has no {key}"))
            .as_str()
    }
}

/// A command run inside network namespace `netns`.
pub fn in_netns(netns: &str, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns, program]);
    command
}

/// `spec.ipPool.warmup` for cases that do not test warmup caps: a limit no case reaches (day 1 of a preset would
/// allow the world's receivers, provider class "other", only 10 messages).
pub const UNCAPPED_WARMUP: &str = "    warmup:\n      schedule: [{day: 1, dailyLimit: 1000000}]\n";

/// A tenant named `name` sending from the world's MTA address as `sender.test`, with `warmup` (YAML indented for
/// `spec.ipPool.warmup`, or empty) and `tls_policy` (YAML indented for `spec.tlsPolicy`).
pub fn tenant_manifest(world: &World, name: &str, warmup: &str, tls_policy: &str) -> String {
    format!(
        "apiVersion: securemail.io/v1alpha1
kind: SecureMailTenant
metadata:
  name: {name}
  namespace: e2e
spec:
  domains:
    - name: sender.test
  ipPool:
    addresses:
      - address: {address}
        hostname: {hostname}
{warmup}  submission:
    tls:
      secretName: submission-tls
    clientCertificates:
      caSecretName: apps-ca
  tlsPolicy:
{tls_policy}",
        address = world.get("SMDP_MTA_ADDR"),
        hostname = world.get("SMDP_MTA_HOSTNAME"),
    )
}

/// Runs `command`, panics with its output unless it succeeds, and returns its stdout.
/// Runs `command` with `input` on its standard input and returns what it printed, whatever its exit status.
pub fn output_with_input(command: &mut Command, input: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .unwrap_or_else(|err| panic!("cannot write to {command:?}: {err}"));
    child
        .wait_with_output()
        .unwrap_or_else(|err| panic!("{command:?}: {err}"))
}

/// The JSON report `program` printed, or a panic showing what it printed instead.
pub fn json_report(output: &Output, program: &str) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "{program} printed no JSON ({err}):\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

pub fn run_ok(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    assert_success(command, &output);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_success(command: &Command, output: &Output) {
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Polls `condition` every 100 ms for up to `timeout`; panics with `what` and `context()` if it never holds.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", context());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` exists and has not exited (a zombie has released everything it held).
pub fn process_alive(pid: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses and may contain spaces.
            let state = stat.rsplit_once(')')?.1.split_whitespace().next()?.to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// What `/proc/PID/stat` says of a process's CPU use, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct ProcessTimes {
    pub parent: u32,
    /// User + system time of the process itself.
    pub own: f64,
    /// User + system time of its children that exited and were reaped.
    pub reaped_children: f64,
}

/// The CPU times of process `pid`; `None` once it is gone.
pub fn process_times(pid: u32) -> Option<ProcessTimes> {
    static TICKS_PER_SECOND: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let per_second = *TICKS_PER_SECOND.get_or_init(|| {
        run_ok(Command::new("getconf").arg("CLK_TCK"))
            .trim()
            .parse()
            .expect("CLK_TCK is a number")
    });
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: ppid is field 4 of the whole line, utime, stime, cutime and
    // cstime are fields 14 to 17.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let field = |index: usize| -> Option<u64> { fields.get(index)?.parse().ok() };
    let seconds = |first: usize| Some((field(first)? + field(first + 1)?) as f64 / per_second);
    Some(ProcessTimes {
        parent: u32::try_from(field(1)?).ok()?,
        own: seconds(11)?,
        reaped_children: seconds(13)?,
    })
}

/// User + system CPU seconds process `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    process_times(pid).expect("/proc/PID/stat of a running process").own
}

/// A `kB` value of process `pid`'s `/proc/PID/status`, e.g. `VmRSS` or `VmHWM` (peak RSS).
pub fn status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status")
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no {key}"))
}

/// The sum of every sample of `family` in the OpenMetrics text `text` whose labels contain all of `labels`
/// (e.g. `result="delivered"`).
pub fn metric_sum(text: &str, family: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(family) && !line.starts_with('#'))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How a test application submits.
#[derive(Debug, Default, Clone, Copy)]
pub struct Submission {
    /// MAIL FROM without STARTTLS first.
    pub without_tls: bool,
    /// STARTTLS without presenting the application's client certificate.
    pub without_client_certificate: bool,
    /// The message is sent after DATA byte for byte and must end with its own end-of-data marker.
    pub raw: bool,
    /// Connect from this address of the MTA's namespace (see [`MtaHost::add_client_address`]) instead of the one the
    /// kernel picks (the MTA's own).
    pub source: Option<&'static str>,
    /// EHLO with this name instead of `app.test`.
    pub helo: Option<&'static str>,
}

/// The sending side of one tenant: Postfix accepting submissions on the pool address and the sidecar delivering
/// from it, both inside the world's MTA namespace. Stopped on drop.
#[derive(Debug)]
pub struct MtaHost {
    pub dir: PathBuf,
    pub netns: String,
    pub address: IpAddr,
    pub sidecar_config: PathBuf,
    /// The DKIM TXT records the tenant must publish, as rendered: (name, value).
    pub dkim_records: Vec<(String, String)>,
    sidecar: Option<Child>,
    postfix: Option<Child>,
    /// Every recipient submitted, whose local parts the sidecar must never write down.
    recipients: Mutex<BTreeSet<String>>,
    /// The mount point of the sidecar's state volume, when it has one of its own.
    volume: Option<PathBuf>,
    /// The set clock the sidecar runs on (days after the suites' set day, [`crate::clock`]), or the real clock.
    days_after_set_day: Option<u32>,
}

impl MtaHost {
    /// Renders `manifest` with the operator binary and starts Postfix and the sidecar from the result.
    pub fn start(world: &World, label: &str, manifest: &str) -> Self {
        Self::start_with_state_volume(world, label, manifest, None)
    }

    /// The same, with the sidecar's state and evidence directories on a tmpfs of `size` (e.g. `1m`) when given, as
    /// on a small state volume in the pod; see [`MtaHost::volume`].
    pub fn start_with_state_volume(world: &World, label: &str, manifest: &str, size: Option<&str>) -> Self {
        let dir = world.dir.join(format!("mta-{label}"));
        let volume_dir = dir.join("volume");
        // A mount left by an earlier run that died would survive remove_dir_all.
        let _ = Command::new("umount").arg(&volume_dir).output();
        let _ = fs::remove_dir_all(&dir);
        for sub in ["conf", "queue", "data", "keys", "tls", "run"] {
            fs::create_dir_all(dir.join(sub)).expect("scratch directory");
        }
        let volume = size.map(|size| {
            fs::create_dir_all(&volume_dir).expect("volume mount point");
            run_ok(
                Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
                    .arg(&volume_dir),
            );
            volume_dir.clone()
        });
        for sub in ["state", "evidence"] {
            match &volume {
                Some(volume) => {
                    fs::create_dir(volume.join(sub)).expect("directory on the state volume");
                    run_ok(Command::new("chown").arg("postfix:postfix").arg(volume.join(sub)));
                    std::os::unix::fs::symlink(volume.join(sub), dir.join(sub)).expect("link to the state volume");
                }
                None => fs::create_dir_all(dir.join(sub)).expect("scratch directory"),
            }
        }
        let netns = world.get("SMDP_MTA_NETNS").to_owned();
        let address: IpAddr = world
            .get("SMDP_MTA_ADDR")
            .parse()
            .expect("SMDP_MTA_ADDR is an IP address");
        fs::write(dir.join("tenant.yaml"), manifest).expect("write manifest");
        make_dkim_keys(&dir.join("keys"), manifest);
        make_submission_certificates(&dir.join("tls"));

        let rendered = run_ok(
            Command::new(operator_bin())
                .args(["render", "-f"])
                .arg(dir.join("tenant.yaml"))
                .arg("--keys-dir")
                .arg(dir.join("keys")),
        );
        let config_map = rendered_config_map(&rendered);
        let file = |name: &str| {
            config_map["data"][name]
                .as_str()
                .unwrap_or_else(|| panic!("rendered ConfigMap has no {name}"))
                .to_owned()
        };
        let dkim_records = rendered_dkim_records(&rendered);

        let conf = dir.join("conf");
        fs::write(conf.join("main.cf"), file("main.cf")).expect("write main.cf");
        let master_cf = file("master.cf");
        assert_eq!(master_cf.lines().filter(|line| line.starts_with("587 ")).count(), 1);
        fs::write(
            conf.join("master.cf"),
            master_cf.replace("\n587 ", &format!("\n{address}:587 ")),
        )
        .expect("write master.cf");
        let socket = dir.join("run/lmtp.sock");
        let transport = format!("lmtp:unix:{}", socket.display());
        let tls = dir.join("tls");
        run_ok(Command::new("postconf").arg("-c").arg(&conf).args([
            "-e",
            &format!("queue_directory={}", dir.join("queue").display()),
            &format!("data_directory={}", dir.join("data").display()),
            &format!(
                "smtpd_tls_chain_files={},{}",
                tls.join("server.key").display(),
                tls.join("server.crt").display()
            ),
            &format!("smtpd_tls_CAfile={}", tls.join("client-ca.crt").display()),
            &format!("default_transport={transport}"),
            &format!("relay_transport={transport}"),
            &format!("virtual_transport={transport}"),
            // Retries within seconds rather than Postfix's minutes (the pod's configuration has no pickup
            // service, so `postqueue -f` cannot ask for them).
            "queue_run_delay=3s",
            "minimal_backoff_time=3s",
            "maximal_backoff_time=10s",
        ]));
        run_ok(Command::new("chown").arg("postfix").arg(dir.join("data")));

        let sidecar_config = dir.join("sidecar.yaml");
        fs::write(
            &sidecar_config,
            sidecar_yaml_for_host(&file("sidecar-0.yaml"), world, &dir, address),
        )
        .expect("write sidecar.yaml");
        // The sidecar runs as Postfix's mail_owner, as in the MTA pod: that alone lets it count the queue's 0700
        // subdirectories; it needs no other privilege.
        for owned in ["keys", "state", "evidence", "run"] {
            run_ok(
                Command::new("chown")
                    .args(["-R", "postfix:postfix"])
                    .arg(dir.join(owned)),
            );
        }

        let mut host = Self {
            dir,
            netns,
            address,
            sidecar_config,
            dkim_records,
            sidecar: None,
            postfix: None,
            recipients: Mutex::default(),
            volume,
            days_after_set_day: None,
        };
        host.start_sidecar(world);
        host.start_postfix();
        host
    }

    /// Starts (or restarts) the sidecar and waits for its LMTP socket; a restart keeps the clock it ran on.
    pub fn start_sidecar(&mut self, world: &World) {
        let env = self
            .days_after_set_day
            .map(crate::clock::set_clock_env)
            .unwrap_or_default();
        self.launch_sidecar(world, &env);
    }

    /// Restarts the sidecar with its wall clock on the suites' set clock (noon UTC of the run's day,
    /// [`crate::clock`]) `days` later, as if it ran on that UTC day; for the cases that count per day, which must not
    /// see the real date change under them.
    pub fn restart_sidecar_on_set_day(&mut self, world: &World, days: u32) {
        self.kill_sidecar();
        self.days_after_set_day = Some(days);
        self.start_sidecar(world);
    }

    fn launch_sidecar(&mut self, world: &World, env: &[(&'static str, String)]) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("sidecar.log"))
            .expect("sidecar log");
        let socket = self.dir.join("run/lmtp.sock");
        let _ = fs::remove_file(&socket);
        // `env` after `setpriv` puts `env`'s variables (LD_PRELOAD) on the sidecar alone: preloaded into `ip` and
        // `setpriv`, libfaketime would leave shared state as root that the sidecar's user cannot open.
        let child = in_netns(&self.netns, "setpriv")
            .args(["--reuid=postfix", "--regid=postfix", "--init-groups", "env"])
            .args(env.iter().map(|(name, value)| format!("{name}={value}")))
            .arg(sidecar_bin())
            .args(["run", "--config"])
            .arg(&self.sidecar_config)
            .env("SSL_CERT_FILE", world.get("SMDP_CA_FILE"))
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start the sidecar");
        self.sidecar = Some(child);
        wait_until(
            Duration::from_secs(30),
            "the sidecar's LMTP socket",
            || socket.exists(),
            || self.sidecar_log(),
        );
    }

    /// The running sidecar's pid: `ip netns exec`, `setpriv` and `env` exec it, so it is the child's.
    pub fn sidecar_pid(&self) -> u32 {
        self.sidecar.as_ref().map(Child::id).expect("the sidecar is running")
    }

    /// Adds recipients submitted other than by [`MtaHost::submit`] (e.g. in bulk) to those whose local parts must
    /// never be in what the sidecar writes (checked when the host stops).
    pub fn note_recipients<'a>(&self, recipients: impl IntoIterator<Item = &'a str>) {
        self.recipients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(recipients.into_iter().map(str::to_owned));
    }

    /// Kills the sidecar without warning (SIGKILL), as a crash would.
    pub fn kill_sidecar(&mut self) {
        if let Some(mut child) = self.sidecar.take() {
            // `ip netns exec`, `setpriv` and `env` exec the sidecar, so the child's pid is the sidecar's.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The mount point of the sidecar's own state volume (holding `state/` and `evidence/`), if it has one.
    pub fn volume(&self) -> Option<&Path> {
        self.volume.as_deref()
    }

    /// Kills Postfix without warning (SIGKILL to the master and every process it started at once), as a crash of
    /// the MTA container would.
    pub fn kill_postfix(&mut self) {
        let pid_file = self.dir.join("queue/pid/master.pid");
        if let Ok(text) = fs::read_to_string(&pid_file) {
            let master = text.trim().to_owned();
            // Stopped first, the master cannot start a process that the kill would miss.
            let _ = Command::new("kill").args(["-STOP", &master]).output();
            let children = Command::new("pgrep")
                .args(["-P", &master])
                .output()
                .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
                .unwrap_or_default();
            let pids: Vec<&str> = std::iter::once(master.as_str())
                .chain(children.split_whitespace())
                .collect();
            let _ = Command::new("kill").arg("-KILL").args(&pids).output();
            // Their listening sockets must be gone before a new master binds the same ports.
            wait_until(
                Duration::from_secs(30),
                "the killed Postfix processes to exit",
                || pids.iter().all(|pid| !process_alive(pid)),
                || format!("Postfix processes {pids:?}"),
            );
        }
        if let Some(mut child) = self.postfix.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Postfix as [`MtaHost::start`] does (`postfix start-fg`) and waits for its submission listener; its
    /// log is appended to `maillog`.
    pub fn start_postfix(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("maillog"))
            .expect("maillog");
        // postsuper reopens `maillog_file = /dev/stdout` as the postfix user when it has something to report, e.g.
        // a half-written queue file left by a kill; a log only root may write makes that a fatal start-up error.
        run_ok(Command::new("chown").arg("postfix").arg(self.dir.join("maillog")));
        let child = in_netns(&self.netns, "postfix")
            .arg("-c")
            .arg(self.dir.join("conf"))
            .arg("start-fg")
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start Postfix");
        self.postfix = Some(child);
        let address = self.address;
        let netns = self.netns.clone();
        wait_until(
            Duration::from_secs(30),
            "Postfix's submission listener",
            || {
                in_netns(&netns, "bash")
                    .args(["-c", &format!("exec 3<>/dev/tcp/{address}/587")])
                    .output()
                    .is_ok_and(|output| output.status.success())
            },
            || self.maillog(),
        );
    }

    pub fn maillog(&self) -> String {
        fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    pub fn sidecar_log(&self) -> String {
        fs::read_to_string(self.dir.join("sidecar.log")).unwrap_or_default()
    }

    /// Submits one message on 587 as a tenant application does: STARTTLS and the application's client
    /// certificate. Returns submit.py's JSON report.
    pub fn submit(&self, from: &str, to: &[&str], message: &[u8]) -> serde_json::Value {
        self.submit_with(from, to, message, Submission::default())
    }

    /// Submits one message the way `how` says (see `Submission`).
    pub fn submit_with(&self, from: &str, to: &[&str], message: &[u8], how: Submission) -> serde_json::Value {
        let tls = self.dir.join("tls");
        let mut command = in_netns(&self.netns, "python3");
        command
            .arg(repo_root().join("e2e/dataplane/submit.py"))
            .args(["--host", &self.address.to_string(), "--port", "587", "--from", from])
            .arg("--ca")
            .arg(tls.join("server-ca.crt"));
        if !how.without_client_certificate {
            command
                .arg("--cert")
                .arg(tls.join("client.crt"))
                .arg("--key")
                .arg(tls.join("client.key"));
        }
        if how.without_tls {
            command.arg("--no-tls");
        }
        if how.raw {
            command.arg("--raw");
        }
        if let Some(source) = how.source {
            command.args(["--source", source]);
        }
        if let Some(helo) = how.helo {
            command.args(["--helo", helo]);
        }
        for recipient in to {
            command.args(["--to", recipient]);
        }
        self.recipients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(to.iter().map(|recipient| (*recipient).to_owned()));
        json_report(&output_with_input(&mut command, message), "submit.py")
    }

    /// Gives the MTA's namespace `address` (on its loopback) for a submitting client to connect from, as an
    /// application pod connects from its own pod address; removed again when the returned guard drops. Connections
    /// that do not ask for it never leave from it: it is on no interface with a route out.
    pub fn add_client_address(&self, address: &str) -> ClientAddress {
        run_ok(in_netns(&self.netns, "ip").args(["addr", "replace", &format!("{address}/32"), "dev", "lo"]));
        ClientAddress {
            netns: self.netns.clone(),
            address: address.to_owned(),
        }
    }

    /// Messages in Postfix's queue (`postqueue -j`), one JSON object each.
    pub fn queue(&self) -> Vec<serde_json::Value> {
        let listing = run_ok(
            in_netns(&self.netns, "postqueue")
                .arg("-c")
                .arg(self.dir.join("conf"))
                .arg("-j"),
        );
        // showq walks the queue directories one after another, so a message moving between them (active to
        // deferred) during the walk is listed twice: one entry per queue id.
        let mut seen = BTreeSet::new();
        listing
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("postqueue -j prints JSON lines"))
            .filter(|entry| seen.insert(entry["queue_id"].as_str().unwrap_or_default().to_owned()))
            .collect()
    }

    /// The sidecar's evidence records, parsed.
    pub fn evidence(&self) -> Vec<serde_json::Value> {
        let mut records = Vec::new();
        let Ok(entries) = fs::read_dir(self.dir.join("evidence")) else {
            return records;
        };
        let mut files: Vec<PathBuf> = entries.filter_map(|entry| entry.ok().map(|e| e.path())).collect();
        files.sort();
        for file in files {
            let text = fs::read_to_string(&file).unwrap_or_default();
            records.extend(
                text.lines()
                    .map(|line| serde_json::from_str(line).expect("evidence lines are JSON")),
            );
        }
        records
    }

    /// The evidence log files, for `securemail-sidecar evidence verify`.
    pub fn evidence_files(&self) -> Vec<PathBuf> {
        fs::read_dir(self.dir.join("evidence"))
            .map(|entries| entries.filter_map(|entry| entry.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }

    /// GET `path` from the sidecar's admin server.
    pub fn admin_get(&self, path: &str) -> String {
        run_ok(&mut self.admin_request(path))
    }

    fn admin_request(&self, path: &str) -> Command {
        let mut command = in_netns(&self.netns, "curl");
        command.args([
            "-sS",
            "--max-time",
            "10",
            &format!("http://{}:9090{path}", self.address),
        ]);
        command
    }
}

impl MtaHost {
    /// What the sidecar wrote (log, evidence, and while it runs, metrics and `/status`), with what must not be in it:
    /// the local parts of every recipient submitted and the private keys this host holds (DKIM and TLS).
    fn written_and_secrets(&self) -> (Secrets, Vec<(String, String)>) {
        let mut secrets = Secrets::default();
        for recipient in self
            .recipients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            secrets.add_local_part(recipient);
        }
        for file in files_under(&self.dir) {
            if let Ok(text) = fs::read_to_string(&file)
                && text.contains("PRIVATE KEY-----")
            {
                secrets.add_private_keys(&file.display().to_string(), &text);
            }
        }
        let mut sources = vec![("sidecar log".to_owned(), self.sidecar_log())];
        for file in self.evidence_files() {
            sources.push((
                file.display().to_string(),
                fs::read_to_string(&file).unwrap_or_default(),
            ));
        }
        if self.sidecar.is_some() {
            for path in ["/metrics", "/status"] {
                if let Ok(output) = self.admin_request(path).output() {
                    sources.push((
                        format!("sidecar {path}"),
                        String::from_utf8_lossy(&output.stdout).into_owned(),
                    ));
                }
            }
        }
        (secrets, sources)
    }
}

/// An address added to the MTA's namespace for submitting clients (see [`MtaHost::add_client_address`]).
#[derive(Debug)]
pub struct ClientAddress {
    netns: String,
    address: String,
}

impl Drop for ClientAddress {
    fn drop(&mut self) {
        let _ = in_netns(&self.netns, "ip")
            .args(["addr", "del", &format!("{}/32", self.address), "dev", "lo"])
            .output();
    }
}

/// Every file below `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(path),
                Ok(kind) if kind.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    files
}

impl Drop for MtaHost {
    fn drop(&mut self) {
        let sweep = (!std::thread::panicking()).then(|| self.written_and_secrets());
        let _ = in_netns(&self.netns, "postfix")
            .arg("-c")
            .arg(self.dir.join("conf"))
            .arg("stop")
            .output();
        if let Some(mut postfix) = self.postfix.take() {
            let _ = postfix.wait();
        }
        self.kill_sidecar();
        if let Some(volume) = &self.volume {
            let _ = Command::new("umount").arg("--lazy").arg(volume).output();
        }
        // Checked once everything is stopped, so a finding does not leave processes behind.
        if let Some((secrets, sources)) = sweep {
            leaks::assert_none_in(&secrets, &sources);
        }
    }
}

/// The alert pack's rule file with every `for:` duration replaced by `duration`, line for line: the expressions,
/// labels and annotations stay exactly as shipped, only the time an alert must hold before it fires shrinks.
pub fn rules_with_for(shipped: &str, duration: &str) -> String {
    let mut rewritten: String = shipped
        .lines()
        .map(|line| {
            let indent = line.len() - line.trim_start().len();
            if line.trim_start().starts_with("for: ") {
                format!("{}for: {duration}", &line[..indent])
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    if shipped.ends_with('\n') {
        rewritten.push('\n');
    }
    rewritten
}

/// Where the test Prometheus listens: the MTA namespace's loopback, which nothing else in the world uses (the
/// sidecar's admin server is on the pool address).
pub const PROMETHEUS_ADDRESS: &str = "127.0.0.1:19090";

/// Debian's Prometheus server inside the MTA namespace, scraping one host's sidecar as job `securemail-sidecar`
/// (the name the alert pack expects) and evaluating a rule file, both every second. Stopped on drop, when its
/// TSDB is deleted too; its configuration and log stay in `dir`.
#[derive(Debug)]
pub struct PrometheusServer {
    pub dir: PathBuf,
    netns: String,
    child: Option<Child>,
}

impl PrometheusServer {
    /// Starts Prometheus next to `mta` with `rules` as its only rule file and waits until it is ready.
    pub fn start(mta: &MtaHost, rules: &str) -> Self {
        let binary = Path::new("/usr/bin/prometheus");
        assert!(
            binary.is_file(),
            "{} is missing (Debian package prometheus; run make deps)",
            binary.display()
        );
        let dir = mta.dir.join("prometheus");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).expect("Prometheus directory");
        fs::write(dir.join("rules.yaml"), rules).expect("write rules.yaml");
        fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: securemail-sidecar
    static_configs:
      - targets: ['{address}:9090']
",
                rules = dir.join("rules.yaml").display(),
                address = mta.address,
            ),
        )
        .expect("write prometheus.yml");
        let log = fs::File::create(dir.join("prometheus.log")).expect("Prometheus log");
        let child = in_netns(&mta.netns, &binary.display().to_string())
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={PROMETHEUS_ADDRESS}"))
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start Prometheus");
        let server = Self {
            dir,
            netns: mta.netns.clone(),
            child: Some(child),
        };
        wait_until(
            Duration::from_secs(30),
            "Prometheus to be ready",
            || server.get_status("/-/ready") == Some(200),
            || server.log(),
        );
        server
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The HTTP status of GET `path`, or `None` when nothing answered.
    fn get_status(&self, path: &str) -> Option<u16> {
        let output = in_netns(&self.netns, "curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
                &format!("http://{PROMETHEUS_ADDRESS}{path}"),
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .parse()
            .ok()
            .filter(|&code| code != 0)
    }

    /// GET `path` of the HTTP API (`/api/v1/...`, with `params` URL-encoded as a query string) and returns its
    /// `data`; panics unless Prometheus answers `"status": "success"`.
    pub fn api(&self, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
        let mut command = in_netns(&self.netns, "curl");
        command.args(["-sS", "--max-time", "10", "-G"]);
        for (key, value) in params {
            command.args(["--data-urlencode", &format!("{key}={value}")]);
        }
        command.arg(format!("http://{PROMETHEUS_ADDRESS}{path}"));
        let body = run_ok(&mut command);
        let mut answer: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|err| panic!("Prometheus {path} answered no JSON ({err}): {body}"));
        assert_eq!(answer["status"], "success", "Prometheus {path}: {answer}");
        answer["data"].take()
    }

    /// The scrape targets Prometheus is using (`/api/v1/targets`, `activeTargets`).
    pub fn targets(&self) -> Vec<serde_json::Value> {
        match self.api("/api/v1/targets", &[("state", "active")])["activeTargets"].take() {
            serde_json::Value::Array(targets) => targets,
            other => panic!("activeTargets is not a list: {other}"),
        }
    }

    /// The result vector of the instant query `promql`.
    pub fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let mut data = self.api("/api/v1/query", &[("query", promql)]);
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        match data["result"].take() {
            serde_json::Value::Array(samples) => samples,
            other => panic!("{promql}: result is not a list: {other}"),
        }
    }

    /// The alerting rule named `alert` as `/api/v1/rules` reports it (state, health, lastEvaluation, alerts).
    pub fn alerting_rule(&self, alert: &str) -> serde_json::Value {
        let data = self.api("/api/v1/rules", &[("type", "alert")]);
        data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .find(|rule| rule["name"] == alert)
            .cloned()
            .unwrap_or_else(|| panic!("Prometheus has no alerting rule {alert}: {data}"))
    }

    /// The active (pending or firing) alerts named `alert`, from `/api/v1/alerts`.
    pub fn alerts(&self, alert: &str) -> Vec<serde_json::Value> {
        let data = self.api("/api/v1/alerts", &[]);
        data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|active| active["labels"]["alertname"] == alert)
            .cloned()
            .collect()
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `ip netns exec` execs Prometheus, so the child's pid is Prometheus's.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(self.dir.join("data"));
    }
}

/// The operator binary `make e2e-dataplane` built.
fn operator_bin() -> PathBuf {
    std::env::var_os("SECUREMAIL_OPERATOR_BIN")
        .map(PathBuf::from)
        .expect("SECUREMAIL_OPERATOR_BIN names the operator binary (set by `make e2e-dataplane`)")
}

/// The sidecar binary `make e2e-dataplane` (or `make e2e-node`) built.
pub fn sidecar_bin() -> PathBuf {
    std::env::var_os("SECUREMAIL_SIDECAR_BIN")
        .map(PathBuf::from)
        .expect("SECUREMAIL_SIDECAR_BIN names the sidecar binary (set by `make e2e-dataplane` and `make e2e-node`)")
}

/// Verifies every DKIM signature of `message` with dkimpy (e2e/dataplane/dkimverify.py), an implementation
/// independent of the sidecar's, against `records` (`name=value`, the TXT records the tenant is told to publish);
/// panics with dkimpy's output naming `what` unless all verify.
pub fn assert_dkimpy_verifies(records: &[String], message: &[u8], what: &str) {
    let output = output_with_input(
        Command::new("python3")
            .arg(repo_root().join("e2e/dataplane/dkimverify.py"))
            .args(records),
        message,
    );
    assert!(
        output.status.success(),
        "{what}: dkimpy rejects the signature:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs openssl in `dir`; panics with its output unless it succeeds.
pub fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

/// One RSA-2048 and, when the manifest asks for Ed25519, one Ed25519 key per domain, named as `render
/// --keys-dir` expects.
fn make_dkim_keys(keys: &Path, manifest: &str) {
    let tenant: Value = serde_yaml::from_str(manifest).expect("manifest is YAML");
    let domains = tenant["spec"]["domains"].as_sequence().expect("spec.domains");
    for domain in domains {
        let name = domain["name"].as_str().expect("domain name");
        openssl(
            keys,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                &format!("{name}.rsa.pem"),
            ],
        );
        openssl(
            keys,
            &["genpkey", "-algorithm", "ED25519", "-out", &format!("{name}.ed.pem")],
        );
    }
}

/// A server certificate for the submission listener and a client CA with one client certificate.
pub fn make_submission_certificates(tls: &Path) {
    for (ca, subject) in [
        ("server-ca", "submission test CA"),
        ("client-ca", "tenant apps test CA"),
    ] {
        openssl(
            tls,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={subject}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ],
        );
    }
    for (leaf, ca, subject, extension) in [
        (
            "server",
            "server-ca",
            "submission",
            "subjectAltName=DNS:submission.test",
        ),
        ("client", "client-ca", "billing-app", "extendedKeyUsage=clientAuth"),
    ] {
        openssl(
            tls,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={subject}"),
                "-keyout",
                &format!("{leaf}.key"),
                "-out",
                &format!("{leaf}.csr"),
            ],
        );
        fs::write(tls.join(format!("{leaf}.ext")), extension).expect("extension file");
        openssl(
            tls,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{leaf}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{leaf}.ext"),
                "-out",
                &format!("{leaf}.crt"),
            ],
        );
    }
}

fn rendered_config_map(rendered: &str) -> Value {
    rendered
        .split("\n---\n")
        .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
        .find(|doc| doc["kind"].as_str() == Some("ConfigMap"))
        .expect("render prints a ConfigMap")
}

/// The DKIM TXT records from render's "DNS records to publish" comment block.
fn rendered_dkim_records(rendered: &str) -> Vec<(String, String)> {
    rendered
        .lines()
        .filter_map(|line| line.strip_prefix("# "))
        .filter(|line| line.contains("._domainkey."))
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let name = fields.next()?;
            let record_type = fields.next()?;
            let value = fields.next()?;
            // A TXT value is printed as one or more quoted strings; DNS hands the verifier their concatenation.
            let joined: String = value.split('"').skip(1).step_by(2).collect();
            (record_type == "TXT").then(|| (name.trim_end_matches('.').to_owned(), joined))
        })
        .collect()
}

/// The rendered sidecar.yaml with pod paths replaced by this host's, the world's resolver and trust anchor, and
/// the pool address as admin listener. Everything else is as the operator rendered it.
fn sidecar_yaml_for_host(rendered: &str, world: &World, dir: &Path, address: IpAddr) -> String {
    let mut config: Value = serde_yaml::from_str(rendered).expect("rendered sidecar.yaml is YAML");
    let path = |sub: &str| Value::String(dir.join(sub).display().to_string());
    config["listen"]["lmtp"] = path("run/lmtp.sock");
    config["listen"]["admin"] = Value::String(format!("{address}:9090"));
    config["evidence"]["dir"] = path("evidence");
    config["stateDir"] = path("state");
    config["postfixQueueDir"] = path("queue");
    config["dns"] = serde_yaml::from_str(&format!(
        "{{nameservers: ['{}:53'], trustAnchorFile: '{}'}}",
        world.get("SMDP_RESOLVER"),
        world.dir.join("trust-anchor").display()
    ))
    .expect("dns settings");
    let domains = config["signing"].as_sequence_mut().expect("signing");
    for domain in domains {
        let name = domain["domain"].as_str().expect("signing domain").to_owned();
        for key in domain["keys"].as_sequence_mut().expect("keys") {
            let suffix = match key["algorithm"].as_str() {
                Some("ed25519-sha256") => "ed",
                _ => "rsa",
            };
            key["privateKeyFile"] = path(&format!("keys/{name}.{suffix}.pem"));
        }
    }
    serde_yaml::to_string(&config).expect("serialize sidecar.yaml")
}

/// The envelope and header sender of the suites' messages.
pub const SENDER: &str = "alerts@sender.test";

/// A small message to `to` with `Message-ID: <id@sender.test>`.
pub fn message(id: &str, to: &str) -> Vec<u8> {
    format!(
        "From: Lakeside Alerts <{SENDER}>\r\nTo: <{to}>\r\nSubject: Appointment reminder {id}\r\n\
         Message-ID: <{id}@sender.test>\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nYour appointment is tomorrow at 9:00.\r\n"
    )
    .into_bytes()
}

/// A Message-ID local part unique to this run and case. The world's receivers are shared by every case, so each
/// looks only for its own.
pub fn unique_id(case: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    format!("{case}.{nanos}")
}

/// The Maildir of the receiver behind `case` (`SMDP_CASE_<case>_RX`).
fn case_maildir(world: &World, case: &str) -> PathBuf {
    let receiver = world
        .get(&format!("SMDP_CASE_{case}_RX"))
        .to_ascii_uppercase()
        .replace('-', "_");
    PathBuf::from(world.get(&format!("SMDP_RX_{receiver}_MAILDIR")))
}

/// The messages containing `needle` in the Maildir of the receiver behind `case`.
pub fn received_containing(world: &World, case: &str, needle: &str) -> Vec<Vec<u8>> {
    let maildir = case_maildir(world, case);
    let mut found = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let bytes = fs::read(entry.path()).unwrap_or_default();
            if String::from_utf8_lossy(&bytes).contains(needle) {
                found.push(bytes);
            }
        }
    }
    found
}

/// How many copies of each message whose Message-ID starts with `<prefix` the receiver behind `case` holds, by
/// Message-ID.
pub fn received_ids(world: &World, case: &str, prefix: &str) -> BTreeMap<String, usize> {
    let needle = format!("Message-ID: <{prefix}");
    let mut copies = BTreeMap::new();
    for bytes in received_containing(world, case, &needle) {
        let text = String::from_utf8_lossy(&bytes);
        let Some(start) = text.find(&needle).map(|at| at + "Message-ID: ".len()) else {
            continue;
        };
        if let Some(end) = text[start..].find('>') {
            *copies.entry(text[start..=start + end].to_owned()).or_insert(0) += 1;
        }
    }
    copies
}

/// Panics unless every SMTP session the MTA address opened to any receiver of the world issued STARTTLS (and it
/// succeeded) before a mail transaction: Postfix's `disconnect from` line counts each command of a session, so
/// a session that sent MAIL, RCPT, DATA or BDAT without `starttls=1` means bytes of mail went in cleartext.
/// Returns how many sessions were checked.
pub fn assert_no_cleartext_session(world: &World) -> usize {
    let client = format!("[{}]", world.get("SMDP_MTA_ADDR"));
    let mut sessions = 0;
    for name in world.get("SMDP_RECEIVERS").split(',') {
        let key = name.to_ascii_uppercase().replace('-', "_");
        let log = fs::read_to_string(world.get(&format!("SMDP_RX_{key}_MAILLOG"))).unwrap_or_default();
        for line in log
            .lines()
            .filter(|line| line.contains("disconnect from") && line.contains(&client))
        {
            sessions += 1;
            let transaction = [" mail=", " rcpt=", " data=", " bdat="]
                .iter()
                .any(|command| line.contains(command));
            assert!(
                !transaction || line.contains(" starttls=1 "),
                "receiver {name}: a mail transaction without TLS: {line}"
            );
        }
    }
    sessions
}

/// A daemon of the world (`DIR/pids/NAME.pid`: named, unbound, nginx, postfix-RECEIVER) killed with its whole
/// process group, as an outage. Dropping it ends the outage: the daemon starts again with the same command line,
/// namespace and log, also when a test fails, so the world is left as it was found.
#[derive(Debug)]
pub struct StoppedDaemon {
    name: String,
    pid_file: PathBuf,
    netns: String,
    argv: Vec<String>,
    log: PathBuf,
}

impl World {
    /// Kills daemon `name` (SIGKILL to its process group: up.sh starts each in a session of its own) and waits
    /// until it is gone.
    pub fn stop_daemon(&self, name: &str) -> StoppedDaemon {
        let pid_file = self.dir.join(format!("pids/{name}.pid"));
        let pid = fs::read_to_string(&pid_file)
            .unwrap_or_else(|err| panic!("{}: {err}", pid_file.display()))
            .trim()
            .to_owned();
        // Namespace, log and command line as up.sh started it.
        let recorded = self.dir.join(format!("pids/{name}.cmd"));
        let mut fields = fs::read(&recorded)
            .unwrap_or_else(|err| panic!("{}: {err}", recorded.display()))
            .split(|&byte| byte == 0)
            .filter(|field| !field.is_empty())
            .map(|field| String::from_utf8_lossy(field).into_owned())
            .collect::<Vec<_>>()
            .into_iter();
        let (Some(netns), Some(log)) = (fields.next(), fields.next()) else {
            panic!("{} names no namespace and log", recorded.display());
        };
        let argv: Vec<String> = fields.collect();
        assert!(!argv.is_empty(), "{} names no command", recorded.display());
        assert!(process_alive(&pid), "{name} (pid {pid}) is not running");
        run_ok(Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]));
        wait_until(
            Duration::from_secs(30),
            &format!("{name} to exit"),
            || !process_alive(&pid),
            || format!("{name} pid {pid}"),
        );
        StoppedDaemon {
            name: name.to_owned(),
            pid_file,
            netns,
            argv,
            log: PathBuf::from(log),
        }
    }
}

impl Drop for StoppedDaemon {
    /// Starts the daemon again as up.sh did, in a session of its own, and records its new pid for down.sh.
    fn drop(&mut self) {
        // As up.sh does: in the background of a shell that exits at once, so the daemon outlives this test's
        // process tree and down.sh finds it by its namespace; `ip netns exec` and `setsid` exec, so $! is the daemon.
        let pid = run_ok(
            Command::new("bash")
                .args([
                    "-c",
                    r#"ip netns exec "$1" setsid "${@:3}" </dev/null >>"$2" 2>&1 & echo $!"#,
                    "start-daemon",
                    &self.netns,
                ])
                .arg(&self.log)
                .args(&self.argv),
        );
        fs::write(&self.pid_file, pid).unwrap_or_else(|err| panic!("cannot record the pid of {}: {err}", self.name));
    }
}

/// A setting of one receiver's Postfix changed for a while (`postconf -e`, then SIGHUP to its master, which
/// rereads main.cf and lets new sessions use it); dropping it puts the previous value back the same way.
#[derive(Debug)]
pub struct ReceiverSetting {
    conf: PathBuf,
    master_pid: PathBuf,
    name: String,
    previous: Option<String>,
}

impl ReceiverSetting {
    /// Sets `name = value` on receiver `receiver` (an `SMDP_RECEIVERS` name).
    pub fn set(world: &World, receiver: &str, name: &str, value: &str) -> Self {
        let conf = world.dir.join(format!("mx/{receiver}/conf"));
        let current = run_ok(Command::new("postconf").arg("-c").arg(&conf).args(["-n", name]));
        let setting = Self {
            master_pid: world.dir.join(format!("pids/postfix-{receiver}.pid")),
            conf,
            name: name.to_owned(),
            previous: current.split_once('=').map(|(_, value)| value.trim().to_owned()),
        };
        setting.apply(Some(value));
        setting
    }

    /// Ends the receiver's open sessions (its smtpd processes; the master starts new ones): an open session keeps
    /// the configuration it started with, and a sender may keep one open for reuse.
    pub fn end_open_sessions(&self) {
        // The master rereads main.cf on the setting's SIGHUP; sessions started after that get the new setting.
        std::thread::sleep(Duration::from_secs(1));
        let master = fs::read_to_string(&self.master_pid).expect("receiver master pid");
        // pkill's status is 1 when no session was open.
        Command::new("pkill")
            .args(["-TERM", "-x", "-P", master.trim(), "smtpd"])
            .status()
            .expect("pkill");
    }

    fn apply(&self, value: Option<&str>) {
        let mut postconf = Command::new("postconf");
        postconf.arg("-c").arg(&self.conf);
        match value {
            Some(value) => postconf.args(["-e", &format!("{}={value}", self.name)]),
            None => postconf.args(["-X", &self.name]),
        };
        run_ok(&mut postconf);
        // Postfix ignores a main.cf younger than about two seconds for a moment (it may be mid-edit).
        run_ok(
            Command::new("touch")
                .args(["-d", "-1 minute"])
                .arg(self.conf.join("main.cf")),
        );
        let pid = fs::read_to_string(&self.master_pid).expect("receiver master pid");
        run_ok(Command::new("kill").args(["-HUP", pid.trim()]));
    }
}

impl Drop for ReceiverSetting {
    fn drop(&mut self) {
        self.apply(self.previous.clone().as_deref());
    }
}

/// The SHA-256 of `data` in hex, from coreutils' sha256sum (an implementation independent of the sidecar's).
pub fn sha256_hex(data: &str) -> String {
    let output = output_with_input(&mut Command::new("sha256sum"), data.as_bytes());
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned()
}

/// The evidence records of the message with Message-ID `<id@sender.test>`.
pub fn evidence_for(mta: &MtaHost, id: &str) -> Vec<serde_json::Value> {
    let hash = sha256_hex(&format!("<{id}@sender.test>"));
    mta.evidence()
        .into_iter()
        .filter(|record| record["messageIdSha256"].as_str() == Some(hash.as_str()))
        .collect()
}
