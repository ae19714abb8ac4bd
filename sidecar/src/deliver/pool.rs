//! Idle sessions kept briefly for the next message to the same MX address under the same policy, so a burst to
//! one domain pays for one TCP and TLS handshake. A session is reused only for the exact host, address and
//! authentication it was verified under.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::smtp::client::{Session, Target};

/// The identity a session was opened and verified under.
pub(super) fn key(target: &Target<'_>) -> String {
    format!(
        "{}|{}|{:?}|{:?}|{}",
        target.host, target.address, target.auth, target.min_version, target.allow_cleartext
    )
}

pub(super) struct SessionPool {
    idle: Mutex<Vec<Idle>>,
    ttl: Duration,
    max: usize,
}

struct Idle {
    key: String,
    since: Instant,
    session: Session,
}

impl SessionPool {
    pub(super) fn new(ttl: Duration, max: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            ttl,
            max,
        }
    }

    /// An idle session for `key`, most recent first; expired sessions are dropped (closing their connection).
    pub(super) fn take(&self, key: &str) -> Option<Session> {
        let mut idle = self.lock();
        self.expire(&mut idle);
        let position = idle.iter().rposition(|entry| entry.key == key)?;
        Some(idle.remove(position).session)
    }

    /// Keeps `session` for reuse; the oldest idle session makes room when the pool is full.
    pub(super) fn put(&self, key: String, session: Session) {
        if self.max == 0 {
            return;
        }
        let mut idle = self.lock();
        self.expire(&mut idle);
        if idle.len() >= self.max {
            idle.remove(0);
        }
        idle.push(Idle {
            key,
            since: Instant::now(),
            session,
        });
    }

    fn expire(&self, idle: &mut Vec<Idle>) {
        idle.retain(|entry| entry.since.elapsed() < self.ttl);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // A panic while holding the lock cannot leave the list half-changed: every change is one Vec call.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
