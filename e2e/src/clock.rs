//! The operator's clock in the control-plane suites. The suites start the operator with its wall clock set, through
//! libfaketime, to noon UTC of the day they run, or `SECUREMAIL_CLOCK_DAYS_AHEAD` days later (`CLOCK_AHEAD_DAYS` in
//! the Makefile). A run that crosses midnight therefore keeps one date, and the tests take their dates and
//! expectations from [`now`], the same clock the operator reads. The apiserver and etcd keep the real clock.
//!
//! The offset is reckoned from the moment the control plane was created (`clock-origin`, written by
//! `cluster-up.sh`), so every test process against one control plane reads the same time: a Lease renewed by one
//! suite's operator is judged by the next suite's operator on the same clock, not minutes in its future.

use std::path::PathBuf;
use std::sync::OnceLock;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};

/// How far the operator's clock is ahead of the real one: from the origin (see [`origin`]) to the next noon UTC,
/// plus the days ahead. Fixed for the process, and the same in every process against one control plane.
pub fn offset() -> SignedDuration {
    static OFFSET: OnceLock<SignedDuration> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        let days_ahead: i64 = std::env::var("SECUREMAIL_CLOCK_DAYS_AHEAD")
            .map(|days| {
                days.parse()
                    .unwrap_or_else(|err| panic!("SECUREMAIL_CLOCK_DAYS_AHEAD={days:?} is not a number of days: {err}"))
            })
            .unwrap_or(0);
        let real = origin().to_zoned(TimeZone::UTC);
        let noon = real
            .date()
            .at(12, 0, 0, 0)
            .to_zoned(TimeZone::UTC)
            .unwrap_or_else(|err| panic!("{err}"));
        // Forward only: a clock behind the real one would find the control plane's new certificates not yet valid.
        let next_noon = if noon < real {
            noon.checked_add(1.day()).unwrap_or_else(|err| panic!("{err}"))
        } else {
            noon
        };
        real.duration_until(&next_noon) + SignedDuration::from_hours(24 * days_ahead)
    })
}

/// When the control plane named by `KUBECONFIG` was created (its `clock-origin`), or, without one (the data-plane
/// suites), when this process first asked.
fn origin() -> Timestamp {
    let Some(path) = std::env::var_os("KUBECONFIG")
        .map(PathBuf::from)
        .and_then(|kubeconfig| kubeconfig.parent().map(|dir| dir.join("clock-origin")))
        .filter(|path| path.exists())
    else {
        return Timestamp::now();
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    text.trim()
        .parse::<i64>()
        .ok()
        .and_then(|seconds| Timestamp::from_second(seconds).ok())
        .unwrap_or_else(|| panic!("{}: {text:?} is not a Unix time in seconds", path.display()))
}

/// The operator's time now.
pub fn now() -> Timestamp {
    Timestamp::now()
        .checked_add(offset())
        .unwrap_or_else(|err| panic!("{err}"))
}

/// The operator's UTC date.
pub fn today() -> Date {
    now().to_zoned(TimeZone::UTC).date()
}

/// The environment that starts a program with its wall clock at [`now`] plus `days_later` days (the monotonic
/// clock is left alone).
pub fn set_clock_env(days_later: u32) -> Vec<(&'static str, String)> {
    let seconds = offset().as_secs() + i64::from(days_later) * 86_400;
    vec![
        ("LD_PRELOAD", faketime_library().to_string_lossy().into_owned()),
        ("FAKETIME", format!("{seconds:+}")),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
}

/// Debian's libfaketime (package faketime), under the machine's multiarch directory.
pub fn faketime_library() -> PathBuf {
    std::fs::read_dir("/usr/lib")
        .unwrap_or_else(|err| panic!("/usr/lib: {err}"))
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("faketime/libfaketime.so.1"))
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!("no libfaketime.so.1 under /usr/lib/*/faketime (Debian package faketime; run make deps)")
        })
}
