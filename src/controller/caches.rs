//! The caches the reconciler reads from (labelled Secrets, kept compact in `secret_cache`;
//! the names of other Secrets and of ServiceAccounts, in `name_cache`; Namespace metadata,
//! grants), the indexes kept
//! beside them, and the watch plumbing that turns a touched object into reconcile requests.

use super::*;

/// The `namespace/name` key the Secret and name caches and the wake-ups keep objects by (neither a
/// namespace nor a name can hold a '/').
pub(super) fn object_key(namespace: &str, name: &str) -> Box<str> {
    format!("{namespace}/{name}").into_boxed_str()
}

/// The [`object_key`] of an object.
pub(super) fn key_of<K: ResourceExt>(object: &K) -> Box<str> {
    object_key(&object.namespace().unwrap_or_default(), &object.name_any())
}

/// The namespace and name of an [`object_key`].
pub(super) fn split_object_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

/// Caches the reconciler reads from: labelled Secrets, the names of the other Secrets and
/// of ServiceAccounts, metadata of Namespaces, and the grants.
#[derive(Clone)]
pub struct Stores {
    pub bindings: Store<CachedBinding>,
    /// Managed Secrets, compact, with the Secrets each binding controls.
    pub secrets: SecretCache,
    /// The names of the Secrets without the operator's label.
    pub unmanaged_secrets: NameCache,
    /// Which ServiceAccounts exist.
    pub service_accounts: NameCache,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub grants: Store<AWSRoleGrant>,
    /// Status this process wrote, by binding, until the binding cache shows the write.
    pub written_statuses: Arc<Mutex<WrittenStatuses>>,
}

/// The statuses this process wrote that the binding cache does not show yet, keyed by
/// binding. A reconcile triggered by the operator's own Secret write can see the binding
/// before its status write arrived; it starts from what was written (same
/// lastTransitionTimes) and so does not write the same status again. An entry goes as soon
/// as a version other than the one written from is cached; when that version is the one
/// the write answered with, the event is the write's echo, and reconciles nothing.
#[derive(Debug, Default)]
pub struct WrittenStatuses(pub(super) HashMap<(String, String), WrittenStatus>);

/// A status written: the binding's resourceVersion it was written from and the one the
/// write answered with.
#[derive(Debug)]
pub(super) struct WrittenStatus {
    pub(super) written_from: String,
    pub(super) answered: Option<String>,
    pub(super) status: AWSRoleBindingStatus,
}

pub(super) fn binding_key(binding: &AWSRoleBinding) -> (String, String) {
    (binding.namespace().unwrap_or_default(), binding.name_any())
}

impl WrittenStatuses {
    /// The binding's status as far as this process knows: what it wrote, while the cached
    /// binding is still the version it wrote from; else the cached status.
    pub(super) fn current(&self, binding: &AWSRoleBinding) -> Option<AWSRoleBindingStatus> {
        match self.0.get(&binding_key(binding)) {
            Some(written) if binding.resource_version().as_ref() == Some(&written.written_from) => {
                Some(written.status.clone())
            }
            _ => binding.status.clone(),
        }
    }

    /// Whether the version of the binding `key` the cache now shows is the one a status
    /// write answered with (its echo); forgets the write once the cache shows any version
    /// other than the one it was written from.
    pub(super) fn echo_of_write(&mut self, key: (String, String), resource_version: &str) -> bool {
        let Some(written) = self.0.get(&key).filter(|w| w.written_from != resource_version) else {
            return false;
        };
        let echo = written.answered.as_deref() == Some(resource_version);
        self.0.remove(&key);
        echo
    }
}

impl Stores {
    pub(super) async fn wait_ready(&self) {
        let _ = futures::join!(
            self.secrets.wait_until_ready(),
            self.unmanaged_secrets.wait_until_ready(),
            self.service_accounts.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.grants.wait_until_ready(),
        );
    }
}

pub(super) fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// Every Secret [`managed_selector`] does not select (those without the label too).
pub(super) fn unmanaged_selector() -> String {
    format!("{MANAGED_BY_LABEL}!={MANAGED_BY}")
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

pub(super) const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Whether an ownerReference (by its kind and controller flag) makes a binding the
/// Secret's controller: the one owner the operator acts for.
pub(super) fn is_binding_controller(kind: &str, controller: Option<bool>) -> bool {
    controller == Some(true) && kind == "AWSRoleBinding"
}

/// The uid of the binding controlling `secret`, if one does.
pub(super) fn controller_uid(secret: &Secret) -> Option<&str> {
    secret
        .owner_references()
        .iter()
        .find(|o| is_binding_controller(&o.kind, o.controller))
        .map(|o| o.uid.as_str())
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
/// Not the objects of the watch's first listing: the controller reconciles no binding before
/// every cache has listed, and then reconciles each one anyway (its own watch's listing);
/// asking for them all again would only queue a copy of every binding's request per watch.
pub(super) fn drive<K, S, M>(
    name: &'static str,
    stream: S,
    requests: UnboundedSender<ObjectRef<CachedBinding>>,
    affected: M,
) where
    K: Send + 'static,
    S: futures::Stream<Item = std::result::Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    M: Fn(K) -> Vec<ObjectRef<CachedBinding>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut listed = false;
        while let Some(event) = stream.next().await {
            let touched = match event {
                Ok(watcher::Event::Apply(object) | watcher::Event::Delete(object)) => object,
                Ok(watcher::Event::InitApply(object)) if listed => object,
                Ok(watcher::Event::InitDone) => {
                    listed = true;
                    continue;
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Err(e) => {
                    tracing::warn!(watch = name, error = %e, "watch failed; retrying with backoff");
                    continue;
                }
            };
            for binding in affected(touched) {
                if requests.unbounded_send(binding).is_err() {
                    return;
                }
            }
        }
    });
}

pub(super) fn bindings_where(
    store: &Store<CachedBinding>,
    keep: impl Fn(&CachedBinding) -> bool,
) -> Vec<ObjectRef<CachedBinding>> {
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
    fn written_status_stands_in_until_the_cache_shows_a_newer_version() {
        let mut binding =
            crate::plan::tests::binding("roleArn: arn:aws:iam::123456789012:role/r\nsubjects: [{name: app}]\n");
        binding.metadata.resource_version = Some("1".into());
        let written = AWSRoleBindingStatus {
            observed_generation: Some(1),
            ..Default::default()
        };
        let mut statuses = WrittenStatuses::default();
        let entry = |to: &str| WrittenStatus {
            written_from: "1".into(),
            answered: Some(to.into()),
            status: written.clone(),
        };
        statuses.0.insert(binding_key(&binding), entry("2"));
        // The cache still has version 1 (no status): what was written counts.
        assert_eq!(statuses.current(&binding), Some(written.clone()));
        assert!(!statuses.echo_of_write(binding_key(&binding), "1"));
        assert_eq!(statuses.0.len(), 1);
        // Version 2 arrived: the write's echo; the cached object counts, the entry is gone.
        binding.metadata.resource_version = Some("2".into());
        assert!(statuses.echo_of_write(binding_key(&binding), "2"));
        assert!(statuses.0.is_empty());
        assert_eq!(statuses.current(&binding), None);
        assert!(!statuses.echo_of_write(binding_key(&binding), "2"), "an echo once");
        // Someone else's write came first (version 3; the write answered with 4): news.
        statuses.0.insert(binding_key(&binding), entry("4"));
        assert!(!statuses.echo_of_write(binding_key(&binding), "3"));
        assert!(statuses.0.is_empty());
    }
}
