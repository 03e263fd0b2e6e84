//! The pure middle of a reconcile: from a binding (and what it references, already read)
//! to what every subject needs — its Secret, its STS request — or a clear InvalidSpec.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
    crd::{AWSRoleBinding, AWSRoleBindingSpec, Method, SecretType},
    naming,
    render::{DEFAULT_MOUNT_PATH, DEFAULT_PROFILE, SecretTarget},
    sts::{IssueRequest, UserKeys},
};

/// AWS caps sessions obtained by role chaining at one hour.
pub const CHAINED_MAX_DURATION: i32 = 3600;
/// AWS allows at most 50 session tags.
const MAX_SESSION_TAGS: usize = 50;
pub const TAG_NAMESPACE: &str = "kubernetes-namespace";
pub const TAG_SERVICE_ACCOUNT: &str = "kubernetes-service-account";
pub const TAG_CLUSTER: &str = "kubernetes-cluster";

/// Operator-wide settings that shape every issuance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueSettings {
    pub cluster_name: String,
    pub session_tags: bool,
    pub default_region: Option<String>,
    /// `--allow-operator-identity`: GetSessionToken and GetFederationToken may be called
    /// with the operator's own identity (when a grant allows it too).
    pub allow_operator_identity: bool,
}

/// Values a binding references in other objects, read before planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The external ID read through `externalIdSecretRef`.
    pub external_id: Option<String>,
    /// The TOTP seed read through `mfa.totpSecretRef`.
    pub totp_seed: Option<crate::mfa::Seed>,
    /// The IAM user keys read through `sourceCredentialsSecretRef`.
    pub source_credentials: Option<UserKeys>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPlan {
    pub service_account: String,
    pub target: SecretTarget,
    pub request: IssueRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingPlan {
    pub spec_hash: String,
    pub subjects: Vec<SubjectPlan>,
    /// Something the user should know although issuance proceeds (e.g. a clamped duration).
    pub note: Option<String>,
}

/// Why a binding cannot be planned; becomes `Ready=False, reason InvalidSpec`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// Hash over everything that decides what STS issues and what the Secret holds, so any
/// change reissues at once. The resolved external ID enters as a digest only.
pub fn spec_hash(
    spec: &AWSRoleBindingSpec,
    resolved: &Resolved,
    settings: &IssueSettings,
    duration: Option<i32>,
) -> String {
    // The subject list stays out: adding or removing one subject must not reissue the others.
    let without_subjects = AWSRoleBindingSpec {
        subjects: Vec::new(),
        ..spec.clone()
    };
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(&without_subjects).expect("spec serializes"));
    hasher.update(b"\0");
    if let Some(id) = &resolved.external_id {
        hasher.update(Sha256::digest(id.as_bytes()));
    }
    hasher.update(b"\0");
    if let Some(seed) = &resolved.totp_seed {
        hasher.update(Sha256::digest(format!("{seed:?}{}", seed.code_at(0))));
    }
    hasher.update(format!(
        "\0{}\0{}\0{:?}",
        settings.cluster_name, settings.session_tags, settings.default_region
    ));
    // Later inputs enter only when they are in play, so the hash of a binding that does not
    // use them stays what earlier versions wrote (an upgrade reissues nothing).
    if let Some(keys) = &resolved.source_credentials {
        hasher.update(b"\0source\0");
        hasher.update(Sha256::digest(format!(
            "{}\0{}",
            keys.access_key_id, keys.secret_access_key
        )));
    }
    if duration != spec.duration_seconds {
        hasher.update(format!("\0duration\0{duration:?}"));
    }
    hex::encode(hasher.finalize())[..16].to_string()
}

fn check_policy_json(policy: &str) -> Result<(), InvalidSpec> {
    match serde_json::from_str::<Value>(policy) {
        Ok(Value::Object(_)) => Ok(()),
        Ok(_) => Err(InvalidSpec("sessionPolicy must be a JSON object".into())),
        Err(e) => Err(InvalidSpec(format!("sessionPolicy is not valid JSON: {e}"))),
    }
}

