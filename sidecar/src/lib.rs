//! The SecureMail sidecar.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod dkim;
pub mod error;
pub mod evidence;
pub mod lmtp;
pub mod policy;
pub mod queue;

pub use error::{Error, Result};
