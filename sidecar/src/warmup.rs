//! Warmup caps at send time. The operator renders today's limit for this address into sidecar.yaml; the limiter
//! splits it per provider class (`provider_caps`) and smooths it over the UTC day (`hourly_allowance`), counts what
//! this address sent, and refuses beyond the allowance with 452 4.7.1 so Postfix keeps the mail and retries.
//!
//! The same file keeps the day's recipients per provider and result, and the previous day's: `/status` reports both,
//! and after midnight the operator's warmup loop judges the day that just ended, even across a restart.
//!
//! Counts live in `<stateDir>/warmup-counters` ([`counters_file`]), so a restart or a pod moving to another node (the
//! volume moves with it) does not hand out the day's allowance twice. One thread stores them, at most every
//! [`WRITE_INTERVAL`]. The copy a delivery's answer waits for is its evidence record: the attempt that counted
//! recipients carries them ([`WarmupCount`], from [`WarmupLimiter::settle`]), and the record is on disk before Postfix
//! hears the answer. On start the limiter takes, per provider, the larger of the stored count and the day's counts
//! in the evidence log ([`crate::evidence::warmup_counts`]), so a crash right after an answer cannot forget it, and a
//! delivery costs no flush of its own here. A delivery reserves its recipients before it connects, so concurrent
//! deliveries can never overshoot a cap together.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use securemail_api::provider::Provider;
use securemail_api::sidecar_config::WarmupCaps;
use securemail_api::sidecar_status::{DeliveryDay, ResultCounts};
use securemail_api::warmup::{hourly_allowance, provider_caps};
use serde::{Deserialize, Serialize};

mod counters_file;

use counters_file::CountersFile;

use crate::evidence::WarmupCount;

/// The shortest time between two writes of the counters (and between retries of a failed write): changes within it
/// share the next write.
pub const WRITE_INTERVAL: Duration = Duration::from_millis(500);

/// What one address sent on one UTC day, per provider class: the durable part.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Counters {
    date: Date,
    sent: BTreeMap<Provider, u32>,
    /// Recipients answered today per provider and result (a file from an older sidecar has none).
    #[serde(default)]
    results: BTreeMap<Provider, ResultCounts>,
    /// The last earlier day this address counted, kept across midnight and restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<DeliveryDay>,
}

impl Counters {
    /// A new day: nothing sent yet, the day before kept as `previous`.
    fn next_day(self, date: Date) -> Self {
        Self {
            date,
            sent: BTreeMap::new(),
            results: BTreeMap::new(),
            previous: Some(self.delivery_day()),
        }
    }

    fn delivery_day(&self) -> DeliveryDay {
        DeliveryDay {
            date: self.date,
            providers: Provider::ALL
                .iter()
                .map(|&provider| (provider, self.results.get(&provider).copied().unwrap_or_default()))
                .collect(),
        }
    }
}

#[derive(Debug)]
struct State {
    caps: WarmupCaps,
    counters: Counters,
    /// Recipients of deliveries in progress; not persisted (a crash ends those deliveries).
    reserved: BTreeMap<Provider, u32>,
    /// Changes to `counters` so far; the writer thread stores until it has caught up.
    changes: u64,
    /// Why the last write failed, so a failure is logged when it starts or changes; cleared by the next success.
    store_error: Option<String>,
    /// The writer is waiting for a change (not pausing between writes): a change must wake it.
    writer_idle: bool,
    /// Set when the limiter is dropped: the writer stores what is left and ends.
    closing: bool,
}

/// The state and the signal that wakes the writer thread.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// Shared by every engine a reload builds, so counts and reservations outlive configuration changes.
#[derive(Debug)]
pub struct WarmupLimiter {
    shared: Arc<Shared>,
    /// Joined on drop, so the last counts are stored when the sidecar stops.
    writer: Option<JoinHandle<()>>,
}

/// Why a recipient may not be sent now: its provider's allowance for this hour is used up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapReached {
    pub provider: Provider,
    pub allowance: u32,
    pub daily_cap: u32,
    pub hour: u8,
    pub day: Option<u32>,
}

impl std::fmt::Display for CapReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "warmup cap reached: {} may receive {} of today's {} messages from this address by {:02}:59 UTC",
            self.provider, self.allowance, self.daily_cap, self.hour
        )?;
        if let Some(day) = self.day {
            write!(f, " (warmup day {day})")?;
        }
        f.write_str("; retrying later")
    }
}

/// Recipients counted against a provider's allowance until the delivery settles.
#[derive(Debug)]
#[must_use = "a reservation must be settled"]
pub struct Reservation {
    provider: Provider,
    count: u32,
}

