//! Kubernetes events about tenants (events.k8s.io/v1), a repeat folded into the first event's series the way
//! kube's `Recorder` does it: one event per object, type, reason, action and related object, its series counting the
//! repeats seen within six minutes, the note staying the first one's.
//!
//! kube's `Recorder` keeps every event it published in the last six minutes whole and scans all of them at each
//! publish to drop the old ones: with thousands of new tenants that was kilobytes per tenant and a scan as long as
//! the number of tenants per event. This keeps, per series, the event's name, its count and when it was last seen,
//! and drops old series in the order they were last seen.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// How long a repeat is folded into the series of the event it repeats (kube's `Recorder` uses the same).
const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

/// One event to publish about `regarding`.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub type_: EventType,
    pub reason: &'a str,
    pub note: &'a str,
    pub action: &'a str,
    /// The object it concerns most besides `regarding` (a pod).
    pub related: Option<ObjectReference>,
}

/// What makes two events one series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    namespace: Box<str>,
    regarding: Box<str>,
    type_: EventType,
    reason: Box<str>,
    action: Box<str>,
    related: Option<Box<str>>,
}

/// A series seen within the window: its event and how often it was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Series {
    /// The event's creation time, which also makes its name.
    created: Timestamp,
    count: i32,
    last_seen: Timestamp,
}

/// The series seen within the window, and the order to forget them in.
#[derive(Debug, Default)]
struct Recent {
    series: HashMap<SeriesKey, Series>,
    /// (last seen, series) in the order seen; an entry whose series was seen again later is skipped when it expires.
    expiry: VecDeque<(Timestamp, SeriesKey)>,
}

/// What publishing an event means at `now`: a new event, or one more in the series of an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Publication {
    Create { created: Timestamp },
    Repeat { created: Timestamp, count: i32 },
}

impl Recent {
    fn publish(&mut self, key: SeriesKey, now: Timestamp) -> Publication {
        while let Some((seen, _)) = self.expiry.front() {
            if *seen + SERIES_WINDOW > now {
                break;
            }
            let Some((seen, expired)) = self.expiry.pop_front() else {
                break;
            };
            if self.series.get(&expired).is_some_and(|series| series.last_seen == seen) {
                self.series.remove(&expired);
            }
        }
        let publication = match self.series.get_mut(&key) {
            Some(series) => {
                series.count += 1;
                series.last_seen = now;
                Publication::Repeat {
                    created: series.created,
                    count: series.count,
                }
            }
            None => {
                self.series.insert(
                    key.clone(),
                    Series {
                        created: now,
                        count: 1,
                        last_seen: now,
                    },
                );
                Publication::Create { created: now }
            }
        };
        self.expiry.push_back((now, key));
        publication
    }
}

/// Publishes events as the operator's controller and instance (its pod); clones share the series seen.
#[derive(Clone)]
pub struct EventPublisher {
    client: Client,
    controller: String,
    instance: String,
    recent: Arc<Mutex<Recent>>,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("controller", &self.controller)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl EventPublisher {
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            recent: Arc::default(),
        }
    }

    /// Creates the event, or counts it in the series of the same event published less than six minutes ago. Events
    /// carry the time the apiserver keeps, not the reconcile clock tests may set.
    pub async fn publish(&self, event: NewEvent<'_>, regarding: &ObjectReference) -> kube::Result<()> {
        let now = Timestamp::now();
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".to_owned());
        let regarding_name = regarding.name.clone().unwrap_or_else(|| self.controller.clone());
        let key = SeriesKey {
            namespace: namespace.as_str().into(),
            regarding: regarding_name.as_str().into(),
            type_: event.type_,
            reason: event.reason.into(),
            action: event.action.into(),
            related: event
                .related
                .as_ref()
                .and_then(|related| related.name.as_deref())
                .map(Into::into),
        };
        let publication = self
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .publish(key, now);
        let name = |created: Timestamp| format!("{regarding_name}.{:x}", created.as_nanosecond());
        let events: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        match publication {
            Publication::Create { created } => {
                let object = Event {
                    metadata: ObjectMeta {
                        name: Some(name(created)),
                        namespace: Some(namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    event_time: Some(MicroTime(created)),
                    type_: Some(event.type_.as_str().to_owned()),
                    reason: Some(event.reason.to_owned()),
                    note: Some(event.note.to_owned()),
                    action: Some(event.action.to_owned()),
                    regarding: Some(regarding.clone()),
                    related: event.related,
                    reporting_controller: Some(self.controller.clone()),
                    reporting_instance: Some(self.instance.clone()),
                    ..Event::default()
                };
                events.create(&PostParams::default(), &object).await?;
            }
            Publication::Repeat { created, count } => {
                let series = serde_json::json!({
                    "series": {"count": count, "lastObservedTime": MicroTime(now)}
                });
                events
                    .patch(&name(created), &PatchParams::default(), &Patch::Merge(&series))
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(regarding: &str, reason: &str) -> SeriesKey {
        SeriesKey {
            namespace: "mail".into(),
            regarding: regarding.into(),
            type_: EventType::Warning,
            reason: reason.into(),
            action: "Reconcile".into(),
            related: None,
        }
    }

    fn at(minutes: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_mins(minutes)
    }

    #[test]
    fn a_repeat_within_six_minutes_of_the_last_counts_in_the_first_events_series() {
        let mut recent = Recent::default();
        assert_eq!(
            recent.publish(key("a", "Down"), at(0)),
            Publication::Create { created: at(0) }
        );
        assert_eq!(
            recent.publish(key("b", "Down"), at(1)),
            Publication::Create { created: at(1) }
        );
        assert_eq!(
            recent.publish(key("a", "Up"), at(1)),
            Publication::Create { created: at(1) }
        );
        assert_eq!(
            recent.publish(key("a", "Down"), at(5)),
            Publication::Repeat {
                created: at(0),
                count: 2
            }
        );
        // Six minutes after the first, but four after the last: still the same series.
        assert_eq!(
            recent.publish(key("a", "Down"), at(9)),
            Publication::Repeat {
                created: at(0),
                count: 3
            }
        );
        // Six minutes after its last: a new event.
        assert_eq!(
            recent.publish(key("a", "Down"), at(15)),
            Publication::Create { created: at(15) }
        );
    }

    #[test]
    fn series_seen_more_than_six_minutes_ago_are_forgotten() {
        let mut recent = Recent::default();
        for (minute, regarding) in [(0, "a"), (1, "b"), (2, "c"), (3, "a")] {
            recent.publish(key(regarding, "Down"), at(minute));
        }
        recent.publish(key("d", "Down"), at(8));
        // b and c were last seen more than six minutes ago; a at minute 3 is kept.
        let mut kept: Vec<&str> = recent.series.keys().map(|key| &*key.regarding).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["a", "d"]);
        assert_eq!(recent.expiry.len(), 2);
    }
}
