//! A short local circuit breaker per provider class on this address. Closed: deliveries flow and each answered
//! delivery is a sample. It opens when, within `window`, at least `min_samples` deliveries were answered and at
//! least `deferred_percent` of them deferred, or after `streak` consecutive rate-limit or reputation refusals
//! (the strongest sign: the provider is throttling or blocking this address, more mail makes it worse). Open:
//! recipients are refused at RCPT time (451 4.7.1, Postfix keeps the mail) and nothing is sent. After the pause
//! it is half-open: one delivery goes through as a probe; a delivery closes it and resets the pause, anything
//! else re-opens it with the pause doubled (exponential re-probing, up to `max_pause`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use securemail_api::sidecar_status::{CircuitState, CircuitStatus};

use super::Reason;
use crate::deliver::WallClock;
use crate::metrics::Metrics;
use crate::policy::clock::Clock;
use crate::provider::Provider;

/// The thresholds; [`Default`] is what production uses.
#[derive(Clone, Debug)]
pub struct BreakerSettings {
    pub window: Duration,
    pub min_samples: usize,
    pub deferred_percent: usize,
    pub streak: u32,
    pub first_pause: Duration,
    pub max_pause: Duration,
    /// A probe that has not reported by then is given up (its session ended without an answer), so another can
    /// go. Postfix waits 1200 s for the answer to a delivery.
    pub probe_timeout: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(120),
            min_samples: 10,
            deferred_percent: 50,
            streak: 5,
            first_pause: Duration::from_secs(60),
            max_pause: Duration::from_secs(3600),
            probe_timeout: Duration::from_secs(1200),
        }
    }
}

/// What one recipient domain's delivery to a provider showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// At least one recipient was accepted.
    Delivered,
    /// The provider answered 4xx.
    Deferred(Reason),
    /// The provider answered 5xx for every recipient.
    Refused(Reason),
    /// No refusal from the provider: connection, TLS, DNS or a local decision.
    NoAnswer,
}

/// Whether a delivery may go to the provider now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Pass,
    /// The half-open breaker's one probe; report its result with this id.
    Probe(u64),
    Paused {
        retry_at: Timestamp,
    },
}

/// Providers with a breaker: `other` is many unrelated receivers, whose deferrals say nothing about each other.
pub const GUARDED: [Provider; 4] = [Provider::Gmail, Provider::Microsoft, Provider::Yahoo, Provider::Apple];

/// The breakers of one address; shared by every engine the sidecar builds, so a reload keeps their state.
pub struct Breakers {
    settings: BreakerSettings,
    clock: Arc<dyn Clock>,
    wall: Arc<dyn WallClock>,
    metrics: Metrics,
    circuits: Mutex<BTreeMap<Provider, Circuit>>,
}

struct Circuit {
    state: State,
    pause: Duration,
    /// Answered deliveries in the window: when, and whether deferred.
    samples: VecDeque<(Instant, bool)>,
    streak: u32,
    opens: u64,
    probes: u64,
}

#[derive(Clone, Copy)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probe: Option<(u64, Instant)> },
}

impl State {
    fn public(self) -> CircuitState {
        match self {
            State::Closed => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }
}

impl std::fmt::Debug for Breakers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breakers")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Breakers {
    /// `clock` measures windows and pauses; `wall` only dates the retry time in replies and `/status`.
    pub fn new(settings: BreakerSettings, clock: Arc<dyn Clock>, wall: Arc<dyn WallClock>, metrics: Metrics) -> Self {
        let circuits = GUARDED
            .iter()
            .map(|&provider| {
                let circuit = Circuit {
                    state: State::Closed,
                    pause: settings.first_pause,
                    samples: VecDeque::new(),
                    streak: 0,
                    opens: 0,
                    probes: 0,
                };
                (provider, circuit)
            })
            .collect();
        Self {
            settings,
            clock,
            wall,
            metrics,
            circuits: Mutex::new(circuits),
        }
    }

