//! When each binding is next reconciled on its own: its earliest refresh, retry or recheck.
//!
//! Kept here rather than in kube-runtime's scheduler (a reconcile returns "await change"
//! to it), because nearly every binding always has one: the scheduler keeps two copies of
//! a reconcile request per entry in a delay queue and a map, this keeps one shared
//! `namespace/name` and the time. A binding has at most one wake-up here: each successful
//! reconcile replaces it with the one it computed (or removes it); a failed one keeps it
//! and is retried by the error policy through kube-runtime's scheduler (a rare case, so
//! left there). What is due is sent as an ordinary
//! reconcile request, so the controller's guarantees (one reconcile of a binding at a time,
//! a request during a reconcile runs after it) hold as for any other request.
//!
//! Times are monotonic (`tokio::time::Instant`), as kube-runtime's requeues were: a wake-up
//! is planned from STS's time when its reconcile runs, and a later correction of that time
//! moves only the wake-ups planned after it.

use std::collections::BTreeSet;

use tokio::{sync::Notify, time::Instant};

use super::*;

#[derive(Default)]
pub struct Wakeups {
    inner: Mutex<Planned>,
    changed: Notify,
}

/// The planned wake-ups, by binding and in time order (the two always hold the same set).
#[derive(Default)]
struct Planned {
    by_binding: HashMap<Arc<str>, Instant>,
    in_order: BTreeSet<(Instant, Arc<str>)>,
}

impl Planned {
    fn set(&mut self, key: &str, at: Option<Instant>) -> bool {
        let old = self.by_binding.get_key_value(key).map(|(k, at)| (k.clone(), *at));
        if let Some((k, old_at)) = &old {
            if Some(*old_at) == at {
                return false;
            }
            self.in_order.remove(&(*old_at, k.clone()));
        }
        let Some(at) = at else {
            self.by_binding.remove(key);
            return false;
        };
        let k = old.map_or_else(|| Arc::from(key), |(k, _)| k);
        let earliest = self.in_order.first().is_none_or(|(first, _)| at < *first);
        self.by_binding.insert(k.clone(), at);
        self.in_order.insert((at, k));
        earliest
    }

    /// Takes the wake-ups due at `now`; says when the next one is.
    fn take_due(&mut self, now: Instant) -> (Vec<Arc<str>>, Option<Instant>) {
        let mut due = Vec::new();
        while let Some((at, _)) = self.in_order.first() {
            if *at > now {
                return (due, Some(*at));
            }
            let (_, key) = self.in_order.pop_first().expect("not empty");
            self.by_binding.remove(&key);
            due.push(key);
        }
        (due, None)
    }

    fn retain(&mut self, keep: impl Fn(&str, &str) -> bool) {
        self.by_binding.retain(|key, _| {
            let (ns, name) = split_object_key(key);
            keep(ns, name)
        });
        let by_binding = &self.by_binding;
        self.in_order.retain(|(_, key)| by_binding.contains_key(key));
    }
}

impl Wakeups {
    /// Plans the binding's next reconcile in `after` (none: only on a change), replacing
    /// whatever was planned for it.
    pub(super) fn set(&self, namespace: &str, name: &str, after: Option<Duration>) {
        let at = after.map(|d| Instant::now() + d);
        if self
            .inner
            .lock()
            .expect("wakeups lock")
            .set(&object_key(namespace, name), at)
        {
            self.changed.notify_one();
        }
    }

