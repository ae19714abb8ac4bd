//! Reading an MTA pod's `/status` from its sidecar: the queue for draining, yesterday's results for the warmup loop,
//! why an unready pod cannot send.

use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::PodStatus;
use securemail_api::sidecar_status::SidecarStatus;

use crate::build::config::SIDECAR_ADMIN_PORT;

/// How long a sidecar may take to answer `/status`.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The `/status` of the pod with this status, or why it could not be read.
pub async fn read(pod: Option<&PodStatus>) -> Result<SidecarStatus, String> {
    let ip = pod
        .and_then(|status| status.pod_ip.as_deref())
        .ok_or("the pod has no IP yet")?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    let url = format!("http://{host}:{SIDECAR_ADMIN_PORT}/status");
    let response = client()?
        .get(&url)
        .send()
        .await
        .map_err(|err| format!("/status unreachable: {err}"))?;
    if !response.status().is_success() {
        return Err(format!("/status answered {}", response.status()));
    }
    response
        .json::<SidecarStatus>()
        .await
        .map_err(|err| format!("/status is not valid: {err}"))
}

/// One HTTP client for every read, built on first use: its connection pool and TLS setup are not rebuilt per pod.
fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .timeout(STATUS_TIMEOUT)
                .build()
                .map_err(|err| format!("HTTP client: {err}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}
