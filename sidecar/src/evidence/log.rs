//! The writer: appends one durable, chained line per attempt.
//!
//! Broken tail: on open, if the last line is incomplete (no newline), longer than the line cap or not a record,
//! the log is refused with [`Error::BrokenTail`] naming the file and line. The writer cannot tell a write cut by a
//! crash from tampering, and every automatic repair would either delete bytes from an evidence file or teach the
//! verifier to accept a gap. So the file is never written again: the sidecar leaves it for an auditor and begins a
//! new one (see `open_evidence` in main.rs). A broken tail never holds an acknowledged record: the caller
//! acknowledges only after `append` has returned, and a failed append in a running process removes its own partial
//! line.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::Serialize;

use super::chain::{BreakKind, ChainError, parse_line};
use super::recount::BackwardLines;
use super::{Attempt, Entry, GENESIS, MAX_LINE_BYTES, RecordTime, Sha256Hex};
use crate::error::{Error, Result};

/// The evidence files in `dir`, `evidence-<creation time>.jsonl`, oldest first (the names sort by creation time).
pub fn log_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("evidence-") && name.ends_with(".jsonl"))
        })
        .collect();
    files.sort_unstable();
    Ok(files)
}

/// The end of a chain: the last record's `seq` and the SHA-256 of its line (`seq` 0 and [`GENESIS`] for an empty
/// log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: Sha256Hex,
}

/// The end of one file's chain and the time span of its records, as published in `/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHead {
    pub records: u64,
    pub last_hash: Sha256Hex,
    /// `time` of the first record; `None` for an empty file or when the first line is not a record.
    pub first_time: Option<Timestamp>,
    /// `time` of the last record; `None` for an empty file.
    pub last_time: Option<Timestamp>,
}

/// The head of a file no writer holds, read from its first and last lines. A file whose last line is torn or not
/// a record (a broken tail) has the head of its last line that is a record; `None` when no line is.
pub fn read_file_head(path: &Path) -> io::Result<Option<FileHead>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Some(FileHead {
            records: 0,
            last_hash: GENESIS,
            first_time: None,
            last_time: None,
        }));
    }
    let first_time = read_first_time(&file)?;
    let (head, last_time) = match read_head(&file, len)? {
        Ok(tail) => tail,
        Err(_) => {
            let mut lines = BackwardLines::new(&file, len)?;
            let mut found = None;
            while let Some(line) = lines.next_line().ok().flatten() {
                // As in read_head: seq 0 or u64::MAX is a forged line, not a record.
                if let Ok(entry) = parse_line(&line)
                    && entry.seq != 0
                    && entry.seq != u64::MAX
                {
                    found = Some((
                        Head {
                            seq: entry.seq,
                            hash: Sha256Hex::of(&line),
                        },
                        entry.record.time(),
                    ));
                    break;
                }
            }
            match found {
                Some(tail) => tail,
                None => return Ok(None),
            }
        }
    };
    Ok(Some(FileHead {
        records: head.seq,
        last_hash: head.hash,
        first_time,
        last_time: Some(last_time),
    }))
}

/// `time` of the first line, when it is a record.
fn read_first_time(mut file: &File) -> io::Result<Option<Timestamp>> {
    file.seek(SeekFrom::Start(0))?;
    let mut first = Vec::new();
    io::BufReader::new(file.take(MAX_LINE_BYTES as u64 + 1)).read_until(b'\n', &mut first)?;
    Ok(first
        .strip_suffix(b"\n")
        .and_then(|line| parse_line(line).ok())
        .map(|entry| entry.record.time()))
}

/// An open evidence log, exclusively locked (advisory `flock`) so a second writer cannot fork the chain.
#[derive(Debug)]
pub struct EvidenceLog {
    path: PathBuf,
    file: File,
    /// File size after the last good append, to roll back a partial write and to notice outside changes.
    len: u64,
    head: Head,
    first_time: Option<Timestamp>,
    last_time: Option<Timestamp>,
    /// Set by a failed append: after a failed fsync nobody knows what reached the disk.
    poisoned: bool,
}

