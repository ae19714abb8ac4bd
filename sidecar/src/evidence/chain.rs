//! Checking a whole log: every line parses, `seq` counts up from 1, and `prev` is the SHA-256 of the line before.

use std::fmt;
use std::io::{self, BufRead, Read};

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{Attempt, Entry, GENESIS, Line, MAX_LINE_BYTES, PruneRecord, Sha256Hex};

/// A log that verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifySummary {
    pub records: u64,
    /// SHA-256 of the last line ([`GENESIS`] for an empty log). A chain only proves its lines agree with each
    /// other; recording this value elsewhere is what makes a later edit of the last line, or a cut at a line
    /// boundary, detectable.
    pub last_hash: Sha256Hex,
}

impl fmt::Display for VerifySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} records, last hash {}", self.records, self.last_hash)
    }
}

/// The first line (1-based) at which a log stops being a valid chain, and why.
#[derive(Debug)]
pub struct ChainError {
    pub line: u64,
    pub kind: BreakKind,
}

/// Why a line breaks the chain.
#[derive(Debug)]
pub enum BreakKind {
    Io(io::Error),
    /// Longer than [`MAX_LINE_BYTES`].
    TooLong,
    /// The last line has no newline: cut short, or caught mid-append.
    Unterminated,
    /// Not UTF-8 JSON with the record's fields and valid values.
    Unparseable {
        reason: String,
    },
    SeqGap {
        expected: u64,
        found: u64,
    },
    /// `prev` is not the hash of the previous line (or [`GENESIS`] on line 1).
    HashMismatch {
        expected: Sha256Hex,
        found: Sha256Hex,
    },
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = self.line;
        write!(f, "line {line}: ")?;
        match &self.kind {
            BreakKind::Io(err) => write!(f, "cannot read: {err}"),
            BreakKind::TooLong => write!(f, "longer than {MAX_LINE_BYTES} bytes, so not an evidence record"),
            BreakKind::Unterminated => write!(
                f,
                "incomplete, no trailing newline: the file was cut short or an append was interrupted"
            ),
            BreakKind::Unparseable { reason } => write!(f, "not an evidence record: {reason}"),
            BreakKind::SeqGap { expected, found } => write!(
                f,
                "seq is {found}, expected {expected}: records were removed, duplicated or reordered"
            ),
            BreakKind::HashMismatch { expected, found } if line == 1 => write!(
                f,
                "prev is {found}, expected the genesis value {expected}: this is not the start of a log"
            ),
            BreakKind::HashMismatch { expected, found } => write!(
                f,
                "prev is {found} but line {} hashes to {expected}: line {} was altered, or lines were \
                 removed, inserted or reordered",
                line - 1,
                line - 1
            ),
        }
    }
}

impl std::error::Error for ChainError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            BreakKind::Io(err) => Some(err),
            _ => None,
        }
    }
}

/// Checks a whole log. Reads at most [`MAX_LINE_BYTES`] + 1 bytes per line, never echoes line content (a damaged
/// or forged line may hold anything) and does not panic on any input.
pub fn verify(reader: impl BufRead) -> Result<VerifySummary, ChainError> {
    let walk = walk(reader, None);
    match walk.broken {
        Some(err) => Err(err),
        None => Ok(walk.valid),
    }
}

/// What reading a log found, even when its chain breaks.
#[derive(Debug)]
pub(super) struct Walk {
    /// The lines before the first break (all of them when none).
    pub valid: VerifySummary,
    /// The first break.
    pub broken: Option<ChainError>,
    /// The hash of line `hash_of_line`, when that line is among the valid ones.
    pub hash_at: Option<Sha256Hex>,
    /// The prune records among the valid lines, with their line numbers.
    pub pruned: Vec<(u64, PruneRecord)>,
}

/// Reads a log like [`verify`] and also notes the hash of line `hash_of_line` and the prune records.
pub(super) fn walk(mut reader: impl BufRead, hash_of_line: Option<u64>) -> Walk {
    let mut walk = Walk {
        valid: VerifySummary {
            records: 0,
            last_hash: GENESIS,
        },
        broken: None,
        hash_at: None,
        pruned: Vec::new(),
    };
    let mut line = Vec::new();
    loop {
        let number = walk.valid.records + 1;
        let fail = |kind| Some(ChainError { line: number, kind });
        line.clear();
        let read = match (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(read) => read,
            Err(err) => {
                walk.broken = fail(BreakKind::Io(err));
                return walk;
            }
        };
        if read == 0 {
            return walk;
        }
        let Some(content) = line.strip_suffix(b"\n") else {
            let kind = if line.len() > MAX_LINE_BYTES {
                BreakKind::TooLong
            } else {
                BreakKind::Unterminated
            };
            walk.broken = fail(kind);
            return walk;
        };
        let entry = match parse_line(content) {
            Ok(entry) => entry,
            Err(kind) => {
                walk.broken = fail(kind);
                return walk;
            }
        };
        if entry.seq != number {
            walk.broken = fail(BreakKind::SeqGap {
                expected: number,
                found: entry.seq,
            });
            return walk;
        }
        if entry.prev != walk.valid.last_hash {
            walk.broken = fail(BreakKind::HashMismatch {
                expected: walk.valid.last_hash,
                found: entry.prev,
            });
            return walk;
        }
        walk.valid = VerifySummary {
            records: number,
            last_hash: Sha256Hex::of(content),
        };
        if hash_of_line == Some(number) {
            walk.hash_at = Some(walk.valid.last_hash);
        }
        if let Line::Pruned(pruned) = entry.record {
            walk.pruned.push((number, pruned));
        }
    }
}

