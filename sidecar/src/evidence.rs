//! Delivery evidence: one JSON line per delivery attempt, each carrying the SHA-256 of the line before it, so that
//! editing, removing, inserting or reordering records breaks the chain. The format is described in
//! docs/evidence.md.

mod chain;
mod heads;
mod log;
mod pruned;
mod record;
mod recount;
mod store;
mod writer;

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::digest;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use chain::{BreakKind, ChainError, VerifySummary, verify};
pub use heads::{DirReport, Heads, HeadsError, parse_heads, verify_dir};
pub use log::{EvidenceLog, FileHead, Head, log_files, read_file_head};
pub use pruned::{LogFileName, PruneRecord, PrunedFile};
pub use record::{
    Attempt, DomainName, EnhancedStatus, MAX_REPLY_TEXT_CHARS, MessageIdHash, Outcome, Policy, PolicySource,
    ProtocolError, Refusal, ReplyCode, ReplyText, SmtpReply, TenantRef, TlsSession, Token, Verification, WarmupCount,
};
pub use recount::{Recount, warmup_counts};
pub use store::{EvidenceStore, HeadsHandle, PruneRequest};
pub use writer::EvidenceWriter;

/// Longest line (without its newline) the writer produces and the verifier reads. Real records are well under
/// 2 KiB; the cap keeps a corrupt or hostile file from making the verifier buffer without bound.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// `prev` of the first record of a log.
pub const GENESIS: Sha256Hex = Sha256Hex([0; 32]);

/// A SHA-256 digest, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Hex([u8; 32]);

impl Sha256Hex {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
        Self(bytes)
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Hex({self})")
    }
}

impl FromStr for Sha256Hex {
    type Err = Error;

    /// Lowercase only: one digest has exactly one spelling, so a record has exactly one serialization of it.
    fn from_str(hex: &str) -> Result<Self> {
        let invalid = Error::InvalidField {
            field: "SHA-256 digest",
            reason: "must be 64 lowercase hex digits",
        };
        if hex.len() != 64 {
            return Err(invalid);
        }
        let mut bytes = [0; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            match (hex_digit(pair[0]), hex_digit(pair[1])) {
                (Some(high), Some(low)) => *byte = high << 4 | low,
                _ => return Err(invalid),
            }
        }
        Ok(Self(bytes))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl TryFrom<String> for Sha256Hex {
    type Error = Error;

    fn try_from(hex: String) -> Result<Self> {
        hex.parse()
    }
}

impl From<Sha256Hex> for String {
    fn from(digest: Sha256Hex) -> Self {
        digest.to_string()
    }
}

/// One line of the log: the chain links, then the record's fields at the same level.
#[derive(Serialize, Deserialize)]
struct Entry<R> {
    seq: u64,
    prev: Sha256Hex,
    #[serde(flatten)]
    record: R,
}

/// What a record says about when it was written: every kind of line has a `time`.
pub trait RecordTime {
    fn time(&self) -> Timestamp;
}

impl RecordTime for Attempt {
    fn time(&self) -> Timestamp {
        self.time
    }
}

impl RecordTime for PruneRecord {
    fn time(&self) -> Timestamp {
        self.time
    }
}

/// Any line of a log: a delivery attempt, or the record of a pruned file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    Attempt(Attempt),
    Pruned(PruneRecord),
}

impl RecordTime for Line {
    fn time(&self) -> Timestamp {
        match self {
            Line::Attempt(attempt) => attempt.time,
            Line::Pruned(pruned) => pruned.time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_published_test_vector() {
        assert_eq!(
            Sha256Hex::of(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn sha256_hex_round_trips_and_refuses_other_spellings() {
        let digest = Sha256Hex::of(b"evidence");
        assert_eq!(digest.to_string().parse::<Sha256Hex>().unwrap(), digest);
        assert_eq!(GENESIS.to_string(), "0".repeat(64));
        for bad in [
            "",
            "00",
            &"A".repeat(64),
            &"g".repeat(64),
            &"0".repeat(65),
            &format!("{}é", "0".repeat(62)),
        ] {
            assert!(bad.parse::<Sha256Hex>().is_err(), "{bad:?} was accepted");
        }
    }
}