impl EvidenceLog {
    /// Opens or creates the log at `path` and continues its chain from the last line.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let io_error = |action| {
            let path = path.clone();
            move |source| Error::Io { path, action, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_error("open"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(Error::Locked { path: path.clone() }),
            Err(TryLockError::Error(source)) => return Err(io_error("lock")(source)),
        }
        let len = file.metadata().map_err(io_error("stat"))?.len();
        let (head, first_time, last_time) = if len == 0 {
            // The file may have just been created: make its directory entry durable before any record relies on it.
            sync_parent_dir(&path).map_err(io_error("sync the directory of"))?;
            (Head { seq: 0, hash: GENESIS }, None, None)
        } else {
            let (head, last_time) =
                read_head(&file, len)
                    .map_err(io_error("read"))?
                    .map_err(|source| Error::BrokenTail {
                        path: path.clone(),
                        source,
                    })?;
            let first_time = read_first_time(&file).map_err(io_error("read"))?;
            (head, first_time, Some(last_time))
        };
        Ok(Self {
            path,
            file,
            len,
            head,
            first_time,
            last_time,
            poisoned: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The chain so far and the time span of its records.
    pub fn file_head(&self) -> FileHead {
        FileHead {
            records: self.head.seq,
            last_hash: self.head.hash,
            first_time: self.first_time,
            last_time: self.last_time,
        }
    }

    /// Appends one record and returns once it is on disk (written in one `write` and `fdatasync`ed). Only then
    /// may the delivery be acknowledged. After any failure the log refuses further appends until reopened.
    pub fn append(&mut self, attempt: &Attempt) -> Result<Head> {
        self.append_all(std::slice::from_ref(attempt))
    }

    /// Appends `attempts` in order with one `write` and one `fdatasync` for all of them (group commit: the cost
    /// of a disk flush is shared by every delivery that finished while the previous one ran). All or nothing:
    /// a failure rolls the file back to its previous length and poisons the log.
    pub fn append_all<R: Serialize + RecordTime>(&mut self, records: &[R]) -> Result<Head> {
        if self.poisoned {
            return Err(Error::Poisoned {
                path: self.path.clone(),
            });
        }
        let mut head = self.head;
        let mut lines = Vec::new();
        for record in records {
            let entry = Entry {
                seq: head.seq + 1,
                prev: head.hash,
                record,
            };
            let line = serde_json::to_vec(&entry)?;
            if line.len() > MAX_LINE_BYTES {
                return Err(Error::RecordTooLarge {
                    size: line.len(),
                    limit: MAX_LINE_BYTES,
                });
            }
            head = Head {
                seq: entry.seq,
                hash: Sha256Hex::of(&line),
            };
            lines.extend_from_slice(&line);
            lines.push(b'\n');
        }
        if lines.is_empty() {
            return Ok(head);
        }

        // Poisoned unless this append completes: every early return below leaves the file in doubt.
        self.poisoned = true;
        let found = self
            .file
            .metadata()
            .map_err(|source| self.io_error("stat", source))?
            .len();
        if found != self.len {
            return Err(Error::ModifiedExternally {
                path: self.path.clone(),
                expected: self.len,
                found,
            });
        }
        if let Err(source) = self.file.write_all(&lines).and_then(|()| self.file.sync_data()) {
            // Best effort: if the truncation fails too, the next open reports the broken tail.
            let _ = self.file.set_len(self.len).and_then(|()| self.file.sync_data());
            return Err(self.io_error("append to", source));
        }
        self.poisoned = false;
        self.len += lines.len() as u64;
        self.head = head;
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            self.first_time.get_or_insert(first.time());
            self.last_time = Some(last.time());
        }
        Ok(head)
    }

    fn io_error(&self, action: &'static str, source: io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            action,
            source,
        }
    }
}

pub(super) fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Reads only the tail of a non-empty log: the last line plus the newline before it. Returns its head and the
/// last record's time.
fn read_head(mut file: &File, len: u64) -> io::Result<Result<(Head, Timestamp), ChainError>> {
    let window = (MAX_LINE_BYTES as u64 + 2).min(len);
    file.seek(SeekFrom::Start(len - window))?;
    let mut tail = Vec::new();
    file.take(window).read_to_end(&mut tail)?;

    let broken = |kind, line| Ok(Err(ChainError { line, kind }));
    let Some(body) = tail.strip_suffix(b"\n") else {
        return broken(BreakKind::Unterminated, count_newlines(file)? + 1);
    };
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(newline) => &body[newline + 1..],
        None if window == len => body,
        // No newline within reach: the last line alone is longer than the cap.
        None => return broken(BreakKind::TooLong, count_newlines(file)?),
    };
    if line.len() > MAX_LINE_BYTES {
        return broken(BreakKind::TooLong, count_newlines(file)?);
    }
    match parse_line(line) {
        // seq 0 never starts a chain and u64::MAX cannot be continued; both mean the line was forged.
        Ok(entry) if entry.seq == 0 || entry.seq == u64::MAX => broken(
            BreakKind::Unparseable {
                reason: format!("seq {} is out of range", entry.seq),
            },
            count_newlines(file)?,
        ),
        Ok(entry) => Ok(Ok((
            Head {
                seq: entry.seq,
                hash: Sha256Hex::of(line),
            },
            entry.record.time(),
        ))),
        Err(kind) => broken(kind, count_newlines(file)?),
    }
}

