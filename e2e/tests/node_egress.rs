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
//!
//! The tenant's NetworkPolicy, enforced by the node's kube-router: an application pod in a namespace the tenant does
//! not allow cannot open the submission port, by the Service or the pod's address, though it holds a valid client
//! certificate; once the tenant lists its namespace in `submission.allowedNamespaces`, the same pod submits.
// Test support: a step that fails is a failed test, reported with the step's description.
#![allow(clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{Api, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_e2e::dataplane::{World, in_netns, output_with_input, run_ok};
use securemail_e2e::node::{mta_pods, ordinal, wait_for_conditions, wait_ready};
use securemail_e2e::node_mail::{
    MailTenant, Mode, NAMESPACE, RECIPIENT, assert_dkim_verifies, evidence_of_delivery, message, onboard, pod_ip,
    proxy_addresses, publish_dns, received, send_queued_now, sidecar_get, submit, volume_dir, wait_delivered,
};
use securemail_e2e::tenants::condition;
use securemail_e2e::{client, kubectl_ok};

/// Addresses the world routes to this machine (`SMDP_HOST_ROUTED_CIDR`, 10.78.0.0/24) for mode None's pods.
const DIRECT_ADDRESSES: [&str; 2] = ["10.78.0.11", "10.78.0.12"];

/// An application pod in `namespace` not allowed to submit to the proxied tenant.
const OUTSIDER_NAMESPACE: &str = "egress-outsider";

/// An application pod in `namespace` (the probe image), with the submission server's CA and, when
/// `with_certificate`, the application's client certificate from a Secret; waits until it runs.
fn start_app(mail: &MailTenant, tls: &Path, namespace: &str, pod: &str, with_certificate: bool) {
    let file = |name: &str| tls.join(name).to_string_lossy().into_owned();
    let secret = kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "-n",
        namespace,
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
metadata: {{name: {pod}, namespace: {namespace}}}
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
        sender = mail.sender(),
    );
    let path = tls.join(format!("{pod}.yaml"));
    fs::write(&path, manifest).expect("manifest written");
    kubectl_ok(&["apply", "-f", &path.to_string_lossy()]);
    kubectl_ok(&[
        "wait",
        "-n",
        namespace,
        "--for=condition=Ready",
        "--timeout=120s",
        &format!("pod/{pod}"),
    ]);
}

/// The application pod `namespace/pod` submits message `id` to `server` (by default the tenant's submission Service
/// by its cluster DNS name); returns whether the probe said "sent", and what it printed.
fn app_submit(mail: &MailTenant, namespace: &str, pod: &str, server: Option<&str>, id: &str) -> (bool, String) {
    let service = format!("{}-submission.{NAMESPACE}.svc:587", mail.tenant);
    let server = server.unwrap_or(&service);
    // Until cluster DNS, kube-proxy and the NetworkPolicy enforcement know the Service and the pods (a pod just
    // turned ready, a policy just changed), the probe cannot reach it; what happens once it can is the answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = output_with_input(
            Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(securemail_e2e::kubeconfig())
                .args(["exec", "-i", "-n", namespace, pod, "--", "/probe", "submit", server]),
            &message(mail, id),
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        // kubectl itself may add lines of its own on stderr (its exec stream): the probe's verdict is on stdout.
        let printed = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
        let unreachable = ["dial tcp", "lookup "].iter().any(|failure| printed.contains(failure));
        if !unreachable || Instant::now() > deadline {
            return (output.status.success() && stdout.trim() == "sent", printed);
        }
        println!("{pod}: {server} not reachable yet: {}", printed.trim());
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The tenant's NetworkPolicy as kube-router enforces it: a pod in a namespace the tenant does not allow, holding a
/// valid client certificate, cannot connect to the submission port, through the Service or to a pod; once the
/// tenant allows its namespace it submits message `id`, which is returned.
async fn outsider_submits_only_once_allowed(mail: &MailTenant, tls: &Path, pods: &[Pod], id: &str) -> String {
    kubectl_ok(&["create", "namespace", OUTSIDER_NAMESPACE]);
    let outsider = format!("{}-outsider", mail.tenant);
    start_app(mail, tls, OUTSIDER_NAMESPACE, &outsider, true);
    // The pods listen for submission on 587 too.
    let pod_server = format!("{}:587", pod_ip(&pods[0]));
    for server in [None, Some(pod_server.as_str())] {
        let (sent, printed) = app_submit(mail, OUTSIDER_NAMESPACE, &outsider, server, id);
        assert!(
            !sent && printed.contains("dial tcp") && !printed.contains("lookup "),
            "{outsider} in {OUTSIDER_NAMESPACE} must not connect to {}: {printed}",
            server.unwrap_or("the submission Service")
        );
        println!("{outsider} → {}: {}", server.unwrap_or("Service"), printed.trim());
    }
    kubectl_ok(&[
        "patch",
        "securemailtenant",
        "-n",
        NAMESPACE,
        mail.tenant,
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{{"submission":{{"allowedNamespaces":["{OUTSIDER_NAMESPACE}"]}}}}}}"#),
    ]);
    let (sent, printed) = app_submit(mail, OUTSIDER_NAMESPACE, &outsider, None, id);
    assert!(sent, "{outsider} once {OUTSIDER_NAMESPACE} is allowed: {printed}");
    kubectl_ok(&["delete", "namespace", OUTSIDER_NAMESPACE, "--wait=false"]);
    id.to_owned()
}

/// SPF for the tenant's domain, evaluated by pyspf for `address` and `helo` against the world's DNS.
fn spf_result(world: &World, mail: &MailTenant, address: &str, helo: &str) -> String {
    run_ok(in_netns(world.get("SMDP_MTA_NETNS"), "python3").args([
        "-c",
        "import spf, sys; print(spf.check2(i=sys.argv[1], s=sys.argv[2], h=sys.argv[3])[0])",
        address,
        &mail.sender(),
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
    let proof = match mode {
        Mode::Socks5Proxy => MailTenant::new(
            mode,
            "egress-proxy",
            "proxy.tenant.test",
            "proxied",
            &proxy_addresses(&world, 0),
        ),
        Mode::None => MailTenant::new(
            mode,
            "egress-direct",
            "direct.tenant.test",
            "direct",
            &DIRECT_ADDRESSES.map(str::to_owned),
        ),
    };
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
    start_app(&proof, &tls, NAMESPACE, &app, true);
    for index in 0..2 {
        let id = format!("{name}-{run}-app-{index}");
        let (sent, printed) = app_submit(&proof, NAMESPACE, &app, None, &id);
        assert!(sent, "{app} submitting {id}: {printed}");
        ids.push(id);
    }
    let anonymous = format!("{name}-app-no-cert");
    start_app(&proof, &tls, NAMESPACE, &anonymous, false);
    let (sent, printed) = app_submit(&proof, NAMESPACE, &anonymous, None, &format!("{name}-{run}-no-cert"));
    assert!(!sent, "{anonymous} submitted without a client certificate: {printed}");
    // Refused by the server it reached and verified, not lost on the way.
    assert!(
        ["dial tcp", "lookup ", "unknown authority", "greeting:"]
            .iter()
            .all(|failure| !printed.contains(failure)),
        "{anonymous} must reach and verify the submission server, then be refused: {printed}"
    );
    println!("{anonymous}: {}", printed.trim());
    if mode == Mode::Socks5Proxy {
        ids.push(outsider_submits_only_once_allowed(&proof, &tls, &pods, &format!("{name}-{run}-outsider")).await);
    }
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
    send_queued_now(&lost_pod);
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
