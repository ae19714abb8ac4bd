//! The watch caches of the operator's children (ServiceAccounts, ConfigMaps, Services, disruption budgets,
//! NetworkPolicies, StatefulSets, key Secrets), keeping of each child only what reconciles read, indexed by the
//! tenant it belongs to.
//!
//! Kept as Kubernetes objects (kube's reflector store of `PartialObjectMeta`), a child cost about 2 KB even slimmed
//! to the labels and annotations reconciles read, most of it the two label and annotation maps (a map's first entry
//! allocates a node with room for eleven) and the store's copy of its name as the key; with about nine children per
//! tenant that was most of the operator's memory per tenant. A [`CachedChild`] is a few hundred bytes.
//!
//! The cache follows the watch's events: applied and deleted objects, and a relist, which builds a new cache from
//! the listed objects and swaps it in when the list is complete. It is ready once the first list is complete.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher::Event;
use tokio::sync::watch;

use crate::dkim;
use crate::names::{COMPONENT_LABEL, DESIRED_HASH_ANNOTATION, TENANT_LABEL};

/// Labels of a child that reconciles read: whose it is, what it is, and a key Secret's selector and algorithm.
pub const CACHED_LABELS: [&str; 4] = [
    TENANT_LABEL,
    COMPONENT_LABEL,
    dkim::SELECTOR_LABEL,
    dkim::ALGORITHM_LABEL,
];

/// Annotations of a child that reconciles read: the hash of what was applied, a key's domain and public key.
const CACHED_ANNOTATIONS: [&str; 3] = [
    DESIRED_HASH_ANNOTATION,
    dkim::DOMAIN_ANNOTATION,
    dkim::PUBLIC_KEY_ANNOTATION,
];

/// What reconciles read of one child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedChild {
    pub name: Box<str>,
    pub created: Option<Timestamp>,
    pub deleting: bool,
    labels: Box<[(&'static str, Box<str>)]>,
    annotations: Box<[(&'static str, Box<str>)]>,
    /// A StatefulSet's desired and ready replicas.
    pub replicas: Option<Replicas>,
}

/// A StatefulSet's desired (spec) and ready (status) replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    pub desired: Option<i32>,
    pub ready: Option<i32>,
}

impl CachedChild {
    /// What reconciles read of a child with this metadata.
    pub fn of(meta: &ObjectMeta) -> Self {
        fn kept(
            map: Option<&std::collections::BTreeMap<String, String>>,
            keys: &[&'static str],
        ) -> Box<[(&'static str, Box<str>)]> {
            keys.iter()
                .filter_map(|key| Some((*key, map?.get(*key)?.as_str().into())))
                .collect()
        }
        Self {
            name: meta.name.as_deref().unwrap_or_default().into(),
            created: meta.creation_timestamp.as_ref().map(|time| time.0),
            deleting: meta.deletion_timestamp.is_some(),
            labels: kept(meta.labels.as_ref(), &CACHED_LABELS),
            annotations: kept(meta.annotations.as_ref(), &CACHED_ANNOTATIONS),
            replicas: None,
        }
    }

    /// The same child with a StatefulSet's replicas.
    pub fn with_replicas(self, replicas: Replicas) -> Self {
        Self {
            replicas: Some(replicas),
            ..self
        }
    }

    /// The value of label `key`, when it is one of [`CACHED_LABELS`].
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(label, _)| *label == key)
            .map(|(_, value)| &**value)
    }

    /// The value of annotation `key`, when it is one of the annotations kept.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations
            .iter()
            .find(|(annotation, _)| *annotation == key)
            .map(|(_, value)| &**value)
    }
}

/// A child's namespace and name: its key in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ChildKey {
    namespace: Box<str>,
    name: Box<str>,
}

/// A tenant's namespace and name: the key of its children.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TenantKey {
    namespace: Box<str>,
    tenant: Box<str>,
}

/// What a cache keeps of each child: its name and the tenant it is labelled with, and what else reconciles read.
pub trait Summary: Clone {
    fn name(&self) -> &str;
    fn tenant(&self) -> Option<&str>;
}

impl Summary for CachedChild {
    fn name(&self) -> &str {
        &self.name
    }

    fn tenant(&self) -> Option<&str> {
        self.label(TENANT_LABEL)
    }
}

/// Objects cached whole (MTA pods, whose status is read).
impl<K: Resource> Summary for Arc<K> {
    fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }

    fn tenant(&self) -> Option<&str> {
        self.meta().labels.as_ref()?.get(TENANT_LABEL).map(String::as_str)
    }
}

#[derive(Debug)]
struct State<T> {
    children: HashMap<ChildKey, T>,
    /// Names of the children labelled with each tenant.
    by_tenant: HashMap<TenantKey, Vec<Box<str>>>,
}

