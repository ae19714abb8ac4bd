//! DNS as a cluster has it, on the test node (`make e2e-node`). The sidecars name no resolver: they ask cluster DNS
//! (CoreDNS) like any pod and validate DNSSEC themselves, with the trust anchors the chart gives them (the world's
//! root here). `node-install.sh` points CoreDNS at the world's validating resolver, the common setup every other node
//! suite delivers through (DANE-verified, in their evidence). This suite puts a different upstream behind CoreDNS and
//! asks a running MTA pod's sidecar (`securemail-sidecar check-domain` with the pod's own configuration) what it
//! would do:
//! - a validating upstream: DANE for `dane.test`, `sts.test` provably unsigned so its MTA-STS policy is looked for
//!   and found, and `dane-servfail.test` (corrupted TLSA signature) without a policy, its mail waiting;
//! - an upstream that does not validate (e2e/node/dnsproxy.py asks with checking disabled, so bogus data comes
//!   through, as `dig` shows): the same, `dane-servfail.test` now refused by the sidecar's own validation;
//! - an upstream that strips DNSSEC records (signatures and denial proofs removed): every lookup DNSSEC-bogus, no
//!   policy at all, so mail waits (never a weaker policy): an unsigned zone under a signed root (`sts.test`) loses
//!   its proof of being unsigned too.

// Test support: a step that fails is a failed test, reported with the step's description.
#![allow(clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::{Api, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_e2e::dataplane::World;
use securemail_e2e::node::{mta_pods, wait_for_conditions};
use securemail_e2e::node_mail::{MailTenant, Mode, NAMESPACE, onboard};
use securemail_e2e::{client, kubectl, kubectl_ok, repo_root};

/// A one-address tenant of this suite (egress mode None: its pod need not be able to send to be asked).
const TENANT: &str = "dns-probe";
/// Where the suite's DNS proxy listens: the node's address, which pods reach.
const PROXY: (&str, u16) = ("10.240.0.1", 1053);

/// The suite's DNS proxy in one mode, stopped when dropped.
struct Upstream(Child);

