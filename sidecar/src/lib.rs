//! The SecureMail sidecar.
#![forbid(unsafe_code)]

pub mod error;
pub mod evidence;

pub use error::{Error, Result};
