//! The caches the reconciler reads from (labelled Secrets, ServiceAccount and Namespace
//! metadata, grants), the indexes kept beside them, and the watch plumbing that turns a
//! touched object into reconcile requests.

use super::*;

/// Caches the reconciler reads from: only labelled Secrets, metadata of ServiceAccounts
/// and Namespaces, and the grants.
#[derive(Clone)]
pub struct Stores {
    pub bindings: Store<AWSRoleBinding>,
    pub secrets: Store<Secret>,
    pub service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub grants: Store<AWSRoleGrant>,
    /// Which cached Secrets each binding controls, kept up to date by the Secret watch.
    pub secret_owners: Arc<Mutex<SecretIndex>>,
    /// Status this process wrote, by binding, until the binding cache shows the write.
    pub written_statuses: Arc<Mutex<WrittenStatuses>>,
}

/// The statuses this process wrote that the binding cache does not show yet, keyed by
/// binding, each with the resourceVersion the binding had when it was written. A reconcile
/// triggered by the operator's own Secret write can see the binding before its status
/// write arrived; it starts from what was written (same lastTransitionTimes) and so does
/// not write the same status again. An entry goes as soon as a newer version is cached.
#[derive(Debug, Default)]
pub struct WrittenStatuses(pub(super) HashMap<(String, String), (String, AWSRoleBindingStatus)>);

pub(super) fn binding_key(binding: &AWSRoleBinding) -> (String, String) {
    (binding.namespace().unwrap_or_default(), binding.name_any())
}

impl WrittenStatuses {
    /// The binding's status as far as this process knows: what it wrote, while the cached
    /// binding is still the version it wrote from; else the cached status.
    pub(super) fn current(&self, binding: &AWSRoleBinding) -> Option<AWSRoleBindingStatus> {
        match self.0.get(&binding_key(binding)) {
            Some((version, status)) if binding.resource_version().as_ref() == Some(version) => Some(status.clone()),
            _ => binding.status.clone(),
        }
    }

    /// Forgets what the cache now shows (a version other than the one written from).
    pub(super) fn seen(&mut self, binding: &AWSRoleBinding) {
        let key = binding_key(binding);
        if self
            .0
            .get(&key)
            .is_some_and(|(version, _)| binding.resource_version().as_ref() != Some(version))
        {
            self.0.remove(&key);
        }
    }
}

/// The managed Secrets of each binding (by the binding's UID, from the Secret's controller
/// ownerReference), so a reconcile finds its own without scanning every cached Secret.
/// Kept from the Secret watch's own events ([`SecretIndex::apply`]), not from the cache:
/// during a listing the reflector fills a buffer that becomes the cache only at its end.
#[derive(Debug, Default)]
pub struct SecretIndex {
    by_owner: HashMap<String, std::collections::HashSet<ObjectRef<Secret>>>,
    owner_of: HashMap<ObjectRef<Secret>, String>,
    /// The owners seen so far by a listing in progress; the index at its end.
    listing: Option<HashMap<ObjectRef<Secret>, String>>,
}

