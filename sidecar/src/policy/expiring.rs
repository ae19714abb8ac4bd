//! The bounded, expiring map behind the policy caches (decisions, MX addresses, MTA-STS policies).

use std::collections::HashMap;
use std::time::Instant;

/// Values by name, each valid until its own expiry. At capacity, a new name first drops the expired entries, then
/// the entry closest to expiry, so memory stays bounded however many domains mail goes to.
#[derive(Debug)]
pub struct ExpiringMap<V> {
    entries: HashMap<String, (Instant, V)>,
    capacity: usize,
}

impl<V> ExpiringMap<V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
        }
    }

    /// The value for `name` if it has not expired at `now`.
    pub fn get(&self, name: &str, now: Instant) -> Option<&V> {
        self.entries
            .get(name)
            .filter(|(expires, _)| *expires > now)
            .map(|(_, value)| value)
    }

    pub fn insert(&mut self, name: String, value: V, expires: Instant, now: Instant) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&name) {
            self.entries.retain(|_, (expires, _)| *expires > now);
            if self.entries.len() >= self.capacity
                && let Some(closest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (expires, _))| *expires)
                    .map(|(name, _)| name.clone())
            {
                self.entries.remove(&closest);
            }
        }
        self.entries.insert(name, (expires, value));
    }

    pub fn count(&self) -> usize {
        self.entries.len()
    }

    /// The entries that have not expired at `now`.
    pub fn live(&self, now: Instant) -> impl Iterator<Item = (&str, &V)> {
        self.entries
            .iter()
            .filter(move |(_, (expires, _))| *expires > now)
            .map(|(name, (_, value))| (name.as_str(), value))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn entries_expire_and_capacity_drops_the_expired_then_the_closest_to_expiry() {
        let now = Instant::now();
        let later = |secs| now + Duration::from_secs(secs);
        let mut map = ExpiringMap::new(2);
        map.insert("a".into(), 1, later(10), now);
        map.insert("b".into(), 2, later(20), now);
        assert_eq!(map.get("a", now), Some(&1));
        assert_eq!(map.get("a", later(10)), None, "expired at its expiry");
        // Full: "c" pushes out "a", the closest to expiry.
        map.insert("c".into(), 3, later(30), now);
        assert_eq!((map.get("a", now), map.get("b", now), map.count()), (None, Some(&2), 2));
        // Full again at a time when "b" has expired: it goes, "c" stays.
        map.insert("d".into(), 4, later(40), later(25));
        assert_eq!(
            (map.get("c", later(25)), map.get("d", later(25)), map.count()),
            (Some(&3), Some(&4), 2)
        );
        // Replacing an existing name never evicts another.
        map.insert("d".into(), 5, later(50), later(25));
        assert_eq!((map.get("c", later(25)), map.get("d", later(25))), (Some(&3), Some(&5)));
    }
}
