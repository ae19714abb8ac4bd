//! The per-address warmup state machine: once per UTC day it looks at yesterday's results and advances the
//! schedule by one day, holds it, rolls it back, or restarts it after an idle period. Pure: the caller brings the
//! results, the blocklist verdict and the date.

use jiff::civil::Date;

use crate::sidecar_status::DeliveryDay;
use crate::tenant::{PoolAddressState, WarmupSpec};

use super::{day_on, schedule_length};

/// A bounce rate this many times its threshold is severe (rolls back instead of holding): a provider blocking the
/// address shows up as bounces well past the usual 2%, while a bad list only nudges it over.
const SEVERE_BOUNCE_FACTOR: f64 = 2.0;

/// Where one address is in its warmup, as the operator keeps it between evaluations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressWarmup {
    /// Schedule day the address sends on (1-based); past the schedule's last day once warm.
    pub day: u32,
    pub state: WarmupState,
    /// Last UTC day the address attempted any delivery; `None` if it never has (then it cannot count as idle).
    pub last_sent: Option<Date>,
    /// The `today` of the last evaluation; a second evaluation on that date changes nothing.
    pub last_evaluated: Option<Date>,
}

/// Warmup state of one address; the day lives in [`AddressWarmup::day`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WarmupState {
    /// Following the schedule; `reason` is set when the day was reset rather than advanced (an idle re-warm).
    Warming { reason: Option<String> },
    /// Day kept because yesterday's results were over a threshold (or there were none).
    Held { reason: String },
    /// Stepped back from day `from` on a severe signal.
    RolledBack { from: u32, reason: String },
    /// Past the schedule: no warmup limit.
    Warm,
}

/// What one evaluation did, for events and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// `today` was already evaluated (or lies before the last evaluation); nothing changed.
    AlreadyEvaluated,
    Advanced {
        from: u32,
        to: u32,
    },
    /// Advanced past the last day of the schedule.
    BecameWarm,
    StayedWarm,
    Held,
    RolledBack {
        from: u32,
        to: u32,
    },
    /// Restarted at day 1 after sending nothing for `idle_days`.
    Rewarmed {
        idle_days: u32,
    },
}

/// One address's delivery results for one UTC day. Rates are percent of `attempts`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DayResults {
    pub attempts: u64,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
    /// Spam complaints; 0 while no feedback loop reports them.
    pub complaints: u64,
}

impl AddressWarmup {
    /// A new address whose schedule started on `start`: on that day of the schedule today (warm if past it), with
    /// today counted as evaluated so the first verdict comes tomorrow, on a full day of results.
    pub fn begin(spec: &WarmupSpec, start: Date, today: Date) -> Self {
        let day = day_on(start, today);
        let state = if day > schedule_length(spec) {
            WarmupState::Warm
        } else {
            WarmupState::Warming { reason: None }
        };
        Self {
            day,
            state,
            last_sent: None,
            last_evaluated: Some(today),
        }
    }

    /// Today's per-address limit: the schedule's limit on [`Self::day`], or `None` once warm.
    pub fn daily_limit(&self, spec: &WarmupSpec) -> Option<u32> {
        match self.state {
            WarmupState::Warm => None,
            _ => super::daily_limit(spec, self.day),
        }
    }
}

impl WarmupState {
    /// The human reason status shows, if the state has one.
    pub fn reason(&self) -> Option<&str> {
        match self {
            WarmupState::Warming { reason } => reason.as_deref(),
            WarmupState::Held { reason } | WarmupState::RolledBack { reason, .. } => Some(reason),
            WarmupState::Warm => None,
        }
    }
}

impl From<&WarmupState> for PoolAddressState {
    fn from(state: &WarmupState) -> Self {
        match state {
            WarmupState::Warming { .. } => PoolAddressState::Warming,
            WarmupState::Held { .. } => PoolAddressState::Held,
            WarmupState::RolledBack { .. } => PoolAddressState::RolledBack,
            WarmupState::Warm => PoolAddressState::Warm,
        }
    }
}

