//! The two custom resources of kube-sts, `AWSRoleBinding` and `AWSRoleGrant` (API group
//! `kube-sts.io/v1alpha1`). Everything OpenAPI or CEL can check lives in the schema, so the
//! apiserver rejects bad input before the operator ever sees it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "kube-sts.io";
pub const VERSION: &str = "v1alpha1";

/// Role ARN: partition, 12-digit account, role path and name.
const ROLE_ARN_PATTERN: &str = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}$";
const POLICY_ARN_PATTERN: &str = r"^arn:aws[a-z-]*:iam::([0-9]{12}|aws):policy/[\w+=,.@/-]{1,512}$";
const SESSION_NAME_PATTERN: &str = r"^[\w+=,.@-]{2,64}$";
/// RE2 caps repeat counts at 1000: the length bound is a separate `length` rule.
const EXTERNAL_ID_PATTERN: &str = r"^[\w+=,.@:/-]+$";
const FEDERATED_NAME_PATTERN: &str = r"^[\w+=,.@-]{2,32}$";
const MFA_SERIAL_PATTERN: &str = r"^[\w+=/:,.@-]{9,256}$";
const REGION_PATTERN: &str = r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$";
const ACCOUNT_ID_PATTERN: &str = r"^[0-9]{12}$";
const DNS_SUBDOMAIN_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
const PROFILE_PATTERN: &str = r"^[A-Za-z0-9_.-]{1,64}$";
/// `mountPath` ends up in `credential_process = cat <mountPath>/credentials.json`, which
/// SDKs run through a shell: only path characters that no shell gives a meaning to.
const MOUNT_PATH_PATTERN: &str = r"^/[A-Za-z0-9._/-]*$";
/// AWS's character set for session tag values (keys use the same set, at least one).
const TAG_VALUE_PATTERN: &str = r"^[\p{L}\p{Z}\p{N}_.:/=+@-]*$";

/// The method a binding uses, as CEL sees it (the field defaults to AssumeRole).
const CEL_METHOD: &str = "(has(self.method) ? self.method : 'AssumeRole')";

/// A field that only some methods send to STS is refused with the others (rather than
/// silently ignored), naming the field.
fn only_with(field: &str, methods: &[&str]) -> kube::core::Rule {
    let list = methods.iter().map(|m| format!("'{m}'")).collect::<Vec<_>>().join(", ");
    kube::core::Rule::new(format!("!has(self.{field}) || {CEL_METHOD} in [{list}]")).message(
        kube::core::Message::Message(format!("{field} is only used with method {}", methods.join(" or "))),
    )
}

