//! The SecureMail operator: reconciles SecureMailTenant resources into dedicated MTA infrastructure.
#![forbid(unsafe_code)]

pub mod admin;
pub mod apply;
pub mod build;
pub mod certificate;
pub mod child_cache;
pub mod context;
pub mod controller;
pub mod crd;
pub mod dkim;
pub mod dkim_keys;
pub mod dns_endpoint;
pub mod dnsbl;
pub mod drain;
pub mod egress;
mod error;
pub mod events;
pub mod evidence_retention;
pub mod index;
pub mod inputs;
pub mod names;
pub mod ownership;
pub mod pod_health;
pub mod pod_status;
pub mod postfix;
pub mod queue_storage;
pub mod reconcile;
pub mod render;
pub mod status;

pub use error::{Error, Result};