impl Upstream {
    fn start(world: &World, mode: &str) -> Self {
        let child = Command::new("python3")
            .arg(repo_root().join("e2e/node/dnsproxy.py"))
            .args(["--listen-host", PROXY.0, "--listen-port", &PROXY.1.to_string()])
            .args(["--upstream-host", world.get("SMDP_RESOLVER"), "--mode", mode])
            .stdout(Stdio::null())
            .spawn()
            .expect("dnsproxy.py started");
        Self(child)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Points cluster DNS at `upstream` (`host:port`) and waits for a CoreDNS pod started with it (so nothing cached
/// under the previous upstream answers).
fn cluster_dns_upstream(upstream: &str) {
    let corefile = kubectl_ok(&[
        "get",
        "configmap",
        "coredns",
        "-n",
        "kube-system",
        "-o",
        "jsonpath={.data.Corefile}",
    ]);
    let forward = corefile
        .lines()
        .find(|line| line.trim_start().starts_with("forward . "))
        .expect("the Corefile forwards");
    let corefile = corefile.replace(forward, &format!("        forward . {upstream}"));
    let patch = serde_json::json!({"data": {"Corefile": corefile}}).to_string();
    kubectl_ok(&[
        "patch",
        "configmap",
        "coredns",
        "-n",
        "kube-system",
        "--type=merge",
        "-p",
        &patch,
    ]);
    kubectl_ok(&["rollout", "restart", "deployment/coredns", "-n", "kube-system"]);
    kubectl_ok(&[
        "rollout",
        "status",
        "deployment/coredns",
        "-n",
        "kube-system",
        "--timeout=120s",
    ]);
}

/// What the sidecar of `pod` would do for `domain`, with the pod's own configuration.
fn check_domain(pod: &str, domain: &str) -> String {
    let output = kubectl(&[
        "exec",
        "-n",
        NAMESPACE,
        pod,
        "-c",
        "sidecar",
        "--",
        "/usr/local/bin/securemail-sidecar",
        "check-domain",
        domain,
        "--config",
        "/etc/securemail/sidecar/sidecar-0.yaml",
    ]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asks until the report for `domain` holds every one of `expected` (cluster DNS and its upstream settle within
/// seconds of a restart), or panics naming the upstream and the last report.
fn expect_report(pod: &str, upstream: &str, domain: &str, expected: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = check_domain(pod, domain);
        if expected.iter().all(|part| report.contains(part)) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "{upstream}: check-domain {domain} lacks {expected:?}:\n{report}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[tokio::test]
async fn dane_and_mta_sts_hold_with_the_upstreams_cluster_dns_may_have() {
    let world = World::load();
    let client = client().await;
    let probe = MailTenant::new(
        Mode::None,
        TENANT,
        "dnsprobe.tenant.test",
        "dnsprobe",
        &["10.78.0.21".to_owned()],
    );
    let tls = onboard(&world, &probe);
    let tenants: Api<SecureMailTenant> = Api::namespaced(client.clone(), NAMESPACE);
    // Its pod runs (the sidecar answers) but cannot send: nobody gave it its address.
    wait_for_conditions(&tenants, NAMESPACE, TENANT, &[("EgressReady", "False")]).await;
    let pod = mta_pods(&client, NAMESPACE, TENANT)
        .await
        .first()
        .map(ResourceExt::name_any)
        .expect("the tenant's MTA pod");

    let validating = format!("{}:53", world.get("SMDP_RESOLVER"));
    let proxy = format!("{}:{}", PROXY.0, PROXY.1);
    for (upstream, proxy_mode) in [
        ("validating", None),
        ("unvalidated", Some("unvalidated")),
        ("strip", Some("strip")),
    ] {
        let _proxy = proxy_mode.map(|mode| Upstream::start(&world, mode));
        cluster_dns_upstream(if proxy_mode.is_some() { &proxy } else { &validating });
        if upstream == "strip" {
            for domain in ["dane.test", "sts.test", "dane-servfail.test"] {
                let bogus = format!(
                    "Lookup failed: DNS MX lookup for {domain} failed: DNSSEC validation failed (bogus answer)"
                );
                let report = expect_report(&pod, upstream, domain, &[&bogus]);
                assert!(
                    !report.contains("Policy: "),
                    "{upstream}: a policy without DNSSEC:\n{report}"
                );
            }
            println!("{upstream} upstream: every lookup DNSSEC-bogus, no policy, mail waits");
            continue;
        }
        expect_report(
            &pod,
            upstream,
            "dane.test",
            &[
                "MX records (DNSSEC-secure)",
                "TLSA _25._tcp.mx.dane.test (secure, 1 of 1 usable)",
                "mx.dane.test: DANE (1 TLSA records) [from DANE]",
            ],
        );
        // Unsigned under the signed root: provably insecure, so MTA-STS is looked for, and found. (Its policy is
        // served with the world's test CA, which the sidecar image does not trust: fetching it is proven by the
        // data-plane suites.)
        expect_report(
            &pod,
            upstream,
            "sts.test",
            &["MX records (not DNSSEC-secure)", "sts.test announces an MTA-STS policy"],
        );
        // A corrupted TLSA signature: no policy, the mail waits, whether the upstream or the sidecar finds it.
        expect_report(
            &pod,
            upstream,
            "dane-servfail.test",
            &[
                "TLSA _25._tcp.mx.dane-servfail.test: TEMPORARY FAILURE",
                "Policy: none yet, try later",
            ],
        );
        if upstream == "unvalidated" {
            // The upstream handed the bogus record on: the sidecar's own validation refused it.
            let dig = Command::new("dig")
                .args([
                    &format!("@{}", PROXY.0),
                    "-p",
                    &PROXY.1.to_string(),
                    "+dnssec",
                    "+noall",
                    "+answer",
                ])
                .args(["_25._tcp.mx.dane-servfail.test", "TLSA"])
                .output()
                .expect("dig");
            let answer = String::from_utf8_lossy(&dig.stdout);
            assert!(
                answer.contains("RRSIG"),
                "the unvalidated upstream answers the bogus TLSA: {answer}"
            );
        }
        println!("{upstream} upstream: DANE for dane.test, MTA-STS found for sts.test, dane-servfail.test waits");
    }
    cluster_dns_upstream(&validating);
    kubectl_ok(&["delete", "smt", "-n", NAMESPACE, TENANT, "--wait=false"]);
    std::fs::remove_dir_all(&tls).ok();
}
