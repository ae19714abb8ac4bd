//! `securemail-sidecar evidence verify FILE` and `evidence verify --heads HEADS.json DIR` as an operator or an
//! auditor runs them: the built binary on real files.
#![allow(clippy::unwrap_used, reason = "test helpers: a panic is the failure report")]

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use jiff::Timestamp;
use securemail_sidecar::evidence::{
    Attempt, DomainName, EvidenceLog, EvidenceStore, MessageIdHash, Outcome, PruneRequest, Sha256Hex, SmtpReply,
    log_files,
};

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

fn at(time: &str) -> Timestamp {
    time.parse().unwrap()
}

fn attempt_at(time: &str, outcome: Outcome) -> Attempt {
    Attempt {
        time: at(time),
        ..attempt(outcome)
    }
}

/// An evidence directory of two months (January: 2 records, February: 3) written by the sidecar's store, and
/// the heads `/status` would publish for it, as a file.
struct Audited {
    dir: tempfile::TempDir,
    evidence: PathBuf,
    heads: PathBuf,
    store: EvidenceStore,
}

impl Audited {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let evidence = dir.path().join("evidence");
        let mut store = EvidenceStore::open(&evidence, at("2026-01-10T00:00:00Z")).unwrap();
        for time in [
            "2026-01-10T00:00:01Z",
            "2026-01-20T00:00:00Z",
            "2026-02-01T00:00:00Z",
            "2026-02-02T00:00:00Z",
            "2026-02-03T00:00:00Z",
        ] {
            store.append_all(&[attempt_at(time, Outcome::Delivered)]).unwrap();
        }
        let heads = dir.path().join("heads.json");
        std::fs::write(&heads, serde_json::to_vec(&store.heads().snapshot()).unwrap()).unwrap();
        Self {
            dir,
            evidence,
            heads,
            store,
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        log_files(&self.evidence).unwrap()
    }

    fn verify(&self) -> (i32, String, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_securemail-sidecar"))
            .args(["evidence", "verify", "--heads"])
            .arg(&self.heads)
            .arg(&self.evidence)
            .output()
            .unwrap();
        (
            output.status.code().unwrap(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    }
}

/// Replaces the last line of `path`, keeping its `prev`: the file alone is still a valid chain.
fn rewrite_last_line(path: &Path, change: impl FnOnce(&str) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let last = lines.pop().unwrap();
    let changed = change(&last);
    assert_ne!(changed, last);
    lines.push(changed);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn an_intact_directory_verifies_against_its_heads() {
    let audited = Audited::new();
    let (code, stdout, stderr) = audited.verify();
    assert_eq!(code, 0, "{stdout}{stderr}");
    let files = audited.files();
    assert_eq!(files.len(), 2);
    for file in &files {
        assert!(stdout.contains(&format!("{}: ok: ", file.display())), "{stdout}");
    }
    assert!(stdout.contains("2 records") && stdout.contains("3 records"), "{stdout}");
    assert!(stdout.ends_with("ok: 2 files\n"), "{stdout}");
}

#[test]
fn records_appended_after_the_heads_are_fine() {
    let mut audited = Audited::new();
    audited
        .store
        .append_all(&[attempt_at("2026-02-04T00:00:00Z", Outcome::Deferred)])
        .unwrap();
    let (code, stdout, stderr) = audited.verify();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("4 records") && stdout.contains("the head's 3 records match"),
        "{stdout}"
    );
}

#[test]
fn a_deleted_file_is_reported_by_name() {
    let audited = Audited::new();
    let january = audited.files()[0].clone();
    std::fs::remove_file(&january).unwrap();
    let (code, stdout, stderr) = audited.verify();
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [format!(
            "{}: missing, and no prune record names it: the file was deleted (2 records, last hash {})",
            january.display(),
            audited.store.heads().snapshot().files[0].last_hash
        )]
    );
}

#[test]
fn a_file_pruned_with_its_record_is_not_a_deletion() {
    let mut audited = Audited::new();
    let january = audited.files()[0].clone();
    let pruned = audited
        .store
        .prune(&PruneRequest {
            now: at("2026-02-25T00:00:00Z"),
            retention_days: 30,
            tenant: "clinic-a/outbound".parse().unwrap(),
        })
        .unwrap();
    assert_eq!(pruned.len(), 1);
    assert!(!january.exists());
    let (code, stdout, stderr) = audited.verify();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "{}: pruned at 2026-02-25T00:00:00Z (2 records",
            january.display()
        )),
        "{stdout}"
    );
    // The file that holds the prune record grew by one line: still matching its head.
    assert!(
        stdout.contains("4 records") && stdout.contains("the head's 3 records match"),
        "{stdout}"
    );

    // Pruning a file whose head does not match the prune record is a deletion all the same.
    let heads = std::fs::read_to_string(&audited.heads).unwrap();
    let january_hash = pruned[0].last_hash.clone();
    std::fs::write(
        &audited.heads,
        heads.replace(&january_hash, &Sha256Hex::of(b"other").to_string()),
    )
    .unwrap();
    let (code, _, stderr) = audited.verify();
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("{}: deleted; the prune record in", january.display())),
        "{stderr}"
    );
}

