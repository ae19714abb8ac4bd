//! Who holds a contested sending domain, and which tenants must look again when one changes. Decided from the cached
//! tenants alone (spec, status and creation time, all stored by the apiserver), so a restarted operator, or another
//! replica, decides the same; functions over the tenant cache, like the address rule in `status`.
//!
//! A domain and every DNS name derived from it (`<selector>._domainkey.<domain>`, the SPF record at the domain,
//! `_dmarc.<domain>`) belong to one tenant at a time. Selector names are single DNS labels and domain names cannot
//! contain `_`, so two tenants can only produce the same record name by sharing the domain itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use securemail_api::SecureMailTenant;
use securemail_api::tenant::DkimSelectorState;

/// Order of claims between tenants: the older tenant first, then namespace/name, so every pass decides alike.
pub fn claim_order(tenant: &SecureMailTenant) -> (Option<Timestamp>, &str, &str) {
    (
        tenant.metadata.creation_timestamp.as_ref().map(|time| time.0),
        tenant.metadata.namespace.as_deref().unwrap_or_default(),
        tenant.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Domains the tenant's status shows it holds: it signs with, or publishes, a DKIM key for them. Retiring keys do not
/// count: a tenant that lost or dropped a domain keeps those only until their record may go.
pub fn recorded_domains(tenant: &SecureMailTenant) -> BTreeSet<&str> {
    tenant
        .status
        .iter()
        .flat_map(|status| &status.dkim_selectors)
        .filter(|selector| selector.state != DkimSelectorState::Retiring)
        .map(|selector| selector.domain.as_str())
        .collect()
}

/// Domains of `tenant` that another tenant holds, mapped to that tenant's `namespace/name`.
///
/// Among the tenants whose spec lists a domain (in namespaces the operator manages: elsewhere a tenant gets nothing
/// and must not block anyone), the holder is the one whose status records keys for it, so a tenant never loses a
/// domain it already signs for to an older tenant that lists it later; when none or several do, the oldest claim
/// ([`claim_order`]) decides. A tenant being deleted still holds its domains until it is gone: its draining pods
/// sign with them.
pub fn domains_held_elsewhere(
    tenant: &SecureMailTenant,
    all: &[impl AsRef<SecureMailTenant>],
    manages_namespace: impl Fn(&str) -> bool,
) -> BTreeMap<String, String> {
    let mine: BTreeSet<&str> = tenant.spec.domains.iter().map(|domain| domain.name.as_str()).collect();
    let my_records = recorded_domains(tenant);
    let mut holders: BTreeMap<&str, &SecureMailTenant> = BTreeMap::new();
    for other in all.iter().map(AsRef::as_ref) {
        if other.metadata.uid == tenant.metadata.uid
            || !manages_namespace(other.metadata.namespace.as_deref().unwrap_or_default())
        {
            continue;
        }
        let mut records = None;
        for domain in other.spec.domains.iter().map(|domain| domain.name.as_str()) {
            let Some(domain) = mine.get(domain).copied() else {
                continue;
            };
            // Status is read only for a shared domain: most tenants share none.
            let records = records.get_or_insert_with(|| recorded_domains(other));
            if rank(records, domain, other) >= rank(&my_records, domain, tenant) {
                continue;
            }
            let better = holders
                .get(domain)
                .is_none_or(|held| rank(records, domain, other) < rank(&recorded_domains(held), domain, held));
            if better {
                holders.insert(domain, other);
            }
        }
    }
    holders
        .into_iter()
        .map(|(domain, holder)| {
            let (_, namespace, name) = claim_order(holder);
            (domain.to_owned(), format!("{namespace}/{name}"))
        })
        .collect()
}

/// A claimant's place in the line for `domain`: recorded keys first, then the oldest claim.
fn rank<'t>(
    records: &BTreeSet<&str>,
    domain: &str,
    claimant: &'t SecureMailTenant,
) -> (bool, (Option<Timestamp>, &'t str, &'t str)) {
    (!records.contains(domain), claim_order(claimant))
}

/// What of a tenant can change who holds a contested domain or address.
#[derive(Debug, PartialEq, Eq)]
struct Claims<'a> {
    domains: BTreeSet<&'a str>,
    addresses: BTreeSet<&'a str>,
    recorded: BTreeSet<&'a str>,
    deleting: bool,
}

