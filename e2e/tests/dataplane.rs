//! The sidecar in the data-plane world (`make e2e-dataplane`): Debian's Postfix and the sidecar, configured from
//! the operator's `render` output, deliver to real Postfix receivers whose policies come from DNSSEC-signed zones,
//! MTA-STS over HTTPS and the tenant's spec. Each case asserts what the receiver got, what Postfix's queue holds,
//! the evidence records and the metrics. The world's receivers are shared, so every message carries its own
//! Message-ID and cases look only for theirs.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use securemail_e2e::dataplane::{
    MtaHost, SENDER, Submission, UNCAPPED_WARMUP, World, evidence_for, in_netns, message, metric_sum,
    received_containing, received_ids, run_ok, sidecar_bin, tenant_manifest, unique_id, wait_until,
};
use serde_json::Value;

/// A tenant sending from the world's MTA address, with `tls_policy` (YAML, indented for `spec.tlsPolicy`).
fn manifest(world: &World, tls_policy: &str) -> String {
    manifest_with_warmup(world, tls_policy, UNCAPPED_WARMUP)
}

/// The same with `warmup` (YAML, indented for `spec.ipPool.warmup`).
fn manifest_with_warmup(world: &World, tls_policy: &str, warmup: &str) -> String {
    tenant_manifest(world, "dataplane", warmup, tls_policy)
}

const DEFER: &str = "    onFailure: defer\n";
const BOUNCE: &str = "    onFailure: bounce\n";

/// The messages with Message-ID `<id@sender.test>` in the Maildir of the receiver behind `case`.
fn received(world: &World, case: &str, id: &str) -> Vec<Vec<u8>> {
    received_containing(world, case, &format!("<{id}@sender.test>"))
}

/// Waits for the first evidence record of `id` and returns it.
fn first_attempt(mta: &MtaHost, id: &str) -> Value {
    wait_until(
        Duration::from_secs(60),
        &format!("an evidence record for {id}"),
        || !evidence_for(mta, id).is_empty(),
        || format!("sidecar log:\n{}\nmaillog:\n{}", mta.sidecar_log(), mta.maillog()),
    );
    evidence_for(mta, id).remove(0)
}

/// Queue entries whose recipients include `recipient`.
fn queued_for(mta: &MtaHost, recipient: &str) -> Vec<Value> {
    mta.queue()
        .into_iter()
        .filter(|entry| {
            entry["recipients"]
                .as_array()
                .is_some_and(|rcpts| rcpts.iter().any(|r| r["address"].as_str() == Some(recipient)))
        })
        .collect()
}

fn assert_sent(report: &Value) {
    assert_eq!(report["stage"], "sent", "submission failed: {report}");
}

fn metrics(mta: &MtaHost) -> String {
    mta.admin_get("/metrics")
}

/// Delivers one message to `case`'s domain and waits until it arrived; returns the message as received.
fn deliver_and_receive(world: &World, mta: &MtaHost, case: &str) -> (String, Vec<u8>) {
    let id = unique_id(case);
    let recipient = format!("patient@{}", world.get(&format!("SMDP_CASE_{case}")));
    assert_sent(&mta.submit(SENDER, &[&recipient], &message(&id, &recipient)));
    wait_until(
        Duration::from_secs(60),
        &format!("{case}: delivery of {id}"),
        || !received(world, case, &id).is_empty(),
        || format!("sidecar log:\n{}\nmaillog:\n{}", mta.sidecar_log(), mta.maillog()),
    );
    let mut messages = received(world, case, &id);
    assert_eq!(messages.len(), 1, "{case}: exactly one copy arrives");
    assert!(
        queued_for(mta, &recipient).is_empty(),
        "{case}: nothing left in the queue"
    );
    (id, messages.remove(0))
}

#[test]
fn dane_domain_is_delivered_with_dkim_that_dkimpy_verifies() {
    let world = World::load();
    let mta = MtaHost::start(&world, "dane", &manifest(&world, DEFER));
    let (id, received) = deliver_and_receive(&world, &mta, "DANE");

    let records: Vec<String> = mta
        .dkim_records
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    securemail_e2e::dataplane::assert_dkimpy_verifies(&records, &received, &id);

    let attempt = first_attempt(&mta, &id);
    assert_eq!(attempt["outcome"], "delivered");
    assert_eq!(attempt["policy"]["source"], "dane");
    assert_eq!(attempt["tls"]["verification"], "dane-ee");
    assert_eq!(attempt["recipientDomain"], world.get("SMDP_CASE_DANE"));
    assert_eq!(attempt["sourceIp"], world.get("SMDP_MTA_ADDR"));
    let text = serde_json::to_string(&attempt).unwrap();
    assert!(!text.contains('@'), "evidence carries no address: {text}");

    let metrics = metrics(&mta);
    assert!(
        metric_sum(
            &metrics,
            "securemail_delivery_attempts",
            &["result=\"delivered\"", "policy_source=\"dane\""]
        ) >= 1.0,
        "{metrics}"
    );
    assert!(!metrics.contains("patient"), "metrics carry no recipient");
}

