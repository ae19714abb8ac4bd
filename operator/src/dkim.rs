//! DKIM selector lifecycle. Keys live in Secrets (the only copy of private keys); `status.dkimSelectors` records each
//! selector's state. The plan is pure: given the spec, the recorded selectors, the stored keys and the time, it says
//! which keys to generate, which to retire and which to sign with.
//!
//! Lifecycle of a selector: Active (signing, record published) → after `rotationPeriodDays` a successor is generated
//! as Published (record out, not signing) → after [`PUBLISH_DELAY`] the successor becomes Active and the old one
//! Retiring (record kept so mail in flight still verifies) → after [`RETIRE_OVERLAP`] the old key is deleted.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use securemail_api::tenant::{DkimAlgorithm, DkimSelectorState, DkimSelectorStatus, DomainSpec};

/// Field of a key Secret holding the PKCS#8 PEM private key.
pub const PRIVATE_KEY_FIELD: &str = "private.pem";
/// Annotation on a key Secret with its public key (the DKIM record's `p=`), so publishing the record never needs
/// the private key.
pub const PUBLIC_KEY_ANNOTATION: &str = "securemail.io/dkim-public-key";
/// Annotation on a key Secret naming its signing domain.
pub const DOMAIN_ANNOTATION: &str = "securemail.io/dkim-domain";
/// Label on a key Secret naming its selector.
pub const SELECTOR_LABEL: &str = "securemail.io/dkim-selector";
/// Label on a key Secret naming its algorithm.
pub const ALGORITHM_LABEL: &str = "securemail.io/dkim-algorithm";
/// How long a successor's record is published before it signs: time for the tenant (or external-dns) to publish it
/// and for resolvers' caches to pick it up.
pub const PUBLISH_DELAY: SignedDuration = SignedDuration::from_hours(48);
/// How long a retired selector's record stays after it stopped signing, so queued and in-flight mail still verifies.
pub const RETIRE_OVERLAP: SignedDuration = SignedDuration::from_hours(7 * 24);

/// A key found in a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub domain: String,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    pub secret_name: String,
    pub created: Timestamp,
}

/// A key the plan wants generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub domain: String,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    pub rsa_bits: u32,
}

/// Active selectors that replaced a lost key less than [`PUBLISH_DELAY`] ago: their records may not be published yet.
pub fn recent_replacements(selectors: &[DkimSelectorStatus], now: Timestamp) -> Vec<&DkimSelectorStatus> {
    selectors
        .iter()
        .filter(|selector| selector.state == DkimSelectorState::Active && selector.replaces.is_some())
        .filter(|selector| elapsed(selector.since.as_ref(), now) < PUBLISH_DELAY)
        .collect()
}

/// Why a selector was replaced outside the rotation schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplacedKey {
    pub domain: String,
    pub lost_selector: String,
    pub new_selector: String,
}

/// What to do about DKIM for one tenant now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DkimPlan {
    /// The new `status.dkimSelectors`.
    pub selectors: Vec<DkimSelectorStatus>,
    pub generate: Vec<NewKey>,
    /// Selectors whose Secrets go (retired past the overlap, or no longer wanted).
    pub delete: Vec<(String, String)>,
    /// Active keys whose Secret disappeared and were replaced by a new selector.
    pub replaced: Vec<ReplacedKey>,
}

/// Short algorithm tag used in selector names.
pub fn algorithm_tag(algorithm: DkimAlgorithm) -> &'static str {
    match algorithm {
        DkimAlgorithm::RsaSha256 => "rsa",
        DkimAlgorithm::Ed25519Sha256 => "ed",
    }
}

/// Label value of an algorithm on key Secrets.
pub fn algorithm_label(algorithm: DkimAlgorithm) -> &'static str {
    match algorithm {
        DkimAlgorithm::RsaSha256 => "rsa-sha256",
        DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
    }
}

/// Parses a key Secret's algorithm label.
pub fn parse_algorithm_label(label: &str) -> Option<DkimAlgorithm> {
    match label {
        "rsa-sha256" => Some(DkimAlgorithm::RsaSha256),
        "ed25519-sha256" => Some(DkimAlgorithm::Ed25519Sha256),
        _ => None,
    }
}

