//! What the controller's cache keeps of each AWSRoleBinding. kube-runtime's controller keys
//! its store, its queue and its schedule on the object's name and namespace; a reconcile
//! reads the whole binding. So the cached object is its name and namespace (all that its
//! `ObjectMeta` holds, which also keeps the controller's object references free of uid and
//! resourceVersion copies), its resourceVersion (to tell when the cache shows a status this
//! process wrote, `WrittenStatuses`), its subjects' names (to find the bindings a
//! ServiceAccount affects without unpacking), and the binding itself as compact JSON
//! (managedFields and kubectl's last-applied copy dropped) compressed against a sample
//! binding (`packing`), unpacked by each reconcile.

use std::{borrow::Cow, sync::LazyLock};

use kube::api::ObjectMeta;
use serde::{Deserialize, Deserializer};

use super::{packing::Dictionary, *};

#[derive(Clone, Debug)]
pub struct CachedBinding {
    /// Name and namespace only.
    metadata: ObjectMeta,
    resource_version: Box<str>,
    subjects: Box<[Box<str>]>,
    /// The binding's JSON, compressed with [`DICTIONARY`].
    packed: Box<[u8]>,
}

/// A binding as a team writes one and as the operator reports on it, encoded as the cache
/// encodes bindings (the field order of the types).
static DICTIONARY: LazyLock<Dictionary> = LazyLock::new(|| {
    let sample: AWSRoleBinding = serde_json::from_value(json!({
        "apiVersion": "kube-sts.io/v1alpha1", "kind": "AWSRoleBinding",
        "metadata": {"creationTimestamp": "2026-01-01T00:00:00Z", "generation": 1, "name": "app",
            "namespace": "team", "resourceVersion": "1000000", "uid": "00000000-0000-0000-0000-000000000000",
            "labels": {"app.kubernetes.io/name": "app"}},
        "spec": {"method": "AssumeRole", "roleArn": "arn:aws:iam::000000000000:role/app",
            "subjects": [{"kind": "ServiceAccount", "name": "app"}], "durationSeconds": 3600,
            "secret": {"name": "app-aws"}},
        "status": {"observedGeneration": 1, "expiration": "2026-01-01T01:00:00Z",
            "nextRefreshTime": "2026-01-01T00:45:00Z",
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "CredentialsIssued",
                 "message": "credentials issued for 1 subject(s)", "observedGeneration": 1,
                 "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "",
                 "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "subjects": [{"name": "app", "secretName": "app-aws", "accessKeyId": "ASIA0000000000000000",
                "arn": "arn:aws:sts::000000000000:assumed-role/app/team.app",
                "issuedAt": "2026-01-01T00:00:00Z", "expiration": "2026-01-01T01:00:00Z",
                "nextRefreshTime": "2026-01-01T00:45:00Z", "consecutiveFailures": 0, "message": ""}]},
    }))
    .expect("the sample binding decodes");
    Dictionary::new(serde_json::to_vec(&sample).expect("a binding encodes"))
});

impl CachedBinding {
    pub fn pack(mut binding: AWSRoleBinding) -> Self {
        strip_managed_fields(&mut binding);
        let metadata = ObjectMeta {
            name: binding.metadata.name.clone(),
            namespace: binding.metadata.namespace.clone(),
            ..Default::default()
        };
        Self {
            metadata,
            resource_version: binding.resource_version().unwrap_or_default().into(),
            subjects: binding.spec.subjects.iter().map(|s| s.name.as_str().into()).collect(),
            // A value decoded from JSON encodes again: its maps have string keys.
            packed: DICTIONARY.compress(&serde_json::to_vec(&binding).expect("a decoded binding encodes")),
        }
    }

    /// The binding as the apiserver sent it (without managedFields and kubectl's
    /// last-applied copy).
    pub fn binding(&self) -> Result<AWSRoleBinding> {
        let json = DICTIONARY.decompress(&self.packed).map_err(Error::Cache)?;
        serde_json::from_slice(&json).map_err(|e| Error::Cache(e.to_string()))
    }

    pub fn resource_version(&self) -> &str {
        &self.resource_version
    }

