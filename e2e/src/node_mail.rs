//! Mail through MTA pods on the test node (`make e2e-node`, the data-plane world linked as the node's Internet):
//! a tenant in the node suites' namespace with its certificates, its DNS published in the world, messages submitted
//! with a client certificate, what the world's DANE receiver got, and what the pods' volumes and queues hold.
// Test support: a step that fails is a failed test, reported with the step's description.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::{Api, Client, ResourceExt};
use securemail_api::SecureMailTenant;

use crate::dataplane::{
    World, assert_dkimpy_verifies, in_netns, json_report, make_submission_certificates, output_with_input,
    received_containing, run_ok, sha256_hex,
};
use crate::node::{ordinal, pod_address};
use crate::{kubectl_ok, repo_root};

pub const NAMESPACE: &str = "tenant-egress";
/// The world's DANE receiver: verified TLS from its TLSA records and the world's DNSSEC root, no CA needed.
pub const RECIPIENT: &str = "patient@dane.test";
pub const RECEIVER_CASE: &str = "DANE";
/// From submission to the receiver's mailbox, through Postfix, the sidecar, the proxy and the receiver's Postfix.
pub const DELIVERED: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Socks5Proxy,
    None,
}

/// A tenant of the node suites: its egress mode, name, domain and pool (address, host name) in ordinal order.
#[derive(Debug)]
pub struct MailTenant {
    pub mode: Mode,
    pub tenant: &'static str,
    pub domain: &'static str,
    pub pool: Vec<(String, String)>,
}

impl MailTenant {
    /// Tenant `tenant` of `domain`, in mode `mode`, with `addresses` named `<label>1.tenant.test`, `<label>2…`.
    pub fn new(mode: Mode, tenant: &'static str, domain: &'static str, label: &str, addresses: &[String]) -> Self {
        let pool = addresses
            .iter()
            .enumerate()
            .map(|(index, address)| (address.clone(), format!("{label}{}.tenant.test", index + 1)))
            .collect();
        Self {
            mode,
            tenant,
            domain,
            pool,
        }
    }

    pub fn sender(&self) -> String {
        format!("notices@{}", self.domain)
    }

    pub fn manifest(&self, world: &World) -> String {
        let addresses: String = self
            .pool
            .iter()
            .map(|(address, hostname)| format!("      - {{address: {address}, hostname: {hostname}}}\n"))
            .collect();
        let egress = match self.mode {
            Mode::Socks5Proxy => format!(
                "{{mode: Socks5Proxy, proxyPort: {}}}",
                world.get("SMDP_EGRESS_SOCKS_PORT")
            ),
            Mode::None => "{mode: None}".to_owned(),
        };
        format!(
            "apiVersion: securemail.io/v1alpha1
kind: SecureMailTenant
metadata:
  name: {tenant}
  namespace: {NAMESPACE}
spec:
  domains:
    - name: {domain}
  ipPool:
    addresses:
{addresses}    egress: {egress}
    warmup:
      schedule: [{{day: 1, dailyLimit: 1000000}}]
  submission:
    tls:
      secretName: {tenant}-submission-tls
    clientCertificates:
      caSecretName: {tenant}-apps-ca
",
            tenant = self.tenant,
            domain = self.domain,
        )
    }

    /// Puts address `ordinal` within reach of its pod, or takes it away (`action` "add" or "del"): on the egress
    /// host (Socks5Proxy), or on the pod with the host's route back to it (None).
    pub fn address(&self, world: &World, action: &str, pod: &Pod) {
        let (address, _) = &self.pool[ordinal(&pod.name_any())];
        match self.mode {
            Mode::Socks5Proxy => {
                run_ok(Command::new("ip").args([
                    "-n",
                    world.get("SMDP_EGRESS_NETNS"),
                    "addr",
                    action,
                    &format!("{address}/24"),
                    "dev",
                    "eth0",
                ]));
            }
            Mode::None => {
                pod_address(action, NAMESPACE, &pod.name_any(), address);
                // Asked now: the pod may have been listed before it had its IP.
                let pod_ip = kubectl_ok(&[
                    "get",
                    "pod",
                    "-n",
                    NAMESPACE,
                    &pod.name_any(),
                    "-o",
                    "jsonpath={.status.podIP}",
                ]);
                let route_action = if action == "add" { "replace" } else { "del" };
                run_ok(Command::new("ip").args([
                    "route",
                    route_action,
                    &format!("{address}/32"),
                    "via",
                    pod_ip.trim(),
                ]));
            }
        }
    }

