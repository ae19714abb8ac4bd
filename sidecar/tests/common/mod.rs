//! What the delivery-engine suites share: a DKIM key for `example.org` (selector `sm1`) and the session settings
//! of a pod at 127.0.0.1 with short timeouts.
#![allow(clippy::unwrap_used, reason = "tests: a panic is the failure report")]

use std::path::Path;
use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::Ed25519KeyPair;
use base64::Engine as _;
use securemail_api::sidecar_config::{Egress, SigningDomain, SigningKey};
use securemail_api::tenant::DkimAlgorithm;
use securemail_sidecar::dkim::KeyStore;
use securemail_sidecar::smtp::client::{SessionSettings, Timeouts};

/// Generates an Ed25519 key in `dir` (PKCS#8 PEM, as the operator writes them) and loads it for `example.org`.
pub fn signing_keys(dir: &Path) -> KeyStore {
    let der: aws_lc_rs::encoding::Pkcs8V1Der = Ed25519KeyPair::generate().unwrap().as_der().unwrap();
    let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|chunk| std::str::from_utf8(chunk).unwrap())
        .collect();
    let pem = format!(
        "{}\n{}\n{}\n",
        securemail_api::pkcs8_pem::header(),
        lines.join("\n"),
        securemail_api::pkcs8_pem::footer()
    );
    let key = dir.join("dkim.pem");
    std::fs::write(&key, pem).unwrap();
    KeyStore::load(&[SigningDomain {
        domain: "example.org".into(),
        keys: vec![SigningKey {
            selector: "sm1".into(),
            algorithm: DkimAlgorithm::Ed25519Sha256,
            private_key_file: key,
        }],
    }])
    .unwrap()
}

/// A pod sending from 127.0.0.1 to `port`, every step allowed 10 s.
pub fn session(port: u16) -> SessionSettings {
    let seconds = Duration::from_secs(10);
    SessionSettings {
        helo_name: "mta-0.sender.test".into(),
        source: "127.0.0.1".parse().unwrap(),
        egress: Egress::Direct,
        port,
        timeouts: Timeouts {
            connect: seconds,
            greeting: seconds,
            ehlo: seconds,
            starttls: seconds,
            mail: seconds,
            rcpt: seconds,
            data_init: seconds,
            data_block: seconds,
            data_done: seconds,
            rset: seconds,
        },
    }
}