impl SecretIndex {
    /// Follows one event of the managed-Secret watch. A listing (at the start, after a
    /// watch gap, when the shards held change) replaces the index when it ends, so Secrets
    /// deleted during a gap, or of shards no longer held, drop out.
    pub fn apply(&mut self, event: &watcher::Event<Secret>) {
        let at = |secret: &Secret| ObjectRef::new(&secret.name_any()).within(&secret.namespace().unwrap_or_default());
        match event {
            watcher::Event::Init => self.listing = Some(HashMap::new()),
            watcher::Event::InitApply(secret) => {
                if let (Some(listing), Some(owner)) = (self.listing.as_mut(), controller_uid(secret)) {
                    listing.insert(at(secret), owner);
                }
            }
            watcher::Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    self.by_owner.clear();
                    self.owner_of.clear();
                    for (secret, owner) in listing {
                        self.update(secret, Some(owner));
                    }
                }
            }
            watcher::Event::Apply(secret) => self.update(at(secret), controller_uid(secret)),
            watcher::Event::Delete(secret) => self.update(at(secret), None),
        }
    }

    /// Records the Secret `secret` as controlled by `owner` now (`None`: gone, or not ours).
    pub fn update(&mut self, secret: ObjectRef<Secret>, owner: Option<String>) {
        if let Some(old) = self.owner_of.remove(&secret)
            && let Some(set) = self.by_owner.get_mut(&old)
        {
            set.remove(&secret);
            if set.is_empty() {
                self.by_owner.remove(&old);
            }
        }
        if let Some(owner) = owner {
            self.by_owner.entry(owner.clone()).or_default().insert(secret.clone());
            self.owner_of.insert(secret, owner);
        }
    }

    pub fn owned_by(&self, owner: &str) -> Vec<ObjectRef<Secret>> {
        self.by_owner.get(owner).into_iter().flatten().cloned().collect()
    }
}

pub(super) fn controller_uid(secret: &Secret) -> Option<String> {
    secret
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "AWSRoleBinding")
        .map(|o| o.uid.clone())
}

impl Stores {
    pub(super) async fn wait_ready(&self) {
        let _ = futures::join!(
            self.secrets.wait_until_ready(),
            self.service_accounts.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.grants.wait_until_ready(),
        );
    }
}

pub(super) fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

pub(super) fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The caches keep no managedFields (the operator never reads them, and they are often the
/// largest part of an object's metadata), nor the copy of the whole object that a
/// client-side `kubectl apply` keeps in an annotation.
pub(super) fn strip_managed_fields<K: ResourceExt>(object: &mut K) {
    object.managed_fields_mut().clear();
    object.annotations_mut().remove(LAST_APPLIED);
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A managed Secret as cached: each credential once, the renderings of it as digests
/// (`render::cached_data`).
pub(super) fn trim_secret(secret: &mut Secret) {
    strip_managed_fields(secret);
    if let Some(data) = &mut secret.data {
        *data = render::cached_data(data);
    }
}

/// What is cached of a ServiceAccount: that it exists.
pub(super) fn trim_service_account(sa: &mut PartialObjectMeta<ServiceAccount>) {
    let kept = kube::api::ObjectMeta {
        name: sa.metadata.name.take(),
        namespace: sa.metadata.namespace.take(),
        uid: sa.metadata.uid.take(),
        resource_version: sa.metadata.resource_version.take(),
        ..Default::default()
    };
    sa.metadata = kept;
}

/// What is cached of a Namespace: its name and labels (grants select on them).
pub(super) fn trim_namespace(namespace: &mut PartialObjectMeta<Namespace>) {
    let kept = kube::api::ObjectMeta {
        name: namespace.metadata.name.take(),
        uid: namespace.metadata.uid.take(),
        resource_version: namespace.metadata.resource_version.take(),
        labels: namespace.metadata.labels.take(),
        ..Default::default()
    };
    namespace.metadata = kept;
}

/// Drives a reflector in a task of its own (so its cache fills whatever the controller is
/// doing) and turns every touched object into reconcile requests for the bindings it affects.
pub(super) fn drive<K, S, M>(
    name: &'static str,
    stream: S,
    requests: UnboundedSender<ObjectRef<AWSRoleBinding>>,
    affected: M,
) where
    K: Send + 'static,
    S: futures::Stream<Item = std::result::Result<K, watcher::Error>> + Send + 'static,
    M: Fn(K) -> Vec<ObjectRef<AWSRoleBinding>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(object) => {
                    for binding in affected(object) {
                        if requests.unbounded_send(binding).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => tracing::warn!(watch = name, error = %e, "watch failed; retrying with backoff"),
            }
        }
    });
}

