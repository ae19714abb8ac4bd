//! The reconcile loop: finalizer first, then gather facts, decide (pure), apply, sweep and write status.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::events::{EventType, NewEvent};
use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_api::tenant::{
    DeletionPolicy, DkimSelectorState, DkimSelectorStatus, DnsblSpec, PoolAddress, PoolAddressState, PoolAddressStatus,
    SecureMailTenantStatus,
};
use securemail_api::warmup::state::{DayResults, Transition};
use serde_json::json;
use tracing::{info, warn};

use crate::build::{self, Children, Observed};
use crate::child_cache::{CachedChild, Replicas};
use crate::context::{Context, MtaPod};
use crate::dkim::{self, DkimPlan, NewKey, StoredKey};
use crate::names::{COMPONENT_LABEL, DKIM_KEY_COMPONENT, MANAGER, TenantNames};
use crate::status::{self, ConditionUpdate};
use crate::{
    Error, Result, apply, certificate, dkim_keys, dns_endpoint, dnsbl, drain, egress, evidence_retention, inputs,
    ownership, pod_health, pod_status, queue_storage,
};

/// Finalizer that lets deletion follow `deletionPolicy`.
pub const FINALIZER: &str = "securemail.io/drain";
/// Re-check interval when nothing else is due, so drifted children and stale status heal.
const RESYNC: Duration = Duration::from_secs(3600);
/// How often a tenant that wants DNSEndpoints checks whether external-dns's CRD has been installed.
const CRD_RECHECK: Duration = Duration::from_secs(60);
/// How soon pods that could not report yesterday's results are asked again.
const WARMUP_RECHECK: Duration = Duration::from_secs(60);
/// How soon a tenant whose referenced Secrets are missing is looked at again.
const INPUT_RECHECK: Duration = Duration::from_secs(15);
/// How often queues of draining pods are checked.
const DRAIN_RECHECK: Duration = Duration::from_secs(15);

/// Entry point for the controller.
pub async fn reconcile(tenant: Arc<SecureMailTenant>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    ctx.stores
        .wait_until_ready()
        .await
        .map_err(|_| Error::Finalizer("the watch caches stopped".to_owned()))?;
    let namespace = tenant.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<SecureMailTenant> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = if tenant.metadata.deletion_timestamp.is_none() && !ctx.settings.manages_namespace(&namespace) {
        // No finalizer either: a tenant the operator never managed must stay deletable.
        not_managed(&tenant, &ctx, &namespace).await
    } else {
        finalizer(&api, FINALIZER, tenant, |event| async {
            match event {
                FinalizerEvent::Apply(tenant) => apply_tenant(&tenant, &ctx).await,
                FinalizerEvent::Cleanup(tenant) => cleanup(&tenant, &ctx).await,
            }
        })
        .await
        .map_err(|err| match err {
            finalizer::Error::ApplyFailed(err) | finalizer::Error::CleanupFailed(err) => err,
            other => Error::Finalizer(other.to_string()),
        })
    };
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    result
}

/// Requeue with per-tenant exponential backoff (5 s doubling to 5 min) after a failed reconcile.
pub fn error_policy(tenant: Arc<SecureMailTenant>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Error::Draining(pending) = error {
        ctx.metrics
            .reconciles
            .get_or_create(&crate::context::ResultLabels { result: "draining" })
            .inc();
        info!(tenant = %tenant.name_any(), namespace = tenant.namespace().unwrap_or_default(), %pending, "deleted tenant still draining");
        return Action::requeue(DRAIN_RECHECK);
    }
    let failures = {
        let mut failures = ctx.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = failures.entry(ObjectRef::from_obj(tenant.as_ref())).or_default();
        *count = count.saturating_add(1);
        *count
    };
    ctx.metrics
        .reconciles
        .get_or_create(&crate::context::ResultLabels { result: "error" })
        .inc();
    warn!(tenant = %tenant.name_any(), namespace = tenant.namespace().unwrap_or_default(), %error, failures, "reconcile failed");
    let delay = 5u64.saturating_mul(1 << failures.min(6).saturating_sub(1)).min(300);
    Action::requeue(Duration::from_secs(delay))
}

/// A tenant in a namespace outside `--tenant-namespaces`: the operator may not keep key Secrets there, so it makes
/// nothing and says so in `ConfigValid` and `Ready`.
async fn not_managed(tenant: &SecureMailTenant, ctx: &Context, namespace: &str) -> Result<Action> {
    let previous = tenant.status.clone().unwrap_or_default();
    let mut conditions = previous.conditions.clone();
    let message = format!(
        "namespace {namespace} is not one of the operator's tenant namespaces (--tenant-namespaces, \
         the chart's tenantNamespaces): nothing is made for this tenant"
    );
    let config_valid = ConditionUpdate::new(status::CONFIG_VALID, false, "NamespaceNotManaged", message.clone());
    let ready = status::ready(std::slice::from_ref(&config_valid));
    let now = ctx.clock.now();
    let mut changed = false;
    for update in [config_valid, ready] {
        changed |= status::set_condition(&mut conditions, update, tenant.metadata.generation, now);
    }
    if changed {
        publish(ctx, tenant, EventType::Warning, "NamespaceNotManaged", &message).await;
    }
    let status = SecureMailTenantStatus {
        observed_generation: tenant.metadata.generation,
        conditions,
        ..previous.clone()
    };
    write_status(ctx, tenant, &previous, status).await?;
    Ok(Action::await_change())
}

