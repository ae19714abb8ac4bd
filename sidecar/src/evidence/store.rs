//! The evidence directory: the log being written, a new file every UTC month, pruning of files whose retention
//! ended (each recorded in the chain before the file goes), and the chain head of every file for `/status`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use jiff::{SignedDuration, Timestamp};
use securemail_api::sidecar_status::{EvidenceFileHead, EvidenceHeads, PrunedEvidenceFile};
use serde::Serialize;

use super::log::sync_parent_dir;
use super::{EvidenceLog, FileHead, Head, LogFileName, PruneRecord, PrunedFile, RecordTime, TenantRef, log_files};
use crate::error::{Error, Result};

/// How far in the future a record may seem before the clock is called wrong and nothing is pruned: records are
/// stamped by the same clock, so one from the future means the clock went back (or was wrong when it was written).
const CLOCK_TOLERANCE: SignedDuration = SignedDuration::from_hours(1);

/// How long after the newest record the clock may read before it is called wrong and nothing is pruned: a clock
/// that jumped years ahead (a reset real-time clock) would otherwise make every file look past its retention. A
/// sidecar silent that long prunes again once it has written a record.
const MAX_SILENCE: SignedDuration = SignedDuration::from_hours(35 * 24);

/// The chain heads `/status` publishes; clones share them. The writer updates the current file's head with every
/// append, so reading them never touches the disk.
#[derive(Clone, Debug, Default)]
pub struct HeadsHandle(Arc<Mutex<Heads>>);

#[derive(Debug, Default)]
struct Heads {
    files: BTreeMap<LogFileName, FileHead>,
    pruned: Vec<PrunedEvidenceFile>,
}

impl HeadsHandle {
    /// Every file's head, sorted by name, and the files pruned since start.
    pub fn snapshot(&self) -> EvidenceHeads {
        let heads = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        EvidenceHeads {
            files: heads
                .files
                .iter()
                .map(|(name, head)| EvidenceFileHead {
                    file: name.to_string(),
                    records: head.records,
                    last_hash: head.last_hash.to_string(),
                    first_record_time: head.first_time,
                    last_record_time: head.last_time,
                })
                .collect(),
            pruned: heads.pruned.clone(),
        }
    }

    fn update(&self, change: impl FnOnce(&mut Heads)) {
        change(&mut self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    }
}

/// One pruning pass: files whose last record is more than `retention_days` older than `now` are deleted, each
/// after a prune record naming it and its chain head is durable in the current log.
#[derive(Clone, Debug)]
pub struct PruneRequest {
    pub now: Timestamp,
    pub retention_days: u32,
    pub tenant: TenantRef,
}

/// The evidence directory with its current log.
#[derive(Debug)]
pub struct EvidenceStore {
    dir: PathBuf,
    log: EvidenceLog,
    name: LogFileName,
    heads: HeadsHandle,
}

impl EvidenceStore {
    /// Continues the newest `evidence-*.jsonl` in `dir`, or begins a new file named after `now` when there is none
    /// or its tail is broken (the damaged file is left exactly as it is). The heads of the other files are read
    /// once, from their first and last lines.
    pub fn open(dir: &Path, now: Timestamp) -> Result<Self> {
        let io_error = |action| {
            let path = dir.to_path_buf();
            move |source| Error::Io { path, action, source }
        };
        std::fs::create_dir_all(dir).map_err(io_error("create the directory"))?;
        let mut files = Vec::new();
        for path in log_files(dir).map_err(io_error("list the directory"))? {
            match file_name(&path) {
                Some(name) => files.push((path, name)),
                None => tracing::warn!(
                    path = %path.display(),
                    "ignoring an evidence file with a name the sidecar does not make: it is neither continued, \
                     listed nor pruned"
                ),
            }
        }
        let newest = files.last().map(|(_, name)| name.clone());
        let mut continued = None;
        if let Some((path, name)) = files.last() {
            match EvidenceLog::open(path) {
                Ok(log) => continued = Some((log, name.clone())),
                Err(err @ Error::BrokenTail { .. }) => {
                    tracing::error!(%err, "starting a new evidence log; the damaged one is kept unchanged");
                }
                Err(err) => return Err(err),
            }
        }
        let (log, name) = match continued {
            Some(continued) => continued,
            None => {
                // Names sort by creation time, so the newest file is the one the next start continues.
                let name = LogFileName::created_after(now, newest.as_ref());
                (EvidenceLog::open(dir.join(name.as_str()))?, name)
            }
        };
        let heads = HeadsHandle::default();
        let mut closed = BTreeMap::new();
        for (path, file) in files {
            if file == name {
                continue;
            }
            match super::read_file_head(&path) {
                Ok(Some(head)) => {
                    closed.insert(file, head);
                }
                Ok(None) => tracing::error!(
                    path = %path.display(),
                    "no line of this evidence file is a record: it has no chain head to publish and is never pruned"
                ),
                Err(err) => tracing::error!(path = %path.display(), %err, "cannot read the head of an evidence file"),
            }
        }
        closed.insert(name.clone(), log.file_head());
        heads.update(|heads| heads.files = closed);
        Ok(Self {
            dir: dir.to_path_buf(),
            log,
            name,
            heads,
        })
    }

