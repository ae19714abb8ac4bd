//! The sidecar's error type.

use std::path::PathBuf;

use crate::evidence::ChainError;

/// Everything that can go wrong in the sidecar library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value offered for an evidence field was refused. The value itself is never repeated: it may be a
    /// recipient address handed over by mistake, and errors end up in logs.
    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: &'static str },

    #[error("evidence log {}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },

    #[error("evidence log {} is held by another process; only one writer may extend a chain", path.display())]
    Locked { path: PathBuf },

    #[error(
        "evidence log {} has a broken tail at {source}; refusing to extend it. Keep the file as evidence, move it \
         aside and restart to begin a new log (see docs/evidence.md)",
        path.display()
    )]
    BrokenTail { path: PathBuf, source: ChainError },

    #[error(
        "evidence log {} changed size behind its writer (expected {expected} bytes, found {found}); refusing to \
         extend it",
        path.display()
    )]
    ModifiedExternally { path: PathBuf, expected: u64, found: u64 },

    #[error("evidence log {} refuses appends after a failed one; reopen it", path.display())]
    Poisoned { path: PathBuf },

    #[error("not pruning evidence: {reason}; the clock looks wrong")]
    ClockSuspect { reason: String },

    #[error("evidence could not be written: {0}")]
    EvidenceWriter(String),

    #[error("evidence record of {size} bytes exceeds the {limit}-byte line limit")]
    RecordTooLarge { size: usize, limit: usize },

    #[error("cannot serialize evidence record: {0}")]
    Serialize(#[from] serde_json::Error),

    #[error("invalid LMTP reply: {reason}")]
    InvalidReply { reason: &'static str },

    #[error("LMTP socket {}: cannot {action}: {source}", path.display())]
    LmtpSocket {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },

    #[error("LMTP socket path {} is taken by a file that is not a socket; refusing to replace it", path.display())]
    LmtpPathOccupied { path: PathBuf },

    #[error("admin server on {addr}: cannot {action}: {source}")]
    AdminSocket {
        addr: std::net::SocketAddr,
        action: &'static str,
        source: std::io::Error,
    },
}

/// Result with the sidecar's error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
