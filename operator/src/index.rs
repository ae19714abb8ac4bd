//! The tenants by the addresses and domains they claim, beside the tenant cache, so the conflict rules ask only the
//! tenants that share a claim with the one being reconciled, and a tenant's change rechecks only those: scanning
//! every cached tenant made each reconcile O(tenants) and converging O(tenants²). (Children are found by tenant in
//! their own caches, `child_cache`.)
//!
//! The index follows the events of the tenant watch: it is told each event before the cache takes it, with the
//! cached version the event replaces, so it drops exactly the claims that version had. A relist builds a new index
//! from the listed tenants and swaps it in when the list is complete, as the cache does. Lookups return the cached
//! tenants, whose specs the rules read again, so an answer is never staler than the cache.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, PoisonError, RwLock};

use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::Event;
use securemail_api::SecureMailTenant;

/// Objects of kind `K` by the keys `keys` gives each, remembered as the `Item` that `item` gives.
pub struct Index<K, Key, Item> {
    keys: fn(&K) -> Vec<Key>,
    item: fn(&K) -> Item,
    state: RwLock<State<Key, Item>>,
}

impl<K, Key, Item> std::fmt::Debug for Index<K, Key, Item> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Index")
            .field("keys", &state.entries.len())
            .field("relisting", &state.relisting.is_some())
            .finish()
    }
}

struct State<Key, Item> {
    entries: HashMap<Key, Vec<Item>>,
    /// Filled by a relist in progress; replaces `entries` once the list is complete.
    relisting: Option<HashMap<Key, Vec<Item>>>,
}

impl<K, Key: Eq + Hash, Item: PartialEq + Clone> Index<K, Key, Item> {
    pub fn new(keys: fn(&K) -> Vec<Key>, item: fn(&K) -> Item) -> Self {
        Self {
            keys,
            item,
            state: RwLock::new(State {
                entries: HashMap::new(),
                relisting: None,
            }),
        }
    }

    /// Takes one watch event; `cached` is the version of the object the cache holds before it takes the event.
    pub fn observe(&self, event: &Event<K>, cached: Option<&K>) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            Event::Apply(object) => {
                if let Some(cached) = cached {
                    self.remove(&mut state.entries, cached);
                }
                self.insert(&mut state.entries, object);
            }
            Event::Delete(object) => self.remove(&mut state.entries, cached.unwrap_or(object)),
            Event::Init => state.relisting = Some(HashMap::new()),
            Event::InitApply(object) => {
                // A watch restarted without `Init` (never, from kube's watcher) would still be indexed.
                let State { entries, relisting } = &mut *state;
                self.insert(relisting.as_mut().unwrap_or(entries), object);
            }
            Event::InitDone => {
                if let Some(listed) = state.relisting.take() {
                    state.entries = listed;
                }
            }
        }
    }

    /// What is indexed under `key`.
    pub fn get(&self, key: &Key) -> Vec<Item> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.entries.get(key).cloned().unwrap_or_default()
    }

    fn insert(&self, entries: &mut HashMap<Key, Vec<Item>>, object: &K) {
        let item = (self.item)(object);
        for key in (self.keys)(object) {
            let items = entries.entry(key).or_default();
            if !items.contains(&item) {
                items.push(item.clone());
            }
        }
    }

    fn remove(&self, entries: &mut HashMap<Key, Vec<Item>>, object: &K) {
        let item = (self.item)(object);
        for key in (self.keys)(object) {
            if let Some(items) = entries.get_mut(&key) {
                items.retain(|indexed| indexed != &item);
                if items.is_empty() {
                    entries.remove(&key);
                }
            }
        }
    }
}

/// What a tenant claims that no other tenant may have at the same time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Claim {
    Address(String),
    Domain(String),
}

/// Every claim in a tenant's spec.
pub fn claims(tenant: &SecureMailTenant) -> Vec<Claim> {
    let addresses = tenant
        .spec
        .ip_pool
        .addresses
        .iter()
        .map(|address| Claim::Address(address.address.clone()));
    let domains = tenant
        .spec
        .domains
        .iter()
        .map(|domain| Claim::Domain(domain.name.clone()));
    addresses.chain(domains).collect()
}

/// Tenants by the addresses and domains their specs claim.
pub type ClaimIndex = Index<SecureMailTenant, Claim, ObjectRef<SecureMailTenant>>;

pub fn claim_index() -> ClaimIndex {
    // Without the uid and resource version `from_obj` copies in: lookups ignore them, and they cost memory per claim.
    Index::new(claims, |tenant| {
        let name = tenant.metadata.name.as_deref().unwrap_or_default();
        ObjectRef::new(name).within(tenant.metadata.namespace.as_deref().unwrap_or_default())
    })
}

/// The cached tenants that claim any of `claims`, each once.
pub fn claimants(
    index: &ClaimIndex,
    tenants: &Store<SecureMailTenant>,
    claims: &[Claim],
) -> Vec<Arc<SecureMailTenant>> {
    let refs: HashSet<ObjectRef<SecureMailTenant>> = claims.iter().flat_map(|claim| index.get(claim)).collect();
    refs.iter().filter_map(|tenant| tenants.get(tenant)).collect()
}

#[cfg(test)]
mod tests {
    use kube::Resource;
    use kube::runtime::reflector;

    use super::*;

