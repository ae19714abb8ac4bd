//! Pure builders: `(tenant, observed state) -> desired children`. The reconcile loop applies what they return and
//! the offline `render` command prints it, so both always agree.

pub mod config;
mod network;
mod statefulset;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use jiff::civil::Date;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use securemail_api::SecureMailTenant;
use securemail_api::dns;
use securemail_api::tenant::{DkimAlgorithm, DkimSelectorState, DkimSelectorStatus, DnsRecord, PoolAddress};

use crate::names::TenantNames;
use crate::{Error, Result};

pub use config::sidecar_config;
pub use statefulset::SIDECAR_CONTAINER;

/// Operator-wide settings that shape every tenant's children.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Postfix image used when a tenant does not name one.
    pub mta_image: String,
    /// Sidecar image used when a tenant does not name one.
    pub sidecar_image: String,
    /// Namespace whose pods (Prometheus) may scrape the MTA pods' metrics.
    pub monitoring_namespace: String,
    /// Namespace the operator runs in; it reads each pod's `/status`.
    pub operator_namespace: String,
    /// How long a draining pod's queue must stay empty (two readings this far apart) before the pod and its
    /// volume go.
    pub drain_confirmation: Duration,
    /// How often volumes kept as delivery evidence are checked for the end of their retention.
    pub evidence_sweep_interval: Duration,
    /// Resolver for DNSBL lookups; `None`: the ones in /etc/resolv.conf.
    pub dnsbl_nameserver: Option<SocketAddr>,
    /// Namespaces whose tenants the operator manages when it may use Secrets only there; `None`: every namespace.
    pub tenant_namespaces: Option<BTreeSet<String>>,
    /// How every sidecar resolves DNS.
    pub sidecar_dns: SidecarDns,
}

/// The sidecars' resolvers and DNSSEC trust anchors, the same for every tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarDns {
    /// Recursive resolvers; empty: the pod's /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// DNSSEC trust anchors in zone-file format, for a network with its own signed root; `None`: the IANA root's.
    pub trust_anchors: Option<String>,
}

impl Settings {
    /// Whether tenants in `namespace` are managed: the operator can keep their key Secrets there.
    pub fn manages_namespace(&self, namespace: &str) -> bool {
        self.tenant_namespaces
            .as_ref()
            .is_none_or(|namespaces| namespaces.contains(namespace))
    }

    /// Where the operator reads objects it may touch only in managed namespaces: one API per tenant namespace when
    /// it is limited to them, else one over every namespace.
    pub fn managed_apis<K>(&self, client: &kube::Client) -> Vec<kube::Api<K>>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.tenant_namespaces {
            None => vec![kube::Api::all(client.clone())],
            Some(namespaces) => namespaces
                .iter()
                .map(|namespace| kube::Api::namespaced(client.clone(), namespace))
                .collect(),
        }
    }
}

/// The Secret holding the submission server certificate: the one the spec names, or with a cert-manager issuer
/// the one its Certificate is issued into.
pub fn submission_tls_secret(tenant: &SecureMailTenant, names: &TenantNames) -> String {
    tenant
        .spec
        .submission
        .tls
        .secret_name
        .clone()
        .unwrap_or_else(|| names.submission_service() + "-tls")
}

/// Default of [`Settings::drain_confirmation`]: longer than Postfix's queue manager takes to move a message
/// between queues, and than a submission accepted just before the pod left the Service takes to land.
pub const DEFAULT_DRAIN_CONFIRMATION: Duration = Duration::from_secs(60);

/// Default of [`Settings::evidence_sweep_interval`]: retention is counted in days.
pub const DEFAULT_EVIDENCE_SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

impl Default for Settings {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION");
        Self {
            mta_image: format!("ghcr.io/securemail/mta-postfix:{version}"),
            sidecar_image: format!("ghcr.io/securemail/sidecar:{version}"),
            monitoring_namespace: "monitoring".to_owned(),
            operator_namespace: "securemail-system".to_owned(),
            drain_confirmation: DEFAULT_DRAIN_CONFIRMATION,
            evidence_sweep_interval: DEFAULT_EVIDENCE_SWEEP_INTERVAL,
            dnsbl_nameserver: None,
            tenant_namespaces: None,
            sidecar_dns: SidecarDns::default(),
        }
    }
}