impl<T> Default for State<T> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            by_tenant: HashMap::new(),
        }
    }
}

impl<T: Summary> State<T> {
    fn apply(&mut self, namespace: &str, child: T) {
        let key = ChildKey {
            namespace: namespace.into(),
            name: child.name().into(),
        };
        // The version it replaces may have named another tenant, or none.
        if let Some(previous) = self.children.remove(&key) {
            self.unindex(namespace, &previous);
        }
        if let Some(tenant) = child.tenant() {
            let key = TenantKey {
                namespace: namespace.into(),
                tenant: tenant.into(),
            };
            self.by_tenant.entry(key).or_default().push(child.name().into());
        }
        self.children.insert(key, child);
    }

    fn delete(&mut self, namespace: &str, name: &str) {
        let key = ChildKey {
            namespace: namespace.into(),
            name: name.into(),
        };
        if let Some(previous) = self.children.remove(&key) {
            self.unindex(namespace, &previous);
        }
    }

    fn unindex(&mut self, namespace: &str, child: &T) {
        let Some(tenant) = child.tenant() else {
            return;
        };
        let key = TenantKey {
            namespace: namespace.into(),
            tenant: tenant.into(),
        };
        if let Some(names) = self.by_tenant.get_mut(&key) {
            names.retain(|name| **name != *child.name());
            if names.is_empty() {
                self.by_tenant.remove(&key);
            }
        }
    }
}

/// The cache of one watch of children, each kept as `T`.
#[derive(Debug)]
pub struct ChildCache<T = CachedChild> {
    current: RwLock<State<T>>,
    /// Filled by a relist in progress; replaces `current` once the list is complete.
    relisting: RwLock<Option<State<T>>>,
    listed: watch::Sender<bool>,
}

impl<T> Default for ChildCache<T> {
    fn default() -> Self {
        Self {
            current: RwLock::default(),
            relisting: RwLock::default(),
            listed: watch::Sender::new(false),
        }
    }
}

impl<T: Summary> ChildCache<T> {
    /// Takes one watch event, each object kept as `summary` gives it.
    pub fn observe<K: Resource>(&self, event: &Event<K>, summary: impl Fn(&K) -> T) {
        let namespace = |object: &K| object.meta().namespace.clone().unwrap_or_default();
        match event {
            Event::Apply(object) => self.write().apply(&namespace(object), summary(object)),
            Event::Delete(object) => {
                let name = object.meta().name.as_deref().unwrap_or_default();
                self.write().delete(&namespace(object), name);
            }
            Event::Init => *self.relisting.write().unwrap_or_else(PoisonError::into_inner) = Some(State::default()),
            Event::InitApply(object) => {
                let mut relisting = self.relisting.write().unwrap_or_else(PoisonError::into_inner);
                match relisting.as_mut() {
                    Some(state) => state.apply(&namespace(object), summary(object)),
                    // A watch restarted without `Init` (never, from kube's watcher) is still cached.
                    None => self.write().apply(&namespace(object), summary(object)),
                }
            }
            Event::InitDone => {
                if let Some(listed) = self.relisting.write().unwrap_or_else(PoisonError::into_inner).take() {
                    *self.write() = listed;
                }
                self.listed.send_replace(true);
            }
        }
    }

    /// Waits until the watch has listed once, so a reconcile never mistakes "not cached yet" for "absent".
    pub async fn wait_until_ready(&self) {
        let mut listed = self.listed.subscribe();
        // The sender lives as long as the cache, which outlives this borrow.
        let _ = listed.wait_for(|listed| *listed).await;
    }

    /// The cached child `name` in `namespace`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<T> {
        let key = ChildKey {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.read().children.get(&key).cloned()
    }

