//! The SMTP client side: parsing replies and running sessions with MX hosts.

pub mod client;
pub mod reply;
