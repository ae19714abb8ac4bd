//! State shared by every reconcile: the client, settings, event recorder, metrics, clock and backoff counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use securemail_api::SecureMailTenant;
use securemail_api::tenant::PoolAddressState;
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::build::Settings;
use crate::child_cache::{CachedChild, ChildCache, Summary};
use crate::dnsbl::DnsblWatch;
use crate::events::EventPublisher;
use crate::index::{self, ClaimIndex};
use crate::names::MANAGER;
use crate::status::MTA_AVAILABLE;

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

/// Caches fed by the controller's watches. Of children only what a reconcile reads is cached ([`ChildCache`]): it
/// keeps memory flat, and private keys never sit in the operator's memory. Children are found by tenant, and tenants
/// by what they claim, so a reconcile never scans a cache.
#[derive(Clone, Debug)]
pub struct Stores {
    /// Every tenant the controller knows, for the address and domain conflict rules.
    pub tenants: Store<SecureMailTenant>,
    /// The tenants by the addresses and domains they claim.
    pub claims: Arc<ClaimIndex>,
    pub stateful_sets: Arc<ChildCache>,
    pub config_maps: Arc<ChildCache>,
    pub services: Arc<ChildCache>,
    pub service_accounts: Arc<ChildCache>,
    /// Key Secrets.
    pub secrets: NamespacedCaches,
    /// The tenants' MTA pods, whose status explains pods that cannot run.
    pub pods: PodCaches,
    pub disruption_budgets: Arc<ChildCache>,
    pub network_policies: Arc<ChildCache>,
    /// Every StorageClass (cluster-scoped, few, rarely changed): which one the queue volumes use and whether it
    /// encrypts at rest is decided from here, never by a GET per tenant.
    pub storage_classes: Store<StorageClass>,
}

/// What reconciles read of a StatefulSet: its metadata, desired replicas and ready replicas. Decoding into this
/// instead of the full object skips the pod and volume templates, which are most of a StatefulSet, so the cache keeps
/// a few hundred bytes per tenant instead of kilobytes.
#[derive(Clone, Debug, Deserialize, Resource)]
#[resource(inherit = StatefulSet)]
pub struct StatefulSetSize {
    pub metadata: ObjectMeta,
    pub spec: Option<DesiredReplicas>,
    pub status: Option<ReadyReplicas>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DesiredReplicas {
    pub replicas: Option<i32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadyReplicas {
    pub ready_replicas: Option<i32>,
}

/// What reconciles read of an MTA pod: its metadata and status, which say why it cannot run. The spec (containers,
/// volumes) is most of a pod and is skipped.
#[derive(Clone, Debug, Deserialize, Resource)]
#[resource(inherit = Pod)]
pub struct MtaPod {
    pub metadata: ObjectMeta,
    pub status: Option<PodStatus>,
}

impl Stores {
    /// Waits until every watch has listed once, so a reconcile never mistakes "not cached yet" for "absent".
    pub async fn wait_until_ready(&self) -> Result<(), kube::runtime::reflector::store::WriterDropped> {
        self.tenants.wait_until_ready().await?;
        for cache in [
            &self.stateful_sets,
            &self.config_maps,
            &self.services,
            &self.service_accounts,
            &self.disruption_budgets,
            &self.network_policies,
        ] {
            cache.wait_until_ready().await;
        }
        self.secrets.wait_until_ready().await;
        self.pods.wait_until_ready().await;
        self.storage_classes.wait_until_ready().await
    }

    /// The cached tenants that claim an address or a domain `tenant` claims (itself included).
    pub fn claimants(&self, tenant: &SecureMailTenant) -> Vec<Arc<SecureMailTenant>> {
        index::claimants(&self.claims, &self.tenants, &index::claims(tenant))
    }
}

/// Caches of children the operator may read only in tenant namespaces when it is limited to them (key Secrets, MTA
/// pods): one watch over every namespace, or one per tenant namespace, each with its own cache (a relist replaces its
/// whole cache).
#[derive(Clone, Debug)]
pub struct NamespacedCaches<T = CachedChild>(pub Vec<Arc<ChildCache<T>>>);

/// The MTA pods cache.
pub type PodCaches = NamespacedCaches<Arc<MtaPod>>;

impl<T: Summary> NamespacedCaches<T> {
    /// The cached children labelled with `tenant` in `namespace`.
    pub fn of_tenant(&self, namespace: &str, tenant: &str) -> Vec<T> {
        self.0
            .iter()
            .flat_map(|cache| cache.of_tenant(namespace, tenant))
            .collect()
    }

    /// The cached child `name` in `namespace`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<T> {
        self.0.iter().find_map(|cache| cache.get(namespace, name))
    }

    async fn wait_until_ready(&self) {
        for cache in &self.0 {
            cache.wait_until_ready().await;
        }
    }
}

/// Everything a reconcile needs.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub events: EventPublisher,
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
        Self {
            events: EventPublisher::new(client.clone(), MANAGER, instance),
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

/// One tenant and the reason of its `MtaAvailable=False`, for the unavailable-MTA gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantReasonLabels {
    pub tenant: String,
    pub reason: String,
}

/// Operator metrics; every label set is bounded by what platform teams configure (tenants and their pool
/// addresses), never by mail traffic (no domains, no recipients).
#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// The controller's tenant cache, which the per-tenant gauges are read from at scrape time.
    tenant_cache: Arc<OnceLock<Store<SecureMailTenant>>>,
    pub registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Family::<ResultLabels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let tenant_cache = Arc::new(OnceLock::new());
        let mut registry = Registry::with_prefix("securemail_operator");
        // The text encoder appends `_total` to counters.
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        registry.register_collector(Box::new(TenantGauges {
            tenants: Arc::clone(&tenant_cache),
        }));
        Self {
            reconciles,
            reconcile_duration,
            tenant_cache,
            registry,
        }
    }
}