    /// The cached children labelled with `tenant` in `namespace`.
    pub fn of_tenant(&self, namespace: &str, tenant: &str) -> Vec<T> {
        let state = self.read();
        let key = TenantKey {
            namespace: namespace.into(),
            tenant: tenant.into(),
        };
        let Some(names) = state.by_tenant.get(&key) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|name| {
                state.children.get(&ChildKey {
                    namespace: namespace.into(),
                    name: name.clone(),
                })
            })
            .cloned()
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State<T>> {
        self.current.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State<T>> {
        self.current.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;

    use super::*;

    fn child(namespace: &str, name: &str, tenant: Option<&str>) -> ConfigMap {
        let mut map = ConfigMap::default();
        map.metadata.namespace = Some(namespace.to_owned());
        map.metadata.name = Some(name.to_owned());
        map.metadata.labels = tenant.map(|tenant| [(TENANT_LABEL.to_owned(), tenant.to_owned())].into());
        map
    }

    fn feed(cache: &ChildCache, events: impl IntoIterator<Item = Event<ConfigMap>>) {
        for event in events {
            cache.observe(&event, |map: &ConfigMap| CachedChild::of(&map.metadata));
        }
    }

    fn names(cache: &ChildCache, namespace: &str, tenant: &str) -> Vec<String> {
        let mut names: Vec<String> = cache
            .of_tenant(namespace, tenant)
            .iter()
            .map(|child| child.name.to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn children_are_found_by_namespace_and_tenant_label_as_they_change() {
        let cache = ChildCache::default();
        feed(
            &cache,
            [
                Event::Apply(child("mail", "first-mta", Some("first"))),
                Event::Apply(child("mail", "first-extra", Some("first"))),
                Event::Apply(child("mail", "second-mta", Some("second"))),
                Event::Apply(child("other", "first-mta", Some("first"))),
                Event::Apply(child("mail", "unlabelled", None)),
            ],
        );
        assert_eq!(names(&cache, "mail", "first"), ["first-extra", "first-mta"]);
        assert_eq!(names(&cache, "other", "first"), ["first-mta"]);
        assert_eq!(names(&cache, "mail", "second"), ["second-mta"]);
        assert!(cache.get("mail", "unlabelled").is_some());

        // Applied again unchanged, relabelled to another tenant, unlabelled, deleted.
        feed(
            &cache,
            [
                Event::Apply(child("mail", "first-mta", Some("first"))),
                Event::Apply(child("mail", "first-extra", Some("second"))),
            ],
        );
        assert_eq!(names(&cache, "mail", "first"), ["first-mta"]);
        assert_eq!(names(&cache, "mail", "second"), ["first-extra", "second-mta"]);
        feed(&cache, [Event::Apply(child("mail", "second-mta", None))]);
        assert_eq!(names(&cache, "mail", "second"), ["first-extra"]);
        feed(&cache, [Event::Delete(child("mail", "first-extra", Some("second")))]);
        assert!(names(&cache, "mail", "second").is_empty());
        assert!(cache.get("mail", "first-extra").is_none());
        assert!(cache.get("mail", "second-mta").is_some());
    }

    #[tokio::test]
    async fn a_relist_replaces_the_cache_when_the_list_is_complete_and_the_first_makes_it_ready() {
        let cache = ChildCache::default();
        feed(
            &cache,
            [Event::Init, Event::InitApply(child("mail", "gone", Some("first")))],
        );
        // Not ready before the first list is complete.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), cache.wait_until_ready()).await;
        assert!(waiting.is_err());
        feed(&cache, [Event::InitDone]);
        cache.wait_until_ready().await;
        assert_eq!(names(&cache, "mail", "first"), ["gone"]);

        // The watch restarts: while it lists, lookups answer from the old cache.
        feed(
            &cache,
            [
                Event::Init,
                Event::InitApply(child("mail", "kept", Some("first"))),
                Event::InitApply(child("mail", "new", Some("second"))),
            ],
        );
        assert_eq!(names(&cache, "mail", "first"), ["gone"]);
        assert!(cache.get("mail", "kept").is_none());
        feed(&cache, [Event::InitDone]);
        // A child deleted while the watch was down is forgotten.
        assert_eq!(names(&cache, "mail", "first"), ["kept"]);
        assert_eq!(names(&cache, "mail", "second"), ["new"]);
        assert!(cache.get("mail", "gone").is_none());
    }

    #[test]
    fn a_child_keeps_only_what_reconciles_read() {
        let mut secret = child("mail", "key", Some("first"));
        let labels = secret.metadata.labels.get_or_insert_default();
        labels.insert(COMPONENT_LABEL.to_owned(), "dkim-key".to_owned());
        labels.insert("team".to_owned(), "mail".to_owned());
        secret.metadata.annotations = Some(
            [
                (DESIRED_HASH_ANNOTATION.to_owned(), "abc".to_owned()),
                (dkim::DOMAIN_ANNOTATION.to_owned(), "example.org".to_owned()),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                    "{}".to_owned(),
                ),
            ]
            .into(),
        );
        let cached = CachedChild::of(&secret.metadata);
        assert_eq!(cached.label(TENANT_LABEL), Some("first"));
        assert_eq!(cached.label(COMPONENT_LABEL), Some("dkim-key"));
        assert_eq!(cached.label("team"), None);
        assert_eq!(cached.annotation(DESIRED_HASH_ANNOTATION), Some("abc"));
        assert_eq!(cached.annotation(dkim::DOMAIN_ANNOTATION), Some("example.org"));
        assert_eq!(
            cached.annotation("kubectl.kubernetes.io/last-applied-configuration"),
            None
        );
        assert_eq!(cached.annotations.len(), 2);
        assert!(!cached.deleting);
        assert_eq!(cached.replicas, None);
    }
}
