//! Fault injection in the data-plane world (`make e2e-faults`, and a reduced run in `make test`): the sidecar and
//! Postfix killed with SIGKILL at random moments under load, the validating resolver, the MTA-STS policy host and a
//! receiver failing for a while, the sidecar's state volume full. Each case asserts that every message Postfix
//! accepted with a 250 reaches its receiver or comes back as a bounce (none is lost), that no session carried mail
//! in cleartext, and prints what it counted. Sizes come from the environment:
//!
//! - `SECUREMAIL_FAULT_MESSAGES` (default 1000) messages submitted while `SECUREMAIL_FAULT_KILLS` (default 10)
//!   kills land; `SECUREMAIL_FAULT_SEED` repeats a run's random choices (every run prints its seed);
//! - `SECUREMAIL_FAULT_OUTAGE_SECS` (default 20): how long each outage lasts.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use securemail_e2e::bulk::{
    BulkSubmission, Recipients, accepted_message_ids, bounced_message_ids, env_number, lost_message_ids,
    verify_evidence_allowing_torn_tails,
};
use securemail_e2e::dataplane::{
    MtaHost, ReceiverSetting, SENDER, UNCAPPED_WARMUP, World, assert_no_cleartext_session, evidence_for, json_report,
    message, received_ids, tenant_manifest, unique_id, wait_until,
};

fn manifest(world: &World) -> String {
    tenant_manifest(world, "faults", UNCAPPED_WARMUP, "    onFailure: defer\n")
}

/// xorshift64*: the kill schedule only needs to be spread and repeatable from its seed.
struct Random(u64);

impl Random {
    fn seeded() -> (Self, u64) {
        let seed = env_number(
            "SECUREMAIL_FAULT_SEED",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        );
        (Self(seed.max(1)), seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A duration between `low` and `high` milliseconds.
    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next() % (high - low + 1))
    }
}

