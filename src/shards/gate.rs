//! Between the shard Leases and the controller: which namespaces the caches hold, which
//! bindings may be reconciled now, and the watch streams filtered by both.
//!
//! A shard goes through `Pending` (Lease held, the caches relisting with it) → `Active`
//! (every namespaced watch has listed since: reconciles run) → `Draining` (being given up:
//! no new reconcile starts, the Lease is released once the running ones finished) → `Idle`.
//! A reconcile holds a read guard of its shard's lock for as long as it runs; giving the
//! shard up waits for the write lock. A shard whose Lease has not been renewed for
//! `renew_deadline` lets no reconcile start and cancels the running ones (their permits
//! report it revoked), before the Lease can lapse.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, stream::BoxStream};
use kube::runtime::watcher;
use tokio::{
    sync::{OwnedRwLockReadGuard, RwLock, mpsc, watch},
    time::Instant,
};

use super::shard_of;
use crate::metrics::Metrics;

/// The shards the caches are to hold; `version` changes with every change of the set.
#[derive(Debug, Clone, Default)]
pub struct Cached {
    pub version: u64,
    pub shards: Arc<Vec<bool>>,
}

/// Told to the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardEvent {
    /// The caches hold these shards completely now: reconcile their bindings.
    Active(Vec<u32>),
    /// These shards were released or lost: forget what is kept about their subjects.
    Dropped(Vec<u32>),
    /// Every watch has listed with the latest set of shards: the caches hold exactly them.
    Listed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Pending { version: u64 },
    Active,
    Draining,
}

struct Slot {
    state: State,
    lock: Arc<RwLock<()>>,
    /// Reconciles may run until then (last renewal + renew_deadline).
    valid_until: Option<Instant>,
    revoked: watch::Sender<bool>,
}

struct Inner {
    slots: Vec<Slot>,
    /// The version each registered watch last completed a listing at.
    synced: Vec<Option<u64>>,
    /// The last version every watch had listed at, as told.
    listed: Option<u64>,
}

pub struct Gate {
    inner: Mutex<Inner>,
    cached: watch::Sender<Cached>,
    events: mpsc::UnboundedSender<ShardEvent>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<ShardEvent>>>,
    metrics: Arc<Metrics>,
}

/// Leave to reconcile a binding; keep it for as long as the reconcile runs.
pub struct Permit {
    _running: OwnedRwLockReadGuard<()>,
    revoked: watch::Receiver<bool>,
}

impl Permit {
    /// Completes when the shard stopped being ours while the reconcile runs.
    pub async fn revoked(&mut self) {
        let _ = self.revoked.wait_for(|revoked| *revoked).await;
    }
}

impl Gate {
    pub fn new(shards: u32, metrics: Arc<Metrics>) -> Arc<Self> {
        let (events, receiver) = mpsc::unbounded_channel();
        let slots = (0..shards)
            .map(|_| Slot {
                state: State::Idle,
                lock: Arc::new(RwLock::new(())),
                valid_until: None,
                revoked: watch::channel(false).0,
            })
            .collect();
        metrics.set_shards_held(0);
        Arc::new(Gate {
            inner: Mutex::new(Inner {
                slots,
                synced: Vec::new(),
                listed: None,
            }),
            cached: watch::channel(Cached {
                version: 0,
                shards: Arc::new(vec![false; shards as usize]),
            })
            .0,
            events,
            receiver: Mutex::new(Some(receiver)),
            metrics,
        })
    }

    pub fn shards(&self) -> u32 {
        u32::try_from(self.lock().slots.len()).expect("shard count fits u32")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("gate lock")
    }

    /// A reconcile of a binding of `namespace` may start: its shard is active and renewed.
    pub fn enter(&self, namespace: &str) -> Option<Permit> {
        let inner = self.lock();
        let slot = &inner.slots[shard_of(namespace, inner.slots.len() as u32) as usize];
        let valid = slot.valid_until.is_some_and(|until| Instant::now() < until);
        if slot.state != State::Active || !valid || *slot.revoked.borrow() {
            return None;
        }
        let running = slot.lock.clone().try_read_owned().ok()?;
        Some(Permit {
            _running: running,
            revoked: slot.revoked.subscribe(),
        })
    }

    /// Whether this replica holds the shard of `namespace` (in any state but given up).
    pub fn holds(&self, namespace: &str) -> bool {
        let inner = self.lock();
        inner.slots[shard_of(namespace, inner.slots.len() as u32) as usize].state != State::Idle
    }

    /// The controller's end of the events (once).
    pub fn take_events(&self) -> Option<mpsc::UnboundedReceiver<ShardEvent>> {
        self.receiver.lock().expect("gate lock").take()
    }

