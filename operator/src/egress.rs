//! `EgressReady`: whether every running MTA pod can send from its pool address. A pod's sidecar checks that itself
//! (bind and route, or the SOCKS5 proxy on its address) and is unready while it cannot; for such a pod the operator
//! reads `/status` to name the address and the reason. A ready sidecar has passed its check, so ready pods cost no
//! request.

use std::sync::Arc;

use crate::build::SIDECAR_CONTAINER;
use crate::context::MtaPod;
use crate::pod_health::{NAMED_PODS, fit_event_note};
use crate::pod_status;
use crate::status::{self, ConditionUpdate};

/// A pod cannot send from its address; its deliveries wait in its queue.
pub const CANNOT_SEND: &str = "CannotSendFromAddress";

/// What one MTA pod says about its way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEgress {
    /// The sidecar is ready, so its last check passed.
    Ready,
    /// The sidecar reports it cannot send from `address`.
    Failing { address: String, reason: String },
    /// The sidecar is unready for another reason (starting, its resolver, its configuration).
    OtherwiseUnready,
    /// The sidecar is unready and its `/status` could not be read.
    Unreadable(String),
}

/// The egress of each pod whose sidecar is running, in the order given; pods whose sidecar is not running have
/// nothing to say (`MtaAvailable` covers them). The unready ones are asked side by side, so one pod that does not
/// answer delays the reconcile by one `/status` timeout, not one per pod.
pub async fn observe(pods: &[(String, Arc<MtaPod>)]) -> Vec<(String, PodEgress)> {
    let running = pods.iter().filter_map(|(name, pod)| {
        let pod = pod.status.as_ref();
        let sidecar = pod
            .and_then(|status| status.container_statuses.as_ref())
            .and_then(|containers| containers.iter().find(|container| container.name == SIDECAR_CONTAINER))?;
        sidecar.state.as_ref().and_then(|state| state.running.as_ref())?;
        Some(async move {
            let egress = if sidecar.ready {
                PodEgress::Ready
            } else {
                match pod_status::read(pod).await {
                    Ok(status) => match status.egress {
                        Some(egress) if !egress.ready => PodEgress::Failing {
                            address: status.address.to_string(),
                            reason: egress.reason.unwrap_or_else(|| "no reason given".to_owned()),
                        },
                        _ => PodEgress::OtherwiseUnready,
                    },
                    Err(reason) => PodEgress::Unreadable(reason),
                }
            };
            (name.clone(), egress)
        })
    });
    futures::future::join_all(running).await
}

/// `EgressReady` from the pods' egress: False naming each pod that cannot send, its address and why; Unknown when
/// an unready pod cannot be asked, or no sidecar runs yet; True otherwise.
pub fn condition(pods: &[(String, PodEgress)]) -> ConditionUpdate {
    let failing: Vec<String> = pods
        .iter()
        .filter_map(|(pod, egress)| match egress {
            PodEgress::Failing { address, reason } => Some(format!("pod {pod} cannot send from {address}: {reason}")),
            _ => None,
        })
        .collect();
    if !failing.is_empty() {
        return ConditionUpdate::new(
            status::EGRESS_READY,
            false,
            CANNOT_SEND,
            fit_event_note(format!(
                "{}; its mail waits in its queue (see docs/egress.md)",
                named(&failing)
            )),
        );
    }
    let unreadable: Vec<String> = pods
        .iter()
        .filter_map(|(pod, egress)| match egress {
            PodEgress::Unreadable(reason) => Some(format!("pod {pod} is unready and its status unreadable: {reason}")),
            _ => None,
        })
        .collect();
    if !unreadable.is_empty() {
        return ConditionUpdate::unknown(
            status::EGRESS_READY,
            "StatusUnreadable",
            fit_event_note(named(&unreadable)),
        );
    }
    if pods.is_empty() {
        return ConditionUpdate::unknown(
            status::EGRESS_READY,
            "NotChecked",
            "no MTA pod's sidecar is running yet",
        );
    }
    ConditionUpdate::new(
        status::EGRESS_READY,
        true,
        "SendingFromPoolAddresses",
        "every running MTA pod can send from its pool address",
    )
}

/// The first pod that cannot send from its address, for the event that says so.
pub fn first_failing(pods: &[(String, PodEgress)]) -> Option<&str> {
    pods.iter()
        .find(|(_, egress)| matches!(egress, PodEgress::Failing { .. }))
        .map(|(pod, _)| pod.as_str())
}

/// Up to [`NAMED_PODS`] items, then a count.
fn named(items: &[String]) -> String {
    let mut message = items.iter().take(NAMED_PODS).cloned().collect::<Vec<_>>().join("; ");
    if items.len() > NAMED_PODS {
        message.push_str(&format!("; and {} more pod(s)", items.len() - NAMED_PODS));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, egress: PodEgress) -> (String, PodEgress) {
        (name.to_owned(), egress)
    }

    fn failing(address: &str) -> PodEgress {
        PodEgress::Failing {
            address: address.to_owned(),
            reason: "address not on this pod".to_owned(),
        }
    }

    #[test]
    fn every_failing_pod_is_named_with_its_address() {
        let update = condition(&[
            pod("acme-mta-0", PodEgress::Ready),
            pod("acme-mta-1", failing("192.0.2.11")),
            pod("acme-mta-2", PodEgress::Unreadable("timeout".to_owned())),
        ]);
        assert_eq!(update.status, Some(false));
        assert_eq!(update.reason, CANNOT_SEND);
        assert!(
            update
                .message
                .starts_with("pod acme-mta-1 cannot send from 192.0.2.11: address not on this pod;"),
            "{}",
            update.message
        );
    }

    #[test]
    fn many_failing_pods_are_counted_beyond_three() {
        let pods: Vec<_> = (0..5)
            .map(|index| pod(&format!("acme-mta-{index}"), failing(&format!("192.0.2.{index}"))))
            .collect();
        let update = condition(&pods);
        assert!(update.message.contains("and 2 more pod(s)"), "{}", update.message);
        assert!(!update.message.contains("192.0.2.3"), "{}", update.message);
    }

    #[test]
    fn a_long_reason_still_fits_an_event_note() {
        let long = PodEgress::Failing {
            address: "192.0.2.10".to_owned(),
            reason: "x".repeat(2000),
        };
        let update = condition(&[pod("acme-mta-0", long)]);
        assert!(update.message.len() <= 1000, "{} bytes", update.message.len());
        assert!(
            update
                .message
                .starts_with("pod acme-mta-0 cannot send from 192.0.2.10: xxx")
        );
    }

    #[test]
    fn an_unreadable_pod_leaves_it_unknown() {
        let update = condition(&[
            pod("acme-mta-0", PodEgress::Ready),
            pod("acme-mta-1", PodEgress::Unreadable("connection refused".to_owned())),
        ]);
        assert_eq!(update.status, None);
        assert_eq!(update.reason, "StatusUnreadable");
        assert!(update.message.contains("acme-mta-1"), "{}", update.message);
    }

    #[test]
    fn ready_and_otherwise_unready_pods_can_send() {
        let update = condition(&[
            pod("acme-mta-0", PodEgress::Ready),
            pod("acme-mta-1", PodEgress::OtherwiseUnready),
        ]);
        assert_eq!(update.status, Some(true));
    }

    #[test]
    fn no_running_sidecar_is_not_a_verdict() {
        let update = condition(&[]);
        assert_eq!(update.status, None);
        assert_eq!(update.reason, "NotChecked");
    }
}
