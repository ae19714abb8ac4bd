//! The JSON a sidecar serves on `/status` and the operator reads: the pod's queue (to drain safely) and what the
//! address sent today (for the warmup loop).

use std::collections::BTreeMap;
use std::net::IpAddr;

use jiff::civil::Date;
use serde::{Deserialize, Serialize};

use crate::provider::Provider;

/// `/status` of one MTA pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarStatus {
    /// The pool address this pod sends from.
    pub address: IpAddr,
    /// Postfix's queue on this pod's volume.
    pub queue: QueueStatus,
    /// Recipients this address handled today (UTC), per mailbox provider class; absent from a sidecar that
    /// cannot count (an older version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub today: Option<DeliveryDay>,
}

/// One UTC day of delivery results.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryDay {
    pub date: Date,
    /// Every provider class, zero counts included.
    pub providers: BTreeMap<Provider, ResultCounts>,
}

/// Recipients per result for one provider class.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResultCounts {
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
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