    /// Whether one of the binding's subjects is the ServiceAccount `name`.
    pub fn has_subject(&self, name: &str) -> bool {
        self.subjects.iter().any(|s| &**s == name)
    }

    /// The binding's `(namespace, name)`.
    pub fn key(&self) -> (String, String) {
        (self.namespace().unwrap_or_default(), self.name_any())
    }
}

impl<'de> Deserialize<'de> for CachedBinding {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        AWSRoleBinding::deserialize(deserializer).map(Self::pack)
    }
}

impl Resource for CachedBinding {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        AWSRoleBinding::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        AWSRoleBinding::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        AWSRoleBinding::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        AWSRoleBinding::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The watch's events with each binding packed.
pub(super) fn packed(event: watcher::Event<AWSRoleBinding>) -> watcher::Event<CachedBinding> {
    match event {
        watcher::Event::Apply(b) => watcher::Event::Apply(CachedBinding::pack(b)),
        watcher::Event::Delete(b) => watcher::Event::Delete(CachedBinding::pack(b)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(b) => watcher::Event::InitApply(CachedBinding::pack(b)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_binding_unpacks_to_what_was_cached_of_it() {
        let spec = "roleArn: arn:aws:iam::123456789012:role/r
subjects: [{name: app}, {name: worker}]
method: AssumeRoleWithWebIdentity
durationSeconds: 3600
refreshBeforeSeconds: 600
sessionName: s
externalIdSecretRef: {name: ext, key: id}
sessionPolicy: '{\"Version\":\"2012-10-17\"}'
policyArns: [arn:aws:iam::aws:policy/ReadOnlyAccess]
sessionTags: {team: a}
transitiveTagKeys: [team]
sourceIdentity: me
chain: [{roleArn: 'arn:aws:iam::123456789012:role/next', externalId: x}]
webIdentity: {audience: sts.amazonaws.com, tokenExpirationSeconds: 900}
region: eu-west-1
secret: {name: creds, type: DockerConfigJson, profile: p, mountPath: /aws, labels: {l: v}, annotations: {a: b}}
ecr: {registryIds: ['123456789012']}
";
        let mut binding = crate::plan::tests::binding(spec);
        binding.metadata.resource_version = Some("42".into());
        binding.metadata.uid = Some("uid-1".into());
        binding.metadata.generation = Some(3);
        binding.metadata.labels = Some([("team".to_string(), "a".to_string())].into());
        binding.metadata.annotations = Some(
            [
                (LAST_APPLIED.to_string(), "{...}".to_string()),
                ("note".to_string(), "kept".to_string()),
            ]
            .into(),
        );
        binding.metadata.managed_fields = Some(vec![Default::default()]);
        let status = AWSRoleBindingStatus {
            observed_generation: Some(3),
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: READY.into(),
                status: "True".into(),
                reason: "CredentialsIssued".into(),
                message: "ok".into(),
                last_transition_time: Time("2026-11-30T01:00:00Z".parse().unwrap()),
                observed_generation: Some(3),
            }],
            subjects: vec![SubjectStatus {
                name: "app".into(),
                secret_name: Some("creds".into()),
                expiration: Some(Time("2026-11-30T02:00:00Z".parse().unwrap())),
                consecutive_failures: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        binding.status = Some(status);

        let cached = CachedBinding::pack(binding.clone());
        let mut expected = binding;
        strip_managed_fields(&mut expected);
        assert_eq!(cached.binding().unwrap(), expected);
        // The store and the schedule key on name and namespace; nothing else is in them.
        assert_eq!(
            cached.metadata,
            ObjectMeta {
                name: expected.metadata.name.clone(),
                namespace: expected.metadata.namespace.clone(),
                ..Default::default()
            }
        );
        assert_eq!(cached.resource_version(), "42");
        assert!(cached.has_subject("worker") && !cached.has_subject("other"));
        assert_eq!(cached.key(), binding_key(&expected));
        // Decoding a watch event packs it the same way.
        let decoded: CachedBinding = serde_json::from_value(serde_json::to_value(&expected).unwrap()).unwrap();
        assert_eq!(decoded.binding().unwrap(), expected);
    }
}
