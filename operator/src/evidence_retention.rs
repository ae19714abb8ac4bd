//! Delivery evidence outlives the pods that wrote it. When a drained pod leaves (the pool shrank, or the tenant was
//! deleted with `deletionPolicy: Drain`), its volume claim is not deleted: it is marked as retained evidence, with
//! the date before which nothing may delete it (the tenant's `audit.retentionDays` from the moment the pod left,
//! which is after its last record) and the chain heads its sidecar last published. A periodic sweep deletes marked
//! claims once that date has passed and no pod uses them. A pod that comes back to the same ordinal (the pool grew
//! again) takes its old volume back and continues its evidence; the claim is unmarked then.
//!
//! The sweep trusts the marks: whoever can edit a claim's annotations could as well delete the claim, so they give
//! nobody a power they did not have. A mark that cannot be read keeps the claim.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Api, ResourceExt};
use securemail_api::sidecar_status::EvidenceHeads;
use serde_json::json;
use tracing::{info, warn};

use crate::context::Context;
use crate::drain::{Probe, claim_name};
use crate::names::{MANAGED_SELECTOR, TenantNames};
use crate::{Error, Result};

/// On a claim: `true` while it is kept only as evidence (its pod is gone).
pub const RETAINED_LABEL: &str = "securemail.io/evidence-retained";
/// On a retained claim: RFC 3339 time before which it must not be deleted.
pub const RETAIN_UNTIL_ANNOTATION: &str = "securemail.io/evidence-retain-until";
/// On a retained claim: the evidence chain heads (`/status` `evidence`) its sidecar published last, as JSON, for
/// `securemail-sidecar evidence verify --heads`.
pub const HEADS_ANNOTATION: &str = "securemail.io/evidence-heads";
/// On a retained claim: which pod and address wrote it, and why it was retained.
pub const RETAINED_FROM_ANNOTATION: &str = "securemail.io/evidence-retained-from";

/// The chain heads and address a pod's sidecar last reported, kept on its claim when it is retained.
#[derive(Debug, Clone, Default)]
pub struct LastReport {
    pub address: Option<String>,
    pub heads: Option<EvidenceHeads>,
}

/// When a retained claim may go: `retention_days` after `now` (the pod has left, so every record is older).
pub fn retain_until(now: Timestamp, retention_days: u32) -> Timestamp {
    now.checked_add(SignedDuration::from_hours(24 * i64::from(retention_days)))
        .unwrap_or(Timestamp::MAX)
}

/// True when `claim` is marked as retained evidence.
pub fn is_retained(claim: &PersistentVolumeClaim) -> bool {
    claim.labels().get(RETAINED_LABEL).map(String::as_str) == Some("true")
}

/// What the sweep does with a retained claim.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Its retention has not ended (or its date cannot be read): keep it.
    Keep,
    /// A pod uses it again: it is live, no longer only evidence.
    Unmark,
    /// Its retention ended and no pod uses it.
    Delete,
}

/// The sweep's decision for one retained claim.
pub fn verdict(claim: &PersistentVolumeClaim, in_use: bool, now: Timestamp) -> Verdict {
    if in_use {
        return Verdict::Unmark;
    }
    match claim
        .annotations()
        .get(RETAIN_UNTIL_ANNOTATION)
        .and_then(|until| until.parse::<Timestamp>().ok())
    {
        Some(until) if until <= now => Verdict::Delete,
        _ => Verdict::Keep,
    }
}

/// Marks the claims of drained, removed pods `ordinals` as retained evidence. A claim already marked keeps its
/// marks (the pod left earlier; its heads were taken then); a missing claim is skipped; the claim of a pod that
/// never ran and was never bound (`probe.never_used`) holds nothing and is deleted.
pub async fn retain(
    ctx: &Context,
    namespace: &str,
    names: &TenantNames,
    ordinals: &[u32],
    retention_days: u32,
    probe: &Probe,
    why: &str,
) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let until = retain_until(ctx.clock.now(), retention_days);
    for ordinal in ordinals {
        let name = claim_name(names, *ordinal);
        let Some(claim) = claims.get_opt(&name).await? else {
            continue;
        };
        if is_retained(&claim) {
            continue;
        }
        if probe.never_used.contains(ordinal) {
            match claims.delete(&name, &DeleteParams::default()).await {
                Ok(_) => info!(tenant = %names.tenant, %namespace, claim = %name, "unused volume claim deleted"),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) => return Err(err.into()),
            }
            continue;
        }
        let report = probe.reports.get(ordinal).cloned().unwrap_or_default();
        let from = format!(
            "pod {}-{ordinal}{}: {why}",
            names.mta(),
            report
                .address
                .map(|address| format!(" (address {address})"))
                .unwrap_or_default()
        );
        let heads = report
            .heads
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|source| Error::Serialize {
                what: "evidence chain heads",
                source,
            })?;
        let patch = json!({"metadata": {
            "labels": {RETAINED_LABEL: "true"},
            "annotations": {
                RETAIN_UNTIL_ANNOTATION: format!("{until:.0}"),
                HEADS_ANNOTATION: heads,
                RETAINED_FROM_ANNOTATION: from,
            },
        }});
        claims
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        info!(tenant = %names.tenant, %namespace, claim = %name, retain_until = %format!("{until:.0}"),
            "drained volume kept as delivery evidence");
    }
    Ok(())
}

