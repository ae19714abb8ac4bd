//! Load in the data-plane world (`make e2e-load`: 100 000 messages, release builds; a reduced run in `make test`):
//! messages submitted on 587 over parallel sessions as fast as Postfix takes them, to recipients spread over every
//! provider class and policy source (DANE, MTA-STS, the tenant's policy), a share of them greylisted (450, then
//! accepted when Postfix retries) or refused (550 5.1.1, so Postfix bounces them with a DSN to the sender) by the
//! world's smart receiver. Asserts that nothing accepted with a 250 is lost: each message reached its receiver
//! (the greylisted ones after a retry) or, for a refused recipient, its DSN reached the sender; that no session
//! carried mail in cleartext; that the evidence chain verifies; and that the sidecar's per-provider counts add up
//! to what arrived. Prints throughput, latency, sidecar CPU per message and peak RSS.
//!
//! Size: `SECUREMAIL_LOAD_MESSAGES` (default 2000).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use securemail_e2e::bulk::{
    BulkSubmission, Recipients, accepted_message_ids, bounced_message_ids, env_number,
    verify_evidence_allowing_torn_tails,
};
use securemail_e2e::dataplane::{
    MtaHost, World, assert_no_cleartext_session, cpu_seconds, json_report, metric_sum, status_kib, tenant_manifest,
    unique_id,
};

/// The size of each message, as `make bench-sidecar` sends them.
const MESSAGE_KB: usize = 10;

/// What a destination's receiver does with its recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Accepted at the first attempt.
    Accepted,
    /// Greylisted (450) at the first attempt, accepted when Postfix retries.
    Greylisted,
    /// Refused with 550 5.1.1: Postfix bounces the message with a DSN to the sender.
    Refused,
}

/// One share of the recipients: `percent` of the messages go to `LOCAL-N@` the domain of world case `case`.
#[derive(Debug)]
struct Destination {
    case: &'static str,
    local: &'static str,
    /// The provider class the sidecar must count these under (by MX host: built in, or the tenant's suffixes).
    provider: &'static str,
    fate: Fate,
    percent: u64,
}

/// The mix, by message number modulo 100. The DANE, DANE-TA and MTA-STS receivers are classed as Microsoft, Apple
/// and Yahoo by the tenant's `providerSuffixes` (see `manifest`); the rate-limiting receiver's MX is Gmail's name.
const MIX: [Destination; 8] = [
    destination("RATELIMITED", "patient", "gmail", Fate::Accepted, 20),
    destination("DANE", "patient", "microsoft", Fate::Accepted, 15),
    destination("STS", "patient", "yahoo", Fate::Accepted, 10),
    destination("DANE_TA", "patient", "apple", Fate::Accepted, 5),
    destination("GOOD", "patient", "other", Fate::Accepted, 30),
    destination("SMART", "patient", "other", Fate::Accepted, 8),
    destination("SMART", "grey", "other", Fate::Greylisted, 10),
    destination("SMART", "reject", "other", Fate::Refused, 2),
];

const fn destination(
    case: &'static str,
    local: &'static str,
    provider: &'static str,
    fate: Fate,
    percent: u64,
) -> Destination {
    Destination {
        case,
        local,
        provider,
        fate,
        percent,
    }
}

fn destination_of(n: u64) -> &'static Destination {
    let mut bucket = n % 100;
    for destination in &MIX {
        if bucket < destination.percent {
            return destination;
        }
        bucket -= destination.percent;
    }
    panic!("the shares of MIX add up to less than 100")
}

fn recipient(world: &World, n: u64) -> String {
    let destination = destination_of(n);
    format!(
        "{}-{n}@{}",
        destination.local,
        world.get(&format!("SMDP_CASE_{}", destination.case))
    )
}

/// The receiver (`SMDP_RECEIVERS` name) behind a world case.
fn receiver_of(world: &World, case: &str) -> String {
    world.get(&format!("SMDP_CASE_{case}_RX")).to_owned()
}

fn maildir(world: &World, receiver: &str) -> PathBuf {
    PathBuf::from(world.get(&format!(
        "SMDP_RX_{}_MAILDIR",
        receiver.to_ascii_uppercase().replace('-', "_")
    )))
}

