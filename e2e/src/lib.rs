//! Helpers for the end-to-end suites. They talk to the kube-apiserver named by `KUBECONFIG` (written by
//! `e2e/cluster-up.sh`); without one every suite fails rather than skipping, so a green run proves the real
//! apiserver was exercised.
#![forbid(unsafe_code)]

pub mod bulk;
pub mod clock;
pub mod dataplane;
pub mod dnsbl;
pub mod leaks;
pub mod node;
pub mod node_mail;
pub mod operator;
pub mod tenants;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root (the e2e crate lives one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The kubeconfig of the test control plane; panics with a hint when the suite was started without one.
pub fn kubeconfig() -> String {
    match std::env::var("KUBECONFIG") {
        Ok(path) if Path::new(&path).is_file() => path,
        _ => panic!(
            "KUBECONFIG does not name a kubeconfig file; run the suite with `make e2e`, which starts the control plane"
        ),
    }
}

/// Runs kubectl against the test control plane and returns its output whatever the exit status.
pub fn kubectl(args: &[&str]) -> Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run kubectl {args:?}: {err}"))
}

/// Runs kubectl, panics with its stderr unless it succeeds, and returns its stdout.
pub fn kubectl_ok(args: &[&str]) -> String {
    let output = kubectl(args);
    assert!(
        output.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Installs the committed CRD (the file users apply, which `make check-crds` keeps equal to the code) once per
/// test binary and waits until the apiserver serves it.
pub fn ensure_crd() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let crd = repo_root().join("crds/securemailtenants.securemail.io.yaml");
        let crd = crd.to_string_lossy();
        kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", &crd]);
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/securemailtenants.securemail.io",
        ]);
    });
}

/// Installs a third-party CRD taken from its project's pinned Go module (`e2e/fetch-crd.sh SOURCE`) and waits until
/// the apiserver serves `crd` (its `plural.group` name).
pub fn install_third_party_crd(source: &str, crd: &str) {
    let script = repo_root().join("e2e/fetch-crd.sh");
    let output = Command::new(&script)
        .arg(source)
        .output()
        .unwrap_or_else(|err| panic!("{}: {err}", script.display()));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let file = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    kubectl_ok(&["apply", "--server-side", "-f", &file]);
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        &format!("crd/{crd}"),
    ]);
}

/// Creates a namespace unless it exists. Namespaces are never deleted by the suites: the test control plane has
/// no namespace controller, so a deleted namespace would stay Terminating.
pub fn ensure_namespace(name: &str) {
    let output = kubectl(&["create", "namespace", name]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() || stderr.contains("AlreadyExists"),
        "cannot create namespace {name}: {stderr}"
    );
}

/// A namespace name unique to this test run, so reruns against a live control plane do not collide.
pub fn unique_namespace(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or_default();
    let name = format!("{prefix}-{}-{nanos:x}", std::process::id());
    ensure_namespace(&name);
    name
}

/// The YAML files in a directory of the repository, sorted by name.
pub fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = repo_root().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

/// A kube client for the test control plane.
pub async fn client() -> kube::Client {
    kubeconfig();
    kube::Client::try_default()
        .await
        .unwrap_or_else(|err| panic!("cannot build a client from KUBECONFIG: {err}"))
}

/// The audit log the test control plane writes (every write request, metadata only).
pub fn audit_log() -> PathBuf {
    Path::new(&kubeconfig())
        .parent()
        .map(|dir| dir.join("audit.log"))
        .unwrap_or_else(|| PathBuf::from("audit.log"))
}

/// One write request (create, update, patch, delete) from the audit log.
#[derive(Debug, Clone)]
pub struct AuditWrite {
    pub verb: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// What the client sent as User-Agent; the operator names its replica there.
    pub user_agent: String,
    /// When the apiserver received the request.
    pub received: jiff::Timestamp,
    /// The HTTP status of the answer.
    pub code: u16,
}

/// Every write request `username` made, in the order the apiserver logged them.
pub fn audit_writes(username: &str) -> Vec<AuditWrite> {
    let text = std::fs::read_to_string(audit_log()).unwrap_or_default();
    let field = |event: &serde_json::Value, pointer: &str| {
        event
            .pointer(pointer)
            .and_then(|value| value.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["user"]["username"] == username)
        .map(|event| AuditWrite {
            verb: field(&event, "/verb"),
            resource: field(&event, "/objectRef/resource"),
            namespace: field(&event, "/objectRef/namespace"),
            name: field(&event, "/objectRef/name"),
            user_agent: field(&event, "/userAgent"),
            received: field(&event, "/requestReceivedTimestamp")
                .parse()
                .unwrap_or_else(|err| panic!("audit event without a valid requestReceivedTimestamp: {err}")),
            code: event
                .pointer("/responseStatus/code")
                .and_then(serde_json::Value::as_u64)
                .and_then(|code| u16::try_from(code).ok())
                .unwrap_or_default(),
        })
        .collect()
}

/// Write requests `username` made in `namespace`, from the audit log, as `verb resource/name`.
pub fn writes_by(username: &str, namespace: &str) -> Vec<String> {
    audit_writes(username)
        .into_iter()
        .filter(|write| write.namespace == namespace)
        .map(|write| format!("{} {}/{}", write.verb, write.resource, write.name))
        .collect()
}

/// Crashes one component of the test control plane, `apiserver` or `etcd`, with SIGKILL and starts it again with
/// the same command line and state (`e2e/cluster-restart.sh`), after `down_seconds` without it; returns the seconds
/// until the apiserver was ready again.
pub fn restart_control_plane(component: &str, down_seconds: u64) -> f64 {
    let script = repo_root().join("e2e/cluster-restart.sh");
    let config = kubeconfig();
    let dir = Path::new(&config).parent().unwrap_or_else(|| Path::new("."));
    let output = Command::new(&script)
        .arg(component)
        .arg(down_seconds.to_string())
        .env("SECUREMAIL_CLUSTER_DIR", dir)
        .output()
        .unwrap_or_else(|err| panic!("{}: {err}", script.display()));
    assert!(
        output.status.success(),
        "restarting {component} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A component that exited while starting and was started again says so (and why) on stderr.
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .trim()
        .parse()
        .unwrap_or_else(|err| panic!("cluster-restart.sh printed {stdout:?}, not seconds: {err}"))
}

/// Polls `check` every 200 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
