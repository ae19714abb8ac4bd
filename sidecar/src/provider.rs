//! The mailbox provider class of an MX host: the tenant's suffixes (`providerSuffixes` in sidecar.yaml), then the
//! built-in table (api crate, shared with the operator).

pub use securemail_api::provider::{Provider, ProviderSuffix, classify};
