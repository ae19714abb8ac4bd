//! Server-side apply of children under one field manager, skipping objects whose last applied content is
//! unchanged (a no-op reconcile makes zero writes), and the orphan sweep of labelled children not built this pass.

use std::fmt::Debug;

use aws_lc_rs::digest::{SHA256, digest};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::names::{DESIRED_HASH_ANNOTATION, MANAGER};
use crate::{Error, Result};

/// Applies `object` unless the live object carries the same desired-hash. Returns whether it wrote.
pub async fn apply<K>(client: &Client, object: K) -> Result<bool>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
{
    let namespace = object.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    apply_with(&Api::namespaced(client.clone(), &namespace), object).await
}

/// [`apply`] for objects whose kind is only known at run time (third-party CRDs).
pub async fn apply_dynamic(api: &Api<DynamicObject>, object: DynamicObject) -> Result<bool> {
    apply_with(api, object).await
}

async fn apply_with<K>(api: &Api<K>, mut object: K) -> Result<bool>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = object.meta().name.clone().ok_or(Error::MissingField("metadata.name"))?;
    let hash = desired_hash(&object)?;
    if let Some(live) = api.get_metadata_opt(&name).await?
        && live.annotations().get(DESIRED_HASH_ANNOTATION) == Some(&hash)
    {
        return Ok(false);
    }
    object
        .annotations_mut()
        .insert(DESIRED_HASH_ANNOTATION.to_owned(), hash);
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&object))
        .await?;
    Ok(true)
}

/// Deletes children of kind `K` matching `selector` whose names are not in `keep`. Returns the deleted names.
pub async fn sweep<K>(client: &Client, namespace: &str, selector: &str, keep: &[String]) -> Result<Vec<String>>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + DeserializeOwned + Clone + Debug,
{
    sweep_with(&Api::<K>::namespaced(client.clone(), namespace), selector, keep).await
}

/// [`sweep`] for objects whose kind is only known at run time.
pub async fn sweep_dynamic(api: &Api<DynamicObject>, selector: &str, keep: &[String]) -> Result<Vec<String>> {
    sweep_with(api, selector, keep).await
}

async fn sweep_with<K>(api: &Api<K>, selector: &str, keep: &[String]) -> Result<Vec<String>>
where
    K: Resource + DeserializeOwned + Clone + Debug,
{
    let mut deleted = Vec::new();
    for child in api.list_metadata(&ListParams::default().labels(selector)).await? {
        let name = child.name_any();
        if !keep.contains(&name) && child.metadata.deletion_timestamp.is_none() {
            api.delete(&name, &DeleteParams::background()).await?;
            deleted.push(name);
        }
    }
    Ok(deleted)
}

/// SHA-256 of the object as it would be applied, hex-encoded.
fn desired_hash<K: Serialize>(object: &K) -> Result<String> {
    let bytes = serde_json::to_vec(object).map_err(|source| Error::Serialize {
        what: "a child object",
        source,
    })?;
    Ok(digest(&SHA256, &bytes)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
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
