//! The Secret the operator writes for one subject, rendered from issued credentials.
//! Pure: no API calls. The same function renders a Secret and checks one read back.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::ResourceExt;
use serde::Serialize;

use crate::crd::SecretType;

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "kube-sts";
pub const BINDING_LABEL: &str = "kube-sts.io/binding";
pub const SERVICE_ACCOUNT_LABEL: &str = "kube-sts.io/service-account";
pub const EXPIRATION_ANNOTATION: &str = "kube-sts.io/expiration";
pub const ISSUED_AT_ANNOTATION: &str = "kube-sts.io/issued-at";
pub const ROLE_ARN_ANNOTATION: &str = "kube-sts.io/role-arn";
pub const SPEC_HASH_ANNOTATION: &str = "kube-sts.io/spec-hash";
/// The assumed identity (public), so status can be rebuilt from the Secret after a restart.
pub const ARN_ANNOTATION: &str = "kube-sts.io/arn";
/// Set on a Secret whose credentials expired and could not be refreshed.
pub const EXPIRED_ANNOTATION: &str = "kube-sts.io/expired";
/// Kept with the credentials so a restarted operator reports the same condition message.
pub const NOTE_ANNOTATION: &str = "kube-sts.io/issue-note";
/// The (public) access key ID of the session that fetched an ECR token: a pull Secret
/// holds no AWS keys, and status still names the session for CloudTrail correlation.
pub const ACCESS_KEY_ANNOTATION: &str = "kube-sts.io/access-key-id";

pub const DEFAULT_PROFILE: &str = "default";
pub const DEFAULT_MOUNT_PATH: &str = "/var/run/secrets/kube-sts.io";

pub const KEY_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const KEY_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const KEY_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
pub const KEY_EXPIRATION: &str = "AWS_CREDENTIAL_EXPIRATION";
pub const KEY_CREDENTIALS: &str = "credentials";
pub const KEY_CONFIG: &str = "config";
pub const KEY_CREDENTIALS_JSON: &str = "credentials.json";
/// The only key of a `kubernetes.io/dockerconfigjson` Secret.
pub const KEY_DOCKER_CONFIG: &str = ".dockerconfigjson";
pub const TYPE_OPAQUE: &str = "Opaque";
pub const TYPE_DOCKER_CONFIG: &str = "kubernetes.io/dockerconfigjson";

/// An ECR registry's pull credentials: its host and the `auth` value (base64 of
/// `AWS:<password>`) as ECR GetAuthorizationToken returns it. `Debug` hides the token.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub host: String,
    pub auth: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Temporary credentials as STS returned them. `Debug` never shows the secret parts.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub issued_at: Timestamp,
    pub expiration: Timestamp,
    /// The identity the credentials act as (assumed-role or federated-user ARN), if known.
    pub arn: Option<String>,
    /// What the user should know about this issuance (e.g. a shortened duration).
    pub note: Option<String>,
    /// ECR pull credentials, sorted by host (only for `DockerConfigJson`). Then `issued_at`
    /// and `expiration` are the token's, and the secret key and session token are empty:
    /// the session only served to fetch the token.
    pub registries: Vec<RegistryAuth>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("issued_at", &self.issued_at)
            .field("expiration", &self.expiration)
            .field("arn", &self.arn)
            .field("registries", &self.registries)
            .finish_non_exhaustive()
    }
}

/// RFC 3339 at second precision, as Kubernetes and the AWS SDKs write it.
pub fn rfc3339(ts: Timestamp) -> String {
    jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", ts).expect("timestamp formats")
}

/// Where and how the Secret for one subject is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretTarget {
    pub namespace: String,
    pub name: String,
    pub binding: String,
    pub binding_uid: String,
    pub service_account: String,
    pub spec_hash: String,
    pub role_arn: Option<String>,
    pub region: Option<String>,
    pub profile: String,
    pub mount_path: String,
    pub secret_type: SecretType,
    pub extra_labels: BTreeMap<String, String>,
    pub extra_annotations: BTreeMap<String, String>,
}

impl SecretTarget {
    pub fn owner_reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
            kind: "AWSRoleBinding".into(),
            name: self.binding.clone(),
            uid: self.binding_uid.clone(),
            controller: Some(true),
            block_owner_deletion: None,
        }
    }

    /// The Secret's labels: user extras first, so the operator's own always win.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.extra_labels.clone();
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        labels.insert(BINDING_LABEL.into(), self.binding.clone());
        labels.insert(SERVICE_ACCOUNT_LABEL.into(), self.service_account.clone());
        labels
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ProcessOutput<'a> {
    version: u8,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    session_token: &'a str,
    expiration: String,
}

