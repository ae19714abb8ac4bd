//! Verifying an evidence directory against chain heads kept elsewhere (the `evidence` object of `/status`): the
//! chain inside each file proves its lines agree with each other; the heads prove no file lost its end, had its last
//! line rewritten, or vanished without a prune record.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufReader};
use std::path::Path;

use securemail_api::sidecar_status::EvidenceHeads;

use super::chain::walk;
use super::{LogFileName, PruneRecord, Sha256Hex, log_files};

/// Why a heads document was refused; names the entry, never repeats its values.
#[derive(Debug, thiserror::Error)]
pub enum HeadsError {
    #[error("not the evidence object of /status: {0}")]
    Json(String),
    #[error("files[{index}]: {reason}")]
    File { index: usize, reason: &'static str },
    #[error("pruned[{index}]: {reason}")]
    Pruned { index: usize, reason: &'static str },
}

/// One file's head, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expected {
    records: u64,
    last_hash: Sha256Hex,
}

/// Heads with names and hashes checked.
#[derive(Debug, Default)]
pub struct Heads {
    files: BTreeMap<LogFileName, Expected>,
    pruned: BTreeMap<LogFileName, Expected>,
}

/// Parses the `evidence` object of `/status`. Any input gives a value or an error, never a panic.
pub fn parse_heads(json: &[u8]) -> Result<Heads, HeadsError> {
    let raw: EvidenceHeads = serde_json::from_slice(json).map_err(|err| {
        // The category and place of a JSON error, never the offending text.
        HeadsError::Json(format!(
            "{:?} error at line {} column {}",
            err.classify(),
            err.line(),
            err.column()
        ))
    })?;
    let mut heads = Heads::default();
    for (index, file) in raw.files.iter().enumerate() {
        let fail = |reason| HeadsError::File { index, reason };
        let name = LogFileName::new(&file.file).map_err(|_| fail("file is not an evidence file name"))?;
        let last_hash = file
            .last_hash
            .parse()
            .map_err(|_| fail("lastHash is not 64 lowercase hex digits"))?;
        let expected = Expected {
            records: file.records,
            last_hash,
        };
        if heads.files.insert(name, expected).is_some() {
            return Err(fail("the file is listed twice"));
        }
    }
    for (index, pruned) in raw.pruned.iter().enumerate() {
        let fail = |reason| HeadsError::Pruned { index, reason };
        let name = LogFileName::new(&pruned.file).map_err(|_| fail("file is not an evidence file name"))?;
        let last_hash = pruned
            .last_hash
            .parse()
            .map_err(|_| fail("lastHash is not 64 lowercase hex digits"))?;
        heads.pruned.insert(
            name,
            Expected {
                records: pruned.records,
                last_hash,
            },
        );
    }
    Ok(heads)
}

/// What [`verify_dir`] found: one line per file, each starting with the file's path.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DirReport {
    /// Files that verified (and agree with their head, when there is one).
    pub ok: Vec<String>,
    /// Broken chains, files that disagree with their head, and files missing without a prune record.
    pub problems: Vec<String>,
}