/// How the operator obtains credentials from STS.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Method {
    #[default]
    AssumeRole,
    AssumeRoleWithWebIdentity,
    GetFederationToken,
    GetSessionToken,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::AssumeRole => "AssumeRole",
            Method::AssumeRoleWithWebIdentity => "AssumeRoleWithWebIdentity",
            Method::GetFederationToken => "GetFederationToken",
            Method::GetSessionToken => "GetSessionToken",
        }
    }

    /// Methods that assume an IAM role (and so need `roleArn`).
    pub fn assumes_role(self) -> bool {
        matches!(self, Method::AssumeRole | Method::AssumeRoleWithWebIdentity)
    }

    /// The `DurationSeconds` STS applies when none is sent.
    pub fn default_duration_seconds(self) -> i32 {
        if self.assumes_role() { 3_600 } else { 43_200 }
    }

    /// The longest `DurationSeconds` STS accepts for this method.
    pub fn max_duration_seconds(self) -> i32 {
        if self.assumes_role() { 43_200 } else { 129_600 }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum SubjectKind {
    #[default]
    ServiceAccount,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum SecretType {
    /// An Opaque Secret with environment keys, `credentials`, `config` and `credentials.json`.
    #[default]
    Credentials,
    /// A `kubernetes.io/dockerconfigjson` Secret with ECR registry credentials.
    DockerConfigJson,
}

/// A subject the role is bound to: a ServiceAccount of the binding's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct Subject {
    #[serde(default)]
    pub kind: SubjectKind,
    /// ServiceAccount name in the binding's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// A key of a Secret in the binding's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, KubeSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A Secret of the binding's namespace, by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, KubeSchema)]
pub struct LocalSecretRef {
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// One hop of a role chain, assumed before `roleArn`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChainHop {
    #[schemars(regex(pattern = ROLE_ARN_PATTERN))]
    pub role_arn: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 1224), regex(pattern = EXTERNAL_ID_PATTERN))]
    pub external_id: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mfa {
    /// ARN (or serial number) of the MFA device.
    #[schemars(regex(pattern = MFA_SERIAL_PATTERN))]
    pub serial_number: String,
    /// Secret key holding the base32 TOTP seed (RFC 6238, SHA-1, 6 digits, 30 s).
    pub totp_secret_ref: SecretKeyRef,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebIdentity {
    /// Audience of the ServiceAccount token (default `sts.amazonaws.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub audience: Option<String>,
    /// Lifetime of the requested ServiceAccount token (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 600, max = 86400))]
    pub token_expiration_seconds: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
pub struct Federation {
    /// Federated user name; default derived from namespace and ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = FEDERATED_NAME_PATTERN))]
    pub name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Secret name; default `<binding>-<serviceaccount>`. With more than one subject the
    /// default applies (a fixed name would collide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<SecretType>,
    /// Profile name written into `credentials` and `config` (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PROFILE_PATTERN))]
    pub profile: Option<String>,
    /// Where pods mount the Secret (default `/var/run/secrets/kube-sts.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = MOUNT_PATH_PATTERN))]
    #[x_kube(validation = Rule::new("!self.split('/').exists(p, p == '..')").message("mountPath must not contain .. segments"))]
    pub mount_path: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ecr {
    /// Registry (account) IDs to fetch authorization tokens for.
    #[schemars(length(min = 1, max = 10), inner(regex(pattern = ACCOUNT_ID_PATTERN)))]
    pub registry_ids: Vec<String>,
}

/// Binds one AWS IAM role to ServiceAccounts of this namespace. For every subject the
/// operator obtains temporary credentials from AWS STS, writes them into a Secret and
/// refreshes them before they expire.
#[allow(clippy::duplicated_attributes)] // several printcolumn(...) entries
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kube-sts.io",
    version = "v1alpha1",
    kind = "AWSRoleBinding",
    plural = "awsrolebindings",
    singular = "awsrolebinding",
    namespaced,
    shortname = "arb",
    category = "kube-sts",
    status = "AWSRoleBindingStatus",
    derive = "PartialEq",
    doc = "Binds one AWS IAM role to ServiceAccounts of its namespace; the operator keeps short-lived STS credentials for each in a Secret.",
    printcolumn(name = "Role", type_ = "string", json_path = ".spec.roleArn"),
    printcolumn(name = "Method", type_ = "string", json_path = ".spec.method"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiration"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("(has(self.method) && self.method in ['GetSessionToken', 'GetFederationToken']) || has(self.roleArn)").message("roleArn is required for AssumeRole and AssumeRoleWithWebIdentity"),
    validation = Rule::new("!has(self.durationSeconds) || (has(self.method) && self.method in ['GetSessionToken', 'GetFederationToken']) || self.durationSeconds <= 43200").message("durationSeconds must be at most 43200 for AssumeRole and AssumeRoleWithWebIdentity"),
    validation = Rule::new("!(has(self.externalId) && has(self.externalIdSecretRef))").message("externalId and externalIdSecretRef are mutually exclusive"),
    validation = Rule::new("!has(self.transitiveTagKeys) || self.transitiveTagKeys.all(k, has(self.sessionTags) && k in self.sessionTags)").message("transitiveTagKeys must be keys of sessionTags"),
    validation = Rule::new("!has(self.method) || self.method != 'GetFederationToken' || has(self.sessionPolicy) || has(self.policyArns)").message("GetFederationToken needs sessionPolicy or policyArns"),
    validation = only_with("chain", &["AssumeRole"]),
    validation = only_with("mfa", &["AssumeRole", "GetSessionToken"]),
    validation = only_with("roleArn", &["AssumeRole", "AssumeRoleWithWebIdentity"]),
    validation = only_with("sessionName", &["AssumeRole", "AssumeRoleWithWebIdentity"]),
    validation = only_with("externalId", &["AssumeRole"]),
    validation = only_with("externalIdSecretRef", &["AssumeRole"]),
    validation = only_with("sessionPolicy", &["AssumeRole", "AssumeRoleWithWebIdentity", "GetFederationToken"]),
    validation = only_with("policyArns", &["AssumeRole", "AssumeRoleWithWebIdentity", "GetFederationToken"]),
    validation = only_with("sessionTags", &["AssumeRole", "GetFederationToken"]),
    validation = only_with("transitiveTagKeys", &["AssumeRole"]),
    validation = only_with("sourceIdentity", &["AssumeRole"]),
    validation = only_with("webIdentity", &["AssumeRoleWithWebIdentity"]),
    validation = only_with("federation", &["GetFederationToken"]),
    validation = only_with("sourceCredentialsSecretRef", &["GetSessionToken", "GetFederationToken"]),
    validation = Rule::new("(has(self.secret) && has(self.secret.type) && self.secret.type == 'DockerConfigJson') == has(self.ecr)").message("ecr is required exactly when secret.type is DockerConfigJson"),
    validation = Rule::new("!has(self.secret) || !has(self.secret.name) || size(self.subjects) == 1").message("secret.name can only be set with a single subject")
)]
#[serde(rename_all = "camelCase")]
pub struct AWSRoleBindingSpec {
    /// The IAM role to assume. Required unless method is GetSessionToken or GetFederationToken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = ROLE_ARN_PATTERN))]
    pub role_arn: Option<String>,

    /// ServiceAccounts of this namespace that get credentials.
    #[schemars(length(min = 1, max = 100))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub subjects: Vec<Subject>,

    #[serde(default)]
    pub method: Method,

    /// Requested session lifetime: 900..43200 for roles, up to 129600 otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 900, max = 129600))]
    pub duration_seconds: Option<i32>,

    /// Refresh this long before expiry (clamped to [60, lifetime/2]); default SDK-aware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 129600))]
    pub refresh_before_seconds: Option<i32>,

    /// RoleSessionName; default `<namespace>.<serviceaccount>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SESSION_NAME_PATTERN))]
    pub session_name: Option<String>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 1224), regex(pattern = EXTERNAL_ID_PATTERN))]
    pub external_id: Option<String>,

    /// External ID read from a key of a Secret in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id_secret_ref: Option<SecretKeyRef>,

    /// For GetSessionToken and GetFederationToken: a Secret of this namespace with
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` of the IAM user whose session is
    /// issued (the team's own user; an MFA device belongs to that user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_credentials_secret_ref: Option<LocalSecretRef>,

    /// Inline session policy (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub session_policy: Option<String>,

    /// Managed session policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 10), inner(regex(pattern = POLICY_ARN_PATTERN)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub policy_arns: Option<Vec<String>>,

    /// Session tags; keys starting with `kubernetes-` are reserved for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 50, "additionalProperties" = {"type": "string", "maxLength": 256, "pattern": TAG_VALUE_PATTERN}))]
    #[x_kube(
        validation = Rule::new("self.all(k, size(k) >= 1 && size(k) <= 128 && k.matches('^[\\\\p{L}\\\\p{Z}\\\\p{N}_.:/=+@-]+$'))").message("session tag keys must be 1..128 characters of letters, digits, spaces and _.:/=+-@"),
        validation = Rule::new("self.all(k, !k.lowerAscii().startsWith('kubernetes-'))").message("session tag keys starting with kubernetes- are reserved"),
        validation = Rule::new("self.all(k, !k.lowerAscii().startsWith('aws:'))").message("session tag keys starting with aws: are reserved by AWS")
    )]
    pub session_tags: Option<BTreeMap<String, String>>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 50))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub transitive_tag_keys: Option<Vec<String>>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SESSION_NAME_PATTERN))]
    pub source_identity: Option<String>,

    /// Roles assumed in order before `roleArn` (role chaining; AWS caps the result at 1 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 10))]
    pub chain: Option<Vec<ChainHop>>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfa: Option<Mfa>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_identity: Option<WebIdentity>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<Federation>,

    /// STS region; default the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = REGION_PATTERN))]
    pub region: Option<String>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretTemplate>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecr: Option<Ecr>,
}

/// Observed state of an AWSRoleBinding. Never holds secret material.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AWSRoleBindingStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Earliest expiry over all subjects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<Time>,
    /// Earliest planned refresh over all subjects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub subjects: Vec<SubjectStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubjectStatus {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The assumed identity (e.g. `arn:aws:sts::…:assumed-role/…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arn: Option<String>,
    /// Public half of the key only, for CloudTrail correlation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Last error for this subject, if any.
    #[serde(default)]
    pub message: String,
}

