//! Kubernetes Events (`events.k8s.io/v1`) about bindings, without a cache of the Events
//! themselves.
//!
//! kube-runtime's `Recorder` keeps every Event it published for six minutes, to patch a
//! repeat into a series, and scans that cache on every publish: at 10,000 bindings issued
//! together that is about 4 KiB held per binding and a scan of 10,000 entries per Event.
//! Here an Event is created and forgotten; what is remembered is one small entry per
//! (object, reason): the digest of the last note and when it went out, so that the same
//! note for the same object is not created again within [`REPEAT_AFTER`] (a subject
//! failing with backoff does not write an Event per retry).
//!
//! An Event is created in the background ([`Publisher::publish`]): a reconcile does not wait
//! for it. Events are best effort: one that fails or takes longer than [`CREATE_TIMEOUT`] is
//! logged, one published while the publisher's limit of creates are in flight already is
//! dropped (a slow apiserver then loses Events, and holds no reconcile back; the drops are
//! counted, and logged at the 1st, 2nd, 4th, 8th, ...), and those in
//! flight when the process stops are lost. The controller's limit is twice its reconcile
//! concurrency: a reconcile publishes about one Event, so only a slow apiserver reaches it.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

/// The same note about the same object goes out again only after this long.
pub const REPEAT_AFTER: SignedDuration = SignedDuration::from_mins(10);

/// How long an Event create may take.
pub const CREATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `events.k8s.io/v1` limits a note to 1 KiB.
const NOTE_LIMIT: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// Publishes Events as `controller` (with `instance`, the pod name, when known).
pub struct Publisher {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Events dropped so far (logged at 1, 2, 4, 8, ... drops).
    dropped: std::sync::atomic::AtomicU64,
}

/// The digest of the last note per (object uid, reason), keyed by a digest of the pair,
/// and when it went out;
/// swept of entries older than [`REPEAT_AFTER`] at most once per [`REPEAT_AFTER`], so its
/// size follows the objects that had Events lately and a publish costs no scan. Two
/// (uid, reason) pairs of one digest would only replace each other's entry: a note is
/// held back only when its own digest matches as well.
#[derive(Default)]
struct Recent {
    last: HashMap<u64, (u64, Timestamp)>,
    swept: Option<Timestamp>,
}

fn digest(of: impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    of.hash(&mut hasher);
    hasher.finish()
}

impl Recent {
    /// Whether an Event with `note` about `uid` for `reason` should go out at `now`
    /// (recording it when it should).
    fn admit(&mut self, uid: &str, reason: &str, note: &str, now: Timestamp) -> bool {
        if self.swept.is_none_or(|at| now - REPEAT_AFTER >= at) {
            self.last.retain(|_, (_, at)| now - REPEAT_AFTER < *at);
            self.swept = Some(now);
        }
        let (key, note) = (digest((uid, reason)), digest(note));
        match self.last.get(&key) {
            Some((seen, at)) if *seen == note && now - REPEAT_AFTER < *at => false,
            _ => {
                self.last.insert(key, (note, now));
                true
            }
        }
    }
}

