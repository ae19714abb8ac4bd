//! Time for cache expiry, passed in so tests can move it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;

    /// Wall-clock time, for expiries that must outlive the process (the persisted MTA-STS cache).
    fn wall(&self) -> Timestamp;
}

/// The real monotonic clock.
#[derive(Debug)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that moves only when told to; its wall time starts at the real one and moves with it.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<(Instant, Timestamp)>,
}

impl ManualClock {
    pub fn new() -> Self {
        Self {
            now: Mutex::new((Instant::now(), Timestamp::now())),
        }
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        now.0 += by;
        let by = SignedDuration::try_from(by).unwrap_or(SignedDuration::MAX);
        now.1 = now.1.saturating_add(by).unwrap_or(now.1);
    }

    fn read(&self) -> (Instant, Timestamp) {
        *self.now.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.read().0
    }

    fn wall(&self) -> Timestamp {
        self.read().1
    }
}
