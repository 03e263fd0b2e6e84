//! The cache of managed Secrets, kept compact: each Secret is packed into one allocation
//! holding only what the operator reads back (its uid, resourceVersion, type, labels,
//! annotations, ownerReferences, the credential keys, and the renderings of them as digests,
//! `render::cached_data`), compressed against a sample managed Secret (`packing`), with an
//! index of the Secrets each binding controls. A reconcile gets a `Secret` unpacked from it.
//! Once a reconcile holds a Secret's credentials in the subject's state, it has the cache
//! drop them too ([`SecretCache::forget_credentials`]): the credentials are then kept once,
//! and the cached Secret is digests only. The watch's event of a version the operator wrote
//! itself ([`SecretCache::wrote`]) is cached that way at once, and is no news.
//!
//! Kept from the Secret watch's own events ([`SecretCache::apply`]): a listing (at the start,
//! after a watch gap, when the shards held change) fills a buffer that replaces the cache
//! and the index when it ends, so Secrets deleted during a gap, or of shards no longer held,
//! drop out; as with a reflector, the cache counts as ready once the first listing ended.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, LazyLock, RwLock},
};

use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::OwnerReference};
use kube::{ResourceExt, api::ObjectMeta, runtime::watcher};

use super::{
    caches::{LAST_APPLIED, controller_uid, key_of, object_key, split_object_key},
    packing::{Dictionary, Reader, Writer},
};
use crate::render;

/// The managed-Secret cache; clones share it.
#[derive(Clone)]
pub struct SecretCache {
    inner: Arc<RwLock<Inner>>,
    ready: Arc<tokio::sync::watch::Sender<bool>>,
}

#[derive(Default)]
struct Inner {
    /// By `namespace/name`.
    secrets: HashMap<Box<str>, Packed>,
    /// The Secrets each binding (by UID) controls, by key.
    by_owner: HashMap<Box<str>, HashSet<Box<str>>>,
    /// The Secrets a listing in progress has seen so far.
    listing: Option<HashMap<Box<str>, Packed>>,
    /// By key, the resourceVersion of the operator's own write whose watch event is still
    /// to come ([`SecretCache::wrote`]).
    echoes: HashMap<Box<str>, Box<str>>,
}

/// At most this many writes await their echo; beyond (echoes that never came, say the
/// Secret was written again first), they are all forgotten: their events then count as
/// news, which costs a reconcile each, nothing more.
const ECHOES: usize = 4096;

