//! State shared by every reconcile: the client, settings, event recorder, metrics, clock and backoff counters.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use securemail_api::SecureMailTenant;
use securemail_api::tenant::PoolAddressState;
use tokio::sync::Semaphore;

use crate::build::Settings;
use crate::dnsbl::DnsblWatch;
use crate::names::MANAGER;

/// Where reconciles get the time; tests set it.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Caches fed by the controller's watches. Children are cached as metadata only: that is all a reconcile reads
/// (labels, annotations, owners), it keeps memory flat, and private keys never sit in the operator's memory.
#[derive(Clone, Debug)]
pub struct Stores {
    /// Every tenant the controller knows, for the address conflict rule.
    pub tenants: Store<SecureMailTenant>,
    pub stateful_sets: Store<StatefulSet>,
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pub services: Store<PartialObjectMeta<Service>>,
    pub service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    pub secrets: SecretStores,
    pub disruption_budgets: Store<PartialObjectMeta<PodDisruptionBudget>>,
    pub network_policies: Store<PartialObjectMeta<NetworkPolicy>>,
}

impl Stores {
    /// Waits until every watch has listed once, so a reconcile never mistakes "not cached yet" for "absent".
    pub async fn wait_until_ready(&self) -> Result<(), kube::runtime::reflector::store::WriterDropped> {
        self.tenants.wait_until_ready().await?;
        self.stateful_sets.wait_until_ready().await?;
        self.config_maps.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.service_accounts.wait_until_ready().await?;
        self.secrets.wait_until_ready().await?;
        self.disruption_budgets.wait_until_ready().await?;
        self.network_policies.wait_until_ready().await
    }
}

/// The key Secrets cache: one watch over every namespace, or one per tenant namespace when the operator may use
/// Secrets only there (each watch needs its own store: a re-list replaces its whole store).
#[derive(Clone, Debug)]
pub struct SecretStores(pub Vec<Store<PartialObjectMeta<Secret>>>);

impl SecretStores {
    /// The cached Secrets of `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<PartialObjectMeta<Secret>>> {
        self.0
            .iter()
            .flat_map(Store::state)
            .filter(|secret| secret.metadata.namespace.as_deref() == Some(namespace))
            .collect()
    }

    pub fn get(&self, key: &ObjectRef<PartialObjectMeta<Secret>>) -> Option<Arc<PartialObjectMeta<Secret>>> {
        self.0.iter().find_map(|store| store.get(key))
    }

    async fn wait_until_ready(&self) -> Result<(), kube::runtime::reflector::store::WriterDropped> {
        for store in &self.0 {
            store.wait_until_ready().await?;
        }
        Ok(())
    }
}

/// Everything a reconcile needs.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    pub stores: Stores,
    /// One permit per core for RSA key generation, which would otherwise crowd out everything else.
    pub keygen: Arc<Semaphore>,
    /// Consecutive failures per tenant, for exponential backoff.
    pub failures: Arc<Mutex<HashMap<ObjectRef<SecureMailTenant>, u32>>>,
    pub dnsbl: Arc<DnsblWatch>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        stores: Stores,
        dnsbl: Arc<DnsblWatch>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            clock,
            stores,
            keygen: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(1, usize::from),
            )),
            failures: Arc::default(),
            dnsbl,
        }
    }
}

/// Result label of a reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// A condition type and status, for the tenants-by-condition gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub condition: String,
    pub status: String,
}

/// A pool address's state (`status.ipPool[].state`), for the addresses-by-state gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

/// One pool address of one tenant, for the per-address warmup gauges. `tenant` is `namespace/name`, as in the
/// sidecars' metrics, so the two join.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddressLabels {
    pub tenant: String,
    pub source_ip: String,
}

/// One tenant (`namespace/name`), for the per-tenant certificate gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

/// The label sets the per-address and per-tenant gauges hold, so a recount removes exactly the ones that are gone
/// (clearing first would let a scrape in between see none).
#[derive(Debug, Default)]
struct Exported {
    addresses: HashSet<AddressLabels>,
    tenants: HashSet<TenantLabels>,
}

