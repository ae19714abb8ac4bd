//! Reading the warmup counts of one UTC day back out of the evidence logs, newest line first. A delivery that
//! counted recipients against its warmup allowance carries them in its record, and that record is on disk before
//! Postfix hears the answer; so on start, these counts are at least what the day's answered deliveries used, even
//! when the warmup counters file (stored every half second) missed the last ones.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use jiff::{SignedDuration, Timestamp};
use securemail_api::provider::Provider;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{MAX_LINE_BYTES, WarmupCount, log_files};
use crate::error::{Error, Result};

/// How far records may be out of time order: a record's `time` is when its attempt ended, and attempts end in a
/// different order than they are appended only by the time one group commit takes. An hour is far beyond that.
const OUT_OF_ORDER: SignedDuration = SignedDuration::from_hours(1);

/// Read size when walking a file backwards.
const BLOCK_BYTES: usize = 64 * 1024;

/// The fields of a record this needs; every other key is skipped.
#[derive(Deserialize)]
struct Counted {
    time: Timestamp,
    #[serde(default)]
    warmup: Option<WarmupCount>,
    /// Present on the record of a pruned file, which counts nothing and says nothing about delivery times.
    #[serde(default)]
    pruned: Option<IgnoredAny>,
}

/// What [`warmup_counts`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recount {
    /// Recipients counted per provider in records from `day_start` on.
    pub counts: BTreeMap<Provider, u32>,
    /// Lines that are not records (a torn last line is not one of them): skipped, named here for the log.
    pub skipped: Vec<(PathBuf, usize)>,
}

/// Sums the warmup counts of the records in `dir`'s `evidence-*.jsonl` files whose time is `day_start` or later.
/// Files are read newest first, each from its end, and reading stops at the first record an hour older than
/// `day_start`, so a start reads about one day of records, not the whole history. A last line without its newline
/// (an append cut by a crash) holds no answered delivery and is ignored; other lines that are not records are skipped
/// and reported.
pub fn warmup_counts(dir: &Path, day_start: Timestamp) -> Result<Recount> {
    let io_error = |path: &Path, action| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, action, source }
    };
    let files = match log_files(dir) {
        Ok(files) => files,
        Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(io_error(dir, "list")(err)),
    };
    let cutoff = day_start - OUT_OF_ORDER;
    let mut recount = Recount::default();
    for path in files.into_iter().rev() {
        let file = File::open(&path).map_err(io_error(&path, "open"))?;
        let len = file.metadata().map_err(io_error(&path, "stat"))?.len();
        let mut lines = BackwardLines::new(&file, len).map_err(io_error(&path, "read"))?;
        let mut lines_from_end = 0;
        while let Some(line) = lines.next_line().map_err(io_error(&path, "read"))? {
            lines_from_end += 1;
            let Ok(counted) = serde_json::from_slice::<Counted>(&line) else {
                recount.skipped.push((path.clone(), lines_from_end));
                continue;
            };
            if counted.pruned.is_some() {
                continue;
            }
            if counted.time < cutoff {
                return Ok(recount);
            }
            if counted.time >= day_start
                && let Some(count) = counted.warmup
            {
                let total = recount.counts.entry(count.provider).or_default();
                *total = total.saturating_add(count.recipients.get());
            }
        }
    }
    Ok(recount)
}

/// The complete lines of a file, last first, without their newlines. Bytes after the last newline (an append cut
/// short) are not a line.
pub(super) struct BackwardLines<'file> {
    file: &'file File,
    /// Bytes before this offset are not read yet.
    unread_end: u64,
    /// The end of the line whose start lies in the unread part; `None` once the first line was handed out.
    partial: Option<Vec<u8>>,
    /// Complete lines of the last block read, in file order; handed out from the back.
    ready: Vec<Vec<u8>>,
}

impl<'file> BackwardLines<'file> {
    pub(super) fn new(file: &'file File, len: u64) -> io::Result<Self> {
        let last_newline = last_newline(file, len)?;
        Ok(Self {
            file,
            unread_end: last_newline.unwrap_or(0),
            partial: last_newline.map(|_| Vec::new()),
            ready: Vec::new(),
        })
    }

    pub(super) fn next_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(line) = self.ready.pop() {
                return Ok(Some(line));
            }
            if self.unread_end == 0 {
                // What is left began at the file's first byte: the first line.
                return Ok(self.partial.take());
            }
            let start = self.unread_end.saturating_sub(BLOCK_BYTES as u64);
            let mut block = vec![0; usize::try_from(self.unread_end - start).unwrap_or(BLOCK_BYTES)];
            self.file.read_exact_at(&mut block, start)?;
            self.unread_end = start;
            block.extend_from_slice(&self.partial.take().unwrap_or_default());
            let mut pieces = block.split(|&byte| byte == b'\n');
            // The first piece may begin in the unread part: it waits for the next block.
            let first = pieces.next().unwrap_or_default();
            if first.len() > MAX_LINE_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the line before byte {} is longer than {MAX_LINE_BYTES} bytes",
                        start + first.len() as u64
                    ),
                ));
            }
            self.ready = pieces.map(<[u8]>::to_vec).collect();
            self.partial = Some(first.to_vec());
        }
    }
}