    /// True when no provider is paused or probing: RCPT then needs no look-up at all.
    pub fn all_closed(&self) -> bool {
        self.lock()
            .values()
            .all(|circuit| matches!(circuit.state, State::Closed))
    }

    /// Whether a new recipient for `provider` may join a transaction; `Err` names when to retry. A half-open
    /// breaker accepts recipients until its probe is out: the probe is taken at delivery, where it is certain that
    /// exactly one transaction goes.
    pub fn admit_recipient(&self, provider: Provider) -> Result<(), Timestamp> {
        let now = self.clock.now();
        let circuits = self.lock();
        match circuits.get(&provider).map(|circuit| circuit.state) {
            None | Some(State::Closed | State::HalfOpen { probe: None }) => Ok(()),
            Some(State::Open { until }) => Err(self.wall_at(now, until)),
            Some(State::HalfOpen { probe: Some(_) }) => Err(self.wall_at(now, now + self.settings.first_pause)),
        }
    }

    /// Whether a delivery to `provider` may start now.
    pub fn admit_delivery(&self, provider: Provider) -> Admission {
        let now = self.clock.now();
        let mut circuits = self.lock();
        let Some(circuit) = circuits.get_mut(&provider) else {
            return Admission::Pass;
        };
        match circuit.state {
            State::Closed => Admission::Pass,
            State::Open { until } => Admission::Paused {
                retry_at: self.wall_at(now, until),
            },
            State::HalfOpen { probe: None } => {
                circuit.probes += 1;
                circuit.state = State::HalfOpen {
                    probe: Some((circuit.probes, now)),
                };
                tracing::info!(%provider, "circuit half-open: sending one delivery as a probe");
                Admission::Probe(circuit.probes)
            }
            State::HalfOpen { probe: Some(_) } => Admission::Paused {
                retry_at: self.wall_at(now, now + self.settings.first_pause),
            },
        }
    }