/// A tenant sending as `sender.test` and the DSN domain, with warmup caps no run reaches and the world's DANE,
/// DANE-TA and MTA-STS MX hosts classed as three providers.
fn manifest(world: &World) -> String {
    let warmup = "    warmup:
      schedule: [{day: 1, dailyLimit: 100000000}]
      providerSuffixes:
        - {suffix: mx.dane.test, provider: microsoft}
        - {suffix: mx.dane-ta.test, provider: apple}
        - {suffix: mx.sts.test, provider: yahoo}
";
    let manifest = tenant_manifest(world, "load", warmup, "    onFailure: defer\n");
    let domains = "    - name: sender.test\n";
    assert!(manifest.contains(domains), "{manifest}");
    manifest.replace(
        domains,
        &format!("{domains}    - name: {}\n", world.get("SMDP_DSN_DOMAIN")),
    )
}

/// A message of this run as a receiver holds it.
#[derive(Debug)]
struct Arrival {
    message_id: String,
    /// The submitter's time stamp (unix seconds).
    submitted: f64,
    /// The Maildir file's modification time (unix seconds).
    arrived: f64,
    /// Delayed by the smart receiver's postgrey (its `X-Greylist:` header).
    greylisted: bool,
    /// A DSN to the sender, about the message `message_id`.
    dsn: bool,
}

/// Every message of run `tag` in `receiver`'s Maildir. A DSN carries the bounced message, whose Message-ID is the
/// first of this run in it.
fn arrivals(world: &World, receiver: &str, tag: &str) -> Vec<Arrival> {
    let needle = format!("Message-ID: <{tag}.");
    let mut found = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = fs::read_dir(maildir(world, receiver).join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(text) = fs::read_to_string(entry.path()) else {
                continue;
            };
            let Some(start) = text.find(&needle).map(|at| at + "Message-ID: ".len()) else {
                continue;
            };
            let end = start + text[start..].find('>').expect("a Message-ID ends with >");
            let metadata = entry.metadata().expect("stat a delivered message");
            found.push(Arrival {
                message_id: text[start..=end].to_owned(),
                submitted: text
                    .lines()
                    .find_map(|line| line.strip_prefix("X-Bench-Submitted: "))
                    .and_then(|value| value.trim().parse().ok())
                    .expect("every message of the run carries X-Bench-Submitted"),
                arrived: metadata.mtime() as f64 + metadata.mtime_nsec() as f64 / 1e9,
                greylisted: text.lines().any(|line| line.starts_with("X-Greylist: delayed")),
                dsn: text.contains("report-type=delivery-status"),
            });
        }
    }
    found
}

/// Files in Postfix's queues (as the sidecar counts them): 0 once every message was delivered or bounced and
/// every DSN delivered.
fn queued_files(mta: &MtaHost) -> usize {
    let mut count = 0;
    let mut pending: Vec<PathBuf> = ["incoming", "active", "deferred", "hold", "maildrop"]
        .iter()
        .map(|queue| mta.dir.join("queue").join(queue))
        .collect();
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                Ok(_) => count += 1,
                Err(_) => {}
            }
        }
    }
    count
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn latency_line(mut latencies: Vec<f64>) -> String {
    if latencies.is_empty() {
        return "none".to_owned();
    }
    latencies.sort_by(f64::total_cmp);
    format!(
        "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        quantile(&latencies, 0.50) * 1e3,
        quantile(&latencies, 0.99) * 1e3,
        latencies[latencies.len() - 1] * 1e3
    )
}

