//! On the test node with the data-plane world as its Internet (`make e2e-node` links the two), each egress mode
//! SecureMail offers, with one tenant, two MTA pods and two pool addresses:
//! - `Socks5Proxy`: the addresses are on the world's egress host, where a SOCKS5 proxy listens on each and sends from
//!   it;
//! - `None`: the platform puts each address on its pod and routes it back (here: the address added to the pod's
//!   interface, a host route to the pod, and the world routing the range to this machine).
//!
//! Messages submitted to the tenant's submission Service (by an application pod in the tenant's namespace through the
//! Service's cluster DNS name with its client certificate, from the node through the Service's address, and to each
//! pod, so both deliver; a pod without a client certificate is refused) reach a receiver in the world over TLS
//! verified by DANE, with a DKIM signature dkimpy verifies. For each, the receiver's Received header
//! gives the source address and the HELO name; they must be the address and host name of the pod whose evidence log
//! (on its volume) records the delivery, SPF for the tenant's domain must pass for that address (pyspf against the
//! world's DNS) and its PTR must confirm forward. When the second address goes out of its pod's reach, that pod
//! turns unready, the tenant's EgressReady names the pod and the address, an event and the sidecar's metric say so,
//! and its mail waits; once the address is back every message is delivered exactly once.
// Test support: a step that fails is a failed test, reported with the step's description.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Service};
use kube::{Api, Client, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_e2e::dataplane::{
    World, assert_dkimpy_verifies, in_netns, json_report, make_submission_certificates, output_with_input,
    received_containing, run_ok, sha256_hex,
};
use securemail_e2e::node::{mta_pods, ordinal, pod_address, wait_for_conditions, wait_ready};
use securemail_e2e::tenants::condition;
use securemail_e2e::{client, kubectl_ok, repo_root};

const NAMESPACE: &str = "tenant-egress";
/// The world's DANE receiver: verified TLS from its TLSA records and the world's DNSSEC root, no CA needed.
const RECIPIENT: &str = "patient@dane.test";
const RECEIVER_CASE: &str = "DANE";
/// From submission to the receiver's mailbox, through Postfix, the sidecar, the proxy and the receiver's Postfix.
const DELIVERED: Duration = Duration::from_secs(120);
/// Addresses the world routes to this machine (`SMDP_HOST_ROUTED_CIDR`, 10.78.0.0/24) for mode None's pods.
const DIRECT_ADDRESSES: [&str; 2] = ["10.78.0.11", "10.78.0.12"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Socks5Proxy,
    None,
}

/// One tenant proving one mode: its name, domain and pool (address, host name) in ordinal order.
struct Proof {
    mode: Mode,
    tenant: &'static str,
    domain: &'static str,
    pool: Vec<(String, String)>,
}

impl Proof {
    fn new(world: &World, mode: Mode) -> Self {
        let (tenant, domain, label, addresses): (_, _, _, Vec<String>) = match mode {
            Mode::Socks5Proxy => (
                "egress-proxy",
                "proxy.tenant.test",
                "proxied",
                world.get("SMDP_EGRESS_ADDRS").split(',').map(str::to_owned).collect(),
            ),
            Mode::None => (
                "egress-direct",
                "direct.tenant.test",
                "direct",
                DIRECT_ADDRESSES.iter().map(|address| (*address).to_owned()).collect(),
            ),
        };
        let pool = addresses
            .into_iter()
            .enumerate()
            .map(|(index, address)| (address, format!("{label}{}.tenant.test", index + 1)))
            .collect();
        Self {
            mode,
            tenant,
            domain,
            pool,
        }
    }

    fn sender(&self) -> String {
        format!("notices@{}", self.domain)
    }

    fn manifest(&self, world: &World) -> String {
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
    fn address(&self, world: &World, action: &str, pod: &Pod) {
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
    fn expected_reason(&self, world: &World, address: &str) -> String {
        match self.mode {
            Mode::Socks5Proxy => format!("proxy {address}:{}", world.get("SMDP_EGRESS_SOCKS_PORT")),
            Mode::None => "the address is not assigned to any interface of this pod".to_owned(),
        }
    }
}

/// The tenant's namespace (Pod Security `baseline`, as node-install.sh labels tenant namespaces), its submission
/// certificate and client CA, and the tenant. Returns the directory with the application's client certificate.
fn onboard(world: &World, proof: &Proof) -> PathBuf {
    let tls = std::env::temp_dir().join(format!("securemail-{}-{}", proof.tenant, std::process::id()));
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
        &format!("{}-submission-tls", proof.tenant),
        &format!("--cert={}", file("server.crt")),
        &format!("--key={}", file("server.key")),
    ]);
    secret(&[
        "generic",
        &format!("{}-apps-ca", proof.tenant),
        &format!("--from-file=ca.crt={}", file("client-ca.crt")),
    ]);
    apply(&proof.manifest(world));
    tls
}

/// Publishes what the platform team publishes for the pool: each host name's A record, and the tenant's
/// `status.dnsRecords` (SPF, DKIM, DMARC, PTR), in the world's dynamic zones.
fn publish_dns(world: &World, proof: &Proof, tenant: &SecureMailTenant) {
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
    for (address, hostname) in &proof.pool {
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
fn message(proof: &Proof, id: &str) -> Vec<u8> {
    let (sender, domain) = (proof.sender(), proof.domain);
    format!(
        "From: Clinic Notices <{sender}>\r\nTo: <{RECIPIENT}>\r\nSubject: Lab results ready {id}\r\n\
         Message-ID: <{id}@{domain}>\r\nDate: Mon, 07 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nYour lab results are ready in the portal.\r\n"
    )
    .into_bytes()
}

/// Submits message `id` on `host`:587 with STARTTLS and the application's client certificate.
fn submit(tls: &Path, proof: &Proof, host: &str, id: &str) {
    let mut command = Command::new("python3");
    command
        .arg(repo_root().join("e2e/dataplane/submit.py"))
        .args([
            "--host",
            host,
            "--port",
            "587",
            "--from",
            &proof.sender(),
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
        let report = json_report(&output_with_input(&mut command, &message(proof, id)), "submit.py");
        if report["stage"] != "connect" || Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(report["stage"], "sent", "submitting {id} to {host}: {report}");
}

/// The receiver's copies of message `id`, each as (source address, HELO name) from the Received header the
/// receiver added (its `smtpd_peername_lookup = no` writes `from HELO (unknown [ADDRESS])`).
fn received(world: &World, proof: &Proof, id: &str) -> Vec<(String, String)> {
    let needle = format!("Message-ID: <{id}@{}>", proof.domain);
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

fn wait_delivered(world: &World, proof: &Proof, ids: &[String]) {
    let deadline = Instant::now() + DELIVERED;
    loop {
        let missing: Vec<&String> = ids.iter().filter(|id| received(world, proof, id).is_empty()).collect();
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

/// An application pod in the tenant's namespace (the probe image), with the submission server's CA and, when
/// `with_certificate`, the application's client certificate from a Secret; waits until it runs.
fn start_app(proof: &Proof, tls: &Path, pod: &str, with_certificate: bool) {
    let file = |name: &str| tls.join(name).to_string_lossy().into_owned();
    let secret = kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "-n",
        NAMESPACE,
        &format!("{pod}-tls"),
        &format!("--from-file=ca.crt={}", file("server-ca.crt")),
        &format!("--from-file=tls.crt={}", file("client.crt")),
        &format!("--from-file=tls.key={}", file("client.key")),
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    let certificate = if with_certificate {
        "    - {name: CERT_FILE, value: /etc/app-tls/tls.crt}\n    - {name: KEY_FILE, value: /etc/app-tls/tls.key}\n"
    } else {
        ""
    };
    let manifest = format!(
        "{secret}---
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: {NAMESPACE}}}
spec:
  securityContext: {{runAsNonRoot: true, runAsUser: 65532, seccompProfile: {{type: RuntimeDefault}}}}
  containers:
  - name: app
    image: securemail.local/probe:1
    imagePullPolicy: Never
    command: [/probe, serve, ':8080']
    env:
    - {{name: FROM, value: {sender}}}
    - {{name: TO, value: {RECIPIENT}}}
    - {{name: CA_FILE, value: /etc/app-tls/ca.crt}}
    - {{name: SERVER_NAME, value: submission.test}}
{certificate}    volumeMounts: [{{name: tls, mountPath: /etc/app-tls, readOnly: true}}]
    securityContext: {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
  volumes: [{{name: tls, secret: {{secretName: {pod}-tls}}}}]
",
        sender = proof.sender(),
    );
    let path = tls.join(format!("{pod}.yaml"));
    fs::write(&path, manifest).expect("manifest written");
    kubectl_ok(&["apply", "-f", &path.to_string_lossy()]);
    kubectl_ok(&[
        "wait",
        "-n",
        NAMESPACE,
        "--for=condition=Ready",
        "--timeout=120s",
        &format!("pod/{pod}"),
    ]);
}

/// The application pod `pod` submits message `id` to the tenant's submission Service by its cluster DNS name;
/// returns whether the probe said "sent", and what it printed.
fn app_submit(proof: &Proof, pod: &str, id: &str) -> (bool, String) {
    let service = format!("{}-submission.{NAMESPACE}.svc:587", proof.tenant);
    let output = output_with_input(
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(securemail_e2e::kubeconfig())
            .args(["exec", "-i", "-n", NAMESPACE, pod, "--", "/probe", "submit", &service]),
        &message(proof, id),
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success() && printed.trim() == "sent", printed)
}

/// Where the volume of pod `ordinal` lives on the node (the local-path provisioner's directory).
async fn volume_dir(client: &Client, proof: &Proof, ordinal: usize) -> PathBuf {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NAMESPACE);
    let claim_name = format!("data-{}-mta-{ordinal}", proof.tenant);
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
fn evidence_of_delivery(volume: &Path, proof: &Proof, id: &str) -> Vec<serde_json::Value> {
    let hash = sha256_hex(&format!("<{id}@{}>", proof.domain));
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
fn assert_dkim_verifies(world: &World, proof: &Proof, tenant: &SecureMailTenant, id: &str) {
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
    let needle = format!("Message-ID: <{id}@{}>", proof.domain);
    let message = received_containing(world, RECEIVER_CASE, &needle)
        .pop()
        .unwrap_or_else(|| panic!("{id} was not received"));
    assert_dkimpy_verifies(&records, &message, id);
}

/// SPF for the tenant's domain, evaluated by pyspf for `address` and `helo` against the world's DNS.
fn spf_result(world: &World, proof: &Proof, address: &str, helo: &str) -> String {
    run_ok(in_netns(world.get("SMDP_MTA_NETNS"), "python3").args([
        "-c",
        "import spf, sys; print(spf.check2(i=sys.argv[1], s=sys.argv[2], h=sys.argv[3])[0])",
        address,
        &proof.sender(),
        helo,
    ]))
    .trim()
    .to_owned()
}

/// `dig +short` against the world's resolver.
fn dig(world: &World, args: &[&str]) -> String {
    run_ok(
        in_netns(world.get("SMDP_MTA_NETNS"), "dig")
            .arg(format!("@{}", world.get("SMDP_RESOLVER")))
            .arg("+short")
            .args(args),
    )
    .trim()
    .to_owned()
}

fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|status| status.pod_ip.clone())
        .expect("a running pod has an IP")
}

fn sidecar_get(pod: &Pod, path: &str) -> String {
    run_ok(Command::new("curl").args(["-sS", "--max-time", "5", &format!("http://{}:9090{path}", pod_ip(pod))]))
}

#[tokio::test]
async fn through_a_socks5_proxy_each_pod_sends_from_its_own_address_and_waits_while_it_cannot() {
    prove(Mode::Socks5Proxy).await;
}

#[tokio::test]
async fn with_the_address_on_the_pod_each_pod_sends_from_it_and_waits_while_it_is_gone() {
    prove(Mode::None).await;
}

async fn prove(mode: Mode) {
    let world = World::load();
    let client = client().await;
    let proof = Proof::new(&world, mode);
    let name = proof.tenant;
    let tls = onboard(&world, &proof);
    let tenants: Api<SecureMailTenant> = Api::namespaced(client.clone(), NAMESPACE);

    if mode == Mode::None {
        // The platform's part: once the pods run, each gets its address and the host routes it back.
        wait_for_conditions(&tenants, NAMESPACE, name, &[("EgressReady", "False")]).await;
        for pod in mta_pods(&client, NAMESPACE, name).await {
            proof.address(&world, "add", &pod);
        }
    }
    // Both pods pass their self-check: each can send from its own address.
    let tenant = wait_for_conditions(
        &tenants,
        NAMESPACE,
        name,
        &[("Ready", "True"), ("MtaAvailable", "True"), ("EgressReady", "True")],
    )
    .await;
    publish_dns(&world, &proof, &tenant);
    let mut pods = mta_pods(&client, NAMESPACE, name).await;
    pods.sort_by_key(|pod| ordinal(&pod.name_any()));
    assert_eq!(pods.len(), proof.pool.len(), "one pod per pool address");

    // Through the submission Service (kube-proxy picks the pod), then to each pod directly, so both deliver.
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let service = services
        .get(&format!("{name}-submission"))
        .await
        .expect("the submission Service");
    let service_ip = service
        .spec
        .and_then(|spec| spec.cluster_ip)
        .expect("the Service has a cluster IP");
    let run = std::process::id();
    let mut ids: Vec<String> = Vec::new();
    for index in 0..6 {
        let id = format!("{name}-{run}-service-{index}");
        submit(&tls, &proof, &service_ip, &id);
        ids.push(id);
    }
    // An application in the tenant's namespace, by the Service's cluster DNS name, with its client certificate; one
    // without a certificate is refused.
    let app = format!("{name}-app");
    start_app(&proof, &tls, &app, true);
    for index in 0..2 {
        let id = format!("{name}-{run}-app-{index}");
        let (sent, printed) = app_submit(&proof, &app, &id);
        assert!(sent, "{app} submitting {id}: {printed}");
        ids.push(id);
    }
    let anonymous = format!("{name}-app-no-cert");
    start_app(&proof, &tls, &anonymous, false);
    let (sent, printed) = app_submit(&proof, &anonymous, &format!("{name}-{run}-no-cert"));
    assert!(!sent, "{anonymous} submitted without a client certificate: {printed}");
    // Refused by the server it reached and verified, not lost on the way.
    assert!(
        ["dial tcp", "lookup ", "unknown authority", "greeting:"]
            .iter()
            .all(|failure| !printed.contains(failure)),
        "{anonymous} must reach and verify the submission server, then be refused: {printed}"
    );
    println!("{anonymous}: {}", printed.trim());
    for pod in &pods {
        for index in 0..2 {
            let id = format!("{name}-{run}-{}-{index}", pod.name_any());
            submit(&tls, &proof, &pod_ip(pod), &id);
            ids.push(id);
        }
    }
    wait_delivered(&world, &proof, &ids);

    let mut volumes = Vec::new();
    for index in 0..proof.pool.len() {
        volumes.push(volume_dir(&client, &proof, index).await);
    }
    let mut per_pod = vec![0; proof.pool.len()];
    for id in &ids {
        let copies = received(&world, &proof, id);
        assert_eq!(copies.len(), 1, "{id}: delivered once, got {copies:?}");
        let (source, helo) = &copies[0];
        let senders: Vec<usize> = (0..proof.pool.len())
            .filter(|index| !evidence_of_delivery(&volumes[*index], &proof, id).is_empty())
            .collect();
        assert_eq!(
            senders.len(),
            1,
            "{id}: one pod's evidence records its delivery: {senders:?}"
        );
        let sender = senders[0];
        per_pod[sender] += 1;
        let (address, hostname) = &proof.pool[sender];
        assert_eq!(
            (source, helo),
            (address, hostname),
            "{id} was delivered by pod {sender}: it must come from that pod's address with its host name"
        );
        // The evidence on the pod's volume: sent from its address, over TLS verified by DANE (the receiver's TLSA
        // records under the world's DNSSEC root).
        let evidence = evidence_of_delivery(&volumes[sender], &proof, id);
        assert_eq!(evidence.len(), 1, "{id}: {evidence:?}");
        assert_eq!(evidence[0]["sourceIp"].as_str(), Some(address.as_str()), "{id}");
        assert_eq!(evidence[0]["policy"]["source"], "dane", "{id}: {}", evidence[0]);
        assert_eq!(evidence[0]["tls"]["verification"], "dane-ee", "{id}: {}", evidence[0]);
        assert_dkim_verifies(&world, &proof, &tenant, id);
    }
    assert!(
        per_pod.iter().all(|count| *count >= 2),
        "both pods delivered: {per_pod:?}"
    );
    for (address, hostname) in &proof.pool {
        assert_eq!(
            spf_result(&world, &proof, address, hostname),
            "pass",
            "SPF of {} for {address}",
            proof.domain
        );
        // Forward-confirmed reverse DNS: the PTR names the HELO host, whose A record is the address.
        assert_eq!(dig(&world, &["-x", address]), format!("{hostname}."));
        assert_eq!(dig(&world, &[hostname, "A"]), *address);
    }
    println!(
        "{name} ({mode:?}): {} messages, per pod {per_pod:?}, each from its pod's address and HELO, SPF pass",
        ids.len()
    );

    // The second address goes out of its pod's reach: the pod cannot send, says so everywhere, and keeps its mail.
    let lost_pod = pods[1].name_any();
    let (lost_address, lost_hostname) = proof.pool[1].clone();
    proof.address(&world, "del", &pods[1]);
    let tenant = wait_for_conditions(&tenants, NAMESPACE, name, &[("EgressReady", "False")]).await;
    let (_, reason, message) = condition(&tenant, "EgressReady").expect("EgressReady");
    assert_eq!(reason, "CannotSendFromAddress");
    assert!(
        message.contains(&format!("pod {lost_pod} cannot send from {lost_address}: "))
            && message.contains(&proof.expected_reason(&world, &lost_address)),
        "{message}"
    );
    let (ready, ready_reason, _) = condition(&tenant, "Ready").expect("Ready");
    assert_eq!(
        (ready.as_str(), ready_reason.as_str()),
        ("False", "CannotSendFromAddress")
    );
    // The warning event about the tenant names the pod as the object it concerns.
    let events = kubectl_ok(&[
        "get",
        "events",
        "-n",
        NAMESPACE,
        "--field-selector",
        &format!("reason=CannotSendFromAddress,involvedObject.name={name}"),
        "-o",
        &format!("jsonpath={{range .items[?(@.related.name==\"{lost_pod}\")]}}{{.message}}{{\"\\n\"}}{{end}}"),
    ]);
    assert!(
        events.contains(&format!("pod {lost_pod} cannot send from {lost_address}")),
        "events related to {lost_pod}: {events}"
    );
    let metrics = sidecar_get(&pods[1], "/metrics");
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("securemail_egress_ready{") && line.ends_with(" 0")),
        "securemail_egress_ready of {lost_pod}:\n{metrics}"
    );

    let mut waiting = Vec::new();
    for index in 0..3 {
        let id = format!("{name}-{run}-waiting-{index}");
        submit(&tls, &proof, &pod_ip(&pods[1]), &id);
        waiting.push(id);
    }
    std::thread::sleep(Duration::from_secs(10));
    for id in &waiting {
        assert!(
            received(&world, &proof, id).is_empty(),
            "{id} left while {lost_pod} could not send from its address"
        );
    }
    let status: serde_json::Value = serde_json::from_str(&sidecar_get(&pods[1], "/status")).expect("/status is JSON");
    assert_eq!(status["egress"]["ready"], serde_json::json!(false), "{status}");
    assert!(
        status["queue"]["messages"].as_u64().unwrap_or_default() >= 3,
        "the mail waits in {lost_pod}'s queue: {status}"
    );

    // The address is back: the pod's next check passes, the tenant is Ready, and the queue drains, each message
    // sent at once as the runbook says (rather than at Postfix's next retry, up to ten minutes away).
    proof.address(&world, "add", &pods[1]);
    wait_ready(&tenants, NAMESPACE, name).await;
    let postfix = |args: &[&str]| {
        let mut command = vec!["exec", "-n", NAMESPACE, lost_pod.as_str(), "-c", "postfix", "--"];
        command.extend_from_slice(args);
        kubectl_ok(&command)
    };
    for entry in postfix(&["postqueue", "-j"]).lines() {
        let entry: serde_json::Value = serde_json::from_str(entry).expect("postqueue -j prints JSON lines");
        let queue_id = entry["queue_id"].as_str().expect("a queue id");
        postfix(&["postqueue", "-i", queue_id]);
    }
    wait_delivered(&world, &proof, &waiting);
    for id in &waiting {
        assert_eq!(
            received(&world, &proof, id),
            [(lost_address.clone(), lost_hostname.clone())],
            "{id}: delivered once, from {lost_address}"
        );
    }
    let tenant = tenants.get(name).await.expect("tenant");
    let (status, _, _) = condition(&tenant, "EgressReady").expect("EgressReady");
    assert_eq!(status, "True");
    if mode == Mode::None {
        for pod in &pods {
            proof.address(&world, "del", pod);
        }
    }
    fs::remove_dir_all(&tls).ok();
}