impl Metrics {
    /// Exports the per-tenant gauges from the controller's tenant cache from now on.
    pub fn read_tenants_from(&self, tenants: Store<SecureMailTenant>) {
        // Set once, by the one controller of the process.
        let _ = self.tenant_cache.set(tenants);
    }
}

/// Tenants per condition, pool addresses per warmup state, each address's warmup day and daily limit, each tenant
/// whose MTA pods are unavailable and why, and each tenant's submission certificate expiry, computed from the
/// tenant cache when Prometheus scrapes: one pass per scrape rather than one per reconcile, and a tenant that is gone
/// simply is not there.
#[derive(Debug)]
struct TenantGauges {
    tenants: Arc<OnceLock<Store<SecureMailTenant>>>,
}

impl Collector for TenantGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tenants = self.tenants.get().map(Store::state).unwrap_or_default();
        let mut conditions: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        let mut states: BTreeMap<&'static str, i64> =
            PoolAddressState::ALL.iter().map(|state| (state.as_str(), 0)).collect();
        let mut warmup_days = Vec::new();
        let mut daily_limits = Vec::new();
        let mut certificate_expiry = Vec::new();
        let mut mta_unavailable = Vec::new();
        for tenant in &tenants {
            let Some(status) = &tenant.status else { continue };
            let name = format!(
                "{}/{}",
                tenant.metadata.namespace.as_deref().unwrap_or_default(),
                tenant.metadata.name.as_deref().unwrap_or_default()
            );
            for condition in &status.conditions {
                *conditions
                    .entry((condition.type_.as_str(), condition.status.as_str()))
                    .or_default() += 1;
                if condition.type_ == MTA_AVAILABLE && condition.status == "False" {
                    let labels = TenantReasonLabels {
                        tenant: name.clone(),
                        reason: condition.reason.clone(),
                    };
                    mta_unavailable.push((labels, 1));
                }
            }
            for address in &status.ip_pool {
                *states.entry(address.state.as_str()).or_default() += 1;
                let labels = || AddressLabels {
                    tenant: name.clone(),
                    source_ip: address.address.clone(),
                };
                if let Some(day) = address.warmup_day {
                    warmup_days.push((labels(), i64::from(day)));
                }
                if let Some(limit) = address.daily_limit {
                    daily_limits.push((labels(), i64::from(limit)));
                }
            }
            if let Some(expires) = &status.submission_certificate_expires {
                certificate_expiry.push((TenantLabels { tenant: name }, expires.0.as_second()));
            }
        }
        let conditions = conditions.into_iter().map(|((condition, status), count)| {
            let labels = ConditionLabels {
                condition: condition.to_owned(),
                status: status.to_owned(),
            };
            (labels, count)
        });
        encode_gauges(
            &mut encoder,
            "tenants",
            "Tenants by condition type and status",
            conditions,
        )?;
        encode_gauges(
            &mut encoder,
            "pool_addresses",
            "Pool addresses of all tenants by warmup state",
            states.into_iter().map(|(state, count)| (StateLabels { state }, count)),
        )?;
        encode_gauges(
            &mut encoder,
            "pool_address_warmup_day",
            "Warmup schedule day of each pool address (absent once warm)",
            warmup_days,
        )?;
        encode_gauges(
            &mut encoder,
            "pool_address_daily_limit",
            "Today's daily message limit of each pool address (absent once warm)",
            daily_limits,
        )?;
        encode_gauges(
            &mut encoder,
            "tenant_mta_unavailable",
            "1 for each tenant whose MTA pods are not all ready, labelled with the MtaAvailable reason",
            mta_unavailable,
        )?;
        encode_gauges(
            &mut encoder,
            "submission_certificate_expiry_timestamp_seconds",
            "When each tenant's submission server certificate expires (Unix time)",
            certificate_expiry,
        )
    }
}

