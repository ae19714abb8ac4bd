//! Arbitrary TLSA records and certificate chains into DANE matching and verification. Run with
//! `cargo +nightly fuzz run tlsa_match` (from sidecar/) or `sidecar/fuzz/run-stable.sh tlsa_match`. A panic, or a
//! chain accepted by `verify` although no record matches it by digest and no usage-2 record carries a full key, is
//! a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use securemail_sidecar::policy::Tlsa;
use securemail_sidecar::tls::dane::{matching_usage, verify};

fuzz_target!(|input: &[u8]| {
    // [usage selector matching data_len] data, then certificates each prefixed by a two-byte length.
    let Some((&[usage, selector, matching, data_len], rest)) = input.split_first_chunk::<4>() else {
        return;
    };
    let data_len = usize::from(data_len).min(rest.len());
    let (data, mut rest) = rest.split_at(data_len);
    let tlsa = [Tlsa {
        usage: usage % 4,
        selector: selector % 3,
        matching: matching % 4,
        data: data.to_vec(),
    }];
    let mut chain = Vec::new();
    while let Some((&[high, low], after)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes([high, low])).min(after.len());
        chain.push(CertificateDer::from(after[..len].to_vec()));
        rest = &after[len..];
    }
    let matched = matching_usage(&tlsa, &chain);
    let algorithms = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    let Ok(name) = ServerName::try_from("mx.example.net") else {
        return;
    };
    let names = [name];
    let verified = verify(&tlsa, &chain, &names, UnixTime::now(), &algorithms);
    let full_key_anchor = tlsa[0].usage == 2 && tlsa[0].selector == 1 && tlsa[0].matching == 0;
    if verified.is_ok() && !full_key_anchor {
        assert!(matched.is_some(), "verify accepted a chain no record matches");
    }
});