/// The offset of the file's last newline, if it has one.
fn last_newline(file: &File, len: u64) -> io::Result<Option<u64>> {
    let mut block = vec![0; BLOCK_BYTES];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(BLOCK_BYTES as u64);
        let bytes = &mut block[..usize::try_from(end - start).unwrap_or(BLOCK_BYTES)];
        file.read_exact_at(bytes, start)?;
        if let Some(at) = bytes.iter().rposition(|&byte| byte == b'\n') {
            return Ok(Some(start + at as u64));
        }
        end = start;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write as _;
    use std::num::NonZeroU32;

    use super::*;
    use crate::evidence::pruned::tests::sample_prune;
    use crate::evidence::record::tests::sample_attempt;
    use crate::evidence::{Attempt, EvidenceLog, PruneRecord};

    fn counted(time: &str, provider: Provider, recipients: u32) -> Attempt {
        Attempt {
            time: time.parse().unwrap(),
            warmup: NonZeroU32::new(recipients).map(|recipients| WarmupCount { provider, recipients }),
            ..sample_attempt()
        }
    }

    fn day_start() -> Timestamp {
        "2026-11-26T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn counts_only_the_day_across_blocks_and_files_and_ignores_a_torn_append() {
        let dir = tempfile::tempdir().unwrap();
        let older = dir.path().join("evidence-20261120T000000.000000000Z.jsonl");
        let newer = dir.path().join("evidence-20261126T120000.000000000Z.jsonl");
        {
            let mut log = EvidenceLog::open(&older).unwrap();
            log.append(&counted("2026-11-25T21:00:00Z", Provider::Gmail, 7))
                .unwrap();
            // Yesterday's last hour: read (records may be out of order that much), not counted.
            log.append(&counted("2026-11-25T23:30:00Z", Provider::Gmail, 5))
                .unwrap();
            // Hundreds of records, several read blocks.
            for _ in 0..400 {
                log.append(&counted("2026-11-26T01:00:00Z", Provider::Gmail, 1))
                    .unwrap();
            }
            log.append(&counted("2026-11-26T02:00:00Z", Provider::Other, 0))
                .unwrap();
        }
        // Cut while appending: the sidecar started a new file after it.
        OpenOptions::new()
            .append(true)
            .open(&older)
            .unwrap()
            .write_all(br#"{"seq":403,"prev":"#)
            .unwrap();
        {
            let mut log = EvidenceLog::open(&newer).unwrap();
            log.append(&counted("2026-11-26T12:00:01Z", Provider::Microsoft, 2))
                .unwrap();
            log.append(&counted("2026-11-26T12:00:02Z", Provider::Gmail, 3))
                .unwrap();
        }
        // An older file never reached: reading stopped at the 21:00 record.
        std::fs::write(
            dir.path().join("evidence-20261101T000000.000000000Z.jsonl"),
            "not a record\n",
        )
        .unwrap();

        let recount = warmup_counts(dir.path(), day_start()).unwrap();
        assert_eq!(
            recount.counts,
            BTreeMap::from([(Provider::Gmail, 403), (Provider::Microsoft, 2)])
        );
        assert!(recount.skipped.is_empty(), "{:?}", recount.skipped);
    }

    #[test]
    fn prune_records_are_skipped_without_ending_the_day() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evidence-20261126T000000.000000000Z.jsonl");
        let mut log = EvidenceLog::open(&path).unwrap();
        log.append(&counted("2026-11-26T08:00:00Z", Provider::Yahoo, 4))
            .unwrap();
        // A prune record, even one dated before the day (a clock step), neither counts nor stops the reading.
        let prune = PruneRecord {
            time: "2026-11-20T00:00:00Z".parse().unwrap(),
            ..sample_prune()
        };
        log.append_all(std::slice::from_ref(&prune)).unwrap();
        log.append(&counted("2026-11-26T09:00:00Z", Provider::Yahoo, 1))
            .unwrap();
        let recount = warmup_counts(dir.path(), day_start()).unwrap();
        assert_eq!(recount.counts, BTreeMap::from([(Provider::Yahoo, 5)]));
        assert!(recount.skipped.is_empty(), "{:?}", recount.skipped);
    }

    #[test]
    fn lines_that_are_not_records_are_skipped_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evidence-20261126T000000.000000000Z.jsonl");
        let record = serde_json::to_string(&counted("2026-11-26T08:00:00Z", Provider::Yahoo, 4)).unwrap();
        std::fs::write(&path, format!("{record}\n{{garbage\n{record}\n")).unwrap();
        let recount = warmup_counts(dir.path(), day_start()).unwrap();
        assert_eq!(recount.counts, BTreeMap::from([(Provider::Yahoo, 8)]));
        assert_eq!(recount.skipped, vec![(path, 2)]);
    }

    #[test]
    fn no_directory_or_no_newline_counts_nothing_and_an_overlong_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            warmup_counts(&dir.path().join("missing"), day_start()).unwrap(),
            Recount::default()
        );
        let path = dir.path().join("evidence-20261126T000000.000000000Z.jsonl");
        std::fs::write(&path, b"{\"seq\":1").unwrap();
        assert_eq!(warmup_counts(dir.path(), day_start()).unwrap(), Recount::default());

        std::fs::write(&path, format!("{}\n\n", "x".repeat(MAX_LINE_BYTES + 1))).unwrap();
        let err = warmup_counts(dir.path(), day_start()).unwrap_err().to_string();
        assert!(err.contains("longer than 65536 bytes"), "{err}");
        assert!(err.contains("evidence-20261126"), "{err}");
    }
}