/// Plans the DKIM selectors of a tenant.
pub fn plan(domains: &[DomainSpec], recorded: &[DkimSelectorStatus], stored: &[StoredKey], now: Timestamp) -> DkimPlan {
    let mut plan = DkimPlan::default();
    let stored_by_selector: BTreeMap<(&str, &str), &StoredKey> = stored
        .iter()
        .map(|key| ((key.domain.as_str(), key.selector.as_str()), key))
        .collect();
    let mut wanted: Vec<(&str, DkimAlgorithm)> = Vec::new();

    for domain in domains {
        for &algorithm in &domain.dkim.algorithms {
            wanted.push((domain.name.as_str(), algorithm));
            plan_one(&mut plan, domain, algorithm, recorded, stored, &stored_by_selector, now);
        }
    }

    // Selectors of domains or algorithms no longer in the spec: stop signing, keep the record for the overlap.
    for entry in recorded {
        if wanted.contains(&(entry.domain.as_str(), entry.algorithm)) {
            continue;
        }
        let Some(key) = stored_by_selector.get(&(entry.domain.as_str(), entry.selector.as_str())) else {
            continue;
        };
        retire_or_delete(&mut plan, entry, key, now);
    }
    plan
}

fn plan_one(
    plan: &mut DkimPlan,
    domain: &DomainSpec,
    algorithm: DkimAlgorithm,
    recorded: &[DkimSelectorStatus],
    stored: &[StoredKey],
    stored_by_selector: &BTreeMap<(&str, &str), &StoredKey>,
    now: Timestamp,
) {
    let name = domain.name.as_str();
    let mine = |entry: &&DkimSelectorStatus| entry.domain == name && entry.algorithm == algorithm;
    let mut next_serial = next_serial(
        recorded.iter().filter(mine).map(|entry| entry.selector.as_str()).chain(
            stored
                .iter()
                .filter(|key| key.domain == name && key.algorithm == algorithm)
                .map(|key| key.selector.as_str()),
        ),
    );
    let mut new_selector = |plan: &mut DkimPlan| {
        let selector = format!(
            "{}-{}-{next_serial}",
            domain.dkim.selector_prefix,
            algorithm_tag(algorithm)
        );
        next_serial += 1;
        plan.generate.push(NewKey {
            domain: name.to_owned(),
            selector: selector.clone(),
            algorithm,
            rsa_bits: domain.dkim.rsa_bits,
        });
        selector
    };
    let key_of = |entry: &DkimSelectorStatus| stored_by_selector.get(&(name, entry.selector.as_str())).copied();

    let recorded_mine: Vec<&DkimSelectorStatus> = recorded.iter().filter(mine).collect();
    let mut active = recorded_mine
        .iter()
        .find(|entry| entry.state == DkimSelectorState::Active)
        .and_then(|entry| key_of(entry).map(|key| ((*entry).clone(), key)));
    let published = recorded_mine
        .iter()
        .find(|entry| entry.state == DkimSelectorState::Published)
        .and_then(|entry| key_of(entry).map(|key| ((*entry).clone(), key)));

    if active.is_none() {
        let lost = recorded_mine
            .iter()
            .find(|entry| entry.state == DkimSelectorState::Active);
        // A key Secret that exists without a status record (the operator stopped between creating it and writing
        // status) is adopted, never regenerated.
        let adoptable = stored
            .iter()
            .filter(|key| key.domain == name && key.algorithm == algorithm)
            .filter(|key| !recorded_mine.iter().any(|entry| entry.selector == key.selector))
            .max_by_key(|key| key.created);
        match (lost, adoptable) {
            (lost, Some(key)) => {
                let mut adopted = selector_status(key, DkimSelectorState::Active, key.created);
                // Generated to replace a deleted key, but the status write was lost: keep saying so.
                adopted.replaces = lost.map(|lost| lost.selector.clone());
                active = Some((adopted, key));
            }
            (Some(lost), None) => {
                let selector = new_selector(plan);
                plan.replaced.push(ReplacedKey {
                    domain: name.to_owned(),
                    lost_selector: lost.selector.clone(),
                    new_selector: selector.clone(),
                });
                let mut status = new_status(name, &selector, algorithm, DkimSelectorState::Active, now);
                status.replaces = Some(lost.selector.clone());
                plan.selectors.push(status);
            }
            (None, None) => {
                let selector = new_selector(plan);
                plan.selectors
                    .push(new_status(name, &selector, algorithm, DkimSelectorState::Active, now));
            }
        }
    }

    let rotation = SignedDuration::from_hours(i64::from(domain.dkim.rotation_period_days) * 24);
    match (active, published) {
        (Some((active, _)), Some((successor, _))) if elapsed(successor.since.as_ref(), now) >= PUBLISH_DELAY => {
            plan.selectors
                .push(with_state(successor, DkimSelectorState::Active, now));
            plan.selectors
                .push(with_state(active, DkimSelectorState::Retiring, now));
        }
        (Some((active, _)), Some((successor, _))) => {
            plan.selectors.push(active);
            plan.selectors.push(successor);
        }
        (Some((active, key)), None) => {
            if now.duration_since(key.created) >= rotation {
                let selector = new_selector(plan);
                plan.selectors.push(new_status(
                    name,
                    &selector,
                    algorithm,
                    DkimSelectorState::Published,
                    now,
                ));
            }
            plan.selectors.push(active);
        }
        // Only when a new key was just planned above; its status is already pushed.
        (None, successor) => plan.selectors.extend(successor.map(|(entry, _)| entry)),
    }

    for entry in recorded_mine
        .iter()
        .filter(|entry| entry.state == DkimSelectorState::Retiring)
    {
        if let Some(key) = key_of(entry) {
            retire_or_delete(plan, entry, key, now);
        }
    }
}

