//! The SecureMail sidecar.
#![forbid(unsafe_code)]

pub mod dkim;
pub mod error;
pub mod evidence;
pub mod lmtp;
pub mod policy;

pub use error::{Error, Result};