    /// What the self-check says while the address is out of reach.
    pub fn expected_reason(&self, world: &World, address: &str) -> String {
        match self.mode {
            Mode::Socks5Proxy => format!("proxy {address}:{}", world.get("SMDP_EGRESS_SOCKS_PORT")),
            Mode::None => "the address is not assigned to any interface of this pod".to_owned(),
        }
    }
}

/// The tenant's namespace (Pod Security `baseline`, as node-install.sh labels tenant namespaces), its submission
/// certificate and client CA, and the tenant. Returns the directory with the application's client certificate.
pub fn onboard(world: &World, mail: &MailTenant) -> PathBuf {
    let tls = std::env::temp_dir().join(format!("securemail-{}-{}", mail.tenant, std::process::id()));
    fs::create_dir_all(&tls).expect("certificate directory");
    make_submission_certificates(&tls);
    let apply = |yaml: &str| {
        let path = tls.join("apply.yaml");
        fs::write(&path, yaml).expect("manifest written");
        kubectl_ok(&["apply", "-f", &path.to_string_lossy()]);
    };
    apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    \
         pod-security.kubernetes.io/enforce: baseline\n    pod-security.kubernetes.io/audit: baseline\n"
    ));
    let file = |name: &str| tls.join(name).to_string_lossy().into_owned();
    let secret = |args: &[&str]| {
        let mut command = vec!["create", "secret", "-n", NAMESPACE];
        command.extend_from_slice(args);
        command.extend_from_slice(&["--dry-run=client", "-o", "yaml"]);
        apply(&kubectl_ok(&command));
    };
    secret(&[
        "tls",
        &format!("{}-submission-tls", mail.tenant),
        &format!("--cert={}", file("server.crt")),
        &format!("--key={}", file("server.key")),
    ]);
    secret(&[
        "generic",
        &format!("{}-apps-ca", mail.tenant),
        &format!("--from-file=ca.crt={}", file("client-ca.crt")),
    ]);
    apply(&mail.manifest(world));
    tls
}