    /// The heads `/status` publishes.
    pub fn heads(&self) -> HeadsHandle {
        self.heads.clone()
    }

    /// The file being written.
    pub fn current_path(&self) -> &Path {
        self.log.path()
    }

    /// Appends `records` (see [`EvidenceLog::append_all`]). When the first of them is in a later UTC month than
    /// the current file's first record, they go to a new file: so whole months can be pruned.
    pub fn append_all<R: Serialize + RecordTime>(&mut self, records: &[R]) -> Result<Head> {
        if let Some(first) = records.first()
            && self.month_ended_before(first.time())
        {
            self.rotate(first.time());
        }
        let result = self.log.append_all(records);
        let head = self.log.file_head();
        let name = self.name.clone();
        self.heads.update(|heads| {
            heads.files.insert(name, head);
        });
        result
    }

    fn month_ended_before(&self, time: Timestamp) -> bool {
        let head = self.log.file_head();
        match head.first_time.or(head.last_time) {
            Some(started) => utc_month(time) > utc_month(started),
            None => false,
        }
    }

    /// Starts a new file. A failure is logged and the current file goes on: its records stay durable and
    /// chained, and the next append tries again.
    fn rotate(&mut self, time: Timestamp) {
        let name = LogFileName::created_after(time, Some(&self.name));
        match EvidenceLog::open(self.dir.join(name.as_str())) {
            Ok(log) => {
                tracing::info!(
                    closed = %self.name,
                    file = %name,
                    records = self.log.file_head().records,
                    "a new UTC month: starting a new evidence file"
                );
                let head = log.file_head();
                self.log = log;
                self.name = name.clone();
                self.heads.update(|heads| {
                    heads.files.insert(name, head);
                });
            }
            Err(err) => tracing::error!(%err, "cannot start the new month's evidence file; continuing the current one"),
        }
    }