impl WarmupLimiter {
    /// Loads today's counts from `state_dir` (a file from another day, or none, starts at zero), raises each to
    /// what today's evidence records counted (`recorded`, from [`crate::evidence::warmup_counts`]: the file may miss
    /// the last half second), and starts the thread that stores them. An unreadable or corrupt file is an error:
    /// starting from zero could send a whole day's allowance twice.
    pub fn load(
        state_dir: &Path,
        caps: WarmupCaps,
        now: Timestamp,
        recorded: &BTreeMap<Provider, u32>,
    ) -> Result<Self, WarmupError> {
        let (file, stored) = CountersFile::open::<Counters>(state_dir)?;
        Self::start(file, stored, caps, now, recorded)
    }

    fn start(
        file: CountersFile,
        stored: Option<Counters>,
        caps: WarmupCaps,
        now: Timestamp,
        recorded: &BTreeMap<Provider, u32>,
    ) -> Result<Self, WarmupError> {
        let today = utc_date(now);
        let mut counters = match stored {
            Some(stored) if stored.date == today => stored,
            Some(stored) => stored.next_day(today),
            None => empty(today),
        };
        for (&provider, &count) in recorded {
            let sent = counters.sent.entry(provider).or_default();
            *sent = (*sent).max(count);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                caps,
                counters,
                reserved: BTreeMap::new(),
                changes: 0,
                store_error: None,
                writer_idle: false,
                closing: false,
            }),
            changed: Condvar::new(),
        });
        let writer_shared = Arc::clone(&shared);
        let path = file.path().to_path_buf();
        let writer = thread::Builder::new()
            .name("warmup-writer".to_owned())
            .spawn(move || store_changes(file, &writer_shared))
            .map_err(|source| WarmupError::Io { path, source })?;
        Ok(Self {
            shared,
            writer: Some(writer),
        })
    }

    /// Applies the caps of a new configuration (the operator renders a new limit each day).
    pub fn set_caps(&self, caps: WarmupCaps) {
        self.lock().caps = caps;
    }

    /// True when a limit applies (the address is still warming up).
    pub fn is_active(&self) -> bool {
        self.lock().caps.daily_limit.is_some()
    }

    /// At RCPT: refuses when the provider's allowance is already used up by sent and reserved recipients.
    pub fn check(&self, provider: Provider, now: Timestamp) -> Result<(), CapReached> {
        let mut state = self.lock();
        roll_over(&mut state, now);
        state.room(provider, now).map(drop)
    }

    /// At delivery: reserves `count` recipients, or refuses when they do not all fit this hour's allowance.
    pub fn reserve(&self, provider: Provider, count: u32, now: Timestamp) -> Result<Reservation, CapReached> {
        let mut state = self.lock();
        roll_over(&mut state, now);
        if let Some(room) = state.room(provider, now)?
            && room < count
        {
            return Err(state.cap_reached(provider, now));
        }
        *state.reserved.entry(provider).or_default() += count;
        Ok(Reservation { provider, count })
    }

    /// Ends a delivery: `sent` of the reserved recipients went to the provider (answered 2xx or 5xx by it), the
    /// rest return to the allowance. The new count holds at once and reaches the counters file within
    /// [`WRITE_INTERVAL`]. While a limit applies, the returned count goes into the delivery's evidence record, the
    /// copy that is on disk before the delivery answers.
    pub fn settle(&self, reservation: Reservation, sent: u32) -> Option<WarmupCount> {
        let mut state = self.lock();
        let reserved = state.reserved.entry(reservation.provider).or_default();
        *reserved = reserved.saturating_sub(reservation.count);
        let recipients = NonZeroU32::new(sent.min(reservation.count))?;
        *state.counters.sent.entry(reservation.provider).or_default() += recipients.get();
        // A warm address has no allowance to recount after a crash.
        let limited = state.caps.daily_limit.is_some();
        self.changed(state);
        limited.then_some(WarmupCount {
            provider: reservation.provider,
            recipients,
        })
    }

    /// Counts recipients the sidecar answered for `provider`, for today's results.
    pub fn record(&self, provider: Provider, answered: ResultCounts, now: Timestamp) {
        let mut state = self.lock();
        roll_over(&mut state, now);
        let counts = state.counters.results.entry(provider).or_default();
        counts.delivered = counts.delivered.saturating_add(answered.delivered);
        counts.deferred = counts.deferred.saturating_add(answered.deferred);
        counts.bounced = counts.bounced.saturating_add(answered.bounced);
        self.changed(state);
    }

    /// Today's results and the previous day's (absent before this address's first full day).
    pub fn results(&self, now: Timestamp) -> (DeliveryDay, Option<DeliveryDay>) {
        let mut state = self.lock();
        roll_over(&mut state, now);
        (state.counters.delivery_day(), state.counters.previous.clone())
    }

    /// Hands the counters changed under `state` to the writer thread.
    fn changed(&self, mut state: MutexGuard<'_, State>) {
        state.changes += 1;
        // Waking a writer that is pausing between writes would only cost a context switch.
        let wake = state.writer_idle;
        drop(state);
        if wake {
            self.shared.changed.notify_one();
        }
    }

    /// What was sent today, per provider.
    pub fn sent_today(&self, now: Timestamp) -> BTreeMap<Provider, u32> {
        let mut state = self.lock();
        roll_over(&mut state, now);
        state.counters.sent.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }
}

