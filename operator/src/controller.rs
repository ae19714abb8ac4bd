//! Wires the controller: watches on tenants and the labelled children, leader election, and the reconcile loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use std::borrow::Cow;
use std::fmt::Debug;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use securemail_api::SecureMailTenant;
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::admin::Health;
use crate::build::Settings;
use crate::child_cache::{CACHED_LABELS, CachedChild, ChildCache, Replicas, Summary};
use crate::context::{Clock, Context, Metrics, MtaPod, NamespacedCaches, StatefulSetSize, Stores};
use crate::dnsbl::DnsblWatch;
use crate::evidence_retention;
use crate::index;
use crate::names::{COMPONENT_LABEL, MANAGED_SELECTOR, MANAGER, MTA_COMPONENT, TENANT_LABEL};
use crate::ownership;
use crate::reconcile::{error_policy, reconcile};

/// How long triggers for one tenant are collected before it is reconciled.
const DEBOUNCE: Duration = Duration::from_millis(500);

/// Tenants reconciled at once: enough to keep the apiserver busy, few enough that a thousand new tenants do not
/// hold a thousand half-finished reconciles (and their memory) at the same time.
const CONCURRENCY: u16 = 16;

/// How long the Lease lasts unless renewed; a standby may take it once it expired.
const LEASE_SECONDS: u64 = 15;
/// Renewal starts this long before the Lease expires, leaving room for retries when one fails.
const LEASE_GRACE_SECONDS: u64 = 8;
/// A leader whose last confirmed renewal is older than this stops, 3 s before a standby may take the Lease.
const RENEW_DEADLINE: Duration = Duration::from_secs(12);
/// How often the leader reads its Lease back (also the timeout of one read).
const LEASE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Leader election settings; `None` runs without a lease (a single replica).
#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub namespace: String,
    pub identity: String,
}