impl Default for SecretCache {
    fn default() -> Self {
        SecretCache {
            inner: Arc::default(),
            ready: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

impl SecretCache {
    /// Follows one event of the managed-Secret watch, and says whether it is news: the echo
    /// of the operator's own write ([`SecretCache::wrote`]) is cached like any version, its
    /// credentials as digests (the subject's state holds them), and is no news: it
    /// reconciles nothing.
    pub fn apply(&self, event: &watcher::Event<Secret>) -> bool {
        let echo = match event {
            watcher::Event::Apply(secret) => self.is_echo(secret),
            _ => false,
        };
        // Packed (digests computed) before the lock is taken: reconciles read meanwhile.
        let packed = match event {
            watcher::Event::Apply(secret) if echo => {
                let data = secret.data.as_ref().map(render::digested_data);
                Some((key_of(secret), Packed::encode(secret, data.as_ref())))
            }
            watcher::Event::InitApply(secret) | watcher::Event::Apply(secret) => {
                Some((key_of(secret), Packed::pack(secret)))
            }
            _ => None,
        };
        let mut inner = self.inner.write().expect("secret cache lock");
        match event {
            watcher::Event::Init => inner.listing = Some(HashMap::new()),
            watcher::Event::InitApply(_) => {
                if let (Some(listing), Some((key, packed))) = (inner.listing.as_mut(), packed) {
                    listing.insert(key, packed);
                }
            }
            watcher::Event::InitDone => {
                if let Some(listing) = inner.listing.take() {
                    inner.secrets.clear();
                    inner.by_owner.clear();
                    for (key, packed) in listing {
                        inner.insert(key, packed);
                    }
                }
                // A listing shows the writes' versions (or later ones): no echo comes.
                inner.echoes.clear();
                self.ready.send_replace(true);
            }
            watcher::Event::Apply(_) => {
                if let Some((key, packed)) = packed {
                    if echo {
                        inner.echoes.remove(&key);
                    }
                    inner.remove(&key);
                    inner.insert(key, packed);
                }
            }
            watcher::Event::Delete(secret) => {
                let key = key_of(secret);
                // Only the awaited echo of this very version: a Secret of the name written
                // since (deleted and created anew, its type changed) keeps its own.
                if inner.echoes.get(&key).map(|v| &**v) == secret.metadata.resource_version.as_deref() {
                    inner.echoes.remove(&key);
                }
                inner.remove(&key);
            }
        }
        !echo
    }

    /// Whether `secret` is the version an operator's write of it answered with.
    fn is_echo(&self, secret: &Secret) -> bool {
        let Some(version) = secret.resource_version() else {
            return false;
        };
        let inner = self.inner.read().expect("secret cache lock");
        inner.echoes.get(&key_of(secret)).is_some_and(|v| **v == *version)
    }

    /// Notes the operator's write of a Secret (its answer, holding the credentials the
    /// subject's state holds): the watch's event of that version is its echo. Not when the
    /// cache holds that version already (the watch was first).
    pub fn wrote(&self, secret: &Secret) {
        let (Some(version), key) = (secret.resource_version(), key_of(secret)) else {
            return;
        };
        let mut inner = self.inner.write().expect("secret cache lock");
        if inner.secrets.get(&key).and_then(Packed::resource_version) == Some(version.as_str()) {
            return;
        }
        if inner.echoes.len() >= ECHOES {
            inner.echoes.clear();
        }
        inner.echoes.insert(key, version.into_boxed_str());
    }

    /// The Secret `namespace/name` as cached.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Secret> {
        let inner = self.inner.read().expect("secret cache lock");
        inner
            .secrets
            .get(&object_key(namespace, name))
            .map(|p| p.unpack(namespace, name))
    }

    /// The cached Secrets whose controller is the binding with UID `owner`.
    pub fn owned_by(&self, owner: &str) -> Vec<Secret> {
        let inner = self.inner.read().expect("secret cache lock");
        let Some(keys) = inner.by_owner.get(owner) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|key| {
                let (namespace, name) = split_object_key(key);
                Some(inner.secrets.get(key)?.unpack(namespace, name))
            })
            .collect()
    }

    /// Drops the credentials from the cached Secret `namespace/name` while it is still at
    /// `resource_version` (its data then by digests only): the operator holds them itself
    /// (the subject's state), and keeps one copy. A newer version, or a listing, brings
    /// them back until the next reconcile takes them.
    pub fn forget_credentials(&self, namespace: &str, name: &str, resource_version: &str) {
        let key = object_key(namespace, name);
        let at_version = |p: &Packed| p.resource_version() == Some(resource_version);
        let Some(mut secret) = self
            .inner
            .read()
            .expect("secret cache lock")
            .secrets
            .get(&key)
            .filter(|p| at_version(p))
            .map(|p| p.unpack(namespace, name))
        else {
            return;
        };
        let Some(data) = secret.data.take().map(|data| (render::digested_data(&data), data)) else {
            return;
        };
        if data.0 == data.1 {
            return;
        }
        let packed = Packed::encode(&secret, Some(&data.0));
        let mut inner = self.inner.write().expect("secret cache lock");
        // Still that version (the watch may have moved on while this packed).
        if let Some(slot) = inner.secrets.get_mut(&key).filter(|p| at_version(p)) {
            *slot = packed;
        }
    }

    /// How many Secrets are cached.
    pub fn count(&self) -> usize {
        self.inner.read().expect("secret cache lock").secrets.len()
    }

    /// Returns once the first listing has ended.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|ready| *ready).await;
    }
}

impl Inner {
    fn insert(&mut self, key: Box<str>, packed: Packed) {
        if let Some(owner) = packed.controller_uid() {
            self.by_owner.entry(owner.into()).or_default().insert(key.clone());
        }
        self.secrets.insert(key, packed);
    }

    fn remove(&mut self, key: &str) {
        let Some(old) = self.secrets.remove(key) else {
            return;
        };
        if let Some(owner) = old.controller_uid()
            && let Some(keys) = self.by_owner.get_mut(owner)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.by_owner.remove(owner);
            }
        }
    }
}

