//! What leaves in a message's header, in the data-plane world (`make e2e-dataplane`): Debian's Postfix and the sidecar,
//! configured from the operator's `render` output, deliver to the world's Postfix receivers. A header From that is
//! not one of the tenant's sending domains is refused at submission when Postfix can tell, and otherwise bounced at
//! once by the sidecar with a DSN, a metric and an evidence record; what arrives names no pod address, cluster host
//! name or namespace. Assertions are on the bytes the receivers store.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use securemail_e2e::dataplane::{
    MtaHost, SENDER, Submission, UNCAPPED_WARMUP, World, assert_dkimpy_verifies, evidence_for, message, metric_sum,
    received_containing, tenant_manifest, unique_id, wait_until,
};
use serde_json::Value;

/// The namespace the tenant lives in: a name found nowhere else in the world, so finding it in a message can only
/// mean it leaked.
const NAMESPACE: &str = "clinic-internal-ns";
/// The application pod's address and EHLO name, as an application in `NAMESPACE` would have them.
const POD_ADDRESS: &str = "10.244.37.9";
const POD_HELO: &str = "billing-app-7d9f4.clinic-internal-ns.svc.cluster.local";
/// What must not be in a message that left: the pod's address, names and namespace.
const INTERNAL: [&str; 5] = [POD_ADDRESS, POD_HELO, "billing-app-7d9f4", NAMESPACE, "cluster.local"];

const FROM: &str = "From: Lakeside Alerts <alerts@sender.test>";

/// A tenant in `NAMESPACE` sending as `sender.test` and the world's DSN domain (whose MX is the smart receiver, so
/// the DSNs Postfix writes to it can be read there).
fn manifest(world: &World) -> String {
    let manifest = tenant_manifest(world, "headers", UNCAPPED_WARMUP, "    onFailure: defer\n");
    let domains = "    - name: sender.test\n";
    assert!(
        manifest.contains(domains) && manifest.contains("namespace: e2e\n"),
        "{manifest}"
    );
    manifest
        .replace(
            domains,
            &format!("{domains}    - name: {}\n", world.get("SMDP_DSN_DOMAIN")),
        )
        .replace("namespace: e2e\n", &format!("namespace: {NAMESPACE}\n"))
}

/// Submitting as an application pod: from its own address, with its cluster name as EHLO.
fn from_the_pod() -> Submission {
    Submission {
        source: Some(POD_ADDRESS),
        helo: Some(POD_HELO),
        ..Submission::default()
    }
}

fn assert_no_internal_name(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    for internal in INTERNAL {
        assert!(
            !text.to_ascii_lowercase().contains(internal),
            "{what} contains {internal}:\n{text}"
        );
    }
}

/// The header fields of a stored message, folded lines joined with a newline.
fn header_fields(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    let header = text.split("\n\n").next().unwrap_or_default();
    let mut fields: Vec<String> = Vec::new();
    for line in header.lines() {
        match fields.last_mut() {
            Some(field) if line.starts_with([' ', '\t']) => {
                field.push('\n');
                field.push_str(line);
            }
            _ => fields.push(line.to_owned()),
        }
    }
    fields
}

