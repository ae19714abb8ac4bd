//! The operator's error type.

/// Everything that can go wrong in the operator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot render YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// Result with the operator's error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