/// Operator metrics; every label set is bounded by what platform teams configure (tenants and their pool
/// addresses), never by mail traffic (no domains, no recipients).
#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub tenants: Family<ConditionLabels, Gauge>,
    pub pool_addresses: Family<StateLabels, Gauge>,
    pub warmup_day: Family<AddressLabels, Gauge>,
    pub daily_limit: Family<AddressLabels, Gauge>,
    pub certificate_expiry: Family<TenantLabels, Gauge>,
    exported: Mutex<Exported>,
    pub registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Family::<ResultLabels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let tenants = Family::<ConditionLabels, Gauge>::default();
        let pool_addresses = Family::<StateLabels, Gauge>::default();
        let warmup_day = Family::<AddressLabels, Gauge>::default();
        let daily_limit = Family::<AddressLabels, Gauge>::default();
        let certificate_expiry = Family::<TenantLabels, Gauge>::default();
        let mut registry = Registry::with_prefix("securemail_operator");
        // The text encoder appends `_total` to counters.
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        registry.register("tenants", "Tenants by condition type and status", tenants.clone());
        registry.register(
            "pool_addresses",
            "Pool addresses of all tenants by warmup state",
            pool_addresses.clone(),
        );
        registry.register(
            "pool_address_warmup_day",
            "Warmup schedule day of each pool address (absent once warm)",
            warmup_day.clone(),
        );
        registry.register(
            "pool_address_daily_limit",
            "Today's daily message limit of each pool address (absent once warm)",
            daily_limit.clone(),
        );
        registry.register(
            "submission_certificate_expiry_timestamp_seconds",
            "When each tenant's submission server certificate expires (Unix time)",
            certificate_expiry.clone(),
        );
        Self {
            reconciles,
            reconcile_duration,
            tenants,
            pool_addresses,
            warmup_day,
            daily_limit,
            certificate_expiry,
            exported: Mutex::default(),
            registry,
        }
    }
}

/// Sets `labels`' gauge in `family` to `value`, or removes it when there is none.
fn export(family: &Family<AddressLabels, Gauge>, labels: &AddressLabels, value: Option<u32>) {
    match value {
        Some(value) => {
            family.get_or_create(labels).set(i64::from(value));
        }
        None => {
            family.remove(labels);
        }
    }
}

impl Metrics {
    /// Recounts tenants per condition, pool addresses per warmup state, and each address's warmup day and daily
    /// limit, from the controller's cache.
    pub fn count_tenants(&self, tenants: &Store<SecureMailTenant>) {
        let mut counts: HashMap<ConditionLabels, i64> = HashMap::new();
        let mut states: HashMap<&'static str, i64> =
            PoolAddressState::ALL.iter().map(|state| (state.as_str(), 0)).collect();
        let tenants = tenants.state();
        let mut exported = self.exported.lock().unwrap_or_else(PoisonError::into_inner);
        let mut current = Exported::default();
        for tenant in &tenants {
            let tenant_labels = TenantLabels {
                tenant: format!(
                    "{}/{}",
                    tenant.metadata.namespace.as_deref().unwrap_or_default(),
                    tenant.metadata.name.as_deref().unwrap_or_default()
                ),
            };
            let expires = tenant
                .status
                .as_ref()
                .and_then(|status| status.submission_certificate_expires.as_ref());
            match expires {
                Some(expires) => {
                    self.certificate_expiry
                        .get_or_create(&tenant_labels)
                        .set(expires.0.as_second());
                }
                None => {
                    self.certificate_expiry.remove(&tenant_labels);
                }
            }
            for address in tenant.status.iter().flat_map(|status| &status.ip_pool) {
                *states.entry(address.state.as_str()).or_default() += 1;
                let labels = AddressLabels {
                    tenant: tenant_labels.tenant.clone(),
                    source_ip: address.address.clone(),
                };
                export(&self.warmup_day, &labels, address.warmup_day);
                export(&self.daily_limit, &labels, address.daily_limit);
                current.addresses.insert(labels);
            }
            current.tenants.insert(tenant_labels);
        }
        for gone in exported.addresses.difference(&current.addresses) {
            self.warmup_day.remove(gone);
            self.daily_limit.remove(gone);
        }
        for gone in exported.tenants.difference(&current.tenants) {
            self.certificate_expiry.remove(gone);
        }
        *exported = current;
        drop(exported);
        for (state, count) in states {
            self.pool_addresses.get_or_create(&StateLabels { state }).set(count);
        }
        for tenant in tenants {
            for condition in tenant.status.iter().flat_map(|status| &status.conditions) {
                let labels = ConditionLabels {
                    condition: condition.type_.clone(),
                    status: condition.status.clone(),
                };
                *counts.entry(labels).or_default() += 1;
            }
        }
        self.tenants.clear();
        for (labels, count) in counts {
            self.tenants.get_or_create(&labels).set(count);
        }
    }
}