impl<'a> Claims<'a> {
    fn of(tenant: &'a SecureMailTenant) -> Self {
        Self {
            domains: tenant.spec.domains.iter().map(|domain| domain.name.as_str()).collect(),
            addresses: tenant
                .spec
                .ip_pool
                .addresses
                .iter()
                .map(|address| address.address.as_str())
                .collect(),
            recorded: recorded_domains(tenant),
            deleting: tenant.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// Other tenants that claim a domain or address `before` or `after` claimed, when the change between the two (a
/// cached tenant and its new version; `after` is `None` once it is gone) can change who holds it. They are
/// reconciled again, so a released domain or address goes to the next claimant at once instead of at its next
/// periodic pass.
pub fn tenants_to_recheck(
    before: Option<&SecureMailTenant>,
    after: Option<&SecureMailTenant>,
    all: &[Arc<SecureMailTenant>],
) -> Vec<ObjectRef<SecureMailTenant>> {
    let (old, new) = (before.map(Claims::of), after.map(Claims::of));
    if old == new {
        return Vec::new();
    }
    let changed = after.or(before).and_then(|tenant| tenant.metadata.uid.as_deref());
    let mut domains = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    for claims in old.iter().chain(new.iter()) {
        domains.extend(claims.domains.iter().copied());
        addresses.extend(claims.addresses.iter().copied());
    }
    all.iter()
        .filter(|other| other.metadata.uid.as_deref() != changed)
        .filter(|other| {
            other
                .spec
                .domains
                .iter()
                .any(|domain| domains.contains(domain.name.as_str()))
                || other
                    .spec
                    .ip_pool
                    .addresses
                    .iter()
                    .any(|address| addresses.contains(address.address.as_str()))
        })
        .map(|other| ObjectRef::from_obj(other.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use securemail_api::tenant::{DkimAlgorithm, DkimSelectorStatus, SecureMailTenantStatus};

    fn tenant(namespace: &str, name: &str, created_secs: i64, domains: &[&str]) -> SecureMailTenant {
        let mut tenant: SecureMailTenant = serde_json::from_value(serde_json::json!({
            "apiVersion": "securemail.io/v1alpha1",
            "kind": "SecureMailTenant",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("{namespace}/{name}")},
            "spec": {
                "domains": domains.iter().map(|d| serde_json::json!({"name": d})).collect::<Vec<_>>(),
                "ipPool": {"addresses": [{"address": format!("192.0.2.{created_secs}"), "hostname": "mta.example.org"}]},
                "submission": {"tls": {"secretName": "s"}, "clientCertificates": {"caSecretName": "ca"}}
            }
        }))
        .expect("tenant");
        tenant.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created_secs).expect("time")));
        tenant
    }

    /// Status that records a key of `state` for each of `domains`.
    fn holding(mut tenant: SecureMailTenant, domains: &[&str], state: DkimSelectorState) -> SecureMailTenant {
        tenant.status = Some(SecureMailTenantStatus {
            dkim_selectors: domains
                .iter()
                .map(|domain| DkimSelectorStatus {
                    domain: (*domain).to_owned(),
                    selector: "sm-rsa-1".to_owned(),
                    algorithm: DkimAlgorithm::RsaSha256,
                    state,
                    created: None,
                    since: None,
                    replaces: None,
                })
                .collect(),
            ..SecureMailTenantStatus::default()
        });
        tenant
    }

    fn every_namespace(_: &str) -> bool {
        true
    }

    fn held(tenant: &SecureMailTenant, all: &[Arc<SecureMailTenant>]) -> Vec<(String, String)> {
        domains_held_elsewhere(tenant, all, every_namespace)
            .into_iter()
            .collect()
    }

    fn pair(domain: &str, holder: &str) -> (String, String) {
        (domain.to_owned(), holder.to_owned())
    }

    #[test]
    fn the_oldest_claim_holds_a_shared_domain_and_other_domains_stay_with_the_later_tenant() {
        let first = tenant("a", "first", 100, &["shared.example", "first.example"]);
        let second = tenant("b", "second", 200, &["own.example", "shared.example"]);
        let all = [Arc::new(second.clone()), Arc::new(first.clone())];
        assert!(held(&first, &all).is_empty());
        assert_eq!(held(&second, &all), [pair("shared.example", "a/first")]);
    }

    #[test]
    fn equal_creation_times_are_decided_by_namespace_then_name() {
        let x = tenant("b", "a", 100, &["shared.example"]);
        let y = tenant("a", "z", 100, &["shared.example"]);
        let all = [Arc::new(x.clone()), Arc::new(y.clone())];
        assert_eq!(held(&x, &all), [pair("shared.example", "a/z")]);
        assert!(held(&y, &all).is_empty());
    }

    #[test]
    fn a_tenant_that_holds_keys_for_a_domain_keeps_it_against_an_older_tenant_that_lists_it_later() {
        let older = tenant("a", "older", 100, &["shared.example"]);
        let holder = holding(
            tenant("b", "holder", 200, &["shared.example"]),
            &["shared.example"],
            DkimSelectorState::Active,
        );
        let all = [Arc::new(older.clone()), Arc::new(holder.clone())];
        assert_eq!(held(&older, &all), [pair("shared.example", "b/holder")]);
        assert!(held(&holder, &all).is_empty());
    }

    #[test]
    fn retiring_keys_do_not_hold_a_domain_and_two_holders_fall_back_to_the_oldest() {
        let older = tenant("a", "older", 100, &["shared.example"]);
        let retiring = holding(
            tenant("b", "later", 200, &["shared.example"]),
            &["shared.example"],
            DkimSelectorState::Retiring,
        );
        let all = [Arc::new(older.clone()), Arc::new(retiring.clone())];
        assert_eq!(held(&retiring, &all), [pair("shared.example", "a/older")]);

        // Both made keys (each reconciled before seeing the other): the older keeps the domain.
        let older = holding(older, &["shared.example"], DkimSelectorState::Active);
        let later = holding(retiring, &["shared.example"], DkimSelectorState::Published);
        let all = [Arc::new(later.clone()), Arc::new(older.clone())];
        assert!(held(&older, &all).is_empty());
        assert_eq!(held(&later, &all), [pair("shared.example", "a/older")]);
    }

    #[test]
    fn the_holder_is_the_best_of_several_claimants() {
        let third = tenant("c", "third", 300, &["shared.example"]);
        let second = tenant("b", "second", 200, &["shared.example"]);
        let first = tenant("a", "first", 100, &["shared.example"]);
        let all = [
            Arc::new(third.clone()),
            Arc::new(second.clone()),
            Arc::new(first.clone()),
        ];
        assert_eq!(held(&third, &all), [pair("shared.example", "a/first")]);
        assert_eq!(held(&second, &all), [pair("shared.example", "a/first")]);
    }

    #[test]
    fn a_released_domain_goes_to_the_next_claimant() {
        let first = tenant("a", "first", 100, &["shared.example"]);
        let second = tenant("b", "second", 200, &["shared.example"]);
        // The first tenant deleted (gone from the cache) or the domain dropped from its spec.
        assert!(held(&second, &[Arc::new(second.clone())]).is_empty());
        let dropped = tenant("a", "first", 100, &["other.example"]);
        assert!(held(&second, &[Arc::new(dropped), Arc::new(second.clone())]).is_empty());
        // Still being deleted (draining): it holds on.
        let mut deleting = first;
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(500).expect("time")));
        assert_eq!(
            held(&second, &[Arc::new(deleting), Arc::new(second.clone())]),
            [pair("shared.example", "a/first")]
        );
    }

    #[test]
    fn a_tenant_in_an_unmanaged_namespace_blocks_nobody() {
        let outside = tenant("outside", "first", 100, &["shared.example"]);
        let inside = tenant("inside", "second", 200, &["shared.example"]);
        let all = [Arc::new(outside), Arc::new(inside.clone())];
        assert!(domains_held_elsewhere(&inside, &all, |namespace| namespace == "inside").is_empty());
    }

    #[test]
    fn a_change_that_can_move_a_claim_rechecks_exactly_the_tenants_that_share_it() {
        let first = tenant("a", "first", 100, &["shared.example"]);
        let second = tenant("b", "second", 200, &["shared.example", "own.example"]);
        let unrelated = tenant("c", "unrelated", 300, &["unrelated.example"]);
        let mut same_address = tenant("d", "address", 400, &["fourth.example"]);
        same_address.spec.ip_pool.addresses[0].address = first.spec.ip_pool.addresses[0].address.clone();
        let all = [
            Arc::new(first.clone()),
            Arc::new(second.clone()),
            Arc::new(unrelated),
            Arc::new(same_address),
        ];
        let names =
            |refs: Vec<ObjectRef<SecureMailTenant>>| -> Vec<String> { refs.into_iter().map(|r| r.name).collect() };

        // Deleted, or the domain dropped from the spec: the other claimants look again.
        assert_eq!(
            names(tenants_to_recheck(Some(&first), None, &all)),
            ["second", "address"]
        );
        let dropped = tenant("a", "first", 100, &["other.example"]);
        assert_eq!(
            names(tenants_to_recheck(Some(&first), Some(&dropped), &all)),
            ["second", "address"]
        );
        // Keys recorded in status, or deletion begun: can move the claim too.
        let recorded = holding(first.clone(), &["shared.example"], DkimSelectorState::Active);
        assert_eq!(
            names(tenants_to_recheck(Some(&first), Some(&recorded), &all)),
            ["second", "address"]
        );
        // Nothing that decides a claim changed (a label, another status field): nobody is bothered.
        let mut relabelled = first.clone();
        relabelled.metadata.labels = Some(BTreeMap::from([("team".to_owned(), "x".to_owned())]));
        assert!(tenants_to_recheck(Some(&first), Some(&relabelled), &all).is_empty());
        // A tenant of its own changing: nobody else.
        let own = tenant("c", "unrelated", 300, &["renamed.example"]);
        let cached = tenant("c", "unrelated", 300, &["unrelated.example"]);
        assert!(tenants_to_recheck(Some(&cached), Some(&own), &all).is_empty());
    }
}