    /// Forgets the wake-ups of the bindings `keep` refuses (deleted, or of shards given up).
    pub(super) fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        self.inner.lock().expect("wakeups lock").retain(keep);
    }

    pub(super) fn len(&self) -> usize {
        self.inner.lock().expect("wakeups lock").by_binding.len()
    }

    /// Sends each binding's reconcile request when its wake-up is due, until the requests
    /// are no longer received.
    pub(super) async fn run(self: Arc<Self>, requests: UnboundedSender<ObjectRef<CachedBinding>>) {
        loop {
            let (due, next) = self.inner.lock().expect("wakeups lock").take_due(Instant::now());
            for key in due {
                let (namespace, name) = split_object_key(&key);
                if requests.unbounded_send(ObjectRef::new(name).within(namespace)).is_err() {
                    return;
                }
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(p: &Planned) -> Vec<(u64, String)> {
        let start = p.in_order.first().map(|(at, _)| *at);
        assert_eq!(p.by_binding.len(), p.in_order.len(), "the map and the order agree");
        p.in_order
            .iter()
            .map(|(at, k)| {
                assert_eq!(p.by_binding.get(k), Some(at));
                ((*at - start.unwrap()).as_secs(), k.to_string())
            })
            .collect()
    }

    #[test]
    fn one_wakeup_per_binding_replaced_by_each_reconcile() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Planned::default();
        assert!(p.set("a/x", Some(t0 + s(10))), "the first is the earliest");
        assert!(!p.set("a/y", Some(t0 + s(20))), "a later one wakes nobody");
        assert!(p.set("b/x", Some(t0 + s(5))));
        assert_eq!(planned(&p), [(0, "b/x".into()), (5, "a/x".into()), (15, "a/y".into())]);
        // A reconcile replaces its binding's wake-up, earlier or later, or removes it.
        assert!(!p.set("b/x", Some(t0 + s(30))));
        assert!(p.set("a/y", Some(t0 + s(1))));
        assert!(!p.set("a/y", Some(t0 + s(1))), "the same time changes nothing");
        assert!(!p.set("a/x", None));
        assert!(!p.set("never/planned", None));
        assert_eq!(planned(&p), [(0, "a/y".into()), (29, "b/x".into())]);
        // Two at the same time are both kept.
        p.set("c/z", Some(t0 + s(30)));
        assert_eq!(planned(&p), [(0, "a/y".into()), (29, "b/x".into()), (29, "c/z".into())]);

        // What is due is taken (once), and the next time is told.
        let (due, next) = p.take_due(t0);
        assert!(due.is_empty());
        assert_eq!(next, Some(t0 + s(1)));
        let (due, next) = p.take_due(t0 + s(30));
        assert_eq!(
            due.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            ["a/y", "b/x", "c/z"]
        );
        assert_eq!(next, None);
        assert!(p.by_binding.is_empty() && p.in_order.is_empty());
    }

    #[test]
    fn forgets_the_bindings_refused() {
        let t0 = Instant::now();
        let mut p = Planned::default();
        for (i, k) in ["a/x", "a/y", "b/x"].into_iter().enumerate() {
            p.set(k, Some(t0 + Duration::from_secs(i as u64)));
        }
        p.retain(|ns, name| ns != "a" || name == "y");
        assert_eq!(planned(&p), [(0, "a/y".into()), (1, "b/x".into())]);
    }

    /// The next request sent; a hang (a wake-up never sent) fails instead of stalling.
    async fn next(
        rx: &mut futures::channel::mpsc::UnboundedReceiver<ObjectRef<CachedBinding>>,
    ) -> ObjectRef<CachedBinding> {
        let sent = tokio::time::timeout(Duration::from_secs(60), rx.next()).await;
        sent.expect("sent within a minute").expect("channel open")
    }

    #[tokio::test]
    async fn sends_a_reconcile_request_when_due() {
        let wakeups = Arc::new(Wakeups::default());
        let (tx, mut rx) = futures::channel::mpsc::unbounded();
        tokio::spawn(wakeups.clone().run(tx));
        let ms = Duration::from_millis;
        let hour = Duration::from_secs(3600);
        wakeups.set("team-a", "late", Some(hour));
        wakeups.set("team-a", "soon", Some(ms(20)));
        wakeups.set("team-a", "sooner", Some(ms(10)));
        wakeups.set("team-b", "dropped", Some(ms(1)));
        wakeups.retain(|ns, _| ns == "team-a");
        let first = next(&mut rx).await;
        assert_eq!(
            (first.name.as_str(), first.namespace.as_deref()),
            ("sooner", Some("team-a"))
        );
        assert_eq!(next(&mut rx).await.name, "soon");
        // Planned again, far earlier than the hour the sender now sleeps for: it wakes.
        wakeups.set("team-a", "late", Some(ms(1)));
        assert_eq!(next(&mut rx).await.name, "late");
        assert_eq!(wakeups.len(), 0);
    }
}