async fn apply_tenant(tenant: &SecureMailTenant, ctx: &Context) -> Result<Action> {
    let now = ctx.clock.now();
    let name = build::tenant_name(tenant)?;
    let namespace = tenant.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let names = TenantNames::new(&name);
    let previous = tenant.status.clone().unwrap_or_default();
    let mut conditions = previous.conditions.clone();
    let generation = tenant.metadata.generation;

    if tenant.spec.paused {
        let update = ConditionUpdate::new(
            status::PAUSED,
            true,
            "Paused",
            "spec.paused is true: nothing is reconciled",
        );
        if status::set_condition(&mut conditions, update, generation, now) {
            publish(
                ctx,
                tenant,
                EventType::Normal,
                "Paused",
                "reconciling stopped; children left as they are",
            )
            .await;
        }
        let status = SecureMailTenantStatus {
            conditions,
            ..previous.clone()
        };
        write_status(ctx, tenant, &previous, status).await?;
        return Ok(Action::await_change());
    }
    conditions.retain(|condition| condition.type_ != status::PAUSED);

    // Addresses first claimed by another tenant get no pod here; domains another tenant holds get no key, record or
    // signing here. Everything else of the tenant works as usual.
    let claimants = ctx.stores.claimants(tenant);
    let conflicts = status::claimed_elsewhere(tenant, &claimants);
    let domains_held = ownership::domains_held_elsewhere(tenant, &claimants, |namespace| {
        ctx.settings.manages_namespace(namespace)
    });
    drop(claimants);
    let owned = without_domains(tenant, &domains_held);
    let usable: Vec<&PoolAddress> = tenant
        .spec
        .ip_pool
        .addresses
        .iter()
        .filter(|address| !conflicts.contains_key(&address.address))
        .collect();
    let today = now.to_zoned(TimeZone::UTC).date();
    // The warmup loop: once per UTC day each address's pod reports yesterday's results, and its day advances,
    // holds or rolls back on them.
    let due = status::due_for_evaluation(&previous.ip_pool, today);
    let (yesterday, unread) = yesterday_results(ctx, &namespace, &names, &due, today).await?;
    let dnsbl_spec = &tenant.spec.ip_pool.dnsbl;
    let pool_ips: Vec<IpAddr> = usable
        .iter()
        .filter_map(|address| address.address.parse().ok())
        .collect();
    let blocklists = ctx.dnsbl.check(&pool_ips, dnsbl_spec, now).await;
    let (listings, unchecked) = dnsbl::findings(&blocklists);
    let listed: BTreeSet<String> = listings.iter().map(|listing| listing.address.to_string()).collect();
    let assignments = status::assign_pods(
        &tenant.spec.ip_pool.warmup,
        &usable,
        &previous.ip_pool,
        today,
        &yesterday,
        &listed,
    );

    // DKIM keys: adopt what is stored, generate what is missing, retire what is done.
    let mut stored = stored_keys(ctx, &namespace, &names)?;
    confirm_recorded_keys(ctx, &namespace, &names, &previous.dkim_selectors, &mut stored).await?;
    let plan = dkim::plan(&owned.spec.domains, &previous.dkim_selectors, &stored, now);
    let generated = create_keys(ctx, tenant, &names, &plan).await?;
    delete_keys(ctx, &namespace, &names, &plan).await?;
    let signing_keys = build::signing_keys(&plan.selectors, &names);

    // Pods above the pool's size drain before they go; their volumes go only once they are empty.
    let live_replicas = live_replicas(ctx, &namespace, &names);
    let pool_size = u32::try_from(assignments.len()).unwrap_or(u32::MAX);
    let probe = drain::probe(ctx, &namespace, &names, pool_size..live_replicas).await?;
    let pool_plan = drain::plan(
        assignments.iter().map(|assigned| assigned.pod.clone()).collect(),
        live_replicas,
        &previous.ip_pool,
        &probe.queues,
    );
    // The queue volumes' StorageClass: reported always; when encryption is required and not established, no new
    // pod or volume is made on it (and nothing that may hold mail is removed).
    let storage = &tenant.spec.mta.storage;
    let resolved = queue_storage::resolve(storage, &ctx.stores.storage_classes.state());
    let pool_pods = u32::try_from(pool_plan.pods.len()).unwrap_or(u32::MAX);
    let storage_condition = queue_storage::condition(&resolved, storage, &names, pool_pods);
    let hold_volumes = queue_storage::holds(&storage_condition, storage);

    let observed = Observed {
        today,
        signing_keys,
        pods: pool_plan.pods.clone(),
    };
    let mut children = build::children(&owned, &observed, &ctx.settings)?;
    let write_stateful_set = !hold_volumes
        || hold_new_volumes(
            &mut children.stateful_set,
            live_replicas,
            cached_stateful_set(ctx, &namespace, &names).is_some(),
        );
    if !hold_volumes && pool_pods > live_replicas {
        // A pod returning to an ordinal takes its retained volume back: it is no longer only evidence.
        evidence_retention::readopt(ctx, &namespace, &names, pool_pods).await?;
    }
    let ready_replicas = apply_children(ctx, &namespace, &names, children, write_stateful_set).await?;
    evidence_retention::retain(
        ctx,
        &namespace,
        &names,
        &pool_plan.removed,
        tenant.spec.audit.retention_days,
        &probe,
        "left the pool",
    )
    .await?;

    let public_keys = public_keys(ctx, &namespace, &names, &plan).await?;
    let dns_records = build::dns_records(&owned, &public_keys)?;

    // Without cert-manager nothing will issue the submission Secret; a Secret that exists anyway still serves.
    let inputs = inputs::check(ctx, tenant, &namespace, &names, now).await?;
    let mut missing_inputs = inputs.problems;
    let cert_manager_missing = certificate::reconcile(&ctx.client, tenant, &names)
        .await?
        .filter(|_| !missing_inputs.is_empty());
    missing_inputs.extend(cert_manager_missing.clone());
    let config_valid = if missing_inputs.is_empty() {
        ConditionUpdate::new(
            status::CONFIG_VALID,
            true,
            "Rendered",
            "Postfix and sidecar configuration rendered; referenced Secrets present",
        )
    } else {
        let reason = if cert_manager_missing.is_some() {
            "CertManagerMissing"
        } else {
            "SecretMissing"
        };
        ConditionUpdate::new(status::CONFIG_VALID, false, reason, missing_inputs.join("; "))
    };
    let pods = i32::try_from(observed.pods.len()).unwrap_or(i32::MAX);
    let mta_pods = tenant_pods(ctx, &namespace, &names);
    let (pod_problems, pods_recheck) = pod_problems(&mta_pods, now);
    let pod_egress = egress::observe(&mta_pods).await;
    let mut updates = vec![config_valid];
    // Part of Ready only when required: otherwise it informs without making a working tenant unready.
    let storage_informs = (!storage.require_encryption_at_rest).then(|| storage_condition.clone());
    if storage.require_encryption_at_rest {
        updates.push(storage_condition.clone());
    }
    updates.extend([
        dkim_condition(&plan, now),
        // Before MtaAvailable: a pod that cannot send is why it is not ready, and Ready names the first bad one.
        egress::condition(&pod_egress),
        pod_health::mta_condition(ready_replicas, pods, &pod_problems),
        conflict_condition(&conflicts),
        domain_condition(&domains_held),
    ]);
    updates.push(status::ready(&updates));
    updates.extend(storage_informs);
    // Beside Ready: a listing hurts delivery, but the tenant's infrastructure is as configured.
    updates.push(listing_condition(dnsbl_spec, &listings, &unchecked));
    // Draining is reported beside Ready, not in it: the pool itself can be fine while an old pod empties.
    let mut ip_pool = status::pool_status(
        &tenant.spec.ip_pool.addresses,
        &assignments,
        &conflicts,
        &previous.ip_pool,
        now,
    );
    ip_pool.extend(drain::draining_status(&pool_plan, &previous.ip_pool, now));
    updates.push(draining_condition(&pool_plan, &ip_pool, now));
    let dns_published = dns_endpoint::reconcile(&ctx.client, tenant, &names, &dns_records).await?;
    // Waiting for someone to install external-dns: look again soon rather than at the next day boundary.
    let crd_missing = dns_published.reason == "CrdMissing";
    updates.push(dns_published);
    for update in updates {
        let (type_, status_now, reason, message) = (
            update.type_,
            update.status,
            update.reason.clone(),
            update.message.clone(),
        );
        // A condition's first appearance is news only for a conflict, a listing or a pod that cannot send; pods not
        // ready yet at creation is not.
        let previous = conditions.iter().find(|condition| condition.type_ == type_);
        let previous_reason = previous.map(|condition| condition.reason.clone());
        // Holding back pods and volumes is news when it starts or its cause changes, whatever the status did.
        let hold_started = type_ == status::QUEUE_STORAGE_ENCRYPTED
            && message.contains(queue_storage::HOLD_NOTE)
            && previous.is_none_or(|previous| {
                !previous.message.contains(queue_storage::HOLD_NOTE) || previous.reason != reason
            });
        let news = previous_reason.is_some()
            || (matches!(
                type_,
                status::IP_POOL_CONFLICT | status::DOMAIN_CONFLICT | status::IP_LISTED
            ) && status_now == Some(true))
            || (type_ == status::EGRESS_READY && status_now == Some(false));
        // Pods that cannot run are news whenever the cause changes, not only when the status does: the tenant was
        // already unavailable while they started. The cause is the reason; the message follows the kubelet's
        // retries and would make an event of each.
        let cause_changed = type_ == status::MTA_AVAILABLE
            && pod_health::REASONS.contains(&reason.as_str())
            && previous_reason.as_deref() != Some(reason.as_str());
        let transitioned = status::set_condition(&mut conditions, update, generation, now);
        if (transitioned && news) || cause_changed || hold_started {
            let kind = if transition_is_bad(type_, status_now, &reason, &message) {
                EventType::Warning
            } else {
                EventType::Normal
            };
            // Each pod that cannot send is its own event series (the recorder folds repeats of one reason on one
            // object into the first event, note included).
            let related = (type_ == status::EGRESS_READY)
                .then(|| egress::first_failing(&pod_egress))
                .flatten()
                .map(|pod| ObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Pod".to_owned()),
                    name: Some(pod.to_owned()),
                    namespace: Some(namespace.clone()),
                    ..ObjectReference::default()
                });
            publish_related(ctx, tenant, kind, &reason, &message, related).await;
        }
    }
    for replaced in &plan.replaced {
        let message = format!(
            "DKIM key Secret for selector {} of {} was deleted; generated new selector {} (publish its record)",
            replaced.lost_selector, replaced.domain, replaced.new_selector
        );
        publish(ctx, tenant, EventType::Warning, "DkimKeyReplaced", &message).await;
    }
    for key in &generated {
        let message = format!("generated DKIM key {} for {}", key.selector, key.domain);
        publish(ctx, tenant, EventType::Normal, "DkimKeyGenerated", &message).await;
    }
    for assigned in &assignments {
        if let Some((kind, reason, message)) = warmup_event(assigned) {
            publish(ctx, tenant, kind, reason, &message).await;
        }
    }

    // Held back, only the pods that already exist send.
    let with_pod = if hold_volumes {
        assignments
            .len()
            .min(usize::try_from(live_replicas).unwrap_or(usize::MAX))
    } else {
        assignments.len()
    };
    let status = SecureMailTenantStatus {
        observed_generation: generation,
        conditions,
        ips: Some(format!("{with_pod}/{}", tenant.spec.ip_pool.addresses.len())),
        warmup_day: assignments.iter().filter_map(|assigned| assigned.pod.warmup_day).min(),
        dns_records,
        ip_pool,
        dkim_selectors: plan.selectors.clone(),
        submission_certificate_expires: inputs.certificate_expires.map(Time),
    };
    write_status(ctx, tenant, &previous, status).await?;
    ctx.failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&ObjectRef::from_obj(tenant));
    ctx.metrics
        .reconciles
        .get_or_create(&crate::context::ResultLabels { result: "success" })
        .inc();
    let requeue = if !pool_plan.draining.is_empty() {
        drain::recheck_after(&pool_plan, now, DRAIN_RECHECK)
    } else if !unread.is_empty() {
        // A pod that could not report yesterday is asked again soon; its address is judged once it answers.
        WARMUP_RECHECK
    } else if !missing_inputs.is_empty() {
        // Secrets are not watched (they are not ours): look again soon.
        INPUT_RECHECK
    } else if crd_missing {
        CRD_RECHECK
    } else {
        next_wakeup(now)
    };
    // A scheduled pod that has not started may be judged stuck later without changing: look again then.
    let requeue = match pods_recheck.and_then(|at| Duration::try_from(at.duration_since(now)).ok()) {
        Some(until) => requeue.min(until.max(Duration::from_secs(1))),
        None => requeue,
    };
    Ok(Action::requeue(if dnsbl_spec.zones.is_empty() {
        requeue
    } else {
        requeue.min(Duration::from_secs(u64::from(dnsbl_spec.interval_minutes) * 60))
    }))
}