/// Verifies every `evidence-*.jsonl` in `dir` and compares it with its head in `heads`:
/// - fewer records than the head: records were cut from the end;
/// - line M (M = the head's records) hashing to something else than the head's `lastHash`: rewritten;
/// - more records than the head, with line M matching: appended since, fine;
/// - a file of the heads missing from `dir`: deleted, unless the heads or a prune record in `dir` says it was
///   pruned (with the same head).
///
/// Line content is never echoed.
pub fn verify_dir(dir: &Path, heads: &Heads) -> io::Result<DirReport> {
    let mut report = DirReport::default();
    let mut present = BTreeSet::new();
    // Prune records found in the directory: the file named, its head, and where the record is.
    let mut pruned_in_dir: BTreeMap<LogFileName, (PruneRecord, String, u64)> = BTreeMap::new();
    for path in log_files(dir)? {
        let shown = path.display().to_string();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| LogFileName::new(name).ok());
        let expected = name.as_ref().and_then(|name| heads.files.get(name)).copied();
        if let Some(name) = &name {
            present.insert(name.clone());
        }
        let walked = match File::open(&path) {
            Ok(file) => walk(BufReader::new(file), expected.map(|head| head.records)),
            Err(err) => {
                report.problems.push(format!("{shown}: cannot open: {err}"));
                continue;
            }
        };
        let file_name = name.as_ref().map_or_else(|| shown.clone(), ToString::to_string);
        for (line, record) in &walked.pruned {
            pruned_in_dir.insert(record.pruned.file.clone(), (record.clone(), file_name.clone(), *line));
        }
        let before = report.problems.len();
        if let Some(err) = &walked.broken {
            report.problems.push(format!("{shown}: {err}"));
        }
        if let Some(head) = expected {
            let found = walked.valid.records;
            match walked.hash_at {
                Some(hash) if hash != head.last_hash => report.problems.push(format!(
                    "{shown}: line {} hashes to {hash}, the head says {}: the line was rewritten, or the file replaced",
                    head.records, head.last_hash
                )),
                Some(_) => {}
                // An empty head matches any file that begins a chain.
                None if head.records == 0 => {}
                None if walked.broken.is_none() => report.problems.push(format!(
                    "{shown}: {found} records, the head says {}: records were cut from its end",
                    head.records
                )),
                // The break is reported above and hides the rest of the file.
                None => {}
            }
        }
        if report.problems.len() == before {
            let against = match expected {
                Some(head) => format!(" (the head's {} records match)", head.records),
                None => " (no head for this file)".to_owned(),
            };
            report.ok.push(format!("{shown}: ok: {}{against}", walked.valid));
        }
    }
    for (name, head) in &heads.files {
        if present.contains(name) {
            continue;
        }
        let shown = dir.join(name.as_str()).display().to_string();
        if let Some((record, holder, line)) = pruned_in_dir.get(name) {
            let pruned = &record.pruned;
            let agrees =
                pruned.records > head.records || (pruned.records == head.records && pruned.last_hash == head.last_hash);
            if agrees {
                report.ok.push(format!(
                    "{shown}: pruned at {} ({} records, last record {}), as {holder} line {line} records",
                    record.time, pruned.records, pruned.last_record_time
                ));
            } else {
                report.problems.push(format!(
                    "{shown}: deleted; the prune record in {holder} line {line} says {} records, last hash {}, the \
                     head says {} records, last hash {}",
                    pruned.records, pruned.last_hash, head.records, head.last_hash
                ));
            }
        } else if let Some(pruned) = heads.pruned.get(name) {
            if pruned.records > head.records || *pruned == *head {
                report.ok.push(format!(
                    "{shown}: pruned ({} records), as the heads record",
                    pruned.records
                ));
            } else {
                report.problems.push(format!(
                    "{shown}: deleted; the heads list it as pruned with {} records, last hash {}, but its head says \
                     {} records, last hash {}",
                    pruned.records, pruned.last_hash, head.records, head.last_hash
                ));
            }
        } else {
            report.problems.push(format!(
                "{shown}: missing, and no prune record names it: the file was deleted ({} records, last hash {})",
                head.records, head.last_hash
            ));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn published_heads_parse_and_duplicates_are_refused() {
        let hash = Sha256Hex::of(b"x").to_string();
        let one =
            serde_json::json!({"file": "evidence-20260101T000000.000000000Z.jsonl", "records": 2, "lastHash": hash});
        let heads = parse_heads(&serde_json::to_vec(&serde_json::json!({"files": [one]})).unwrap()).unwrap();
        assert_eq!(heads.files.len(), 1);
        let twice = serde_json::json!({"files": [one, one], "pruned": []});
        let err = parse_heads(&serde_json::to_vec(&twice).unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "files[1]: the file is listed twice");
    }

    #[test]
    fn a_missing_file_listed_as_pruned_by_the_heads_passes_only_with_the_same_head() {
        let dir = tempfile::tempdir().unwrap();
        let name = "evidence-20200101T000000.000000000Z.jsonl";
        let hash = Sha256Hex::of(b"x").to_string();
        let heads = |pruned_hash: &str, pruned_records: u64| {
            parse_heads(
                &serde_json::to_vec(&serde_json::json!({
                    "files": [{"file": name, "records": 5, "lastHash": hash}],
                    "pruned": [{"file": name, "records": pruned_records, "lastHash": pruned_hash,
                                "lastRecordTime": "2020-01-31T00:00:00Z", "prunedAt": "2026-02-01T00:00:00Z"}],
                }))
                .unwrap(),
            )
            .unwrap()
        };
        let report = verify_dir(dir.path(), &heads(&hash, 5)).unwrap();
        assert!(report.problems.is_empty(), "{report:?}");
        assert!(
            report.ok[0].ends_with("pruned (5 records), as the heads record"),
            "{report:?}"
        );
        // Heads taken while the file still grew: the prune record's larger count cannot contradict them.
        assert!(
            verify_dir(dir.path(), &heads(&Sha256Hex::of(b"y").to_string(), 6))
                .unwrap()
                .problems
                .is_empty()
        );

        let other = Sha256Hex::of(b"y").to_string();
        for (pruned_hash, records) in [(other.as_str(), 5), (hash.as_str(), 4)] {
            let report = verify_dir(dir.path(), &heads(pruned_hash, records)).unwrap();
            assert_eq!(report.problems.len(), 1, "{report:?}");
            assert!(
                report.problems[0].contains("deleted; the heads list it as pruned"),
                "{report:?}"
            );
        }

        // Without any prune record the file was simply deleted.
        let bare = parse_heads(
            &serde_json::to_vec(&serde_json::json!({"files": [{"file": name, "records": 5, "lastHash": hash}]}))
                .unwrap(),
        )
        .unwrap();
        let report = verify_dir(dir.path(), &bare).unwrap();
        assert!(
            report.problems[0].contains("missing, and no prune record names it"),
            "{report:?}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_heads(&bytes);
        }

        #[test]
        fn wrong_names_and_hashes_are_refused_without_being_repeated(
            entries in prop::collection::vec(("[a-z@./-]{12,30}", any::<u64>(), "[0-9a-zA-Z@]{12,70}"), 1..4),
            in_pruned in any::<bool>(),
        ) {
            let list: Vec<_> = entries
                .iter()
                .map(|(file, records, hash)| serde_json::json!({
                    "file": file, "records": records, "lastHash": hash, "lastRecordTime": "2026-01-01T00:00:00Z",
                    "prunedAt": "2026-01-02T00:00:00Z",
                }))
                .collect();
            let key = if in_pruned { "pruned" } else { "files" };
            let json = serde_json::to_vec(&serde_json::json!({ key: list })).unwrap();
            if let Err(err) = parse_heads(&json) {
                let message = err.to_string();
                for (file, _, hash) in &entries {
                    prop_assert!(!message.contains(file.as_str()) && !message.contains(hash.as_str()), "{}", message);
                }
            }
        }

        #[test]
        fn truncated_heads_never_panic(cut in 0usize..400) {
            let hash = Sha256Hex::of(b"x").to_string();
            let json = serde_json::to_vec(&serde_json::json!({"files": [
                {"file": "evidence-20260101T000000.000000000Z.jsonl", "records": 2, "lastHash": hash,
                 "firstRecordTime": "2026-01-01T00:00:00Z", "lastRecordTime": "2026-01-02T00:00:00Z"}
            ]})).unwrap();
            let _ = parse_heads(&json[..cut.min(json.len())]);
        }
    }
}
