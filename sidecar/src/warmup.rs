//! Warmup caps at send time. The operator renders today's limit for this address into sidecar.yaml; the limiter
//! splits it per provider class (`provider_caps`) and smooths it over the UTC day (`hourly_allowance`), counts what
//! this address sent, and refuses beyond the allowance with 452 4.7.1 so Postfix keeps the mail and retries.
//!
//! The same file keeps the day's recipients per provider and result, and the previous day's: `/status` reports both,
//! and after midnight the operator's warmup loop judges the day that just ended, even across a restart.
//!
//! Counts live in `<stateDir>/warmup-counters` ([`counters_file`]), so a restart or a pod moving to another node (the
//! volume moves with it) does not hand out the day's allowance twice. One thread stores them. While the
//! address warms up, a delivery that counted recipients answers Postfix only once its count is on disk
//! ([`WarmupLimiter::stored`]), so a crash right after an answer cannot forget it; counts made while a write runs share
//! the next one, so a busy address pays for one flush per group of deliveries, not one each. Other changes (the day's
//! results, a warm address's counts) are stored at most every [`WRITE_INTERVAL`]. While the counts cannot be stored,
//! a warming address sends nothing new. A delivery reserves its recipients before it connects, so concurrent
//! deliveries can never overshoot a cap together.

use std::collections::BTreeMap;
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
use tokio::sync::oneshot;

mod counters_file;

use counters_file::CountersFile;

use crate::relay::Relayed;

/// The shortest time between two writes of changes no delivery waits for (and between retries of a failed write):
/// changes within it share the next write.
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
    /// The latest change a delivery waits to see stored: the writer skips its pause until it is.
    awaited: u64,
    /// Why the last write failed; cleared by the next successful one.
    store_error: Option<String>,
    /// How far the writer got.
    progress: WriterProgress,
    /// Deliveries waiting for a change to be stored, with the change's number.
    waiting: Vec<(u64, Waiter)>,
    /// The writer is waiting for a change (not pausing between writes): a change must wake it.
    writer_idle: bool,
    /// Set when the limiter is dropped: the writer stores what is left and ends.
    closing: bool,
}

/// Where a delivery waiting for its count hears that it is stored, or why it cannot be.
type Waiter = oneshot::Sender<Relayed<Result<(), String>>>;

/// The state and the signal that wakes the writer thread.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The writer's progress, for deliveries waiting on their count.
#[derive(Clone, Copy, Debug, Default)]
struct WriterProgress {
    /// Every change up to this one is on disk.
    stored: u64,
    /// The last failed write covered the changes up to this one.
    failed_through: u64,
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

/// Why recipients may not be sent now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WarmupRefusal {
    CapReached(CapReached),
    /// The counts cannot be stored: sending on could exceed today's limit after a restart.
    CountsNotStored {
        reason: String,
    },
}

impl std::fmt::Display for WarmupRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CapReached(reached) => reached.fmt(f),
            Self::CountsNotStored { reason } => write!(
                f,
                "the warmup counts of this address cannot be stored ({reason}); deliveries wait so that a restart \
                 cannot exceed today's warmup limit; retrying later"
            ),
        }
    }
}

/// A settled count that must reach the disk before the delivery is answered; see [`WarmupLimiter::stored`].
#[derive(Debug)]
#[must_use = "the delivery must wait until its count is stored"]
pub struct PendingCount {
    change: u64,
}

/// Recipients counted against a provider's allowance until the delivery settles.
#[derive(Debug)]
#[must_use = "a reservation must be settled"]
pub struct Reservation {
    provider: Provider,
    count: u32,
}

impl WarmupLimiter {
    /// Loads today's counts from `state_dir` (a file from another day, or none, starts at zero) and starts the
    /// thread that stores them. An unreadable or corrupt file is an error: starting from zero could send a whole
    /// day's allowance twice.
    pub fn load(state_dir: &Path, caps: WarmupCaps, now: Timestamp) -> Result<Self, WarmupError> {
        let (file, stored) = CountersFile::open::<Counters>(state_dir)?;
        Self::start(file, stored, caps, now)
    }