impl DayResults {
    /// The address's totals over all provider classes of a day the sidecar reported (no complaints yet).
    pub fn from_delivery_day(day: &DeliveryDay) -> Self {
        day.providers.values().fold(Self::default(), |total, counts| {
            let attempts = counts
                .delivered
                .saturating_add(counts.deferred)
                .saturating_add(counts.bounced);
            Self {
                attempts: total.attempts.saturating_add(attempts),
                delivered: total.delivered.saturating_add(counts.delivered),
                deferred: total.deferred.saturating_add(counts.deferred),
                bounced: total.bounced.saturating_add(counts.bounced),
                complaints: total.complaints,
            }
        })
    }

    fn rate(&self, count: u64) -> f64 {
        count as f64 * 100.0 / self.attempts as f64
    }
}

/// Decides an address's warmup for `today` from `yesterday`'s results and whether a blocklist lists it.
///
/// In order: an address idle for `spec.idle_rewarm_days` restarts at day 1; a listing or a bounce rate at least
/// twice its threshold rolls back `spec.rollback_days` (never below day 1); no attempts holds; any rate over its
/// threshold holds (a warm address stays warm); otherwise the day advances by one, becoming warm past the
/// schedule. A date already evaluated returns `previous` unchanged.
pub fn evaluate(
    previous: &AddressWarmup,
    yesterday: &DayResults,
    listed: bool,
    spec: &WarmupSpec,
    today: Date,
) -> (AddressWarmup, Transition) {
    if previous.last_evaluated.is_some_and(|evaluated| evaluated >= today) {
        return (previous.clone(), Transition::AlreadyEvaluated);
    }
    let past_schedule = schedule_length(spec).saturating_add(1);
    let warm = previous.state == WarmupState::Warm || previous.day >= past_schedule;
    let current = if warm { past_schedule } else { previous.day.max(1) };
    let day_before = today.yesterday().unwrap_or(today);
    let sent = yesterday.attempts > 0;
    let last_sent = if sent {
        previous.last_sent.max(Some(day_before))
    } else {
        previous.last_sent
    };
    let next = |day: u32, state: WarmupState| AddressWarmup {
        day,
        state,
        last_sent,
        last_evaluated: Some(today),
    };
    let roll_back = |reason: String| {
        let to = current.saturating_sub(spec.rollback_days).max(1);
        let state = WarmupState::RolledBack { from: current, reason };
        (next(to, state), Transition::RolledBack { from: current, to })
    };
    let hold = |reason: String| (next(current, WarmupState::Held { reason }), Transition::Held);
    let stay_warm = || (next(current, WarmupState::Warm), Transition::StayedWarm);

    let idle_days = match last_sent {
        Some(last) if !sent => last.until(day_before).map_or(0, |span| span.get_days()),
        _ => 0,
    };
    let idle_days = u32::try_from(idle_days).unwrap_or(0);
    if idle_days >= spec.idle_rewarm_days.max(1) && current > 1 {
        let reason = Some(format!("idle for {idle_days} days"));
        return (
            next(1, WarmupState::Warming { reason }),
            Transition::Rewarmed { idle_days },
        );
    }
    if listed {
        return roll_back("listed on a DNS blocklist".to_owned());
    }
    if !sent {
        return if warm {
            stay_warm()
        } else {
            hold("nothing sent yesterday".to_owned())
        };
    }

    let thresholds = &spec.thresholds;
    let bounce_rate = yesterday.rate(yesterday.bounced);
    if bounce_rate > thresholds.bounce_rate_percent
        && bounce_rate >= SEVERE_BOUNCE_FACTOR * thresholds.bounce_rate_percent
    {
        return roll_back(format!(
            "bounce rate {} at least twice the {}% threshold",
            percent(bounce_rate),
            thresholds.bounce_rate_percent
        ));
    }
    if warm {
        // Without a limit there is nothing to hold at; the sidecar's circuit breaker handles short bursts.
        return stay_warm();
    }
    let over: Vec<String> = [
        ("bounce", bounce_rate, thresholds.bounce_rate_percent),
        (
            "deferral",
            yesterday.rate(yesterday.deferred),
            thresholds.deferral_rate_percent,
        ),
        (
            "complaint",
            yesterday.rate(yesterday.complaints),
            thresholds.complaint_rate_percent,
        ),
    ]
    .into_iter()
    .filter(|(_, rate, threshold)| rate > threshold)
    .map(|(name, rate, threshold)| format!("{name} rate {} over {threshold}%", percent(rate)))
    .collect();
    if !over.is_empty() {
        return hold(over.join(", "));
    }
    let to = current + 1;
    if to >= past_schedule {
        (next(past_schedule, WarmupState::Warm), Transition::BecameWarm)
    } else {
        let state = WarmupState::Warming { reason: None };
        (next(to, state), Transition::Advanced { from: current, to })
    }
}