    /// Deletes the files whose last record is more than `retention_days` days before `now`, never the current
    /// file, a file without a record, or anything when the clock looks wrong (a record later than `now`, or `now`
    /// long after the newest record). Each deletion follows its prune record, synced. Returns the files pruned.
    pub fn prune(&mut self, request: &PruneRequest) -> Result<Vec<PrunedEvidenceFile>> {
        let PruneRequest {
            now,
            retention_days,
            tenant,
        } = request;
        let retention = SignedDuration::from_hours(24 * i64::from(*retention_days));
        let cutoff = now.checked_sub(retention).map_err(|_| Error::InvalidField {
            field: "evidence retention",
            reason: "reaches before the earliest representable time",
        })?;
        let snapshot: Vec<(LogFileName, FileHead)> = {
            let heads = self.heads.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            heads.files.iter().map(|(name, head)| (name.clone(), *head)).collect()
        };
        if let Some((name, latest)) = snapshot
            .iter()
            .filter_map(|(name, head)| head.last_time.map(|time| (name, time)))
            .max_by_key(|(_, time)| *time)
        {
            if latest > *now + CLOCK_TOLERANCE {
                return Err(Error::ClockSuspect {
                    reason: format!("{name} has a record dated {latest}, later than the clock's {now}"),
                });
            }
            if *now > latest + MAX_SILENCE {
                return Err(Error::ClockSuspect {
                    reason: format!(
                        "the clock reads {now}, more than {} days after the newest record ({latest}, in {name})",
                        MAX_SILENCE.as_hours() / 24
                    ),
                });
            }
        }
        let mut pruned = Vec::new();
        for (name, _) in snapshot {
            if name == self.name {
                continue;
            }
            let path = self.dir.join(name.as_str());
            // Read again just before deleting: the record must describe exactly what goes.
            let head = match super::read_file_head(&path) {
                Ok(Some(head)) => head,
                Ok(None) => continue,
                Err(err) => {
                    tracing::error!(path = %path.display(), %err, "cannot read an evidence file to judge its age");
                    continue;
                }
            };
            let Some(last_time) = head.last_time else { continue };
            if last_time >= cutoff {
                continue;
            }
            let record = PruneRecord {
                time: *now,
                tenant: tenant.clone(),
                pruned: PrunedFile {
                    file: name.clone(),
                    records: head.records,
                    last_hash: head.last_hash,
                    first_record_time: head.first_time,
                    last_record_time: last_time,
                    retention_days: *retention_days,
                },
            };
            self.append_all(std::slice::from_ref(&record))?;
            if let Err(err) = std::fs::remove_file(&path).and_then(|()| sync_parent_dir(&path)) {
                tracing::error!(
                    path = %path.display(),
                    %err,
                    "cannot delete an evidence file past its retention; its prune record is written, the next pass \
                     tries again"
                );
                continue;
            }
            tracing::info!(
                file = %name,
                records = head.records,
                last_record_time = %last_time,
                retention_days,
                "pruned an evidence file past its retention"
            );
            let entry = PrunedEvidenceFile {
                file: name.to_string(),
                records: head.records,
                last_hash: head.last_hash.to_string(),
                last_record_time: last_time,
                pruned_at: *now,
            };
            self.heads.update(|heads| {
                heads.files.remove(&name);
                heads.pruned.push(entry.clone());
            });
            pruned.push(entry);
        }
        Ok(pruned)
    }
}

fn file_name(path: &Path) -> Option<LogFileName> {
    LogFileName::new(path.file_name()?.to_str()?).ok()
}

fn utc_month(time: Timestamp) -> (i16, i8) {
    let date = time.to_zoned(jiff::tz::TimeZone::UTC).date();
    (date.year(), date.month())
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::{BufReader, Write as _};

    use super::*;
    use crate::evidence::record::tests::sample_attempt;
    use crate::evidence::{Attempt, Line, VerifySummary, verify};

    fn at(time: &str) -> Timestamp {
        time.parse().unwrap()
    }

    fn attempt_at(time: &str) -> Attempt {
        Attempt {
            time: at(time),
            ..sample_attempt()
        }
    }

    fn verify_path(path: &Path) -> VerifySummary {
        verify(BufReader::new(std::fs::File::open(path).unwrap())).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        log_files(dir)
            .unwrap()
            .iter()
            .map(|path| path.file_name().unwrap().to_str().unwrap().to_owned())
            .collect()
    }

    fn request(now: &str, retention_days: u32) -> PruneRequest {
        PruneRequest {
            now: at(now),
            retention_days,
            tenant: sample_attempt().tenant,
        }
    }

    /// Three monthly files, January to March 2026, written through rotation; March is current.
    fn three_months(dir: &Path) -> EvidenceStore {
        let mut store = EvidenceStore::open(dir, at("2026-01-01T00:00:00Z")).unwrap();
        for time in [
            "2026-01-01T00:00:01Z",
            "2026-01-31T12:00:00Z",
            "2026-02-01T00:00:00Z",
            "2026-02-28T23:00:00Z",
            "2026-03-01T08:00:00Z",
        ] {
            store.append_all(&[attempt_at(time)]).unwrap();
        }
        store
    }

    fn last_line(path: &Path) -> Line {
        let text = std::fs::read_to_string(path).unwrap();
        crate::evidence::chain::parse_line(text.lines().last().unwrap().as_bytes())
            .unwrap()
            .record
    }

    #[test]
    fn a_new_utc_month_starts_a_new_file_with_the_first_record_of_that_month() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EvidenceStore::open(dir.path(), at("2026-01-31T23:00:00Z")).unwrap();
        store.append_all(&[attempt_at("2026-01-31T23:59:59Z")]).unwrap();
        // One group: decided by its first record, so both go to the new file, the late January one included.
        store
            .append_all(&[
                attempt_at("2026-02-01T00:00:00.5Z"),
                attempt_at("2026-01-31T23:59:59.9Z"),
            ])
            .unwrap();
        // Another January record does not go back; nor does February start yet another file.
        store.append_all(&[attempt_at("2026-01-31T23:59:59.95Z")]).unwrap();
        store.append_all(&[attempt_at("2026-02-27T10:00:00Z")]).unwrap();
        assert_eq!(
            names(dir.path()),
            [
                "evidence-20260131T230000.000000000Z.jsonl",
                "evidence-20260201T000000.500000000Z.jsonl"
            ]
        );
        let files = log_files(dir.path()).unwrap();
        let (january, february) = (verify_path(&files[0]), verify_path(&files[1]));
        assert_eq!((january.records, february.records), (1, 4));
        assert_eq!(store.current_path(), files[1]);

        let heads = store.heads().snapshot();
        let published: Vec<_> = heads
            .files
            .iter()
            .map(|head| (head.file.as_str(), head.records, head.last_hash.clone()))
            .collect();
        assert_eq!(
            published,
            [
                (
                    "evidence-20260131T230000.000000000Z.jsonl",
                    1,
                    january.last_hash.to_string()
                ),
                (
                    "evidence-20260201T000000.500000000Z.jsonl",
                    4,
                    february.last_hash.to_string()
                ),
            ]
        );
        assert_eq!(heads.files[1].first_record_time, Some(at("2026-02-01T00:00:00.5Z")));
        assert_eq!(heads.files[1].last_record_time, Some(at("2026-02-27T10:00:00Z")));

        // A restart continues February and reads January's head back from the file.
        drop(store);
        let reopened = EvidenceStore::open(dir.path(), at("2026-02-28T00:00:00Z")).unwrap();
        assert_eq!(reopened.current_path(), files[1]);
        assert_eq!(reopened.heads().snapshot(), heads);
    }

