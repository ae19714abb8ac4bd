//! Many messages through an MTA host at once, and the accounting that proves none was lost: parallel submission
//! as the tenant's applications do (`e2e/dataplane/bench_submit.py`), the Message-IDs Postfix accepted and
//! bounced, and the evidence chain checked file by file. Shared by the fault-injection and load suites.
// Test support: a step that fails is a failed test, reported with the step's description.
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Command;

use crate::dataplane::{MtaHost, in_netns, output_with_input, sidecar_bin};
use crate::repo_root;

/// A whole number from environment variable `name`, or `default` when it is unset; panics naming the variable
/// when it is set to anything else.
pub fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Who the messages of a bulk submission go to.
#[derive(Debug, Clone, Copy)]
pub enum Recipients<'a> {
    /// Every message to this address.
    One(&'a str),
    /// Message N to line N of this file.
    File(&'a Path),
}

/// `bench_submit.py` submitting `count` messages of about `size` bytes from `sender` to `mta`'s submission
/// listener over `connections` sessions with STARTTLS and the application's client certificate. Each message
/// carries `Message-ID: <TAG.N@sender.test>`; the number of each one Postfix answered 250 is appended to
/// `accepted`. With `keep_going` a refused or cut-off message is counted and skipped (each number is tried
/// once), otherwise the first one ends the run with a non-zero exit. The caller runs or spawns the command;
/// it prints a JSON summary (see [`crate::dataplane::json_report`]).
#[derive(Debug)]
pub struct BulkSubmission<'a> {
    pub sender: &'a str,
    pub recipients: Recipients<'a>,
    pub tag: &'a str,
    pub count: u64,
    pub size: usize,
    pub connections: usize,
    pub keep_going: bool,
}

impl BulkSubmission<'_> {
    pub fn command(&self, mta: &MtaHost, accepted: &Path) -> Command {
        let tls = mta.dir.join("tls");
        let mut command = in_netns(&mta.netns, "python3");
        command
            .arg(repo_root().join("e2e/dataplane/bench_submit.py"))
            .args(["--host", &mta.address.to_string(), "--from", self.sender])
            .arg("--ca")
            .arg(tls.join("server-ca.crt"))
            .arg("--cert")
            .arg(tls.join("client.crt"))
            .arg("--key")
            .arg(tls.join("client.key"))
            .args(["--count", &self.count.to_string()])
            .args(["--size", &self.size.to_string()])
            .args(["--connections", &self.connections.to_string()])
            .args(["--tag", self.tag])
            .arg("--accepted")
            .arg(accepted);
        match self.recipients {
            Recipients::One(to) => command.args(["--to", to]),
            Recipients::File(file) => command.arg("--recipients").arg(file),
        };
        if self.keep_going {
            command.arg("--keep-going");
        }
        command
    }
}

/// The Message-IDs (`<TAG.N@sender.test>`) of the messages listed in `accepted` (one number a line, as
/// [`BulkSubmission`] writes them).
pub fn accepted_message_ids(accepted: &Path, tag: &str) -> BTreeSet<String> {
    fs::read_to_string(accepted)
        .unwrap_or_default()
        .lines()
        .map(|n| format!("<{tag}.{n}@sender.test>"))
        .collect()
}

/// Message-IDs Postfix bounced, from its log: the `message-id=` of each queue id with a `status=bounced` line.
pub fn bounced_message_ids(maillog: &str) -> BTreeSet<String> {
    let queue_id = |line: &str| {
        line.split_whitespace()
            .find(|word| {
                word.ends_with(':') && word.len() > 8 && word.chars().all(|c| c.is_ascii_alphanumeric() || c == ':')
            })
            .map(|word| word.trim_end_matches(':').to_owned())
    };
    let mut ids = BTreeMap::new();
    let mut bounced = BTreeSet::new();
    for line in maillog.lines() {
        if let Some(at) = line.find("message-id=") {
            if let Some(queue) = queue_id(line) {
                ids.insert(queue, line[at + "message-id=".len()..].trim().to_owned());
            }
        } else if line.contains("status=bounced") {
            bounced.extend(queue_id(line));
        }
    }
    bounced.iter().filter_map(|queue| ids.get(queue).cloned()).collect()
}

/// The accepted Message-IDs neither `received` nor `bounced`: the lost ones.
pub fn lost_message_ids(
    accepted: &BTreeSet<String>,
    received: &BTreeMap<String, usize>,
    bounced: &BTreeSet<String>,
) -> Vec<String> {
    accepted
        .iter()
        .filter(|id| !received.contains_key(*id) && !bounced.contains(*id))
        .cloned()
        .collect()
}

/// Verifies every evidence file's chain. A sidecar killed in the middle of an append leaves that file with an
/// incomplete last line, and the next start begins a new file (docs/evidence.md): allowed for any file but the
/// newest, provided every complete line before it verifies. Returns how many files were torn so.
pub fn verify_evidence_allowing_torn_tails(mta: &MtaHost) -> usize {
    let mut files = mta.evidence_files();
    files.sort();
    let newest = files.last().cloned();
    let mut torn = 0;
    for file in &files {
        let output = Command::new(sidecar_bin())
            .args(["evidence", "verify"])
            .arg(file)
            .output()
            .expect("run securemail-sidecar evidence verify");
        let report = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        if output.status.success() && report.starts_with("ok") {
            continue;
        }
        assert!(
            report.contains("incomplete, no trailing newline") && Some(file) != newest.as_ref(),
            "{}: {report}",
            file.display()
        );
        let bytes = fs::read(file).expect("read an evidence file");
        let complete = &bytes[..bytes.iter().rposition(|&byte| byte == b'\n').map_or(0, |end| end + 1)];
        let output = output_with_input(
            Command::new(sidecar_bin()).args(["evidence", "verify", "/dev/stdin"]),
            complete,
        );
        assert!(
            output.status.success(),
            "{}: the lines before the torn one: {}",
            file.display(),
            String::from_utf8_lossy(&output.stdout)
        );
        torn += 1;
    }
    torn
}
