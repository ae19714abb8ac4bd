//! On the test node (`make e2e-node`): monitoring as shipped. `e2e/node-install.sh` installs the Prometheus Operator
//! with a Prometheus it manages (both built from their pinned Go modules), then the chart with its
//! ServiceMonitor, PodMonitor and PrometheusRule carrying the label that Prometheus selects (`e2e/node-monitoring.sh`).
//!
//! Prometheus scrapes both operator pods and the sidecar of every running MTA pod under the jobs the alert pack's
//! "down" rules select (read from the rules, never written here), has loaded every alert of the pack, and while all of
//! it runs no alert fires and no "down" rule is even pending. With the operator's Deployment scaled to 0,
//! `SecureMailOperatorDown` becomes active; with one tenant's sidecar hung (SIGSTOP: its pod stays, its scrapes time
//! out), `SecureMailSidecarDown` becomes active for that pod alone, and, once the kubelet finds the pod unready and
//! the operator reports the tenant's pods not ready, `SecureMailMtaPodsNotReady` for that tenant alone; each clears
//! once restored.
//!
//! Active means pending or firing: pending already says the rule's expression holds on the series the monitors
//! produce, and waiting out the rules' `for:` (10 and 5 minutes) would add a quarter of an hour to the suite.
//!
//! A deleted MTA pod is not a "down" sidecar: its target goes with it, so it shows as `up == 0` only while the pod
//! exists. The pack covers missing and unready pods through the operator (`SecureMailMtaPodsNotReady`, pods that
//! cannot run `SecureMailMtaPodsCannotRun`) and no sidecar scraped at all through `SecureMailSidecarNotScraped`.
// Test support: a step that fails is a failed test, reported with the step's description.
#![allow(clippy::expect_used)]

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_e2e::dataplane::run_ok;
use securemail_e2e::node::{give_pods_their_addresses, mta_pods, wait_ready};
use securemail_e2e::{client, kubeconfig, kubectl_ok, repo_root};
use serde_json::Value;

const OPERATOR_NAMESPACE: &str = "securemail-system";
/// The chart's release (node-install.sh): its Deployment, and the label of the operator's pods.
const RELEASE: &str = "securemail-operator";
const OPERATOR_PODS: &str = "app.kubernetes.io/name=securemail-operator";
const MTA_PODS: &str = "app.kubernetes.io/managed-by=securemail-operator,app.kubernetes.io/component=mta";
/// The Prometheus node-monitoring.sh creates: `Prometheus` `monitoring/securemail`, whose first pod this is.
const MONITORING_NAMESPACE: &str = "monitoring";
const PROMETHEUS_POD: &str = "prometheus-securemail-0";
/// A tenant of this suite's own, in one of the chart's tenant namespaces (the examples').
const NAMESPACE: &str = "tenant-lakeside";
const TENANT: &str = "monitored";
const ADDRESS: &str = "192.0.2.233";
/// The monitors scrape and Prometheus evaluates every 5 s (node-monitoring.sh); a pod's start or end reaches service
/// discovery within seconds.
const SEEN: Duration = Duration::from_secs(120);

/// One alerting rule as the chart's PrometheusRule ships it.
struct Rule {
    alert: String,
    expr: String,
}

