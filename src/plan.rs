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
    sts::IssueRequest,
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
}

/// Values a binding references in other objects, read before planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The external ID read through `externalIdSecretRef`.
    pub external_id: Option<String>,
    /// The TOTP seed read through `mfa.totpSecretRef`.
    pub totp_seed: Option<crate::mfa::Seed>,
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
pub fn spec_hash(spec: &AWSRoleBindingSpec, resolved: &Resolved, settings: &IssueSettings) -> String {
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
    hex::encode(hasher.finalize())[..16].to_string()
}

fn check_policy_json(policy: &str) -> Result<(), InvalidSpec> {
    match serde_json::from_str::<Value>(policy) {
        Ok(Value::Object(_)) => Ok(()),
        Ok(_) => Err(InvalidSpec("sessionPolicy must be a JSON object".into())),
        Err(e) => Err(InvalidSpec(format!("sessionPolicy is not valid JSON: {e}"))),
    }
}

pub fn plan_binding(
    binding: &AWSRoleBinding,
    resolved: &Resolved,
    settings: &IssueSettings,
) -> Result<BindingPlan, InvalidSpec> {
    let spec = &binding.spec;
    let namespace = binding.namespace().unwrap_or_default();
    let name = binding.name_any();
    let uid = binding.uid().unwrap_or_default();

    if spec.mfa.is_some() && resolved.totp_seed.is_none() {
        return Err(InvalidSpec("mfa.totpSecretRef could not be read".into()));
    }
    if let Some(policy) = &spec.session_policy {
        check_policy_json(policy)?;
    }
    let user_tags = spec.session_tags.clone().unwrap_or_default();
    let auto_tags = settings.session_tags && spec.method == Method::AssumeRole;
    if auto_tags && user_tags.len() + 3 > MAX_SESSION_TAGS {
        return Err(InvalidSpec(format!(
            "{} session tags plus the operator's 3 kubernetes-* tags exceed AWS's limit of {MAX_SESSION_TAGS}",
            user_tags.len()
        )));
    }
    let external_id = spec.external_id.clone().or_else(|| resolved.external_id.clone());

    let mut note = None;
    let mut duration = spec.duration_seconds;
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
    let hash = spec_hash(spec, resolved, settings);
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
            };
            let target = SecretTarget {
                namespace: namespace.clone(),
                name: template
                    .name
                    .clone()
                    .unwrap_or_else(|| naming::default_secret_name(&name, &sa)),
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
        }
    }

    const BASIC: &str = "roleArn: arn:aws:iam::123456789012:role/r\nsubjects: [{name: app}, {name: job}]\n";

    #[test]
    fn plans_every_subject_with_defaults() {
        let plan = plan_binding(&binding(BASIC), &Resolved::default(), &settings()).unwrap();
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
        let plan = plan_binding(&b, &Resolved::default(), &s).unwrap();
        assert_eq!(
            plan.subjects[0].request.tags,
            vec![("team".to_string(), "a".to_string())]
        );
    }

    #[test]
    fn invalid_policy_json_is_invalid_spec() {
        let mut b = binding(BASIC);
        b.spec.session_policy = Some("{not json".into());
        let err = plan_binding(&b, &Resolved::default(), &settings()).unwrap_err();
        assert!(err.0.contains("sessionPolicy is not valid JSON"), "{err}");
        b.spec.session_policy = Some("[1]".into());
        assert!(plan_binding(&b, &Resolved::default(), &settings()).is_err());
    }

    #[test]
    fn too_many_tags_with_automatic_ones() {
        let mut b = binding(BASIC);
        b.spec.session_tags = Some((0..48).map(|i| (format!("k{i}"), "v".to_string())).collect());
        assert!(plan_binding(&b, &Resolved::default(), &settings()).is_err());
    }

    #[test]
    fn chain_clamps_duration_and_says_so() {
        let mut b = binding(BASIC);
        b.spec.duration_seconds = Some(7200);
        b.spec.chain = Some(vec![ChainHop {
            role_arn: "arn:aws:iam::111111111111:role/hub".into(),
            external_id: None,
        }]);
        let plan = plan_binding(&b, &Resolved::default(), &settings()).unwrap();
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
        )
        .unwrap();
        let c = plan_binding(
            &b,
            &Resolved {
                external_id: Some("two".into()),
                ..Default::default()
            },
            &settings(),
        )
        .unwrap();
        assert_eq!(a.subjects[0].request.external_id.as_deref(), Some("one"));
        assert_ne!(a.spec_hash, c.spec_hash);
        assert!(!a.spec_hash.contains("one"));
    }

    #[test]
    fn hash_is_stable_and_follows_spec_changes() {
        let b = binding(BASIC);
        let h1 = plan_binding(&b, &Resolved::default(), &settings()).unwrap().spec_hash;
        assert_eq!(
            h1,
            plan_binding(&b, &Resolved::default(), &settings()).unwrap().spec_hash
        );
        let mut changed = b.clone();
        changed.spec.duration_seconds = Some(1800);
        assert_ne!(
            h1,
            plan_binding(&changed, &Resolved::default(), &settings())
                .unwrap()
                .spec_hash
        );

        let mut fewer = b.clone();
        fewer.spec.subjects.pop();
        let h2 = plan_binding(&fewer, &Resolved::default(), &settings())
            .unwrap()
            .spec_hash;
        assert_eq!(h1, h2, "subjects stay out of the hash");
    }

    #[test]
    fn federation_gets_a_derived_name_and_no_automatic_tags() {
        let mut b = binding("method: GetFederationToken\nsessionPolicy: '{}'\nsubjects: [{name: app}]\n");
        let plan = plan_binding(&b, &Resolved::default(), &settings()).unwrap();
        let r = &plan.subjects[0].request;
        assert_eq!(r.federated_name.as_deref(), Some("team-a.app"));
        assert!(r.tags.is_empty());
        assert!(r.role_arn.is_none());
        b.spec.federation = Some(crate::crd::Federation {
            name: Some("reports".into()),
        });
        let plan = plan_binding(&b, &Resolved::default(), &settings()).unwrap();
        assert_eq!(plan.subjects[0].request.federated_name.as_deref(), Some("reports"));
    }

    #[test]
    fn pull_secret_plans_registries_and_needs_a_region() {
        let b = binding(
            "roleArn: arn:aws:iam::123456789012:role/r\nsubjects: [{name: app}]\nsecret: {type: DockerConfigJson}\necr: {registryIds: ['111111111111']}\n",
        );
        let plan = plan_binding(&b, &Resolved::default(), &settings()).unwrap();
        assert_eq!(plan.subjects[0].request.ecr_registry_ids, ["111111111111"]);
        assert_eq!(plan.subjects[0].target.secret_type, SecretType::DockerConfigJson);
        let mut no_region = settings();
        no_region.default_region = None;
        let err = plan_binding(&b, &Resolved::default(), &no_region).unwrap_err();
        assert!(err.0.contains("spec.region"), "{err}");
        // Plain credentials never ask ECR.
        let plan = plan_binding(&binding(BASIC), &Resolved::default(), &settings()).unwrap();
        assert!(plan.subjects[0].request.ecr_registry_ids.is_empty());
    }

    #[test]
    fn web_identity_sends_no_tags_and_mfa_needs_its_seed() {
        let b = binding(
            "method: AssumeRoleWithWebIdentity\nroleArn: arn:aws:iam::123456789012:role/r\nsubjects: [{name: app}]\n",
        );
        let plan = plan_binding(&b, &Resolved::default(), &settings()).unwrap();
        assert!(plan.subjects[0].request.tags.is_empty());
        let mfa = binding(
            "method: GetSessionToken\nsubjects: [{name: app}]\nmfa: {serialNumber: arn:aws:iam::123456789012:mfa/ops, totpSecretRef: {name: s, key: k}}\n",
        );
        assert!(plan_binding(&mfa, &Resolved::default(), &settings()).is_err());
        let seed = crate::mfa::Seed::parse("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ").unwrap();
        let resolved = Resolved {
            totp_seed: Some(seed),
            ..Default::default()
        };
        plan_binding(&mfa, &resolved, &settings()).unwrap();
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
        let plan = plan_binding(&b, &Resolved::default(), &settings()).unwrap();
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
}
