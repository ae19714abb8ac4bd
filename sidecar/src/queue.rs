//! Counts the messages Postfix still holds, for `/status`. The operator deletes a pod's volume once this says
//! "empty", so the count errs only upward: an unreadable directory is an error, never zero, and an empty result
//! is only reported when no queue directory changed while it was counted.
//!
//! The sidecar needs read and search access to the queue subdirectories (Postfix keeps them 0700 for its own
//! user); granting it is a deployment concern. Until then the scan fails and `/status` says why.

use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use securemail_api::sidecar_status::QueueStatus;

/// Postfix's queues that hold mail not yet delivered or bounced; each is hashed into subdirectories.
pub const QUEUE_SUBDIRS: [&str; 5] = ["incoming", "active", "deferred", "hold", "maildrop"];

/// Postfix hashes at most a few levels deep (`hash_queue_depth`); anything deeper is not its layout.
const MAX_DEPTH: usize = 8;
/// Scans tried before an empty-looking queue that keeps changing is reported as unknown.
const EMPTY_SCAN_ATTEMPTS: usize = 3;

/// Why the queue could not be counted.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue directory not configured (postfixQueueDir in sidecar.yaml)")]
    NotConfigured,
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("{} is nested deeper than Postfix's queue layout", path.display())]
    TooDeep { path: PathBuf },
    #[error("queue looked empty but kept changing while it was counted")]
    Unstable,
}

/// Counts the files under the queue subdirectories of `queue_dir`; the oldest age is `now` minus the earliest
/// modification time, 0 for a file dated in the future. A missing subdirectory counts as empty (Postfix creates
/// them on start), a missing `queue_dir` is an error. Blocking I/O.
pub fn scan(queue_dir: &Path, now: SystemTime) -> Result<QueueStatus, QueueError> {
    // A missing queue directory means a wrong path or mount, not an empty queue.
    std::fs::read_dir(queue_dir).map_err(|source| QueueError::Io {
        path: queue_dir.to_owned(),
        action: "read",
        source,
    })?;
    for _ in 0..EMPTY_SCAN_ATTEMPTS {
        let mut scan = Scan::default();
        for subdir in QUEUE_SUBDIRS {
            scan.directory(&queue_dir.join(subdir), 0)?;
        }
        if scan.messages > 0 {
            return Ok(scan.status(now));
        }
        // Postfix moves a message between queues by rename: one listed directory after another could both miss
        // it. A rename changes the modification time of both directories, so unchanged times (nanosecond
        // timestamps, as on ext4 and xfs) confirm the zero.
        if scan.unchanged()? {
            return Ok(QueueStatus::default());
        }
    }
    Err(QueueError::Unstable)
}

#[derive(Default)]
struct Scan {
    messages: u64,
    oldest: Option<SystemTime>,
    /// Every directory visited with its modification time, `None` when it did not exist.
    directories: Vec<(PathBuf, Option<SystemTime>)>,
}

impl Scan {
    fn directory(&mut self, path: &Path, depth: usize) -> Result<(), QueueError> {
        if depth > MAX_DEPTH {
            return Err(QueueError::TooDeep { path: path.to_owned() });
        }
        let io_error = |action, source| QueueError::Io {
            path: path.to_owned(),
            action,
            source,
        };
        let stamp = modified(path).map_err(|source| io_error("inspect", source))?;
        self.directories.push((path.to_owned(), stamp));
        if stamp.is_none() {
            return Ok(());
        }
        let entries = match std::fs::read_dir(path) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(io_error("read", source)),
        };
        for entry in entries {
            let entry = entry.map_err(|source| io_error("read", source))?;
            let entry_path = entry.path();
            // Not following symlinks: Postfix's queue has none, and a loop must not hang the scan.
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                // Delivered or moved since the listing; counted where it went, if scanned later.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(QueueError::Io {
                        path: entry_path,
                        action: "inspect",
                        source,
                    });
                }
            };
            if metadata.is_dir() {
                self.directory(&entry_path, depth + 1)?;
            } else if metadata.is_file() {
                self.messages += 1;
                let modified = metadata.modified().map_err(|source| QueueError::Io {
                    path: entry_path,
                    action: "read the modification time of",
                    source,
                })?;
                self.oldest = Some(self.oldest.map_or(modified, |oldest| oldest.min(modified)));
            }
        }
        Ok(())
    }

    fn unchanged(&self) -> Result<bool, QueueError> {
        for (path, stamp) in &self.directories {
            let now = modified(path).map_err(|source| QueueError::Io {
                path: path.clone(),
                action: "inspect",
                source,
            })?;
            if now != *stamp {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn status(&self, now: SystemTime) -> QueueStatus {
        QueueStatus {
            messages: self.messages,
            oldest_age_seconds: self
                .oldest
                .map(|oldest| now.duration_since(oldest).map_or(0, |age| age.as_secs())),
        }
    }
}

/// A directory's modification time, `None` when it does not exist.
fn modified(path: &Path) -> io::Result<Option<SystemTime>> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata.modified().map(Some),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}
