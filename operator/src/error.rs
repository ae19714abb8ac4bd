//! The operator's error type.

/// Everything that can go wrong in the operator library. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot render YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("the object has no {0}")]
    MissingField(&'static str),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("DKIM key: {0}")]
    DkimKey(#[from] crate::dkim_keys::KeyError),
    #[error("DNS record: {0}")]
    Dns(#[from] securemail_api::dns::DnsError),
    #[error("DKIM key Secret {name} is unusable: {reason}")]
    BadKeySecret { name: String, reason: String },
    #[error("waiting for queues to drain: {0}")]
    Draining(String),
    #[error("key generation has stopped (the operator is shutting down)")]
    KeygenStopped,
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Result with the operator's error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