/// Publishes what the platform team publishes for the pool: each host name's A record, and the tenant's
/// `status.dnsRecords` (SPF, DKIM, DMARC, PTR), in the world's dynamic zones.
pub fn publish_dns(world: &World, mail: &MailTenant, tenant: &SecureMailTenant) {
    let zones: Vec<&str> = world.get("SMDP_DYNAMIC_ZONES").split(',').collect();
    let mut by_zone: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut add = |name: &str, record: String| {
        let zone = zones
            .iter()
            .filter(|zone| name == **zone || name.ends_with(&format!(".{zone}")))
            .max_by_key(|zone| zone.len())
            .unwrap_or_else(|| panic!("{name} is in none of the world's dynamic zones {zones:?}"));
        by_zone.entry(zone).or_default().push(record);
    };
    for (address, hostname) in &mail.pool {
        add(hostname, format!("update add {hostname}. 5 A {address}"));
    }
    let records = &tenant.status.as_ref().expect("status").dns_records;
    assert!(!records.is_empty(), "the operator lists the records to publish");
    for record in records {
        let name = record.name.trim_end_matches('.');
        let kind = serde_json::to_value(record.record_type).expect("record type");
        let kind = kind.as_str().expect("record type is a string");
        add(name, format!("update add {name}. 5 {kind} {}", record.value));
    }
    for (zone, updates) in by_zone {
        let script = format!(
            "server {}\nzone {zone}\n{}\nsend\n",
            world.get("SMDP_AUTH_DNS"),
            updates.join("\n")
        );
        let output = output_with_input(
            &mut in_netns(world.get("SMDP_MTA_NETNS"), "nsupdate"),
            script.as_bytes(),
        );
        assert!(
            output.status.success(),
            "nsupdate of {zone} failed:\n{script}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// One message from the tenant's domain with Message-ID `<id@domain>`.
pub fn message(mail: &MailTenant, id: &str) -> Vec<u8> {
    let (sender, domain) = (mail.sender(), mail.domain);
    format!(
        "From: Clinic Notices <{sender}>\r\nTo: <{RECIPIENT}>\r\nSubject: Lab results ready {id}\r\n\
         Message-ID: <{id}@{domain}>\r\nDate: Mon, 07 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nYour lab results are ready in the portal.\r\n"
    )
    .into_bytes()
}

/// Submits message `id` on `host`:587 with STARTTLS and the application's client certificate.
pub fn submit(tls: &Path, mail: &MailTenant, host: &str, id: &str) {
    let mut command = Command::new("python3");
    command
        .arg(repo_root().join("e2e/dataplane/submit.py"))
        .args([
            "--host",
            host,
            "--port",
            "587",
            "--from",
            &mail.sender(),
            "--to",
            RECIPIENT,
        ])
        .arg("--ca")
        .arg(tls.join("server-ca.crt"))
        .arg("--cert")
        .arg(tls.join("client.crt"))
        .arg("--key")
        .arg(tls.join("client.key"));
    // A pod just turned ready takes kube-proxy a moment to reach through the Service: until then it refuses.
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let report = json_report(&output_with_input(&mut command, &message(mail, id)), "submit.py");
        if report["stage"] != "connect" || Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(report["stage"], "sent", "submitting {id} to {host}: {report}");
}

/// The receiver's copies of message `id`, each as (source address, HELO name) from the Received header the
/// receiver added (its `smtpd_peername_lookup = no` writes `from HELO (unknown [ADDRESS])`).
pub fn received(world: &World, mail: &MailTenant, id: &str) -> Vec<(String, String)> {
    let needle = format!("Message-ID: <{id}@{}>", mail.domain);
    received_containing(world, RECEIVER_CASE, &needle)
        .iter()
        .map(|bytes| {
            let text = String::from_utf8_lossy(bytes);
            let header = text
                .lines()
                .find(|line| line.starts_with("Received: from "))
                .unwrap_or_else(|| panic!("{id}: no Received header:\n{text}"));
            let helo = header["Received: from ".len()..]
                .split_whitespace()
                .next()
                .expect("HELO name")
                .to_owned();
            let source = header
                .split_once('[')
                .and_then(|(_, rest)| rest.split_once(']'))
                .map(|(address, _)| address.to_owned())
                .unwrap_or_else(|| panic!("{id}: no source address in {header}"));
            (source, helo)
        })
        .collect()
}

pub fn wait_delivered(world: &World, mail: &MailTenant, ids: &[String]) {
    let deadline = Instant::now() + DELIVERED;
    loop {
        let missing: Vec<&String> = ids.iter().filter(|id| received(world, mail, id).is_empty()).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not delivered within {DELIVERED:?}: {missing:?}\npods:\n{}",
            kubectl_ok(&["get", "pods", "-n", NAMESPACE, "-o", "wide"])
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Where the volume of pod `ordinal` lives on the node (the local-path provisioner's directory).
pub async fn volume_dir(client: &Client, mail: &MailTenant, ordinal: usize) -> PathBuf {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NAMESPACE);
    let claim_name = format!("data-{}-mta-{ordinal}", mail.tenant);
    let claim = claims.get(&claim_name).await.expect("the pod's claim");
    let volume_name = claim.spec.and_then(|spec| spec.volume_name).expect("a bound claim");
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let spec = volumes
        .get(&volume_name)
        .await
        .expect("the claim's volume")
        .spec
        .expect("spec");
    spec.host_path
        .map(|host| host.path)
        .or(spec.local.map(|local| local.path))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("volume {volume_name} is neither hostPath nor local"))
}

/// Source addresses of the evidence records of message `id` in the evidence log on pod `ordinal`'s volume.
pub fn evidence_of_delivery(volume: &Path, mail: &MailTenant, id: &str) -> Vec<serde_json::Value> {
    let hash = sha256_hex(&format!("<{id}@{}>", mail.domain));
    let Ok(entries) = fs::read_dir(volume.join("sidecar/evidence")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|entry| {
            fs::read_to_string(entry.path())
                .unwrap_or_default()
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|record| record["messageIdSha256"].as_str() == Some(hash.as_str()))
                .filter(|record| record["outcome"].as_str() == Some("delivered"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Verifies every DKIM signature of message `id` as received, with dkimpy (e2e/dataplane/dkimverify.py) and the DKIM
/// records the tenant's status lists for publishing.
pub fn assert_dkim_verifies(world: &World, mail: &MailTenant, tenant: &SecureMailTenant, id: &str) {
    let records: Vec<String> = tenant
        .status
        .as_ref()
        .expect("status")
        .dns_records
        .iter()
        .filter(|record| record.purpose == "dkim")
        // A TXT value is one or more quoted strings; DNS hands the verifier their concatenation.
        .map(|record| {
            let joined: String = record.value.split('"').skip(1).step_by(2).collect();
            format!("{}={joined}", record.name.trim_end_matches('.'))
        })
        .collect();
    let needle = format!("Message-ID: <{id}@{}>", mail.domain);
    let message = received_containing(world, RECEIVER_CASE, &needle)
        .pop()
        .unwrap_or_else(|| panic!("{id} was not received"));
    assert_dkimpy_verifies(&records, &message, id);
}

pub fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|status| status.pod_ip.clone())
        .expect("a running pod has an IP")
}

pub fn sidecar_get(pod: &Pod, path: &str) -> String {
    run_ok(Command::new("curl").args(["-sS", "--max-time", "5", &format!("http://{}:9090{path}", pod_ip(pod))]))
}

/// The world's proxy addresses for the node suite's `index`th proxied tenant: two each, as `SMDP_EGRESS_ADDRS`
/// lists them.
pub fn proxy_addresses(world: &World, index: usize) -> Vec<String> {
    let all: Vec<String> = world.get("SMDP_EGRESS_ADDRS").split(',').map(str::to_owned).collect();
    all.chunks(2)
        .nth(index)
        .unwrap_or_else(|| panic!("SMDP_EGRESS_ADDRS has no pair {index}: {all:?}"))
        .to_vec()
}

/// Runs `args` in the `postfix` container of MTA pod `pod`.
pub fn postfix_exec(pod: &str, args: &[&str]) -> String {
    let mut command = vec!["exec", "-n", NAMESPACE, pod, "-c", "postfix", "--"];
    command.extend_from_slice(args);
    kubectl_ok(&command)
}

/// What the queue of MTA pod `pod` holds, one JSON object per message (`postqueue -j`).
pub fn queued(pod: &str) -> Vec<serde_json::Value> {
    postfix_exec(pod, &["postqueue", "-j"])
        .lines()
        .map(|line| serde_json::from_str(line).expect("postqueue -j prints JSON lines"))
        .collect()
}

/// Sends every message queued in pod `pod` now, one `postqueue -i` per queue id, as the runbook says (rather than at
/// Postfix's next retry, up to ten minutes away; `postqueue -f` needs a pickup service the mta image does not run).
pub fn send_queued_now(pod: &str) {
    for entry in queued(pod) {
        let queue_id = entry["queue_id"].as_str().expect("a queue id");
        postfix_exec(pod, &["postqueue", "-i", queue_id]);
    }
}
