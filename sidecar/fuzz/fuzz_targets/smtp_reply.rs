//! Arbitrary bytes from an SMTP server into the reply parser. Run with `cargo +nightly fuzz run smtp_reply` (from
//! sidecar/) or `sidecar/fuzz/run-stable.sh smtp_reply`. A panic, a reply taking more input than it was given, a
//! code outside 100-559, or a reply that parses differently once the bytes after it are cut off is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use securemail_sidecar::smtp::reply::{MAX_LINES, parse};

fuzz_target!(|input: &[u8]| {
    let Ok(Some((reply, used))) = parse(input) else {
        return;
    };
    assert!(used > 0 && used <= input.len());
    assert!((100..=559).contains(&reply.code()));
    assert!(!reply.lines().is_empty() && reply.lines().len() <= MAX_LINES);
    if let Some((class, _, _)) = reply.enhanced() {
        assert_eq!(u16::from(class), reply.class());
    }
    let _ = reply.text();
    let Ok(Some((again, again_used))) = parse(&input[..used]) else {
        panic!("a complete reply stopped parsing when the input after it was removed");
    };
    assert_eq!((again, again_used), (reply, used));
});