/// One Secret in one allocation: the uid of the binding controlling it and its
/// resourceVersion in the clear (what the owner index and `forget_credentials` read, under
/// the cache's lock), then its ownerReferences, uid, type, labels, annotations and data
/// (renderings as digests), as length-prefixed fields compressed with
/// [`DICTIONARY`]. Its name and namespace are the cache's key. Everything else of the
/// object (managedFields, timestamps) the operator never reads.
struct Packed(Box<[u8]>);

/// A managed Secret as the operator renders one, its data as the cache keeps it after a
/// reconcile took the credentials (digests), in the packed fields' encoding.
static DICTIONARY: LazyLock<Dictionary> = LazyLock::new(|| {
    let credentials = render::Credentials {
        access_key_id: "ASIA0000000000000000".into(),
        secret_access_key: "0".repeat(40),
        session_token: "0".repeat(400),
        expiration: "2026-01-01T01:00:00Z".parse().expect("a timestamp"),
        issued_at: "2026-01-01T00:00:00Z".parse().expect("a timestamp"),
        arn: Some("arn:aws:sts::000000000000:assumed-role/app/team.app".into()),
        note: None,
        registries: Vec::new(),
    };
    let target = render::SecretTarget {
        namespace: "team".into(),
        name: "app-aws".into(),
        binding: "app".into(),
        binding_uid: "00000000-0000-0000-0000-000000000000".into(),
        service_account: "app".into(),
        spec_hash: "0000000000000000".into(),
        role_arn: Some("arn:aws:iam::000000000000:role/app".into()),
        region: None,
        profile: render::DEFAULT_PROFILE.into(),
        mount_path: render::DEFAULT_MOUNT_PATH.into(),
        secret_type: crate::crd::SecretType::default(),
        extra_labels: BTreeMap::new(),
        extra_annotations: BTreeMap::new(),
    };
    let mut secret = render::render_secret(&credentials, &target);
    secret.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
    secret.metadata.resource_version = Some("1000000".into());
    let data = secret.data.as_ref().map(render::digested_data);
    Dictionary::new(Packed::fields(&secret, data.as_ref()))
});

impl Packed {
    /// Packs a Secret read from the apiserver (its data as `render::cached_data` keeps it).
    fn pack(secret: &Secret) -> Packed {
        Packed::encode(secret, secret.data.as_ref().map(render::cached_data).as_ref())
    }

    /// Packs a Secret with `data` as it is given (already in the cache's form).
    fn encode(secret: &Secret, data: Option<&BTreeMap<String, ByteString>>) -> Packed {
        let meta = &secret.metadata;
        let mut out = Writer::default();
        out.opt_str(controller_uid(secret));
        out.opt_str(meta.resource_version.as_deref());
        out.0
            .extend_from_slice(&DICTIONARY.compress(&Packed::fields(secret, data)));
        Packed(out.0.into_boxed_slice())
    }

    /// The fields a Secret is cached by, uncompressed (its resourceVersion is the header's).
    fn fields(secret: &Secret, data: Option<&BTreeMap<String, ByteString>>) -> Vec<u8> {
        let mut out = Writer::default();
        let meta = &secret.metadata;
        out.opt_len(meta.owner_references.as_ref().map(Vec::len));
        for owner in meta.owner_references.iter().flatten() {
            out.str(&owner.uid);
            out.str(&owner.api_version);
            out.str(&owner.kind);
            out.str(&owner.name);
            out.opt_bool(owner.controller);
            out.opt_bool(owner.block_owner_deletion);
        }
        out.opt_str(meta.uid.as_deref());
        out.opt_str(secret.type_.as_deref());
        for map in [&meta.labels, &meta.annotations] {
            // Not the copy of the whole object a client-side `kubectl apply` keeps in an
            // annotation (it would cache the data in the clear).
            let kept: Option<Vec<_>> = map
                .as_ref()
                .map(|m| m.iter().filter(|(k, _)| k.as_str() != LAST_APPLIED).collect());
            out.opt_len(kept.as_ref().map(Vec::len));
            for (k, v) in kept.into_iter().flatten() {
                out.str(k);
                out.str(v);
            }
        }
        out.opt_len(data.map(BTreeMap::len));
        for (k, v) in data.into_iter().flatten() {
            out.str(k);
            out.bytes(&v.0);
        }
        out.0
    }