/// GetSessionToken and GetFederationToken issue a session of whoever calls them: the
/// team's own IAM user (`sourceCredentialsSecretRef`), or the operator's identity only when
/// the operator was started to allow it.
pub fn check_identity_source(spec: &AWSRoleBindingSpec, settings: &IssueSettings) -> Result<(), InvalidSpec> {
    if spec.method.assumes_role() || spec.source_credentials_secret_ref.is_some() || settings.allow_operator_identity {
        return Ok(());
    }
    Err(InvalidSpec(format!(
        "{} needs sourceCredentialsSecretRef: a Secret of this namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY of the IAM user whose session is issued (the operator's own identity is used only when it runs with --allow-operator-identity)",
        spec.method
    )))
}

/// AWS treats session tag keys case-insensitively and refuses two that differ only in
/// case. (The schema cannot say so within the apiserver's CEL cost budget.)
fn check_tag_keys_differ_in_case(tags: &BTreeMap<String, String>) -> Result<(), InvalidSpec> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for key in tags.keys() {
        if let Some(other) = seen.insert(key.to_lowercase(), key) {
            return Err(InvalidSpec(format!(
                "session tag keys {other} and {key} differ only in case; AWS treats them as the same key"
            )));
        }
    }
    Ok(())
}

/// `durationSeconds` to request: the binding's own, else the method's default lowered to
/// the grants' cap (STS would otherwise apply a default above the cap).
pub fn requested_duration(spec: &AWSRoleBindingSpec, cap: Option<i32>) -> Option<i32> {
    spec.duration_seconds
        .or_else(|| cap.filter(|cap| *cap < spec.method.default_duration_seconds()))
}

/// Plans every subject of `binding`. `duration_cap` is the highest `maxDurationSeconds` of
/// the grants that allow it (`None`: uncapped).
pub fn plan_binding(
    binding: &AWSRoleBinding,
    resolved: &Resolved,
    settings: &IssueSettings,
    duration_cap: Option<i32>,
) -> Result<BindingPlan, InvalidSpec> {
    let spec = &binding.spec;
    let namespace = binding.namespace().unwrap_or_default();
    let name = binding.name_any();
    let uid = binding.uid().unwrap_or_default();

    check_identity_source(spec, settings)?;
    if spec.source_credentials_secret_ref.is_some() && resolved.source_credentials.is_none() {
        return Err(InvalidSpec("sourceCredentialsSecretRef could not be read".into()));
    }

    if spec.mfa.is_some() && resolved.totp_seed.is_none() {
        return Err(InvalidSpec("mfa.totpSecretRef could not be read".into()));
    }
    if let Some(policy) = &spec.session_policy {
        check_policy_json(policy)?;
    }
    let user_tags = spec.session_tags.clone().unwrap_or_default();
    check_tag_keys_differ_in_case(&user_tags)?;
    let auto_tags = settings.session_tags && spec.method == Method::AssumeRole;
    if auto_tags && user_tags.len() + 3 > MAX_SESSION_TAGS {
        return Err(InvalidSpec(format!(
            "{} session tags plus the operator's 3 kubernetes-* tags exceed AWS's limit of {MAX_SESSION_TAGS}",
            user_tags.len()
        )));
    }
    let external_id = spec.external_id.clone().or_else(|| resolved.external_id.clone());

    let mut note = None;
    let mut duration = requested_duration(spec, duration_cap);
    let chain: Vec<(String, Option<String>)> = spec
        .chain
        .iter()
        .flatten()
        .map(|h| (h.role_arn.clone(), h.external_id.clone()))
        .collect();
    if !chain.is_empty() && duration.unwrap_or(CHAINED_MAX_DURATION) > CHAINED_MAX_DURATION {
        note = Some(format!(
            "durationSeconds {} clamped to {CHAINED_MAX_DURATION}: AWS caps role-chained sessions at one hour",
            duration.unwrap_or_default()
        ));
        duration = Some(CHAINED_MAX_DURATION);
    }

    let template = spec.secret.clone().unwrap_or_default();
    let region = spec.region.clone().or_else(|| settings.default_region.clone());
    let ecr_registry_ids = match (template.type_.unwrap_or_default(), &spec.ecr) {
        (SecretType::DockerConfigJson, Some(ecr)) => {
            if region.is_none() {
                return Err(InvalidSpec(
                    "an ECR pull Secret names regional registries: set spec.region (or start the operator with --region)"
                        .into(),
                ));
            }
            ecr.registry_ids.clone()
        }
        (SecretType::DockerConfigJson, None) => {
            return Err(InvalidSpec("secret.type DockerConfigJson needs ecr.registryIds".into()));
        }
        (SecretType::Credentials, _) => Vec::new(),
    };
    let hash = spec_hash(spec, resolved, settings, requested_duration(spec, duration_cap));
    let subjects = spec
        .subjects
        .iter()
        .map(|subject| {
            let sa = subject.name.clone();
            let mut tags: Vec<(String, String)> = match spec.method {
                // AssumeRoleWithWebIdentity and GetSessionToken take no tags.
                Method::AssumeRole | Method::GetFederationToken => user_tags.clone().into_iter().collect(),
                _ => Vec::new(),
            };
            if auto_tags {
                tags.push((TAG_NAMESPACE.into(), namespace.clone()));
                tags.push((TAG_SERVICE_ACCOUNT.into(), sa.clone()));
                tags.push((TAG_CLUSTER.into(), settings.cluster_name.clone()));
            }
            let request = IssueRequest {
                method: spec.method,
                role_arn: spec.role_arn.clone(),
                chain: chain.clone(),
                session_name: spec
                    .session_name
                    .clone()
                    .unwrap_or_else(|| naming::default_session_name(&namespace, &sa)),
                duration_seconds: duration,
                external_id: external_id.clone(),
                session_policy: spec.session_policy.clone(),
                policy_arns: spec.policy_arns.clone().unwrap_or_default(),
                tags,
                transitive_tag_keys: spec.transitive_tag_keys.clone().unwrap_or_default(),
                source_identity: spec.source_identity.clone(),
                region: region.clone(),
                web_identity_token: None,
                mfa: None,
                federated_name: (spec.method == Method::GetFederationToken).then(|| {
                    spec.federation
                        .as_ref()
                        .and_then(|f| f.name.clone())
                        .unwrap_or_else(|| naming::default_federated_name(&namespace, &sa))
                }),
                ecr_registry_ids: ecr_registry_ids.clone(),
                source_credentials: resolved.source_credentials.clone(),
            };
            let target = SecretTarget {
                namespace: namespace.clone(),
                name: subject_secret_name(spec, &name, &sa),
                binding: name.clone(),
                binding_uid: uid.clone(),
                service_account: sa.clone(),
                spec_hash: hash.clone(),
                role_arn: spec.role_arn.clone(),
                region: region.clone(),
                profile: template.profile.clone().unwrap_or_else(|| DEFAULT_PROFILE.into()),
                mount_path: template.mount_path.clone().unwrap_or_else(|| DEFAULT_MOUNT_PATH.into()),
                secret_type: template.type_.unwrap_or_default(),
                extra_labels: template.labels.clone(),
                extra_annotations: template.annotations.clone(),
            };
            SubjectPlan {
                service_account: sa,
                target,
                request,
            }
        })
        .collect();
    Ok(BindingPlan {
        spec_hash: hash,
        subjects,
        note,
    })
}

