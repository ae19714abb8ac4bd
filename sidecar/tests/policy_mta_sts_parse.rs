//! The MTA-STS TXT record and policy file parsers (RFC 8461 sections 3.1 and 3.2): accepted and refused inputs,
//! wildcard matching, and a property that no input makes them panic.
#![allow(clippy::unwrap_used, reason = "tests: a panic is the failure report")]

use proptest::prelude::*;
use securemail_sidecar::policy::mta_sts::{MAX_MAX_AGE, Mode, StsPolicy, parse_policy, parse_txt};

fn txt(records: &[&str]) -> Vec<String> {
    records.iter().map(|r| (*r).to_owned()).collect()
}

#[test]
fn txt_with_one_sts_record_yields_its_id() {
    assert_eq!(
        parse_txt(&txt(&["v=STSv1; id=20240101T000000;"])).unwrap(),
        "20240101T000000"
    );
    assert_eq!(parse_txt(&txt(&["v=STSv1;id=abc"])).unwrap(), "abc");
    // Other TXT records at the name and extension fields are ignored.
    assert_eq!(
        parse_txt(&txt(&["google-site-verification=x", "v=STSv1; id=A1; ext=foo"])).unwrap(),
        "A1"
    );
}

#[test]
fn txt_refusals_name_the_problem() {
    let cases = [
        (vec![], "no TXT record starts with v=STSv1"),
        (vec!["v=spf1 -all"], "no TXT record starts with v=STSv1"),
        (vec!["v=STSv1; id=a;", "v=STSv1; id=b;"], "exactly one is allowed"),
        (vec!["v=STSv1;"], "has no id field"),
        (vec!["v=STSv1; id=;"], "must be 1 to 32 letters or digits"),
        (vec!["v=STSv1; id=has-dash;"], "must be 1 to 32 letters or digits"),
        (
            vec!["v=STSv1; id=123456789012345678901234567890123;"],
            "must be 1 to 32",
        ),
        (vec!["v=STSv1; id=a; id=b"], "more than one id"),
        (vec!["v=STSv1; garbage"], "is not key=value"),
    ];
    for (records, expected) in cases {
        let error = parse_txt(&txt(&records)).unwrap_err().to_string();
        assert!(error.contains(expected), "{records:?}: {error}");
    }
}

const GOOD: &str =
    "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n";

#[test]
fn policy_with_crlf_or_lf_parses() {
    let expected = StsPolicy {
        mode: Mode::Enforce,
        mx: vec!["mail.example.com".to_owned(), "*.example.net".to_owned()],
        max_age: 604_800,
    };
    assert_eq!(parse_policy(GOOD).unwrap(), expected);
    assert_eq!(parse_policy(&GOOD.replace("\r\n", "\n")).unwrap(), expected);
    // Unknown fields are ignored; MX patterns are lowercased and lose a trailing dot.
    let other = "version: STSv1\nmode: testing\nmx: MX1.Example.ORG.\nmax_age: 86400\nfuture: 1\n";
    let policy = parse_policy(other).unwrap();
    assert_eq!(policy.mode, Mode::Testing);
    assert_eq!(policy.mx, vec!["mx1.example.org"]);
    // mode none needs no mx.
    assert_eq!(
        parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").unwrap().mode,
        Mode::None
    );
}

#[test]
fn policy_refusals_name_the_line_or_field() {
    let cases = [
        ("mode: enforce\nmx: a.example\nmax_age: 1\n", "no version field"),
        (
            "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            "line 1: version must be STSv1",
        ),
        (
            "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
            "line 2: mode must be enforce",
        ),
        ("version: STSv1\nmx: a.example\nmax_age: 1\n", "no mode field"),
        (
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "mode enforce has no mx field",
        ),
        ("version: STSv1\nmode: enforce\nmx: a.example\n", "no max_age field"),
        (
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
            "line 4: max_age must be",
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n",
            "line 3: mx pattern",
        ),
        (
            "version: STSv1\nmode: enforce\nmx: *\nmax_age: 1\n",
            "line 3: mx pattern",
        ),
        (
            "version: STSv1\nmode: enforce\nmx: **.example\nmax_age: 1\n",
            "line 3: mx pattern",
        ),
        (
            "version: STSv1\nmode: enforce\nmode: testing\nmx: a.example\nmax_age: 1\n",
            "line 3: field mode appears twice",
        ),
        ("version: STSv1\nthis line has no colon\n", "line 2: expected"),
        ("<html>not found</html>", "line 1: expected"),
    ];
    for (text, expected) in cases {
        let error = parse_policy(text).unwrap_err().to_string();
        assert!(error.contains(expected), "{text:?}: {error}");
    }
    assert_eq!(
        parse_policy(&format!("version: STSv1\nmode: none\nmax_age: {MAX_MAX_AGE}\n"))
            .unwrap()
            .max_age,
        MAX_MAX_AGE
    );
}

#[test]
fn a_max_age_above_the_rfc_maximum_is_capped_not_refused() {
    for max_age in ["31557601", "63115200", "99999999999", "184467440737095516150"] {
        let policy = parse_policy(&format!(
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: {max_age}\n"
        ))
        .unwrap_or_else(|err| panic!("max_age {max_age} refused: {err}"));
        assert_eq!((policy.mode, policy.max_age), (Mode::Enforce, MAX_MAX_AGE), "{max_age}");
    }
}

#[test]
fn a_policy_reads_back_from_its_text() {
    let policy = parse_policy(POLICY_TEXT_FOR_ROUND_TRIP).unwrap();
    assert_eq!(parse_policy(&policy.text()).unwrap(), policy);
}

const POLICY_TEXT_FOR_ROUND_TRIP: &str = "version: STSv1\r\nmode: testing\r\nmx: MX1.Example.ORG.\r\nmx: *.example.net\r\n\
    max_age: 86400\r\nfuture: 1\r\n";

#[test]
fn wildcard_matches_exactly_one_leftmost_label() {
    let policy = parse_policy(GOOD).unwrap();
    assert!(policy.matches("mail.example.com"));
    assert!(policy.matches("MAIL.example.com."));
    assert!(policy.matches("mx1.example.net"));
    assert!(!policy.matches("example.net"), "the wildcard needs a label");
    assert!(!policy.matches("a.b.example.net"), "the wildcard covers one label only");
    assert!(!policy.matches("mail.example.com.evil"));
    assert!(!policy.matches("xmail.example.com"));
}

proptest! {
    #[test]
    fn parsers_never_panic(text in ".{0,600}", lines in proptest::collection::vec("[a-z_*. :0-9A-Z;=\r-]{0,40}", 0..12)) {
        let _ = parse_policy(&text);
        let _ = parse_policy(&lines.join("\n"));
        let _ = parse_txt(std::slice::from_ref(&text));
        let _ = parse_txt(&lines);
        if let Ok(policy) = parse_policy(&lines.join("\r\n")) {
            prop_assert!(policy.max_age <= MAX_MAX_AGE);
            let _ = policy.matches(&text);
        }
    }
}
