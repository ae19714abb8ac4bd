//! Why MTA pods cannot run, read from their status: the kubelet's waiting reasons (image pull, container creation,
//! crash loop) and the scheduler's verdict. A tenant whose pods cannot run says so in `MtaAvailable` instead of
//! counting ready pods for ever. Pure, so the rules are tested on status fixtures.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{ContainerStatus, PodCondition, PodStatus};

use crate::status::{self, ConditionUpdate};

/// The image cannot be pulled: wrong name or tag, no access to the registry, or a pull policy that forbids it.
pub const IMAGE_PULL_FAILED: &str = "ImagePullFailed";
/// The container cannot be created from its spec (a Secret or ConfigMap key it needs is missing, say).
pub const CONTAINER_CONFIG_INVALID: &str = "ContainerConfigInvalid";
/// The container keeps exiting and the kubelet restarts it with a growing back-off.
pub const CRASH_LOOPING: &str = "CrashLooping";
/// The scheduler finds no node for the pod (resources, affinity, an unbound volume claim).
pub const UNSCHEDULABLE: &str = "Unschedulable";
/// Scheduled, yet no container could be created for [`STUCK_AFTER`]: its volumes are not mounted or its sandbox
/// (network) not set up.
pub const STUCK_PENDING: &str = "StuckPending";

/// Every reason of a pod that cannot run, for events, metrics and docs.
pub const REASONS: [&str; 5] = [
    IMAGE_PULL_FAILED,
    CONTAINER_CONFIG_INVALID,
    CRASH_LOOPING,
    UNSCHEDULABLE,
    STUCK_PENDING,
];

/// How long a scheduled pod may wait for its sandbox: mounting and attaching volumes takes seconds to a minute or
/// two; a pod status cannot say more, so only the wait tells a slow mount from one that will not happen.
pub const STUCK_AFTER: SignedDuration = SignedDuration::from_mins(5);

/// Restarts after which a container that is running but not ready counts as crash-looping: the kubelet reports
/// `CrashLoopBackOff` only while it waits, and a loop's short running spells must not read as recovered. One
/// restart (a node reboot, a single OOM kill) is not a loop.
const LOOP_RESTARTS: i32 = 2;

/// Longest excerpt of one kubelet or scheduler message in a condition.
const DETAIL_CHARS: usize = 160;
/// Pods a condition message names; the rest are counted.
pub const NAMED_PODS: usize = 3;
/// Events refuse notes over 1 KiB, and the condition message is the event's note.
const MESSAGE_BYTES: usize = 1000;

/// Why one pod cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProblem {
    pub pod: String,
    /// One of [`REASONS`].
    pub reason: &'static str,
    pub detail: String,
}

/// What a pod's status says at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diagnosis {
    pub problem: Option<PodProblem>,
    /// When the pod, unchanged, would be judged stuck: the reconcile loop looks again then.
    pub recheck_at: Option<Timestamp>,
}

/// Diagnoses pod `name` from its status at `now`. A pod that is running, ready, or merely starting has no problem.
pub fn diagnose(name: &str, status: &PodStatus, now: Timestamp) -> Diagnosis {
    let problem = |(reason, detail): (&'static str, String)| PodProblem {
        pod: name.to_owned(),
        reason,
        detail,
    };
    let containers = [
        ("init container", status.init_container_statuses.as_deref()),
        ("container", status.container_statuses.as_deref()),
    ];
    let container = containers.iter().find_map(|(kind, statuses)| {
        statuses
            .unwrap_or_default()
            .iter()
            .find_map(|container| container_problem(kind, container))
    });
    if let Some(found) = container {
        return Diagnosis {
            problem: Some(problem(found)),
            recheck_at: None,
        };
    }
    let scheduled = condition(status, "PodScheduled");
    if let Some(scheduled) = scheduled.filter(|c| c.status == "False")
        && matches!(scheduled.reason.as_deref(), Some("Unschedulable" | "SchedulerError"))
    {
        let detail = format!(
            "not scheduled: {}",
            excerpt(scheduled.message.as_deref().unwrap_or("no reason given"))
        );
        return Diagnosis {
            problem: Some(problem((UNSCHEDULABLE, detail))),
            recheck_at: None,
        };
    }
    // The kubelet sets PodReadyToStartContainers once volumes are mounted and the sandbox runs; without the
    // condition (an older kubelet) a pod waiting for its volumes cannot be told from one pulling a large image.
    let sandbox_missing = condition(status, "PodReadyToStartContainers").is_some_and(|c| c.status == "False");
    let since = scheduled
        .filter(|c| c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|time| time.0);
    match since {
        Some(since) if sandbox_missing && status.phase.as_deref() == Some("Pending") => {
            let stuck_at = since.saturating_add(STUCK_AFTER).unwrap_or(since);
            if now < stuck_at {
                return Diagnosis {
                    problem: None,
                    recheck_at: Some(stuck_at),
                };
            }
            let detail = format!(
                "scheduled at {since} but no container created since: volumes not mounted or the pod sandbox not \
                 set up (the pod's events say which: FailedMount, FailedAttachVolume, FailedCreatePodSandBox)"
            );
            Diagnosis {
                problem: Some(problem((STUCK_PENDING, detail))),
                recheck_at: None,
            }
        }
        _ => Diagnosis::default(),
    }
}