/// Runs the controller until a shutdown signal, or until leadership is lost (the caller exits and the pod
/// restarts as a standby, so two replicas never reconcile at once).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    health: Arc<Health>,
    leader_election: Option<LeaderElection>,
) -> anyhow::Result<()> {
    let mut leadership = match &leader_election {
        Some(election) => {
            let manager = LeaseManagerBuilder::new(client.clone(), MANAGER)
                .with_namespace(&election.namespace)
                .with_identity(&election.identity)
                .with_duration(LEASE_SECONDS)
                .with_grace(LEASE_GRACE_SECONDS)
                .build()
                .await?;
            let (mut channel, task) = manager.watch().await;
            health.ready.store(true, Ordering::Relaxed);
            info!(identity = %election.identity, "waiting for the leader lease");
            while !*channel.borrow_and_update() {
                channel.changed().await?;
            }
            info!(identity = %election.identity, "acquired the leader lease");
            Some((channel, task))
        }
        None => None,
    };

    let managed = watcher::Config::default().labels(MANAGED_SELECTOR);
    let claims = Arc::new(index::claim_index());
    let controller = {
        let (reader, writer) = reflector::store();
        // A tenant that releases a domain or address (deleted, or dropped from its spec) hands it to the next
        // claimant at once: each change is compared with the cached version before the cache takes it.
        let (recheck, rechecks) = futures::channel::mpsc::unbounded();
        let (cache, claims) = (reader.clone(), claims.clone());
        let tenants = watcher(
            Api::<SecureMailTenant>::all(client.clone()),
            watcher::Config::default().any_semantic(),
        )
        .default_backoff()
        .modify(slim_tenant)
        .inspect(move |event| {
            let Ok(event) = event else { return };
            let cached = match event {
                watcher::Event::Apply(tenant) | watcher::Event::Delete(tenant) => {
                    cache.get(&ObjectRef::from_obj(tenant))
                }
                _ => None,
            };
            let (before, after) = match event {
                watcher::Event::Apply(tenant) => (cached.as_deref(), Some(tenant)),
                watcher::Event::Delete(tenant) => (Some(cached.as_deref().unwrap_or(tenant)), None),
                // A (re)listed cache reconciles every tenant anyway.
                _ => (None, None),
            };
            if before.is_some() || after.is_some() {
                let claimed: Vec<_> = before.into_iter().chain(after).flat_map(index::claims).collect();
                let claimants = index::claimants(&claims, &cache, &claimed);
                for tenant in ownership::tenants_to_recheck(before, after, &claimants) {
                    // Fails only once the controller stopped.
                    let _ = recheck.unbounded_send(tenant);
                }
            }
            // After the recheck, which asks the index as it was before this event.
            claims.observe(event, cached.as_deref());
        })
        .reflect(writer)
        .applied_objects();
        Controller::for_stream(logging_errors(tenants, SecureMailTenant::kind(&())), reader).reconcile_on(rechecks)
    };
    let (stateful_sets, stateful_set_events) = child_cache(
        watcher(Api::<StatefulSetSize>::all(client.clone()), managed.clone()),
        StatefulSetSize::kind(&()),
        |sts: &StatefulSetSize| {
            CachedChild::of(&sts.metadata).with_replicas(Replicas {
                desired: sts.spec.as_ref().and_then(|spec| spec.replicas),
                ready: sts.status.as_ref().and_then(|status| status.ready_replicas),
            })
        },
    );
    let (config_maps, config_map_events) = metadata_store::<ConfigMap>(Api::all(client.clone()), &managed);
    let (services, service_events) = metadata_store::<Service>(Api::all(client.clone()), &managed);
    let (service_accounts, service_account_events) =
        metadata_store::<ServiceAccount>(Api::all(client.clone()), &managed);
    // Key Secrets are watched only where the operator may use Secrets when it is limited to tenant namespaces.
    let (secret_stores, secret_events): (Vec<_>, Vec<_>) = settings
        .managed_apis::<PartialObjectMeta<Secret>>(&client)
        .into_iter()
        .map(|api| metadata_store(api, &managed))
        .map(|(store, events)| (store, events.boxed()))
        .unzip();
    let secret_events = futures::stream::select_all(secret_events);
    // MTA pods, for why they cannot run: their status changes without the StatefulSet's, and they are read where
    // Secrets are (the chart grants list/watch on pods only in tenant namespaces).
    let mta_pods = watcher::Config::default().labels(&format!("{MANAGED_SELECTOR},{COMPONENT_LABEL}={MTA_COMPONENT}"));
    let (pod_stores, pod_events): (Vec<_>, Vec<_>) = settings
        .managed_apis::<MtaPod>(&client)
        .into_iter()
        .map(|api| pod_store(api, &mta_pods))
        .map(|(store, events)| (store, events.boxed()))
        .unzip();
    let pod_events = futures::stream::select_all(pod_events);
    let (disruption_budgets, disruption_budget_events) =
        metadata_store::<PodDisruptionBudget>(Api::all(client.clone()), &managed);
    let (network_policies, network_policy_events) = metadata_store::<NetworkPolicy>(Api::all(client.clone()), &managed);
    // StorageClasses: the queue volumes' class decides QueueStorageEncrypted. A change reconciles the tenants that
    // name the class and those that name none (the default may have moved); classes change rarely.
    let (storage_classes, storage_class_events) = {
        let (reader, writer) = reflector::store();
        let events = watcher(Api::<StorageClass>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(|class| {
                drop_managed_fields(class);
                class.annotations_mut().remove(LAST_APPLIED_ANNOTATION);
            })
            .reflect(writer)
            .touched_objects();
        (reader, logging_errors(events, StorageClass::kind(&())))
    };
    let tenant_cache = controller.store();
    metrics.read_tenants_from(controller.store());
    let stores = Stores {
        tenants: controller.store(),
        claims,
        stateful_sets,
        config_maps,
        services,
        service_accounts,
        secrets: NamespacedCaches(secret_stores),
        pods: NamespacedCaches(pod_stores),
        disruption_budgets,
        network_policies,
        storage_classes,
    };
    let dnsbl = Arc::new(DnsblWatch::new(settings.dnsbl_nameserver).map_err(anyhow::Error::msg)?);
    let context = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        clock,
        stores,
        dnsbl,
        leader_election.as_ref().map(|election| election.identity.clone()),
    ));
    let sweeping = evidence_retention::sweep_periodically(context.clone());
    let reconciling = controller
        .owns_stream(stateful_set_events)
        .owns_stream(config_map_events)
        .owns_stream(service_events)
        .owns_stream(service_account_events)
        .owns_stream(secret_events)
        .owns_stream(disruption_budget_events)
        .owns_stream(network_policy_events)
        // Pods are owned by the StatefulSet, not the tenant: their tenant label names it.
        .watches_stream(pod_events, |pod| {
            let tenant = pod.labels().get(TENANT_LABEL)?.clone();
            Some(ObjectRef::new(&tenant).within(pod.metadata.namespace.as_deref()?))
        })
        .watches_stream(storage_class_events, move |class| {
            let name = class.metadata.name.clone();
            tenant_cache
                .state()
                .iter()
                .filter(|tenant| {
                    let named = tenant.spec.mta.storage.storage_class_name.as_ref();
                    named.is_none() || named == name.as_ref()
                })
                .map(|tenant| ObjectRef::from_obj(tenant.as_ref()))
                .collect::<Vec<_>>()
        })
        // A reconcile's own writes come back as watch events for the tenant and its children; coalescing them
        // turns a burst of triggers into one more pass instead of one per event.
        .with_config(
            controller::Config::default()
                .debounce(DEBOUNCE)
                .concurrency(CONCURRENCY),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(tenant = %object.name, namespace = ?object.namespace, "reconciled"),
                Err(error) => debug!(%error, "reconcile attempt failed"),
            }
        });
    // The sweep of retained evidence volumes runs beside the reconciles and stops with them.
    let reconciling = async {
        tokio::select! {
            () = reconciling => {}
            () = sweeping => {}
        }
    };
    health.ready.store(true, Ordering::Relaxed);

    match (leadership.as_mut(), leader_election.as_ref()) {
        (Some((channel, _)), Some(election)) => {
            let lost = async {
                while channel.changed().await.is_ok() {
                    if !*channel.borrow() {
                        return;
                    }
                }
            };
            tokio::select! {
                () = reconciling => info!("controller stopped"),
                () = lost => {
                    warn!("lost the leader lease; stopping so a standby can take over");
                    anyhow::bail!("leader lease lost");
                }
                reason = leadership_lapsed(client, election) => {
                    warn!(%reason, "cannot confirm the leader lease; stopping before a standby may take it over");
                    anyhow::bail!("leader lease lost: {reason}");
                }
            }
        }
        _ => reconciling.await,
    }
    Ok(())
}

