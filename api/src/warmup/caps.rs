//! A day's limit split per mailbox provider, and each cap spread over the UTC hours of the day.

use std::collections::BTreeMap;

use crate::provider::Provider;
use crate::tenant::ProviderShares;

/// Messages per provider class for one address and day; every class is present, zero included.
pub type ProviderCaps = BTreeMap<Provider, u32>;

/// Messages a cap allows from the first hour of the day regardless of smoothing. A handful of messages is never a
/// volume spike to a receiver, and without it a cap of 5 would let a password reset wait hours for its slot.
pub const BURST_FLOOR: u32 = 10;

/// Splits `daily_limit` by `shares` (percent): each provider gets the floor of its share, and the units lost to
/// rounding go one each to the largest remainders (ties in [`Provider::ALL`] order), so the caps add up to exactly
/// `daily_limit`. A provider with share 0 gets 0. Shares are CRD-validated to sum to 100; other sums are scaled by
/// their total, and all-zero shares give all-zero caps (nothing says where mail may go).
pub fn provider_caps(daily_limit: u32, shares: &ProviderShares) -> ProviderCaps {
    let weights = Provider::ALL.map(|provider| (provider, u64::from(share_of(shares, provider))));
    let total: u64 = weights.iter().map(|(_, weight)| weight).sum();
    if total == 0 {
        return Provider::ALL.iter().map(|provider| (*provider, 0)).collect();
    }
    let limit = u64::from(daily_limit);
    // (provider, floor, remainder numerator); floor ≤ limit, so it fits in u32.
    let mut parts = weights.map(|(provider, weight)| (provider, limit * weight / total, limit * weight % total));
    let assigned: u64 = parts.iter().map(|(_, floor, _)| floor).sum();
    let mut order: Vec<usize> = (0..parts.len()).collect();
    // Stable sort keeps Provider::ALL order among equal remainders.
    order.sort_by(|a, b| parts[*b].2.cmp(&parts[*a].2));
    let leftover = usize::try_from(limit - assigned).unwrap_or(usize::MAX);
    for index in order.into_iter().take(leftover) {
        parts[index].1 += 1;
    }
    parts
        .iter()
        .map(|(provider, cap, _)| (*provider, u32::try_from(*cap).unwrap_or(daily_limit)))
        .collect()
}

/// Messages `cap` allows from 00:00 UTC up to the end of `hour` (0–23; later hours count as 23): an even spread,
/// rounded up, but at least [`BURST_FLOOR`] (or the whole cap when smaller). Monotonic in `hour`, never over
/// `cap`, and `cap` itself at hour 23.
pub fn hourly_allowance(cap: u32, hour: u8) -> u32 {
    let hours_elapsed = u64::from(hour.min(23)) + 1;
    let spread = (u64::from(cap) * hours_elapsed).div_ceil(24);
    u32::try_from(spread).unwrap_or(cap).max(cap.min(BURST_FLOOR))
}

