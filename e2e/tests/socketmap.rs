//! `securemail-sidecar policy-socketmap` in the data-plane world (`make e2e-dataplane`), asked by Postfix's own
//! socketmap client: `postmap -q` for every policy class of the world, and a Debian Postfix whose
//! `smtp_tls_policy_maps` is the endpoint delivering to an MTA-STS domain and a DANE domain with the answered
//! policy, refusing an MX the MTA-STS policy does not list, and keeping mail for a domain without a secure path.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use securemail_e2e::dataplane::{World, in_netns, run_ok, sidecar_bin, wait_until};

/// Per-domain overrides exercising the tenant-policy answers: an approved `encrypted` exception, an approved
/// cleartext exception, and a TLS 1.3 minimum.
const TLS_POLICY: &str = "tlsPolicy:
  overrides:
    - domain: selfsigned.plain.test
      mode: encrypted
      exception: {approvedBy: security-office/CHG-7, reason: partner with a self-signed certificate}
    - domain: nostarttls.plain.test
      allowCleartext: true
      exception: {approvedBy: security-office/CHG-8, reason: legacy partner without STARTTLS}
    - domain: tls11.plain.test
      minVersion: '1.3'
";

/// The endpoint inside the world's MTA namespace, on its loopback. Stopped on drop.
struct Endpoint {
    netns: String,
    address: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Endpoint {
    fn start(world: &World, label: &str, port: u16) -> Self {
        let dir = world.dir.join(format!("socketmap-{label}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // A complete sidecar.yaml, as a pod would have; the endpoint reads its tlsPolicy and dns only.
        let config = dir.join("sidecar.yaml");
        fs::write(
            &config,
            format!(
                "tenant: e2e/socketmap
source: {{address: {address}, hostname: {hostname}}}
listen: {{lmtp: {dir}/lmtp.sock, admin: 127.0.0.1:9091}}
signing: []
{TLS_POLICY}warmup: {{providerShares: {{gmail: 20, microsoft: 20, yahoo: 20, apple: 20, other: 20}}}}
evidence: {{dir: {dir}/evidence, retentionDays: 1}}
stateDir: {dir}/state
maxMessageBytes: 1048576
dns: {{nameservers: ['{resolver}:53'], trustAnchorFile: '{anchor}'}}
",
                address = world.get("SMDP_MTA_ADDR"),
                hostname = world.get("SMDP_MTA_HOSTNAME"),
                dir = dir.display(),
                resolver = world.get("SMDP_RESOLVER"),
                anchor = world.get("SMDP_TRUST_ANCHOR"),
            ),
        )
        .unwrap();
        let address = format!("127.0.0.1:{port}");
        let netns = world.get("SMDP_MTA_NETNS").to_owned();
        let log = fs::File::create(dir.join("endpoint.log")).unwrap();
        let child = in_netns(&netns, "setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(sidecar_bin())
            .args(["policy-socketmap", "--listen", &address, "--config"])
            .arg(&config)
            .env("SSL_CERT_FILE", world.get("SMDP_CA_FILE"))
            .env("RUST_LOG", "debug")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start policy-socketmap");
        let endpoint = Self {
            netns,
            address,
            dir,
            child: Some(child),
        };
        wait_until(
            Duration::from_secs(30),
            "the socketmap endpoint to listen",
            || {
                in_netns(&endpoint.netns, "bash")
                    .args([
                        "-c",
                        &format!("exec 3<>/dev/tcp/{}", endpoint.address.replace(':', "/")),
                    ])
                    .output()
                    .is_ok_and(|output| output.status.success())
            },
            || endpoint.log(),
        );
        endpoint
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("endpoint.log")).unwrap_or_default()
    }

    fn table(&self) -> String {
        format!("socketmap:inet:{}:postfix", self.address)
    }

    /// `postmap -q KEY socketmap:...`: Ok(value) when found, Err(stderr) otherwise.
    fn postmap(&self, key: &str) -> Result<String, String> {
        let output = in_netns(&self.netns, "postmap")
            .args(["-q", key, &self.table()])
            .output()
            .unwrap();
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `ip netns exec` and `setpriv` exec the sidecar, so the child's pid is the endpoint's.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn postmap_gets_the_policy_of_every_class() {
    let world = World::load();
    let endpoint = Endpoint::start(&world, "postmap", 18461);
    let found = [
        ("dane.test", "dane-only protocols=>=TLSv1.2"),
        ("dane-ta.test", "dane-only protocols=>=TLSv1.2"),
        // The TLSA record is usable; that it matches no key is found at connection time, by Postfix too.
        ("dane-mismatch.test", "dane-only protocols=>=TLSv1.2"),
        (
            "sts.test",
            "secure match=mx.sts.test servername=hostname protocols=>=TLSv1.2",
        ),
        (
            "good.plain.test",
            "verify match=hostname servername=hostname protocols=>=TLSv1.2",
        ),
        (
            "Good.Plain.Test.",
            "verify match=hostname servername=hostname protocols=>=TLSv1.2",
        ),
        ("selfsigned.plain.test", "encrypt protocols=>=TLSv1.2"),
        ("nostarttls.plain.test", "may protocols=>=TLSv1.2"),
        (
            "tls11.plain.test",
            "verify match=hostname servername=hostname protocols=>=TLSv1.3",
        ),
    ];
    for (domain, policy) in found {
        assert_eq!(
            endpoint.postmap(domain).as_deref(),
            Ok(policy),
            "{domain}\n{}",
            endpoint.log()
        );
    }
    // Postfix reports TEMP and PERM as a lookup error naming the table and the reason.
    let refused = [
        ("dane-servfail.test", "dane lookup"),
        (
            "sts-nomatch.test",
            "no secure path: MTA-STS policy 20261125 of sts-nomatch.test is in enforce mode",
        ),
        ("absent.plain.test", "does not exist (NXDOMAIN)"),
        ("[mx.good.plain.test]:25", "explicit next hops"),
        ("someone@good.plain.test", "key is not a recipient domain"),
    ];
    for (key, reason) in refused {
        let error = endpoint.postmap(key).expect_err(key);
        assert!(error.contains(reason), "{key}: {error}");
        assert!(error.contains(&endpoint.table()), "{key}: {error}");
    }
    // The endpoint never repeats a key's local part.
    assert!(!endpoint.log().contains("someone@"), "{}", endpoint.log());
}

#[test]
fn bad_clients_are_answered_and_disconnected_without_harm() {
    let world = World::load();
    let endpoint = Endpoint::start(&world, "bad-input", 18462);
    let script = "
import socket, sys
def talk(data):
    s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=20)
    s.sendall(data)
    reply = b''
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return reply
        reply += chunk
print(talk(b'GET / HTTP/1.1\\r\\n\\r\\n').decode())
print(talk(b'%d:%s,' % (1 << 20, b'a' * (1 << 20))).decode())
print(talk(b'22:postfix sts').decode())
";
    let port = endpoint.address.rsplit(':').next().unwrap();
    let output = run_ok(in_netns(&endpoint.netns, "python3").args(["-c", script, port]));
    let lines: Vec<&str> = output.lines().collect();
    assert!(
        lines[0].contains("PERM malformed request: netstring length must be decimal digits"),
        "{output}"
    );
    assert!(
        lines[1].contains("PERM malformed request: request of 1048576 bytes exceeds the limit of 1024 bytes"),
        "{output}"
    );
    assert!(lines[2].contains("PERM request not completed within 10 s"), "{output}");
    // Still serving.
    assert_eq!(
        endpoint.postmap("dane.test").as_deref(),
        Ok("dane-only protocols=>=TLSv1.2")
    );
    assert!(
        endpoint.log().contains("socketmap connection closed"),
        "{}",
        endpoint.log()
    );
}

/// A Debian Postfix in the MTA namespace delivering itself with `smtp_tls_policy_maps` = the endpoint, DNSSEC
/// lookups (for DANE) through the world's validating resolver, the test CA as its trust store. Stopped on drop.
struct PostfixSender {
    netns: String,
    dir: PathBuf,
    child: Option<Child>,
}

const SUBMIT_PORT: u16 = 2525;

impl PostfixSender {
    fn start(world: &World, endpoint: &Endpoint) -> Self {
        let dir = world.dir.join("socketmap-postfix");
        let _ = fs::remove_dir_all(&dir);
        for sub in ["conf", "queue", "data"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        run_ok(Command::new("chown").arg("postfix").arg(dir.join("data")));
        let conf = dir.join("conf");
        fs::write(
            conf.join("main.cf"),
            format!(
                "compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = /dev/stdout
myhostname = {hostname}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
smtp_bind_address = {address}
smtp_dns_support_level = dnssec
# The floor for keys the table does not answer; every recipient domain here gets an answer.
smtp_tls_security_level = encrypt
smtp_tls_policy_maps = {table}
smtp_tls_CAfile = {ca}
smtp_tls_loglevel = 1
smtp_connect_timeout = 5s
queue_run_delay = 3s
minimal_backoff_time = 3s
maximal_backoff_time = 10s
",
                queue = dir.join("queue").display(),
                data = dir.join("data").display(),
                hostname = world.get("SMDP_MTA_HOSTNAME"),
                address = world.get("SMDP_MTA_ADDR"),
                table = endpoint.table(),
                ca = world.get("SMDP_CA_FILE"),
            ),
        )
        .unwrap();
        // Every service unchrooted: the private queue directory has no chroot tree.
        let services = [
            format!("127.0.0.1:{SUBMIT_PORT} inet n - n - - smtpd"),
            "pickup unix n - n 60 1 pickup".into(),
            "cleanup unix n - n - 0 cleanup".into(),
            "qmgr unix n - n 300 1 qmgr".into(),
            "tlsmgr unix - - n 1000? 1 tlsmgr".into(),
            "rewrite unix - - n - - trivial-rewrite".into(),
            "bounce unix - - n - 0 bounce".into(),
            "defer unix - - n - 0 bounce".into(),
            "trace unix - - n - 0 bounce".into(),
            "verify unix - - n - 1 verify".into(),
            "flush unix n - n 1000? 0 flush".into(),
            "proxymap unix - - n - - proxymap".into(),
            "smtp unix - - n - - smtp".into(),
            "relay unix - - n - - smtp".into(),
            "showq unix n - n - - showq".into(),
            "error unix - - n - - error".into(),
            "retry unix - - n - - error".into(),
            "discard unix - - n - - discard".into(),
            "anvil unix - - n - 1 anvil".into(),
            "scache unix - - n - 1 scache".into(),
            "postlog unix-dgram n - n - 1 postlogd".into(),
        ];
        fs::write(conf.join("master.cf"), services.join("\n") + "\n").unwrap();
        let netns = world.get("SMDP_MTA_NETNS").to_owned();
        let log = fs::File::create(dir.join("maillog")).unwrap();
        let child = in_netns(&netns, "postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start-fg")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start Postfix");
        let sender = Self {
            netns,
            dir,
            child: Some(child),
        };
        wait_until(
            Duration::from_secs(30),
            "Postfix's SMTP listener",
            || {
                in_netns(&sender.netns, "bash")
                    .args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{SUBMIT_PORT}")])
                    .output()
                    .is_ok_and(|output| output.status.success())
            },
            || sender.maillog(),
        );
        sender
    }

    fn maillog(&self) -> String {
        fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    fn submit(&self, to: &str, id: &str) {
        let script = "
import smtplib, sys
message = ('From: <alerts@sender.test>\\r\\nTo: <%s>\\r\\nSubject: policy map %s\\r\\n'
           'Message-ID: <%s@sender.test>\\r\\n\\r\\nYour appointment is tomorrow.\\r\\n') % (sys.argv[2], sys.argv[3], sys.argv[3])
with smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=30) as smtp:
    smtp.sendmail('alerts@sender.test', [sys.argv[2]], message)
";
        run_ok(in_netns(&self.netns, "python3").args(["-c", script, &SUBMIT_PORT.to_string(), to, id]));
    }

    fn flush(&self) {
        run_ok(
            in_netns(&self.netns, "postqueue")
                .arg("-c")
                .arg(self.dir.join("conf"))
                .arg("-f"),
        );
    }

    /// `postqueue -j` lines mentioning `needle` (a recipient or a reason).
    fn queued(&self, needle: &str) -> Vec<String> {
        run_ok(
            in_netns(&self.netns, "postqueue")
                .arg("-c")
                .arg(self.dir.join("conf"))
                .arg("-j"),
        )
        .lines()
        .filter(|line| line.contains(needle))
        .map(str::to_owned)
        .collect()
    }
}

impl Drop for PostfixSender {
    fn drop(&mut self) {
        let _ = in_netns(&self.netns, "postfix")
            .arg("-c")
            .arg(self.dir.join("conf"))
            .arg("stop")
            .output();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// Messages with Message-ID `<id@sender.test>` in a receiver's Maildir.
fn received(world: &World, receiver: &str, id: &str) -> Vec<String> {
    let maildir = PathBuf::from(world.get(&format!("SMDP_RX_{}_MAILDIR", receiver.to_uppercase())));
    let needle = format!("<{id}@sender.test>");
    fs::read_dir(maildir.join("new"))
        .map(|entries| {
            entries
                .filter_map(|entry| fs::read_to_string(entry.ok()?.path()).ok())
                .filter(|text| text.contains(&needle))
                .collect()
        })
        .unwrap_or_default()
}

fn unique_id(case: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("socketmap-{case}.{nanos}")
}

/// An MX address made unreachable from the MTA namespace (a `prohibit` route) until dropped.
struct Unreachable<'a> {
    netns: &'a str,
    address: String,
}

impl<'a> Unreachable<'a> {
    fn new(netns: &'a str, address: &str) -> Self {
        run_ok(Command::new("ip").args(["-n", netns, "route", "add", "prohibit", &format!("{address}/32")]));
        Self {
            netns,
            address: address.to_owned(),
        }
    }
}

impl Drop for Unreachable<'_> {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "-n",
                self.netns,
                "route",
                "del",
                "prohibit",
                &format!("{}/32", self.address),
            ])
            .output();
    }
}

#[test]
fn postfix_delivers_with_the_answered_policy_and_only_to_listed_mx() {
    let world = World::load();
    let endpoint = Endpoint::start(&world, "postfix", 18463);
    let postfix = PostfixSender::start(&world, &endpoint);
    let log = || format!("{}\n--- endpoint ---\n{}", postfix.maillog(), endpoint.log());

    // MTA-STS enforce and DANE: delivered, over TLS Postfix verified.
    let sts = unique_id("sts");
    let dane = unique_id("dane");
    let nomatch = unique_id("nomatch");
    postfix.submit("patient@sts.test", &sts);
    postfix.submit("patient@dane.test", &dane);
    postfix.submit("patient@sts-nomatch.test", &nomatch);
    wait_until(
        Duration::from_secs(60),
        "the MTA-STS and DANE messages to arrive",
        || received(&world, "sts", &sts).len() == 1 && received(&world, "dane", &dane).len() == 1,
        log,
    );
    let maillog = postfix.maillog();
    assert!(
        maillog.contains("Verified TLS connection established to mx.sts.test"),
        "{}",
        log()
    );
    assert!(
        maillog.contains("Verified TLS connection established to mx.dane.test"),
        "{}",
        log()
    );
    for (receiver, id) in [("sts", &sts), ("dane", &dane)] {
        let message = &received(&world, receiver, id)[0];
        assert!(message.contains("(using TLSv1."), "{receiver}: {message}");
    }

    // No secure path (its only MX is not in the enforce policy): Postfix defers on the lookup error (Postfix 3.7:
    // "4.7.5 client TLS configuration problem") and logs the endpoint's reason; the unlisted MX never sees it.
    wait_until(
        Duration::from_secs(30),
        "the sts-nomatch.test message to be deferred on the endpoint's answer",
        || {
            postfix.maillog().contains("no secure path")
                && postfix
                    .queued("patient@sts-nomatch.test")
                    .iter()
                    .any(|entry| entry.contains("client TLS configuration problem"))
        },
        log,
    );
    assert!(received(&world, "rogue", &nomatch).is_empty());

    // The listed MX unreachable: Postfix goes on to the unlisted one, whose certificate does not match the
    // policy, and delivers nothing there; once the listed MX is back, the message goes to it.
    let listed = world.get("SMDP_RX_STS_ADDR").to_owned();
    let unlisted = unique_id("unlisted");
    {
        let _blocked = Unreachable::new(&postfix.netns, &listed);
        postfix.submit("patient@sts.test", &unlisted);
        wait_until(
            Duration::from_secs(60),
            "Postfix to refuse rogue.sts.test's certificate",
            || {
                postfix
                    .maillog()
                    .lines()
                    .any(|line| line.contains("rogue.sts.test") && line.contains("certificate verification failed"))
                    || postfix
                        .maillog()
                        .lines()
                        .any(|line| line.contains("rogue.sts.test") && line.contains("Server certificate not verified"))
            },
            log,
        );
        assert!(received(&world, "rogue", &unlisted).is_empty(), "{}", log());
        assert!(received(&world, "sts", &unlisted).is_empty(), "{}", log());
        assert!(!postfix.queued("patient@sts.test").is_empty(), "{}", log());
    }
    postfix.flush();
    wait_until(
        Duration::from_secs(60),
        "the held message to reach the listed MX",
        || received(&world, "sts", &unlisted).len() == 1,
        log,
    );
    assert!(received(&world, "rogue", &unlisted).is_empty(), "{}", log());
}