/// Parses one line without its newline: a prune record when it has a `pruned` key, else an attempt.
pub(super) fn parse_line(content: &[u8]) -> Result<Entry<Line>, BreakKind> {
    #[derive(Deserialize)]
    struct Kind {
        #[serde(default)]
        pruned: Option<IgnoredAny>,
    }
    let kind: Kind = serde_json::from_slice(content).map_err(unparseable)?;
    if kind.pruned.is_some() {
        let entry: Entry<PruneRecord> = serde_json::from_slice(content).map_err(unparseable)?;
        Ok(Entry {
            seq: entry.seq,
            prev: entry.prev,
            record: Line::Pruned(entry.record),
        })
    } else {
        let entry: Entry<Attempt> = serde_json::from_slice(content).map_err(unparseable)?;
        Ok(Entry {
            seq: entry.seq,
            prev: entry.prev,
            record: Line::Attempt(entry.record),
        })
    }
}

fn unparseable(err: serde_json::Error) -> BreakKind {
    // serde_json places errors at "line 1 column N" of its input; only the column means anything here.
    let message = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    let reason = match message.strip_suffix(&suffix) {
        Some(bare) => format!("{bare} (column {})", err.column()),
        None => message,
    };
    BreakKind::Unparseable { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::EvidenceLog;
    use crate::evidence::record::tests::{arb_attempt, sample_attempt};
    use proptest::prelude::*;

    /// A log of `count` records written by the real writer.
    fn log_bytes(count: usize) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evidence.jsonl");
        let mut log = EvidenceLog::open(&path).unwrap();
        for _ in 0..count {
            log.append(&sample_attempt()).unwrap();
        }
        std::fs::read(&path).unwrap()
    }

    fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
        bytes.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
    }

    fn broken_at(bytes: &[u8]) -> (u64, BreakKind) {
        let err = verify(bytes).unwrap_err();
        (err.line, err.kind)
    }

    #[test]
    fn empty_log_verifies_with_the_genesis_hash() {
        let summary = verify(&b""[..]).unwrap();
        assert_eq!(
            summary,
            VerifySummary {
                records: 0,
                last_hash: GENESIS
            }
        );
    }

    #[test]
    fn intact_log_verifies_and_reports_the_last_line_hash() {
        let bytes = log_bytes(3);
        let summary = verify(&bytes[..]).unwrap();
        let last = lines(&bytes).pop().unwrap();
        assert_eq!(summary.records, 3);
        assert_eq!(summary.last_hash, Sha256Hex::of(last.strip_suffix(b"\n").unwrap()));
    }

    #[test]
    fn edited_field_in_the_middle_line_is_caught_at_the_next_link() {
        let mut lines = lines(&log_bytes(3));
        let edited = String::from_utf8(lines[1].clone())
            .unwrap()
            .replace("\"delivered\"", "\"bounced\"");
        assert_ne!(edited.as_bytes(), &lines[1][..]);
        lines[1] = edited.into_bytes();
        // The edited line still parses; only line 3's prev can tell it changed.
        let (line, kind) = broken_at(&lines.concat());
        assert_eq!(line, 3);
        assert!(matches!(kind, BreakKind::HashMismatch { .. }), "{kind:?}");
        let err = verify(&lines.concat()[..]).unwrap_err().to_string();
        assert!(
            err.starts_with("line 3: ") && err.contains("line 2 was altered"),
            "{err}"
        );
    }

    #[test]
    fn deleted_line_is_a_seq_gap_where_it_was() {
        let mut lines = lines(&log_bytes(3));
        lines.remove(1);
        let (line, kind) = broken_at(&lines.concat());
        assert_eq!(line, 2);
        assert!(matches!(kind, BreakKind::SeqGap { expected: 2, found: 3 }), "{kind:?}");
    }

    #[test]
    fn deleted_line_with_renumbered_seq_is_a_hash_mismatch() {
        let mut lines = lines(&log_bytes(3));
        lines.remove(1);
        lines[1] = String::from_utf8(lines[1].clone())
            .unwrap()
            .replacen("\"seq\":3", "\"seq\":2", 1)
            .into_bytes();
        let (line, kind) = broken_at(&lines.concat());
        assert_eq!(line, 2);
        assert!(matches!(kind, BreakKind::HashMismatch { .. }), "{kind:?}");
    }

    #[test]
    fn reordered_lines_are_a_seq_gap_at_the_first_moved_line() {
        let mut lines = lines(&log_bytes(3));
        lines.swap(1, 2);
        let (line, kind) = broken_at(&lines.concat());
        assert_eq!(line, 2);
        assert!(matches!(kind, BreakKind::SeqGap { expected: 2, found: 3 }), "{kind:?}");
    }

    #[test]
    fn truncated_last_line_is_unterminated() {
        let bytes = log_bytes(3);
        let (line, kind) = broken_at(&bytes[..bytes.len() - 10]);
        assert_eq!(line, 3);
        assert!(matches!(kind, BreakKind::Unterminated), "{kind:?}");
        // Losing only the final newline is the same break.
        let (line, kind) = broken_at(&bytes[..bytes.len() - 1]);
        assert_eq!(line, 3);
        assert!(matches!(kind, BreakKind::Unterminated), "{kind:?}");
    }

    #[test]
    fn removed_first_line_is_caught() {
        let mut lines = lines(&log_bytes(2));
        lines.remove(0);
        let (line, kind) = broken_at(&lines.concat());
        assert_eq!(line, 1);
        assert!(matches!(kind, BreakKind::SeqGap { expected: 1, found: 2 }), "{kind:?}");
    }

    #[test]
    fn first_line_must_start_from_genesis() {
        let forged = lines(&log_bytes(1))[0].clone();
        let forged = String::from_utf8(forged).unwrap().replacen(
            &GENESIS.to_string(),
            &Sha256Hex::of(b"elsewhere").to_string(),
            1,
        );
        let err = verify(forged.as_bytes()).unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.to_string().contains("genesis"), "{err}");
    }

    #[test]
    fn garbage_and_non_utf8_lines_are_unparseable_without_echoing_them() {
        let mut bytes = log_bytes(1);
        bytes.extend_from_slice(b"jane@example.net \xff\xfe\n");
        let err = verify(&bytes[..]).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(matches!(err.kind, BreakKind::Unparseable { .. }), "{:?}", err.kind);
        let message = err.to_string();
        assert!(
            !message.contains("jane") && !message.contains("line 1 column"),
            "{message}"
        );
    }

    #[test]
    fn record_with_a_wrong_field_value_is_unparseable() {
        let mut lines = lines(&log_bytes(2));
        lines[1] = String::from_utf8(lines[1].clone())
            .unwrap()
            .replace("\"example.net\"", "\"jane@example.net\"")
            .into_bytes();
        let (line, kind) = broken_at(&lines.concat());
        assert_eq!(line, 2);
        assert!(matches!(kind, BreakKind::Unparseable { .. }), "{kind:?}");
    }

    #[test]
    fn overlong_line_is_refused_after_reading_only_the_cap() {
        let mut bytes = log_bytes(1);
        bytes.extend(std::iter::repeat_n(b' ', 10 * MAX_LINE_BYTES));
        bytes.push(b'\n');
        let (line, kind) = broken_at(&bytes);
        assert_eq!(line, 2);
        assert!(matches!(kind, BreakKind::TooLong), "{kind:?}");

        let mut exactly_at_cap = vec![b' '; MAX_LINE_BYTES];
        exactly_at_cap.push(b'\n');
        let (_, kind) = broken_at(&exactly_at_cap);
        assert!(matches!(kind, BreakKind::Unparseable { .. }), "{kind:?}");
    }

    #[test]
    fn read_errors_name_the_line() {
        struct FailingAfter<'a>(&'a [u8]);
        impl Read for FailingAfter<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::Error::other("disk on fire"));
                }
                self.0.read(buf)
            }
        }
        let bytes = log_bytes(2);
        let err = verify(io::BufReader::new(FailingAfter(&bytes))).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(matches!(err.kind, BreakKind::Io(_)), "{:?}", err.kind);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_single_byte_change_is_detected(
            attempts in prop::collection::vec(arb_attempt(), 1..6),
            position in any::<prop::sample::Index>(),
            replacement in any::<u8>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("evidence.jsonl");
            let mut log = EvidenceLog::open(&path).unwrap();
            for attempt in &attempts {
                log.append(attempt).unwrap();
            }
            let original = std::fs::read(&path).unwrap();
            let summary = verify(&original[..]).unwrap();
            prop_assert_eq!(summary.records, attempts.len() as u64);

            let at = position.index(original.len());
            prop_assume!(original[at] != replacement);
            let mut tampered = original.clone();
            tampered[at] = replacement;
            let last_line_start = original[..original.len() - 1]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |newline| newline + 1);
            match verify(&tampered[..]) {
                Err(_) => {}
                // Nothing follows the last line to vouch for it: a change there that still parses shows only as a
                // different last hash, which is why verify reports it.
                Ok(after) => {
                    prop_assert!(at >= last_line_start, "change at byte {} went unnoticed", at);
                    prop_assert_ne!(after.last_hash, summary.last_hash);
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let _ = verify(&bytes[..]);
        }
    }
}