#[test]
fn load_through_every_provider_with_greylisting_and_refusals_loses_nothing() {
    let count = env_number("SECUREMAIL_LOAD_MESSAGES", 2000);
    assert!(
        count >= 100,
        "SECUREMAIL_LOAD_MESSAGES={count}: at least 100, so every share of the mix gets some"
    );
    let world = World::load();
    let load_at_start = load_average();
    let mta = MtaHost::start(&world, "load", &manifest(&world));
    let tag = unique_id("load");
    let sender = format!("alerts@{}", world.get("SMDP_DSN_DOMAIN"));

    let recipients: Vec<String> = (0..count).map(|n| recipient(&world, n)).collect();
    let recipients_file = mta.dir.join("recipients");
    fs::write(&recipients_file, recipients.join("\n") + "\n").unwrap();
    // The sweep when the host stops looks for these local parts in everything the sidecar wrote: the first few of
    // each share (searching for all of them would cost minutes per 100 000).
    mta.note_recipients(
        MIX.iter()
            .flat_map(|share| (0..count).filter(|&n| std::ptr::eq(destination_of(n), share)).take(3))
            .map(|n| recipients[n as usize].as_str()),
    );

    let pid = mta.sidecar_pid();
    let cpu_before = cpu_seconds(pid);
    let accepted_file = mta.dir.join("accepted");
    eprintln!("load: submitting {count} messages (load average {load_at_start})");
    let submission = BulkSubmission {
        sender: &sender,
        recipients: Recipients::File(&recipients_file),
        tag: &tag,
        count,
        size: MESSAGE_KB * 1024,
        connections: 8,
        keep_going: false,
    }
    .command(&mta, &accepted_file)
    .output()
    .expect("run bench_submit.py");
    let summary = json_report(&submission, "bench_submit.py");
    assert!(submission.status.success(), "Postfix refused a submission: {summary}");
    let submit_start = summary["start"].as_f64().unwrap();
    let submit_seconds = summary["end"].as_f64().unwrap() - submit_start;
    let accepted = accepted_message_ids(&accepted_file, &tag);
    assert_eq!(
        accepted.len() as u64,
        count,
        "every message accepted with 250: {summary}"
    );

    // Postfix's queue empty means every message was delivered or bounced and every DSN delivered: it deletes a
    // queue file only after the sidecar answered, and the sidecar answers 2xx only once the MX did.
    let drain_timeout = Duration::from_secs(600 + count / 20);
    let waiting = Instant::now();
    let mut reported = Instant::now();
    loop {
        let queued = queued_files(&mta);
        if queued == 0 {
            break;
        }
        assert!(
            waiting.elapsed() < drain_timeout,
            "{queued} messages still queued after {drain_timeout:?}; e.g. {:?}\nsidecar log tail:\n{}",
            mta.queue().iter().take(3).collect::<Vec<_>>(),
            mta.sidecar_log().lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
        if reported.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "load: {queued} messages queued, {:.0} s after the last submission",
                waiting.elapsed().as_secs_f64()
            );
            reported = Instant::now();
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let cpu_per_message = (cpu_seconds(pid) - cpu_before) / count as f64;
    let peak_rss_mib = status_kib(pid, "VmHWM") as f64 / 1024.0;
    let load_at_end = load_average();

    // Every arrival of this run, at every receiver of the mix, by the receiver it reached.
    let receivers: BTreeSet<String> = MIX.iter().map(|share| receiver_of(&world, share.case)).collect();
    let mut delivered: BTreeMap<String, Vec<(String, Arrival)>> = BTreeMap::new();
    let mut dsns: BTreeMap<String, usize> = BTreeMap::new();
    let mut copies_by_provider: BTreeMap<&str, usize> = BTreeMap::new();
    let mut last_arrival = submit_start;
    for receiver in &receivers {
        let provider = MIX
            .iter()
            .find(|share| &receiver_of(&world, share.case) == receiver)
            .map(|share| share.provider)
            .unwrap();
        for arrival in arrivals(&world, receiver, &tag) {
            *copies_by_provider.entry(provider).or_default() += 1;
            last_arrival = last_arrival.max(arrival.arrived);
            if arrival.dsn {
                *dsns.entry(arrival.message_id).or_default() += 1;
            } else {
                delivered
                    .entry(arrival.message_id.clone())
                    .or_default()
                    .push((receiver.clone(), arrival));
            }
        }
    }
    let bounced = bounced_message_ids(&mta.maillog());

    // Each accepted message against its fate.
    let mut lost = Vec::new();
    let mut misrouted = Vec::new();
    let mut by_share: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let (mut deferred_then_delivered, mut refused, mut latencies, mut greylist_latencies) =
        (0, 0, Vec::new(), Vec::new());
    for n in 0..count {
        let id = format!("<{tag}.{n}@sender.test>");
        let share = destination_of(n);
        let expected_receiver = receiver_of(&world, share.case);
        match share.fate {
            Fate::Accepted | Fate::Greylisted => {
                let Some(copies) = delivered.get(&id) else {
                    lost.push(id);
                    continue;
                };
                let (receiver, arrival) = &copies[0];
                if receiver != &expected_receiver || (share.fate == Fate::Greylisted) != arrival.greylisted {
                    misrouted.push(format!("{id} at {receiver}, greylisted {}", arrival.greylisted));
                }
                *by_share.entry((share.provider, share.case)).or_default() += 1;
                latencies.push(arrival.arrived - arrival.submitted);
                if share.fate == Fate::Greylisted {
                    deferred_then_delivered += 1;
                    greylist_latencies.push(arrival.arrived - arrival.submitted);
                }
            }
            Fate::Refused => {
                if delivered.contains_key(&id) {
                    misrouted.push(format!("{id} was refused but arrived"));
                }
                if !dsns.contains_key(&id) || !bounced.contains(&id) {
                    lost.push(id);
                    continue;
                }
                refused += 1;
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        misrouted.is_empty(),
        "{} misrouted, e.g. {:?}",
        misrouted.len(),
        &misrouted[..misrouted.len().min(5)]
    );
    let duplicates: usize = delivered.values().map(|copies| copies.len() - 1).sum::<usize>()
        + dsns.values().map(|copies| copies - 1).sum::<usize>();

    // The sidecar's counts by provider class against what arrived (DSNs went out through it too, as `other`).
    let metrics = mta.admin_get("/metrics");
    let counted = |provider: &str, result: &str| {
        metric_sum(
            &metrics,
            "securemail_recipients_total",
            &[&format!("provider=\"{provider}\""), &format!("result=\"{result}\"")],
        ) as usize
    };
    let mut provider_lines = String::new();
    for provider in ["gmail", "microsoft", "yahoo", "apple", "other"] {
        let arrived = copies_by_provider.get(provider).copied().unwrap_or_default();
        assert!(arrived > 0, "the mix reaches {provider}");
        assert_eq!(
            counted(provider, "delivered"),
            arrived,
            "securemail_recipients_total{{provider=\"{provider}\",result=\"delivered\"}} against the copies that arrived"
        );
        let _ = write!(
            provider_lines,
            " {provider} {arrived} (deferred {}, bounced {});",
            counted(provider, "deferred"),
            counted(provider, "bounced")
        );
    }
    let bounced_counted: usize = ["gmail", "microsoft", "yahoo", "apple", "other"]
        .iter()
        .map(|provider| counted(provider, "bounced"))
        .sum();
    assert_eq!(bounced_counted, refused, "bounced recipients counted by the sidecar");
    assert!(
        counted("other", "deferred") >= deferred_then_delivered,
        "each greylisted recipient was deferred at least once: {provider_lines}"
    );

    let torn = verify_evidence_allowing_torn_tails(&mta);
    assert_eq!(torn, 0, "no evidence append was cut short");
    let sessions = assert_no_cleartext_session(&world);
    let wall = last_arrival - submit_start;
    eprintln!(
        "load: {count} messages submitted ({MESSAGE_KB} KB each, 8 sessions, {submit_seconds:.1} s, {:.0} msg/s), {} accepted \
         with 250\n\
         load: delivered per provider class:{provider_lines} by destination {by_share:?}\n\
         load: deferred (450 greylisting) then delivered {deferred_then_delivered}; bounced (550 5.1.1) with a DSN at \
         the sender {refused}; duplicates {duplicates}; lost 0\n\
         load: throughput {:.1} msg/s ({} accepted / {wall:.1} s, first submission to last arrival)\n\
         load: latency, submission to arrival: all delivered {}; greylisted {}\n\
         load: sidecar CPU {:.3} ms per message, peak RSS {peak_rss_mib:.1} MiB; {sessions} receiver sessions, all \
         TLS; evidence files {} verified\n\
         load: load average at start {load_at_start}, at end {load_at_end}",
        count as f64 / submit_seconds,
        accepted.len(),
        accepted.len() as f64 / wall,
        accepted.len(),
        latency_line(latencies),
        latency_line(greylist_latencies),
        cpu_per_message * 1e3,
        mta.evidence_files().len(),
    );
}