/// `text` with every run of white space (folding, wrapping) made one space.
fn unwrapped(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn diagnostics(mta: &MtaHost) -> String {
    format!("sidecar log:\n{}\nmaillog:\n{}", mta.sidecar_log(), mta.maillog())
}

#[test]
fn a_header_from_outside_the_tenant_domains_is_refused_at_submission_and_nothing_is_queued() {
    let world = World::load();
    let mta = MtaHost::start(&world, "from-refused", &manifest(&world));
    let _pod = mta.add_client_address(POD_ADDRESS);
    let recipient = format!("patient@{}", world.get("SMDP_CASE_GOOD"));

    let refused_id = unique_id("from-refused");
    let foreign = String::from_utf8(message(&refused_id, &recipient))
        .unwrap()
        .replace(FROM, "From: \"Billing, Other Clinic\" <billing@other-clinic.test>");
    let report = mta.submit_with(SENDER, &[&recipient], foreign.as_bytes(), from_the_pod());
    assert_eq!(report["stage"], "data", "refused at the end of DATA: {report}");
    assert_eq!(report["code"], 550, "{report}");
    assert_eq!(
        report["text"], "5.7.1 header From domain other-clinic.test is not one of this tenant's sending domains",
        "{report}"
    );
    assert!(mta.queue().is_empty(), "nothing queued: {:?}", mta.queue());
    assert!(
        mta.maillog()
            .lines()
            .any(|line| line.contains("reject: header From:") && line.contains("other-clinic.test")),
        "{}",
        mta.maillog()
    );

    // A message the tenant may send, submitted after it the same way, arrives; the refused one never reached the
    // sidecar, so it has no evidence, and never arrives.
    let sent_id = unique_id("from-accepted");
    let accepted = mta.submit_with(SENDER, &[&recipient], &message(&sent_id, &recipient), from_the_pod());
    assert_eq!(accepted["stage"], "sent", "{accepted}");
    let needle = |id: &str| format!("<{id}@sender.test>");
    wait_until(
        Duration::from_secs(60),
        "delivery of the accepted message",
        || !received_containing(&world, "GOOD", &needle(&sent_id)).is_empty(),
        || diagnostics(&mta),
    );
    assert!(received_containing(&world, "GOOD", &needle(&refused_id)).is_empty());
    assert!(evidence_for(&mta, &refused_id).is_empty());
    assert_eq!(evidence_for(&mta, &sent_id)[0]["outcome"], "delivered");
    let metrics = mta.admin_get("/metrics");
    assert_eq!(
        metric_sum(&metrics, "securemail_header_from_refusals_total", &[]),
        0.0,
        "Postfix refused it; the sidecar never saw it:\n{metrics}"
    );
}

#[test]
fn a_header_from_only_the_sidecar_can_judge_bounces_at_once_with_a_dsn_a_metric_and_evidence() {
    let world = World::load();
    let mta = MtaHost::start(&world, "from-bounced", &manifest(&world));
    let _pod = mta.add_client_address(POD_ADDRESS);
    let recipient = format!("patient@{}", world.get("SMDP_CASE_GOOD"));
    // The DSN goes to the envelope sender, at the domain whose MX is the smart receiver.
    let envelope_sender = format!("alerts@{}", world.get("SMDP_DSN_DOMAIN"));
    let cases = [
        // A comment is beyond Postfix's patterns; the sidecar's parser finds the foreign domain.
        (
            "from-comment",
            "From: billing@other-clinic.test (Billing)",
            "header From domain other-clinic.test is not one of this tenant's sending domains",
            "not_tenant_domain",
            "header-from-not-tenant-domain",
        ),
        (
            "from-two",
            "From: alerts@sender.test, billing@sender.test",
            "From: names 2 mailboxes; the signing domain must be unambiguous",
            "several_mailboxes",
            "header-from-several-mailboxes",
        ),
    ];
    let mut submitted = Vec::new();
    for (case, header_from, _, _, _) in cases {
        let id = unique_id(case);
        let text = String::from_utf8(message(&id, &recipient))
            .unwrap()
            .replace(FROM, header_from);
        let report = mta.submit_with(&envelope_sender, &[&recipient], text.as_bytes(), from_the_pod());
        assert_eq!(
            report["stage"], "sent",
            "{case}: Postfix lets it through to the sidecar: {report}"
        );
        submitted.push(id);
    }

    for ((case, _, reason_text, metric_reason, refusal), id) in cases.iter().zip(&submitted) {
        // Evidence: one record for the recipient domain, bounced, nothing sent, and why.
        wait_until(
            Duration::from_secs(60),
            &format!("{case}: an evidence record"),
            || !evidence_for(&mta, id).is_empty(),
            || diagnostics(&mta),
        );
        let records = evidence_for(&mta, id);
        assert_eq!(records.len(), 1, "{case}: {records:?}");
        let record = &records[0];
        assert_eq!(record["outcome"], "bounced", "{case}: {record}");
        assert_eq!(record["refusal"], *refusal, "{case}: {record}");
        assert_eq!(
            record["recipientDomain"],
            world.get("SMDP_CASE_GOOD"),
            "{case}: {record}"
        );
        for absent in ["mxHost", "mxIp", "tls", "smtpReply"] {
            assert_eq!(record[absent], Value::Null, "{case}: {absent}: {record}");
        }

        // Postfix bounced on the sidecar's permanent reply, naming the reason; it never deferred the message.
        let maillog = mta.maillog();
        let bounce = maillog
            .lines()
            .find(|line| line.contains("status=bounced") && line.contains(reason_text))
            .unwrap_or_else(|| panic!("{case}: no bounce naming {reason_text:?}\n{maillog}"));
        assert!(bounce.contains("dsn=5.7.1"), "{case}: {bounce}");
        let queue_id = bounce.split(": ").nth(1).unwrap_or_default();
        assert!(
            !mta.maillog()
                .lines()
                .any(|line| line.contains(&format!("{queue_id}: ")) && line.contains("status=deferred")),
            "{case}: deferred first:\n{}",
            mta.maillog()
        );

        // The DSN arrives at the envelope sender's domain within a minute (a 4xx would have kept the message
        // queued for days), says why, and carries no internal name either.
        wait_until(
            Duration::from_secs(60),
            &format!("{case}: the DSN at the smart receiver"),
            || !received_containing(&world, "SMART", id).is_empty(),
            || diagnostics(&mta),
        );
        let dsns = received_containing(&world, "SMART", id);
        assert_eq!(dsns.len(), 1, "{case}: one DSN");
        let dsn = unwrapped(&String::from_utf8_lossy(&dsns[0]));
        assert!(dsn.contains("report-type=delivery-status"), "{case}: {dsn}");
        assert!(dsn.contains("Status: 5.7.1"), "{case}: {dsn}");
        assert!(dsn.contains(&format!("550 5.7.1 {reason_text}")), "{case}: {dsn}");
        assert_no_internal_name(&format!("{case}: the DSN"), &dsns[0]);
        assert!(received_containing(&world, "GOOD", id).is_empty(), "{case}: delivered");

        let metrics = mta.admin_get("/metrics");
        assert_eq!(
            metric_sum(
                &metrics,
                "securemail_header_from_refusals_total",
                &[&format!("reason=\"{metric_reason}\"")]
            ),
            1.0,
            "{case}: {metrics}"
        );
    }
    wait_until(
        Duration::from_secs(60),
        "an empty queue (the DSNs delivered)",
        || mta.queue().is_empty(),
        || format!("{:?}\n{}", mta.queue(), diagnostics(&mta)),
    );
}

#[test]
fn delivered_mail_names_no_submitting_pod_cluster_host_or_namespace() {
    let world = World::load();
    let mta = MtaHost::start(&world, "hygiene", &manifest(&world));
    let _pod = mta.add_client_address(POD_ADDRESS);
    let recipient = format!("patient@{}", world.get("SMDP_CASE_GOOD"));
    let id = unique_id("hygiene");
    let sent = message(&id, &recipient);
    let report = mta.submit_with(SENDER, &[&recipient], &sent, from_the_pod());
    assert_eq!(report["stage"], "sent", "{report}");
    // The pod address was the client Postfix saw, so the test can tell it was removed rather than never there.
    assert!(mta.maillog().contains(&format!("[{POD_ADDRESS}]")), "{}", mta.maillog());

    let needle = format!("<{id}@sender.test>");
    wait_until(
        Duration::from_secs(60),
        "delivery",
        || !received_containing(&world, "GOOD", &needle).is_empty(),
        || diagnostics(&mta),
    );
    let messages = received_containing(&world, "GOOD", &needle);
    assert_eq!(messages.len(), 1);
    let received = &messages[0];
    assert_no_internal_name("the delivered message", received);

    // The trace the submission hop leaves names only the tenant's host; the receiver's own names the MTA's public
    // host name and address, as any receiver's does.
    let traces: Vec<String> = header_fields(received)
        .into_iter()
        .filter(|field| field.starts_with("Received:"))
        .collect();
    // The receiver's trace comes first; the submission hop's, the oldest, last.
    assert!(
        traces.len() >= 2,
        "the receiver's and the submission hop's: {traces:#?}"
    );
    let (receiver, submission) = (&traces[0], &traces[traces.len() - 1]);
    assert!(receiver.contains(world.get("SMDP_MTA_ADDR")), "{receiver}");
    assert!(
        submission.starts_with("Received: by sender.test (Postfix) with ESMTPS id ") && !submission.contains("from"),
        "{submission}"
    );
    assert!(
        !submission.contains(&recipient),
        "the recipient is not in the trace: {submission}"
    );

    // Nothing of this disturbs the signature: dkimpy verifies it on the bytes the receiver stored.
    let records: Vec<String> = mta
        .dkim_records
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    assert_dkimpy_verifies(&records, received, &id);
}
