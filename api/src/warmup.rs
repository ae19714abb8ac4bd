//! Warmup: which day of its schedule an address is on, that day's limit, its split per mailbox provider and per
//! hour ([`caps`]), and the per-address state machine that advances, holds or rolls the day back ([`state`]).
//!
//! Presets are day → messages-per-address tables, all ending at 150,000 a day (after the last day the address is
//! warm and has no warmup limit). Their shape follows the ramps mailbox providers and ESPs describe for new
//! dedicated IPs: start in the low hundreds, grow by a fixed factor a day, reach full volume in two to five weeks.
//! - `conservative`: 50 → 150,000 in 30 days (about ×1.3 a day, doubling every two to three days early on), the
//!   slow end of the usual four-to-six-week advice; for mixed or older lists.
//! - `transactional`: 100 → 150,000 in 21 days (about ×1.45 a day); notifications recipients expect and open.
//! - `aggressive`: 200 → 150,000 in 14 days (about ×1.65 a day, roughly the "double every day" ESP tables that
//!   start at 200–500); only for proven, highly engaged traffic.

use jiff::civil::Date;

use crate::tenant::{WarmupPreset, WarmupSpec, WarmupStep};

pub mod caps;
pub mod state;

pub use caps::{BURST_FLOOR, ProviderCaps, hourly_allowance, provider_caps};
pub use state::{AddressWarmup, DayResults, Transition, WarmupState, evaluate};

/// Preset used when a tenant sets neither a preset nor a custom schedule.
pub const DEFAULT_PRESET: WarmupPreset = WarmupPreset::Transactional;

const CONSERVATIVE: &[u32] = &[
    50, 100, 150, 250, 400, 600, 800, 1_000, 1_500, 2_000, 2_500, 3_000, 4_000, 5_000, 6_500, 8_000, 10_000, 12_500,
    15_000, 20_000, 25_000, 30_000, 40_000, 50_000, 60_000, 75_000, 90_000, 110_000, 130_000, 150_000,
];
const TRANSACTIONAL: &[u32] = &[
    100, 200, 400, 700, 1_000, 1_500, 2_000, 3_000, 4_500, 6_000, 8_000, 10_000, 13_000, 17_000, 22_000, 30_000,
    40_000, 55_000, 75_000, 100_000, 150_000,
];
const AGGRESSIVE: &[u32] = &[
    200, 500, 1_000, 2_000, 4_000, 7_000, 10_000, 15_000, 25_000, 40_000, 60_000, 90_000, 120_000, 150_000,
];

/// The daily limit table of a preset; index 0 is day 1.
pub fn preset_table(preset: WarmupPreset) -> &'static [u32] {
    match preset {
        WarmupPreset::Conservative => CONSERVATIVE,
        WarmupPreset::Transactional => TRANSACTIONAL,
        WarmupPreset::Aggressive => AGGRESSIVE,
    }
}

/// Number of days until an address following this spec is warm (after the last day it has no warmup limit).
pub fn schedule_length(spec: &WarmupSpec) -> u32 {
    match &spec.schedule {
        Some(steps) => steps.iter().map(|step| step.day).max().unwrap_or(1),
        None => table_len(preset_table(spec.preset.unwrap_or(DEFAULT_PRESET))),
    }
}

/// The per-address limit on `day` (1-based), or `None` once the schedule is complete and the address is warm.
pub fn daily_limit(spec: &WarmupSpec, day: u32) -> Option<u32> {
    let day = day.max(1);
    if day > schedule_length(spec) {
        return None;
    }
    match &spec.schedule {
        Some(steps) => custom_limit(steps, day),
        None => {
            let table = preset_table(spec.preset.unwrap_or(DEFAULT_PRESET));
            usize::try_from(day - 1)
                .ok()
                .and_then(|index| table.get(index).copied())
        }
    }
}

/// The schedule day for `today` when warmup started on `start` (day 1 on the start date; never below 1).
pub fn day_on(start: Date, today: Date) -> u32 {
    let elapsed = start.until(today).map(|span| span.get_days()).unwrap_or_default();
    u32::try_from(elapsed).map_or(1, |days| days.saturating_add(1))
}

/// A custom schedule's limit: the last step at or before `day` holds until the next one.
fn custom_limit(steps: &[WarmupStep], day: u32) -> Option<u32> {
    steps
        .iter()
        .filter(|step| step.day <= day)
        .max_by_key(|step| step.day)
        .map(|step| step.daily_limit)
}

fn table_len(table: &[u32]) -> u32 {
    u32::try_from(table.len()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn preset(preset: WarmupPreset) -> WarmupSpec {
        WarmupSpec {
            preset: Some(preset),
            ..WarmupSpec::default()
        }
    }

    #[test]
    fn preset_lengths_match_their_documented_durations() {
        assert_eq!(schedule_length(&preset(WarmupPreset::Conservative)), 30);
        assert_eq!(schedule_length(&preset(WarmupPreset::Transactional)), 21);
        assert_eq!(schedule_length(&preset(WarmupPreset::Aggressive)), 14);
        assert_eq!(
            schedule_length(&WarmupSpec::default()),
            21,
            "transactional is the default"
        );
    }

    #[test]
    fn presets_never_decrease() {
        for table in [CONSERVATIVE, TRANSACTIONAL, AGGRESSIVE] {
            assert!(table.windows(2).all(|pair| pair[0] <= pair[1]));
        }
    }

    #[test]
    fn custom_steps_hold_until_the_next_step_and_end_warm() {
        let spec = WarmupSpec {
            schedule: Some(vec![
                WarmupStep {
                    day: 1,
                    daily_limit: 200,
                },
                WarmupStep {
                    day: 3,
                    daily_limit: 500,
                },
            ]),
            ..WarmupSpec::default()
        };
        let limits: Vec<_> = (1..=4).map(|day| daily_limit(&spec, day)).collect();
        assert_eq!(limits, [Some(200), Some(200), Some(500), None]);
    }

    #[test]
    fn days_count_from_the_start_date() {
        let start = jiff::civil::date(2026, 11, 30);
        assert_eq!(day_on(start, jiff::civil::date(2026, 11, 30)), 1);
        assert_eq!(day_on(start, jiff::civil::date(2026, 12, 2)), 3);
        assert_eq!(
            day_on(start, jiff::civil::date(2026, 11, 1)),
            1,
            "before the start is day 1"
        );
    }

    proptest! {
        #[test]
        fn limits_are_positive_and_never_decrease_during_warmup(
            preset_index in 0usize..3,
            day in 1u32..60,
        ) {
            let spec = preset([WarmupPreset::Conservative, WarmupPreset::Transactional, WarmupPreset::Aggressive][preset_index]);
            match (daily_limit(&spec, day), daily_limit(&spec, day + 1)) {
                (Some(today), Some(tomorrow)) => prop_assert!(today > 0 && today <= tomorrow),
                (Some(today), None) => prop_assert!(today > 0 && day == schedule_length(&spec)),
                (None, tomorrow) => prop_assert_eq!(tomorrow, None),
            }
        }
    }
}