/// Unmarks the retained claims of ordinals below `replicas`: the StatefulSet is about to run pods on them again.
pub async fn readopt(ctx: &Context, namespace: &str, names: &TenantNames, replicas: u32) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let selector = format!("{},{RETAINED_LABEL}=true", names.children_selector());
    for claim in claims.list(&ListParams::default().labels(&selector)).await? {
        let live = (0..replicas).any(|ordinal| claim.name_any() == claim_name(names, ordinal));
        if live {
            unmark(&claims, &claim.name_any()).await?;
            info!(tenant = %names.tenant, %namespace, claim = %claim.name_any(), "retained volume taken back by its pod");
        }
    }
    Ok(())
}

async fn unmark(claims: &Api<PersistentVolumeClaim>, name: &str) -> Result<()> {
    let patch = json!({"metadata": {
        "labels": {RETAINED_LABEL: null},
        "annotations": {RETAIN_UNTIL_ANNOTATION: null, HEADS_ANNOTATION: null, RETAINED_FROM_ANNOTATION: null},
    }});
    claims
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// One pass over every retained claim the operator may see: deletes those whose retention ended, unmarks those a
/// pod uses again. Returns how many it deleted.
pub async fn sweep(ctx: &Context) -> Result<usize> {
    let selector = format!("{MANAGED_SELECTOR},{RETAINED_LABEL}=true");
    let mut deleted = 0;
    for scope in ctx.settings.managed_apis::<PersistentVolumeClaim>(&ctx.client) {
        for claim in scope.list(&ListParams::default().labels(&selector)).await? {
            let (Some(namespace), name) = (claim.namespace(), claim.name_any()) else {
                continue;
            };
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
            // StatefulSet claims are named `<template>-<pod>`: the pod that would mount it.
            let pod = name.split_once('-').map(|(_, pod)| pod.to_owned()).unwrap_or_default();
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            let in_use = pods.get_opt(&pod).await?.is_some();
            match verdict(&claim, in_use, ctx.clock.now()) {
                Verdict::Keep => {}
                Verdict::Unmark => unmark(&claims, &name).await?,
                Verdict::Delete => {
                    // Only the claim as listed: a claim marked again or taken back since then is left alone.
                    let params = DeleteParams {
                        preconditions: Some(Preconditions {
                            uid: claim.uid(),
                            resource_version: claim.resource_version(),
                        }),
                        ..DeleteParams::default()
                    };
                    match claims.delete(&name, &params).await {
                        Ok(_) => {
                            deleted += 1;
                            info!(%namespace, claim = %name, "retention ended: evidence volume deleted");
                        }
                        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
                        Err(err) => return Err(err.into()),
                    }
                }
            }
        }
    }
    Ok(deleted)
}

/// Runs [`sweep`] now and then every `--evidence-sweep-seconds`, for as long as the controller runs.
pub async fn sweep_periodically(ctx: std::sync::Arc<Context>) {
    loop {
        if let Err(error) = sweep(&ctx).await {
            warn!(%error, "the sweep of retained evidence volumes failed; it runs again at the next interval");
        }
        tokio::time::sleep(ctx.settings.evidence_sweep_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(until: Option<&str>) -> PersistentVolumeClaim {
        let mut claim = PersistentVolumeClaim::default();
        claim.metadata.labels = Some([(RETAINED_LABEL.to_owned(), "true".to_owned())].into());
        claim.metadata.annotations = until.map(|until| [(RETAIN_UNTIL_ANNOTATION.to_owned(), until.to_owned())].into());
        claim
    }

    #[test]
    fn a_claim_goes_only_after_its_date_and_while_no_pod_uses_it() {
        let now: Timestamp = "2031-06-01T12:00:00Z".parse().unwrap();
        assert_eq!(
            verdict(&claim(Some("2031-06-01T11:59:59Z")), false, now),
            Verdict::Delete
        );
        assert_eq!(verdict(&claim(Some("2031-06-01T12:00:01Z")), false, now), Verdict::Keep);
        assert_eq!(
            verdict(&claim(Some("2031-06-01T11:59:59Z")), true, now),
            Verdict::Unmark
        );
    }

    #[test]
    fn an_unreadable_or_missing_date_keeps_the_claim() {
        let now: Timestamp = "2031-06-01T12:00:00Z".parse().unwrap();
        for until in [None, Some(""), Some("yesterday"), Some("2031-13-01T00:00:00Z")] {
            assert_eq!(verdict(&claim(until), false, now), Verdict::Keep, "{until:?}");
        }
    }

    #[test]
    fn retention_counts_whole_days_from_now() {
        let now: Timestamp = "2026-12-07T18:00:00Z".parse().unwrap();
        assert_eq!(retain_until(now, 2190).to_string(), "2032-12-05T18:00:00Z");
        assert_eq!(retain_until(Timestamp::MAX, 1), Timestamp::MAX);
    }
}