    /// The packed fields, decompressed (packed by this process, so intact).
    fn unpacked_fields(&self) -> Vec<u8> {
        let mut r = Reader(&self.0);
        let _controller = r.opt_str_ref();
        let _resource_version = r.opt_str_ref();
        DICTIONARY.decompress(r.0).expect("a packed Secret decompresses")
    }

    fn unpack(&self, namespace: &str, name: &str) -> Secret {
        let fields = self.unpacked_fields();
        let mut r = Reader(&fields);
        let owner_references = r.opt_len().map(|n| {
            (0..n)
                .map(|_| {
                    let owner = read_owner(&mut r);
                    OwnerReference {
                        api_version: owner.api_version.into(),
                        block_owner_deletion: owner.block_owner_deletion,
                        controller: owner.controller,
                        kind: owner.kind.into(),
                        name: owner.name.into(),
                        uid: owner.uid.into(),
                    }
                })
                .collect()
        });
        let uid = r.opt_str();
        let type_ = r.opt_str();
        let mut maps = [None, None];
        for map in &mut maps {
            *map = r
                .opt_len()
                .map(|n| (0..n).map(|_| (r.string(), r.string())).collect::<BTreeMap<_, _>>());
        }
        let [labels, annotations] = maps;
        let data = r
            .opt_len()
            .map(|n| (0..n).map(|_| (r.string(), ByteString(r.bytes().to_vec()))).collect());
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                uid,
                resource_version: self.resource_version().map(str::to_string),
                labels,
                annotations,
                owner_references,
                ..Default::default()
            },
            type_,
            data,
            ..Default::default()
        }
    }

    /// Its resourceVersion, read from the clear header.
    fn resource_version(&self) -> Option<&str> {
        let mut r = Reader(&self.0);
        let _controller = r.opt_str_ref();
        r.opt_str_ref()
    }

    /// The uid of the binding controlling the Secret (a controller ownerReference of kind
    /// `AWSRoleBinding`), read from the clear header.
    fn controller_uid(&self) -> Option<&str> {
        Reader(&self.0).opt_str_ref()
    }
}

/// One ownerReference as packed, borrowed from the packed bytes.
struct PackedOwner<'a> {
    uid: &'a str,
    api_version: &'a str,
    kind: &'a str,
    name: &'a str,
    controller: Option<bool>,
    block_owner_deletion: Option<bool>,
}