impl Drop for WarmupLimiter {
    fn drop(&mut self) {
        self.lock().closing = true;
        self.shared.changed.notify_one();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("the warmup counter writer panicked; the last counts may not be stored");
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain counters: a panic elsewhere cannot leave them half-updated.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(state)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait_until<'a>(&self, state: MutexGuard<'a, State>, deadline: Instant) -> MutexGuard<'a, State> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match self.changed.wait_timeout(state, timeout) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }
}

/// The writer thread: waits for a change, stores the latest counts (one write and flush), then pauses for
/// [`WRITE_INTERVAL`] so the changes made meanwhile share the next write. A failed write is retried after the pause;
/// meanwhile deliveries go on, their counts safe in the evidence records. Ends once the limiter is dropped and
/// everything is stored (or the last try failed).
fn store_changes(mut file: CountersFile, shared: &Shared) {
    let mut written = 0;
    loop {
        let mut state = shared.lock();
        state.writer_idle = true;
        while state.changes == written && !state.closing {
            state = shared.wait(state);
        }
        state.writer_idle = false;
        if state.changes == written {
            return;
        }
        let (counters, changes) = (state.counters.clone(), state.changes);
        drop(state);
        let result = file.store(&counters);
        let mut state = shared.lock();
        match result {
            Ok(()) => {
                written = changes;
                if state.store_error.take().is_some() {
                    tracing::info!(path = %file.path().display(), "the warmup counters are stored again");
                }
            }
            Err(err) => {
                // Retried every interval: logged when the failure starts or changes, not at every retry.
                let reason = err.to_string();
                if state.store_error.as_ref() != Some(&reason) {
                    tracing::error!(
                        %err,
                        path = %file.path().display(),
                        "cannot store the warmup counters; today's counts stay in memory and in the evidence records"
                    );
                }
                state.store_error = Some(reason);
                if state.closing {
                    return;
                }
            }
        }
        let resume = Instant::now() + WRITE_INTERVAL;
        while !state.closing && Instant::now() < resume {
            state = shared.wait_until(state, resume);
        }
    }
}

impl State {
    /// Recipients the provider may still take this hour; `None` when no limit applies.
    fn room(&self, provider: Provider, now: Timestamp) -> Result<Option<u32>, CapReached> {
        let Some(daily_limit) = self.caps.daily_limit else {
            return Ok(None);
        };
        let cap = provider_caps(daily_limit, &self.caps.provider_shares)
            .get(&provider)
            .copied()
            .unwrap_or(0);
        let allowance = hourly_allowance(cap, utc_hour(now));
        let used = self.counters.sent.get(&provider).copied().unwrap_or(0)
            + self.reserved.get(&provider).copied().unwrap_or(0);
        match allowance.checked_sub(used) {
            Some(room) if room > 0 => Ok(Some(room)),
            _ => Err(self.cap_reached(provider, now)),
        }
    }

    fn cap_reached(&self, provider: Provider, now: Timestamp) -> CapReached {
        let daily_cap = self
            .caps
            .daily_limit
            .map(|limit| provider_caps(limit, &self.caps.provider_shares))
            .and_then(|caps| caps.get(&provider).copied())
            .unwrap_or(0);
        CapReached {
            provider,
            allowance: hourly_allowance(daily_cap, utc_hour(now)),
            daily_cap,
            hour: utc_hour(now),
            day: self.caps.day,
        }
    }
}

/// Why the counters could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    #[error("warmup counters {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "warmup counters {} are not valid ({reason}); refusing to start from zero, which could exceed today's \
         warmup limit. Inspect the file, then remove it to accept the risk",
        path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
}

fn empty(date: Date) -> Counters {
    Counters {
        date,
        sent: BTreeMap::new(),
        results: BTreeMap::new(),
        previous: None,
    }
}