pub(super) fn bindings_where(
    store: &Store<AWSRoleBinding>,
    keep: impl Fn(&AWSRoleBinding) -> bool,
) -> Vec<ObjectRef<AWSRoleBinding>> {
    store
        .state()
        .into_iter()
        .filter(|b| keep(b))
        .map(|b| ObjectRef::from(b.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_index_follows_owner_changes_and_deletes() {
        let mut index = SecretIndex::default();
        let a = ObjectRef::<Secret>::new("a").within("ns");
        let b = ObjectRef::<Secret>::new("b").within("ns");
        index.update(a.clone(), Some("uid-1".into()));
        index.update(b.clone(), Some("uid-1".into()));
        let mut owned = index.owned_by("uid-1");
        owned.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(owned, [a.clone(), b.clone()]);
        index.update(a.clone(), Some("uid-2".into()));
        assert_eq!(index.owned_by("uid-1").len(), 1);
        assert_eq!(index.owned_by("uid-1")[0], b);
        assert_eq!(index.owned_by("uid-2")[0], a);
        index.update(b, None);
        index.update(a, None);
        assert!(index.owned_by("uid-1").is_empty() && index.owned_by("uid-2").is_empty());
        assert!(index.by_owner.is_empty() && index.owner_of.is_empty());
    }

    fn owned_secret(name: &str, owner: &str) -> Secret {
        serde_json::from_value(serde_json::json!({"metadata": {
            "name": name, "namespace": "ns",
            "ownerReferences": [{"apiVersion": "kube-sts.io/v1alpha1", "kind": "AWSRoleBinding",
                "name": "b", "uid": owner, "controller": true}],
        }}))
        .unwrap()
    }

    #[test]
    fn secret_index_is_built_from_the_watch_events_and_replaced_by_each_listing() {
        let mut index = SecretIndex::default();
        let names = |index: &SecretIndex, owner: &str| {
            let mut names: Vec<String> = index.owned_by(owner).into_iter().map(|r| r.name).collect();
            names.sort();
            names
        };
        // The first listing: known at its end (the cache is filled then too).
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(owned_secret("a", "uid-1")));
        index.apply(&watcher::Event::InitApply(owned_secret("b", "uid-1")));
        index.apply(&watcher::Event::InitDone);
        assert_eq!(names(&index, "uid-1"), ["a", "b"]);
        // Watch events.
        index.apply(&watcher::Event::Apply(owned_secret("c", "uid-2")));
        index.apply(&watcher::Event::Delete(owned_secret("a", "uid-1")));
        assert_eq!(names(&index, "uid-1"), ["b"]);
        assert_eq!(names(&index, "uid-2"), ["c"]);
        // A listing after a gap replaces the index: b was deleted meanwhile.
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(owned_secret("c", "uid-2")));
        assert_eq!(names(&index, "uid-1"), ["b"], "unchanged until the listing ends");
        index.apply(&watcher::Event::InitDone);
        assert!(names(&index, "uid-1").is_empty());
        assert_eq!(names(&index, "uid-2"), ["c"]);
    }

    #[test]
    fn written_status_stands_in_until_the_cache_shows_a_newer_version() {
        let mut binding =
            crate::plan::tests::binding("roleArn: arn:aws:iam::123456789012:role/r\nsubjects: [{name: app}]\n");
        binding.metadata.resource_version = Some("1".into());
        let written = AWSRoleBindingStatus {
            observed_generation: Some(1),
            ..Default::default()
        };
        let mut statuses = WrittenStatuses::default();
        statuses.0.insert(binding_key(&binding), ("1".into(), written.clone()));
        // The cache still has version 1 (no status): what was written counts.
        assert_eq!(statuses.current(&binding), Some(written.clone()));
        statuses.seen(&binding);
        assert_eq!(statuses.0.len(), 1);
        // Version 2 arrived: the cached object counts, the entry is gone.
        binding.metadata.resource_version = Some("2".into());
        statuses.seen(&binding);
        assert!(statuses.0.is_empty());
        assert_eq!(statuses.current(&binding), None);
    }
}
