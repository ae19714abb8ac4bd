//! Pure types shared by the SecureMail operator and sidecar: the `SecureMailTenant` API.
#![forbid(unsafe_code)]

pub mod dns;
pub mod feedback;
pub mod pkcs8_pem;
pub mod provider;
pub mod sidecar_config;
pub mod sidecar_status;
pub mod tenant;
pub mod warmup;

pub use tenant::{SecureMailTenant, SecureMailTenantSpec, SecureMailTenantStatus};
