//! How `/status` and the queue gauges of `/metrics` are put together. The server only calls a [`StatusSource`] and
//! a [`MetricsRefresh`]; what goes into them (the address, the queue and the delivery counts) is decided by whoever
//! builds them.

use std::sync::Arc;
use std::time::SystemTime;

use securemail_api::sidecar_config::SidecarConfig;
use securemail_api::sidecar_status::{DeliveryDay, QueueStatus, ReputationStatus, SidecarStatus};
use tokio::sync::watch;

use crate::egress::EgressHealth;
use crate::evidence::HeadsHandle;
use crate::metrics::Metrics;
use crate::queue::{self, QueueError};

/// Why a status could not be built; its message is the 503 body.
pub type StatusError = Box<dyn std::error::Error + Send + Sync>;

/// Builds the current status. Called off the async executor, so it may block on file I/O. To add fields, wrap the
/// source from [`queue_status`] in another closure.
pub type StatusSource = Arc<dyn Fn() -> Result<SidecarStatus, StatusError> + Send + Sync>;

/// Brings gauges up to date just before `/metrics` is encoded. Called off the async executor, so it may block on
/// file I/O.
pub type MetricsRefresh = Arc<dyn Fn() + Send + Sync>;

/// The pool address, Postfix's queue (from the configuration in use at each request; `now` dates the oldest
/// message), and the delivery counts of today and of the previous day (`days`).
pub fn pod_status(
    config: watch::Receiver<Arc<SidecarConfig>>,
    now: impl Fn() -> SystemTime + Send + Sync + 'static,
    days: impl Fn() -> (DeliveryDay, Option<DeliveryDay>) + Send + Sync + 'static,
) -> StatusSource {
    Arc::new(move || {
        let config = Arc::clone(&config.borrow());
        let (today, yesterday) = days();
        Ok(SidecarStatus {
            address: config.source.address,
            queue: scan_queue(&config, now())?,
            today: Some(today),
            yesterday,
            reputation: None,
            egress: None,
            evidence: None,
        })
    })
}

/// Counts Postfix's queue (from the configuration in use at each scrape) into `metrics`' queue gauges; a failed
/// count is counted as such and leaves the gauges absent.
pub fn queue_metrics(
    config: watch::Receiver<Arc<SidecarConfig>>,
    now: impl Fn() -> SystemTime + Send + Sync + 'static,
    metrics: Metrics,
) -> MetricsRefresh {
    Arc::new(move || {
        let config = Arc::clone(&config.borrow());
        match scan_queue(&config, now()) {
            Ok(queue) => metrics.queue_counted(&queue),
            Err(err) => {
                tracing::warn!(%err, "cannot count Postfix's queue for /metrics");
                metrics.queue_scan_failed();
            }
        }
    })
}

fn scan_queue(config: &SidecarConfig, now: SystemTime) -> Result<QueueStatus, QueueError> {
    let queue_dir = config.postfix_queue_dir.as_deref().ok_or(QueueError::NotConfigured)?;
    queue::scan(queue_dir, now)
}

/// `source`'s status with the reputation sensors' part added.
pub fn with_reputation(
    source: StatusSource,
    reputation: impl Fn() -> ReputationStatus + Send + Sync + 'static,
) -> StatusSource {
    Arc::new(move || {
        let mut status = source()?;
        status.reputation = Some(reputation());
        Ok(status)
    })
}

/// `source`'s status with the egress self-check's last result added.
pub fn with_egress(source: StatusSource, health: EgressHealth) -> StatusSource {
    Arc::new(move || {
        let mut status = source()?;
        status.egress = health.status();
        Ok(status)
    })
}

/// `source`'s status with the chain head of every evidence file added.
pub fn with_evidence(source: StatusSource, heads: HeadsHandle) -> StatusSource {
    Arc::new(move || {
        let mut status = source()?;
        status.evidence = Some(heads.snapshot());
        Ok(status)
    })
}