fn retire_or_delete(plan: &mut DkimPlan, entry: &DkimSelectorStatus, key: &StoredKey, now: Timestamp) {
    if entry.state == DkimSelectorState::Retiring {
        if elapsed(entry.since.as_ref(), now) >= RETIRE_OVERLAP {
            plan.delete.push((key.domain.clone(), key.selector.clone()));
        } else {
            plan.selectors.push(entry.clone());
        }
    } else {
        plan.selectors
            .push(with_state(entry.clone(), DkimSelectorState::Retiring, now));
    }
}

/// One more than the highest serial among `selectors`, so a selector name is never reused.
fn next_serial<'a>(selectors: impl Iterator<Item = &'a str>) -> u64 {
    selectors
        .filter_map(|selector| selector.rsplit('-').next()?.parse::<u64>().ok())
        .max()
        .map_or(1, |max| max + 1)
}

fn elapsed(since: Option<&Time>, now: Timestamp) -> SignedDuration {
    since.map_or(SignedDuration::MAX, |since| now.duration_since(since.0))
}

fn new_status(
    domain: &str,
    selector: &str,
    algorithm: DkimAlgorithm,
    state: DkimSelectorState,
    now: Timestamp,
) -> DkimSelectorStatus {
    DkimSelectorStatus {
        domain: domain.to_owned(),
        selector: selector.to_owned(),
        algorithm,
        state,
        created: Some(Time(now)),
        since: Some(Time(now)),
        replaces: None,
    }
}

fn selector_status(key: &StoredKey, state: DkimSelectorState, since: Timestamp) -> DkimSelectorStatus {
    DkimSelectorStatus {
        domain: key.domain.clone(),
        selector: key.selector.clone(),
        algorithm: key.algorithm,
        state,
        created: Some(Time(key.created)),
        since: Some(Time(since)),
        replaces: None,
    }
}