/// The rules of the chart's PrometheusRule, as installed in the operator's namespace.
fn chart_rules() -> Vec<Rule> {
    let list: Value = serde_json::from_str(&kubectl_ok(&[
        "get",
        "prometheusrules",
        "-n",
        OPERATOR_NAMESPACE,
        "-o",
        "json",
    ]))
    .expect("kubectl prints JSON");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "the chart's one PrometheusRule in {OPERATOR_NAMESPACE}");
    items[0]["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|rule| {
            Some(Rule {
                alert: rule["alert"].as_str()?.to_owned(),
                expr: rule["expr"].as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// The alerts of the pack in the repository (alerts/securemail.rules.yaml).
fn pack_alerts() -> BTreeSet<String> {
    let path = repo_root().join("alerts/securemail.rules.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let pack: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    pack["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|group| group["rules"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|rule| rule["alert"].as_str().map(str::to_owned))
        .collect()
}

/// The job whose `up` series alert `alert` reads: `up{job="..."}` in its expression.
fn job_read_by(rules: &[Rule], alert: &str) -> String {
    let rule = rules
        .iter()
        .find(|rule| rule.alert == alert)
        .unwrap_or_else(|| panic!("the chart's PrometheusRule has no {alert}"));
    rule.expr
        .split_once("up{job=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(job, _)| job.to_owned())
        .unwrap_or_else(|| panic!("{alert} reads no up{{job=...}}: {}", rule.expr))
}

/// Prometheus' HTTP API, at its pod's address (pod addresses are routed from the node's host).
struct Prometheus {
    base: String,
}

impl Prometheus {
    async fn find(client: &Client) -> Self {
        let pods: Api<Pod> = Api::namespaced(client.clone(), MONITORING_NAMESPACE);
        let pod = pods
            .get(PROMETHEUS_POD)
            .await
            .unwrap_or_else(|err| panic!("{MONITORING_NAMESPACE}/{PROMETHEUS_POD} (node-monitoring.sh): {err}"));
        let ip = pod
            .status
            .and_then(|status| status.pod_ip)
            .unwrap_or_else(|| panic!("{MONITORING_NAMESPACE}/{PROMETHEUS_POD} has no address"));
        Self {
            base: format!("http://{ip}:9090"),
        }
    }

    fn get(&self, path: &str) -> Value {
        let body = run_ok(Command::new("curl").args(["-sS", "--max-time", "10", &format!("{}{path}", self.base)]));
        let value: Value = serde_json::from_str(&body).unwrap_or_else(|err| panic!("{path}: {err}: {body}"));
        assert_eq!(value["status"], "success", "{path}: {body}");
        value["data"].clone()
    }

    /// Active targets: (job, namespace, pod, health, last error).
    fn targets(&self) -> Vec<Target> {
        self.get("/api/v1/targets?state=active")["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|target| {
                let label = |name: &str| target["labels"][name].as_str().unwrap_or_default().to_owned();
                Target {
                    job: label("job"),
                    namespace: label("namespace"),
                    pod: label("pod"),
                    health: target["health"].as_str().unwrap_or_default().to_owned(),
                    error: target["lastError"].as_str().unwrap_or_default().to_owned(),
                }
            })
            .collect()
    }

    /// Alerts pending or firing: (name, state, labels).
    fn alerts(&self) -> Vec<Alert> {
        self.get("/api/v1/alerts")["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|alert| Alert {
                name: alert["labels"]["alertname"].as_str().unwrap_or_default().to_owned(),
                state: alert["state"].as_str().unwrap_or_default().to_owned(),
                labels: alert["labels"].to_string(),
                pod: alert["labels"]["pod"].as_str().unwrap_or_default().to_owned(),
                tenant: alert["labels"]["tenant"].as_str().unwrap_or_default().to_owned(),
            })
            .collect()
    }

    /// The alerting rules Prometheus evaluates: (name, health, last error), and the oldest of its groups' last
    /// evaluation times.
    fn rules(&self) -> (Vec<(String, String, String)>, Option<jiff::Timestamp>) {
        let groups = self.get("/api/v1/rules?type=alert")["groups"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut rules = Vec::new();
        let mut oldest: Option<jiff::Timestamp> = None;
        for group in &groups {
            let evaluated = group["lastEvaluation"]
                .as_str()
                .and_then(|time| time.parse::<jiff::Timestamp>().ok());
            oldest = match (oldest, evaluated) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (None, time) | (time, None) => time,
            };
            for rule in group["rules"].as_array().cloned().unwrap_or_default() {
                let field = |name: &str| rule[name].as_str().unwrap_or_default().to_owned();
                rules.push((field("name"), field("health"), field("lastError")));
            }
        }
        (rules, oldest)
    }
}

#[derive(Debug)]
struct Target {
    job: String,
    namespace: String,
    pod: String,
    health: String,
    error: String,
}

#[derive(Debug)]
struct Alert {
    name: String,
    state: String,
    labels: String,
    pod: String,
    tenant: String,
}

/// Polls `check` every second until it returns `Ok`, or panics after `timeout` with `what` and the last reason.
async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(reason) => assert!(Instant::now() < deadline, "{what}: not so after {timeout:?}: {reason}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Running pods matching `labels` (in `namespace`, or everywhere) that are not being deleted: (namespace, name).
async fn running_pods(client: &Client, namespace: Option<&str>, labels: &str) -> BTreeSet<(String, String)> {
    let pods: Api<Pod> = match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    pods.list(&ListParams::default().labels(labels))
        .await
        .unwrap_or_else(|err| panic!("pods {labels}: {err}"))
        .items
        .into_iter()
        .filter(|pod| {
            pod.metadata.deletion_timestamp.is_none()
                && pod.status.as_ref().and_then(|status| status.phase.as_deref()) == Some("Running")
        })
        .map(|pod| (pod.namespace().unwrap_or_default(), pod.name_any()))
        .collect()
}

/// Every pod of `expected` is an active target of job `job` and up, and `job` has no other target.
fn scraped_as(targets: &[Target], job: &str, expected: &BTreeSet<(String, String)>) -> Result<(), String> {
    if expected.is_empty() {
        return Err(format!("no running pod to be scraped as {job}"));
    }
    let of_job: BTreeSet<(String, String)> = targets
        .iter()
        .filter(|target| target.job == job)
        .map(|target| (target.namespace.clone(), target.pod.clone()))
        .collect();
    if of_job != *expected {
        return Err(format!(
            "job {job:?} has targets {of_job:?}, the running pods are {expected:?}; all targets: {targets:?}"
        ));
    }
    match targets.iter().find(|target| target.job == job && target.health != "up") {
        Some(down) => Err(format!(
            "{}/{} ({job}) is {}: {}",
            down.namespace, down.pod, down.health, down.error
        )),
        None => Ok(()),
    }
}

/// Alerts that must not be there while everything runs: any firing one, and a "down" rule in any state.
fn loud<'a>(alerts: &'a [Alert], down_rules: &BTreeSet<String>) -> Vec<&'a Alert> {
    alerts
        .iter()
        .filter(|alert| alert.state == "firing" || down_rules.contains(&alert.name))
        .collect()
}

/// `alert` pending or firing, each instance for a pod (when it has one) in `pods`.
fn active(alerts: &[Alert], alert: &str, pods: &[&str]) -> Result<(), String> {
    let instances: Vec<&Alert> = alerts.iter().filter(|active| active.name == alert).collect();
    if instances.is_empty() {
        return Err(format!("{alert} is not active; active: {alerts:?}"));
    }
    assert!(
        instances
            .iter()
            .all(|instance| ["pending", "firing"].contains(&instance.state.as_str())),
        "{instances:?}"
    );
    if let Some(other) = instances
        .iter()
        .find(|instance| !pods.is_empty() && !pods.contains(&instance.pod.as_str()))
    {
        panic!("{alert} is active for {}, not only for {pods:?}", other.labels);
    }
    Ok(())
}

/// This suite's tenant: the minimal example under its own name, domain, address and Secrets.
fn own_tenant() -> PathBuf {
    let example = std::fs::read_to_string(repo_root().join("examples/minimal.yaml"))
        .unwrap_or_else(|err| panic!("examples/minimal.yaml: {err}"));
    let mut manifest = example.clone();
    for (from, to) in [
        ("  name: lakeside-clinic", format!("  name: {TENANT}")),
        ("notify.lakeside-clinic.example", format!("notify.{TENANT}.example")),
        ("192.0.2.10", ADDRESS.to_owned()),
        ("lakeside-submission-tls", format!("{TENANT}-submission-tls")),
        ("lakeside-apps-ca", format!("{TENANT}-apps-ca")),
    ] {
        assert!(example.contains(from), "examples/minimal.yaml no longer has {from:?}");
        manifest = manifest.replace(from, &to);
    }
    assert!(example.contains(&format!("  namespace: {NAMESPACE}")));
    let path = std::env::temp_dir().join(format!("securemail-{TENANT}-{}.yaml", std::process::id()));
    std::fs::write(&path, manifest).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    path
}

/// Runs `restore` when dropped, so that a failed step leaves the node as it found it.
struct Restore<F: FnMut()>(F);

impl<F: FnMut()> Drop for Restore<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// The host process id of container `container` of pod `namespace/pod` (the node's containerd runs on this host).
async fn container_pid(client: &Client, namespace: &str, pod: &str, container: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let status = pods
        .get(pod)
        .await
        .unwrap_or_else(|err| panic!("{namespace}/{pod}: {err}"))
        .status
        .unwrap_or_default();
    let id = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .find(|status| status.name == container)
        .and_then(|status| status.container_id)
        .and_then(|id| id.strip_prefix("containerd://").map(str::to_owned))
        .unwrap_or_else(|| panic!("{namespace}/{pod} has no running {container} container"));
    let kubeconfig = PathBuf::from(kubeconfig());
    let socket = kubeconfig
        .parent()
        .expect("the kubeconfig lives in the cluster directory")
        .join("node/containerd/containerd.sock");
    let tasks = run_ok(
        Command::new("ctr")
            .arg("-a")
            .arg(&socket)
            .args(["-n", "k8s.io", "tasks", "ls"]),
    );
    tasks
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(id.as_str())).then(|| fields.next().map(str::to_owned))?
        })
        .unwrap_or_else(|| panic!("containerd has no task {id} ({namespace}/{pod}/{container}):\n{tasks}"))
}