/// Resolves with the reason once this replica can no longer be sure it leads: its Lease names another holder or is
/// gone, or its last renewal the apiserver shows is older than [`RENEW_DEADLINE`]. kube-lease-manager keeps reporting
/// leadership while renewals fail (the apiserver unreachable, say); without this, the old leader would go on
/// reconciling beside a standby that took the expired Lease.
async fn leadership_lapsed(client: Client, election: &LeaderElection) -> String {
    let leases: Api<Lease> = Api::namespaced(client, &election.namespace);
    // Leadership was acquired (the Lease renewed) just before this starts.
    let mut last_renewal = SystemTime::now();
    loop {
        tokio::time::sleep(LEASE_CHECK_INTERVAL).await;
        match tokio::time::timeout(LEASE_CHECK_INTERVAL, leases.get_opt(MANAGER)).await {
            Ok(Ok(Some(lease))) => {
                let spec = lease.spec.unwrap_or_default();
                match spec.holder_identity {
                    Some(holder) if holder == election.identity => {}
                    Some(holder) => return format!("the Lease is held by {holder}"),
                    None => return "the Lease has no holder".to_owned(),
                }
                if let Some(renewed) = spec.renew_time {
                    last_renewal = last_renewal.max(SystemTime::from(renewed.0));
                }
            }
            Ok(Ok(None)) => return "the Lease was deleted".to_owned(),
            Ok(Err(error)) => debug!(%error, "cannot read the leader lease"),
            Err(_) => debug!("reading the leader lease timed out"),
        }
        let since = SystemTime::now().duration_since(last_renewal).unwrap_or_default();
        if since > RENEW_DEADLINE {
            return format!("no renewal confirmed for {} s", since.as_secs());
        }
    }
}