/// Reads one ownerReference, in the order [`Packed::fields`] writes them.
fn read_owner<'a>(r: &mut Reader<'a>) -> PackedOwner<'a> {
    let uid = r.str_ref();
    let api_version = r.str_ref();
    let kind = r.str_ref();
    let name = r.str_ref();
    let controller = r.opt_bool();
    let block_owner_deletion = r.opt_bool();
    PackedOwner {
        uid,
        api_version,
        kind,
        name,
        controller,
        block_owner_deletion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned_secret(name: &str, owner: &str) -> Secret {
        serde_json::from_value(serde_json::json!({"metadata": {
            "name": name, "namespace": "ns", "uid": format!("uid-of-{name}"),
            "ownerReferences": [{"apiVersion": "kube-sts.io/v1alpha1", "kind": "AWSRoleBinding",
                "name": "b", "uid": owner, "controller": true}],
        }}))
        .unwrap()
    }

    fn names(cache: &SecretCache, owner: &str) -> Vec<String> {
        let mut names: Vec<String> = cache.owned_by(owner).iter().map(ResourceExt::name_any).collect();
        names.sort();
        names
    }

    #[test]
    fn a_secret_unpacks_as_it_was_cached_with_renderings_as_digests() {
        let full: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "app", "namespace": "team-a", "uid": "u-1", "resourceVersion": "42",
                "creationTimestamp": "2026-11-26T09:00:00Z",
                "labels": {"app.kubernetes.io/managed-by": "kube-sts", "kube-sts.io/binding": "b"},
                "annotations": {"kube-sts.io/spec-hash": "abc", "ünïcode": "välue",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"AWS_SECRET_ACCESS_KEY\":\"c2VjcmV0\"}}"},
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "other"},
                    {"apiVersion": "kube-sts.io/v1alpha1", "kind": "AWSRoleBinding", "name": "b",
                     "uid": "owner-1", "controller": true, "blockOwnerDeletion": false},
                ],
                "managedFields": [{"manager": "kube-sts", "operation": "Apply"}],
            },
            "type": "kube-sts.io/aws-credentials",
            "data": {"AWS_ACCESS_KEY_ID": "QVNJQQ==", "config": "W2RlZmF1bHRdCg==", "empty": ""},
        }))
        .unwrap();
        let packed = Packed::pack(&full);
        assert_eq!(packed.controller_uid(), Some("owner-1"));
        assert_eq!(packed.resource_version(), Some("42"));
        let mut expected = full.clone();
        expected.metadata.creation_timestamp = None;
        expected.metadata.managed_fields = None;
        expected
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(LAST_APPLIED)
            .expect("the test Secret carries one");
        expected.data = full.data.as_ref().map(render::cached_data);
        assert_eq!(packed.unpack("team-a", "app"), expected);

        // Absent and empty stay apart; a Secret with nothing but a name round-trips too.
        let mut bare = Secret::default();
        bare.metadata.name = Some("x".into());
        bare.metadata.namespace = Some("ns".into());
        assert_eq!(Packed::pack(&bare).unpack("ns", "x"), bare);
        assert_eq!(Packed::pack(&bare).controller_uid(), None);
        assert_eq!(Packed::pack(&bare).resource_version(), None);
        bare.data = Some(BTreeMap::new());
        bare.metadata.labels = Some(BTreeMap::new());
        bare.metadata.owner_references = Some(vec![]);
        assert_eq!(Packed::pack(&bare).unpack("ns", "x"), bare);
        // Long values (lengths over one LEB128 byte).
        let mut long = bare.clone();
        long.metadata.annotations = Some([("k".to_string(), "v".repeat(70_000))].into());
        assert_eq!(Packed::pack(&long).unpack("ns", "x"), long);
    }

    #[test]
    fn credentials_are_dropped_only_from_the_version_they_were_taken_from() {
        let cache = SecretCache::default();
        let mut secret = owned_secret("app", "uid-1");
        secret.metadata.resource_version = Some("7".into());
        secret.data = Some(
            [
                ("AWS_ACCESS_KEY_ID".to_string(), ByteString(b"ASIAKEY".to_vec())),
                ("AWS_SESSION_TOKEN".to_string(), ByteString(b"token".to_vec())),
                ("config".to_string(), ByteString(b"[default]\n".to_vec())),
            ]
            .into(),
        );
        cache.apply(&watcher::Event::Apply(secret.clone()));
        let cached = |c: &SecretCache| c.get("ns", "app").unwrap();
        let in_clear = cached(&cache).data.unwrap();
        assert_eq!(in_clear["AWS_SESSION_TOKEN"].0, b"token");

        // Another version than the one held: nothing changes.
        cache.forget_credentials("ns", "app", "6");
        assert_eq!(cached(&cache).data.unwrap(), in_clear);
        cache.forget_credentials("ns", "absent", "7");

        cache.forget_credentials("ns", "app", "7");
        let digests = cached(&cache);
        assert_eq!(digests.data, secret.data.as_ref().map(render::digested_data));
        let packed = cache.inner.read().unwrap().secrets[&object_key("ns", "app")].unpacked_fields();
        assert!(!packed.windows(5).any(|w| w == b"token"), "not in the clear anywhere");
        // Everything else is as it was, the owner index too.
        let mut expected = secret.clone();
        expected.data = digests.data.clone();
        assert_eq!(digests, expected);
        assert_eq!(names(&cache, "uid-1"), ["app"]);

        // The next version (say, a new issue) comes with its credentials.
        secret.metadata.resource_version = Some("8".into());
        cache.apply(&watcher::Event::Apply(secret));
        assert_eq!(cached(&cache).data.unwrap(), in_clear);
    }

    #[test]
    fn the_echo_of_a_write_is_cached_without_credentials_and_is_no_news() {
        let at = |name: &str, version: &str| {
            let mut secret = owned_secret(name, "uid-1");
            secret.metadata.resource_version = Some(version.into());
            secret.data = Some([("AWS_SESSION_TOKEN".to_string(), ByteString(b"token".to_vec()))].into());
            secret
        };
        let data = |c: &SecretCache, name: &str| c.get("ns", name).and_then(|s| s.data);
        let digests = at("a", "1").data.as_ref().map(render::digested_data);
        let in_clear = at("a", "1").data.as_ref().map(render::cached_data);
        let cache = SecretCache::default();
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitDone);

        // A create's answer noted: nothing cached until the watch shows it, then as digests.
        cache.wrote(&at("a", "1"));
        assert!(cache.get("ns", "a").is_none(), "the cache follows the watch only");
        assert!(!cache.apply(&watcher::Event::Apply(at("a", "1"))));
        assert_eq!(data(&cache, "a"), digests);
        assert_eq!(names(&cache, "uid-1"), ["a"]);
        // Someone's edit after it is news, in the clear; so is the same version again.
        assert!(cache.apply(&watcher::Event::Apply(at("a", "2"))));
        assert_eq!(data(&cache, "a"), in_clear);
        assert!(cache.apply(&watcher::Event::Apply(at("a", "2"))));

        // A write answered with 4 while the watch still shows 2, then someone's 3 comes
        // first: 3 is news and cached; 4 is the echo.
        cache.wrote(&at("a", "4"));
        assert!(cache.apply(&watcher::Event::Apply(at("a", "3"))));
        assert!(!cache.apply(&watcher::Event::Apply(at("a", "4"))));
        assert_eq!(
            cache.get("ns", "a").and_then(|s| s.resource_version()).as_deref(),
            Some("4")
        );
        // The watch was first: nothing awaited, the next event of the version is news.
        assert!(cache.apply(&watcher::Event::Apply(at("b", "5"))));
        cache.wrote(&at("b", "5"));
        assert!(cache.apply(&watcher::Event::Apply(at("b", "5"))));
        // The delete of an older Secret of the name (its type changed: deleted, then
        // created anew) keeps the new one's echo awaited; the delete of the awaited version
        // itself, or a listing, ends it.
        cache.wrote(&at("b", "6"));
        assert!(cache.apply(&watcher::Event::Delete(at("b", "5"))));
        assert!(!cache.apply(&watcher::Event::Apply(at("b", "6"))));
        cache.wrote(&at("b", "8"));
        assert!(cache.apply(&watcher::Event::Delete(at("b", "8"))));
        assert!(cache.apply(&watcher::Event::Apply(at("b", "8"))));
        cache.wrote(&at("a", "7"));
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(at("a", "3")));
        assert!(cache.apply(&watcher::Event::InitDone));
        assert!(cache.apply(&watcher::Event::Apply(at("a", "7"))));
        assert!(cache.inner.read().unwrap().echoes.is_empty());
    }

    #[test]
    fn the_owner_index_follows_the_watch_and_each_listing_replaces_the_cache() {
        let cache = SecretCache::default();
        // The first listing: known at its end.
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(owned_secret("a", "uid-1")));
        cache.apply(&watcher::Event::InitApply(owned_secret("b", "uid-1")));
        assert_eq!(cache.count(), 0, "a listing counts at its end");
        assert!(!*cache.ready.borrow());
        cache.apply(&watcher::Event::InitDone);
        assert!(*cache.ready.borrow());
        assert_eq!(names(&cache, "uid-1"), ["a", "b"]);
        // Watch events: a new Secret, a delete, a Secret changing owner.
        cache.apply(&watcher::Event::Apply(owned_secret("c", "uid-2")));
        cache.apply(&watcher::Event::Delete(owned_secret("a", "uid-1")));
        assert_eq!(names(&cache, "uid-1"), ["b"]);
        assert_eq!(names(&cache, "uid-2"), ["c"]);
        cache.apply(&watcher::Event::Apply(owned_secret("b", "uid-2")));
        assert!(names(&cache, "uid-1").is_empty());
        assert_eq!(names(&cache, "uid-2"), ["b", "c"]);
        assert_eq!(cache.get("ns", "b").and_then(|s| s.uid()).as_deref(), Some("uid-of-b"));
        assert!(cache.get("ns", "a").is_none());
        // A listing after a gap replaces the cache: b was deleted meanwhile.
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(owned_secret("c", "uid-2")));
        assert_eq!(names(&cache, "uid-2"), ["b", "c"], "unchanged until the listing ends");
        cache.apply(&watcher::Event::InitDone);
        assert_eq!(names(&cache, "uid-2"), ["c"]);
        assert!(cache.get("ns", "b").is_none());
        assert_eq!(cache.count(), 1);
        let inner = cache.inner.read().unwrap();
        assert_eq!(inner.by_owner.len(), 1, "no empty entries left behind");
    }
}
