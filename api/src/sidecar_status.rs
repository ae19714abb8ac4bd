//! The JSON a sidecar serves on `/status` and the operator reads: the pod's queue (to drain safely) and what the
//! address sent today (for the warmup loop).

use std::collections::BTreeMap;
use std::net::IpAddr;

use jiff::Timestamp;
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
    /// The day before `today` this address has counts for (kept on the state volume across restarts): what the
    /// operator's warmup loop judges after midnight. Absent before the first full day, or from an older sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yesterday: Option<DeliveryDay>,
    /// Remote replies classified and the local circuit breakers; absent from a sidecar without reputation
    /// sensors (an older version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reputation: Option<ReputationStatus>,
    /// Whether this pod can send from its address, as its last self-check found; absent from an older sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressStatus>,
    /// The chain head of every evidence file in the pod's evidence directory and the files pruned since the
    /// sidecar started: kept outside the pod (by the operator, or `curl …/status | jq .evidence`), it lets
    /// `securemail-sidecar evidence verify --heads` detect a deleted file, a cut-off tail or a rewritten last line.
    /// Absent from an older sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<EvidenceHeads>,
}

/// The chain heads of one pod's evidence directory (docs/evidence.md, "Chain heads").
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceHeads {
    /// Every evidence file in the directory, sorted by file name (which is creation order).
    #[serde(default)]
    pub files: Vec<EvidenceFileHead>,
    /// Files deleted after their retention ended, as the prune records this sidecar wrote since it started say.
    #[serde(default)]
    pub pruned: Vec<PrunedEvidenceFile>,
}

/// The end of one evidence file's chain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceFileHead {
    /// The file name inside the evidence directory, `evidence-<UTC creation time>.jsonl`.
    pub file: String,
    /// Records in the file: the last line's `seq`.
    pub records: u64,
    /// SHA-256 (lowercase hex) of the last line without its newline; 64 zeros for an empty file.
    pub last_hash: String,
    /// `time` of the first record; absent for an empty file or when the first line is not a record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_record_time: Option<Timestamp>,
    /// `time` of the last record; absent for an empty file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_record_time: Option<Timestamp>,
}

/// An evidence file deleted after its retention ended: what its prune record says.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PrunedEvidenceFile {
    pub file: String,
    /// Records the file held (its last record's `seq`).
    pub records: u64,
    /// SHA-256 of its last record's line.
    pub last_hash: String,
    pub last_record_time: Timestamp,
    /// When the file was pruned (the prune record's `time`).
    pub pruned_at: Timestamp,
}

/// The result of the sidecar's egress self-check (bind and route, or the proxy's source address).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EgressStatus {
    pub ready: bool,
    /// Why the pod cannot send from its address; absent when ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the check last ran.
    pub checked_at: Timestamp,
}

/// What the remote MX hosts said to this address today and which providers it is pausing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReputationStatus {
    /// The UTC day `replies` counts.
    pub date: Date,
    /// Remote 4xx and 5xx replies per provider class and reason; every provider class, zero counts included.
    pub replies: BTreeMap<Provider, ReplyCounts>,
    /// The local circuit breaker per provider class; `other` (many unrelated receivers) has none.
    pub circuits: BTreeMap<Provider, CircuitStatus>,
}

/// Remote 4xx and 5xx replies by reason.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplyCounts {
    pub rate_limited: u64,
    pub reputation_block: u64,
    pub policy: u64,
    pub authentication: u64,
    pub unknown: u64,
}

/// One provider's circuit breaker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CircuitStatus {
    pub state: CircuitState,
    /// When an open breaker lets its next probe through; absent unless open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
    /// The pause the next opening starts; doubles on every failed probe up to its maximum.
    pub pause_seconds: u64,
    /// Times the breaker opened since the sidecar started.
    pub opens: u64,
}

/// Closed: deliveries flow. Open: recipients for the provider are refused with 451 4.7.1 and nothing is sent to
/// it. Half-open: one delivery goes through as a probe.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reputation_is_optional_on_the_wire_and_camel_cased() {
        let old = r#"{"address":"192.0.2.10","queue":{"messages":0}}"#;
        let status: SidecarStatus = serde_json::from_str(old).unwrap();
        assert_eq!(status.reputation, None);
        assert_eq!(status.evidence, None);
        assert_eq!(serde_json::to_string(&status).unwrap(), old);

        let circuit = CircuitStatus {
            state: CircuitState::HalfOpen,
            retry_at: None,
            pause_seconds: 120,
            opens: 2,
        };
        let reputation = ReputationStatus {
            date: Date::constant(2026, 1, 1),
            replies: [(
                Provider::Gmail,
                ReplyCounts {
                    rate_limited: 8,
                    ..ReplyCounts::default()
                },
            )]
            .into(),
            circuits: [(Provider::Gmail, circuit)].into(),
        };
        assert_eq!(
            serde_json::to_value(&reputation).unwrap(),
            serde_json::json!({
                "date": "2026-01-01",
                "replies": {"gmail": {"rateLimited": 8, "reputationBlock": 0, "policy": 0, "authentication": 0, "unknown": 0}},
                "circuits": {"gmail": {"state": "halfOpen", "pauseSeconds": 120, "opens": 2}},
            })
        );
    }

    #[test]
    fn evidence_heads_are_camel_cased_and_optional_parts_default() {
        let heads: EvidenceHeads = serde_json::from_str(
            r#"{"files":[{"file":"evidence-20260101T000000.000000000Z.jsonl","records":0,"lastHash":"00"}]}"#,
        )
        .unwrap();
        assert!(heads.pruned.is_empty());
        assert_eq!(heads.files[0].last_record_time, None);
        let pruned = PrunedEvidenceFile {
            file: "evidence-20200101T000000.000000000Z.jsonl".to_owned(),
            records: 3,
            last_hash: "ab".to_owned(),
            last_record_time: Timestamp::from_second(0).unwrap(),
            pruned_at: Timestamp::from_second(60).unwrap(),
        };
        assert_eq!(
            serde_json::to_value(&pruned).unwrap(),
            serde_json::json!({
                "file": "evidence-20200101T000000.000000000Z.jsonl",
                "records": 3,
                "lastHash": "ab",
                "lastRecordTime": "1970-01-01T00:00:00Z",
                "prunedAt": "1970-01-01T00:01:00Z",
            })
        );
    }
}