/// The highest message number Postfix has answered 250 so far: how far the submission has got.
fn highest_accepted(accepted_file: &std::path::Path) -> u64 {
    fs::read_to_string(accepted_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

/// What a failed wait prints: the queue, the sidecar's log and Postfix's.
fn diagnostics(mta: &MtaHost) -> String {
    format!(
        "queue {:?}\nsidecar log:\n{}\nmaillog:\n{}",
        mta.queue(),
        mta.sidecar_log(),
        mta.maillog()
    )
}

#[test]
fn kill_9_of_the_sidecar_and_postfix_under_load_loses_nothing() {
    let messages = env_number("SECUREMAIL_FAULT_MESSAGES", 1000);
    let kills = env_number("SECUREMAIL_FAULT_KILLS", 10);
    let (mut random, seed) = Random::seeded();
    let world = World::load();
    let mut mta = MtaHost::start(&world, "faults-kill", &manifest(&world));
    let tag = unique_id("faults-kill");
    let recipient = format!("patient@{}", world.get("SMDP_CASE_GOOD"));
    let accepted_file = mta.dir.join("accepted");
    let started = Instant::now();
    // Submits as the tenant's applications do, 8 sessions at once; a message whose session breaks is not retried
    // under the same number, so each Message-ID was submitted once.
    let submitter = BulkSubmission {
        sender: SENDER,
        recipients: Recipients::One(&recipient),
        tag: &tag,
        count: messages,
        size: 1024,
        connections: 8,
        keep_going: true,
    }
    .command(&mta, &accepted_file)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start bench_submit.py");

    // Kills are paced by the load, not the clock: each one waits for a random point of the submission (the highest
    // message number answered 250 so far). Any left when the submitter ends land at random moments after it, while
    // Postfix's queue drains or once it has: every kill lands however fast or slow the path is, so the case passes or
    // fails only on what it asserts.
    let mut kill_points: Vec<u64> = (0..kills)
        .map(|_| messages / 20 + random.next() % (messages * 17 / 20).max(1))
        .collect();
    kill_points.sort_unstable();
    let mut killed = BTreeMap::from([("sidecar", 0), ("postfix", 0)]);
    let mut submitter = Some(submitter);
    let mut report = None;
    let mut kills_during_submission = 0;
    // Takes the submitter's output once it has ended.
    let reap = |submitter: &mut Option<std::process::Child>, report: &mut Option<std::process::Output>| {
        if let Some(child) = submitter.as_mut()
            && child.try_wait().expect("bench_submit.py").is_some()
        {
            *report = submitter
                .take()
                .map(|child| child.wait_with_output().expect("bench_submit.py"));
        }
    };
    for kill_point in kill_points {
        reap(&mut submitter, &mut report);
        while submitter.is_some() && highest_accepted(&accepted_file) < kill_point {
            std::thread::sleep(Duration::from_millis(20));
            reap(&mut submitter, &mut report);
        }
        if submitter.is_some() {
            kills_during_submission += 1;
        } else {
            std::thread::sleep(random.millis(100, 1000));
        }
        if random.next() % 2 == 0 {
            mta.kill_sidecar();
            std::thread::sleep(random.millis(0, 300));
            mta.start_sidecar(&world);
            *killed.get_mut("sidecar").unwrap() += 1;
        } else {
            mta.kill_postfix();
            std::thread::sleep(random.millis(0, 300));
            mta.start_postfix();
            *killed.get_mut("postfix").unwrap() += 1;
        }
    }
    let report = match submitter {
        Some(child) => child.wait_with_output().expect("bench_submit.py"),
        None => report.expect("bench_submit.py finished"),
    };
    let summary = json_report(&report, "bench_submit.py");
    assert!(report.status.success(), "bench_submit.py: {summary}");

    let accepted = accepted_message_ids(&accepted_file, &tag);
    assert!(!accepted.is_empty(), "Postfix accepted nothing: {summary}");
    let prefix = format!("{tag}.");
    let missing =
        |received: &BTreeMap<String, usize>, bounced: &BTreeSet<String>| lost_message_ids(&accepted, received, bounced);
    wait_until(
        Duration::from_secs(300 + messages / 10),
        "Postfix's queue to drain and every accepted message to arrive",
        || {
            mta.queue().is_empty()
                && missing(
                    &received_ids(&world, "GOOD", &prefix),
                    &bounced_message_ids(&mta.maillog()),
                )
                .is_empty()
        },
        || {
            let lost = missing(
                &received_ids(&world, "GOOD", &prefix),
                &bounced_message_ids(&mta.maillog()),
            );
            format!(
                "{} accepted messages not delivered nor bounced, e.g. {:?}; queue {}; seed {seed}",
                lost.len(),
                lost.iter().take(5).collect::<Vec<_>>(),
                mta.queue().len()
            )
        },
    );
    let duration = started.elapsed();
    let received = received_ids(&world, "GOOD", &prefix);
    let bounced = bounced_message_ids(&mta.maillog());
    let lost = missing(&received, &bounced);
    let duplicates: usize = received.values().map(|copies| copies - 1).sum();
    let unacknowledged = received.keys().filter(|id| !accepted.contains(*id)).count();
    assert!(lost.is_empty(), "lost: {lost:?}");
    let sessions = assert_no_cleartext_session(&world);
    let torn = verify_evidence_allowing_torn_tails(&mta);
    eprintln!(
        "faults: {messages} messages submitted, {} accepted with 250, {} refused or cut off; {kills} kills \
         ({kills_during_submission} during the submission; sidecar {}, postfix {}); lost 0, duplicates {duplicates}, bounced {}, delivered without a 250 \
         {unacknowledged}; {sessions} receiver sessions, all TLS; evidence files {} ({torn} with a torn last line); \
         {:.0} s; seed {seed}",
        accepted.len(),
        summary["failed"],
        killed["sidecar"],
        killed["postfix"],
        bounced.len(),
        mta.evidence_files().len(),
        duration.as_secs_f64(),
    );
}

/// Submits `count` messages to `case`'s domain while `outage` lasts: they must stay deferred in Postfix's queue
/// with nothing at any receiver until `end_outage` runs after `SECUREMAIL_FAULT_OUTAGE_SECS`, and then arrive
/// exactly once each.
fn deferred_through_outage_then_delivered<T>(label: &str, case: &str, outage: impl FnOnce(&World) -> T) {
    const COUNT: usize = 3;
    let hold = Duration::from_secs(env_number("SECUREMAIL_FAULT_OUTAGE_SECS", 20));
    let world = World::load();
    let began = Instant::now();
    // Before the MTA host starts: no policy, address or session of the sidecar predates the outage.
    let restore = outage(&world);
    let mta = MtaHost::start(&world, label, &manifest(&world));
    let tag = unique_id(label);
    let recipient = format!("patient@{}", world.get(&format!("SMDP_CASE_{case}")));
    for n in 0..COUNT {
        let report = mta.submit(SENDER, &[&recipient], &message(&format!("{tag}.{n}"), &recipient));
        assert_eq!(report["stage"], "sent", "submission failed: {report}");
    }
    let prefix = format!("{tag}.");
    let deferred = || mta.maillog().matches("status=deferred").count();
    wait_until(
        Duration::from_secs(120),
        "every message to be deferred",
        || deferred() >= COUNT,
        || diagnostics(&mta),
    );
    while began.elapsed() < hold {
        assert!(
            received_ids(&world, case, &prefix).is_empty(),
            "a message arrived during the outage\n{}",
            diagnostics(&mta)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let queue = mta.queue();
    assert_eq!(queue.len(), COUNT, "every message stays queued: {queue:?}");
    let reasons: BTreeSet<String> = queue
        .iter()
        .filter_map(|entry| entry["recipients"][0]["delay_reason"].as_str())
        .map(str::to_owned)
        .collect();
    for reason in &reasons {
        assert!(reason.contains(" 4"), "a temporary failure: {reason}");
    }
    let deferrals = deferred();
    drop(restore);
    let recovered = Instant::now();
    wait_until(
        Duration::from_secs(600),
        "delivery after the outage",
        || received_ids(&world, case, &prefix).len() == COUNT && mta.queue().is_empty(),
        || diagnostics(&mta),
    );
    let received = received_ids(&world, case, &prefix);
    assert!(
        received.values().all(|&copies| copies == 1),
        "one copy each: {received:?}"
    );
    let sessions = assert_no_cleartext_session(&world);
    eprintln!(
        "{label}: {COUNT} messages deferred {deferrals} times over a {} s outage ({reasons:?}); all delivered {:.0} s \
         after it ended; {sessions} receiver sessions, all TLS",
        hold.as_secs(),
        recovered.elapsed().as_secs_f64()
    );
}

#[test]
fn validating_resolver_down_defers_mail_until_it_is_back() {
    // The sidecar's only resolver: without it neither MX, TLSA nor addresses can be known, so nothing may go out.
    deferred_through_outage_then_delivered("faults-dns", "DANE", |world| world.stop_daemon("unbound"));
}

#[test]
fn mta_sts_policy_host_down_defers_mail_until_it_is_back() {
    let world = World::load();
    deferred_through_outage_then_delivered("faults-mta-sts", "STS", |world| world.stop_daemon("nginx"));
    // The MX outside the policy never got anything, during the outage or after.
    let rogue = received_ids(&world, "STS_NOMATCH", "faults-mta-sts.");
    assert!(rogue.is_empty(), "{rogue:?}");
}

#[test]
fn receiver_answering_4xx_for_a_while_defers_mail_until_it_accepts() {
    deferred_through_outage_then_delivered("faults-4xx", "GOOD", |world| {
        // Every session from the MTA address gets 421 at RCPT (after STARTTLS and MAIL) and is closed.
        ReceiverSetting::set(
            world,
            "good",
            "smtpd_client_restrictions",
            &format!(
                "check_client_access inline:{{ {{ {} = 421 4.3.2 System not accepting network messages }} }}",
                world.get("SMDP_MTA_ADDR")
            ),
        )
    });
}

#[test]
fn full_state_volume_defers_with_a_clear_log_line_and_loses_nothing() {
    let world = World::load();
    let mut mta = MtaHost::start_with_state_volume(&world, "faults-full", &manifest(&world), Some("1m"));
    let volume = mta.volume().expect("a state volume").to_owned();
    let tag = unique_id("faults-full");
    let recipient = format!("patient@{}", world.get("SMDP_CASE_GOOD"));
    let prefix = format!("{tag}.");
    let submit = |mta: &MtaHost, n: usize| {
        let report = mta.submit(SENDER, &[&recipient], &message(&format!("{tag}.{n}"), &recipient));
        assert_eq!(report["stage"], "sent", "submission failed: {report}");
    };
    submit(&mta, 0);
    wait_until(
        Duration::from_secs(60),
        "the first delivery",
        || received_ids(&world, "GOOD", &prefix).len() == 1,
        || diagnostics(&mta),
    );

    let filler = volume.join("filler");
    let mut file = fs::File::create(&filler).unwrap();
    let full = loop {
        if let Err(err) = file.write_all(&[0; 4096]) {
            break err;
        }
    };
    drop(file);
    assert_eq!(full.kind(), std::io::ErrorKind::StorageFull, "{full}");

    // Appends go on while the evidence file's last block has room; the delivery whose record does not fit reaches
    // the receiver, but its evidence cannot be written, and the sidecar stops delivering.
    let failure = "cannot write evidence";
    let mut submitted = 0;
    for n in 1..=64 {
        submit(&mta, n);
        submitted = n;
        wait_until(
            Duration::from_secs(60),
            &format!("delivery of message {n} or the evidence failure"),
            || mta.sidecar_log().contains(failure) || received_ids(&world, "GOOD", &prefix).len() == n + 1,
            || diagnostics(&mta),
        );
        if mta.sidecar_log().contains(failure) {
            break;
        }
    }
    assert!(
        mta.sidecar_log().contains(failure),
        "evidence never failed on the full volume\n{}",
        diagnostics(&mta)
    );
    let line = mta
        .sidecar_log()
        .lines()
        .find(|line| line.contains(failure))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("No space left on device"),
        "the log line names the cause: {line}"
    );
    let readiness = mta.admin_get("/readyz");
    assert!(readiness.contains("evidence log not writable"), "/readyz: {readiness}");

    // Everything after it is answered 4xx and stays in Postfix's queue. The message whose record did not fit is the
    // last to arrive, but the receiver may file it only after the sidecar logged the failure, and the loop may have
    // submitted one more: which one it was is read once the queue has settled.
    const LATER: usize = 3;
    let total = submitted + 1 + LATER;
    for n in submitted + 1..total {
        submit(&mta, n);
    }
    // Every message is either received or queued, and every queued one deferred for the evidence log.
    let settled = |received: usize| {
        let queue = mta.queue();
        queue.len() >= LATER
            && queue.len() + received == total
            && queue.iter().all(|entry| {
                entry["recipients"][0]["delay_reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("4.3.0") && reason.contains("evidence log unavailable"))
            })
    };
    wait_until(
        Duration::from_secs(60),
        "the later messages to be deferred",
        || settled(received_ids(&world, "GOOD", &prefix).len()),
        || diagnostics(&mta),
    );
    let settled_with = received_ids(&world, "GOOD", &prefix).len();
    std::thread::sleep(Duration::from_secs(5));
    let received = received_ids(&world, "GOOD", &prefix);
    assert_eq!(
        received.len(),
        settled_with,
        "a message submitted after the failure was sent: {received:?}"
    );
    // Postfix retries the deferred messages; one being retried is active, without a delay reason, for a moment. The
    // queue settles again with every later message deferred for the evidence log.
    wait_until(
        Duration::from_secs(60),
        "the queue to settle again after 5 s",
        || settled(received.len()),
        || diagnostics(&mta),
    );
    let failed_at = received.len() - 1;
    let later = failed_at + 1..total;

    // Space freed and the sidecar restarted, as the runbook says: the queue drains, each message once.
    fs::remove_file(&filler).unwrap();
    mta.kill_sidecar();
    mta.start_sidecar(&world);
    wait_until(
        Duration::from_secs(120),
        "delivery after space was freed",
        || received_ids(&world, "GOOD", &prefix).len() == later.end && mta.queue().is_empty(),
        || diagnostics(&mta),
    );
    let received = received_ids(&world, "GOOD", &prefix);
    assert!(
        received.values().all(|&copies| copies == 1),
        "one copy each: {received:?}"
    );
    for n in later.clone() {
        let records = evidence_for(&mta, &format!("{tag}.{n}"));
        assert!(
            records.iter().any(|record| record["outcome"] == "delivered"),
            "message {n} has its evidence: {records:?}"
        );
    }
    assert_eq!(verify_evidence_allowing_torn_tails(&mta), 0, "no append was cut short");
    let unrecorded = evidence_for(&mta, &format!("{tag}.{failed_at}")).is_empty();
    assert_no_cleartext_session(&world);
    eprintln!(
        "state volume full: {} messages, each delivered once; evidence failed at message {failed_at}, which {}",
        later.end,
        if unrecorded {
            "was acknowledged without an evidence record"
        } else {
            "has its evidence record"
        }
    );
}
