//! Names and labels of the objects the operator owns for a tenant. Every child carries the managed-by label so
//! watches and the orphan sweep can select exactly the operator's objects (an unfiltered Secret watch would load
//! every Secret of the cluster).

use std::collections::BTreeMap;

use aws_lc_rs::digest::{SHA256, digest};

/// Field manager for server-side apply, and the value of the managed-by label.
pub const MANAGER: &str = "securemail-operator";
/// `app.kubernetes.io/managed-by`: selects everything the operator owns.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The tenant (SecureMailTenant name) a child belongs to.
pub const TENANT_LABEL: &str = "securemail.io/tenant";
/// What a child is for: mta, config, dkim-key, …
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Component label value of the StatefulSet and its MTA pods.
pub const MTA_COMPONENT: &str = "mta";
/// Component label value of DKIM key Secrets.
pub const DKIM_KEY_COMPONENT: &str = "dkim-key";
/// Pods that accept submissions carry `enabled`; a draining pod is relabelled so the submission Service skips it.
pub const SUBMISSION_LABEL: &str = "securemail.io/submission";
/// Hash of the desired object last applied; equal hashes mean there is nothing to write.
pub const DESIRED_HASH_ANNOTATION: &str = "securemail.io/desired-hash";
/// Label selector matching every object the operator manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=securemail-operator";

/// SHA-256 of `bytes`, lower-case hex: config checksums, desired-object hashes and short name suffixes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    digest(&SHA256, bytes)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Names of one tenant's children.
#[derive(Debug, Clone)]
pub struct TenantNames {
    pub tenant: String,
}

impl TenantNames {
    pub fn new(tenant: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
        }
    }

    /// StatefulSet, its headless Service, ServiceAccount, PodDisruptionBudget and NetworkPolicy.
    pub fn mta(&self) -> String {
        format!("{}-mta", self.tenant)
    }

    pub fn submission_service(&self) -> String {
        format!("{}-submission", self.tenant)
    }

    pub fn config_map(&self) -> String {
        format!("{}-mta-config", self.tenant)
    }

    /// One Secret per DKIM key; the domain is hashed because domain names can be longer than a Secret name allows.
    pub fn dkim_secret(&self, domain: &str, selector: &str) -> String {
        let hash = sha256_hex(domain.as_bytes());
        format!("{}-dkim-{}-{selector}", self.tenant, &hash[..8])
    }

    /// Labels every child of this tenant carries.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.to_owned(), MANAGER.to_owned()),
            ("app.kubernetes.io/part-of".to_owned(), "securemail".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), self.tenant.clone()),
            (TENANT_LABEL.to_owned(), self.tenant.clone()),
            (COMPONENT_LABEL.to_owned(), component.to_owned()),
        ])
    }

    /// Selector of the tenant's MTA pods.
    pub fn pod_selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (TENANT_LABEL.to_owned(), self.tenant.clone()),
            (COMPONENT_LABEL.to_owned(), MTA_COMPONENT.to_owned()),
        ])
    }

    /// Label selector string for all children of this tenant.
    pub fn children_selector(&self) -> String {
        format!("{MANAGED_SELECTOR},{TENANT_LABEL}={}", self.tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dkim_secret_names_are_stable_and_short() {
        let names = TenantNames::new("clinic");
        let long_domain = format!("{}.example.org", "a".repeat(200));
        let name = names.dkim_secret(&long_domain, "sm-rsa-1");
        assert_eq!(name, names.dkim_secret(&long_domain, "sm-rsa-1"));
        assert!(name.len() <= 63, "{name}");
        assert_ne!(name, names.dkim_secret("other.example.org", "sm-rsa-1"));
    }
}