fn signal(pid: &str, signal: &str) {
    run_ok(Command::new("kill").args([signal, pid]));
}

#[tokio::test]
async fn the_charts_monitors_feed_every_alert_quiet_while_all_runs_and_the_down_alerts_when_pods_are_gone() {
    let client = client().await;
    let prometheus = Prometheus::find(&client).await;

    // The jobs the monitors must give their targets are the ones the pack's "down" rules read.
    let rules = chart_rules();
    let operator_job = job_read_by(&rules, "SecureMailOperatorDown");
    let sidecar_job = job_read_by(&rules, "SecureMailSidecarDown");
    let down_rules: BTreeSet<String> = rules
        .iter()
        .filter(|rule| rule.expr.contains("up{"))
        .map(|rule| rule.alert.clone())
        .collect();
    let shipped: BTreeSet<String> = rules.iter().map(|rule| rule.alert.clone()).collect();
    assert_eq!(
        shipped,
        pack_alerts(),
        "the chart's PrometheusRule holds the alert pack"
    );

    // A tenant with a running MTA pod (mode None: its address on its pod, as node.rs gives the examples theirs).
    let manifest = own_tenant();
    let tenants: Api<SecureMailTenant> = Api::namespaced(client.clone(), NAMESPACE);
    // A run before this one deleted it at its end: its drain may still be under way.
    until("an earlier run's tenant gone", SEEN, || async {
        match tenants.get_opt(TENANT).await {
            Ok(Some(old)) if old.metadata.deletion_timestamp.is_some() => Err(format!("{TENANT} is draining")),
            _ => Ok(()),
        }
    })
    .await;
    let existed = tenants.get_opt(TENANT).await.ok().flatten().is_some();
    let script = repo_root().join("e2e/apply-examples.sh");
    run_ok(Command::new(&script).arg(&manifest).env("KUBECONFIG", kubeconfig()));
    let _ = std::fs::remove_file(&manifest);
    if !existed {
        give_pods_their_addresses(&client, &tenants, NAMESPACE, TENANT).await;
    }
    wait_ready(&tenants, NAMESPACE, TENANT).await;

    // Scraped: both operator pods and every running MTA pod's sidecar, under the jobs the rules read, and up.
    let all_scraped = || async {
        let targets = prometheus.targets();
        let operators = running_pods(&client, Some(OPERATOR_NAMESPACE), OPERATOR_PODS).await;
        scraped_as(&targets, &operator_job, &operators)?;
        let sidecars = running_pods(&client, None, MTA_PODS).await;
        scraped_as(&targets, &sidecar_job, &sidecars)
    };
    until("the operator and every sidecar scraped", SEEN, &all_scraped).await;
    let operators = running_pods(&client, Some(OPERATOR_NAMESPACE), OPERATOR_PODS).await;
    let mta = running_pods(&client, None, MTA_PODS).await;
    assert!(
        mta.contains(&(NAMESPACE.to_owned(), format!("{TENANT}-mta-0"))),
        "{mta:?}"
    );
    println!(
        "scraped: {} operator pods as {operator_job:?}, {} sidecars as {sidecar_job:?}",
        operators.len(),
        mta.len()
    );

    // Every alert of the pack loaded and evaluated without error.
    let since = jiff::Timestamp::now();
    let (loaded, _) = until("every alert of the pack evaluated", SEEN, || async {
        let (loaded, oldest) = prometheus.rules();
        let names: BTreeSet<String> = loaded.iter().map(|(name, _, _)| name.clone()).collect();
        if names != shipped {
            return Err(format!("Prometheus evaluates {names:?}"));
        }
        if let Some(bad) = loaded.iter().find(|(_, health, _)| health != "ok") {
            return Err(format!("rule {bad:?}"));
        }
        // One evaluation after all targets were seen up, so the "down" rules had every series.
        match oldest {
            Some(time) if time > since => Ok((loaded, time)),
            other => Err(format!("rule groups last evaluated at {other:?}, before {since}")),
        }
    })
    .await;
    println!("{} alerts loaded and evaluated", loaded.len());

    // Quiet while everything runs.
    let alerts = prometheus.alerts();
    let noisy = loud(&alerts, &down_rules);
    assert!(noisy.is_empty(), "alerts while everything runs: {noisy:?}");

    // The operator gone: no replica to scrape.
    let replicas = kubectl_ok(&[
        "get",
        "deployment",
        RELEASE,
        "-n",
        OPERATOR_NAMESPACE,
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    let scale = |count: &str| {
        kubectl_ok(&[
            "scale",
            "deployment",
            RELEASE,
            "-n",
            OPERATOR_NAMESPACE,
            &format!("--replicas={count}"),
        ]);
    };
    {
        let restore = Restore(|| scale(&replicas));
        scale("0");
        until("the operator's pods gone", SEEN, || async {
            let left = running_pods(&client, Some(OPERATOR_NAMESPACE), OPERATOR_PODS).await;
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        })
        .await;
        until("SecureMailOperatorDown active", SEEN, || async {
            active(&prometheus.alerts(), "SecureMailOperatorDown", &[])
        })
        .await;
        println!("operator scaled to 0: SecureMailOperatorDown active");
        drop(restore);
    }
    kubectl_ok(&[
        "rollout",
        "status",
        "deployment",
        RELEASE,
        "-n",
        OPERATOR_NAMESPACE,
        "--timeout=180s",
    ]);
    until("the operator scraped again and its alert cleared", SEEN, || async {
        let operators = running_pods(&client, Some(OPERATOR_NAMESPACE), OPERATOR_PODS).await;
        scraped_as(&prometheus.targets(), &operator_job, &operators)?;
        match active(&prometheus.alerts(), "SecureMailOperatorDown", &[]) {
            Ok(()) => Err("SecureMailOperatorDown is still active".to_owned()),
            Err(_) => Ok(()),
        }
    })
    .await;

    // The tenant's sidecar hung: its pod stays (so does its target) and no scrape answers.
    let pod = format!("{TENANT}-mta-0");
    let pid = container_pid(&client, NAMESPACE, &pod, "sidecar").await;
    {
        let restore = Restore(|| signal(&pid, "-CONT"));
        signal(&pid, "-STOP");
        until("SecureMailSidecarDown active for the stopped sidecar", SEEN, || async {
            active(&prometheus.alerts(), "SecureMailSidecarDown", &[pod.as_str()])
        })
        .await;
        println!("sidecar of {NAMESPACE}/{pod} stopped: SecureMailSidecarDown active for it alone");
        until("SecureMailMtaPodsNotReady active for the tenant", SEEN, || async {
            let alerts = prometheus.alerts();
            active(&alerts, "SecureMailMtaPodsNotReady", &[])?;
            let tenants: Vec<&str> = alerts
                .iter()
                .filter(|alert| alert.name == "SecureMailMtaPodsNotReady")
                .map(|alert| alert.tenant.as_str())
                .collect();
            let this = format!("{NAMESPACE}/{TENANT}");
            if tenants.iter().all(|tenant| *tenant == this) {
                Ok(())
            } else {
                Err(format!(
                    "SecureMailMtaPodsNotReady active for {tenants:?}, not only {this}"
                ))
            }
        })
        .await;
        println!("{NAMESPACE}/{pod} unready: SecureMailMtaPodsNotReady active for {NAMESPACE}/{TENANT} alone");
        drop(restore);
    }
    until("every sidecar scraped again and the alerts quiet", SEEN, || async {
        all_scraped().await?;
        let alerts = prometheus.alerts();
        let noisy = loud(&alerts, &down_rules);
        if noisy.is_empty() {
            Ok(())
        } else {
            Err(format!("{noisy:?}"))
        }
    })
    .await;
    wait_ready(&tenants, NAMESPACE, TENANT).await;
    let pods = mta_pods(&client, NAMESPACE, TENANT).await;
    assert_eq!(pods.len(), 1, "{NAMESPACE}/{TENANT}: one MTA pod");

    // The tenant goes (Drain: its empty queue lets it go in the background).
    kubectl_ok(&["delete", "smt", "-n", NAMESPACE, TENANT, "--wait=false"]);
}
