//! The MTA-STS policy cache. A cached policy stays in force until its `max_age` runs out whatever happens to the
//! policy server (RFC 8461 section 5.1), so on the state volume the cache outlives restarts: a sidecar restarted
//! during an HTTPS outage still knows an unexpired `enforce` policy. One JSON file, replaced whole (temporary file,
//! fsync, rename) whenever a policy is fetched, loaded at start with expired entries dropped. An unreadable or
//! corrupt file is logged and moved aside, never fatal: the cache then starts empty, as it did before it was kept.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{StsPolicy, parse_policy, valid_id};
use crate::evidence::DomainName;
use crate::policy::clock::Clock;
use crate::policy::expiring::ExpiringMap;

/// The file in the state directory.
pub const FILE_NAME: &str = "mta-sts-policies.json";
/// Bound on cached policies; beyond it the entry closest to expiry goes.
const CAPACITY: usize = 10_000;
const FORMAT_VERSION: u32 = 1;

/// A policy in force for a domain, until `expires`.
#[derive(Clone, Debug)]
pub(super) struct Cached {
    pub(super) id: String,
    pub(super) policy: Arc<StsPolicy>,
    expires: Timestamp,
}

/// Policies by domain, in memory and, when built with [`StsCache::persistent`], on disk.
pub struct StsCache {
    clock: Arc<dyn Clock>,
    entries: Mutex<ExpiringMap<Cached>>,
    file: Option<PathBuf>,
    /// Held while the file is written, so the file written last holds the latest entries.
    writing: Mutex<()>,
}

impl std::fmt::Debug for StsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsCache")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Contents {
    version: u32,
    /// Each entry parsed on its own: one bad entry costs only itself.
    policies: Vec<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    domain: String,
    id: String,
    /// The policy in RFC 8461 syntax, parsed again on load as if it had just been fetched.
    policy: String,
    expires: Timestamp,
}

/// What loading the file found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub kept: usize,
    pub expired: usize,
    pub invalid: usize,
}