    /// The result of a delivery to `provider`; `probe` as [`Admission::Probe`] gave it. Results of deliveries
    /// that started before the breaker opened are ignored: the pause has begun already.
    pub fn record(&self, provider: Provider, signal: Signal, probe: Option<u64>) {
        let now = self.clock.now();
        let mut circuits = self.lock();
        let Some(circuit) = circuits.get_mut(&provider) else {
            return;
        };
        match circuit.state {
            State::HalfOpen { probe: Some((id, _)) } if probe == Some(id) => {
                let provider_accepts = match signal {
                    Signal::Delivered => true,
                    Signal::Refused(reason) => !reason.is_about_the_sender(),
                    Signal::Deferred(_) | Signal::NoAnswer => false,
                };
                if provider_accepts {
                    circuit.state = State::Closed;
                    circuit.pause = self.settings.first_pause;
                    self.metrics.circuit_state(provider, CircuitState::Closed);
                    tracing::info!(%provider, "circuit closed: the probe went through");
                } else {
                    circuit.pause = (circuit.pause * 2).min(self.settings.max_pause);
                    self.open(provider, circuit, now);
                }
            }
            State::Closed => {
                let (deferred, about_the_sender) = match signal {
                    Signal::NoAnswer => return,
                    Signal::Delivered => (false, false),
                    Signal::Deferred(reason) => (true, reason.is_about_the_sender()),
                    Signal::Refused(reason) => (false, reason.is_about_the_sender()),
                };
                circuit.streak = if about_the_sender { circuit.streak + 1 } else { 0 };
                circuit.samples.push_back((now, deferred));
                while circuit
                    .samples
                    .front()
                    .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.settings.window)
                {
                    circuit.samples.pop_front();
                }
                let total = circuit.samples.len();
                let deferrals = circuit.samples.iter().filter(|(_, deferred)| *deferred).count();
                let spike =
                    total >= self.settings.min_samples && deferrals * 100 >= self.settings.deferred_percent * total;
                if spike || circuit.streak >= self.settings.streak {
                    self.open(provider, circuit, now);
                }
            }
            State::Open { .. } | State::HalfOpen { .. } => {}
        }
    }

    /// Every guarded provider's breaker now.
    pub fn status(&self) -> Vec<(Provider, CircuitStatus)> {
        let now = self.clock.now();
        self.lock()
            .iter()
            .map(|(&provider, circuit)| {
                let retry_at = match circuit.state {
                    State::Open { until } => Some(self.wall_at(now, until)),
                    State::Closed | State::HalfOpen { .. } => None,
                };
                let status = CircuitStatus {
                    state: circuit.state.public(),
                    retry_at,
                    pause_seconds: circuit.pause.as_secs(),
                    opens: circuit.opens,
                };
                (provider, status)
            })
            .collect()
    }

    fn open(&self, provider: Provider, circuit: &mut Circuit, now: Instant) {
        circuit.state = State::Open {
            until: now + circuit.pause,
        };
        circuit.opens += 1;
        circuit.samples.clear();
        circuit.streak = 0;
        self.metrics.circuit_state(provider, CircuitState::Open);
        self.metrics.circuit_opened(provider);
        tracing::warn!(
            %provider,
            pause_seconds = circuit.pause.as_secs(),
            "circuit open: deferrals spiked; pausing deliveries to this provider from this address"
        );
    }

    /// The circuits with elapsed pauses made half-open and lost probes given up, so every reader sees the state
    /// as of now.
    fn lock(&self) -> MutexGuard<'_, BTreeMap<Provider, Circuit>> {
        // Each change is a few plain assignments: a panic elsewhere cannot leave a circuit half-changed.
        let mut circuits = self.circuits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = self.clock.now();
        for (&provider, circuit) in circuits.iter_mut() {
            let ready = match circuit.state {
                State::Open { until } => now >= until,
                State::HalfOpen {
                    probe: Some((_, since)),
                } => now.saturating_duration_since(since) >= self.settings.probe_timeout,
                State::Closed | State::HalfOpen { probe: None } => false,
            };
            if ready {
                circuit.state = State::HalfOpen { probe: None };
                self.metrics.circuit_state(provider, CircuitState::HalfOpen);
            }
        }
        circuits
    }

    /// The wall-clock time `at` is, `now` being the monotonic present.
    fn wall_at(&self, now: Instant, at: Instant) -> Timestamp {
        let wall = self.wall.now();
        wall.checked_add(at.saturating_duration_since(now)).unwrap_or(wall)
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::policy::clock::ManualClock;

    struct Wall;

    impl WallClock for Wall {
        fn now(&self) -> Timestamp {
            Timestamp::from_second(1_767_225_600).unwrap()
        }
    }

    fn breakers() -> (Breakers, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let wall: Arc<dyn WallClock> = Arc::new(Wall);
        let metrics = Metrics::register(
            &mut Registry::default(),
            "t/t",
            "192.0.2.10".parse().unwrap(),
            Arc::clone(&wall),
        );
        let breakers = Breakers::new(BreakerSettings::default(), clock.clone(), wall, metrics);
        (breakers, clock)
    }

    fn state(breakers: &Breakers, provider: Provider) -> CircuitStatus {
        breakers.status().into_iter().find(|(p, _)| *p == provider).unwrap().1
    }

    #[test]
    fn a_deferral_spike_opens_only_with_enough_samples_in_the_window() {
        let (gmail, _clock) = breakers();
        for _ in 0..5 {
            gmail.record(Provider::Gmail, Signal::Deferred(Reason::Unknown), None);
            gmail.record(Provider::Gmail, Signal::Delivered, None);
        }
        assert_eq!(
            state(&gmail, Provider::Gmail).state,
            CircuitState::Open,
            "10 samples, 50% deferred"
        );

        let (yahoo, clock) = breakers();
        for _ in 0..9 {
            yahoo.record(Provider::Yahoo, Signal::Deferred(Reason::Unknown), None);
        }
        // Older than the window: forgotten, so the tenth does not reach the minimum.
        clock.advance(Duration::from_secs(121));
        yahoo.record(Provider::Yahoo, Signal::Deferred(Reason::Unknown), None);
        assert_eq!(state(&yahoo, Provider::Yahoo).state, CircuitState::Closed);
        // Failures without an answer from the provider are not samples.
        for _ in 0..20 {
            yahoo.record(Provider::Yahoo, Signal::NoAnswer, None);
        }
        assert_eq!(state(&yahoo, Provider::Yahoo).state, CircuitState::Closed);
    }

    #[test]
    fn consecutive_sender_refusals_open_and_anything_else_breaks_the_streak() {
        let (breakers, _clock) = breakers();
        for _ in 0..4 {
            breakers.record(Provider::Microsoft, Signal::Refused(Reason::ReputationBlock), None);
        }
        breakers.record(Provider::Microsoft, Signal::Refused(Reason::Unknown), None);
        for _ in 0..4 {
            breakers.record(Provider::Microsoft, Signal::Deferred(Reason::RateLimited), None);
        }
        assert_eq!(state(&breakers, Provider::Microsoft).state, CircuitState::Closed);
        breakers.record(Provider::Microsoft, Signal::Refused(Reason::ReputationBlock), None);
        let status = state(&breakers, Provider::Microsoft);
        assert_eq!((status.state, status.opens), (CircuitState::Open, 1));
        assert_eq!(status.retry_at, Some(Timestamp::from_second(1_767_225_660).unwrap()));
        assert!(breakers.admit_recipient(Provider::Gmail).is_ok());
        assert!(breakers.admit_recipient(Provider::Microsoft).is_err());
        // `other` has no breaker.
        for _ in 0..10 {
            breakers.record(Provider::Other, Signal::Deferred(Reason::RateLimited), None);
        }
        assert_eq!(breakers.admit_delivery(Provider::Other), Admission::Pass);
    }

    #[test]
    fn half_open_lets_one_probe_through_and_failed_probes_double_the_pause_up_to_the_maximum() {
        let (breakers, clock) = breakers();
        for _ in 0..5 {
            breakers.record(Provider::Apple, Signal::Deferred(Reason::RateLimited), None);
        }
        let mut pause = Duration::from_secs(60);
        for _ in 0..8 {
            assert!(matches!(
                breakers.admit_delivery(Provider::Apple),
                Admission::Paused { .. }
            ));
            clock.advance(pause);
            assert_eq!(state(&breakers, Provider::Apple).state, CircuitState::HalfOpen);
            assert!(breakers.admit_recipient(Provider::Apple).is_ok());
            let Admission::Probe(id) = breakers.admit_delivery(Provider::Apple) else {
                panic!("no probe")
            };
            assert!(matches!(
                breakers.admit_delivery(Provider::Apple),
                Admission::Paused { .. }
            ));
            assert!(breakers.admit_recipient(Provider::Apple).is_err());
            // A late result of an earlier delivery is not the probe's.
            breakers.record(Provider::Apple, Signal::Delivered, None);
            breakers.record(Provider::Apple, Signal::Deferred(Reason::RateLimited), Some(id));
            pause = (pause * 2).min(Duration::from_secs(3600));
            assert_eq!(state(&breakers, Provider::Apple).pause_seconds, pause.as_secs());
        }
        clock.advance(pause);
        let Admission::Probe(id) = breakers.admit_delivery(Provider::Apple) else {
            panic!("no probe")
        };
        breakers.record(Provider::Apple, Signal::Delivered, Some(id));
        let status = state(&breakers, Provider::Apple);
        assert_eq!(
            (status.state, status.pause_seconds, status.opens),
            (CircuitState::Closed, 60, 9)
        );
        assert!(breakers.all_closed());
    }

    #[test]
    fn a_probe_that_never_reports_is_given_up() {
        let (breakers, clock) = breakers();
        for _ in 0..5 {
            breakers.record(Provider::Gmail, Signal::Deferred(Reason::RateLimited), None);
        }
        clock.advance(Duration::from_secs(60));
        assert!(matches!(breakers.admit_delivery(Provider::Gmail), Admission::Probe(_)));
        clock.advance(Duration::from_secs(1200));
        assert!(matches!(breakers.admit_delivery(Provider::Gmail), Admission::Probe(_)));
    }
}
