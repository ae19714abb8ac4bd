//! The SecureMail sidecar.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod deliver;
pub mod dkim;
pub mod egress;
pub mod error;
pub mod evidence;
pub mod feedback;
pub mod lmtp;
pub mod metrics;
pub mod policy;
pub mod provider;
pub mod queue;
mod relay;
pub mod reputation;
pub mod smtp;
pub mod socketmap;
pub mod tls;
pub mod warmup;

pub use error::{Error, Result};