/// A metadata-only watch of the operator's children of kind `K` through `api`, cached, as a stream of the changed
/// objects for the controller to map to their owning tenant.
fn metadata_store<K>(
    api: Api<PartialObjectMeta<K>>,
    config: &watcher::Config,
) -> (
    Arc<ChildCache>,
    impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    child_cache(
        watcher(api, config.clone()),
        K::kind(&()),
        |child: &PartialObjectMeta<K>| CachedChild::of(&child.metadata),
    )
}

/// The children a watch yields, each cached as `summary` gives it, and the stream of changed ones.
fn child_cache<K, T>(
    watch: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    kind: Cow<'static, str>,
    summary: fn(&K) -> T,
) -> (
    Arc<ChildCache<T>>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
    T: Summary + Send + Sync + 'static,
{
    let cache = Arc::new(ChildCache::default());
    let events = {
        let cache = cache.clone();
        watch
            .default_backoff()
            .inspect(move |event| {
                if let Ok(event) = event {
                    cache.observe(event, summary);
                }
            })
            .touched_objects()
    };
    (cache, logging_errors(events, kind))
}

/// A watch of MTA pods through `api` (metadata and status only), cached, as a stream of changed pods.
fn pod_store(
    api: Api<MtaPod>,
    config: &watcher::Config,
) -> (
    Arc<ChildCache<Arc<MtaPod>>>,
    impl Stream<Item = Result<MtaPod, watcher::Error>> + Send + 'static,
) {
    child_cache(watcher(api, config.clone()), MtaPod::kind(&()), |pod: &MtaPod| {
        let mut pod = pod.clone();
        slim_metadata(&mut pod);
        Arc::new(pod)
    })
}

/// Logs a watch's errors and keeps them out of the controller's triggers. Each watch already waits out its own
/// backoff before it retries. The controller backs off its merged trigger stream as a whole on every error it sees:
/// after an apiserver restart, when every watch fails a few times, those pauses added up to minutes in which no watch
/// was read, the caches stayed stale and reconciles kept failing against them.
fn logging_errors<T: Send + 'static>(
    events: impl Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    kind: Cow<'static, str>,
) -> impl Stream<Item = Result<T, watcher::Error>> + Send + 'static {
    events.filter(move |event| {
        if let Err(error) = event {
            warn!(%kind, %error, "watch failed; it retries after a backoff");
        }
        futures::future::ready(event.is_ok())
    })
}

/// Server-side apply bookkeeping is most of a cached object's size and the operator never reads it.
fn drop_managed_fields<K: Resource>(object: &mut K) {
    // `None` rather than an emptied list, which would keep its allocation.
    object.meta_mut().managed_fields = None;
}

/// A cached MTA pod keeps only the metadata reconciles read: name, namespace, owners, creation and deletion times,
/// and the labels reconciles read ([`CACHED_LABELS`]); its status is read whole.
fn slim_metadata<K: Resource>(object: &mut K) {
    drop_managed_fields(object);
    let meta = object.meta_mut();
    meta.uid = None;
    meta.resource_version = None;
    meta.generation = None;
    meta.finalizers = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|key, _| CACHED_LABELS.contains(&key.as_str()));
    }
    meta.annotations = None;
}

/// A cached tenant without the copies of itself that clients keep in it: managed fields, and the whole previous
/// spec that `kubectl apply` (and GitOps tools using it) stores in an annotation.
fn slim_tenant(tenant: &mut SecureMailTenant) {
    drop_managed_fields(tenant);
    tenant.annotations_mut().remove(LAST_APPLIED_ANNOTATION);
}

/// `kubectl apply`'s copy of the last applied object.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";