/// The Secret the binding `binding_name` writes for its subject `service_account`:
/// `secret.name`, else `<binding>-<serviceaccount>`.
pub fn subject_secret_name(spec: &AWSRoleBindingSpec, binding_name: &str, service_account: &str) -> String {
    spec.secret
        .as_ref()
        .and_then(|s| s.name.clone())
        .unwrap_or_else(|| naming::default_secret_name(binding_name, service_account))
}

/// Names of the Secrets a binding's subjects use, by ServiceAccount.
pub fn secret_names(plan: &BindingPlan) -> BTreeMap<&str, &str> {
    plan.subjects
        .iter()
        .map(|s| (s.service_account.as_str(), s.target.name.as_str()))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{ChainHop, SecretTemplate, Subject, SubjectKind};

    pub(crate) fn binding(spec_yaml: &str) -> AWSRoleBinding {
        let spec: AWSRoleBindingSpec = serde_saphyr::from_str(spec_yaml).unwrap();
        let mut b = AWSRoleBinding::new("reports", spec);
        b.metadata.namespace = Some("team-a".into());
        b.metadata.uid = Some("uid-1".into());
        b
    }

    fn settings() -> IssueSettings {
        IssueSettings {
            cluster_name: "prod".into(),
            session_tags: true,
            default_region: Some("us-east-1".into()),
            allow_operator_identity: false,
        }
    }

    const BASIC: &str = "roleArn: arn:aws:iam::123456789012:role/r\nsubjects: [{name: app}, {name: job}]\n";

    #[test]
    fn plans_every_subject_with_defaults() {
        let plan = plan_binding(&binding(BASIC), &Resolved::default(), &settings(), None).unwrap();
        assert_eq!(plan.subjects.len(), 2);
        let app = &plan.subjects[0];
        assert_eq!(app.target.name, "reports-app");
        assert_eq!(app.request.session_name, "team-a.app");
        assert_eq!(app.request.region.as_deref(), Some("us-east-1"));
        assert_eq!(
            app.request.tags,
            vec![
                ("kubernetes-namespace".to_string(), "team-a".to_string()),
                ("kubernetes-service-account".into(), "app".into()),
                ("kubernetes-cluster".into(), "prod".into())
            ]
        );
        assert_eq!(plan.subjects[1].target.name, "reports-job");
        assert!(plan.note.is_none());
    }

    #[test]
    fn session_tags_off_sends_only_user_tags() {
        let mut s = settings();
        s.session_tags = false;
        let mut b = binding(BASIC);
        b.spec.session_tags = Some([("team".to_string(), "a".to_string())].into());
        let plan = plan_binding(&b, &Resolved::default(), &s, None).unwrap();
        assert_eq!(
            plan.subjects[0].request.tags,
            vec![("team".to_string(), "a".to_string())]
        );
    }

    #[test]
    fn invalid_policy_json_is_invalid_spec() {
        let mut b = binding(BASIC);
        b.spec.session_policy = Some("{not json".into());
        let err = plan_binding(&b, &Resolved::default(), &settings(), None).unwrap_err();
        assert!(err.0.contains("sessionPolicy is not valid JSON"), "{err}");
        b.spec.session_policy = Some("[1]".into());
        assert!(plan_binding(&b, &Resolved::default(), &settings(), None).is_err());
    }

    #[test]
    fn too_many_tags_with_automatic_ones() {
        let mut b = binding(BASIC);
        b.spec.session_tags = Some((0..48).map(|i| (format!("k{i}"), "v".to_string())).collect());
        assert!(plan_binding(&b, &Resolved::default(), &settings(), None).is_err());
    }

    #[test]
    fn chain_clamps_duration_and_says_so() {
        let mut b = binding(BASIC);
        b.spec.duration_seconds = Some(7200);
        b.spec.chain = Some(vec![ChainHop {
            role_arn: "arn:aws:iam::111111111111:role/hub".into(),
            external_id: None,
        }]);
        let plan = plan_binding(&b, &Resolved::default(), &settings(), None).unwrap();
        assert_eq!(plan.subjects[0].request.duration_seconds, Some(3600));
        assert!(plan.note.unwrap().contains("clamped to 3600"));
    }

    #[test]
    fn resolved_external_id_is_used_and_changes_the_hash() {
        let b = binding(BASIC);
        let a = plan_binding(
            &b,
            &Resolved {
                external_id: Some("one".into()),
                ..Default::default()
            },
            &settings(),
            None,
        )
        .unwrap();
        let c = plan_binding(
            &b,
            &Resolved {
                external_id: Some("two".into()),
                ..Default::default()
            },
            &settings(),
            None,
        )
        .unwrap();
        assert_eq!(a.subjects[0].request.external_id.as_deref(), Some("one"));
        assert_ne!(a.spec_hash, c.spec_hash);
        assert!(!a.spec_hash.contains("one"));
    }

    #[test]
    fn hash_is_stable_and_follows_spec_changes() {
        let b = binding(BASIC);
        let h1 = plan_binding(&b, &Resolved::default(), &settings(), None)
            .unwrap()
            .spec_hash;
        assert_eq!(
            h1,
            plan_binding(&b, &Resolved::default(), &settings(), None)
                .unwrap()
                .spec_hash
        );
        let mut changed = b.clone();
        changed.spec.duration_seconds = Some(1800);
        assert_ne!(
            h1,
            plan_binding(&changed, &Resolved::default(), &settings(), None)
                .unwrap()
                .spec_hash
        );

        let mut fewer = b.clone();
        fewer.spec.subjects.pop();
        let h2 = plan_binding(&fewer, &Resolved::default(), &settings(), None)
            .unwrap()
            .spec_hash;
        assert_eq!(h1, h2, "subjects stay out of the hash");
    }

    #[test]
    fn federation_gets_a_derived_name_and_no_automatic_tags() {
        let mut b = binding("method: GetFederationToken\nsessionPolicy: '{}'\nsubjects: [{name: app}]\n");
        let mut s = settings();
        s.allow_operator_identity = true;
        let plan = plan_binding(&b, &Resolved::default(), &s, None).unwrap();
        let r = &plan.subjects[0].request;
        assert_eq!(r.federated_name.as_deref(), Some("team-a.app"));
        assert!(r.tags.is_empty());
        assert!(r.role_arn.is_none());
        b.spec.federation = Some(crate::crd::Federation {
            name: Some("reports".into()),
        });
        let plan = plan_binding(&b, &Resolved::default(), &s, None).unwrap();
        assert_eq!(plan.subjects[0].request.federated_name.as_deref(), Some("reports"));
    }

    #[test]
    fn pull_secret_plans_registries_and_needs_a_region() {
        let b = binding(
            "roleArn: arn:aws:iam::123456789012:role/r\nsubjects: [{name: app}]\nsecret: {type: DockerConfigJson}\necr: {registryIds: ['111111111111']}\n",
        );
        let plan = plan_binding(&b, &Resolved::default(), &settings(), None).unwrap();
        assert_eq!(plan.subjects[0].request.ecr_registry_ids, ["111111111111"]);
        assert_eq!(plan.subjects[0].target.secret_type, SecretType::DockerConfigJson);
        let mut no_region = settings();
        no_region.default_region = None;
        let err = plan_binding(&b, &Resolved::default(), &no_region, None).unwrap_err();
        assert!(err.0.contains("spec.region"), "{err}");
        // Plain credentials never ask ECR.
        let plan = plan_binding(&binding(BASIC), &Resolved::default(), &settings(), None).unwrap();
        assert!(plan.subjects[0].request.ecr_registry_ids.is_empty());
    }

    #[test]
    fn web_identity_sends_no_tags_and_mfa_needs_its_seed() {
        let b = binding(
            "method: AssumeRoleWithWebIdentity\nroleArn: arn:aws:iam::123456789012:role/r\nsubjects: [{name: app}]\n",
        );
        let plan = plan_binding(&b, &Resolved::default(), &settings(), None).unwrap();
        assert!(plan.subjects[0].request.tags.is_empty());
        let mfa = binding(
            "method: GetSessionToken\nsubjects: [{name: app}]\nsourceCredentialsSecretRef: {name: keys}\nmfa: {serialNumber: arn:aws:iam::123456789012:mfa/ops, totpSecretRef: {name: s, key: k}}\n",
        );
        let keys = Some(UserKeys {
            access_key_id: "AKIAEXAMPLE".into(),
            secret_access_key: "secret".into(),
        });
        let no_seed = Resolved {
            source_credentials: keys.clone(),
            ..Default::default()
        };
        assert!(plan_binding(&mfa, &no_seed, &settings(), None).is_err());
        let seed = crate::mfa::Seed::parse("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").unwrap();
        let resolved = Resolved {
            totp_seed: Some(seed),
            source_credentials: keys,
            ..Default::default()
        };
        plan_binding(&mfa, &resolved, &settings(), None).unwrap();
    }

    #[test]
    fn secret_template_is_applied() {
        let mut b = binding("roleArn: arn:aws:iam::123456789012:role/r\nsubjects: [{name: app}]\n");
        b.spec.secret = Some(SecretTemplate {
            name: Some("custom".into()),
            profile: Some("reports".into()),
            mount_path: Some("/aws".into()),
            ..Default::default()
        });
        let plan = plan_binding(&b, &Resolved::default(), &settings(), None).unwrap();
        let t = &plan.subjects[0].target;
        assert_eq!(
            (t.name.as_str(), t.profile.as_str(), t.mount_path.as_str()),
            ("custom", "reports", "/aws")
        );
        assert_eq!(
            b.spec.subjects[0],
            Subject {
                kind: SubjectKind::ServiceAccount,
                name: "app".into()
            }
        );
    }

    #[test]
    fn session_methods_need_the_teams_own_keys_unless_the_operator_allows_its_identity() {
        let b = binding("method: GetSessionToken\nsubjects: [{name: app}]\n");
        let err = plan_binding(&b, &Resolved::default(), &settings(), None).unwrap_err();
        assert!(err.0.contains("needs sourceCredentialsSecretRef"), "{err}");
        let mut allowed = settings();
        allowed.allow_operator_identity = true;
        let plan = plan_binding(&b, &Resolved::default(), &allowed, None).unwrap();
        assert_eq!(plan.subjects[0].request.source_credentials, None);

        let with_ref =
            binding("method: GetSessionToken\nsubjects: [{name: app}]\nsourceCredentialsSecretRef: {name: keys}\n");
        let err = plan_binding(&with_ref, &Resolved::default(), &settings(), None).unwrap_err();
        assert!(err.0.contains("sourceCredentialsSecretRef could not be read"), "{err}");
        let keys = UserKeys {
            access_key_id: "AKIAEXAMPLE".into(),
            secret_access_key: "secret".into(),
        };
        let resolved = |secret: &str| Resolved {
            source_credentials: Some(UserKeys {
                secret_access_key: secret.into(),
                ..keys.clone()
            }),
            ..Default::default()
        };
        let plan = plan_binding(&with_ref, &resolved("secret"), &settings(), None).unwrap();
        assert_eq!(plan.subjects[0].request.source_credentials, Some(keys.clone()));
        // New user keys issue anew; the hash shows nothing of them.
        let rotated = plan_binding(&with_ref, &resolved("other"), &settings(), None).unwrap();
        assert_ne!(plan.spec_hash, rotated.spec_hash);
        assert!(!plan.spec_hash.contains("AKIA"));
        // Role methods never need them.
        plan_binding(&binding(BASIC), &Resolved::default(), &settings(), None).unwrap();
    }

    #[test]
    fn an_unset_duration_is_lowered_to_the_grants_cap() {
        // (method, durationSeconds, cap) -> requested
        let table = [
            ("AssumeRole", None, None, None),
            ("AssumeRole", None, Some(900), Some(900)),
            ("AssumeRole", None, Some(3600), None),
            ("AssumeRole", None, Some(7200), None),
            ("AssumeRole", Some(1200), Some(900), Some(1200)),
            ("GetSessionToken", None, Some(3600), Some(3600)),
            ("GetSessionToken", None, Some(43200), None),
            ("GetFederationToken", None, Some(7200), Some(7200)),
        ];
        let mut s = settings();
        s.allow_operator_identity = true;
        for (method, duration, cap, want) in table {
            let mut b = binding(&format!(
                "method: {method}\nsubjects: [{{name: app}}]\nsessionPolicy: '{{}}'\n"
            ));
            if method == "AssumeRole" {
                b.spec.role_arn = Some("arn:aws:iam::123456789012:role/r".into());
            }
            b.spec.duration_seconds = duration;
            let plan = plan_binding(&b, &Resolved::default(), &s, cap).unwrap();
            assert_eq!(
                plan.subjects[0].request.duration_seconds, want,
                "{method} {duration:?} cap {cap:?}"
            );
        }
        // A cap that changes what is requested changes the hash (the Secret is reissued).
        let b = binding(BASIC);
        let uncapped = plan_binding(&b, &Resolved::default(), &settings(), None).unwrap();
        let capped = plan_binding(&b, &Resolved::default(), &settings(), Some(900)).unwrap();
        assert_ne!(uncapped.spec_hash, capped.spec_hash);
    }

    #[test]
    fn the_hash_of_a_binding_without_new_inputs_is_what_earlier_versions_wrote() {
        // Pinned from the version before sourceCredentialsSecretRef and grant caps: an
        // upgrade must not reissue every binding.
        let plan = plan_binding(&binding(BASIC), &Resolved::default(), &settings(), None).unwrap();
        assert_eq!(plan.spec_hash, "feca5d578c401c0f");
        let uncapped = plan_binding(&binding(BASIC), &Resolved::default(), &settings(), Some(7200)).unwrap();
        assert_eq!(uncapped.spec_hash, "feca5d578c401c0f");
    }

    #[test]
    fn tag_keys_that_differ_only_in_case_are_invalid() {
        let mut b = binding(BASIC);
        b.spec.session_tags = Some([("Team".to_string(), "a".to_string()), ("team".into(), "b".into())].into());
        let err = plan_binding(&b, &Resolved::default(), &settings(), None).unwrap_err();
        assert!(err.0.contains("Team and team differ only in case"), "{err}");
        b.spec.session_tags = Some([("Team".to_string(), "a".to_string()), ("teams".into(), "b".into())].into());
        plan_binding(&b, &Resolved::default(), &settings(), None).unwrap();
    }
}