    fn set_cached(&self, inner: &Inner) {
        let shards: Vec<bool> = inner.slots.iter().map(|s| s.state != State::Idle).collect();
        self.metrics
            .set_shards_held(shards.iter().filter(|held| **held).count() as i64);
        self.cached.send_modify(|cached| {
            cached.version += 1;
            cached.shards = Arc::new(shards);
        });
    }

    /// The Lease of `shard` was taken at `renewed_at`: cache it, reconcile it once cached.
    pub fn acquired(&self, shard: u32, renewed_at: Instant, renew_deadline: Duration) {
        let mut inner = self.lock();
        let version = self.cached.borrow().version + 1;
        let slot = &mut inner.slots[shard as usize];
        slot.state = State::Pending { version };
        slot.valid_until = Some(renewed_at + renew_deadline);
        slot.revoked = watch::channel(false).0;
        self.set_cached(&inner);
    }

    /// The Lease of `shard` was renewed at `renewed_at`. False when the renewal came too
    /// late: the shard's reconciles were cancelled at its deadline, and its cancellation
    /// signal stays set; the caller takes the shard afresh ([`Gate::dropped`], then
    /// [`Gate::acquired`]), else no reconcile of it would ever run again.
    #[must_use]
    pub fn renewed(&self, shard: u32, renewed_at: Instant, renew_deadline: Duration) -> bool {
        let mut inner = self.lock();
        let slot = &mut inner.slots[shard as usize];
        if *slot.revoked.borrow() {
            return false;
        }
        slot.valid_until = Some(renewed_at + renew_deadline);
        true
    }

    /// Stops starting reconciles of `shard` (it is being given up).
    pub fn drain(&self, shard: u32) {
        self.lock().slots[shard as usize].state = State::Draining;
    }

    /// Whether no reconcile of a draining `shard` runs any more.
    pub fn drained(&self, shard: u32) -> bool {
        let inner = self.lock();
        let slot = &inner.slots[shard as usize];
        slot.state == State::Draining && slot.lock.try_write().is_ok()
    }

    /// `shard` is no longer ours (released, or lost): cancel what still runs of it, drop it
    /// from the caches.
    pub fn dropped(&self, shard: u32) {
        let mut inner = self.lock();
        let slot = &mut inner.slots[shard as usize];
        if slot.state == State::Idle {
            return;
        }
        slot.state = State::Idle;
        slot.valid_until = None;
        slot.revoked.send_replace(true);
        self.set_cached(&inner);
        let _ = self.events.send(ShardEvent::Dropped(vec![shard]));
    }

    /// Cancels the running reconciles of every shard whose renewal deadline has passed
    /// (none can start any more: [`Gate::enter`] checks it too).
    pub fn enforce_deadlines(&self, now: Instant) {
        let inner = self.lock();
        for (i, slot) in inner.slots.iter().enumerate() {
            if slot.valid_until.is_some_and(|until| now >= until) && !*slot.revoked.borrow() {
                tracing::warn!(shard = i, "shard Lease not renewed in time; cancelling its reconciles");
                slot.revoked.send_replace(true);
            }
        }
    }

    /// Runs [`Gate::enforce_deadlines`] four times a second, for ever.
    pub async fn watchdog(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            self.enforce_deadlines(Instant::now());
        }
    }

    fn register_watch(&self) -> usize {
        let mut inner = self.lock();
        inner.synced.push(None);
        inner.synced.len() - 1
    }

    /// Watch `watch` completed a listing with the shard set of `version`: shards pending
    /// since then or earlier that every watch has listed become active.
    fn synced(&self, watch: usize, version: u64) {
        let mut inner = self.lock();
        inner.synced[watch] = Some(version);
        let Some(all) = inner.synced.iter().copied().min().flatten() else {
            return;
        };
        let mut activated = Vec::new();
        for (i, slot) in inner.slots.iter_mut().enumerate() {
            if let State::Pending { version } = slot.state
                && version <= all
            {
                slot.state = State::Active;
                activated.push(i as u32);
            }
        }
        if !activated.is_empty() {
            tracing::info!(shards = ?activated, "caches hold the newly acquired shards; reconciling them");
            let _ = self.events.send(ShardEvent::Active(activated));
        }
        if all == self.cached.borrow().version && inner.listed != Some(all) {
            inner.listed = Some(all);
            let _ = self.events.send(ShardEvent::Listed);
        }
    }
}

/// Which namespaces this process caches and reconciles: all, those of a name prefix, and/or
/// those of the shards it holds.
#[derive(Clone, Default)]
pub struct Scope {
    pub prefix: Option<String>,
    pub gate: Option<Arc<Gate>>,
}

type Event<K> = Result<watcher::Event<K>, watcher::Error>;