/// The Event for `regarding` (a note cut to the API's limit at a character boundary).
#[allow(clippy::too_many_arguments)]
pub fn event(
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
    controller: &str,
    instance: &str,
    now: Timestamp,
) -> Event {
    let mut cut = note.len().min(NOTE_LIMIT);
    while !note.is_char_boundary(cut) {
        cut -= 1;
    }
    Event {
        metadata: ObjectMeta {
            namespace: regarding.namespace.clone(),
            name: Some(format!(
                "{}.{:x}",
                regarding.name.as_deref().unwrap_or(controller),
                now.as_nanosecond()
            )),
            ..Default::default()
        },
        action: Some(action.into()),
        reason: Some(reason.into()),
        note: Some(note[..cut].into()),
        type_: Some(
            match type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(controller.into()),
        reporting_instance: Some(instance.into()),
        ..Default::default()
    }
}

impl Publisher {
    /// Publishes as `controller`, at most `in_flight` creates at once.
    pub fn new(client: Client, controller: &str, instance: Option<String>, in_flight: usize) -> Self {
        Publisher {
            client,
            controller: controller.into(),
            instance: instance.unwrap_or_else(|| controller.into()),
            recent: Mutex::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(in_flight)),
            dropped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Creates the Event in the background, unless the same note about the same object
    /// went out lately, or the limit of creates are in flight already.
    pub fn publish(&self, regarding: &ObjectReference, type_: EventType, reason: &str, action: &str, note: &str) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let dropped = self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    reason,
                    dropped,
                    "event dropped: the limit of creates are in flight already"
                );
            }
            return;
        };
        let Some(create) = self.admitted(regarding, type_, reason, action, note) else {
            return;
        };
        tokio::spawn(async move {
            match tokio::time::timeout(CREATE_TIMEOUT, create).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "publishing event failed"),
                Err(_) => tracing::warn!("publishing event timed out"),
            }
            drop(permit);
        });
    }

    /// Creates the Event and waits for the answer, unless the same note about the same
    /// object went out lately (not counted against the limit of creates in flight).
    pub async fn publish_now(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        match self.admitted(regarding, type_, reason, action, note) {
            Some(create) => create.await,
            None => Ok(()),
        }
    }

    /// The create of the Event, if it goes out.
    fn admitted(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Option<impl Future<Output = Result<(), kube::Error>> + Send + 'static> {
        let now = Timestamp::now();
        let uid = regarding.uid.as_deref().unwrap_or_default();
        if !self.recent.lock().expect("events lock").admit(uid, reason, note, now) {
            return None;
        }
        let event = event(
            regarding,
            type_,
            reason,
            action,
            note,
            &self.controller,
            &self.instance,
            now,
        );
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api = Api::<Event>::namespaced(self.client.clone(), namespace);
        Some(async move { api.create(&PostParams::default(), &event).await.map(|_| ()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn a_repeat_goes_out_only_when_it_says_something_new_or_is_old() {
        let mut recent = Recent::default();
        assert!(recent.admit("uid-1", "IssueFailed", "throttled", at(0)));
        assert!(
            !recent.admit("uid-1", "IssueFailed", "throttled", at(60)),
            "same note, soon"
        );
        assert!(recent.admit("uid-1", "IssueFailed", "denied", at(61)), "another note");
        assert!(
            recent.admit("uid-1", "CredentialsRefreshed", "denied", at(62)),
            "another reason"
        );
        assert!(recent.admit("uid-2", "IssueFailed", "denied", at(63)), "another object");
        assert!(!recent.admit("uid-1", "IssueFailed", "denied", at(600)));
        assert!(
            recent.admit("uid-1", "IssueFailed", "denied", at(61 + 600)),
            "ten minutes on"
        );
        // Old entries are swept: the map follows recent activity only.
        assert!(recent.admit("uid-3", "X", "n", at(5000)));
        assert_eq!(recent.last.len(), 1);
    }

    #[test]
    fn the_event_names_its_object_and_keeps_the_note_within_the_limit() {
        let regarding = ObjectReference {
            api_version: Some("kube-sts.io/v1alpha1".into()),
            kind: Some("AWSRoleBinding".into()),
            name: Some("reports".into()),
            namespace: Some("team-a".into()),
            uid: Some("uid-1".into()),
            ..Default::default()
        };
        let long = "é".repeat(600);
        let e = event(
            &regarding,
            EventType::Warning,
            "IssueFailed",
            "Reconcile",
            &long,
            "kube-sts",
            "pod-1",
            at(0),
        );
        assert_eq!(e.metadata.namespace.as_deref(), Some("team-a"));
        assert!(e.metadata.name.unwrap().starts_with("reports."));
        let note = e.note.unwrap();
        assert!(note.len() <= NOTE_LIMIT && note.chars().all(|c| c == 'é'));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reporting_instance.as_deref(), Some("pod-1"));
        assert_eq!(e.regarding.unwrap().uid.as_deref(), Some("uid-1"));
    }
}