/// The `credential_process` output (`credentials.json`).
pub fn credential_process_json(creds: &Credentials) -> String {
    serde_json::to_string(&ProcessOutput {
        version: 1,
        access_key_id: &creds.access_key_id,
        secret_access_key: &creds.secret_access_key,
        session_token: &creds.session_token,
        expiration: rfc3339(creds.expiration),
    })
    .expect("credential_process JSON serializes")
}

/// The shared credentials file with one `[<profile>]` section.
pub fn credentials_file(creds: &Credentials, profile: &str) -> String {
    format!(
        "[{profile}]\naws_access_key_id = {}\naws_secret_access_key = {}\naws_session_token = {}\n",
        creds.access_key_id, creds.secret_access_key, creds.session_token
    )
}

/// The config file: `credential_process` reading the mounted `credentials.json`.
pub fn config_file(profile: &str, mount_path: &str, region: Option<&str>) -> String {
    let section = if profile == DEFAULT_PROFILE {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    let mut out = format!(
        "[{section}]\ncredential_process = cat {}/{KEY_CREDENTIALS_JSON}\n",
        mount_path.trim_end_matches('/')
    );
    if let Some(region) = region {
        out.push_str(&format!("region = {region}\n"));
    }
    out
}

/// The `.dockerconfigjson` of an ECR pull Secret: one `auths` entry per registry, with
/// only `auth`, as `docker login` writes it.
pub fn docker_config_json(registries: &[RegistryAuth]) -> String {
    let auths: BTreeMap<&str, BTreeMap<&str, &str>> = registries
        .iter()
        .map(|r| (r.host.as_str(), BTreeMap::from([("auth", r.auth.as_str())])))
        .collect();
    serde_json::json!({ "auths": auths }).to_string()
}

/// All data keys of the Secret for `target`, by its type.
pub fn secret_data(creds: &Credentials, target: &SecretTarget) -> BTreeMap<String, ByteString> {
    match target.secret_type {
        SecretType::Credentials => credentials_data(creds, target),
        SecretType::DockerConfigJson => BTreeMap::from([(
            KEY_DOCKER_CONFIG.to_string(),
            ByteString(docker_config_json(&creds.registries).into_bytes()),
        )]),
    }
}

/// The Kubernetes Secret type for `target`.
pub fn secret_type(target: &SecretTarget) -> &'static str {
    match target.secret_type {
        SecretType::Credentials => TYPE_OPAQUE,
        SecretType::DockerConfigJson => TYPE_DOCKER_CONFIG,
    }
}

/// All data keys of a `Credentials` Secret.
pub fn credentials_data(creds: &Credentials, target: &SecretTarget) -> BTreeMap<String, ByteString> {
    let entries = [
        (KEY_ACCESS_KEY_ID, creds.access_key_id.clone()),
        (KEY_SECRET_ACCESS_KEY, creds.secret_access_key.clone()),
        (KEY_SESSION_TOKEN, creds.session_token.clone()),
        (KEY_EXPIRATION, rfc3339(creds.expiration)),
        (KEY_CREDENTIALS, credentials_file(creds, &target.profile)),
        (
            KEY_CONFIG,
            config_file(&target.profile, &target.mount_path, target.region.as_deref()),
        ),
        (KEY_CREDENTIALS_JSON, credential_process_json(creds)),
    ];
    entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
        .collect()
}

fn metadata(target: &SecretTarget, annotations: BTreeMap<String, String>) -> ObjectMeta {
    let mut all = target.extra_annotations.clone();
    all.extend(annotations);
    ObjectMeta {
        name: Some(target.name.clone()),
        namespace: Some(target.namespace.clone()),
        labels: Some(target.labels()),
        annotations: Some(all),
        owner_references: Some(vec![target.owner_reference()]),
        ..Default::default()
    }
}