/// `IpListed`: True naming each listed address and zone, Unknown when a zone could not be asked (never "not
/// listed" on a failure), False otherwise.
fn listing_condition(
    spec: &DnsblSpec,
    listings: &[dnsbl::Listing<'_>],
    unchecked: &[dnsbl::Unchecked<'_>],
) -> ConditionUpdate {
    if spec.zones.is_empty() {
        return ConditionUpdate::new(status::IP_LISTED, false, "NotChecked", "no DNSBL zones configured");
    }
    if !listings.is_empty() {
        let found: Vec<String> = listings
            .iter()
            .map(|listing| format!("{} is listed on {} ({})", listing.address, listing.zone, listing.code))
            .collect();
        return ConditionUpdate::new(status::IP_LISTED, true, "Listed", found.join("; "));
    }
    if !unchecked.is_empty() {
        let failed: Vec<String> = unchecked
            .iter()
            .map(|failed| format!("{} on {}: {}", failed.address, failed.zone, failed.reason))
            .collect();
        return ConditionUpdate::unknown(
            status::IP_LISTED,
            "CheckFailed",
            format!("could not check {}", failed.join("; ")),
        );
    }
    ConditionUpdate::new(
        status::IP_LISTED,
        false,
        "NotListed",
        format!("no pool address is listed on {}", spec.zones.join(", ")),
    )
}

/// Deletion. Orphan: every child loses its owner reference, so pods, keys and volumes stay. Drain: every pod
/// leaves the submission Service and the finalizer stays until each pod's queue is empty; then the volumes are
/// kept as delivery evidence until their retention ends and Kubernetes garbage-collects the rest.
async fn cleanup(tenant: &SecureMailTenant, ctx: &Context) -> Result<Action> {
    let name = build::tenant_name(tenant)?;
    let namespace = tenant.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let names = TenantNames::new(&name);
    match tenant.spec.deletion_policy {
        DeletionPolicy::Orphan => {
            orphan_children(ctx, &namespace, &names).await?;
            let note = "tenant deleted; MTA pods, keys and volumes left running without an owner";
            publish(ctx, tenant, EventType::Normal, "Orphaned", note).await;
        }
        DeletionPolicy::Drain => {
            let replicas = live_replicas(ctx, &namespace, &names);
            let ordinals = drain::claimed_ordinals(ctx, &namespace, &names, replicas).await?;
            let probe = drain::probe(ctx, &namespace, &names, ordinals.iter().copied()).await?;
            if let Some(waiting) = drain::still_draining(&probe.queues) {
                let previous = tenant.status.clone().unwrap_or_default();
                let mut conditions = previous.conditions.clone();
                let update = ConditionUpdate::new(status::DRAINING, true, "TenantDeleted", waiting.to_string());
                if status::set_condition(&mut conditions, update, tenant.metadata.generation, ctx.clock.now()) {
                    publish(ctx, tenant, EventType::Normal, "Draining", &waiting.to_string()).await;
                }
                let status = SecureMailTenantStatus {
                    conditions,
                    ..previous.clone()
                };
                write_status(ctx, tenant, &previous, status).await?;
                return Err(waiting);
            }
            evidence_retention::retain(
                ctx,
                &namespace,
                &names,
                &ordinals,
                tenant.spec.audit.retention_days,
                &probe,
                "tenant deleted",
            )
            .await?;
        }
    }
    info!(tenant = %name, %namespace, policy = ?tenant.spec.deletion_policy, "tenant deleted");
    Ok(Action::await_change())
}

/// Removes the owner reference from every child so garbage collection leaves it alone.
async fn orphan_children(ctx: &Context, namespace: &str, names: &TenantNames) -> Result<()> {
    let client = &ctx.client;
    let selector = names.children_selector();
    apply::orphan::<StatefulSet>(client, namespace, &selector).await?;
    apply::orphan::<ConfigMap>(client, namespace, &selector).await?;
    apply::orphan::<Secret>(client, namespace, &selector).await?;
    apply::orphan::<Service>(client, namespace, &selector).await?;
    apply::orphan::<ServiceAccount>(client, namespace, &selector).await?;
    apply::orphan::<PodDisruptionBudget>(client, namespace, &selector).await?;
    apply::orphan::<NetworkPolicy>(client, namespace, &selector).await?;
    Ok(())
}

/// The StatefulSet's current size (0 before it exists), from the watch cache.
fn live_replicas(ctx: &Context, namespace: &str, names: &TenantNames) -> u32 {
    cached_stateful_set(ctx, namespace, names)
        .and_then(|sts| sts.desired)
        .and_then(|replicas| u32::try_from(replicas).ok())
        .unwrap_or(0)
}

/// The tenant's StatefulSet's desired and ready replicas, when it is cached.
fn cached_stateful_set(ctx: &Context, namespace: &str, names: &TenantNames) -> Option<Replicas> {
    ctx.stores.stateful_sets.get(namespace, &names.mta())?.replicas
}

fn draining_condition(plan: &drain::PoolPlan, pool: &[PoolAddressStatus], now: Timestamp) -> ConditionUpdate {
    if plan.draining.is_empty() {
        return ConditionUpdate::new(status::DRAINING, false, "NothingToDrain", "no pod is leaving the pool");
    }
    let pods: Vec<String> = pool
        .iter()
        .filter(|entry| entry.state == PoolAddressState::Draining)
        .map(|entry| format!("{} ({})", entry.address, entry.reason.as_deref().unwrap_or_default()))
        .collect();
    let overdue = drain::overdue(pool, now);
    let reason = if overdue.is_empty() { "Draining" } else { "DrainOverdue" };
    ConditionUpdate::new(status::DRAINING, true, reason, pods.join("; "))
}

/// Fits the desired StatefulSet to new queue volumes being held back; returns whether to write it. None is written
/// when there is none yet (so no claim is ever made); an existing one keeps no more replicas than it has, so no new
/// claim appears, and is never scaled down for this: its pods may hold queued mail. Claims it has keep their class.
fn hold_new_volumes(desired: &mut StatefulSet, live_replicas: u32, exists: bool) -> bool {
    if !exists {
        return false;
    }
    if let Some(spec) = desired.spec.as_mut() {
        let live = i32::try_from(live_replicas).unwrap_or(i32::MAX);
        spec.replicas = Some(spec.replicas.unwrap_or(live).min(live));
    }
    true
}

/// Applies every child (the StatefulSet only when `write_stateful_set`) and sweeps the ones no longer built.
/// Returns the StatefulSet's ready replicas.
async fn apply_children(
    ctx: &Context,
    namespace: &str,
    names: &TenantNames,
    children: Children,
    write_stateful_set: bool,
) -> Result<i32> {
    let (client, stores, tenant) = (&ctx.client, &ctx.stores, names.tenant.as_str());
    let keep_mta = [names.mta()];
    apply::apply(client, children.service_account, &stores.service_accounts).await?;
    apply::apply(client, children.config_map, &stores.config_maps).await?;
    apply::apply(client, children.headless_service, &stores.services).await?;
    apply::apply(client, children.submission_service, &stores.services).await?;
    apply::apply(client, children.disruption_budget, &stores.disruption_budgets).await?;
    apply::apply(client, children.network_policy, &stores.network_policies).await?;
    if write_stateful_set {
        apply::apply(client, children.stateful_set, &stores.stateful_sets).await?;
    }
    apply::sweep::<ServiceAccount>(client, namespace, tenant, &stores.service_accounts, &keep_mta).await?;
    apply::sweep::<ConfigMap>(client, namespace, tenant, &stores.config_maps, &[names.config_map()]).await?;
    let services = [names.mta(), names.submission_service()];
    apply::sweep::<Service>(client, namespace, tenant, &stores.services, &services).await?;
    apply::sweep::<PodDisruptionBudget>(client, namespace, tenant, &stores.disruption_budgets, &keep_mta).await?;
    apply::sweep::<NetworkPolicy>(client, namespace, tenant, &stores.network_policies, &keep_mta).await?;
    apply::sweep::<StatefulSet>(client, namespace, tenant, &stores.stateful_sets, &keep_mta).await?;
    Ok(cached_stateful_set(ctx, namespace, names)
        .and_then(|sts| sts.ready)
        .unwrap_or(0))
}

/// Key Secrets of this tenant, parsed from the watch cache. A Secret missing its labels is reported, never guessed at.
fn stored_keys(ctx: &Context, namespace: &str, names: &TenantNames) -> Result<Vec<StoredKey>> {
    ctx.stores
        .secrets
        .of_tenant(namespace, &names.tenant)
        .iter()
        .filter(|secret| secret.label(COMPONENT_LABEL) == Some(DKIM_KEY_COMPONENT))
        .map(stored_key)
        .collect()
}

/// A recorded selector whose Secret the watch cache lacks is looked up on the apiserver before the plan may call
/// its key lost and replace it: after a watch failure (an apiserver restart) the Secret watch can lag behind the
/// tenant's status, and a key replaced for nothing is a new selector every receiver has to learn.
async fn confirm_recorded_keys(
    ctx: &Context,
    namespace: &str,
    names: &TenantNames,
    recorded: &[DkimSelectorStatus],
    stored: &mut Vec<StoredKey>,
) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    for entry in recorded {
        let cached = stored
            .iter()
            .any(|key| key.domain == entry.domain && key.selector == entry.selector);
        if cached {
            continue;
        }
        if let Some(secret) = api
            .get_metadata_opt(&names.dkim_secret(&entry.domain, &entry.selector))
            .await?
        {
            stored.push(stored_key(&CachedChild::of(&secret.metadata))?);
        }
    }
    Ok(())
}

/// The key a key Secret holds, from its labels and annotations.
fn stored_key(secret: &CachedChild) -> Result<StoredKey> {
    let bad = |reason: &str| Error::BadKeySecret {
        name: secret.name.to_string(),
        reason: reason.to_owned(),
    };
    let selector = secret
        .label(dkim::SELECTOR_LABEL)
        .ok_or_else(|| bad("no selector label"))?;
    let algorithm = secret
        .label(dkim::ALGORITHM_LABEL)
        .and_then(dkim::parse_algorithm_label)
        .ok_or_else(|| bad("no valid algorithm label"))?;
    let domain = secret
        .annotation(dkim::DOMAIN_ANNOTATION)
        .ok_or_else(|| bad("no domain annotation"))?;
    let created = secret.created.ok_or_else(|| bad("no creation time"))?;
    Ok(StoredKey {
        domain: domain.to_owned(),
        selector: selector.to_owned(),
        algorithm,
        secret_name: secret.name.to_string(),
        created,
    })
}

/// Generates planned keys off the async runtime and stores each in its own immutable Secret. A Secret that
/// already exists (a concurrent or interrupted reconcile) is kept as it is.
async fn create_keys<'plan>(
    ctx: &Context,
    tenant: &SecureMailTenant,
    names: &TenantNames,
    plan: &'plan DkimPlan,
) -> Result<Vec<&'plan NewKey>> {
    let namespace = tenant.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut created = Vec::new();
    for key in &plan.generate {
        let secret_name = names.dkim_secret(&key.domain, &key.selector);
        // The watch cache may lag behind a Secret made moments ago: ask before spending a key generation.
        if api.get_metadata_opt(&secret_name).await?.is_some() {
            continue;
        }
        let (algorithm, bits) = (key.algorithm, key.rsa_bits);
        let permit = ctx.keygen.acquire().await.map_err(|_| Error::KeygenStopped)?;
        let generated = tokio::task::spawn_blocking(move || dkim_keys::generate(algorithm, bits)).await??;
        drop(permit);
        let mut labels = names.labels(DKIM_KEY_COMPONENT);
        labels.insert(dkim::SELECTOR_LABEL.to_owned(), key.selector.clone());
        labels.insert(
            dkim::ALGORITHM_LABEL.to_owned(),
            dkim::algorithm_label(key.algorithm).to_owned(),
        );
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([
                    (dkim::DOMAIN_ANNOTATION.to_owned(), key.domain.clone()),
                    (
                        dkim::PUBLIC_KEY_ANNOTATION.to_owned(),
                        generated.public_key_base64().to_owned(),
                    ),
                ])),
                owner_references: Some(vec![build::owner_reference(tenant)?]),
                ..ObjectMeta::default()
            },
            immutable: Some(true),
            type_: Some("Opaque".to_owned()),
            data: Some(BTreeMap::from([(
                dkim::PRIVATE_KEY_FIELD.to_owned(),
                ByteString(generated.private_key_pem().as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(tenant = %names.tenant, %namespace, selector = %key.selector, domain = %key.domain, "DKIM key generated");
                created.push(key);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(created)
}

async fn delete_keys(ctx: &Context, namespace: &str, names: &TenantNames, plan: &DkimPlan) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    for (domain, selector) in &plan.delete {
        match api
            .delete(&names.dkim_secret(domain, selector), &DeleteParams::default())
            .await
        {
            Ok(_) => {
                info!(tenant = %names.tenant, %namespace, %selector, %domain, "retired DKIM key deleted")
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// The public key of every selector in the plan: from its Secret's annotation in the watch cache, or read back
/// from the Secret itself (a key is never regenerated).
async fn public_keys(
    ctx: &Context,
    namespace: &str,
    names: &TenantNames,
    plan: &DkimPlan,
) -> Result<Vec<(DkimSelectorStatus, String)>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut keys = Vec::new();
    for selector in &plan.selectors {
        let secret_name = names.dkim_secret(&selector.domain, &selector.selector);
        let cached = ctx.stores.secrets.get(namespace, &secret_name);
        if let Some(public) = cached
            .as_ref()
            .and_then(|secret| secret.annotation(dkim::PUBLIC_KEY_ANNOTATION))
        {
            keys.push((selector.clone(), public.to_owned()));
            continue;
        }
        let Some(secret) = api.get_opt(&secret_name).await? else {
            continue;
        };
        if let Some(public) = secret.annotations().get(dkim::PUBLIC_KEY_ANNOTATION) {
            keys.push((selector.clone(), public.clone()));
            continue;
        }
        let pem = secret
            .data
            .as_ref()
            .and_then(|data| data.get(dkim::PRIVATE_KEY_FIELD))
            .and_then(|bytes| std::str::from_utf8(&bytes.0).ok())
            .ok_or_else(|| Error::BadKeySecret {
                name: secret_name.clone(),
                reason: format!("no UTF-8 {} field", dkim::PRIVATE_KEY_FIELD),
            })?;
        keys.push((
            selector.clone(),
            dkim_keys::public_key_from_pem(pem, selector.algorithm)?,
        ));
    }
    Ok(keys)
}

fn dkim_condition(plan: &DkimPlan, now: Timestamp) -> ConditionUpdate {
    let replaced = dkim::recent_replacements(&plan.selectors, now);
    if !replaced.is_empty() {
        let list: Vec<String> = replaced
            .iter()
            .map(|selector| {
                format!(
                    "{} replaced deleted {} for {}",
                    selector.selector,
                    selector.replaces.as_deref().unwrap_or_default(),
                    selector.domain
                )
            })
            .collect();
        let message = format!("key Secret deleted: {}; publish the new DKIM record", list.join(", "));
        return ConditionUpdate::new(status::DKIM_READY, true, "KeyReplaced", message);
    }
    let active = plan
        .selectors
        .iter()
        .filter(|selector| selector.state == DkimSelectorState::Active)
        .count();
    ConditionUpdate::new(
        status::DKIM_READY,
        true,
        "KeysReady",
        format!("{active} active DKIM selector(s)"),
    )
}

/// The tenant's MTA pods in the pod cache, in ordinal order, without those being deleted.
fn tenant_pods(ctx: &Context, namespace: &str, names: &TenantNames) -> Vec<(String, Arc<MtaPod>)> {
    let mut pods: Vec<(String, Arc<MtaPod>)> = ctx
        .stores
        .pods
        .of_tenant(namespace, &names.tenant)
        .into_iter()
        // A pod being deleted is on its way out; its replacement is the one that counts.
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .map(|pod| (pod.name_any(), pod))
        .collect();
    pods.sort_by(|(a, _), (b, _)| (pod_health::ordinal(a), a).cmp(&(pod_health::ordinal(b), b)));
    pods
}

/// Why the tenant's MTA pods cannot run, in their order; and the earliest time a pod that is starting would be
/// judged stuck.
fn pod_problems(pods: &[(String, Arc<MtaPod>)], now: Timestamp) -> (Vec<pod_health::PodProblem>, Option<Timestamp>) {
    let mut problems = Vec::new();
    let mut recheck: Option<Timestamp> = None;
    for (name, pod) in pods {
        let Some(status) = &pod.status else { continue };
        let diagnosis = pod_health::diagnose(name, status, now);
        problems.extend(diagnosis.problem);
        recheck = match (recheck, diagnosis.recheck_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    (problems, recheck)
}

fn conflict_condition(conflicts: &BTreeMap<String, String>) -> ConditionUpdate {
    if conflicts.is_empty() {
        return ConditionUpdate::new(
            status::IP_POOL_CONFLICT,
            false,
            "NoConflict",
            "every pool address is this tenant's",
        );
    }
    let list: Vec<String> = conflicts
        .iter()
        .map(|(address, owner)| format!("{address} is used by tenant {owner}"))
        .collect();
    ConditionUpdate::new(
        status::IP_POOL_CONFLICT,
        true,
        "AddressInUse",
        format!("{}; no pod sends from it", list.join(", ")),
    )
}

/// `DomainConflict`: True naming each domain another tenant holds, and that tenant.
fn domain_condition(held: &BTreeMap<String, String>) -> ConditionUpdate {
    if held.is_empty() {
        return ConditionUpdate::new(
            status::DOMAIN_CONFLICT,
            false,
            "NoConflict",
            "every domain is this tenant's",
        );
    }
    let list: Vec<String> = held
        .iter()
        .map(|(domain, holder)| format!("domain {domain} is held by tenant {holder}"))
        .collect();
    ConditionUpdate::new(
        status::DOMAIN_CONFLICT,
        true,
        "DomainInUse",
        format!(
            "{}; this tenant gets no DKIM key, DNS record, DNSEndpoint entry or signing for it until that tenant \
             releases it",
            list.join(", ")
        ),
    )
}

/// The tenant as the builders and the DKIM plan see it: without the domains another tenant holds.
fn without_domains<'t>(tenant: &'t SecureMailTenant, held: &BTreeMap<String, String>) -> Cow<'t, SecureMailTenant> {
    if held.is_empty() {
        return Cow::Borrowed(tenant);
    }
    let mut owned = tenant.clone();
    owned.spec.domains.retain(|domain| !held.contains_key(&domain.name));
    Cow::Owned(owned)
}

fn transition_is_bad(type_: &str, status_now: Option<bool>, reason: &str, message: &str) -> bool {
    match type_ {
        // A problem only where it holds back pods and volumes; elsewhere it informs (a change of the cluster's
        // default StorageClass would otherwise raise a warning on every tenant).
        status::QUEUE_STORAGE_ENCRYPTED => message.contains(queue_storage::HOLD_NOTE),
        status::IP_POOL_CONFLICT | status::DOMAIN_CONFLICT | status::DRAINING => status_now == Some(true),
        // Listed, or not known whether listed.
        status::IP_LISTED => status_now != Some(false),
        // Publishing DNS by hand is a choice, not a problem.
        status::DNS_PUBLISHED => reason == "CrdMissing",
        _ => status_now != Some(true),
    }
}

/// Writes status by server-side apply, only when it differs from what is stored.
async fn write_status(
    ctx: &Context,
    tenant: &SecureMailTenant,
    previous: &SecureMailTenantStatus,
    status: SecureMailTenantStatus,
) -> Result<()> {
    if &status == previous {
        return Ok(());
    }
    let namespace = tenant.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<SecureMailTenant> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": SecureMailTenant::api_version(&()),
        "kind": SecureMailTenant::kind(&()),
        "status": status,
    });
    api.patch_status(
        &tenant.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Events go to the tenant; failing to publish one is logged, never fatal.
async fn publish(ctx: &Context, tenant: &SecureMailTenant, type_: EventType, reason: &str, note: &str) {
    publish_related(ctx, tenant, type_, reason, note, None).await;
}

/// An event about the tenant and, when given, the object it concerns most (a pod).
async fn publish_related(
    ctx: &Context,
    tenant: &SecureMailTenant,
    type_: EventType,
    reason: &str,
    note: &str,
    related: Option<ObjectReference>,
) {
    let event = NewEvent {
        type_,
        reason,
        note,
        action: "Reconcile",
        related,
    };
    if let Err(error) = ctx.events.publish(event, &tenant.object_ref(&())).await {
        warn!(tenant = %tenant.name_any(), %error, "event not published");
    }
}

/// Next wakeup: the next UTC day boundary (warmup day changes), at most [`RESYNC`] away.
/// Yesterday's results of each due address, from its pod's `/status`. A pod that reports no results for yesterday
/// (new, or down all day) sent nothing; a pod that cannot be read is returned in the second list and its address
/// is not judged yet.
async fn yesterday_results(
    ctx: &Context,
    namespace: &str,
    names: &TenantNames,
    due: &[(String, u32)],
    today: Date,
) -> Result<(BTreeMap<String, DayResults>, Vec<String>)> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let day_before = today.yesterday().unwrap_or(today);
    let mut results = BTreeMap::new();
    let mut unread = Vec::new();
    for (address, ordinal) in due {
        let pod_name = format!("{}-{ordinal}", names.mta());
        let reading = match pods.get_opt(&pod_name).await? {
            Some(pod) => pod_status::read(pod.status.as_ref()).await,
            None => Err("no pod".to_owned()),
        };
        match reading {
            // A pod serving another address (the pool changed) says nothing about this one.
            Ok(status) if status.address.to_string() == *address => {
                let day = status.yesterday.filter(|day| day.date == day_before);
                results.insert(
                    address.clone(),
                    day.as_ref().map(DayResults::from_delivery_day).unwrap_or_default(),
                );
            }
            Ok(_) => unread.push(address.clone()),
            Err(reason) => {
                info!(tenant = %names.tenant, %namespace, %address, %reason, "warmup: yesterday's results not readable yet");
                unread.push(address.clone());
            }
        }
    }
    Ok((results, unread))
}

/// The event a warmup evaluation deserves, if any.
fn warmup_event(assigned: &status::Assigned) -> Option<(EventType, &'static str, String)> {
    let address = &assigned.pod.address.address;
    let limit = assigned
        .pod
        .daily_limit
        .map_or_else(|| "no limit".to_owned(), |limit| format!("{limit} messages/day"));
    let reason = assigned.warmup.state.reason().unwrap_or_default();
    Some(match assigned.transition? {
        Transition::Advanced { from, to } => (
            EventType::Normal,
            "WarmupAdvanced",
            format!("{address}: warmup day {from} -> {to} ({limit})"),
        ),
        Transition::BecameWarm => (
            EventType::Normal,
            "WarmupComplete",
            format!("{address}: warmup schedule complete, no warmup limit"),
        ),
        Transition::Held => (
            EventType::Warning,
            "WarmupHeld",
            format!("{address}: warmup day {} held ({limit}): {reason}", assigned.warmup.day),
        ),
        Transition::RolledBack { from, to } => (
            EventType::Warning,
            "WarmupRolledBack",
            format!("{address}: warmup day {from} -> {to} ({limit}): {reason}"),
        ),
        Transition::Rewarmed { idle_days } => (
            EventType::Normal,
            "WarmupRestarted",
            format!("{address}: idle for {idle_days} days, warmup restarts at day 1 ({limit})"),
        ),
        Transition::StayedWarm | Transition::AlreadyEvaluated => return None,
    })
}

fn next_wakeup(now: Timestamp) -> Duration {
    let zoned = now.to_zoned(TimeZone::UTC);
    let until_midnight = zoned
        .date()
        .tomorrow()
        .ok()
        .and_then(|tomorrow| tomorrow.to_zoned(TimeZone::UTC).ok())
        .and_then(|midnight| Duration::try_from(midnight.timestamp().duration_since(now)).ok())
        .unwrap_or(RESYNC);
    until_midnight.min(RESYNC).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::StatefulSetSpec;

    use super::*;

    fn stateful_set(replicas: i32) -> StatefulSet {
        StatefulSet {
            spec: Some(StatefulSetSpec {
                replicas: Some(replicas),
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        }
    }

    /// The replicas written, `None` when the StatefulSet is not written.
    fn held(desired: i32, live: u32, exists: bool) -> Option<i32> {
        let mut stateful_set = stateful_set(desired);
        hold_new_volumes(&mut stateful_set, live, exists).then(|| stateful_set.spec?.replicas)?
    }

    #[test]
    fn held_volumes_mean_no_new_stateful_set_and_no_scale_up_but_never_a_scale_down() {
        assert_eq!(held(2, 0, false), None, "a new tenant gets none");
        assert_eq!(held(3, 2, true), Some(2), "not scaled up");
        assert_eq!(held(2, 2, true), Some(2));
        // A pool that shrank drains as usual: fewer replicas create no claim.
        assert_eq!(held(1, 2, true), Some(1));
    }

    #[test]
    fn storage_not_known_to_encrypt_warns_only_where_it_holds_back_volumes() {
        let reason = "StorageClassNotKnownToEncrypt";
        let informs = "queue volumes use StorageClass standard, which is not known to encrypt at rest";
        assert!(!transition_is_bad(
            status::QUEUE_STORAGE_ENCRYPTED,
            Some(false),
            reason,
            informs
        ));
        let holds = format!("{informs}. {}: no new MTA pod", queue_storage::HOLD_NOTE);
        assert!(transition_is_bad(
            status::QUEUE_STORAGE_ENCRYPTED,
            Some(false),
            reason,
            &holds
        ));
        assert!(transition_is_bad(
            status::QUEUE_STORAGE_ENCRYPTED,
            None,
            "NoDefaultStorageClass",
            &holds
        ));
    }
}
