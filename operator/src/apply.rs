//! Server-side apply of children under one field manager, skipping objects whose last applied content is
//! unchanged (a no-op reconcile makes zero writes), and the orphan sweep of labelled children not built this pass.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Mutex, PoisonError};

use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::core::ApiResource;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::child_cache::ChildCache;
use crate::names::{DESIRED_HASH_ANNOTATION, MANAGER, sha256_hex};
use crate::{Error, Result};

/// Applies `object` unless its live version in `cached` (a watch cache) carries the same desired-hash.
/// Returns whether it wrote.
pub async fn apply<K>(client: &Client, object: K, cached: &ChildCache) -> Result<bool>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let namespace = object.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = object.meta().name.clone().ok_or(Error::MissingField("metadata.name"))?;
    let live_hash = cached
        .get(&namespace, &name)
        .and_then(|live| live.annotation(DESIRED_HASH_ANNOTATION).map(str::to_owned));
    apply_unless(&Api::namespaced(client.clone(), &namespace), object, live_hash).await
}

/// [`apply`] for objects whose kind is only known at run time (third-party CRDs); reads the live object.
pub async fn apply_dynamic(api: &Api<DynamicObject>, object: DynamicObject) -> Result<bool> {
    let name = object.meta().name.clone().ok_or(Error::MissingField("metadata.name"))?;
    let live_hash = api
        .get_metadata_opt(&name)
        .await?
        .and_then(|live| live.annotations().get(DESIRED_HASH_ANNOTATION).cloned());
    apply_unless(api, object, live_hash).await
}

async fn apply_unless<K>(api: &Api<K>, mut object: K, live_hash: Option<String>) -> Result<bool>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = object.meta().name.clone().ok_or(Error::MissingField("metadata.name"))?;
    let hash = desired_hash(&object)?;
    if live_hash.as_ref() == Some(&hash) {
        return Ok(false);
    }
    object
        .annotations_mut()
        .insert(DESIRED_HASH_ANNOTATION.to_owned(), hash);
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&object))
        .await?;
    Ok(true)
}

/// Deletes the tenant's cached children of kind `K` whose names are not in `keep`. Returns the deleted names.
pub async fn sweep<K>(
    client: &Client,
    namespace: &str,
    tenant: &str,
    cached: &ChildCache,
    keep: &[String],
) -> Result<Vec<String>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    let stale: Vec<String> = cached
        .of_tenant(namespace, tenant)
        .into_iter()
        .filter(|child| !child.deleting && !keep.iter().any(|kept| **kept == *child.name))
        .map(|child| child.name.into())
        .collect();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    for name in &stale {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(stale)
}

/// Deletes every object of a run-time kind matching `selector` (the DNSEndpoint of a tenant that stopped asking).
pub async fn sweep_dynamic(api: &Api<DynamicObject>, selector: &str) -> Result<()> {
    for child in api.list_metadata(&ListParams::default().labels(selector)).await? {
        if child.metadata.deletion_timestamp.is_none() {
            api.delete(&child.name_any(), &DeleteParams::background()).await?;
        }
    }
    Ok(())
}

/// SHA-256 of the object as it would be applied, hex-encoded.
fn desired_hash<K: Serialize>(object: &K) -> Result<String> {
    let bytes = serde_json::to_vec(object).map_err(|source| Error::Serialize {
        what: "a child object",
        source,
    })?;
    Ok(sha256_hex(&bytes))
}

/// Strips owner references from children of kind `K` matching `selector`, so deleting the owner leaves them.
pub async fn orphan<K>(client: &Client, namespace: &str, selector: &str) -> Result<()>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({"metadata": {"ownerReferences": null}});
    for child in api.list_metadata(&ListParams::default().labels(selector)).await? {
        if !child.owner_references().is_empty() {
            api.patch(&child.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
    }
    Ok(())
}

/// How long an answer to "is this CRD installed" is reused.
const DISCOVERY_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the API serves `gvk` (a third-party CRD), asked at most every ten seconds per kind: it changes rarely and
/// every tenant's reconcile needs the answer. A tenant that wants the kind (`wanted`) never takes a cached "missing"
/// for granted, so installing the CRD shows up at its next reconcile.
pub async fn discover(client: &Client, gvk: &GroupVersionKind, wanted: bool) -> Option<ApiResource> {
    type Cache = BTreeMap<String, (std::time::Instant, Option<ApiResource>)>;
    static CACHE: Mutex<Cache> = Mutex::new(BTreeMap::new());
    let key = format!("{}/{}/{}", gvk.group, gvk.version, gvk.kind);
    let cached = CACHE.lock().unwrap_or_else(PoisonError::into_inner).get(&key).cloned();
    if let Some((at, answer)) = cached
        && at.elapsed() < DISCOVERY_TTL
        && (answer.is_some() || !wanted)
    {
        return answer;
    }
    let answer = kube::discovery::oneshot::pinned_kind(client, gvk)
        .await
        .ok()
        .map(|(resource, _)| resource);
    CACHE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(key, (std::time::Instant::now(), answer.clone()));
    answer
}
