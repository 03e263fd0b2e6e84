//! The webhook's cache of AWSRoleBindings: the compact [`Binding`] of each, indexed by
//! namespace ([`Bindings`]), fed by a watch. An admission reads its own namespace only,
//! under a read lock, and copies nothing.

use std::{
    collections::HashMap,
    sync::{PoisonError, RwLock},
};

use kube::{ResourceExt, runtime::watcher};

use super::mutate::{Binding, Bindings};
use crate::crd::AWSRoleBinding;

#[derive(Debug)]
pub struct Cache {
    namespaces: RwLock<HashMap<String, Bindings>>,
    /// A relist under way (watcher `Init` until `InitDone`): what it has brought so far.
    relist: std::sync::Mutex<Option<HashMap<String, Bindings>>>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            namespaces: RwLock::default(),
            relist: std::sync::Mutex::default(),
            ready: tokio::sync::watch::Sender::new(false),
        }
    }
}

fn add(namespaces: &mut HashMap<String, Bindings>, binding: &AWSRoleBinding) {
    let namespace = binding.namespace().unwrap_or_default();
    namespaces
        .entry(namespace)
        .or_default()
        .insert(Binding::project(binding));
}

impl Cache {
    /// Applies one event of a watch of AWSRoleBindings.
    pub fn apply(&self, event: watcher::Event<AWSRoleBinding>) {
        let mut relist = self.relist.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Init => *relist = Some(HashMap::new()),
            watcher::Event::InitApply(binding) => add(relist.get_or_insert_default(), &binding),
            watcher::Event::InitDone => {
                let listed = relist.take().unwrap_or_default();
                *self.namespaces.write().unwrap_or_else(PoisonError::into_inner) = listed;
                self.ready.send_replace(true);
            }
            watcher::Event::Apply(binding) => {
                add(
                    &mut self.namespaces.write().unwrap_or_else(PoisonError::into_inner),
                    &binding,
                );
            }
            watcher::Event::Delete(binding) => {
                let namespace = binding.namespace().unwrap_or_default();
                let mut namespaces = self.namespaces.write().unwrap_or_else(PoisonError::into_inner);
                if let Some(bindings) = namespaces.get_mut(&namespace) {
                    bindings.remove(&binding.name_any());
                    if bindings.is_empty() {
                        namespaces.remove(&namespace);
                    }
                }
            }
        }
    }

    /// `read` of the bindings of `namespace` (none when it has none).
    pub fn read<R>(&self, namespace: &str, read: impl FnOnce(&Bindings) -> R) -> R {
        let namespaces = self.namespaces.read().unwrap_or_else(PoisonError::into_inner);
        let none = Bindings::default();
        read(namespaces.get(namespace).unwrap_or(&none))
    }

    /// Completes once the first list is complete.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives as long as `self`: this cannot fail while it is borrowed.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// The number of bindings cached, over all namespaces.
    pub fn len(&self) -> usize {
        let namespaces = self.namespaces.read().unwrap_or_else(PoisonError::into_inner);
        namespaces.values().map(Bindings::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn binding(namespace: &str, name: &str, subjects: &str) -> AWSRoleBinding {
        let mut b = crate::plan::tests::binding(&format!(
            "roleArn: arn:aws:iam::123456789012:role/r\nsubjects: {subjects}\n"
        ));
        b.metadata.name = Some(name.into());
        b.metadata.namespace = Some(namespace.into());
        b
    }

    fn names(cache: &Cache, namespace: &str) -> Vec<String> {
        let mut names = Vec::new();
        for name in ["reports", "billing", "audit"] {
            if cache.read(namespace, |b| b.get(name).is_some()) {
                names.push(name.to_string());
            }
        }
        names
    }

    #[test]
    fn events_keep_each_namespace_apart_and_a_relist_replaces_everything() {
        let cache = Cache::default();
        assert!(
            cache.wait_until_ready().now_or_never().is_none(),
            "not ready before a list"
        );
        cache.apply(watcher::Event::Init);
        cache.apply(watcher::Event::InitApply(binding("team-a", "reports", "[{name: app}]")));
        cache.apply(watcher::Event::InitApply(binding("team-b", "reports", "[{name: app}]")));
        assert!(cache.is_empty(), "a list counts once complete");
        cache.apply(watcher::Event::InitDone);
        assert!(cache.wait_until_ready().now_or_never().is_some());
        assert_eq!(cache.len(), 2);
        cache.apply(watcher::Event::Apply(binding("team-a", "billing", "[{name: app}]")));
        assert_eq!(names(&cache, "team-a"), ["reports", "billing"]);
        assert_eq!(names(&cache, "team-b"), ["reports"]);
        assert_eq!(names(&cache, "team-c"), Vec::<String>::new());
        cache.apply(watcher::Event::Delete(binding("team-b", "reports", "[]")));
        assert_eq!(names(&cache, "team-b"), Vec::<String>::new());
        assert_eq!(names(&cache, "team-a"), ["reports", "billing"]);

        // A relist (after a watch broke): what it does not bring is gone; until it is
        // complete, admissions read what was there.
        cache.apply(watcher::Event::Init);
        cache.apply(watcher::Event::InitApply(binding("team-a", "audit", "[{name: app}]")));
        assert_eq!(names(&cache, "team-a"), ["reports", "billing"]);
        cache.apply(watcher::Event::InitDone);
        assert_eq!(names(&cache, "team-a"), ["audit"]);
        assert_eq!(cache.len(), 1);
    }
}
