//! The record of a pruned file: an evidence file whose retention ended is deleted only after a line saying so,
//! with the file's chain head, is durable in the current log. The line is part of the chain like any record.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{Sha256Hex, TenantRef};
use crate::error::{Error, Result};

/// `{"seq":…,"prev":…,"time":…,"tenant":…,"pruned":{…}}`: a file was deleted after its retention ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PruneRecord {
    /// When the file was pruned.
    pub time: Timestamp,
    pub tenant: TenantRef,
    pub pruned: PrunedFile,
}

/// The pruned file's name and chain head, as read just before deleting it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PrunedFile {
    pub file: LogFileName,
    /// Its last record's `seq`.
    pub records: u64,
    /// SHA-256 of its last record's line.
    pub last_hash: Sha256Hex,
    /// Absent when its first line is not a record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_record_time: Option<Timestamp>,
    /// What its age was judged by.
    pub last_record_time: Timestamp,
    /// The retention in force when it was pruned.
    pub retention_days: u32,
}

/// The bare name of an evidence file, `evidence-<UTC creation time>.jsonl`: never a path, never an '@'.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(try_from = "String", into = "String")]
pub struct LogFileName(String);

impl LogFileName {
    pub fn new(name: &str) -> Result<Self> {
        let valid = name.len() <= 128
            && name.starts_with("evidence-")
            && name.ends_with(".jsonl")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(Error::InvalidField {
                field: "evidence file name",
                reason: "must be evidence-<stamp>.jsonl with only letters, digits, '-', '.' and '_'",
            })
        }
    }

    /// The name of a file created at `time`; names sort by creation time.
    pub fn created_at(time: Timestamp) -> Self {
        Self(format!("evidence-{}.jsonl", time.strftime("%Y%m%dT%H%M%S%.9fZ")))
    }

    /// The creation time in a name [`created_at`](Self::created_at) made.
    pub fn creation_time(&self) -> Option<Timestamp> {
        let stamp = self.0.strip_prefix("evidence-")?.strip_suffix("Z.jsonl")?;
        let civil = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%S%.f", stamp).ok()?;
        civil
            .to_zoned(jiff::tz::TimeZone::UTC)
            .ok()
            .map(|zoned| zoned.timestamp())
    }

    /// A name for a file created at `time` that sorts after `previous`, even when the clock went back: one
    /// nanosecond after `previous`'s creation time then.
    pub fn created_after(time: Timestamp, previous: Option<&Self>) -> Self {
        let candidate = Self::created_at(time);
        match previous {
            Some(previous) if candidate <= *previous => previous
                .creation_time()
                .and_then(|then| then.checked_add(jiff::SignedDuration::from_nanos(1)).ok())
                .map(Self::created_at)
                .filter(|bumped| bumped > previous)
                .unwrap_or(candidate),
            _ => candidate,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LogFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for LogFileName {
    type Error = Error;

    fn try_from(name: String) -> Result<Self> {
        Self::new(&name)
    }
}

impl From<LogFileName> for String {
    fn from(name: LogFileName) -> Self {
        name.0
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::evidence::record::tests::sample_attempt;

    pub(in crate::evidence) fn sample_prune() -> PruneRecord {
        PruneRecord {
            time: "2032-02-01T00:00:00Z".parse().unwrap(),
            tenant: sample_attempt().tenant,
            pruned: PrunedFile {
                file: LogFileName::new("evidence-20260101T000000.000000000Z.jsonl").unwrap(),
                records: 12,
                last_hash: Sha256Hex::of(b"last"),
                first_record_time: Some("2026-01-01T00:00:01Z".parse().unwrap()),
                last_record_time: "2026-01-31T23:59:59Z".parse().unwrap(),
                retention_days: 2190,
            },
        }
    }

    #[test]
    fn prune_record_has_the_documented_shape_and_no_at_sign() {
        let json = serde_json::to_string(&sample_prune()).unwrap();
        let expected = format!(
            "{}{}{}",
            r#"{"time":"2032-02-01T00:00:00Z","tenant":"clinic-a/outbound","pruned":{"#,
            format_args!(
                r#""file":"evidence-20260101T000000.000000000Z.jsonl","records":12,"lastHash":"{}","#,
                Sha256Hex::of(b"last")
            ),
            r#""firstRecordTime":"2026-01-01T00:00:01Z","lastRecordTime":"2026-01-31T23:59:59Z","retentionDays":2190}}"#
        );
        assert_eq!(json, expected);
        assert!(!json.contains('@'));
        assert_eq!(serde_json::from_str::<PruneRecord>(&json).unwrap(), sample_prune());
    }

    #[test]
    fn file_names_are_bare_evidence_names() {
        for bad in [
            "",
            "evidence.jsonl",
            "../evidence-1.jsonl",
            "evidence-1/../../x.jsonl",
            "evidence-a@b.jsonl",
            "evidence-1.json",
            "evidence-1.jsonl\n",
        ] {
            assert!(LogFileName::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(LogFileName::new("evidence-20260101T000000.000000000Z.jsonl").is_ok());
    }

    #[test]
    fn names_sort_by_creation_even_when_the_clock_goes_back() {
        let earlier: Timestamp = "2026-01-31T23:59:59.5Z".parse().unwrap();
        let later: Timestamp = "2026-02-01T00:00:00Z".parse().unwrap();
        let first = LogFileName::created_at(later);
        assert_eq!(first.as_str(), "evidence-20260201T000000.000000000Z.jsonl");
        assert_eq!(first.creation_time(), Some(later));
        assert!(LogFileName::created_at(earlier) < first);
        let next = LogFileName::created_after(earlier, Some(&first));
        assert_eq!(next.as_str(), "evidence-20260201T000000.000000001Z.jsonl");
        let normal = LogFileName::created_after("2026-03-01T00:00:00Z".parse().unwrap(), Some(&first));
        assert_eq!(normal.as_str(), "evidence-20260301T000000.000000000Z.jsonl");
    }
}