/// Which namespaces may bind which roles with which methods.
#[allow(clippy::duplicated_attributes)] // several printcolumn(...) entries
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kube-sts.io",
    version = "v1alpha1",
    kind = "AWSRoleGrant",
    plural = "awsrolegrants",
    singular = "awsrolegrant",
    shortname = "arg",
    category = "kube-sts",
    derive = "PartialEq",
    doc = "Allows namespaces to bind IAM roles (by glob) with given STS methods.",
    printcolumn(name = "Roles", type_ = "string", json_path = ".spec.roleArns"),
    printcolumn(name = "Namespaces", type_ = "string", json_path = ".spec.namespaces"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("has(self.namespaces) || has(self.namespaceSelector)").message("at least one of namespaces and namespaceSelector is required"),
    validation = Rule::new("!has(self.namespaceSelector) || (has(self.namespaceSelector.matchLabels) && size(self.namespaceSelector.matchLabels) > 0) || (has(self.namespaceSelector.matchExpressions) && size(self.namespaceSelector.matchExpressions) > 0)").message("namespaceSelector must not be empty (an empty selector matches every namespace)")
)]
#[serde(rename_all = "camelCase")]
pub struct AWSRoleGrantSpec {
    /// Exact namespace names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(length(min = 1, max = 63)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub namespaces: Option<Vec<String>>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Role ARN globs: `*` any run of characters, `?` one character. `"*"` allows any role.
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 2048)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub role_arns: Vec<String>,

    /// Allowed methods; default AssumeRole and AssumeRoleWithWebIdentity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub methods: Option<Vec<Method>>,

    /// ServiceAccount name globs; default any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), inner(length(min = 1, max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub service_accounts: Option<Vec<String>>,

    /// Upper bound on `durationSeconds` of the bindings this grant allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 900, max = 129600))]
    pub max_duration_seconds: Option<i32>,

    /// Globs for session tag keys a binding may set itself (`sessionTags`); default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 50), inner(length(min = 1, max = 128)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub session_tag_keys: Option<Vec<String>>,

    /// Globs a custom `sessionName`, `sourceIdentity` or `federation.name` may match
    /// besides the default rule (it starts with `<namespace>.`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 50), inner(length(min = 1, max = 128)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub session_names: Option<Vec<String>>,

    /// Let GetSessionToken and GetFederationToken bindings without
    /// `sourceCredentialsSecretRef` use the operator's own IAM identity. Takes effect only
    /// when the operator runs with `--allow-operator-identity`; hands out sessions of the
    /// operator's user (see the README's security model).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_operator_identity: bool,
}

impl AWSRoleGrantSpec {
    pub const DEFAULT_METHODS: [Method; 2] = [Method::AssumeRole, Method::AssumeRoleWithWebIdentity];
}

/// Both CRDs as one multi-document YAML stream (what `kube-sts crd` prints).
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt;
    let docs = [AWSRoleBinding::crd(), AWSRoleGrant::crd()];
    let mut out = String::new();
    for crd in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).expect("CRD serializes to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    /// `crds/` is generated from these types; regenerate with `make crds` when this fails.
    #[test]
    fn checked_in_crds_match_the_types() {
        let checked_in = include_str!("../crds/kube-sts.yaml");
        assert!(
            checked_in == super::crds_yaml(),
            "crds/kube-sts.yaml is stale: run `make crds`"
        );
    }
}