fn with_state(mut entry: DkimSelectorStatus, state: DkimSelectorState, now: Timestamp) -> DkimSelectorStatus {
    if entry.state != state {
        entry.state = state;
        entry.since = Some(Time(now));
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use securemail_api::tenant::DkimSpec;

    fn domain(algorithms: &[DkimAlgorithm]) -> DomainSpec {
        serde_json::from_value(serde_json::json!({"name": "notify.example.org"}))
            .map(|mut d: DomainSpec| {
                d.dkim = DkimSpec {
                    algorithms: algorithms.to_vec(),
                    ..DkimSpec::default()
                };
                d
            })
            .expect("domain")
    }

    fn at(days: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_hours(days * 24 + 1_000_000)
    }

    /// Applies a plan the way the reconcile loop does: generated keys appear as Secrets, deleted ones vanish.
    fn apply(plan: &DkimPlan, stored: &mut Vec<StoredKey>, now: Timestamp) {
        for key in &plan.generate {
            stored.push(StoredKey {
                domain: key.domain.clone(),
                selector: key.selector.clone(),
                algorithm: key.algorithm,
                secret_name: format!("secret-{}", key.selector),
                created: now,
            });
        }
        stored.retain(|key| !plan.delete.contains(&(key.domain.clone(), key.selector.clone())));
    }

    fn states(plan: &DkimPlan) -> Vec<(String, DkimSelectorState)> {
        let mut states: Vec<_> = plan.selectors.iter().map(|s| (s.selector.clone(), s.state)).collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }

    #[test]
    fn first_reconcile_generates_one_active_key_per_algorithm() {
        let domains = [domain(&[DkimAlgorithm::RsaSha256, DkimAlgorithm::Ed25519Sha256])];
        let plan = plan(&domains, &[], &[], at(0));
        let selectors: Vec<_> = plan.generate.iter().map(|key| key.selector.as_str()).collect();
        assert_eq!(selectors, ["sm-rsa-1", "sm-ed-1"]);
        assert!(plan.selectors.iter().all(|s| s.state == DkimSelectorState::Active));
    }

    #[test]
    fn an_unchanged_tenant_plans_nothing() {
        let domains = [domain(&[DkimAlgorithm::RsaSha256])];
        let mut stored = Vec::new();
        let first = plan(&domains, &[], &stored, at(0));
        apply(&first, &mut stored, at(0));
        let second = plan(&domains, &first.selectors, &stored, at(1));
        assert!(second.generate.is_empty() && second.delete.is_empty());
        assert_eq!(second.selectors, first.selectors);
    }

    #[test]
    fn a_key_secret_without_status_is_adopted_not_regenerated() {
        let domains = [domain(&[DkimAlgorithm::RsaSha256])];
        let mut stored = Vec::new();
        let first = plan(&domains, &[], &stored, at(0));
        apply(&first, &mut stored, at(0));
        // The status write was lost.
        let again = plan(&domains, &[], &stored, at(0));
        assert!(again.generate.is_empty());
        assert_eq!(states(&again), [("sm-rsa-1".to_owned(), DkimSelectorState::Active)]);
    }

    #[test]
    fn an_interrupted_replacement_is_still_reported() {
        let domains = [domain(&[DkimAlgorithm::RsaSha256])];
        let mut stored = Vec::new();
        let first = plan(&domains, &[], &stored, at(0));
        apply(&first, &mut stored, at(0));
        stored.clear();
        let replacement = plan(&domains, &first.selectors, &stored, at(1));
        apply(&replacement, &mut stored, at(1));
        // The replacement key exists but its status never got written.
        let again = plan(&domains, &first.selectors, &stored, at(1));
        assert!(again.generate.is_empty());
        assert_eq!(again.selectors[0].replaces.as_deref(), Some("sm-rsa-1"));
        assert_eq!(recent_replacements(&again.selectors, at(1)).len(), 1);
        assert!(
            recent_replacements(&again.selectors, at(4)).is_empty(),
            "after the publish delay it is news no more"
        );
    }

    #[test]
    fn a_deleted_key_secret_gets_a_new_selector_never_the_old_name() {
        let domains = [domain(&[DkimAlgorithm::RsaSha256])];
        let mut stored = Vec::new();
        let first = plan(&domains, &[], &stored, at(0));
        apply(&first, &mut stored, at(0));
        stored.clear();
        let replaced = plan(&domains, &first.selectors, &stored, at(1));
        assert_eq!(replaced.generate.len(), 1);
        assert_eq!(replaced.generate[0].selector, "sm-rsa-2");
        assert_eq!(
            replaced.replaced,
            [ReplacedKey {
                domain: "notify.example.org".into(),
                lost_selector: "sm-rsa-1".into(),
                new_selector: "sm-rsa-2".into()
            }]
        );
    }

    #[test]
    fn rotation_publishes_switches_and_retires_in_order() {
        let domains = [domain(&[DkimAlgorithm::RsaSha256])];
        let mut stored = Vec::new();
        let mut day = 0;
        let step = |recorded: &[DkimSelectorStatus], stored: &mut Vec<StoredKey>, now_day: i64| {
            let plan = plan(&domains, recorded, stored, at(now_day));
            apply(&plan, stored, at(now_day));
            plan
        };
        let p = step(&[], &mut stored, day);
        day += 180; // rotation period
        let p = step(&p.selectors, &mut stored, day);
        assert_eq!(
            states(&p),
            [
                ("sm-rsa-1".into(), DkimSelectorState::Active),
                ("sm-rsa-2".into(), DkimSelectorState::Published)
            ]
        );
        day += 1; // publish delay not yet over
        let p = step(&p.selectors, &mut stored, day);
        assert_eq!(
            p.selectors
                .iter()
                .filter(|s| s.state == DkimSelectorState::Active)
                .count(),
            1
        );
        day += 1;
        let p = step(&p.selectors, &mut stored, day);
        assert_eq!(
            states(&p),
            [
                ("sm-rsa-1".into(), DkimSelectorState::Retiring),
                ("sm-rsa-2".into(), DkimSelectorState::Active)
            ]
        );
        day += 7; // overlap
        let p = step(&p.selectors, &mut stored, day);
        assert_eq!(p.delete, [("notify.example.org".to_owned(), "sm-rsa-1".to_owned())]);
        assert_eq!(states(&p), [("sm-rsa-2".into(), DkimSelectorState::Active)]);
        assert_eq!(stored.len(), 1);
    }

    #[test]
    fn a_dropped_algorithm_retires_its_selector() {
        let both = [domain(&[DkimAlgorithm::RsaSha256, DkimAlgorithm::Ed25519Sha256])];
        let mut stored = Vec::new();
        let first = plan(&both, &[], &stored, at(0));
        apply(&first, &mut stored, at(0));
        let rsa_only = [domain(&[DkimAlgorithm::RsaSha256])];
        let second = plan(&rsa_only, &first.selectors, &stored, at(1));
        assert_eq!(
            states(&second),
            [
                ("sm-ed-1".into(), DkimSelectorState::Retiring),
                ("sm-rsa-1".into(), DkimSelectorState::Active)
            ]
        );
    }
}
