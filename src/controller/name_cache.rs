//! Which objects of a kind exist, by `namespace/name`, and nothing else about them: what the
//! operator needs of ServiceAccounts (a subject whose ServiceAccount is gone loses its
//! Secret) and of the Secrets it does not manage (one of a subject's Secret name is a
//! conflict, read from the API to tell). A reflector's store would keep each one's
//! metadata, an `ObjectRef` key and an `Arc`, several hundred bytes per object; a name is
//! a few dozen.
//!
//! Kept from the watch's own events ([`NameCache::apply`]) as the Secret cache is: a listing
//! fills a buffer that replaces the set when it ends (objects deleted during a watch gap, or
//! of shards no longer held, drop out), and the cache counts as ready once the first listing
//! ended.

use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
};

use kube::{ResourceExt, runtime::watcher};

use super::caches::{key_of, object_key};

/// The names of the objects a watch shows; clones share them.
#[derive(Clone)]
pub struct NameCache {
    inner: Arc<RwLock<Inner>>,
    ready: Arc<tokio::sync::watch::Sender<bool>>,
}

#[derive(Default)]
struct Inner {
    names: HashSet<Box<str>>,
    /// What a listing in progress has seen so far.
    listing: Option<HashSet<Box<str>>>,
}

impl Default for NameCache {
    fn default() -> Self {
        NameCache {
            inner: Arc::default(),
            ready: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

impl NameCache {
    /// Follows one event of the watch.
    pub fn apply<K: ResourceExt>(&self, event: &watcher::Event<K>) {
        let mut inner = self.inner.write().expect("name cache lock");
        match event {
            watcher::Event::Init => inner.listing = Some(HashSet::new()),
            watcher::Event::InitApply(object) => {
                if let Some(listing) = inner.listing.as_mut() {
                    listing.insert(key_of(object));
                }
            }
            watcher::Event::InitDone => {
                if let Some(listing) = inner.listing.take() {
                    inner.names = listing;
                }
                self.ready.send_replace(true);
            }
            watcher::Event::Apply(object) => {
                inner.names.insert(key_of(object));
            }
            watcher::Event::Delete(object) => {
                inner.names.remove(&key_of(object));
            }
        }
    }

    /// Whether `namespace/name` exists.
    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        let inner = self.inner.read().expect("name cache lock");
        inner.names.contains(&object_key(namespace, name))
    }

    /// How many objects exist.
    pub fn count(&self) -> usize {
        self.inner.read().expect("name cache lock").names.len()
    }

    /// Returns once the first listing has ended.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|ready| *ready).await;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::core::PartialObjectMeta;

    use super::*;

    type Event = watcher::Event<PartialObjectMeta<ServiceAccount>>;

    fn sa(name: &str) -> PartialObjectMeta<ServiceAccount> {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": "ns"}})).unwrap()
    }

    #[test]
    fn names_follow_the_watch_and_each_listing_replaces_them() {
        let cache = NameCache::default();
        cache.apply(&Event::Init);
        cache.apply(&Event::InitApply(sa("a")));
        cache.apply(&Event::InitApply(sa("b")));
        assert!(!cache.contains("ns", "a"), "a listing counts at its end");
        assert!(!*cache.ready.borrow());
        cache.apply(&Event::InitDone);
        assert!(*cache.ready.borrow());
        assert!(cache.contains("ns", "a") && cache.contains("ns", "b"));
        assert!(!cache.contains("other", "a"));
        cache.apply(&Event::Apply(sa("c")));
        cache.apply(&Event::Delete(sa("a")));
        assert!(!cache.contains("ns", "a") && cache.contains("ns", "c"));
        assert_eq!(cache.count(), 2);
        // A listing after a gap: c was deleted meanwhile.
        cache.apply(&Event::Init);
        cache.apply(&Event::InitApply(sa("b")));
        assert!(cache.contains("ns", "c"), "unchanged until the listing ends");
        cache.apply(&Event::InitDone);
        assert!(!cache.contains("ns", "c"));
        assert_eq!(cache.count(), 1);
    }
}