    fn tenant(name: &str, addresses: &[&str], domains: &[&str]) -> SecureMailTenant {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "securemail.io/v1alpha1",
            "kind": "SecureMailTenant",
            "metadata": {"name": name, "namespace": "mail", "uid": name},
            "spec": {
                "domains": domains.iter().map(|d| serde_json::json!({"name": d})).collect::<Vec<_>>(),
                "ipPool": {"addresses": addresses.iter()
                    .map(|a| serde_json::json!({"address": a, "hostname": "mta.example.org"}))
                    .collect::<Vec<_>>()},
                "submission": {"tls": {"secretName": "s"}, "clientCertificates": {"caSecretName": "ca"}}
            }
        }))
        .expect("tenant")
    }

    /// A cache and its index fed the same events, in the order the controller's watch streams feed them.
    struct Followed<K: Resource<DynamicType = ()> + Clone + 'static, Key, Item> {
        store: Store<K>,
        writer: reflector::store::Writer<K>,
        index: Arc<Index<K, Key, Item>>,
    }

    impl<K, Key, Item> Followed<K, Key, Item>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
        Key: Eq + Hash,
        Item: PartialEq + Clone,
    {
        fn new(index: Index<K, Key, Item>) -> Self {
            let (store, writer) = reflector::store();
            Self {
                store,
                writer,
                index: Arc::new(index),
            }
        }

        fn feed(&mut self, events: impl IntoIterator<Item = Event<K>>) {
            for event in events {
                let cached = match &event {
                    Event::Apply(object) | Event::Delete(object) => self.store.get(&ObjectRef::from_obj(object)),
                    _ => None,
                };
                self.index.observe(&event, cached.as_deref());
                self.writer.apply_watcher_event(&event);
            }
        }
    }

    fn names(tenants: Vec<Arc<SecureMailTenant>>) -> Vec<String> {
        let mut names: Vec<String> = tenants
            .iter()
            .map(|tenant| tenant.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        names
    }

    fn claimants_of(
        followed: &Followed<SecureMailTenant, Claim, ObjectRef<SecureMailTenant>>,
        claim: Claim,
    ) -> Vec<String> {
        names(claimants(&followed.index, &followed.store, &[claim]))
    }

    fn address(address: &str) -> Claim {
        Claim::Address(address.to_owned())
    }

    fn domain(domain: &str) -> Claim {
        Claim::Domain(domain.to_owned())
    }

    #[test]
    fn tenants_are_found_by_what_they_claim_as_they_are_added_changed_and_deleted() {
        let mut followed = Followed::new(claim_index());
        let first = tenant("first", &["192.0.2.1"], &["a.example"]);
        let second = tenant("second", &["192.0.2.1", "192.0.2.2"], &["b.example"]);
        followed.feed([Event::Apply(first.clone()), Event::Apply(second.clone())]);
        assert_eq!(claimants_of(&followed, address("192.0.2.1")), ["first", "second"]);
        assert_eq!(claimants_of(&followed, domain("a.example")), ["first"]);
        assert!(claimants_of(&followed, address("192.0.2.9")).is_empty());

        // The first tenant drops its address and takes the second's domain: only what it claims now finds it.
        followed.feed([Event::Apply(tenant("first", &["192.0.2.3"], &["b.example"]))]);
        assert_eq!(claimants_of(&followed, address("192.0.2.1")), ["second"]);
        assert_eq!(claimants_of(&followed, address("192.0.2.3")), ["first"]);
        assert!(claimants_of(&followed, domain("a.example")).is_empty());
        assert_eq!(claimants_of(&followed, domain("b.example")), ["first", "second"]);

        // Deleted (the event carries the object as it was last seen, which need not be the cached version).
        followed.feed([Event::Delete(second)]);
        assert!(claimants_of(&followed, address("192.0.2.1")).is_empty());
        assert!(claimants_of(&followed, address("192.0.2.2")).is_empty());
        assert_eq!(claimants_of(&followed, domain("b.example")), ["first"]);
        assert_eq!(followed.index.get(&domain("b.example")).len(), 1);
    }

    #[test]
    fn a_relist_replaces_the_index_when_the_list_is_complete() {
        let mut followed = Followed::new(claim_index());
        followed.feed([
            Event::Apply(tenant("gone", &["192.0.2.1"], &["a.example"])),
            Event::Apply(tenant("kept", &["192.0.2.2"], &["b.example"])),
        ]);
        // The watch restarts: while it lists, lookups answer from the old index (the cache, too, is the old one).
        followed.feed([
            Event::Init,
            Event::InitApply(tenant("kept", &["192.0.2.2"], &["c.example"])),
            Event::InitApply(tenant("new", &["192.0.2.1"], &[])),
        ]);
        assert_eq!(claimants_of(&followed, address("192.0.2.1")), ["gone"]);
        assert!(claimants_of(&followed, domain("c.example")).is_empty());
        followed.feed([Event::InitDone]);
        // A tenant deleted while the watch was down is forgotten, the others are found by what they claim now.
        assert_eq!(claimants_of(&followed, address("192.0.2.1")), ["new"]);
        assert!(claimants_of(&followed, domain("a.example")).is_empty());
        assert!(claimants_of(&followed, domain("b.example")).is_empty());
        assert_eq!(claimants_of(&followed, domain("c.example")), ["kept"]);
    }
}
