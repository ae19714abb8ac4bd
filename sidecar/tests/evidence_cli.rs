//! `securemail-sidecar evidence verify FILE` as an operator runs it: the built binary on real files.
#![allow(clippy::unwrap_used, reason = "test helpers: a panic is the failure report")]

use std::num::NonZeroU32;
use std::path::Path;
use std::process::{Command, Output};

use securemail_sidecar::evidence::{Attempt, DomainName, EvidenceLog, MessageIdHash, Outcome, Sha256Hex, SmtpReply};

fn attempt(outcome: Outcome) -> Attempt {
    Attempt {
        time: "2025-01-15T09:30:00Z".parse().unwrap(),
        tenant: "clinic-a/outbound".parse().unwrap(),
        message_id_sha256: MessageIdHash::of_header_value("<a1@host.example>"),
        recipient_domain: DomainName::new("example.net").unwrap(),
        recipient_count: NonZeroU32::new(1).unwrap(),
        mx_host: Some(DomainName::new("mx1.example.net").unwrap()),
        mx_ip: Some("203.0.113.25".parse().unwrap()),
        source_ip: "192.0.2.10".parse().unwrap(),
        policy: None,
        tls: None,
        smtp_reply: Some(SmtpReply::from_remote(451, "4.7.0 try again later").unwrap()),
        outcome,
        protocol_error: None,
        warmup: None,
        refusal: None,
    }
}

/// Three records written by the library's writer.
fn write_log(path: &Path) -> Sha256Hex {
    let mut log = EvidenceLog::open(path).unwrap();
    log.append(&attempt(Outcome::Deferred)).unwrap();
    log.append(&attempt(Outcome::Deferred)).unwrap();
    log.append(&attempt(Outcome::Delivered)).unwrap().hash
}

fn verify(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_securemail-sidecar"))
        .args(["evidence", "verify"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn intact_log_prints_count_and_last_hash_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evidence.jsonl");
    let last = write_log(&path);

    let output = verify(&path);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("ok: 3 records, last hash {last}\n")
    );
}

#[test]
fn tampered_log_names_file_and_line_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evidence.jsonl");
    write_log(&path);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let forged = lines[1].replace("\"deferred\"", "\"delivered\"");
    lines[1] = &forged;
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();

    let output = verify(&path);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains(&format!("{}: line 3: ", path.display())), "{stderr}");
    assert!(stderr.contains("line 2 was altered"), "{stderr}");
}

#[test]
fn binary_garbage_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evidence.jsonl");
    std::fs::write(&path, b"\xff\x00\xfe\n\x00").unwrap();

    let output = verify(&path);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("line 1: not an evidence record"), "{stderr}");
}

#[test]
fn missing_file_names_it_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.jsonl");

    let output = verify(&path);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains(&format!("cannot open evidence log {}", path.display())),
        "{stderr}"
    );
}