fn roll_over(state: &mut State, now: Timestamp) {
    let today = utc_date(now);
    if state.counters.date != today {
        let ended = std::mem::replace(&mut state.counters, empty(today));
        state.counters = ended.next_day(today);
    }
}

fn utc_date(now: Timestamp) -> Date {
    now.to_zoned(TimeZone::UTC).date()
}

fn utc_hour(now: Timestamp) -> u8 {
    u8::try_from(now.to_zoned(TimeZone::UTC).hour()).unwrap_or(23)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use securemail_api::tenant::ProviderShares;

    use super::*;

    fn caps(limit: u32) -> WarmupCaps {
        WarmupCaps {
            day: Some(1),
            daily_limit: Some(limit),
            provider_shares: ProviderShares::default(),
        }
    }

    fn at(time: &str) -> Timestamp {
        time.parse().unwrap()
    }

    #[test]
    fn reservations_never_exceed_the_allowance_and_counts_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let noon = at("2026-11-26T12:00:00Z");
        let limiter = WarmupLimiter::load(dir.path(), caps(100), noon, &BTreeMap::new()).unwrap();
        // Default shares give gmail 40 of 100; by 12:59 the smoothed allowance is ceil(40 × 13 / 24) = 22.
        let first = limiter.reserve(Provider::Gmail, 20, noon).unwrap();
        let refused = limiter.reserve(Provider::Gmail, 3, noon).unwrap_err();
        assert_eq!(refused.allowance, 22);
        assert_eq!(refused.daily_cap, 40);
        assert!(
            refused.to_string().contains("gmail may receive 22 of today's 40"),
            "{refused}"
        );
        let second = limiter.reserve(Provider::Gmail, 2, noon).unwrap();
        assert_eq!(
            limiter.settle(first, 20),
            Some(WarmupCount {
                provider: Provider::Gmail,
                recipients: NonZeroU32::new(20).unwrap()
            }),
            "a limited count goes into the evidence record"
        );
        assert!(limiter.settle(second, 0).is_none());
        assert_eq!(limiter.sent_today(noon)[&Provider::Gmail], 20);
        assert!(
            limiter.check(Provider::Gmail, noon).is_ok(),
            "2 left after a deferred delivery"
        );
        assert!(limiter.check(Provider::Microsoft, noon).is_ok());

        drop(limiter);
        let restarted = WarmupLimiter::load(dir.path(), caps(100), noon, &BTreeMap::new()).unwrap();
        assert_eq!(restarted.sent_today(noon)[&Provider::Gmail], 20);
        assert!(restarted.reserve(Provider::Gmail, 3, noon).is_err());

        let tomorrow = at("2026-11-27T00:30:00Z");
        let next_day = WarmupLimiter::load(dir.path(), caps(100), tomorrow, &BTreeMap::new()).unwrap();
        assert!(next_day.sent_today(tomorrow).is_empty());
        assert!(next_day.reserve(Provider::Gmail, 10, tomorrow).is_ok());
    }

    #[test]
    fn counts_reach_the_disk_while_running_and_when_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let stored = || -> u32 {
            stored_counters(dir.path())
                .and_then(|counters| counters.sent.get(&Provider::Other).copied())
                .unwrap_or(0)
        };
        let now = at("2026-11-26T23:00:00Z");
        let limiter = Arc::new(WarmupLimiter::load(dir.path(), caps(10_000), now, &BTreeMap::new()).unwrap());
        let settle_one = move |limiter: &WarmupLimiter| {
            let reservation = limiter.reserve(Provider::Other, 1, now).unwrap();
            // Not waited for: the writer still stores it within the interval.
            let _ = limiter.settle(reservation, 1);
        };
        settle_one(&limiter);
        let deadline = Instant::now() + Duration::from_secs(10);
        while stored() != 1 {
            assert!(
                Instant::now() < deadline,
                "a settled count is not stored while the limiter runs"
            );
            thread::sleep(Duration::from_millis(5));
        }
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                thread::spawn(move || (0..25).for_each(|_| settle_one(&limiter)))
            })
            .collect();
        threads.into_iter().for_each(|thread| thread.join().unwrap());
        drop(Arc::into_inner(limiter).unwrap());
        assert_eq!(stored(), 201, "every count is stored once the limiter stops");
    }

    #[test]
    fn day_results_survive_restarts_and_after_midnight_become_the_previous_day() {
        let dir = tempfile::tempdir().unwrap();
        let evening = at("2026-11-26T23:00:00Z");
        let counts = ResultCounts {
            delivered: 5,
            deferred: 2,
            bounced: 1,
        };
        let limiter = WarmupLimiter::load(dir.path(), caps(100), evening, &BTreeMap::new()).unwrap();
        limiter.record(Provider::Gmail, counts, evening);
        drop(limiter);

        let restarted = WarmupLimiter::load(dir.path(), caps(100), evening, &BTreeMap::new()).unwrap();
        let (today, previous) = restarted.results(evening);
        assert_eq!((today.providers[&Provider::Gmail], previous), (counts, None));
        assert_eq!(today.providers.len(), Provider::ALL.len());

        let after_midnight = at("2026-11-27T00:10:00Z");
        let (today, previous) = restarted.results(after_midnight);
        assert_eq!(today.date, "2026-11-27".parse::<Date>().unwrap());
        assert!(today.providers.values().all(|c| *c == ResultCounts::default()));
        let previous = previous.unwrap();
        assert_eq!(
            (previous.date, previous.providers[&Provider::Gmail]),
            ("2026-11-26".parse().unwrap(), counts)
        );
        drop(restarted);

        // A sidecar first started after midnight finds the same previous day in the file.
        let next = WarmupLimiter::load(dir.path(), caps(100), after_midnight, &BTreeMap::new()).unwrap();
        assert_eq!(
            next.results(after_midnight).1.unwrap().providers[&Provider::Gmail],
            counts
        );
    }

    #[test]
    fn a_warm_address_has_no_limit_and_a_corrupt_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let now = at("2026-11-26T00:00:00Z");
        let warm = WarmupCaps {
            day: None,
            daily_limit: None,
            provider_shares: ProviderShares::default(),
        };
        let limiter = WarmupLimiter::load(dir.path(), warm, now, &BTreeMap::new()).unwrap();
        assert!(!limiter.is_active());
        let reservation = limiter.reserve(Provider::Gmail, 1_000_000, now).unwrap();
        assert!(
            limiter.settle(reservation, 1_000_000).is_none(),
            "no limit, nothing to record"
        );
        drop(limiter);

        fs::write(dir.path().join("warmup-counters"), b"{not json").unwrap();
        let err = WarmupLimiter::load(dir.path(), caps(10), now, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("refusing to start from zero"), "{err}");
    }

    /// What a sidecar started now would load.
    fn stored_counters(dir: &Path) -> Option<Counters> {
        CountersFile::open::<Counters>(dir).ok()?.1
    }

    #[test]
    fn counts_in_the_evidence_raise_the_stored_ones_on_start() {
        let dir = tempfile::tempdir().unwrap();
        let now = at("2026-11-26T23:00:00Z");
        let limiter = WarmupLimiter::load(dir.path(), caps(1000), now, &BTreeMap::new()).unwrap();
        let reservation = limiter.reserve(Provider::Gmail, 5, now).unwrap();
        let _ = limiter.settle(reservation, 5);
        drop(limiter);

        // A crash after more answers than the file holds: the evidence records counted them.
        let recorded = BTreeMap::from([(Provider::Gmail, 9), (Provider::Other, 2)]);
        let restarted = WarmupLimiter::load(dir.path(), caps(1000), now, &recorded).unwrap();
        assert_eq!(restarted.sent_today(now), recorded);
        drop(restarted);

        // Records cut short (e.g. a new evidence file after a broken tail) never lower a stored count.
        let recorded = BTreeMap::from([(Provider::Gmail, 3)]);
        let restarted = WarmupLimiter::load(dir.path(), caps(1000), now, &recorded).unwrap();
        assert_eq!(restarted.sent_today(now)[&Provider::Gmail], 5);
    }

    #[test]
    fn counts_that_cannot_be_stored_hold_no_delivery() {
        let now = at("2026-11-26T23:00:00Z");
        let limiter = WarmupLimiter::start(CountersFile::unwritable(), None, caps(100), now, &BTreeMap::new()).unwrap();
        let reservation = limiter.reserve(Provider::Gmail, 1, now).unwrap();
        assert!(limiter.settle(reservation, 1).is_some());
        let deadline = Instant::now() + Duration::from_secs(10);
        while limiter.lock().store_error.is_none() {
            assert!(Instant::now() < deadline, "the write to a full device did not fail");
            thread::sleep(Duration::from_millis(5));
        }
        assert!(limiter.lock().store_error.as_ref().unwrap().contains("No space left"));
        // The count is safe in the evidence record: the next delivery goes ahead.
        assert!(limiter.reserve(Provider::Gmail, 1, now).is_ok());
        assert_eq!(limiter.sent_today(now)[&Provider::Gmail], 1);
    }
}