    #[test]
    fn a_month_change_seen_only_at_start_rotates_on_the_first_append() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EvidenceStore::open(dir.path(), at("2026-11-30T10:00:00Z")).unwrap();
        store.append_all(&[attempt_at("2026-11-30T10:00:01Z")]).unwrap();
        drop(store);
        let mut store = EvidenceStore::open(dir.path(), at("2026-12-02T10:00:00Z")).unwrap();
        assert_eq!(names(dir.path()).len(), 1, "opening alone creates nothing");
        store.append_all(&[attempt_at("2026-12-02T10:00:01Z")]).unwrap();
        assert_eq!(
            names(dir.path()),
            [
                "evidence-20261130T100000.000000000Z.jsonl",
                "evidence-20261202T100001.000000000Z.jsonl"
            ]
        );
    }

    #[test]
    fn pruning_records_each_file_then_deletes_only_those_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = three_months(dir.path());
        let before = names(dir.path());
        let january = dir.path().join(&before[0]);
        let january_summary = verify_path(&january);

        // 30 days before 2026-03-05 is 2026-02-03: January's last record (01-31) is older, February's is not.
        let pruned = store.prune(&request("2026-03-05T00:00:00Z", 30)).unwrap();
        assert_eq!(pruned.len(), 1);
        assert_eq!(pruned[0].file, before[0]);
        assert_eq!(names(dir.path()), before[1..]);

        // The prune line is the current file's last record, chained, and says what was deleted.
        let current = store.current_path().to_path_buf();
        assert_eq!(verify_path(&current).records, 2);
        let Line::Pruned(record) = last_line(&current) else {
            panic!("the last line is not a prune record")
        };
        assert_eq!(
            record.pruned,
            PrunedFile {
                file: LogFileName::new(&before[0]).unwrap(),
                records: january_summary.records,
                last_hash: january_summary.last_hash,
                first_record_time: Some(at("2026-01-01T00:00:01Z")),
                last_record_time: at("2026-01-31T12:00:00Z"),
                retention_days: 30,
            }
        );
        assert_eq!(record.time, at("2026-03-05T00:00:00Z"));
        let line = std::fs::read_to_string(&current).unwrap();
        assert!(!line.contains('@'));

        let heads = store.heads().snapshot();
        assert_eq!(
            heads.files.iter().map(|head| head.file.clone()).collect::<Vec<_>>(),
            before[1..]
        );
        assert_eq!(heads.pruned, pruned);
        assert_eq!(heads.files[1].records, 2);

        // Verifying the directory against the heads taken before pruning accepts the recorded deletion.
        let report = crate::evidence::verify_dir(
            dir.path(),
            &crate::evidence::parse_heads(&serde_json::to_vec(&three_months_heads(&before, &january_summary)).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert!(report.problems.is_empty(), "{report:?}");
    }

    /// Heads naming January with its real head (the others are not compared).
    fn three_months_heads(names: &[String], january: &VerifySummary) -> serde_json::Value {
        serde_json::json!({"files": [
            {"file": names[0], "records": january.records, "lastHash": january.last_hash.to_string()}
        ]})
    }

    #[test]
    fn nothing_is_pruned_before_the_retention_ends() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = three_months(dir.path());
        let before_names = names(dir.path());
        let before: Vec<_> = log_files(dir.path())
            .unwrap()
            .iter()
            .map(|path| std::fs::read(path).unwrap())
            .collect();
        // January's last record is 2026-01-31T12:00:00Z: exactly 30 days later it is still kept.
        for now in ["2026-03-02T12:00:00Z", "2026-03-02T11:59:59Z", "2026-03-01T09:00:00Z"] {
            assert_eq!(store.prune(&request(now, 30)).unwrap(), []);
        }
        let after: Vec<_> = log_files(dir.path())
            .unwrap()
            .iter()
            .map(|path| std::fs::read(path).unwrap())
            .collect();
        assert_eq!(after, before, "no file changed, no line was written");
        assert!(store.heads().snapshot().pruned.is_empty());

        // Six years, the default, count from a file's last record: 2190 days before 2031-12-31 is 2026-01-01,
        // so January 2026 (last record on the 31st) is kept while a pod delivers in late 2031.
        store.append_all(&[attempt_at("2031-12-30T00:00:00Z")]).unwrap();
        assert_eq!(store.prune(&request("2031-12-31T00:00:00Z", 2190)).unwrap(), []);
        assert_eq!(names(dir.path()).len(), 4);
        let pruned = store.prune(&request("2032-01-30T12:00:01Z", 2190)).unwrap();
        assert_eq!(pruned.len(), 1);
        assert_eq!(pruned[0].file, before_names[0]);
    }

    #[test]
    fn a_clock_far_ahead_of_the_newest_record_prunes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = three_months(dir.path());
        // A reset clock reading 2040 would make all of 2026 look past six years.
        let err = store.prune(&request("2040-01-01T00:00:00Z", 2190)).unwrap_err();
        assert!(matches!(err, Error::ClockSuspect { .. }), "{err}");
        assert!(
            err.to_string().contains("more than 35 days after the newest record"),
            "{err}"
        );
        assert_eq!(names(dir.path()).len(), 3);
        assert_eq!(verify_path(store.current_path()).records, 1);
    }

    #[test]
    fn a_record_from_the_future_stops_all_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = three_months(dir.path());
        // The clock now reads 2026-02-10: March's record is in its future, so the clock is not trusted, even
        // though January would be past a one-day retention.
        let err = store.prune(&request("2026-02-10T00:00:00Z", 1)).unwrap_err();
        assert!(matches!(err, Error::ClockSuspect { .. }), "{err}");
        assert_eq!(names(dir.path()).len(), 3);
        assert_eq!(verify_path(store.current_path()).records, 1);
    }

    #[test]
    fn a_file_whose_record_cannot_be_written_is_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = three_months(dir.path());
        // A change behind the writer: the prune record cannot be appended.
        OpenOptions::new()
            .append(true)
            .open(store.current_path())
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert!(store.prune(&request("2026-03-31T00:00:00Z", 30)).is_err());
        assert_eq!(names(dir.path()).len(), 3);
    }

    #[test]
    fn a_broken_tail_is_judged_by_its_last_record_and_pruned_only_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EvidenceStore::open(dir.path(), at("2026-01-01T00:00:00Z")).unwrap();
        store.append_all(&[attempt_at("2026-01-05T00:00:00Z")]).unwrap();
        let head = store.append_all(&[attempt_at("2026-01-06T00:00:00Z")]).unwrap();
        let torn = store.current_path().to_path_buf();
        drop(store);
        OpenOptions::new()
            .append(true)
            .open(&torn)
            .unwrap()
            .write_all(br#"{"seq":3,"prev":"#)
            .unwrap();

        let mut store = EvidenceStore::open(dir.path(), at("2026-01-07T00:00:00Z")).unwrap();
        assert_ne!(store.current_path(), torn);
        store.append_all(&[attempt_at("2026-01-07T00:00:01Z")]).unwrap();
        let heads = store.heads().snapshot();
        assert_eq!(heads.files[0].records, 2);
        assert_eq!(heads.files[0].last_hash, head.hash.to_string());
        assert_eq!(heads.files[0].last_record_time, Some(at("2026-01-06T00:00:00Z")));

        assert_eq!(store.prune(&request("2026-01-08T00:00:00Z", 30)).unwrap(), []);
        assert!(torn.exists());
        let pruned = store.prune(&request("2026-02-06T00:00:01Z", 30)).unwrap();
        assert_eq!(pruned.len(), 1);
        assert_eq!(
            (pruned[0].records, pruned[0].last_hash.clone()),
            (2, head.hash.to_string())
        );
        assert!(!torn.exists());
        // The prune record is February's first: it started a new file, like any record of a new month.
        assert_eq!(verify_path(store.current_path()).records, 1);
        assert!(matches!(last_line(store.current_path()), Line::Pruned(_)));
    }
}