/// The complete Secret holding `creds` for `target`.
pub fn render_secret(creds: &Credentials, target: &SecretTarget) -> Secret {
    let mut annotations = BTreeMap::from([
        (EXPIRATION_ANNOTATION.to_string(), rfc3339(creds.expiration)),
        (ISSUED_AT_ANNOTATION.to_string(), rfc3339(creds.issued_at)),
        (SPEC_HASH_ANNOTATION.to_string(), target.spec_hash.clone()),
    ]);
    if let Some(role) = &target.role_arn {
        annotations.insert(ROLE_ARN_ANNOTATION.into(), role.clone());
    }
    if let Some(arn) = &creds.arn {
        annotations.insert(ARN_ANNOTATION.into(), arn.clone());
    }
    if let Some(note) = &creds.note {
        annotations.insert(NOTE_ANNOTATION.into(), note.clone());
    }
    if target.secret_type == SecretType::DockerConfigJson {
        annotations.insert(ACCESS_KEY_ANNOTATION.into(), creds.access_key_id.clone());
    }
    Secret {
        metadata: metadata(target, annotations),
        type_: Some(secret_type(target).into()),
        data: Some(secret_data(creds, target)),
        ..Default::default()
    }
}

/// The Secret that replaces credentials which expired and could not be refreshed: the
/// credential keys are gone, so no SDK mistakes it for a working one. (A pull Secret keeps
/// its type, which Kubernetes never changes, with no registries in it.)
pub fn render_expired_secret(target: &SecretTarget, expired_at: Timestamp) -> Secret {
    let annotations = BTreeMap::from([
        (EXPIRATION_ANNOTATION.to_string(), rfc3339(expired_at)),
        (EXPIRED_ANNOTATION.to_string(), "true".to_string()),
        (SPEC_HASH_ANNOTATION.to_string(), target.spec_hash.clone()),
    ]);
    let data = match target.secret_type {
        SecretType::Credentials => (KEY_EXPIRATION, rfc3339(expired_at)),
        SecretType::DockerConfigJson => (KEY_DOCKER_CONFIG, docker_config_json(&[])),
    };
    Secret {
        metadata: metadata(target, annotations),
        type_: Some(secret_type(target).into()),
        data: Some(BTreeMap::from([(data.0.to_string(), ByteString(data.1.into_bytes()))])),
        ..Default::default()
    }
}

pub fn annotation_time(secret: &Secret, key: &str) -> Option<Timestamp> {
    secret.annotations().get(key)?.parse().ok()
}

fn data_str<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    std::str::from_utf8(&secret.data.as_ref()?.get(key)?.0).ok()
}

/// Reads the credentials a Secret holds, if it holds a complete, consistent set: every key
/// must be exactly what rendering those credentials for `target` gives. An edited or
/// half-written Secret yields `None`.
pub fn read_credentials(secret: &Secret, target: &SecretTarget) -> Option<Credentials> {
    let (access_key_id, secret_access_key, session_token, registries) = match target.secret_type {
        SecretType::Credentials => (
            data_str(secret, KEY_ACCESS_KEY_ID)?.to_string(),
            data_str(secret, KEY_SECRET_ACCESS_KEY)?.to_string(),
            data_str(secret, KEY_SESSION_TOKEN)?.to_string(),
            Vec::new(),
        ),
        SecretType::DockerConfigJson => (
            secret.annotations().get(ACCESS_KEY_ANNOTATION)?.clone(),
            String::new(),
            String::new(),
            read_registries(data_str(secret, KEY_DOCKER_CONFIG)?)?,
        ),
    };
    let creds = Credentials {
        access_key_id,
        secret_access_key,
        session_token,
        issued_at: annotation_time(secret, ISSUED_AT_ANNOTATION)?,
        expiration: annotation_time(secret, EXPIRATION_ANNOTATION)?,
        arn: secret.annotations().get(ARN_ANNOTATION).cloned(),
        note: secret.annotations().get(NOTE_ANNOTATION).cloned(),
        registries,
    };
    (secret.type_.as_deref() == Some(secret_type(target))
        && same_data(&secret.data, &Some(secret_data(&creds, target))))
    .then_some(creds)
}

/// The registries of a `.dockerconfigjson` (sorted by host); `None` when it is not one.
fn read_registries(json: &str) -> Option<Vec<RegistryAuth>> {
    #[derive(serde::Deserialize)]
    struct Config {
        auths: BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: String,
    }
    let config: Config = serde_json::from_str(json).ok()?;
    let registries: Vec<RegistryAuth> = config
        .auths
        .into_iter()
        .map(|(host, entry)| RegistryAuth { host, auth: entry.auth })
        .collect();
    (!registries.is_empty()).then_some(registries)
}

