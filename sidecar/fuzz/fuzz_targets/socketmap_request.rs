//! Arbitrary bytes as a socketmap client's stream: every netstring decoded from it, each payload parsed as a
//! request and its key classified, as the server does. Run with `cargo +nightly fuzz run socketmap_request` (from
//! sidecar/) or, on stable, `sidecar/fuzz/run-stable.sh socketmap_request`. A panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securemail_sidecar::socketmap::{lookup_domain, netstring};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((payload, used))) = netstring::decode(rest) {
        assert!(used > payload.len() && used <= rest.len());
        if let Ok(request) = netstring::parse_request(payload) {
            let _ = lookup_domain(request.key);
        }
        rest = &rest[used..];
    }
});