/// A DKIM key the sidecars sign with, stored in its own Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKey {
    pub domain: String,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    pub secret_name: String,
}

/// One MTA pod: the address it sends from and today's warmup limit.
#[derive(Debug, Clone, PartialEq)]
pub struct PodAssignment {
    pub ordinal: u32,
    pub address: PoolAddress,
    pub warmup_day: Option<u32>,
    pub daily_limit: Option<u32>,
    /// Leaving the pool: out of the submission Service, delivering what it still holds.
    pub draining: bool,
}

/// What the builders need beyond the spec: facts the reconcile loop looked up or decided.
#[derive(Debug, Clone)]
pub struct Observed {
    pub today: Date,
    /// Keys the sidecars sign with.
    pub signing_keys: Vec<SigningKey>,
    /// Pods in ordinal order; addresses claimed by an earlier tenant are left out.
    pub pods: Vec<PodAssignment>,
}

/// Every child of a tenant except the DKIM key Secrets (those are created once and never rewritten).
#[derive(Debug, Clone)]
pub struct Children {
    pub service_account: ServiceAccount,
    pub config_map: ConfigMap,
    pub stateful_set: StatefulSet,
    pub headless_service: Service,
    pub submission_service: Service,
    pub disruption_budget: PodDisruptionBudget,
    pub network_policy: NetworkPolicy,
}

/// Builds the desired children of `tenant`.
pub fn children(tenant: &SecureMailTenant, observed: &Observed, settings: &Settings) -> Result<Children> {
    let names = TenantNames::new(&tenant_name(tenant)?);
    let config_map = config::config_map(tenant, observed, &names, settings)?;
    let stateful_set = statefulset::stateful_set(tenant, observed, settings, &names, &config_map)?;
    Ok(Children {
        service_account: network::service_account(tenant, &names)?,
        headless_service: network::headless_service(tenant, &names)?,
        submission_service: network::submission_service(tenant, &names)?,
        disruption_budget: network::disruption_budget(tenant, &names)?,
        network_policy: network::network_policy(tenant, observed, settings, &names)?,
        config_map,
        stateful_set,
    })
}

/// The tenant's name; every stored object has one.
pub fn tenant_name(tenant: &SecureMailTenant) -> Result<String> {
    tenant.metadata.name.clone().ok_or(Error::MissingField("metadata.name"))
}

/// Metadata of a child: name, the tenant's namespace, labels and an owner reference to the tenant.
pub fn child_meta(tenant: &SecureMailTenant, names: &TenantNames, name: String, component: &str) -> Result<ObjectMeta> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: tenant.metadata.namespace.clone(),
        labels: Some(names.labels(component)),
        owner_references: Some(vec![owner_reference(tenant)?]),
        ..ObjectMeta::default()
    })
}

/// A controller owner reference to the tenant, so Kubernetes garbage-collects children with it.
pub fn owner_reference(tenant: &SecureMailTenant) -> Result<OwnerReference> {
    tenant
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))
}

/// The keys sidecars sign with: the Active selector of each domain and algorithm.
pub fn signing_keys(selectors: &[DkimSelectorStatus], names: &TenantNames) -> Vec<SigningKey> {
    selectors
        .iter()
        .filter(|selector| selector.state == DkimSelectorState::Active)
        .map(|selector| SigningKey {
            domain: selector.domain.clone(),
            selector: selector.selector.clone(),
            algorithm: selector.algorithm,
            secret_name: names.dkim_secret(&selector.domain, &selector.selector),
        })
        .collect()
}

/// Records to publish: SPF and DMARC per domain, DKIM per selector with its public key, PTR per pool address.
pub fn dns_records(tenant: &SecureMailTenant, public_keys: &[(DkimSelectorStatus, String)]) -> Result<Vec<DnsRecord>> {
    let mut records = Vec::new();
    for domain in &tenant.spec.domains {
        records.push(dns::spf(domain, &tenant.spec.ip_pool.addresses)?);
        records.push(dns::dmarc(domain));
        for (selector, public_key) in public_keys
            .iter()
            .filter(|(selector, _)| selector.domain == domain.name)
        {
            records.push(dns::dkim(
                &domain.name,
                &selector.selector,
                selector.algorithm,
                public_key,
            ));
        }
    }
    for address in &tenant.spec.ip_pool.addresses {
        records.push(dns::ptr(address)?);
    }
    Ok(records)
}
