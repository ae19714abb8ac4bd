//! Pure types shared by the SecureMail operator and sidecar: the `SecureMailTenant` API.
#![forbid(unsafe_code)]

pub mod tenant;

pub use tenant::{SecureMailTenant, SecureMailTenantSpec, SecureMailTenantStatus};