/// The data keys whose values the operator reads back from a Secret (the credentials
/// themselves). Every other key is a rendering of these and is cached as a digest only.
const READ_BACK_KEYS: [&str; 4] = [
    KEY_ACCESS_KEY_ID,
    KEY_SECRET_ACCESS_KEY,
    KEY_SESSION_TOKEN,
    KEY_DOCKER_CONFIG,
];

/// Marks a value that was replaced by its digest (no rendered value starts with a NUL).
const DIGEST_MARK: &[u8] = b"\0sha256\0";

/// A Secret's data as the cache keeps it: the credential keys as they are, every rendered
/// key (credentials file, `credential_process` JSON, config, expiration) by its SHA-256, so
/// a cached Secret holds each credential once. For data read from the apiserver: a value
/// that already looks like a digest was written by someone else (the operator never renders
/// one) and is digested again, so it can never pass for the value it names.
pub fn cached_data(data: &BTreeMap<String, ByteString>) -> BTreeMap<String, ByteString> {
    data.iter()
        .map(|(key, value)| {
            let clear = READ_BACK_KEYS.contains(&key.as_str()) && !value.0.starts_with(DIGEST_MARK);
            (key.clone(), if clear { value.clone() } else { digest(value) })
        })
        .collect()
}

/// A Secret's data with every value by its digest, the credential keys too: what the cache
/// keeps once the operator holds the credentials themselves, and what data is compared by
/// (a cached Secret, in either form, and a desired one compare alike). Values that are
/// digests already (the cache's) stay as they are.
pub fn digested_data(data: &BTreeMap<String, ByteString>) -> BTreeMap<String, ByteString> {
    data.iter()
        .map(|(key, value)| {
            let done = value.0.starts_with(DIGEST_MARK);
            (key.clone(), if done { value.clone() } else { digest(value) })
        })
        .collect()
}

fn digest(value: &ByteString) -> ByteString {
    use sha2::{Digest, Sha256};
    ByteString([DIGEST_MARK, Sha256::digest(&value.0).as_slice()].concat())
}