fn share_of(shares: &ProviderShares, provider: Provider) -> u32 {
    match provider {
        Provider::Gmail => shares.gmail,
        Provider::Microsoft => shares.microsoft,
        Provider::Yahoo => shares.yahoo,
        Provider::Apple => shares.apple,
        Provider::Other => shares.other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shares(gmail: u32, microsoft: u32, yahoo: u32, apple: u32, other: u32) -> ProviderShares {
        ProviderShares {
            gmail,
            microsoft,
            yahoo,
            apple,
            other,
        }
    }

    fn caps_in_order(caps: &ProviderCaps) -> Vec<u32> {
        Provider::ALL.iter().map(|provider| caps[provider]).collect()
    }

    #[test]
    fn default_shares_split_a_round_limit_exactly() {
        let caps = provider_caps(1_000, &ProviderShares::default());
        assert_eq!(caps_in_order(&caps), [400, 250, 150, 100, 100]);
    }

    #[test]
    fn rounding_leftovers_go_to_the_largest_remainders_then_in_provider_order() {
        // 150 × 35% = 52.5 twice: one leftover unit, tie broken towards gmail.
        let caps = provider_caps(150, &shares(35, 35, 10, 10, 10));
        assert_eq!(caps_in_order(&caps), [53, 52, 15, 15, 15]);
        // 7 × (40, 25, 15, 10, 10)% = 2.8, 1.75, 1.05, 0.7, 0.7: floors 2+1+1 = 4, leftovers to .8, .75, .7 (apple).
        let caps = provider_caps(7, &ProviderShares::default());
        assert_eq!(caps_in_order(&caps), [3, 2, 1, 1, 0]);
    }

    #[test]
    fn a_zero_share_gets_nothing_even_from_leftovers() {
        let caps = provider_caps(3, &shares(50, 50, 0, 0, 0));
        assert_eq!(caps_in_order(&caps), [2, 1, 0, 0, 0]);
    }

    #[test]
    fn shares_not_adding_to_100_are_scaled_and_all_zero_shares_send_nothing() {
        let caps = provider_caps(100, &shares(1, 1, 0, 0, 0));
        assert_eq!(caps_in_order(&caps), [50, 50, 0, 0, 0]);
        let caps = provider_caps(100, &shares(0, 0, 0, 0, 0));
        assert_eq!(caps_in_order(&caps), [0, 0, 0, 0, 0]);
    }

    #[test]
    fn hourly_allowance_spreads_large_caps_and_lets_small_ones_burst() {
        let large: Vec<u32> = [0, 1, 11, 22, 23].map(|hour| hourly_allowance(2_400, hour)).into();
        assert_eq!(large, [100, 200, 1_200, 2_300, 2_400]);
        assert_eq!(
            hourly_allowance(50, 0),
            BURST_FLOOR,
            "ceil(50/24) = 3 is below the burst floor"
        );
        assert_eq!(
            hourly_allowance(4, 0),
            4,
            "a cap under the floor is open from the first hour"
        );
        assert_eq!(hourly_allowance(0, 23), 0);
        assert_eq!(
            hourly_allowance(2_400, 200),
            2_400,
            "hours past 23 count as the last hour"
        );
    }

    fn any_shares() -> impl Strategy<Value = ProviderShares> {
        prop::array::uniform5(0u32..=100).prop_map(|[g, m, y, a, o]| shares(g, m, y, a, o))
    }

    /// Shares as the CRD admits them: five parts of 100.
    fn valid_shares() -> impl Strategy<Value = ProviderShares> {
        prop::array::uniform4(0u32..=100).prop_map(|mut cuts| {
            cuts.sort_unstable();
            shares(
                cuts[0],
                cuts[1] - cuts[0],
                cuts[2] - cuts[1],
                cuts[3] - cuts[2],
                100 - cuts[3],
            )
        })
    }

    proptest! {
        #[test]
        fn caps_sum_exactly_to_the_limit_and_zero_shares_get_zero(
            limit in prop_oneof![0u32..1_000, 0u32..=10_000_000, Just(u32::MAX)],
            shares in prop_oneof![valid_shares(), any_shares()],
        ) {
            let caps = provider_caps(limit, &shares);
            prop_assert_eq!(caps.len(), Provider::ALL.len());
            let total: u64 = caps.values().map(|cap| u64::from(*cap)).sum();
            let weights: u32 = Provider::ALL.iter().map(|p| share_of(&shares, *p)).sum();
            prop_assert_eq!(total, if weights == 0 { 0 } else { u64::from(limit) });
            for provider in Provider::ALL {
                let share = u64::from(share_of(&shares, provider));
                let cap = u64::from(caps[&provider]);
                prop_assert!(cap <= u64::from(limit));
                if share == 0 {
                    prop_assert_eq!(cap, 0);
                } else {
                    // Within one message of the exact share.
                    let exact = u64::from(limit) * share;
                    prop_assert!(cap * u64::from(weights) + u64::from(weights) > exact);
                    prop_assert!(cap * u64::from(weights) < exact + u64::from(weights));
                }
            }
        }

        #[test]
        fn hourly_allowances_rise_never_exceed_the_cap_and_end_at_it(cap in prop_oneof![0u32..100, any::<u32>()]) {
            let allowances: Vec<u32> = (0u8..24).map(|hour| hourly_allowance(cap, hour)).collect();
            prop_assert!(allowances.windows(2).all(|pair| pair[0] <= pair[1]), "{allowances:?}");
            prop_assert!(allowances.iter().all(|allowance| *allowance <= cap));
            prop_assert_eq!(allowances[23], cap);
            prop_assert!(allowances[0] >= cap.min(BURST_FLOOR));
        }
    }
}