impl Scope {
    /// The events of the watch `make` builds, without the objects of namespaces out of
    /// scope (`namespace_of` tells an object's namespace), so they never reach a cache.
    /// Sharded, the watch starts over whenever the set of held shards changes, so the cache
    /// drops the shards given up and lists the ones taken.
    pub fn watch<K, S, F>(&self, make: F, namespace_of: fn(&K) -> String) -> BoxStream<'static, Event<K>>
    where
        K: Send + 'static,
        S: futures::Stream<Item = Event<K>> + Send + 'static,
        F: Fn() -> S + Send + 'static,
    {
        let prefix = self.prefix.clone();
        let keep = move |event: watcher::Event<K>, shards: &[bool]| -> Option<watcher::Event<K>> {
            let admits = |object: &K| {
                let namespace = namespace_of(object);
                prefix.as_deref().is_none_or(|p| namespace.starts_with(p))
                    && (shards.is_empty() || shards[shard_of(&namespace, shards.len() as u32) as usize])
            };
            match &event {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o) => {
                    admits(o).then_some(event)
                }
                watcher::Event::Init | watcher::Event::InitDone => Some(event),
            }
        };
        let Some(gate) = self.gate.clone() else {
            if self.prefix.is_none() {
                return make().boxed();
            }
            return make()
                .filter_map(move |event| futures::future::ready(event.map(|e| keep(e, &[])).transpose()))
                .boxed();
        };
        struct Restarting<K, F, Keep> {
            gate: Arc<Gate>,
            id: usize,
            cached: watch::Receiver<Cached>,
            make: F,
            keep: Keep,
            /// The running watch and the set it was started with.
            running: Option<(BoxStream<'static, Event<K>>, Cached)>,
            /// A listing completed at this version, reported at the next poll: by then the
            /// reflector downstream has swapped its cache for it.
            listed: Option<u64>,
        }
        let state = Restarting {
            id: gate.register_watch(),
            cached: gate.cached.subscribe(),
            gate,
            make,
            keep,
            running: None,
            listed: None,
        };
        futures::stream::unfold(state, |mut w| async move {
            if let Some(version) = w.listed.take() {
                w.gate.synced(w.id, version);
            }
            loop {
                let (stream, _) = match &mut w.running {
                    Some(running) => running,
                    None => w
                        .running
                        .insert(((w.make)().boxed(), w.cached.borrow_and_update().clone())),
                };
                let item = tokio::select! {
                    changed = w.cached.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                        // Start over with the new set: the reflector swaps its cache for the
                        // new listing when it completes.
                        w.running = None;
                        continue;
                    }
                    item = stream.next() => item,
                };
                let with = &w.running.as_ref().expect("running").1;
                match item {
                    None => return None,
                    Some(Ok(watcher::Event::InitDone)) => {
                        w.listed = Some(with.version);
                        return Some((Ok(watcher::Event::InitDone), w));
                    }
                    Some(Ok(event)) => {
                        if let Some(event) = (w.keep)(event, &with.shards) {
                            return Some((Ok(event), w));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), w)),
                }
            }
        })
        .boxed()
    }
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("prefix", &self.prefix)
            .field("shards", &self.gate.as_ref().map(|g| g.shards()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace_in(shard: u32, shards: u32) -> String {
        (0..)
            .map(|i| format!("ns-{i}"))
            .find(|n| shard_of(n, shards) == shard)
            .unwrap()
    }

    #[tokio::test]
    async fn a_shard_is_reconciled_only_once_every_watch_listed_it() {
        let gate = Gate::new(2, Arc::new(Metrics::default()));
        let (a, b) = (gate.register_watch(), gate.register_watch());
        let mut events = gate.take_events().unwrap();
        let ns = namespace_in(1, 2);
        assert!(!gate.holds(&ns));
        gate.acquired(1, Instant::now(), Duration::from_secs(10));
        assert!(gate.enter(&ns).is_none(), "pending: caches not listed yet");
        assert!(gate.holds(&ns), "held, not yet active");
        let version = gate.cached.borrow().version;
        assert!(gate.cached.borrow().shards[1]);
        gate.synced(a, version);
        assert!(gate.enter(&ns).is_none(), "one watch of two listed");
        gate.synced(b, version - 1);
        assert!(gate.enter(&ns).is_none(), "a listing from before the acquisition");
        gate.synced(b, version);
        assert!(gate.enter(&ns).is_some());
        assert_eq!(events.try_recv().unwrap(), ShardEvent::Active(vec![1]));
        assert_eq!(events.try_recv().unwrap(), ShardEvent::Listed);
        assert!(gate.enter(&namespace_in(0, 2)).is_none(), "shard 0 is not ours");
    }

    #[tokio::test]
    async fn draining_waits_for_running_reconciles_and_lets_none_start() {
        let gate = Gate::new(1, Arc::new(Metrics::default()));
        let w = gate.register_watch();
        gate.acquired(0, Instant::now(), Duration::from_secs(10));
        gate.synced(w, gate.cached.borrow().version);
        let running = gate.enter("team-a").unwrap();
        gate.drain(0);
        assert!(gate.enter("team-a").is_none());
        assert!(!gate.drained(0), "a reconcile still runs");
        assert!(gate.holds("team-a"), "held while draining");
        drop(running);
        assert!(gate.drained(0));
        gate.dropped(0);
        assert!(!gate.cached.borrow().shards[0]);
        assert!(!gate.holds("team-a"));
        assert!(gate.enter("team-a").is_none());
    }

    #[tokio::test]
    async fn a_missed_renewal_deadline_cancels_running_reconciles() {
        let gate = Gate::new(1, Arc::new(Metrics::default()));
        let w = gate.register_watch();
        let start = Instant::now();
        gate.acquired(0, start, Duration::from_secs(10));
        gate.synced(w, gate.cached.borrow().version);
        let mut running = gate.enter("team-a").unwrap();
        gate.enforce_deadlines(start + Duration::from_secs(9));
        assert!(!*running.revoked.borrow());
        gate.enforce_deadlines(start + Duration::from_secs(10));
        tokio::time::timeout(Duration::from_secs(1), running.revoked())
            .await
            .expect("revoked");
        // A renewal answered after the deadline does not revive the shard: it is taken
        // afresh (dropped, acquired, listed again).
        assert!(!gate.renewed(0, start + Duration::from_secs(8), Duration::from_secs(10)));
        assert!(gate.enter("team-a").is_none());
        // A lost shard cancels too, and a new acquisition starts with a fresh signal.
        gate.acquired(0, Instant::now(), Duration::from_secs(10));
        gate.synced(w, gate.cached.borrow().version);
        let mut again = gate.enter("team-a").unwrap();
        assert!(!*again.revoked.borrow());
        gate.dropped(0);
        tokio::time::timeout(Duration::from_secs(1), again.revoked())
            .await
            .expect("revoked");
    }

    #[tokio::test]
    async fn watches_drop_other_shards_and_restart_when_the_set_changes() {
        use futures::channel::mpsc as fmpsc;
        let gate = Gate::new(2, Arc::new(Metrics::default()));
        let scope = Scope {
            prefix: Some("ns-".into()),
            gate: Some(gate.clone()),
        };
        let (ours, theirs) = (namespace_in(0, 2), namespace_in(1, 2));
        let senders: Arc<Mutex<Vec<fmpsc::UnboundedSender<Event<String>>>>> = Arc::default();
        let made = senders.clone();
        let mut stream = scope.watch(
            move || {
                let (tx, rx) = fmpsc::unbounded();
                made.lock().unwrap().push(tx);
                rx
            },
            |s: &String| s.clone(),
        );
        let next = |stream: &mut BoxStream<'static, Event<String>>| {
            let mut stream = std::pin::pin!(stream);
            futures::FutureExt::now_or_never(stream.next())
                .flatten()
                .map(Result::unwrap)
        };
        assert!(next(&mut stream).is_none());
        let send = |i: usize, e: watcher::Event<String>| senders.lock().unwrap()[i].unbounded_send(Ok(e)).unwrap();
        send(0, watcher::Event::Init);
        send(0, watcher::Event::InitApply(ours.clone()));
        send(0, watcher::Event::InitDone);
        assert!(matches!(next(&mut stream), Some(watcher::Event::Init)));
        // Nothing held yet: nothing admitted.
        assert!(matches!(next(&mut stream), Some(watcher::Event::InitDone)));
        gate.acquired(0, Instant::now(), Duration::from_secs(10));
        assert!(next(&mut stream).is_none());
        assert_eq!(senders.lock().unwrap().len(), 2, "restarted");
        send(1, watcher::Event::Init);
        send(1, watcher::Event::InitApply(theirs.clone()));
        send(1, watcher::Event::InitApply(ours.clone()));
        send(1, watcher::Event::InitApply("other-0".into()));
        send(1, watcher::Event::InitDone);
        assert!(matches!(next(&mut stream), Some(watcher::Event::Init)));
        assert!(matches!(next(&mut stream), Some(watcher::Event::InitApply(n)) if n == ours));
        assert!(matches!(next(&mut stream), Some(watcher::Event::InitDone)));
        assert!(gate.enter(&ours).is_none(), "reported once the cache downstream has it");
        assert!(next(&mut stream).is_none());
        assert!(gate.enter(&ours).is_some(), "the only watch listed the shard");
        assert!(gate.enter(&theirs).is_none());
    }
}