/// Whether two Secrets' data are the same, either side cached (either way) or read as it is.
fn same_data(a: &Option<BTreeMap<String, ByteString>>, b: &Option<BTreeMap<String, ByteString>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.len() == b.len() && digested_data(a) == digested_data(b),
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// True when `actual` carries everything `desired` says (data, type, labels, annotations,
/// owner). Extra labels or annotations others added are left alone.
pub fn secret_matches(actual: &Secret, desired: &Secret) -> bool {
    let contains = |have: &Option<BTreeMap<String, String>>, want: &Option<BTreeMap<String, String>>| {
        let have = have.clone().unwrap_or_default();
        want.iter().flatten().all(|(k, v)| have.get(k) == Some(v))
    };
    same_data(&actual.data, &desired.data)
        && actual.type_ == desired.type_
        && contains(&actual.metadata.labels, &desired.metadata.labels)
        && contains(&actual.metadata.annotations, &desired.metadata.annotations)
        && actual.metadata.owner_references == desired.metadata.owner_references
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn creds() -> Credentials {
        Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "s3cr3t/key+".into(),
            session_token: "tok=en".into(),
            issued_at: "2026-11-26T09:00:00Z".parse().unwrap(),
            expiration: "2026-11-26T10:00:00Z".parse().unwrap(),
            arn: Some("arn:aws:sts::123456789012:assumed-role/r/team-a.app".into()),
            note: None,
            registries: Vec::new(),
        }
    }

    pub(crate) fn target() -> SecretTarget {
        SecretTarget {
            namespace: "team-a".into(),
            name: "reports-app".into(),
            binding: "reports".into(),
            binding_uid: "uid-1".into(),
            service_account: "app".into(),
            spec_hash: "abc".into(),
            role_arn: Some("arn:aws:iam::123456789012:role/r".into()),
            region: Some("eu-west-1".into()),
            profile: DEFAULT_PROFILE.into(),
            mount_path: DEFAULT_MOUNT_PATH.into(),
            secret_type: SecretType::Credentials,
            extra_labels: BTreeMap::from([("team".into(), "a".into())]),
            extra_annotations: BTreeMap::new(),
        }
    }

    fn data(secret: &Secret, key: &str) -> String {
        data_str(secret, key).unwrap().to_string()
    }

    #[test]
    fn credential_process_json_is_exact() {
        assert_eq!(
            credential_process_json(&creds()),
            r#"{"Version":1,"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"s3cr3t/key+","SessionToken":"tok=en","Expiration":"2026-11-26T10:00:00Z"}"#
        );
    }

    #[test]
    fn ini_files_are_exact_for_default_and_named_profile() {
        assert_eq!(
            credentials_file(&creds(), "default"),
            "[default]\naws_access_key_id = ASIAEXAMPLE\naws_secret_access_key = s3cr3t/key+\naws_session_token = tok=en\n"
        );
        assert_eq!(
            config_file("default", "/var/run/secrets/kube-sts.io", Some("eu-west-1")),
            "[default]\ncredential_process = cat /var/run/secrets/kube-sts.io/credentials.json\nregion = eu-west-1\n"
        );
        assert_eq!(
            config_file("reports", "/aws/", None),
            "[profile reports]\ncredential_process = cat /aws/credentials.json\n"
        );
        assert!(credentials_file(&creds(), "reports").starts_with("[reports]\n"));
    }

    #[test]
    fn secret_has_all_keys_labels_annotations_and_owner() {
        let s = render_secret(&creds(), &target());
        let keys: Vec<_> = s.data.as_ref().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "AWS_ACCESS_KEY_ID",
                "AWS_CREDENTIAL_EXPIRATION",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
                "config",
                "credentials",
                "credentials.json"
            ]
        );
        assert_eq!(data(&s, KEY_EXPIRATION), "2026-11-26T10:00:00Z");
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], "kube-sts");
        assert_eq!(labels[BINDING_LABEL], "reports");
        assert_eq!(labels[SERVICE_ACCOUNT_LABEL], "app");
        assert_eq!(labels["team"], "a");
        let ann = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann[EXPIRATION_ANNOTATION], "2026-11-26T10:00:00Z");
        assert_eq!(ann[ISSUED_AT_ANNOTATION], "2026-11-26T09:00:00Z");
        assert_eq!(ann[ROLE_ARN_ANNOTATION], "arn:aws:iam::123456789012:role/r");
        assert_eq!(ann[SPEC_HASH_ANNOTATION], "abc");
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("AWSRoleBinding", "uid-1", Some(true))
        );
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
    }

    #[test]
    fn user_labels_cannot_override_operator_labels() {
        let mut t = target();
        t.extra_labels.insert(MANAGED_BY_LABEL.into(), "someone-else".into());
        assert_eq!(
            render_secret(&creds(), &t).metadata.labels.unwrap()[MANAGED_BY_LABEL],
            "kube-sts"
        );
    }

    #[test]
    fn read_back_round_trips_and_detects_edits() {
        let s = render_secret(&creds(), &target());
        assert_eq!(read_credentials(&s, &target()), Some(creds()));
        let mut edited = s.clone();
        edited
            .data
            .as_mut()
            .unwrap()
            .insert(KEY_SECRET_ACCESS_KEY.into(), ByteString(b"x".to_vec()));
        assert_eq!(read_credentials(&edited, &target()), None);
        let mut other_profile = target();
        other_profile.profile = "p".into();
        assert_eq!(read_credentials(&s, &other_profile), None);
    }

    #[test]
    fn expired_secret_has_no_credentials() {
        let s = render_expired_secret(&target(), creds().expiration);
        assert_eq!(s.data.as_ref().unwrap().len(), 1);
        assert_eq!(read_credentials(&s, &target()), None);
    }

    #[test]
    fn debug_never_shows_secret_parts() {
        let shown = format!("{:?}", creds());
        assert!(shown.contains("ASIAEXAMPLE"));
        assert!(!shown.contains("s3cr3t") && !shown.contains("tok=en"), "{shown}");
    }

    #[test]
    fn secret_matches_ignores_foreign_extras() {
        let desired = render_secret(&creds(), &target());
        let mut actual = desired.clone();
        actual
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("added-by".into(), "someone".into());
        assert!(secret_matches(&actual, &desired));
        actual.data.as_mut().unwrap().remove(KEY_CONFIG);
        assert!(!secret_matches(&actual, &desired));
    }

    #[test]
    fn a_cached_secret_holds_each_credential_once_and_still_compares() {
        let desired = render_secret(&creds(), &target());
        let data = desired.data.clone().unwrap();
        let cached = cached_data(&data);
        // The credential keys stay readable, the renderings are digests.
        assert_eq!(cached[KEY_SESSION_TOKEN], data[KEY_SESSION_TOKEN]);
        for key in [KEY_CREDENTIALS, KEY_CREDENTIALS_JSON, KEY_CONFIG, KEY_EXPIRATION] {
            assert!(cached[key].0.starts_with(DIGEST_MARK), "{key}");
            assert!(!String::from_utf8_lossy(&cached[key].0).contains("s3cr3t"), "{key}");
        }
        let mut in_cache = desired.clone();
        in_cache.data = Some(cached.clone());
        assert!(secret_matches(&in_cache, &desired));
        assert_eq!(read_credentials(&in_cache, &target()), Some(creds()));
        // Cached as digests only (the operator holds the credentials): still the same data,
        // the credentials no longer readable from it, none of them in the clear.
        let digests = digested_data(&data);
        assert_eq!(digested_data(&digests), digests, "idempotent");
        assert_eq!(digested_data(&cached), digests, "from either form");
        for value in digests.values() {
            assert!(value.0.starts_with(DIGEST_MARK));
        }
        let mut digests_only = desired.clone();
        digests_only.data = Some(digests);
        assert!(secret_matches(&digests_only, &desired));
        assert_eq!(read_credentials(&digests_only, &target()), None);
        // An edited rendering is seen through its digest.
        let mut edited = data.clone();
        edited.insert(KEY_CONFIG.into(), ByteString(b"[default]\n".to_vec()));
        in_cache.data = Some(cached_data(&edited));
        assert!(!secret_matches(&in_cache, &desired));
        assert_eq!(read_credentials(&in_cache, &target()), None);
        // A Secret someone wrote digests into (of the right values, in a rendered key and in
        // a credential key) does not pass for the real one once cached.
        for key in [KEY_CONFIG, KEY_SESSION_TOKEN] {
            let mut forged = data.clone();
            forged.insert(key.into(), digested_data(&data)[key].clone());
            in_cache.data = Some(cached_data(&forged));
            assert!(!secret_matches(&in_cache, &desired), "{key}");
        }
    }

    fn pull_target() -> SecretTarget {
        SecretTarget {
            secret_type: SecretType::DockerConfigJson,
            ..target()
        }
    }

    fn pull_creds() -> Credentials {
        Credentials {
            secret_access_key: String::new(),
            session_token: String::new(),
            registries: vec![
                RegistryAuth {
                    host: "111111111111.dkr.ecr.eu-west-1.amazonaws.com".into(),
                    auth: "QVdTOm9uZQ==".into(),
                },
                RegistryAuth {
                    host: "222222222222.dkr.ecr.eu-west-1.amazonaws.com".into(),
                    auth: "QVdTOnR3bw==".into(),
                },
            ],
            ..creds()
        }
    }

    #[test]
    fn pull_secret_is_exact_and_round_trips() {
        let s = render_secret(&pull_creds(), &pull_target());
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
        assert_eq!(s.data.as_ref().unwrap().len(), 1);
        assert_eq!(
            data(&s, KEY_DOCKER_CONFIG),
            r#"{"auths":{"111111111111.dkr.ecr.eu-west-1.amazonaws.com":{"auth":"QVdTOm9uZQ=="},"222222222222.dkr.ecr.eu-west-1.amazonaws.com":{"auth":"QVdTOnR3bw=="}}}"#
        );
        let ann = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann[ACCESS_KEY_ANNOTATION], "ASIAEXAMPLE");
        assert_eq!(ann[EXPIRATION_ANNOTATION], "2026-11-26T10:00:00Z");
        assert_eq!(read_credentials(&s, &pull_target()), Some(pull_creds()));
        // Read as the other type, it is not a usable Secret.
        assert_eq!(read_credentials(&s, &target()), None);
        assert_eq!(
            read_credentials(&render_secret(&creds(), &target()), &pull_target()),
            None
        );
    }

    #[test]
    fn expired_pull_secret_keeps_its_type_and_no_registry() {
        let s = render_expired_secret(&pull_target(), creds().expiration);
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
        assert_eq!(data(&s, KEY_DOCKER_CONFIG), r#"{"auths":{}}"#);
        assert_eq!(read_credentials(&s, &pull_target()), None);
    }

    #[test]
    fn debug_never_shows_registry_tokens() {
        let shown = format!("{:?}", pull_creds());
        assert!(shown.contains("111111111111.dkr.ecr"), "{shown}");
        assert!(!shown.contains("QVdTOm9uZQ=="), "{shown}");
    }
}
