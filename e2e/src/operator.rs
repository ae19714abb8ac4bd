//! Runs the real operator binary against the test control plane under the ServiceAccount of the Helm chart's
//! release, with exactly the chart's RBAC rules, so a missing permission fails the suite.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;

use crate::dataplane::run_ok;
use crate::leaks::{self, Secrets};
use crate::{kubeconfig, kubectl_ok, repo_root};

/// The operator's identity as the apiserver (and its audit log) sees it.
pub const OPERATOR_USER: &str = "system:serviceaccount:securemail-system:securemail-operator";

/// Selects everything the operator owns (its managed-by label).
const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=securemail-operator";

/// A running operator process; killed when dropped (also when a test panics).
#[derive(Debug)]
pub struct Operator {
    child: Child,
    pub admin_port: u16,
    pub log: PathBuf,
    leader_election: bool,
}

impl Operator {
    /// Starts the operator binary named by `SECUREMAIL_OPERATOR_BIN` (set by `make e2e`) with leader election.
    pub fn start(admin_port: u16) -> Self {
        Self::spawn(admin_port, true)
    }

    /// Starts a single replica without a Lease, so a restart after `kill` reconciles at once instead of waiting for
    /// the dead holder's lease to expire.
    pub fn start_single(admin_port: u16) -> Self {
        Self::spawn(admin_port, false)
    }

    /// Starts a single replica managing only `namespaces`, as the release `release` installed with the chart's
    /// default per-namespace RBAC for them ([`install_chart`]).
    pub fn start_for_namespaces(admin_port: u16, release: &str, namespaces: &[&str]) -> Self {
        let namespaces = format!("--tenant-namespaces={}", namespaces.join(","));
        Self::spawn_as(admin_port, false, release, &[&namespaces])
    }

    fn spawn(admin_port: u16, leader_election: bool) -> Self {
        install_chart(E2E_RELEASE, &["-f", "e2e/testdata/chart-values.yaml"]);
        Self::spawn_as(admin_port, leader_election, E2E_RELEASE, &[])
    }

    /// The pod name the replica runs as: its identity in the Lease and in its User-Agent.
    pub fn identity(&self) -> String {
        identity(self.admin_port)
    }

    /// How the process ended, once it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|err| panic!("cannot check the operator process: {err}"))
    }

    /// What a Deployment does with a container that exited: the same pod (identity) starts again. For operators
    /// from [`Operator::start`] and [`Operator::start_single`].
    pub fn restart(self) -> Self {
        let (admin_port, leader_election) = (self.admin_port, self.leader_election);
        drop(self);
        Self::spawn(admin_port, leader_election)
    }

    fn spawn_as(admin_port: u16, leader_election: bool, release: &str, extra_args: &[&str]) -> Self {
        let binary = std::env::var("SECUREMAIL_OPERATOR_BIN")
            .unwrap_or_else(|_| panic!("SECUREMAIL_OPERATOR_BIN is not set; run the suite with `make e2e`"));
        let kubeconfig = operator_kubeconfig(release);
        let log = std::env::temp_dir().join(format!("securemail-operator-{admin_port}.log"));
        let log_file = std::fs::File::create(&log).unwrap_or_else(|err| panic!("{}: {err}", log.display()));
        let child = Command::new(binary)
            .args(["run", "--admin-address", &format!("127.0.0.1:{admin_port}")])
            // Short, so drain cases finish quickly; long enough for a test to change the queue in between.
            .args(["--drain-confirmation-seconds", "5"])
            .args(["--evidence-sweep-seconds", "2"])
            .args(["--dnsbl-nameserver", &crate::dnsbl::address()])
            .args(leader_election.then_some("--leader-election"))
            .args(extra_args)
            .envs(crate::clock::set_clock_env(0))
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", "securemail-system")
            .env("POD_NAME", identity(admin_port))
            .env(
                "RUST_LOG",
                std::env::var("SECUREMAIL_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".to_owned()),
            )
            .stdout(Stdio::from(log_file.try_clone().unwrap_or_else(|err| panic!("{err}"))))
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start the operator: {err}"));
        Self {
            child,
            admin_port,
            log,
            leader_election,
        }
    }

    /// Kills the process at once, like a crashed pod; returns the moment it was gone (before the checks that run
    /// when an operator is dropped).
    pub fn kill(mut self) -> jiff::Timestamp {
        self.stop();
        jiff::Timestamp::now()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The operator's /metrics text.
    pub async fn metrics(&self) -> String {
        self.scrape()
    }

    /// The /metrics text, empty once the process is gone.
    fn scrape(&self) -> String {
        let output = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{}/metrics", self.admin_port)])
            .output();
        output
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Sweeps what this operator wrote (its log and metrics) and what every operator wrote to the apiserver
    /// (tenant status, events) for the private keys of every key Secret the operators made.
    fn assert_no_key_material(&self, metrics: String) {
        let mut secrets = Secrets::default();
        // One `# namespace/name` line per Secret, then its decoded values.
        let keys = kubectl_ok(&[
            "get",
            "secrets",
            "--all-namespaces",
            "-l",
            MANAGED_SELECTOR,
            "-o",
            "go-template={{range .items}}# {{.metadata.namespace}}/{{.metadata.name}}\n\
             {{range $value := .data}}{{$value | base64decode}}\n{{end}}{{end}}",
        ]);
        for secret in keys.split("\n# ").map(|block| block.trim_start_matches("# ")) {
            let (origin, pem) = secret.split_once('\n').unwrap_or((secret, ""));
            secrets.add_private_keys(origin, pem);
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let sources = [
            (format!("operator log {}", self.log.display()), log),
            ("operator metrics".to_owned(), metrics),
            (
                "tenant status".to_owned(),
                kubectl_ok(&["get", "securemailtenants", "--all-namespaces", "-o", "json"]),
            ),
            (
                "events".to_owned(),
                kubectl_ok(&["get", "events", "--all-namespaces", "-o", "json"]),
            ),
        ];
        leaks::assert_none_in(&secrets, &sources);
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let metrics = self.scrape();
        self.stop();
        if !std::thread::panicking() {
            self.assert_no_key_material(metrics);
        }
    }
}

fn identity(admin_port: u16) -> String {
    format!("e2e-{admin_port}")
}

/// The chart release the suites run the operator under (its ServiceAccount is [`OPERATOR_USER`]).
pub const E2E_RELEASE: &str = "securemail-operator";

/// Installs (or upgrades) the chart as `release` in `securemail-system` with `values` (helm arguments, paths relative
/// to the repository), once per release and test process. The CRD the suites installed is adopted, not replaced.
pub fn install_chart(release: &str, values: &[&str]) {
    static INSTALLED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut installed = INSTALLED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if installed.contains(release) {
        return;
    }
    run_ok(
        Command::new(repo_root().join("e2e/helm.sh"))
            .current_dir(repo_root())
            .args(["upgrade", "--install", release, "charts/securemail-operator"])
            .args([
                "--namespace",
                "securemail-system",
                "--create-namespace",
                "--take-ownership",
            ])
            .args(values)
            .env("KUBECONFIG", kubeconfig()),
    );
    installed.insert(release.to_owned());
}

/// A kubeconfig holding a token of `release`'s ServiceAccount, from `e2e/operator-kubeconfig.sh`.
pub fn operator_kubeconfig(release: &str) -> PathBuf {
    let path = run_ok(
        Command::new(repo_root().join("e2e/operator-kubeconfig.sh"))
            .args([release, "securemail-system"])
            .env("KUBECONFIG", kubeconfig()),
    );
    PathBuf::from(path.trim())
}
