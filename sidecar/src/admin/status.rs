//! How `/status` is put together. The server only calls a [`StatusSource`]; what goes into the status (the address,
//! the queue and the delivery counts) is decided by whoever builds that source.

use std::sync::Arc;
use std::time::SystemTime;

use securemail_api::sidecar_config::SidecarConfig;
use securemail_api::sidecar_status::{DeliveryDay, ReputationStatus, SidecarStatus};
use tokio::sync::watch;

use crate::queue::{self, QueueError};

/// Why a status could not be built; its message is the 503 body.
pub type StatusError = Box<dyn std::error::Error + Send + Sync>;

/// Builds the current status. Called off the async executor, so it may block on file I/O. To add fields, wrap the
/// source from [`queue_status`] in another closure.
pub type StatusSource = Arc<dyn Fn() -> Result<SidecarStatus, StatusError> + Send + Sync>;

/// The pool address, Postfix's queue (from the configuration in use at each request; `now` dates the oldest
/// message) and today's delivery counts.
pub fn pod_status(
    config: watch::Receiver<Arc<SidecarConfig>>,
    now: impl Fn() -> SystemTime + Send + Sync + 'static,
    today: impl Fn() -> DeliveryDay + Send + Sync + 'static,
) -> StatusSource {
    Arc::new(move || {
        let config = Arc::clone(&config.borrow());
        let queue_dir = config.postfix_queue_dir.as_deref().ok_or(QueueError::NotConfigured)?;
        Ok(SidecarStatus {
            address: config.source.address,
            queue: queue::scan(queue_dir, now())?,
            today: Some(today()),
            reputation: None,
        })
    })
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
