//! Counting Postfix's queue on a real directory tree laid out as Postfix hashes it.
#![allow(clippy::unwrap_used, reason = "test set-up: a panic is the failure report")]

use std::fs::File;
use std::path::Path;
use std::time::{Duration, SystemTime};

use securemail_sidecar::queue::{self, QueueError};

const NOW: Duration = Duration::from_secs(1_767_225_600);

fn at(seconds_before_now: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + NOW - Duration::from_secs(seconds_before_now)
}

fn queue_file(queue_dir: &Path, relative: &str, modified: SystemTime) {
    let path = queue_dir.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    File::create(&path).unwrap().set_modified(modified).unwrap();
}

#[test]
fn counts_files_in_nested_hash_directories_of_every_queue_and_dates_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path();
    queue_file(q, "incoming/A/A1B2C3", at(5));
    queue_file(q, "deferred/4/2/42F00D", at(7200));
    queue_file(q, "deferred/4/3/43F00D", at(60));
    queue_file(q, "hold/9/9ABC", at(30));
    queue_file(q, "maildrop/DEADBEEF", at(1));
    // Not queued mail: per-message logs and Postfix's other directories.
    queue_file(q, "defer/4/2/42F00D", at(99_999));
    queue_file(q, "bounce/4/42F00D", at(99_999));
    queue_file(q, "pid/master.pid", at(99_999));
    // `active` does not exist (Postfix has not started it yet): empty, not an error.

    let status = queue::scan(q, SystemTime::UNIX_EPOCH + NOW).unwrap();
    assert_eq!(status.messages, 5);
    assert_eq!(status.oldest_age_seconds, Some(7200));
    assert!(!status.is_empty());

    // The age follows the clock passed in.
    let later = queue::scan(q, SystemTime::UNIX_EPOCH + NOW + Duration::from_secs(100)).unwrap();
    assert_eq!(later.oldest_age_seconds, Some(7300));
}

#[test]
fn an_empty_queue_has_no_oldest_age_and_a_future_mtime_counts_as_age_zero() {
    let dir = tempfile::tempdir().unwrap();
    for subdir in queue::QUEUE_SUBDIRS {
        std::fs::create_dir_all(dir.path().join(subdir).join("F")).unwrap();
    }
    let empty = queue::scan(dir.path(), SystemTime::UNIX_EPOCH + NOW).unwrap();
    assert_eq!(empty.messages, 0);
    assert_eq!(empty.oldest_age_seconds, None);
    assert!(empty.is_empty());

    queue_file(
        dir.path(),
        "active/F/FUTURE",
        SystemTime::UNIX_EPOCH + NOW + Duration::from_secs(3600),
    );
    let future = queue::scan(dir.path(), SystemTime::UNIX_EPOCH + NOW).unwrap();
    assert_eq!((future.messages, future.oldest_age_seconds), (1, Some(0)));
}

#[test]
fn an_unreadable_queue_or_a_missing_queue_directory_is_an_error_never_zero() {
    let dir = tempfile::tempdir().unwrap();
    queue_file(dir.path(), "incoming/A/A1", at(5));
    // A queue that cannot be listed (the tests may run as root, so a file stands in for a 0700 directory).
    std::fs::write(dir.path().join("deferred"), "").unwrap();
    let err = queue::scan(dir.path(), SystemTime::UNIX_EPOCH + NOW).unwrap_err();
    assert!(
        matches!(&err, QueueError::Io { path, .. } if path.ends_with("deferred")),
        "{err:?}"
    );
    assert!(err.to_string().contains("deferred"), "{err}");

    let missing = dir.path().join("not-mounted");
    let err = queue::scan(&missing, SystemTime::UNIX_EPOCH + NOW).unwrap_err();
    assert!(err.to_string().contains("not-mounted"), "{err}");
}