#[test]
fn a_tail_cut_at_a_line_boundary_is_reported_with_both_counts() {
    let audited = Audited::new();
    let february = audited.files()[1].clone();
    let text = std::fs::read_to_string(&february).unwrap();
    let kept: Vec<&str> = text.lines().take(2).collect();
    std::fs::write(&february, kept.join("\n") + "\n").unwrap();
    // The file alone still verifies: only the head shows the cut.
    assert_eq!(verify(&february).status.code(), Some(0));

    let (code, stdout, stderr) = audited.verify();
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert_eq!(
        stderr,
        format!(
            "{}: 2 records, the head says 3: records were cut from its end\n",
            february.display()
        )
    );
}

#[test]
fn a_rewritten_last_line_is_reported_without_its_content() {
    let audited = Audited::new();
    let january = audited.files()[0].clone();
    rewrite_last_line(&january, |line| line.replace("\"delivered\"", "\"bounced\""));
    assert_eq!(verify(&january).status.code(), Some(0), "a valid chain by itself");

    let (code, stdout, stderr) = audited.verify();
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.starts_with(&format!("{}: line 2 hashes to ", january.display())),
        "{stderr}"
    );
    assert!(stderr.contains("the line was rewritten"), "{stderr}");
    assert!(
        !stderr.contains("bounced") && !stderr.contains("example.net"),
        "{stderr}"
    );
}

#[test]
fn a_whole_file_recomputed_with_a_different_last_line_is_caught() {
    let audited = Audited::new();
    let february = audited.files()[1].clone();
    // Rebuild February from scratch with the writer: a valid chain whose last record says something else.
    std::fs::remove_file(&february).unwrap();
    {
        let mut log = EvidenceLog::open(&february).unwrap();
        log.append(&attempt_at("2026-02-01T00:00:00Z", Outcome::Delivered))
            .unwrap();
        log.append(&attempt_at("2026-02-02T00:00:00Z", Outcome::Delivered))
            .unwrap();
        log.append(&attempt_at("2026-02-03T00:00:00Z", Outcome::Bounced))
            .unwrap();
    }
    assert_eq!(verify(&february).status.code(), Some(0));
    let (code, _, stderr) = audited.verify();
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("{}: line 3 hashes to ", february.display())),
        "{stderr}"
    );
}

#[test]
fn a_broken_chain_is_reported_as_by_the_single_file_mode() {
    let audited = Audited::new();
    let february = audited.files()[1].clone();
    let text = std::fs::read_to_string(&february).unwrap();
    std::fs::write(&february, &text[..text.len() - 5]).unwrap();
    let (code, _, stderr) = audited.verify();
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with(&format!("{}: line 3: incomplete", february.display())),
        "{stderr}"
    );
}

#[test]
fn heads_that_are_not_heads_are_refused_clearly() {
    let audited = Audited::new();
    for garbage in [
        &b"\xff\xfe jane@example.net"[..],
        br#"{"files":[{"file":"../../etc/passwd","records":1,"lastHash":"00"}]}"#,
        br#"{"files":[{"file":"evidence-1.jsonl","records":1,"lastHash":"jane@example.net"}]}"#,
        br#"{"files":"x"}"#,
    ] {
        std::fs::write(&audited.heads, garbage).unwrap();
        let (code, stdout, stderr) = audited.verify();
        assert_eq!(code, 1, "{stdout}{stderr}");
        assert!(
            stderr.contains(&format!("heads {}", audited.heads.display())),
            "{stderr}"
        );
        assert!(!stderr.contains("jane") && !stderr.contains("passwd"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn heads_need_a_directory() {
    let audited = Audited::new();
    let output = Command::new(env!("CARGO_BIN_EXE_securemail-sidecar"))
        .args(["evidence", "verify", "--heads"])
        .arg(&audited.heads)
        .arg(&audited.files()[0])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8(output.stderr).unwrap().contains("is not a directory"));
    let _ = &audited.dir;
}