/// One gauge family: its descriptor, then one sample per label set.
fn encode_gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;
    use securemail_api::tenant::SecureMailTenantStatus;

    use super::*;

    fn tenant(name: &str, day: u32) -> SecureMailTenant {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/minimal.yaml");
        let mut tenant: SecureMailTenant = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        tenant.metadata.name = Some(name.to_owned());
        tenant.metadata.namespace = Some("clinic".to_owned());
        tenant.status = Some(SecureMailTenantStatus {
            ip_pool: vec![
                serde_json::from_value(serde_json::json!({
                    "address": "192.0.2.10", "state": "Warming", "warmupDay": day, "dailyLimit": 50 * day,
                }))
                .unwrap(),
            ],
            ..SecureMailTenantStatus::default()
        });
        tenant
    }

    fn scrape(metrics: &Metrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).unwrap();
        text
    }

    #[test]
    fn tenant_gauges_follow_the_cache_at_each_scrape() {
        let metrics = Metrics::default();
        assert!(
            !scrape(&metrics).contains("pool_address_warmup_day{"),
            "no cache, no tenants"
        );
        let (reader, mut writer) = reflector::store();
        metrics.read_tenants_from(reader);
        writer.apply_watcher_event(&Event::Apply(tenant("lakeside", 3)));
        writer.apply_watcher_event(&Event::Apply(tenant("harbor", 1)));
        let text = scrape(&metrics);
        for line in [
            "securemail_operator_pool_address_warmup_day{tenant=\"clinic/lakeside\",source_ip=\"192.0.2.10\"} 3",
            "securemail_operator_pool_address_daily_limit{tenant=\"clinic/harbor\",source_ip=\"192.0.2.10\"} 50",
            "securemail_operator_pool_addresses{state=\"Warming\"} 2",
            "securemail_operator_pool_addresses{state=\"Warm\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        writer.apply_watcher_event(&Event::Delete(tenant("harbor", 1)));
        let text = scrape(&metrics);
        assert!(!text.contains("clinic/harbor"), "{text}");
        assert!(
            text.lines()
                .any(|l| l == "securemail_operator_pool_addresses{state=\"Warming\"} 1"),
            "{text}"
        );
    }

    fn with_mta_condition(mut tenant: SecureMailTenant, status: &str, reason: &str) -> SecureMailTenant {
        let condition = serde_json::from_value(serde_json::json!({
            "type": "MtaAvailable", "status": status, "reason": reason, "message": "",
            "lastTransitionTime": "2026-11-25T09:00:00Z",
        }))
        .unwrap();
        tenant.status.get_or_insert_default().conditions.push(condition);
        tenant
    }

    #[test]
    fn a_tenant_whose_mta_pods_are_unavailable_is_exported_with_the_reason() {
        let metrics = Metrics::default();
        let (reader, mut writer) = reflector::store();
        metrics.read_tenants_from(reader);
        writer.apply_watcher_event(&Event::Apply(with_mta_condition(
            tenant("lakeside", 1),
            "False",
            "ImagePullFailed",
        )));
        writer.apply_watcher_event(&Event::Apply(with_mta_condition(
            tenant("harbor", 1),
            "True",
            "PodsReady",
        )));
        let text = scrape(&metrics);
        let unavailable: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("securemail_operator_tenant_mta_unavailable{"))
            .collect();
        assert_eq!(
            unavailable,
            ["securemail_operator_tenant_mta_unavailable{tenant=\"clinic/lakeside\",reason=\"ImagePullFailed\"} 1"]
        );
        // Recovered: the series goes.
        writer.apply_watcher_event(&Event::Apply(with_mta_condition(
            tenant("lakeside", 1),
            "True",
            "PodsReady",
        )));
        assert!(!scrape(&metrics).contains("tenant_mta_unavailable{"));
    }
}