fn condition<'a>(status: &'a PodStatus, type_: &str) -> Option<&'a PodCondition> {
    status.conditions.as_deref()?.iter().find(|c| c.type_ == type_)
}

/// The problem one container status shows, if any.
fn container_problem(kind: &str, container: &ContainerStatus) -> Option<(&'static str, String)> {
    let name = &container.name;
    let waiting = container.state.as_ref().and_then(|state| state.waiting.as_ref());
    let waiting_reason = waiting.and_then(|w| w.reason.as_deref()).unwrap_or_default();
    let said = || {
        let message = waiting.and_then(|w| w.message.as_deref()).unwrap_or_default();
        if message.is_empty() {
            waiting_reason.to_owned()
        } else {
            format!("{waiting_reason}: {}", excerpt(message))
        }
    };
    match waiting_reason {
        "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => Some((
            IMAGE_PULL_FAILED,
            format!("{kind} {name}: image {} cannot be pulled ({})", container.image, said()),
        )),
        "CreateContainerConfigError" | "CreateContainerError" => Some((
            CONTAINER_CONFIG_INVALID,
            format!("{kind} {name} cannot be created ({})", said()),
        )),
        "RunContainerError" => Some((CRASH_LOOPING, format!("{kind} {name} cannot start ({})", said()))),
        _ => {
            let last = container
                .last_state
                .as_ref()
                .and_then(|state| state.terminated.as_ref());
            let looping = waiting_reason == "CrashLoopBackOff"
                || (last.is_some()
                    && !container.ready
                    && container.restart_count >= LOOP_RESTARTS
                    && container.state.as_ref().is_some_and(|state| state.running.is_some()));
            // The termination message is whatever the program wrote last: left out, it may hold anything.
            looping.then(|| {
                let exit = last.map_or_else(String::new, |last| {
                    let reason = last.reason.as_deref().unwrap_or("exited");
                    format!(", last exit {reason} (code {})", last.exit_code)
                });
                let restarts = container.restart_count;
                (
                    CRASH_LOOPING,
                    format!("{kind} {name} keeps exiting: restarted {restarts} time(s){exit}"),
                )
            })
        }
    }
}

/// The first [`DETAIL_CHARS`] characters of a message, on one line.
fn excerpt(message: &str) -> String {
    let mut text: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(DETAIL_CHARS)
        .collect();
    if message.chars().nth(DETAIL_CHARS).is_some() {
        text.push('…');
    }
    text
}

/// `MtaAvailable` from the StatefulSet's ready pods and the problems of the tenant's pods (in ordinal order): true
/// once every wanted pod is ready; otherwise the first problem's reason, with each failing pod and its cause, or
/// `PodsNotReady` while pods are merely starting.
pub fn mta_condition(ready: i32, wanted: i32, problems: &[PodProblem]) -> ConditionUpdate {
    let count = format!("{ready}/{wanted} MTA pods ready");
    if wanted > 0 && ready >= wanted {
        return ConditionUpdate::new(status::MTA_AVAILABLE, true, "PodsReady", count);
    }
    let Some(first) = problems.first() else {
        return ConditionUpdate::new(status::MTA_AVAILABLE, false, "PodsNotReady", count);
    };
    let mut message = count;
    for problem in problems.iter().take(NAMED_PODS) {
        message.push_str(&format!("; pod {}: {}", problem.pod, problem.detail));
    }
    if problems.len() > NAMED_PODS {
        message.push_str(&format!("; {} more pod(s) cannot run", problems.len() - NAMED_PODS));
    }
    ConditionUpdate::new(status::MTA_AVAILABLE, false, first.reason, fit_event_note(message))
}

