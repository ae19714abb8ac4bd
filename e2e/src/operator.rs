//! Runs the real operator binary against the test control plane under its own ServiceAccount, with the RBAC rules
//! from `e2e/testdata/operator-rbac.yaml`, so a missing permission fails the suite.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::{kubeconfig, repo_root};

/// The operator's identity as the apiserver (and its audit log) sees it.
pub const OPERATOR_USER: &str = "system:serviceaccount:securemail-system:securemail-operator";

/// A running operator process; killed when dropped (also when a test panics).
#[derive(Debug)]
pub struct Operator {
    child: Child,
    pub admin_port: u16,
    pub log: PathBuf,
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

    fn spawn(admin_port: u16, leader_election: bool) -> Self {
        let binary = std::env::var("SECUREMAIL_OPERATOR_BIN")
            .unwrap_or_else(|_| panic!("SECUREMAIL_OPERATOR_BIN is not set; run the suite with `make e2e`"));
        let kubeconfig = operator_kubeconfig();
        let log = std::env::temp_dir().join(format!("securemail-operator-{admin_port}.log"));
        let log_file = std::fs::File::create(&log).unwrap_or_else(|err| panic!("{}: {err}", log.display()));
        let child = Command::new(binary)
            .args(["run", "--admin-address", &format!("127.0.0.1:{admin_port}")])
            // Short, so drain cases finish quickly; long enough for a test to change the queue in between.
            .args(["--drain-confirmation-seconds", "5"])
            .args(["--dnsbl-nameserver", crate::dnsbl::DNSBL_SERVER])
            .args(leader_election.then_some("--leader-election"))
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", "securemail-system")
            .env("POD_NAME", format!("e2e-{admin_port}"))
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::from(log_file.try_clone().unwrap_or_else(|err| panic!("{err}"))))
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start the operator: {err}"));
        Self { child, admin_port, log }
    }

    /// Kills the process at once, like a crashed pod.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The operator's /metrics text.
    pub async fn metrics(&self) -> String {
        let output = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{}/metrics", self.admin_port)])
            .output();
        output
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The operator's kubeconfig: its ServiceAccount token with the RBAC rules of the suite, from
/// `e2e/operator-kubeconfig.sh`.
pub fn operator_kubeconfig() -> PathBuf {
    let script = repo_root().join("e2e/operator-kubeconfig.sh");
    let output = Command::new(&script)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", script.display()));
    assert!(
        output.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}
