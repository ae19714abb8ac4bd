//! Arbitrary bytes as an MTA-STS policy file and as TXT records. Run with `cargo +nightly fuzz run mta_sts_policy`
//! (from sidecar/) or, on stable, `sidecar/fuzz/run-stable.sh mta_sts_policy`. A panic, a `max_age` above the RFC 8461
//! maximum, or a policy that its own text (as the persisted cache stores it) does not read back as is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securemail_sidecar::policy::mta_sts::{MAX_MAX_AGE, parse_policy, parse_txt};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(policy) = parse_policy(&text) {
        assert!(policy.max_age <= MAX_MAX_AGE);
        assert_eq!(parse_policy(&policy.text()).as_ref(), Ok(&policy));
        for line in text.lines() {
            let _ = policy.matches(line);
        }
    }
    let _ = parse_txt(&text.split('\0').map(str::to_owned).collect::<Vec<_>>());
});