/// `message` cut to what an event note may hold (the condition message becomes the event's note).
pub fn fit_event_note(mut message: String) -> String {
    if message.len() > MESSAGE_BYTES {
        let mut end = MESSAGE_BYTES - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// A StatefulSet pod's ordinal, from its name (`<statefulset>-<ordinal>`), to list pods in pool order.
pub fn ordinal(pod: &str) -> Option<u32> {
    pod.rsplit_once('-')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-11-25T10:00:00Z";

    fn now() -> Timestamp {
        NOW.parse().unwrap()
    }

    fn status(value: serde_json::Value) -> PodStatus {
        serde_json::from_value(value).unwrap()
    }

    fn diagnosed(value: serde_json::Value) -> Option<(&'static str, String)> {
        diagnose("clinic-mta-0", &status(value), now())
            .problem
            .map(|problem| (problem.reason, problem.detail))
    }

    fn scheduled(at: &str) -> serde_json::Value {
        serde_json::json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": at})
    }

    /// A pod as the kubelet reports it while one container waits for `reason`.
    fn waiting(container: &str, reason: &str, message: &str) -> serde_json::Value {
        serde_json::json!({
            "phase": "Pending",
            "conditions": [scheduled("2026-11-25T09:58:00Z"),
                {"type": "PodReadyToStartContainers", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
            "containerStatuses": [
                {"name": "postfix", "image": "securemail/mta:0.1.0", "imageID": "", "ready": false,
                 "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}},
                {"name": container, "image": "registry.example/securemail/sidecar:0.1.0", "imageID": "",
                 "ready": false, "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}},
            ]
        })
    }

    #[test]
    fn an_image_that_cannot_be_pulled_names_container_image_and_kubelet_message() {
        for reason in [
            "ErrImagePull",
            "ImagePullBackOff",
            "InvalidImageName",
            "ErrImageNeverPull",
        ] {
            let message = "failed to pull and unpack image: not found";
            let (found, detail) = diagnosed(waiting("sidecar", reason, message)).unwrap();
            assert_eq!(found, IMAGE_PULL_FAILED, "{reason}");
            assert_eq!(
                detail,
                format!(
                    "container sidecar: image registry.example/securemail/sidecar:0.1.0 cannot be pulled \
                     ({reason}: {message})"
                )
            );
        }
    }

    #[test]
    fn a_container_that_cannot_be_created_says_what_is_missing() {
        let message = "couldn't find key tls.key in Secret tenant-a/clinic-submission-tls";
        let (reason, detail) = diagnosed(waiting("postfix", "CreateContainerConfigError", message)).unwrap();
        assert_eq!(reason, CONTAINER_CONFIG_INVALID);
        assert_eq!(
            detail,
            format!("container postfix cannot be created (CreateContainerConfigError: {message})")
        );
    }

    fn crashing(state: serde_json::Value, ready: bool, restarts: i32) -> serde_json::Value {
        serde_json::json!({
            "phase": "Running",
            "conditions": [scheduled("2026-11-25T09:00:00Z")],
            "containerStatuses": [
                {"name": "postfix", "image": "securemail/mta:0.1.0", "imageID": "", "ready": ready,
                 "restartCount": restarts, "state": state,
                 "lastState": {"terminated": {"reason": "Error", "exitCode": 1,
                    "message": "postfix: fatal: secret-looking output"}}},
            ]
        })
    }

    #[test]
    fn a_crash_loop_names_restarts_and_last_exit_but_not_the_termination_message() {
        let backoff = serde_json::json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}});
        let (reason, detail) = diagnosed(crashing(backoff, false, 3)).unwrap();
        assert_eq!(reason, CRASH_LOOPING);
        assert_eq!(
            detail,
            "container postfix keeps exiting: restarted 3 time(s), last exit Error (code 1)"
        );
        assert!(!detail.contains("secret-looking"));
        // Between back-offs the container runs briefly: still the same loop.
        let running = serde_json::json!({"running": {"startedAt": "2026-11-25T09:59:50Z"}});
        assert_eq!(diagnosed(crashing(running.clone(), false, 3)).unwrap().0, CRASH_LOOPING);
        // One restart that did not come back yet, or a container ready again, is no loop.
        assert_eq!(diagnosed(crashing(running.clone(), false, 1)), None);
        assert_eq!(diagnosed(crashing(running, true, 7)), None);
    }

    #[test]
    fn unschedulable_carries_the_schedulers_message() {
        let message = "0/3 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: \
                       }, 2 pod has unbound immediate PersistentVolumeClaims. preemption: 0/3 nodes are available: 3 \
                       Preemption is not helpful for scheduling.";
        let pending = serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": message, "lastTransitionTime": "2026-11-25T09:59:00Z"}]
        });
        let (reason, detail) = diagnosed(pending).unwrap();
        assert_eq!(reason, UNSCHEDULABLE);
        assert!(detail.starts_with("not scheduled: 0/3 nodes are available: 1 node(s) had untolerated taint"));
        assert!(detail.ends_with('…'), "a long message is cut: {detail}");
        assert_eq!(detail.chars().count(), "not scheduled: ".len() + DETAIL_CHARS + 1);
    }

    #[test]
    fn a_pod_merely_starting_has_no_problem() {
        // Just created: not scheduled yet, no verdict from the scheduler.
        assert_eq!(diagnosed(serde_json::json!({"phase": "Pending"})), None);
        // Scheduling gates hold it on purpose.
        let gated = serde_json::json!({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]});
        assert_eq!(diagnosed(gated), None);
        // Containers being created, images pulling.
        assert_eq!(diagnosed(waiting("sidecar", "ContainerCreating", "")), None);
        assert_eq!(diagnosed(waiting("sidecar", "PodInitializing", "")), None);
    }

    #[test]
    fn a_scheduled_pod_without_a_sandbox_is_stuck_only_after_the_wait() {
        let pod = |at: &str| {
            status(serde_json::json!({"phase": "Pending", "conditions": [scheduled(at),
                {"type": "PodReadyToStartContainers", "status": "False"}]}))
        };
        let recent = diagnose("clinic-mta-1", &pod("2026-11-25T09:58:00Z"), now());
        assert_eq!(recent.problem, None);
        assert_eq!(recent.recheck_at, Some("2026-11-25T10:03:00Z".parse().unwrap()));
        let old = diagnose("clinic-mta-1", &pod("2026-11-25T09:50:00Z"), now());
        let problem = old.problem.unwrap();
        assert_eq!((problem.pod.as_str(), problem.reason), ("clinic-mta-1", STUCK_PENDING));
        assert!(
            problem
                .detail
                .starts_with("scheduled at 2026-11-25T09:50:00Z but no container created")
        );
        assert_eq!(old.recheck_at, None);
    }

    #[test]
    fn a_failing_init_container_is_named_before_the_containers_it_holds_back() {
        let mut pod = waiting("sidecar", "PodInitializing", "");
        pod["initContainerStatuses"] = serde_json::json!([
            {"name": "setup", "image": "securemail/mta:bad", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"waiting": {"reason": "ImagePullBackOff"}}}]);
        let (reason, detail) = diagnosed(pod).unwrap();
        assert_eq!(reason, IMAGE_PULL_FAILED);
        assert_eq!(
            detail,
            "init container setup: image securemail/mta:bad cannot be pulled (ImagePullBackOff)"
        );
    }

    fn problem(pod: &str, reason: &'static str, detail: &str) -> PodProblem {
        PodProblem {
            pod: pod.to_owned(),
            reason,
            detail: detail.to_owned(),
        }
    }

    #[test]
    fn the_condition_names_the_first_failing_pods_and_stays_short() {
        assert_eq!(mta_condition(1, 1, &[]).reason, "PodsReady");
        let starting = mta_condition(0, 1, &[]);
        assert_eq!(
            (starting.status, starting.reason.as_str(), starting.message.as_str()),
            (Some(false), "PodsNotReady", "0/1 MTA pods ready")
        );
        // Every wanted pod ready: a failing pod above the pool (draining) does not make the tenant unavailable.
        let extra = [problem("c-mta-3", CRASH_LOOPING, "x")];
        assert_eq!(mta_condition(3, 3, &extra).status, Some(true));

        let problems: Vec<PodProblem> = (0..5)
            .map(|i| {
                problem(
                    &format!("c-mta-{i}"),
                    if i == 0 { UNSCHEDULABLE } else { CRASH_LOOPING },
                    "why",
                )
            })
            .collect();
        let update = mta_condition(0, 5, &problems);
        assert_eq!((update.status, update.reason.as_str()), (Some(false), UNSCHEDULABLE));
        assert_eq!(
            update.message,
            "0/5 MTA pods ready; pod c-mta-0: why; pod c-mta-1: why; pod c-mta-2: why; 2 more pod(s) cannot run"
        );
        let long: Vec<PodProblem> = (0..3)
            .map(|i| problem(&format!("c-mta-{i}"), CRASH_LOOPING, &"é".repeat(400)))
            .collect();
        let update = mta_condition(0, 3, &long);
        assert!(update.message.len() <= MESSAGE_BYTES, "{}", update.message.len());
        assert!(update.message.ends_with('…'));
    }

    #[test]
    fn the_alert_pages_for_exactly_these_reasons() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../alerts/securemail.rules.yaml");
        let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let expr = rules["groups"]
            .as_sequence()
            .unwrap()
            .iter()
            .flat_map(|group| group["rules"].as_sequence().unwrap())
            .find(|rule| rule["alert"].as_str() == Some("SecureMailMtaPodsCannotRun"))
            .and_then(|rule| rule["expr"].as_str())
            .unwrap();
        let (_, after) = expr.split_once("reason=~\"").unwrap();
        let (pattern, _) = after.split_once('"').unwrap();
        let mut alerted: Vec<&str> = pattern.split('|').collect();
        let mut reasons = REASONS.to_vec();
        alerted.sort_unstable();
        reasons.sort_unstable();
        assert_eq!(alerted, reasons);
    }

    #[test]
    fn ordinals_come_from_pod_names() {
        assert_eq!(ordinal("lakeside-clinic-mta-12"), Some(12));
        assert_eq!(ordinal("lakeside"), None);
    }
}
