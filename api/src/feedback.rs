//! The reserved address tenants forward spam-complaint reports (ARF, RFC 5965) to. Mail to it goes through the
//! tenant's normal, authenticated submission path; the sidecar recognises the recipient, counts the complaint
//! and never delivers it. `.invalid` (RFC 2606) never resolves, so a report can never leave by mistake.

/// The local part of [`FEEDBACK_ADDRESS`].
pub const FEEDBACK_LOCAL_PART: &str = "feedback";
/// The domain of [`FEEDBACK_ADDRESS`].
pub const FEEDBACK_DOMAIN: &str = "feedback.securemail.invalid";
/// Where feedback-loop processors send each ARF report.
pub const FEEDBACK_ADDRESS: &str = "feedback@feedback.securemail.invalid";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_its_local_part_at_its_domain_under_invalid() {
        assert_eq!(FEEDBACK_ADDRESS, format!("{FEEDBACK_LOCAL_PART}@{FEEDBACK_DOMAIN}"));
        assert!(FEEDBACK_DOMAIN.ends_with(".invalid"));
    }
}