/// One decimal, two below 1% so a 0.08% complaint rate does not print as 0.1%.
fn percent(rate: f64) -> String {
    if rate >= 1.0 {
        format!("{rate:.1}%")
    } else {
        format!("{rate:.2}%")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use jiff::ToSpan;
    use jiff::civil::date;
    use proptest::prelude::*;

    use super::*;
    use crate::provider::Provider;
    use crate::sidecar_status::ResultCounts;
    use crate::tenant::{WarmupPreset, WarmupThresholds};

    const TODAY: Date = date(2026, 12, 10);

    fn spec() -> WarmupSpec {
        WarmupSpec {
            preset: Some(WarmupPreset::Aggressive),
            ..WarmupSpec::default()
        }
    }

    fn warming(day: u32) -> AddressWarmup {
        AddressWarmup {
            day,
            state: WarmupState::Warming { reason: None },
            last_sent: Some(date(2026, 12, 8)),
            last_evaluated: Some(date(2026, 12, 9)),
        }
    }

    fn results(attempts: u64, deferred: u64, bounced: u64, complaints: u64) -> DayResults {
        DayResults {
            attempts,
            delivered: attempts - deferred - bounced,
            deferred,
            bounced,
            complaints,
        }
    }

    #[test]
    fn a_good_day_advances_one_day_and_records_the_send() {
        let (next, transition) = evaluate(&warming(4), &results(1_000, 100, 20, 1), false, &spec(), TODAY);
        assert_eq!(transition, Transition::Advanced { from: 4, to: 5 });
        assert_eq!(next.day, 5);
        assert_eq!(next.state, WarmupState::Warming { reason: None });
        assert_eq!(next.last_sent, Some(date(2026, 12, 9)));
        assert_eq!(next.last_evaluated, Some(TODAY));
    }

    #[test]
    fn rates_over_a_threshold_hold_and_name_every_rate_and_threshold() {
        let (next, transition) = evaluate(&warming(4), &results(1_000, 142, 0, 0), false, &spec(), TODAY);
        assert_eq!((next.day, transition), (4, Transition::Held));
        assert_eq!(next.state.reason(), Some("deferral rate 14.2% over 10%"));
        let (next, _) = evaluate(&warming(4), &results(10_000, 1_100, 300, 20), false, &spec(), TODAY);
        assert_eq!(
            next.state.reason(),
            Some("bounce rate 3.0% over 2%, deferral rate 11.0% over 10%, complaint rate 0.20% over 0.1%")
        );
        assert_eq!(PoolAddressState::from(&next.state), PoolAddressState::Held);
    }

    #[test]
    fn severe_bounces_and_listings_roll_back_but_not_below_day_1() {
        let (next, transition) = evaluate(&warming(7), &results(100, 0, 4, 0), false, &spec(), TODAY);
        assert_eq!(transition, Transition::RolledBack { from: 7, to: 4 });
        assert_eq!(
            next.state,
            WarmupState::RolledBack {
                from: 7,
                reason: "bounce rate 4.0% at least twice the 2% threshold".to_owned()
            }
        );
        let (next, transition) = evaluate(&warming(2), &results(100, 0, 0, 0), true, &spec(), TODAY);
        assert_eq!(transition, Transition::RolledBack { from: 2, to: 1 });
        assert_eq!(next.state.reason(), Some("listed on a DNS blocklist"));
    }

    #[test]
    fn a_warm_address_stays_warm_on_mild_signals_and_rolls_back_into_the_schedule_on_severe_ones() {
        let warm = AddressWarmup {
            day: 15,
            state: WarmupState::Warm,
            ..warming(15)
        };
        let (next, transition) = evaluate(&warm, &results(1_000, 500, 0, 0), false, &spec(), TODAY);
        assert_eq!((next.state, transition), (WarmupState::Warm, Transition::StayedWarm));
        let (next, transition) = evaluate(&warm, &DayResults::default(), true, &spec(), TODAY);
        assert_eq!(transition, Transition::RolledBack { from: 15, to: 12 });
        assert_eq!(super::super::daily_limit(&spec(), next.day), Some(90_000));
    }

    #[test]
    fn the_last_good_day_of_the_schedule_makes_the_address_warm() {
        let (next, transition) = evaluate(&warming(14), &results(10, 0, 0, 0), false, &spec(), TODAY);
        assert_eq!((next.state, transition), (WarmupState::Warm, Transition::BecameWarm));
        assert_eq!(super::super::daily_limit(&spec(), next.day), None);
    }

    #[test]
    fn a_day_without_attempts_holds_without_counting_as_bad() {
        let (next, transition) = evaluate(&warming(4), &DayResults::default(), false, &spec(), TODAY);
        assert_eq!((next.day, transition), (4, Transition::Held));
        assert_eq!(next.state.reason(), Some("nothing sent yesterday"));
        assert_eq!(next.last_sent, Some(date(2026, 12, 8)), "idle counting keeps its start");
    }

    #[test]
    fn idling_for_the_configured_days_rewarms_from_day_1() {
        let idle = AddressWarmup {
            last_sent: Some(TODAY - 31.days()),
            ..warming(9)
        };
        let (next, transition) = evaluate(&idle, &DayResults::default(), false, &spec(), TODAY);
        assert_eq!(transition, Transition::Rewarmed { idle_days: 30 });
        assert_eq!(next.day, 1);
        assert_eq!(next.state.reason(), Some("idle for 30 days"));
        let one_day_short = AddressWarmup {
            last_sent: Some(TODAY - 30.days()),
            ..warming(9)
        };
        let (next, _) = evaluate(&one_day_short, &DayResults::default(), false, &spec(), TODAY);
        assert_eq!(next.day, 9);
    }

    #[test]
    fn a_second_evaluation_of_the_same_date_changes_nothing() {
        let (once, _) = evaluate(&warming(4), &results(100, 0, 0, 0), false, &spec(), TODAY);
        let (twice, transition) = evaluate(&once, &results(100, 0, 0, 0), false, &spec(), TODAY);
        assert_eq!((twice, transition), (once, Transition::AlreadyEvaluated));
    }

    #[test]
    fn a_new_address_starts_on_its_schedule_day_and_is_first_judged_tomorrow() {
        let begun = AddressWarmup::begin(&spec(), date(2026, 12, 8), TODAY);
        assert_eq!((begun.day, &begun.state), (3, &WarmupState::Warming { reason: None }));
        let (_, transition) = evaluate(&begun, &DayResults::default(), false, &spec(), TODAY);
        assert_eq!(transition, Transition::AlreadyEvaluated);
        let long_ago = AddressWarmup::begin(&spec(), date(2026, 1, 1), TODAY);
        assert_eq!(long_ago.state, WarmupState::Warm);
    }

    #[test]
    fn sidecar_days_sum_over_providers() {
        let counts = |delivered, deferred, bounced| ResultCounts {
            delivered,
            deferred,
            bounced,
        };
        let day = DeliveryDay {
            date: TODAY,
            providers: BTreeMap::from([(Provider::Gmail, counts(90, 8, 2)), (Provider::Other, counts(10, 0, 1))]),
        };
        assert_eq!(DayResults::from_delivery_day(&day), results(111, 8, 3, 0));
    }

    fn any_state() -> impl Strategy<Value = WarmupState> {
        prop_oneof![
            Just(WarmupState::Warming { reason: None }),
            Just(WarmupState::Held { reason: "r".to_owned() }),
            (1u32..40).prop_map(|from| WarmupState::RolledBack {
                from,
                reason: "r".to_owned()
            }),
            Just(WarmupState::Warm),
        ]
    }

    fn any_address() -> impl Strategy<Value = AddressWarmup> {
        (
            0u32..40,
            any_state(),
            prop::option::of(0i64..60),
            prop::option::of(1i64..5),
        )
            .prop_map(|(day, state, sent_ago, evaluated_ago)| AddressWarmup {
                day,
                state,
                last_sent: sent_ago.map(|ago| TODAY - ago.days()),
                last_evaluated: evaluated_ago.map(|ago| TODAY - ago.days()),
            })
    }

    fn any_results() -> impl Strategy<Value = DayResults> {
        prop_oneof![
            1 => Just(DayResults::default()),
            // A clean day, so runs of good days (and advancing) are common.
            2 => (1u64..2_000).prop_map(|attempts| results(attempts, 0, 0, 0)),
            2 => (1u64..2_000, 0u64..=100, 0u64..=100, 0u64..=20).prop_map(|(attempts, deferred, bounced, complaints)| {
                let deferred = attempts * deferred / 100;
                let bounced = (attempts - deferred) * bounced / 100;
                results(attempts, deferred, bounced, attempts * complaints / 1_000)
            }),
        ]
    }

    fn any_spec() -> impl Strategy<Value = WarmupSpec> {
        (0usize..3, 0.0f64..20.0, 0.0f64..30.0, 0.0f64..1.0, 1u32..10, 1u32..40).prop_map(
            |(preset, bounce, deferral, complaint, rollback_days, idle_rewarm_days)| WarmupSpec {
                preset: Some(
                    [
                        WarmupPreset::Conservative,
                        WarmupPreset::Transactional,
                        WarmupPreset::Aggressive,
                    ][preset],
                ),
                thresholds: WarmupThresholds {
                    bounce_rate_percent: bounce,
                    deferral_rate_percent: deferral,
                    complaint_rate_percent: complaint,
                },
                rollback_days,
                idle_rewarm_days,
                ..WarmupSpec::default()
            },
        )
    }

    proptest! {
        #[test]
        fn one_evaluation_moves_at_most_one_day_forward_and_never_below_day_1(
            previous in any_address(),
            yesterday in any_results(),
            listed in any::<bool>(),
            spec in any_spec(),
        ) {
            let (next, transition) = evaluate(&previous, &yesterday, listed, &spec, TODAY);
            let past_schedule = schedule_length(&spec) + 1;
            prop_assert!(next.day >= 1 || transition == Transition::AlreadyEvaluated);
            prop_assert!(next.day <= previous.day.max(1).saturating_add(1).max(past_schedule));
            match transition {
                Transition::Held => prop_assert_eq!(next.day, previous.day.max(1)),
                Transition::RolledBack { from, to } => {
                    prop_assert!(to >= 1 && to <= from);
                    prop_assert_eq!(to, from.saturating_sub(spec.rollback_days).max(1));
                }
                Transition::Advanced { from, to } => {
                    prop_assert_eq!(to, from + 1);
                    prop_assert!(!listed && yesterday.attempts > 0);
                    prop_assert!(yesterday.rate(yesterday.bounced) <= spec.thresholds.bounce_rate_percent);
                    prop_assert!(yesterday.rate(yesterday.deferred) <= spec.thresholds.deferral_rate_percent);
                    prop_assert!(yesterday.rate(yesterday.complaints) <= spec.thresholds.complaint_rate_percent);
                }
                _ => {}
            }
            if transition != Transition::AlreadyEvaluated {
                prop_assert_eq!(next.state == WarmupState::Warm, next.day >= past_schedule);
            }
        }

        #[test]
        fn evaluating_the_same_date_again_is_a_no_op(
            previous in any_address(),
            first in any_results(),
            second in any_results(),
            listed in any::<[bool; 2]>(),
            spec in any_spec(),
        ) {
            let (once, _) = evaluate(&previous, &first, listed[0], &spec, TODAY);
            let (twice, transition) = evaluate(&once, &second, listed[1], &spec, TODAY);
            prop_assert_eq!(transition, Transition::AlreadyEvaluated);
            prop_assert_eq!(twice, once);
        }

        #[test]
        fn over_a_run_of_days_the_day_never_outpaces_the_calendar(
            days in prop::collection::vec((any_results(), any::<bool>()), 1..45),
            repeats in prop::collection::vec(1usize..3, 45),
            spec in any_spec(),
        ) {
            let start = date(2026, 1, 1);
            let mut address = AddressWarmup::begin(&spec, start, start);
            let mut today = start;
            for ((yesterday, listed), repeat) in days.iter().zip(&repeats) {
                today = today.tomorrow().expect("in range");
                for _ in 0..*repeat {
                    address = evaluate(&address, yesterday, *listed, &spec, today).0;
                }
                prop_assert!(address.day >= 1);
                prop_assert!(address.day <= day_on(start, today));
            }
        }
    }
}
