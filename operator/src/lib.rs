//! The SecureMail operator.
#![forbid(unsafe_code)]

pub mod crd;
mod error;

pub use error::{Error, Result};