impl StsCache {
    /// A cache that lives as long as the process (the `check-domain` and socketmap commands, tests).
    pub fn in_memory(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            entries: Mutex::new(ExpiringMap::new(CAPACITY)),
            file: None,
            writing: Mutex::new(()),
        }
    }

    /// A cache kept in [`FILE_NAME`] under `state_dir`, starting from what the file holds.
    pub fn persistent(state_dir: &Path, clock: Arc<dyn Clock>) -> Self {
        let path = state_dir.join(FILE_NAME);
        let cache = Self {
            file: Some(path.clone()),
            ..Self::in_memory(clock)
        };
        let loaded = match fs::read(&path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => return cache,
            Err(err) => Err(format!("cannot read it: {err}")),
            Ok(bytes) => cache.load(&bytes),
        };
        match loaded {
            Ok(loaded) => tracing::info!(
                path = %path.display(),
                kept = loaded.kept,
                expired = loaded.expired,
                invalid = loaded.invalid,
                "MTA-STS policy cache loaded"
            ),
            Err(reason) => {
                let aside = path.with_file_name(format!(
                    "{FILE_NAME}.unusable-{}",
                    cache.clock.wall().strftime("%Y%m%dT%H%M%SZ")
                ));
                let moved = fs::rename(&path, &aside).map_or_else(
                    |err| format!("could not be moved aside ({err}); the next fetched policy replaces it"),
                    |()| format!("moved to {}", aside.display()),
                );
                tracing::error!(
                    path = %path.display(),
                    %reason,
                    file = %moved,
                    "ignoring the MTA-STS policy cache file; starting with no cached policies"
                );
            }
        }
        cache
    }

    /// Takes in the file's entries that are valid and unexpired; `Err` when the file as a whole is unusable.
    fn load(&self, bytes: &[u8]) -> Result<Loaded, String> {
        let contents: Contents = serde_json::from_slice(bytes).map_err(|err| format!("not a policy cache: {err}"))?;
        if contents.version != FORMAT_VERSION {
            return Err(format!("format version {} is not {FORMAT_VERSION}", contents.version));
        }
        let (now, wall) = (self.clock.now(), self.clock.wall());
        let mut loaded = Loaded::default();
        let mut entries = self.lock();
        for value in contents.policies {
            match checked(value) {
                Err(reason) => {
                    loaded.invalid += 1;
                    tracing::warn!(%reason, "skipping an invalid entry of the MTA-STS policy cache file");
                }
                Ok((domain, cached)) => {
                    // Never longer than the policy's own max_age from now, whatever the stored expiry says.
                    let remaining = Duration::try_from(cached.expires.duration_since(wall))
                        .unwrap_or_default()
                        .min(Duration::from_secs(cached.policy.max_age));
                    if remaining.is_zero() {
                        loaded.expired += 1;
                    } else {
                        loaded.kept += 1;
                        entries.insert(domain, cached, now + remaining, now);
                    }
                }
            }
        }
        Ok(loaded)
    }

    pub(super) fn get(&self, domain: &str) -> Option<Cached> {
        self.lock().get(domain, self.clock.now()).cloned()
    }

    /// Caches a policy just fetched for its `max_age`, and, for a persistent cache, writes the file before
    /// returning.
    pub(super) async fn insert(self: &Arc<Self>, domain: &str, id: String, policy: Arc<StsPolicy>) {
        let max_age = Duration::from_secs(policy.max_age);
        let (now, wall) = (self.clock.now(), self.clock.wall());
        let expires = jiff::SignedDuration::try_from(max_age)
            .ok()
            .and_then(|age| wall.checked_add(age).ok())
            .unwrap_or(wall);
        let cached = Cached { id, policy, expires };
        self.lock().insert(domain.to_owned(), cached, now + max_age, now);
        let Some(path) = self.file.clone() else {
            return;
        };
        let cache = Arc::clone(self);
        let written = tokio::task::spawn_blocking(move || cache.write(&path)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(
                error = %err,
                "cannot write the MTA-STS policy cache file; the policy is cached in memory only"
            ),
            Err(err) => tracing::error!(error = %err, "writing the MTA-STS policy cache file did not finish"),
        }
    }

    /// Replaces the file with the unexpired entries: a temporary file, flushed, renamed over it, the directory
    /// flushed, so a crash leaves the old file or the new one, never a torn one.
    fn write(&self, path: &Path) -> io::Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let policies = {
            let entries = self.lock();
            entries
                .live(self.clock.now())
                .map(|(domain, cached)| {
                    serde_json::to_value(Entry {
                        domain: domain.to_owned(),
                        id: cached.id.clone(),
                        policy: cached.policy.text(),
                        expires: cached.expires,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let json = serde_json::to_vec(&Contents {
            version: FORMAT_VERSION,
            policies,
        })?;
        let temporary = path.with_file_name(format!("{FILE_NAME}.tmp"));
        let mut file = File::create(&temporary)?;
        file.write_all(&json)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExpiringMap<Cached>> {
        // Every change is one map call: a panic while holding the lock leaves no half-changed entry.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An entry of the file, checked as strictly as a fresh TXT record and policy.
fn checked(value: serde_json::Value) -> Result<(String, Cached), String> {
    let entry: Entry = serde_json::from_value(value).map_err(|err| err.to_string())?;
    let domain = DomainName::new(&entry.domain).map_err(|err| err.to_string())?;
    if !valid_id(&entry.id) {
        return Err("id must be 1 to 32 letters or digits".to_owned());
    }
    let policy = parse_policy(&entry.policy).map_err(|err| err.to_string())?;
    Ok((
        String::from(domain),
        Cached {
            id: entry.id,
            policy: Arc::new(policy),
            expires: entry.expires,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::clock::ManualClock;
    use crate::policy::mta_sts::Mode;

    fn policy(max_age: u64) -> Arc<StsPolicy> {
        Arc::new(StsPolicy {
            mode: Mode::Enforce,
            mx: vec!["mx.example.net".to_owned(), "*.backup.example.net".to_owned()],
            max_age,
        })
    }

    #[tokio::test]
    async fn a_reloaded_cache_keeps_unexpired_policies_and_drops_expired_ones() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new());
        let cache = Arc::new(StsCache::persistent(dir.path(), clock.clone()));
        cache.insert("long.example", "a1".to_owned(), policy(86_400)).await;
        cache.insert("short.example", "b2".to_owned(), policy(60)).await;
        assert!(!dir.path().join(format!("{FILE_NAME}.tmp")).exists());

        clock.advance(Duration::from_secs(120));
        let reloaded = StsCache::persistent(dir.path(), clock.clone());
        let kept = reloaded.get("long.example").unwrap();
        assert_eq!((kept.id.as_str(), &kept.policy), ("a1", &policy(86_400)));
        assert!(reloaded.get("short.example").is_none());
        // In force for what was left of its max_age, not a fresh one.
        clock.advance(Duration::from_secs(86_400 - 120));
        assert!(reloaded.get("long.example").is_none());
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_the_cache_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        for garbage in [
            &b"{\"version\":1,\"policies\":[{\"dom"[..],
            b"\xff\xfe",
            b"{\"version\":9,\"policies\":[]}",
        ] {
            fs::write(&path, garbage).unwrap();
            let cache = StsCache::persistent(dir.path(), Arc::new(ManualClock::new()));
            assert!(cache.get("example.net").is_none());
            assert!(!path.exists(), "the unusable file was moved aside");
        }
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with(&format!("{FILE_NAME}.unusable-")))
            .collect();
        assert!(!aside.is_empty(), "{aside:?}");
    }

    #[test]
    fn invalid_entries_are_skipped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new());
        let expires = clock.wall().checked_add(jiff::SignedDuration::from_hours(1)).unwrap();
        let entry = |domain: &str, id: &str, policy: &str| serde_json::json!({"domain": domain, "id": id, "policy": policy, "expires": expires});
        let good = "version: STSv1\nmode: enforce\nmx: mx.example.net\nmax_age: 86400\n";
        let contents = serde_json::json!({"version": 1, "policies": [
            entry("good.example", "x1", good),
            entry("jane@bad.example", "x1", good),
            entry("badid.example", "not valid!", good),
            entry("badpolicy.example", "x1", "mode: enforce\n"),
            {"domain": "missing.example"},
        ]});
        fs::write(dir.path().join(FILE_NAME), contents.to_string()).unwrap();
        let cache = StsCache::persistent(dir.path(), clock);
        assert!(cache.get("good.example").is_some());
        for domain in ["badid.example", "badpolicy.example", "missing.example"] {
            assert!(cache.get(domain).is_none(), "{domain}");
        }
        assert!(dir.path().join(FILE_NAME).exists(), "a partly valid file stays");
    }

    #[tokio::test]
    async fn a_stored_expiry_never_outlasts_the_policys_max_age() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new());
        let far = clock
            .wall()
            .checked_add(jiff::SignedDuration::from_hours(24 * 400))
            .unwrap();
        let contents = serde_json::json!({"version": 1, "policies": [{
            "domain": "far.example", "id": "f1", "expires": far,
            "policy": "version: STSv1\nmode: enforce\nmx: mx.example.net\nmax_age: 600\n",
        }]});
        fs::write(dir.path().join(FILE_NAME), contents.to_string()).unwrap();
        let cache = StsCache::persistent(dir.path(), clock.clone());
        assert!(cache.get("far.example").is_some());
        clock.advance(Duration::from_secs(601));
        assert!(cache.get("far.example").is_none());
    }
}