/// Only on the error path: the line number of a broken tail costs a full read.
fn count_newlines(mut file: &File) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0; 64 * 1024];
    let mut count = 0;
    loop {
        let read = file.read(&mut buf)?;
        if read == 0 {
            return Ok(count);
        }
        count += buf[..read].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::record::tests::sample_attempt;
    use crate::evidence::{Outcome, VerifySummary, verify};
    use std::io::BufReader;

    fn temp_log() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evidence.jsonl");
        (dir, path)
    }

    fn verify_file(path: &Path) -> VerifySummary {
        verify(BufReader::new(File::open(path).unwrap())).unwrap()
    }

    #[test]
    fn appends_start_from_genesis_and_chain() {
        let (_dir, path) = temp_log();
        let mut log = EvidenceLog::open(&path).unwrap();
        let first = log.append(&sample_attempt()).unwrap();
        let second = log.append(&sample_attempt()).unwrap();
        assert_eq!((first.seq, second.seq), (1, 2));

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(text.ends_with('\n'));
        assert!(lines[0].starts_with(&format!(r#"{{"seq":1,"prev":"{GENESIS}","time":"#)));
        assert!(lines[1].starts_with(&format!(
            r#"{{"seq":2,"prev":"{}","#,
            Sha256Hex::of(lines[0].as_bytes())
        )));
        assert_eq!(first.hash, Sha256Hex::of(lines[0].as_bytes()));
        assert_eq!(verify_file(&path).last_hash, second.hash);
    }

    #[test]
    fn reopening_continues_the_chain() {
        let (_dir, path) = temp_log();
        let head = {
            let mut log = EvidenceLog::open(&path).unwrap();
            log.append(&sample_attempt()).unwrap();
            log.append(&sample_attempt()).unwrap()
        };
        let mut log = EvidenceLog::open(&path).unwrap();
        let next = log
            .append(&Attempt {
                outcome: Outcome::Deferred,
                ..sample_attempt()
            })
            .unwrap();
        assert_eq!(next.seq, head.seq + 1);
        let summary = verify_file(&path);
        assert_eq!((summary.records, summary.last_hash), (3, next.hash));
    }

    #[test]
    fn reopening_an_empty_file_starts_from_genesis() {
        let (_dir, path) = temp_log();
        File::create(&path).unwrap();
        let head = EvidenceLog::open(&path).unwrap().append(&sample_attempt()).unwrap();
        assert_eq!(head.seq, 1);
        assert_eq!(verify_file(&path).records, 1);
    }

    #[test]
    fn second_writer_is_refused() {
        let (_dir, path) = temp_log();
        let _first = EvidenceLog::open(&path).unwrap();
        assert!(matches!(EvidenceLog::open(&path), Err(Error::Locked { .. })));
    }

    /// Writes `count` records, then lets `damage` change the file.
    fn damaged_log(count: usize, damage: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
        let (dir, path) = temp_log();
        let mut log = EvidenceLog::open(&path).unwrap();
        for _ in 0..count {
            log.append(&sample_attempt()).unwrap();
        }
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        damage(&mut bytes);
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    fn broken_tail(path: &Path) -> (u64, BreakKind, String) {
        match EvidenceLog::open(path) {
            Err(err @ Error::BrokenTail { .. }) => {
                let message = err.to_string();
                let Error::BrokenTail { source, .. } = err else {
                    unreachable!()
                };
                (source.line, source.kind, message)
            }
            other => panic!("expected a broken tail, got {other:?}"),
        }
    }

    #[test]
    fn torn_last_line_is_refused_naming_file_and_line() {
        let (_dir, path) = damaged_log(3, |bytes| bytes.truncate(bytes.len() - 20));
        let before = std::fs::read(&path).unwrap();
        let (line, kind, message) = broken_tail(&path);
        assert_eq!(line, 3);
        assert!(matches!(kind, BreakKind::Unterminated), "{kind:?}");
        assert!(
            message.contains(&path.display().to_string()) && message.contains("line 3"),
            "{message}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "refusing must not touch the file"
        );
    }

    #[test]
    fn garbage_last_line_is_refused() {
        let (_dir, path) = damaged_log(2, |bytes| bytes.extend_from_slice(b"{\"seq\":3}\n"));
        let (line, kind, _) = broken_tail(&path);
        assert_eq!(line, 3);
        assert!(matches!(kind, BreakKind::Unparseable { .. }), "{kind:?}");
    }

    #[test]
    fn overlong_last_line_is_refused() {
        let (_dir, path) = damaged_log(1, |bytes| {
            bytes.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 10));
            bytes.push(b'\n');
        });
        let (line, kind, _) = broken_tail(&path);
        assert_eq!(line, 2);
        assert!(matches!(kind, BreakKind::TooLong), "{kind:?}");
    }

    #[test]
    fn last_line_with_exhausted_seq_is_refused() {
        let (_dir, path) = damaged_log(1, |bytes| {
            let text = String::from_utf8(bytes.clone()).unwrap();
            *bytes = text
                .replacen("\"seq\":1", &format!("\"seq\":{}", u64::MAX), 1)
                .into_bytes();
        });
        let (line, kind, _) = broken_tail(&path);
        assert_eq!(line, 1);
        assert!(matches!(kind, BreakKind::Unparseable { .. }), "{kind:?}");
    }

    #[test]
    fn change_behind_the_writer_stops_appends() {
        let (_dir, path) = temp_log();
        let mut log = EvidenceLog::open(&path).unwrap();
        log.append(&sample_attempt()).unwrap();
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert!(matches!(
            log.append(&sample_attempt()),
            Err(Error::ModifiedExternally { .. })
        ));
        assert!(matches!(log.append(&sample_attempt()), Err(Error::Poisoned { .. })));
    }

    #[test]
    fn oversized_record_is_refused_before_writing() {
        let (_dir, path) = temp_log();
        let mut log = EvidenceLog::open(&path).unwrap();
        let mut attempt = sample_attempt();
        if let Some(tls) = attempt.tls.as_mut() {
            tls.peer_chain_sha256 = vec![GENESIS; MAX_LINE_BYTES / 64];
        }
        assert!(matches!(log.append(&attempt), Err(Error::RecordTooLarge { .. })));
        // Nothing was written, so the log is still usable.
        assert_eq!(log.append(&sample_attempt()).unwrap().seq, 1);
        assert_eq!(verify_file(&path).records, 1);
    }
}
