//! Arbitrary bytes as an evidence log through `evidence::verify`, the check behind `securemail-sidecar evidence
//! verify`. Run with `sidecar/fuzz/run-stable.sh evidence_verify`. A panic is a finding.
//!
//! The input's lines that parse as delivery attempts are also written by the real writer (`EvidenceLog`) to a
//! fresh log, which must verify; then one byte of that log is changed (position and XOR mask from the first five
//! bytes after the input's last newline) and `verify` must report the line holding the changed byte, or the next
//! one with a hash mismatch when the changed line still parses. A change to the last line that still parses
//! must at least change the last hash. Anything else is a finding.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use securemail_sidecar::evidence::{Attempt, BreakKind, EvidenceLog, verify};

/// Fewer records keep each run fast; more than a few add no new way for the chain to break.
const MAX_RECORDS: usize = 8;

/// On tmpfs when there is one: the writer `fdatasync`s every append.
static LOG: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_owned()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("securemail-fuzz-evidence-{}.jsonl", std::process::id()))
});

fuzz_target!(|data: &[u8]| {
    let _ = verify(data);

    let attempts: Vec<Attempt> = data
        .split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice(line).ok())
        .take(MAX_RECORDS)
        .collect();
    if attempts.is_empty() {
        return;
    }
    let _ = std::fs::remove_file(&*LOG);
    let written = {
        let mut log = EvidenceLog::open(&*LOG).expect("a fresh log opens");
        for attempt in &attempts {
            log.append(attempt).expect("the writer appends a record it was given");
        }
        std::fs::read(&*LOG).expect("the log reads back")
    };
    let _ = std::fs::remove_file(&*LOG);
    let summary = verify(&written[..]).expect("a log the writer produced verifies");
    assert_eq!(summary.records, attempts.len() as u64);

    let trailer = data.rsplit(|&b| b == b'\n').next().unwrap_or_default();
    let (position, mask) = match trailer {
        [a, b, c, d, mask, ..] => (u32::from_le_bytes([*a, *b, *c, *d]) as usize, *mask),
        _ => (0, 1),
    };
    let at = position % written.len();
    let mut tampered = written.clone();
    tampered[at] ^= mask.max(1);
    // 1-based line of the changed byte, its newline included.
    let line = written[..at].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    match verify(&tampered[..]) {
        Err(err) => {
            let next_line_vouches = err.line == line + 1 && matches!(err.kind, BreakKind::HashMismatch { .. });
            assert!(
                err.line == line || next_line_vouches,
                "byte {at} on line {line} changed, reported as {err}"
            );
        }
        Ok(after) => {
            assert_eq!(line, summary.records, "byte {at} on line {line} changed unnoticed");
            assert_ne!(after.last_hash, summary.last_hash);
        }
    }
});