    fn start(
        file: CountersFile,
        stored: Option<Counters>,
        caps: WarmupCaps,
        now: Timestamp,
    ) -> Result<Self, WarmupError> {
        let today = utc_date(now);
        let counters = match stored {
            Some(stored) if stored.date == today => stored,
            Some(stored) => stored.next_day(today),
            None => empty(today),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                caps,
                counters,
                reserved: BTreeMap::new(),
                changes: 0,
                awaited: 0,
                store_error: None,
                progress: WriterProgress::default(),
                waiting: Vec::new(),
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
    pub fn check(&self, provider: Provider, now: Timestamp) -> Result<(), WarmupRefusal> {
        let mut state = self.lock();
        roll_over(&mut state, now);
        state.room(provider, now).map(drop)
    }

    /// At delivery: reserves `count` recipients, or refuses when they do not all fit this hour's allowance.
    pub fn reserve(&self, provider: Provider, count: u32, now: Timestamp) -> Result<Reservation, WarmupRefusal> {
        let mut state = self.lock();
        roll_over(&mut state, now);
        if let Some(room) = state.room(provider, now)?
            && room < count
        {
            return Err(WarmupRefusal::CapReached(state.cap_reached(provider, now)));
        }
        *state.reserved.entry(provider).or_default() += count;
        Ok(Reservation { provider, count })
    }

    /// Ends a delivery: `sent` of the reserved recipients went to the provider (answered 2xx or 5xx by it), the
    /// rest return to the allowance. The new count holds at once. While a limit applies, the delivery must wait for
    /// the returned count to be stored before it answers; otherwise it reaches the disk within [`WRITE_INTERVAL`].
    pub fn settle(&self, reservation: Reservation, sent: u32) -> Option<PendingCount> {
        let mut state = self.lock();
        let reserved = state.reserved.entry(reservation.provider).or_default();
        *reserved = reserved.saturating_sub(reservation.count);
        if sent == 0 {
            return None;
        }
        *state.counters.sent.entry(reservation.provider).or_default() += sent.min(reservation.count);
        let limited = state.caps.daily_limit.is_some();
        let change = self.changed(state);
        limited.then_some(PendingCount { change })
    }

    /// Returns once the settled count is on disk, or with the reason the write that should have stored it failed
    /// (the writer keeps retrying; meanwhile [`Self::reserve`] refuses).
    pub async fn stored(&self, pending: PendingCount) -> Result<(), String> {
        let answer = {
            let mut state = self.lock();
            if state.progress.stored >= pending.change {
                return Ok(());
            }
            if state.progress.failed_through >= pending.change {
                return Err(store_error(&state));
            }
            let (waiter, answer) = oneshot::channel();
            state.waiting.push((pending.change, waiter));
            state.awaited = state.awaited.max(pending.change);
            answer
        };
        // The writer may be pausing between writes: a waiting delivery ends the pause.
        self.shared.changed.notify_one();
        match answer.await {
            // Dropping the answer passes it on to the other deliveries this write settled.
            Ok(answer) => answer.answer(),
            Err(_) => Err("the warmup counter writer has stopped".to_owned()),
        }
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

    /// Hands the counters changed under `state` to the writer thread; returns the change's number.
    fn changed(&self, mut state: MutexGuard<'_, State>) -> u64 {
        state.changes += 1;
        let change = state.changes;
        // Waking a writer that is pausing between writes would only cost a context switch.
        let wake = state.writer_idle;
        drop(state);
        if wake {
            self.shared.changed.notify_one();
        }
        change
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

/// The writer thread: waits for a change, stores the latest counts (one write and flush), and tells the waiting
/// deliveries. Then it pauses for [`WRITE_INTERVAL`] so the changes made meanwhile share the next write, unless a
/// delivery already waits for one of them. A failed write is retried after the pause. Ends once the limiter is
/// dropped and everything is stored (or the last try failed).
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
        let answer = match result {
            Ok(()) => {
                written = changes;
                if state.store_error.take().is_some() {
                    tracing::info!(path = %file.path().display(), "the warmup counters are stored again");
                }
                state.progress.stored = changes;
                Ok(())
            }
            Err(err) => {
                // The count still holds in memory; a warming address sends nothing new until a write succeeds.
                // Retried every interval: logged when the failure starts or changes, not at every retry.
                let reason = err.to_string();
                if state.store_error.as_ref() != Some(&reason) {
                    tracing::error!(%err, path = %file.path().display(), "cannot store the warmup counters");
                }
                state.store_error = Some(reason);
                state.progress.failed_through = changes;
                Err(store_error(&state))
            }
        };
        let (settled, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut state.waiting)
            .into_iter()
            .partition(|(change, _)| *change <= changes);
        state.waiting = waiting;
        let stop = state.closing && answer.is_err();
        drop(state);
        Relayed::answer_all(settled.into_iter().map(|(_, waiter)| waiter), answer);
        if stop {
            return;
        }
        let mut state = shared.lock();
        let resume = Instant::now() + WRITE_INTERVAL;
        while !state.closing && Instant::now() < resume && (state.awaited <= written || state.store_error.is_some()) {
            state = shared.wait_until(state, resume);
        }
    }
}

fn store_error(state: &State) -> String {
    state
        .store_error
        .clone()
        .unwrap_or_else(|| "the write failed".to_owned())
}

impl State {
    /// Recipients the provider may still take this hour; `None` when no limit applies.
    fn room(&self, provider: Provider, now: Timestamp) -> Result<Option<u32>, WarmupRefusal> {
        let Some(daily_limit) = self.caps.daily_limit else {
            return Ok(None);
        };
        if let Some(reason) = &self.store_error {
            return Err(WarmupRefusal::CountsNotStored { reason: reason.clone() });
        }
        let cap = provider_caps(daily_limit, &self.caps.provider_shares)
            .get(&provider)
            .copied()
            .unwrap_or(0);
        let allowance = hourly_allowance(cap, utc_hour(now));
        let used = self.counters.sent.get(&provider).copied().unwrap_or(0)
            + self.reserved.get(&provider).copied().unwrap_or(0);
        match allowance.checked_sub(used) {
            Some(room) if room > 0 => Ok(Some(room)),
            _ => Err(WarmupRefusal::CapReached(self.cap_reached(provider, now))),
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
        let limiter = WarmupLimiter::load(dir.path(), caps(100), noon).unwrap();
        // Default shares give gmail 40 of 100; by 12:59 the smoothed allowance is ceil(40 × 13 / 24) = 22.
        let first = limiter.reserve(Provider::Gmail, 20, noon).unwrap();
        let WarmupRefusal::CapReached(refused) = limiter.reserve(Provider::Gmail, 3, noon).unwrap_err() else {
            panic!("refused for another reason than the cap");
        };
        assert_eq!(refused.allowance, 22);
        assert_eq!(refused.daily_cap, 40);
        assert!(
            refused.to_string().contains("gmail may receive 22 of today's 40"),
            "{refused}"
        );
        let second = limiter.reserve(Provider::Gmail, 2, noon).unwrap();
        assert!(
            limiter.settle(first, 20).is_some(),
            "a limited count must be waited for"
        );
        assert!(limiter.settle(second, 0).is_none());
        assert_eq!(limiter.sent_today(noon)[&Provider::Gmail], 20);
        assert!(
            limiter.check(Provider::Gmail, noon).is_ok(),
            "2 left after a deferred delivery"
        );
        assert!(limiter.check(Provider::Microsoft, noon).is_ok());

        drop(limiter);
        let restarted = WarmupLimiter::load(dir.path(), caps(100), noon).unwrap();
        assert_eq!(restarted.sent_today(noon)[&Provider::Gmail], 20);
        assert!(restarted.reserve(Provider::Gmail, 3, noon).is_err());

        let tomorrow = at("2026-11-27T00:30:00Z");
        let next_day = WarmupLimiter::load(dir.path(), caps(100), tomorrow).unwrap();
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
        let limiter = Arc::new(WarmupLimiter::load(dir.path(), caps(10_000), now).unwrap());
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
        let limiter = WarmupLimiter::load(dir.path(), caps(100), evening).unwrap();
        limiter.record(Provider::Gmail, counts, evening);
        drop(limiter);

        let restarted = WarmupLimiter::load(dir.path(), caps(100), evening).unwrap();
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
        let next = WarmupLimiter::load(dir.path(), caps(100), after_midnight).unwrap();
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
        let limiter = WarmupLimiter::load(dir.path(), warm, now).unwrap();
        assert!(!limiter.is_active());
        let reservation = limiter.reserve(Provider::Gmail, 1_000_000, now).unwrap();
        assert!(
            limiter.settle(reservation, 1_000_000).is_none(),
            "no limit, nothing to wait for"
        );
        drop(limiter);

        fs::write(dir.path().join("warmup-counters"), b"{not json").unwrap();
        let err = WarmupLimiter::load(dir.path(), caps(10), now).unwrap_err();
        assert!(err.to_string().contains("refusing to start from zero"), "{err}");
    }

    /// What a sidecar started now would load.
    fn stored_counters(dir: &Path) -> Option<Counters> {
        CountersFile::open::<Counters>(dir).ok()?.1
    }

    fn stored_count(dir: &Path) -> Option<u32> {
        stored_counters(dir)?.sent.get(&Provider::Gmail).copied()
    }

    #[tokio::test]
    async fn a_limited_count_is_on_disk_when_its_delivery_may_answer() {
        let dir = tempfile::tempdir().unwrap();
        let now = at("2026-11-26T23:00:00Z");
        let limiter = WarmupLimiter::load(dir.path(), caps(100), now).unwrap();
        for sent in 1..=5 {
            let reservation = limiter.reserve(Provider::Gmail, 1, now).unwrap();
            let pending = limiter.settle(reservation, 1).unwrap();
            limiter.stored(pending).await.unwrap();
            // Read while the limiter runs, as a crash right after the answer would leave it.
            assert_eq!(stored_count(dir.path()), Some(sent));
        }
    }

    #[tokio::test]
    async fn deliveries_sharing_a_write_each_answer_only_once_their_count_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let now = at("2026-11-26T23:00:00Z");
        let limiter = WarmupLimiter::load(dir.path(), caps(1000), now).unwrap();
        let deliveries = (0..20).map(|_| async {
            let reservation = limiter.reserve(Provider::Gmail, 1, now).unwrap();
            let pending = limiter.settle(reservation, 1).unwrap();
            let counted = limiter.sent_today(now)[&Provider::Gmail];
            limiter.stored(pending).await.unwrap();
            let on_disk = stored_count(dir.path()).unwrap();
            assert!(
                on_disk >= counted,
                "answered with {counted} counted but {on_disk} on disk"
            );
        });
        futures::future::join_all(deliveries).await;
        assert_eq!(stored_count(dir.path()), Some(20));
    }

    #[tokio::test]
    async fn counts_that_cannot_be_stored_hold_new_deliveries() {
        let now = at("2026-11-26T23:00:00Z");
        let limiter = WarmupLimiter::start(CountersFile::unwritable(), None, caps(100), now).unwrap();
        let reservation = limiter.reserve(Provider::Gmail, 1, now).unwrap();
        let pending = limiter.settle(reservation, 1).unwrap();
        let reason = limiter.stored(pending).await.unwrap_err();
        assert!(reason.contains("No space left"), "{reason}");
        let refusal = limiter.reserve(Provider::Gmail, 1, now).unwrap_err();
        assert!(matches!(refusal, WarmupRefusal::CountsNotStored { .. }), "{refusal}");
        assert!(refusal.to_string().contains("cannot be stored"), "{refusal}");
    }
}
