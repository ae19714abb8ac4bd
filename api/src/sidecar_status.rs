//! The JSON a sidecar serves on `/status` and the operator reads: the pod's queue (to drain safely) and what the
//! address sent today (for the warmup loop).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// `/status` of one MTA pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarStatus {
    /// The pool address this pod sends from.
    pub address: IpAddr,
    /// Postfix's queue on this pod's volume.
    pub queue: QueueStatus,
}

/// Messages Postfix still holds (active, incoming, deferred and hold queues together).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    pub messages: u64,
    /// Age of the oldest queued message, in seconds; absent when the queue is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_age_seconds: Option<u64>,
}

impl QueueStatus {
    /// True when nothing is left that a pod removal could lose.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }
}