#[test]
fn dane_ta_domain_is_delivered() {
    let world = World::load();
    let mta = MtaHost::start(&world, "dane-ta", &manifest(&world, DEFER));
    let (id, _) = deliver_and_receive(&world, &mta, "DANE_TA");
    let attempt = first_attempt(&mta, &id);
    assert_eq!(attempt["policy"]["source"], "dane");
    assert_eq!(attempt["tls"]["verification"], "dane-ta");
}

#[test]
fn mta_sts_enforce_delivers_only_to_a_listed_mx() {
    let world = World::load();
    let mta = MtaHost::start(&world, "sts", &manifest(&world, DEFER));
    let (id, _) = deliver_and_receive(&world, &mta, "STS");
    let attempt = first_attempt(&mta, &id);
    assert_eq!(attempt["policy"]["source"], "mta-sts");
    assert_eq!(attempt["policy"]["id"], world.get("SMDP_STS_POLICY_ID"));
    assert_eq!(attempt["tls"]["verification"], "webpki");

    // sts-nomatch.test's only MX is not in its enforce policy: nothing may go there.
    let id = unique_id("sts-nomatch");
    let recipient = format!("patient@{}", world.get("SMDP_CASE_STS_NOMATCH"));
    assert_sent(&mta.submit(SENDER, &[&recipient], &message(&id, &recipient)));
    let attempt = first_attempt(&mta, &id);
    assert_eq!(attempt["outcome"], "deferred", "{attempt}");
    assert!(received(&world, "STS_NOMATCH", &id).is_empty());
    assert_eq!(queued_for(&mta, &recipient).len(), 1, "the message stays queued");
}

#[test]
fn a_sidecar_restarted_while_the_mta_sts_host_is_down_still_enforces_the_cached_policy() {
    let world = World::load();
    let mut mta = MtaHost::start(&world, "sts-restart", &manifest(&world, DEFER));
    let (id, _) = deliver_and_receive(&world, &mta, "STS");
    assert_eq!(first_attempt(&mta, &id)["policy"]["source"], "mta-sts");

    // The policy host goes down and the sidecar restarts (kill -9, as a crash or a rescheduled pod would): the
    // policy fetched before is on its state volume, so the domain is still delivered to under it.
    let outage = world.stop_daemon("nginx");
    mta.kill_sidecar();
    mta.start_sidecar(&world);
    let (id, _) = deliver_and_receive(&world, &mta, "STS");
    let attempt = first_attempt(&mta, &id);
    assert_eq!(attempt["outcome"], "delivered", "{attempt}");
    assert_eq!(attempt["policy"]["source"], "mta-sts");
    assert_eq!(attempt["policy"]["id"], world.get("SMDP_STS_POLICY_ID"));
    assert_eq!(attempt["tls"]["verification"], "webpki");
    let log = mta.sidecar_log();
    assert!(
        log.lines()
            .any(|line| line.contains("MTA-STS policy cache loaded") && line.contains("\"kept\":1")),
        "{log}"
    );
    drop(outage);
}

/// Cases where no secure path exists: the message must not reach the receiver, and stays queued (defer).
const INSECURE_CASES: &[&str] = &[
    "NOSTARTTLS",
    "STRIPPED",
    "WRONGNAME",
    "EXPIRED",
    "SELFSIGNED",
    "TLS11",
    "DANE_MISMATCH",
    "DANE_SERVFAIL",
];

#[test]
fn no_secure_path_means_nothing_sent_and_the_message_stays_queued() {
    let world = World::load();
    let mta = MtaHost::start(&world, "defer", &manifest(&world, DEFER));
    let stripped_sessions = PathBuf::from(world.get("SMDP_STRIPPED_SESSIONS"));
    let stripped_before = fs::read_to_string(&stripped_sessions)
        .unwrap_or_default()
        .lines()
        .count();
    let mut ids = Vec::new();
    for case in INSECURE_CASES {
        let id = unique_id(case);
        let recipient = format!("patient@{}", world.get(&format!("SMDP_CASE_{case}")));
        // A sender's "TLS-Required: No" (RFC 8689) never opens a cleartext or unverified path.
        let mut message = b"TLS-Required: No\r\n".to_vec();
        message.extend_from_slice(&self::message(&id, &recipient));
        assert_sent(&mta.submit(SENDER, &[&recipient], &message));
        ids.push((*case, id, recipient));
    }
    for (case, id, recipient) in &ids {
        let attempt = first_attempt(&mta, id);
        assert_eq!(attempt["outcome"], "deferred", "{case}: {attempt}");
        assert!(
            received(&world, case, id).is_empty(),
            "{case}: the receiver got the message"
        );
        let queued = queued_for(&mta, recipient);
        assert_eq!(queued.len(), 1, "{case}: the message stays in Postfix's queue");
        let reason = queued[0]["recipients"][0]["delay_reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(reason.contains("4.7.") || reason.contains("4.4."), "{case}: {reason}");
        if *case == "DANE_SERVFAIL" {
            assert!(attempt["policy"].is_null(), "a SERVFAIL decides no policy: {attempt}");
        }
    }
    // The stripping proxy saw the sidecar's EHLO and nothing after it but QUIT.
    let sessions = fs::read_to_string(&stripped_sessions).unwrap_or_default();
    let new_sessions: Vec<Value> = sessions
        .lines()
        .skip(stripped_before)
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(
        !new_sessions.is_empty(),
        "the sidecar connected through the stripping proxy"
    );
    for session in &new_sessions {
        let after = session["after_ehlo"].as_str().unwrap_or_default();
        assert!(
            after.is_empty() || after == "QUIT\r\n",
            "bytes after EHLO through the stripping proxy: {session}"
        );
    }
    let metrics = metrics(&mta);
    assert!(
        metric_sum(&metrics, "securemail_delivery_attempts", &["result=\"deferred\""]) >= INSECURE_CASES.len() as f64
    );
}

#[test]
fn no_secure_path_with_on_failure_bounce_bounces_with_the_reason() {
    let world = World::load();
    let mta = MtaHost::start(&world, "bounce", &manifest(&world, BOUNCE));
    let id = unique_id("bounce");
    let recipient = format!("patient@{}", world.get("SMDP_CASE_NOSTARTTLS"));
    assert_sent(&mta.submit(SENDER, &[&recipient], &message(&id, &recipient)));
    let attempt = first_attempt(&mta, &id);
    assert_eq!(attempt["outcome"], "bounced");
    wait_until(
        Duration::from_secs(30),
        "Postfix to record the bounce",
        || {
            mta.maillog()
                .lines()
                .any(|line| line.contains("status=bounced") && line.contains("5.7."))
        },
        || mta.maillog(),
    );
    let line = mta
        .maillog()
        .lines()
        .find(|line| line.contains("status=bounced"))
        .unwrap()
        .to_owned();
    assert!(line.contains("TLS"), "the bounce says why: {line}");
    assert!(received(&world, "NOSTARTTLS", &id).is_empty());
}

#[test]
fn submission_requires_tls_and_a_client_certificate() {
    let world = World::load();
    let mta = MtaHost::start(&world, "submission", &manifest(&world, DEFER));
    let recipient = format!("patient@{}", world.get("SMDP_CASE_GOOD"));
    let id = unique_id("submission");
    let cleartext = mta.submit_with(
        SENDER,
        &[&recipient],
        &message(&id, &recipient),
        Submission {
            without_tls: true,
            ..Submission::default()
        },
    );
    assert_ne!(cleartext["stage"], "sent", "{cleartext}");
    assert!(
        cleartext["code"].as_u64().is_some_and(|code| code >= 500),
        "{cleartext}"
    );
    let no_certificate = mta.submit_with(
        SENDER,
        &[&recipient],
        &message(&id, &recipient),
        Submission {
            without_client_certificate: true,
            ..Submission::default()
        },
    );
    assert_ne!(no_certificate["stage"], "sent", "{no_certificate}");
    assert!(mta.queue().is_empty(), "nothing was queued");
    deliver_and_receive(&world, &mta, "GOOD");
}

#[test]
fn smuggling_inputs_arrive_as_exactly_one_message_with_crlf_only() {
    let world = World::load();
    let mta = MtaHost::start(&world, "smuggling", &manifest(&world, DEFER));
    let recipient = format!("patient@{}", world.get("SMDP_CASE_GOOD"));
    let id = unique_id("smuggling");
    let mut raw = message(&id, &recipient);
    raw.truncate(raw.len() - 2);
    raw.extend_from_slice(
        b"\r\nbare LF end marker:\n.\nMAIL FROM:<evil@sender.test>\r\nbare CR:\r.\r\n..leading dot line\r\n\
          .\r\n",
    );
    let report = mta.submit_with(
        SENDER,
        &[&recipient],
        &raw,
        Submission {
            raw: true,
            ..Submission::default()
        },
    );
    assert_sent(&report);
    wait_until(
        Duration::from_secs(60),
        "delivery of the smuggling message",
        || !received(&world, "GOOD", &id).is_empty(),
        || mta.sidecar_log(),
    );
    let got = received(&world, "GOOD", &id);
    assert_eq!(got.len(), 1);
    // Maildir stores LF line ends; what matters is that the smuggled command stayed content and no bare CR
    // survived as a line end.
    let text = String::from_utf8_lossy(&got[0]);
    assert!(
        text.contains("MAIL FROM:<evil@sender.test>"),
        "the smuggled command is content: {text}"
    );
    assert!(text.contains("\n.leading dot line"), "dot-unstuffed once: {text}");
    assert!(!text.contains('\r'), "no bare CR reaches the receiver: {text:?}");
    std::thread::sleep(Duration::from_secs(2));
    let extra: Vec<_> = fs::read_dir(
        PathBuf::from(world.get(&format!(
            "SMDP_RX_{}_MAILDIR",
            world.get("SMDP_CASE_GOOD_RX").to_ascii_uppercase().replace('-', "_")
        )))
        .join("new"),
    )
    .unwrap()
    .flatten()
    .filter(|entry| String::from_utf8_lossy(&fs::read(entry.path()).unwrap_or_default()).contains("evil@sender.test"))
    .collect();
    assert_eq!(extra.len(), 1, "exactly one message carries the smuggled text");
}

#[test]
fn kill_9_of_the_sidecar_mid_run_loses_nothing() {
    const MESSAGES: usize = 1000;
    let world = World::load();
    let mut mta = MtaHost::start(&world, "crash", &manifest(&world, DEFER));
    let run = unique_id("crash");
    let recipient = format!("patient@{}", world.get("SMDP_CASE_GOOD"));
    let body: Vec<Vec<u8>> = (0..MESSAGES)
        .map(|n| message(&format!("{run}.{n}"), &recipient))
        .collect();
    let run_needle = format!("<{run}.");
    let count_received = || received_containing(&world, "GOOD", &run_needle).len();
    // The kill lands while Postfix is handing mail to the sidecar; submissions go on while the sidecar is down.
    let mut submitted = 0;
    for chunk in body.chunks(100) {
        for message in chunk {
            assert_sent(&mta.submit(SENDER, &[&recipient], message));
            submitted += 1;
        }
        if submitted == 300 {
            wait_until(
                Duration::from_secs(120),
                "the first deliveries",
                || count_received() >= 50,
                || mta.sidecar_log(),
            );
            mta.kill_sidecar();
        }
        if submitted == 500 {
            mta.start_sidecar(&world);
        }
    }
    wait_until(
        Duration::from_secs(600),
        "every message to arrive",
        || mta.queue().is_empty() && count_received() >= MESSAGES,
        || {
            format!(
                "received {} of {MESSAGES}; queue {}",
                count_received(),
                mta.queue().len()
            )
        },
    );
    let copies = received_ids(&world, "GOOD", &format!("{run}."));
    assert_eq!(copies.len(), MESSAGES, "every message arrived at least once");
    let duplicates = copies.values().map(|count| count - 1).sum::<usize>();
    // Only transactions in flight at the kill can be delivered twice: at most Postfix's LMTP concurrency (20)
    // times its recipients per transaction.
    assert!(duplicates <= 20, "{duplicates} duplicates");
    eprintln!("kill -9 run: {MESSAGES} messages, {duplicates} duplicates");
    let files = mta.evidence_files();
    assert!(!files.is_empty(), "the sidecar wrote evidence");
    for file in files {
        let verify = run_ok(
            in_netns(&mta.netns, &sidecar_bin().display().to_string())
                .args(["evidence", "verify"])
                .arg(&file),
        );
        assert!(verify.starts_with("ok"), "{}: {verify}", file.display());
    }
}

#[test]
fn check_domain_explains_the_policy_it_would_apply() {
    let world = World::load();
    let mta = MtaHost::start(&world, "check-domain", &manifest(&world, DEFER));
    let check = |domain: &str| {
        run_ok(
            in_netns(&mta.netns, &sidecar_bin().display().to_string())
                .args(["check-domain", domain, "--config"])
                .arg(&mta.sidecar_config)
                .env("SSL_CERT_FILE", world.get("SMDP_CA_FILE")),
        )
    };

    let dane = check(world.get("SMDP_CASE_DANE"));
    assert!(
        dane.contains("MX records (DNSSEC-secure)") || dane.contains("secure"),
        "{dane}"
    );
    assert!(
        dane.contains("TLSA _25._tcp.mx.dane.test (secure, 1 of 1 usable)"),
        "{dane}"
    );
    assert!(dane.contains("3 1 1 "), "{dane}");
    assert!(dane.contains("DANE (1 TLSA records) [from DANE]"), "{dane}");

    let sts = check(world.get("SMDP_CASE_STS"));
    let id = world.get("SMDP_STS_POLICY_ID");
    assert!(sts.contains(&format!("MTA-STS: id {id}, mode enforce")), "{sts}");
    assert!(sts.contains("mx.sts.test: WebPKI"), "{sts}");
    assert!(
        !sts.contains("rogue.sts.test: WebPKI"),
        "the MX outside the policy is not offered: {sts}"
    );

    let servfail = check(world.get("SMDP_CASE_DANE_SERVFAIL"));
    assert!(servfail.contains("TEMPORARY FAILURE"), "{servfail}");
    assert!(servfail.contains("Policy: none yet, try later"), "{servfail}");
}

#[test]
fn a_changed_sidecar_yaml_applies_without_a_restart_and_an_invalid_one_is_refused_by_name() {
    let world = World::load();
    let mta = MtaHost::start(&world, "reload", &manifest(&world, DEFER));
    let id = unique_id("reload");
    let recipient = format!("patient@{}", world.get("SMDP_CASE_SELFSIGNED"));
    assert_sent(&mta.submit(SENDER, &[&recipient], &message(&id, &recipient)));
    assert_eq!(
        first_attempt(&mta, &id)["outcome"],
        "deferred",
        "a self-signed MX fails `verified`"
    );

    // A typo: refused with the field named, and the running configuration stays.
    let original = fs::read_to_string(&mta.sidecar_config).unwrap();
    fs::write(&mta.sidecar_config, format!("{original}tlsPolicyy: {{}}\n")).unwrap();
    wait_until(
        Duration::from_secs(30),
        "the refusal of the invalid sidecar.yaml",
        || mta.sidecar_log().contains("tlsPolicyy"),
        || mta.sidecar_log(),
    );
    assert_eq!(
        mta.admin_get("/readyz"),
        "ok\n",
        "the sidecar keeps serving with its running configuration"
    );
    let metrics = metrics(&mta);
    assert_eq!(
        metric_sum(&metrics, "securemail_config_reload_failures_total", &[]),
        1.0,
        "{metrics}"
    );

    // An approved exception for this domain: `encrypted` accepts its certificate, and Postfix's next retry is
    // delivered by the rebuilt engine, with no restart.
    let mut config: serde_yaml::Value = serde_yaml::from_str(&original).unwrap();
    config["tlsPolicy"]["overrides"] = serde_yaml::from_str(&format!(
        "[{{domain: {}, mode: encrypted, exception: {{approvedBy: security-office/CHG-7, reason: partner MX \
         uses a private CA}}}}]",
        world.get("SMDP_CASE_SELFSIGNED")
    ))
    .unwrap();
    fs::write(&mta.sidecar_config, serde_yaml::to_string(&config).unwrap()).unwrap();
    wait_until(
        Duration::from_secs(90),
        "delivery under the reloaded policy",
        || !received(&world, "SELFSIGNED", &id).is_empty(),
        || mta.sidecar_log(),
    );
    let delivered = evidence_for(&mta, &id)
        .into_iter()
        .find(|record| record["outcome"] == "delivered")
        .expect("a delivered record");
    assert_eq!(delivered["policy"]["source"], "override");
    assert_eq!(delivered["tls"]["verification"], "unverified-encrypted");
    assert!(mta.sidecar_log().contains("delivery engine rebuilt"));
}

#[test]
fn a_warmup_cap_of_n_delivers_exactly_n_keeps_the_rest_queued_and_sends_it_the_next_day() {
    const CAP: usize = 5;
    const SENT: usize = 8;
    let world = World::load();
    // Every receiver of the world is provider class "other": give it the whole day's limit.
    let warmup = format!(
        "    warmup:\n      schedule: [{{day: 1, dailyLimit: {CAP}}}]\n      providerShares: {{gmail: 0, microsoft: 0, \
         yahoo: 0, apple: 0, other: 100}}\n"
    );
    let mut mta = MtaHost::start(&world, "warmup", &manifest_with_warmup(&world, DEFER, &warmup));
    // Counted per UTC day: on the set clock, so a run across midnight does not split the count.
    mta.restart_sidecar_on_set_day(&world, 0);
    let rendered = fs::read_to_string(&mta.sidecar_config).unwrap();
    assert!(rendered.contains(&format!("dailyLimit: {CAP}")), "{rendered}");

    let run = unique_id("warmup");
    let recipient = format!("patient@{}", world.get("SMDP_CASE_GOOD"));
    for n in 0..SENT {
        assert_sent(&mta.submit(SENDER, &[&recipient], &message(&format!("{run}.{n}"), &recipient)));
    }
    let needle = format!("<{run}.");
    let delivered = || received_containing(&world, "GOOD", &needle).len();
    let capped = || {
        queued_for(&mta, &recipient)
            .iter()
            .filter(|entry| {
                entry["recipients"][0]["delay_reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("4.7.1") && reason.contains("warmup cap reached"))
            })
            .count()
    };
    let context = |mta: &MtaHost| {
        format!(
            "delivered {}, queue {:?}\n{}",
            delivered(),
            mta.queue(),
            mta.sidecar_log()
        )
    };
    wait_until(
        Duration::from_secs(90),
        "the cap to be used up and the rest refused with 452 4.7.1",
        || delivered() == CAP && capped() == SENT - CAP,
        || context(&mta),
    );

    let refusals = metric_sum(
        &metrics(&mta),
        "securemail_warmup_refusals_total",
        &["provider=\"other\""],
    );
    assert!(refusals >= (SENT - CAP) as f64, "{refusals} refusals counted");
    // Running as Postfix's mail_owner and nothing more, the sidecar counts the queue Postfix keeps 0700.
    let queued = metric_sum(&metrics(&mta), "securemail_queue_messages", &[]);
    assert_eq!(queued, (SENT - CAP) as f64, "{}", context(&mta));

    // The count is on the state volume: a restarted sidecar does not hand out the allowance again, while Postfix
    // keeps retrying (every few seconds in this suite). The allowance is recounted from the evidence at start; the
    // day's results come from the counters file, written every 500 ms, so the kill waits until they were written.
    let today_delivered = || {
        let status: Value = serde_json::from_str(&mta.admin_get("/status")).unwrap_or_default();
        status["today"]["providers"]["other"]["delivered"].as_u64()
    };
    wait_until(
        Duration::from_secs(10),
        "today's results in /status",
        || today_delivered() == Some(CAP as u64),
        || context(&mta),
    );
    std::thread::sleep(Duration::from_secs(1));
    mta.kill_sidecar();
    mta.start_sidecar(&world);
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(delivered(), CAP, "{}", context(&mta));
    assert_eq!(
        queued_for(&mta, &recipient).len(),
        SENT - CAP,
        "nothing lost: {}",
        context(&mta)
    );
    let status: Value = serde_json::from_str(&mta.admin_get("/status")).unwrap();
    assert_eq!(
        status["today"]["providers"]["other"]["delivered"], CAP,
        "today's results are kept on the state volume too: {status}"
    );

    // The next UTC day (the sidecar's clock moved forward): the count starts over, the rest goes out under the same
    // cap, and the day before is what /status reports as `yesterday`, the input of the operator's evaluation.
    mta.restart_sidecar_on_set_day(&world, 1);
    wait_until(
        Duration::from_secs(90),
        "the remaining messages on the next day",
        || delivered() == SENT && queued_for(&mta, &recipient).is_empty(),
        || context(&mta),
    );
    let status: Value = serde_json::from_str(&mta.admin_get("/status")).unwrap();
    assert_eq!(status["yesterday"]["providers"]["other"]["delivered"], CAP, "{status}");
    assert_eq!(
        status["today"]["providers"]["other"]["delivered"],
        SENT - CAP,
        "{status}"
    );
    assert_ne!(status["today"]["date"], status["yesterday"]["date"], "{status}");
}

/// Deferrals of `provider` in the newest slot of the sidecar's counters file (`<sequence> <sha256> <JSON>` per
/// 4096-byte slot); 0 while there is none.
fn stored_deferrals(file: &std::path::Path, provider: &str) -> u64 {
    let bytes = std::fs::read(file).unwrap_or_default();
    bytes
        .chunks(4096)
        .filter_map(|slot| {
            let line = String::from_utf8_lossy(slot).trim().to_owned();
            let mut fields = line.splitn(3, ' ');
            let sequence: u64 = fields.next()?.parse().ok()?;
            let counters: Value = serde_json::from_str(fields.nth(1)?).ok()?;
            Some((
                sequence,
                counters["results"][provider]["deferred"].as_u64().unwrap_or(0),
            ))
        })
        .max()
        .map_or(0, |(_, deferred)| deferred)
}

#[test]
fn a_provider_rate_limiting_the_address_opens_its_breaker_and_the_next_evaluation_holds_it() {
    use securemail_api::SecureMailTenant;
    use securemail_api::sidecar_status::DeliveryDay;
    use securemail_api::warmup::state::{AddressWarmup, DayResults, Transition, WarmupState, evaluate};

    const SENT: usize = 8;
    let world = World::load();
    let manifest = manifest(&world, DEFER);
    let mut mta = MtaHost::start(&world, "ratelimit", &manifest);
    mta.restart_sidecar_on_set_day(&world, 0);
    let run = unique_id("ratelimit");
    // The receiver answers RCPT for busy@ with Gmail's 421 4.7.28; its MX name is Gmail's.
    let recipient = format!("busy@{}", world.get("SMDP_CASE_RATELIMITED"));
    for n in 0..SENT {
        assert_sent(&mta.submit(SENDER, &[&recipient], &message(&format!("{run}.{n}"), &recipient)));
    }
    let context = |mta: &MtaHost| format!("queue {:?}\n{}", mta.queue(), mta.sidecar_log());
    // Five rate-limit refusals in a row open the gmail breaker.
    wait_until(
        Duration::from_secs(90),
        "gmail's circuit breaker to open",
        || {
            metric_sum(
                &metrics(&mta),
                "securemail_circuit_opens_total",
                &["provider=\"gmail\""],
            ) >= 1.0
        },
        || context(&mta),
    );
    let text = metrics(&mta);
    let rate_limited = metric_sum(
        &text,
        "securemail_remote_replies_total",
        &["provider=\"gmail\"", "class=\"rate_limited\""],
    );
    assert!(rate_limited >= 5.0, "{rate_limited} rate-limit replies counted\n{text}");
    let status: Value = serde_json::from_str(&mta.admin_get("/status")).unwrap();
    let circuit = &status["reputation"]["circuits"]["gmail"];
    assert!(circuit["state"] == "open" || circuit["state"] == "halfOpen", "{status}");
    assert!(circuit["opens"].as_u64().is_some_and(|opens| opens >= 1), "{status}");
    // Nothing lost: Postfix holds every message for a later try.
    assert_eq!(queued_for(&mta, &recipient).len(), SENT, "{}", context(&mta));
    // The restart below is a kill -9, and the sidecar stores its day's results at most every 500 ms: the day is
    // complete once the stored results count the five deferrals (the newest whole slot of the counters file).
    wait_until(
        Duration::from_secs(90),
        "the stored results to count five gmail deferrals",
        || stored_deferrals(&mta.dir.join("state/warmup-counters"), "gmail") >= 5,
        || context(&mta),
    );

    // The next UTC day: the sidecar reports the day it was rate limited as `yesterday`, and the operator's warmup
    // evaluation (the same function its reconcile loop runs) holds the address on it.
    mta.restart_sidecar_on_set_day(&world, 1);
    let status: Value = serde_json::from_str(&mta.admin_get("/status")).unwrap();
    let yesterday: DeliveryDay = serde_json::from_value(status["yesterday"].clone()).unwrap();
    let results = DayResults::from_delivery_day(&yesterday);
    assert!(results.deferred >= 5 && results.delivered == 0, "{status}");
    let tenant: SecureMailTenant = serde_yaml::from_str(&manifest).unwrap();
    let evaluated_day_before = AddressWarmup {
        day: 1,
        state: WarmupState::Warming { reason: None },
        last_sent: None,
        last_evaluated: Some(yesterday.date),
    };
    let today = yesterday.date.tomorrow().unwrap();
    let (next, transition) = evaluate(
        &evaluated_day_before,
        &results,
        false,
        &tenant.spec.ip_pool.warmup,
        today,
    );
    assert_eq!(transition, Transition::Held);
    assert!(
        next.state
            .reason()
            .is_some_and(|reason| reason.contains("deferral rate 100.0% over")),
        "{next:?}"
    );
}

#[test]
fn a_bounce_storm_fires_the_shipped_bounce_rate_alert_in_prometheus() {
    use securemail_e2e::dataplane::{PrometheusServer, rules_with_for};

    const ALERT: &str = "SecureMailBounceRateHigh";
    // Messages of the storm, each to GOOD_PER_MESSAGE deliverable recipients and to the receiver's unknown user:
    // 120 delivered and 20 bounced, a 14% bounce rate over the alert's floor of 100 final answers per hour.
    const MESSAGES: usize = 20;
    const GOOD_PER_MESSAGE: usize = 6;

    // The shipped alert pack with only its `for:` durations shortened: the expressions Prometheus evaluates are
    // exactly the ones operators get (alerts/tests covers `for` itself with promtool).
    let shipped = fs::read_to_string(securemail_e2e::repo_root().join("alerts/securemail.rules.yaml")).unwrap();
    let rules = rules_with_for(&shipped, "2s");
    let (shipped_lines, rules_lines): (Vec<&str>, Vec<&str>) = (shipped.lines().collect(), rules.lines().collect());
    assert_eq!(shipped_lines.len(), rules_lines.len());
    let changed: Vec<(&str, &str)> = shipped_lines
        .iter()
        .zip(&rules_lines)
        .filter(|(shipped, rewritten)| shipped != rewritten)
        .map(|(shipped, rewritten)| (*shipped, *rewritten))
        .collect();
    assert!(!changed.is_empty(), "the rewrite changed nothing");
    for (shipped, rewritten) in &changed {
        assert!(
            shipped.trim_start().starts_with("for: ") && rewritten.trim_start() == "for: 2s",
            "only `for:` lines may differ: {shipped:?} became {rewritten:?}"
        );
    }

    let world = World::load();
    let mta = MtaHost::start(&world, "bounce-storm", &manifest(&world, DEFER));
    let prometheus = PrometheusServer::start(&mta, &rules);
    let sidecar_config: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(&mta.sidecar_config).unwrap()).unwrap();
    let tenant = sidecar_config["tenant"].as_str().unwrap().to_owned();
    let source_ip = world.get("SMDP_MTA_ADDR");
    let context = |prometheus: &PrometheusServer| {
        format!(
            "targets {:?}\nrule {}\nsidecar log:\n{}\nmaillog:\n{}\nprometheus log:\n{}",
            prometheus.targets(),
            prometheus.alerting_rule(ALERT),
            mta.sidecar_log(),
            mta.maillog(),
            prometheus.log()
        )
    };

    wait_until(
        Duration::from_secs(30),
        "Prometheus to scrape the sidecar",
        || prometheus.targets().iter().any(|target| target["health"] == "up"),
        || context(&prometheus),
    );
    let targets = prometheus.targets();
    assert_eq!(targets.len(), 1, "{targets:?}");
    assert_eq!(targets[0]["labels"]["job"], "securemail-sidecar");
    assert_eq!(
        targets[0]["scrapeUrl"],
        format!("http://{source_ip}:9090/metrics"),
        "{targets:?}"
    );

    // One delivered and one bounced recipient first, so that both series exist in Prometheus before anything is
    // measured: `increase` cannot count the jump of a series from absent to its first value.
    let good_domain = world.get("SMDP_CASE_GOOD");
    let unknown = world.get("SMDP_GOOD_UNKNOWN_RECIPIENT");
    let run = unique_id("bounce-storm");
    let send = |n: &str, good: usize| {
        let mut recipients: Vec<String> = (0..good).map(|k| format!("patient-{n}-{k}@{good_domain}")).collect();
        recipients.push(unknown.to_owned());
        let to: Vec<&str> = recipients.iter().map(String::as_str).collect();
        assert_sent(&mta.submit(SENDER, &to, &message(&format!("{run}.{n}"), &recipients[0])));
    };
    let answered = |result: &str| {
        prometheus
            .query(&format!(
                "sum(securemail_recipients_total{{job=\"securemail-sidecar\",result=\"{result}\"}})"
            ))
            .first()
            .and_then(|sample| sample["value"][1].as_str()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let wait_for_answers = |what: &str, delivered: usize, bounced: usize| {
        wait_until(
            Duration::from_secs(90),
            what,
            || answered("delivered") >= delivered as f64 && answered("bounced") >= bounced as f64,
            || context(&prometheus),
        );
    };
    send("first", 1);
    wait_for_answers("Prometheus to hold the first delivered and bounced recipients", 1, 1);

    // A high bounce rate on too few final answers: the rule sees it and stays quiet.
    send("small.0", 3);
    send("small.1", 3);
    wait_for_answers("Prometheus to hold the small burst", 1 + 6, 1 + 2);
    let rate = prometheus
        .query(
            "sum(increase(securemail_recipients_total{result=\"bounced\"}[1h])) / \
             sum(increase(securemail_recipients_total{result=~\"delivered|bounced\"}[1h]))",
        )
        .first()
        .and_then(|sample| sample["value"][1].as_str()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(rate > 0.05, "the small burst shows a high bounce rate: {rate}");
    let seen = jiff::Timestamp::now();
    wait_until(
        Duration::from_secs(30),
        "an evaluation of the bounce-rate rule after the small burst",
        || {
            prometheus.alerting_rule(ALERT)["lastEvaluation"]
                .as_str()
                .and_then(|time| time.parse::<jiff::Timestamp>().ok())
                .is_some_and(|time| time > seen)
        },
        || context(&prometheus),
    );
    let rule = prometheus.alerting_rule(ALERT);
    assert_eq!(rule["health"], "ok", "{rule}");
    assert_eq!(
        rule["state"], "inactive",
        "no alert on fewer than 100 final answers (bounce rate {rate}): {rule}"
    );
    assert!(prometheus.alerts(ALERT).is_empty(), "{:?}", prometheus.alerts(ALERT));

    // The storm: enough final answers, and more than 5% of them bounced.
    for n in 0..MESSAGES {
        send(&n.to_string(), GOOD_PER_MESSAGE);
    }
    wait_for_answers(
        "Prometheus to see the storm's answers",
        1 + 6 + MESSAGES * GOOD_PER_MESSAGE,
        1 + 2 + MESSAGES,
    );
    wait_until(
        Duration::from_secs(60),
        "SecureMailBounceRateHigh to fire",
        || prometheus.alerts(ALERT).iter().any(|alert| alert["state"] == "firing"),
        || context(&prometheus),
    );
    let alerts = prometheus.alerts(ALERT);
    assert_eq!(alerts.len(), 1, "one alert, for the one tenant and address: {alerts:?}");
    let alert = &alerts[0];
    assert_eq!(alert["labels"]["tenant"], tenant.as_str(), "{alert}");
    assert_eq!(alert["labels"]["source_ip"], source_ip, "{alert}");
    assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
    let rate: f64 = alert["value"].as_str().unwrap().parse().unwrap();
    assert!(rate > 0.05, "{alert}");
    assert_eq!(prometheus.alerting_rule(ALERT)["state"], "firing");

    // The bounces are the receiver's own 550 5.1.1, passed back to Postfix, which bounced those recipients.
    let bounced_lines = mta
        .maillog()
        .lines()
        .filter(|line| line.contains(&format!("to=<{unknown}>")) && line.contains("status=bounced"))
        .filter(|line| line.contains("5.1.1"))
        .count();
    assert_eq!(bounced_lines, 1 + 2 + MESSAGES, "{}", mta.maillog());
    eprintln!("bounce storm: alert fired with a bounce rate of {rate:.3}");
}
