//! The mutation decision, pure: from a pod being created, the AWSRoleBindings of its
//! namespace (as the webhook keeps them: [`Binding`], indexed in [`Bindings`]) and the
//! namespace's labels, to the JSON patch that wires the credentials in (additions only)
//! and the warnings the user should read.
//!
//! A pod gets the Secret of the one binding whose subject its ServiceAccount is: the Secret
//! as a volume, mounted read-only at the binding's `mountPath` (never with `subPath`, whose
//! files never update), and the AWS variables `AWS_CONFIG_FILE`, `AWS_PROFILE` for a profile
//! other than `default`, and `AWS_REGION`/`AWS_DEFAULT_REGION` when the binding names its
//! region. The AWS variables are one group: a container that sets any variable of
//! [`AWS_VARIABLES`] itself, or has any `envFrom` (which may set them), gets none of them
//! (it still gets the mount) and a warning, so that the SDK never sees a mix of ours and
//! its own. A second admission adds nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::{
    conditions::{READY, Reason},
    crd::{AWSRoleBinding, SecretType},
    naming,
    render::{DEFAULT_MOUNT_PATH, DEFAULT_PROFILE, KEY_CONFIG},
};

/// Pod annotation and Namespace label: `"false"` turns injection off.
pub const INJECT: &str = "kube-sts.io/inject";
/// Pod annotation naming the binding to inject when the ServiceAccount has several.
pub const BINDING_ANNOTATION: &str = "kube-sts.io/binding";
/// The name of the volume the webhook adds (a volume of the Secret under another name is
/// used as it is).
pub const VOLUME_NAME: &str = "kube-sts-credentials";
pub const ENV_CONFIG_FILE: &str = "AWS_CONFIG_FILE";
pub const ENV_PROFILE: &str = "AWS_PROFILE";
pub const ENV_REGION: &str = "AWS_REGION";
pub const ENV_DEFAULT_REGION: &str = "AWS_DEFAULT_REGION";
/// The variables that decide which credentials, profile and region an AWS SDK uses. A
/// container that sets any of them itself gets none of ours.
pub const AWS_VARIABLES: [&str; 6] = [
    ENV_CONFIG_FILE,
    ENV_PROFILE,
    ENV_REGION,
    ENV_DEFAULT_REGION,
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ACCESS_KEY_ID",
];

/// What an admission came to, for the `kube_sts_webhook_admissions_total` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Something was added.
    Injected,
    /// The pod had everything already (a reinvocation, or wired by hand).
    Unchanged,
    /// No binding of the namespace has the pod's ServiceAccount as a subject.
    NotBound,
    /// The pod or its namespace turned injection off.
    OptedOut,
    /// A binding applies but nothing was injected; the warnings say why.
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Injected => "injected",
            Outcome::Unchanged => "unchanged",
            Outcome::NotBound => "not_bound",
            Outcome::OptedOut => "opted_out",
            Outcome::Refused => "refused",
        }
    }
}

/// The Ready condition of a binding, as far as an admission reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyCondition {
    pub reason: String,
    /// The generation the condition was written for (the condition's own
    /// `observedGeneration`, else the status's).
    pub observed_generation: Option<i64>,
}

/// What the webhook keeps of an AWSRoleBinding: what an admission reads and nothing else
/// (no role, policy, Secret labels or annotations, no last-applied configuration). Its
/// namespace is where [`Bindings`] of that namespace keep it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub name: String,
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// The ServiceAccounts of `spec.subjects`.
    pub subjects: Vec<String>,
    /// `spec.secret`: `name`, `mountPath`, `profile`, `type`.
    pub secret_name: Option<String>,
    pub mount_path: Option<String>,
    pub profile: Option<String>,
    pub secret_type: SecretType,
    pub region: Option<String>,
    pub ready: Option<ReadyCondition>,
    /// `status.subjects`: each ServiceAccount with the Secret the operator last wrote for
    /// it (a Secret of an earlier spec may still exist and hold its credentials).
    pub status_secrets: Vec<(String, String)>,
}

impl Binding {
    pub fn project(binding: &AWSRoleBinding) -> Self {
        let secret = binding.spec.secret.as_ref();
        let status = binding.status.as_ref();
        Binding {
            name: binding.name_any(),
            generation: binding.metadata.generation,
            deleting: binding.metadata.deletion_timestamp.is_some(),
            subjects: binding.spec.subjects.iter().map(|s| s.name.clone()).collect(),
            secret_name: secret.and_then(|s| s.name.clone()),
            mount_path: secret.and_then(|s| s.mount_path.clone()),
            profile: secret.and_then(|s| s.profile.clone()),
            secret_type: secret.and_then(|s| s.type_).unwrap_or_default(),
            region: binding.spec.region.clone(),
            ready: status.and_then(|status| {
                let ready = status.conditions.iter().find(|c| c.type_ == READY)?;
                Some(ReadyCondition {
                    reason: ready.reason.clone(),
                    observed_generation: ready.observed_generation.or(status.observed_generation),
                })
            }),
            status_secrets: status
                .map(|s| {
                    s.subjects
                        .iter()
                        .filter_map(|subject| Some((subject.name.clone(), subject.secret_name.clone()?)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn binds(&self, service_account: &str) -> bool {
        self.subjects.iter().any(|s| s == service_account)
    }

    /// The Secret the binding writes for `service_account` (as `plan::subject_secret_name`):
    /// `secret.name`, else `<binding>-<serviceaccount>`.
    fn secret_of(&self, service_account: &str) -> String {
        self.secret_name
            .clone()
            .unwrap_or_else(|| naming::default_secret_name(&self.name, service_account))
    }

    /// Whether the binding reports, for its current generation, that a Secret it does not
    /// own holds its Secret's name.
    fn reports_secret_conflict(&self) -> bool {
        self.ready.as_ref().is_some_and(|ready| {
            ready.reason == Reason::SecretConflict.as_str() && ready.observed_generation == self.generation
        })
    }

    /// The (ServiceAccount, Secret) pairs the binding claims: those of its spec and those
    /// its status says the operator wrote.
    fn claims(&self) -> BTreeSet<(String, String)> {
        self.subjects
            .iter()
            .map(|sa| (sa.clone(), self.secret_of(sa)))
            .chain(self.status_secrets.iter().cloned())
            .collect()
    }
}

/// The bindings of one namespace, indexed for admissions: by name, by subject and by the
/// Secret names they claim. Kept up to date one binding at a time.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    by_name: BTreeMap<String, Binding>,
    /// ServiceAccount → the bindings that have it as a subject.
    by_subject: HashMap<String, BTreeSet<String>>,
    /// Secret name → the (binding, ServiceAccount) pairs that claim it.
    by_secret: HashMap<String, BTreeSet<(String, String)>>,
}

impl Bindings {
    /// Adds `binding`, or replaces the one of its name.
    pub fn insert(&mut self, binding: Binding) {
        self.remove(&binding.name);
        for sa in &binding.subjects {
            self.by_subject
                .entry(sa.clone())
                .or_default()
                .insert(binding.name.clone());
        }
        for (sa, secret) in binding.claims() {
            self.by_secret
                .entry(secret)
                .or_default()
                .insert((binding.name.clone(), sa));
        }
        self.by_name.insert(binding.name.clone(), binding);
    }

    pub fn remove(&mut self, name: &str) -> Option<Binding> {
        let old = self.by_name.remove(name)?;
        for sa in &old.subjects {
            if let Some(names) = self.by_subject.get_mut(sa) {
                names.remove(name);
                if names.is_empty() {
                    self.by_subject.remove(sa);
                }
            }
        }
        for (sa, secret) in old.claims() {
            if let Some(claimants) = self.by_secret.get_mut(&secret) {
                claimants.remove(&(old.name.clone(), sa));
                if claimants.is_empty() {
                    self.by_secret.remove(&secret);
                }
            }
        }
        Some(old)
    }

    pub fn get(&self, name: &str) -> Option<&Binding> {
        self.by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The bindings that have `service_account` as a subject, by name.
    fn of_subject<'a>(&'a self, service_account: &str) -> impl Iterator<Item = &'a Binding> {
        self.by_subject
            .get(service_account)
            .into_iter()
            .flatten()
            .filter_map(|name| self.by_name.get(name))
    }

    /// The (binding, ServiceAccount) pairs that claim the Secret `secret`, in order.
    fn claimants<'a>(&'a self, secret: &str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.by_secret
            .get(secret)
            .into_iter()
            .flatten()
            .map(|(binding, sa)| (binding.as_str(), sa.as_str()))
    }
}

impl FromIterator<Binding> for Bindings {
    fn from_iter<I: IntoIterator<Item = Binding>>(iter: I) -> Self {
        let mut bindings = Bindings::default();
        for b in iter {
            bindings.insert(b);
        }
        bindings
    }
}

/// One JSON Patch `add` operation (the webhook never replaces or removes anything).
#[derive(Clone, Debug, PartialEq)]
pub struct Add {
    pub path: String,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Mutation {
    pub outcome: Outcome,
    pub patch: Vec<Add>,
    /// Admission warnings, shown by kubectl; each starts with `kube-sts: `.
    pub warnings: Vec<String>,
    /// The binding whose Secret the pod gets (or would have got).
    pub binding: Option<String>,
}

impl Mutation {
    fn without_patch(outcome: Outcome, binding: Option<String>, warnings: Vec<String>) -> Self {
        Mutation {
            outcome,
            patch: Vec::new(),
            warnings,
            binding,
        }
    }

    /// The patch as the JSON Patch document the API server applies.
    pub fn json_patch(&self) -> Value {
        Value::Array(
            self.patch
                .iter()
                .map(|op| json!({"op": "add", "path": op.path, "value": op.value}))
                .collect(),
        )
    }
}

/// What one admission sees.
pub struct Admission<'a> {
    /// The namespace of the request (the apiserver's word, not the pod's metadata).
    pub namespace: &'a str,
    pub pod: &'a Pod,
    /// The namespace's labels, as far as the cache knows them.
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    /// The bindings of that namespace.
    pub bindings: &'a Bindings,
}

/// The pod's ServiceAccount: `default` when the pod names none.
pub fn service_account(pod: &Pod) -> String {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.service_account_name.clone())
        .or_else(|| spec.and_then(|s| s.service_account.clone()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into())
}

fn warning(text: String) -> String {
    format!("kube-sts: {text}")
}

/// Where and what the pod gets from one binding.
struct Wiring {
    secret_name: String,
    mount_path: String,
    env: Vec<(&'static str, String)>,
}

impl Wiring {
    fn config_file(&self) -> &str {
        &self.env[0].1
    }
}

fn wiring(binding: &Binding, service_account: &str) -> Wiring {
    let mount_path = binding.mount_path.clone().unwrap_or_else(|| DEFAULT_MOUNT_PATH.into());
    let mut env = vec![(
        ENV_CONFIG_FILE,
        format!("{}/{KEY_CONFIG}", mount_path.trim_end_matches('/')),
    )];
    if let Some(profile) = binding.profile.clone().filter(|p| p != DEFAULT_PROFILE) {
        env.push((ENV_PROFILE, profile));
    }
    if let Some(region) = &binding.region {
        env.push((ENV_REGION, region.clone()));
        env.push((ENV_DEFAULT_REGION, region.clone()));
    }
    Wiring {
        secret_name: binding.secret_of(service_account),
        mount_path,
        env,
    }
}

/// The pod's patch and warnings.
pub fn mutate(admission: &Admission<'_>) -> Mutation {
    let pod = admission.pod;
    let namespace = admission.namespace;
    let bindings = admission.bindings;
    let opted_out =
        |labels: Option<&BTreeMap<String, String>>| labels.and_then(|l| l.get(INJECT)).is_some_and(|v| v == "false");
    if opted_out(admission.namespace_labels) || opted_out(pod.metadata.annotations.as_ref()) {
        return Mutation::without_patch(Outcome::OptedOut, None, Vec::new());
    }
    let sa = service_account(pod);
    let chosen = match pod.annotations().get(BINDING_ANNOTATION).filter(|n| !n.is_empty()) {
        Some(name) => {
            let refuse =
                |text: String| Mutation::without_patch(Outcome::Refused, Some(name.clone()), vec![warning(text)]);
            match bindings.get(name) {
                None => {
                    return refuse(format!(
                        "no AWSRoleBinding {name} in namespace {namespace}; nothing injected"
                    ));
                }
                Some(b) if !b.binds(&sa) => {
                    return refuse(format!(
                        "AWSRoleBinding {name} does not bind ServiceAccount {sa}; nothing injected"
                    ));
                }
                Some(b) if b.deleting => {
                    return refuse(format!("AWSRoleBinding {name} is being deleted; nothing injected"));
                }
                Some(b) if b.secret_type != SecretType::Credentials => {
                    return refuse(format!(
                        "AWSRoleBinding {name} writes a pull Secret (secret.type DockerConfigJson); nothing to mount"
                    ));
                }
                Some(b) => b,
            }
        }
        None => {
            // By name: the list of several is sorted.
            let bound: Vec<&Binding> = bindings
                .of_subject(&sa)
                .filter(|b| b.secret_type == SecretType::Credentials && !b.deleting)
                .collect();
            match bound.as_slice() {
                [] => return Mutation::without_patch(Outcome::NotBound, None, Vec::new()),
                [one] => *one,
                several => {
                    let names: Vec<&str> = several.iter().map(|b| b.name.as_str()).collect();
                    return Mutation::without_patch(
                        Outcome::Refused,
                        None,
                        vec![warning(format!(
                            "ServiceAccount {sa} is a subject of several AWSRoleBindings ({}); name one in the annotation {BINDING_ANNOTATION}; nothing injected",
                            names.join(", ")
                        ))],
                    );
                }
            }
        }
    };
    let name = chosen.name.clone();
    let wiring = wiring(chosen, &sa);
    let refuse = |text: String| Mutation::without_patch(Outcome::Refused, Some(name.clone()), vec![warning(text)]);

    if chosen.reports_secret_conflict() {
        return refuse(format!(
            "AWSRoleBinding {name} reports SecretConflict: Secret {} is not its own; nothing injected",
            wiring.secret_name
        ));
    }
    // The Secret must be this subject's alone: another binding (or another subject) whose
    // Secret has, or had (status), the same name would hand this pod someone else's
    // credentials. A claimant that reports SecretConflict lost the name (the operator
    // writes only Secrets its binding owns); until the operator has said who owns it,
    // nobody gets it.
    let claimed_by = bindings
        .claimants(&wiring.secret_name)
        .filter(|(b, s)| !(*b == name && *s == sa))
        .find(|(b, _)| bindings.get(b).is_some_and(|b| !b.reports_secret_conflict()));
    if let Some((other, other_sa)) = claimed_by {
        return refuse(format!(
            "Secret {} is also the Secret of AWSRoleBinding {other} for ServiceAccount {other_sa}; nothing injected",
            wiring.secret_name
        ));
    }
    inject(pod, &name, &wiring)
}

fn normalized(path: &str) -> &str {
    match path.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    }
}

/// The patch that gives every container the mount and the environment it lacks.
fn inject(pod: &Pod, binding: &str, wiring: &Wiring) -> Mutation {
    let Some(spec) = pod.spec.as_ref() else {
        return Mutation::without_patch(Outcome::Unchanged, Some(binding.into()), Vec::new());
    };
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    // A volume of the whole Secret (any name) is the one to mount; otherwise ours is added.
    let existing = volumes.iter().find(|v| {
        v.secret
            .as_ref()
            .is_some_and(|s| s.secret_name.as_deref() == Some(wiring.secret_name.as_str()) && s.items.is_none())
    });
    let volume_name = match existing {
        Some(v) => v.name.clone(),
        None if volumes.iter().any(|v| v.name == VOLUME_NAME) => {
            return Mutation::without_patch(
                Outcome::Refused,
                Some(binding.into()),
                vec![warning(format!(
                    "the pod has a volume {VOLUME_NAME} that is not Secret {}; nothing injected",
                    wiring.secret_name
                ))],
            );
        }
        None => VOLUME_NAME.to_string(),
    };

    let mut patch = Vec::new();
    let mut warnings = Vec::new();
    let mut mounted = false;
    let lists = [
        ("initContainers", spec.init_containers.as_deref().unwrap_or_default()),
        ("containers", spec.containers.as_slice()),
    ];
    for (list, containers) in lists {
        for (i, container) in containers.iter().enumerate() {
            let base = format!("/spec/{list}/{i}");
            match container_additions(container, &volume_name, wiring) {
                Err(other) => warnings.push(warning(format!(
                    "container {} already mounts {other} at {}; left unchanged",
                    container.name, wiring.mount_path
                ))),
                Ok(additions) => {
                    if let Some(mount) = additions.mount {
                        mounted = true;
                        patch.push(append(&base, "volumeMounts", container.volume_mounts.is_none(), mount));
                    }
                    let mut first = container.env.is_none();
                    for var in additions.env {
                        patch.push(append(&base, "env", first, var));
                        first = false;
                    }
                    if let Some(why) = additions.env_left_alone {
                        warnings.push(warning(format!(
                            "container {} {why}: none of the AWS_* variables added; the credentials are mounted at {} (AWS_CONFIG_FILE={} uses them)",
                            container.name,
                            wiring.mount_path,
                            wiring.config_file()
                        )));
                    }
                }
            }
        }
    }
    if mounted && existing.is_none() {
        let volume = json!({"name": volume_name, "secret": {"secretName": wiring.secret_name}});
        // The volume goes first in the patch, so the mounts refer to a volume that exists.
        patch.insert(0, append("/spec", "volumes", spec.volumes.is_none(), volume));
    }
    let outcome = match (patch.is_empty(), warnings.is_empty()) {
        (false, _) => Outcome::Injected,
        (true, true) => Outcome::Unchanged,
        (true, false) => Outcome::Refused,
    };
    Mutation {
        outcome,
        patch,
        warnings,
        binding: Some(binding.into()),
    }
}

/// `add` of `value` to the list `field` of the object at `base`: the list itself (as a
/// one-element list) when the object has none, else at its end.
fn append(base: &str, field: &str, missing: bool, value: Value) -> Add {
    if missing {
        Add {
            path: format!("{base}/{field}"),
            value: Value::Array(vec![value]),
        }
    } else {
        Add {
            path: format!("{base}/{field}/-"),
            value,
        }
    }
}

/// What one container gets.
struct Additions {
    /// The volumeMount (`None`: it has it).
    mount: Option<Value>,
    /// The AWS variables (none when it has them or sets its own).
    env: Vec<Value>,
    /// Why the container's environment is left alone (it sets AWS variables itself).
    env_left_alone: Option<String>,
}

/// What one container lacks; `Err` names what else the container mounts at the path (it
/// is left alone).
fn container_additions(container: &Container, volume_name: &str, wiring: &Wiring) -> Result<Additions, String> {
    let path = normalized(&wiring.mount_path);
    let at_path = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| normalized(&m.mount_path) == path);
    let mount = match at_path {
        Some(m)
            if m.name == volume_name
                && m.sub_path.as_deref().unwrap_or_default().is_empty()
                && m.sub_path_expr.is_none() =>
        {
            None
        }
        Some(m) if m.name == volume_name => return Err(format!("a subPath of volume {}", m.name)),
        Some(m) => return Err(format!("volume {}", m.name)),
        None => Some(json!({"name": volume_name, "mountPath": wiring.mount_path, "readOnly": true})),
    };
    let own: Vec<&k8s_openapi::api::core::v1::EnvVar> = container
        .env
        .iter()
        .flatten()
        .filter(|e| AWS_VARIABLES.contains(&e.name.as_str()))
        .collect();
    // AWS_CONFIG_FILE pointing at the mounted config: wired already (by an earlier
    // admission, or by hand); whatever else it sets is its choice.
    let wired = own.iter().any(|e| {
        e.name == ENV_CONFIG_FILE && e.value.as_deref() == Some(wiring.config_file()) && e.value_from.is_none()
    });
    let (env, env_left_alone) = if wired {
        (Vec::new(), None)
    } else if !own.is_empty() {
        let names: BTreeSet<&str> = own.iter().map(|e| e.name.as_str()).collect();
        let names: Vec<&str> = names.into_iter().collect();
        (Vec::new(), Some(format!("sets {} itself", names.join(", "))))
    } else if container.env_from.as_ref().is_some_and(|from| !from.is_empty()) {
        (
            Vec::new(),
            Some("has envFrom, which may set AWS_* variables".to_string()),
        )
    } else {
        let env = wiring
            .env
            .iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        (env, None)
    };
    Ok(Additions {
        mount,
        env,
        env_left_alone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::AWSRoleBindingStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    const NS: &str = "team-a";

    fn binding(name: &str, spec: &str) -> AWSRoleBinding {
        let mut b = crate::plan::tests::binding(&format!("roleArn: arn:aws:iam::123456789012:role/r\n{spec}"));
        b.metadata.name = Some(name.into());
        b.metadata.namespace = Some(NS.into());
        b
    }

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).unwrap()
    }

    /// A pod of ServiceAccount `sa` with one container `app` and nothing else.
    fn plain_pod(sa: &str) -> Pod {
        pod(&format!(
            "metadata: {{name: p}}\nspec:\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: x}}]\n"
        ))
    }

    fn run(pod: &Pod, bindings: &[AWSRoleBinding], labels: Option<&BTreeMap<String, String>>) -> Mutation {
        let index: Bindings = bindings.iter().map(Binding::project).collect();
        mutate(&Admission {
            namespace: NS,
            pod,
            namespace_labels: labels,
            bindings: &index,
        })
    }

    /// The pod after the patch, as the API server would store it.
    fn patched(pod: &Pod, mutation: &Mutation) -> Pod {
        let mut doc = serde_json::to_value(pod).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(mutation.json_patch()).unwrap();
        json_patch::patch(&mut doc, &patch).expect("the patch applies");
        serde_json::from_value(doc).unwrap()
    }

    fn env_of(container: &Container) -> Vec<(String, String)> {
        container
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn a_pod_with_only_its_service_account_gets_volume_mount_and_config_file() {
        let bindings = [binding("reports", "subjects: [{name: app}]\n")];
        let pod = plain_pod("app");
        let m = run(&pod, &bindings, None);
        assert_eq!(m.outcome, Outcome::Injected);
        assert!(m.warnings.is_empty());
        assert_eq!(
            m.json_patch(),
            json!([
                {"op": "add", "path": "/spec/volumes", "value": [{"name": VOLUME_NAME, "secret": {"secretName": "reports-app"}}]},
                {"op": "add", "path": "/spec/containers/0/volumeMounts", "value": [{"name": VOLUME_NAME, "mountPath": DEFAULT_MOUNT_PATH, "readOnly": true}]},
                {"op": "add", "path": "/spec/containers/0/env", "value": [{"name": "AWS_CONFIG_FILE", "value": "/var/run/secrets/kube-sts.io/config"}]},
            ])
        );
        // A second admission of the result adds nothing.
        let again = run(&patched(&pod, &m), &bindings, None);
        assert_eq!((again.outcome, again.patch.len()), (Outcome::Unchanged, 0));
    }

    #[test]
    fn every_container_and_init_container_gets_what_it_lacks_appended() {
        let bindings = [binding(
            "reports",
            "subjects: [{name: app}]\nregion: eu-west-1\nsecret: {name: aws, profile: reports, mountPath: /aws/}\n",
        )];
        let pod = pod("metadata: {name: p}
spec:
  serviceAccountName: app
  volumes: [{name: data, emptyDir: {}}]
  initContainers: [{name: init, image: x}]
  containers:
    - {name: app, image: x, env: [{name: LOG, value: debug}], volumeMounts: [{name: data, mountPath: /data}]}
    - {name: sidecar, image: x, env: []}
");
        let m = run(&pod, &bindings, None);
        assert_eq!((m.outcome, m.warnings.len()), (Outcome::Injected, 0));
        let out = patched(&pod, &m);
        let spec = out.spec.as_ref().unwrap();
        let volumes: Vec<String> = spec.volumes.iter().flatten().map(|v| v.name.clone()).collect();
        assert_eq!(volumes, ["data", VOLUME_NAME]);
        let all = pairs(&[
            ("AWS_CONFIG_FILE", "/aws/config"),
            ("AWS_PROFILE", "reports"),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ]);
        assert_eq!(env_of(&spec.init_containers.as_ref().unwrap()[0]), all);
        assert_eq!(env_of(&spec.containers[1]), all);
        // What the container sets itself stays, first; ours are appended.
        let mut app = pairs(&[("LOG", "debug")]);
        app.extend(all.clone());
        assert_eq!(env_of(&spec.containers[0]), app);
        for c in spec.init_containers.iter().flatten().chain(&spec.containers) {
            let mount = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == VOLUME_NAME)
                .unwrap();
            assert_eq!(
                (mount.mount_path.as_str(), mount.read_only, mount.sub_path.as_ref()),
                ("/aws/", Some(true), None)
            );
        }
        assert_eq!(spec.containers[0].volume_mounts.as_ref().unwrap()[0].name, "data");
        assert_eq!(run(&out, &bindings, None).patch, []);
    }

    #[test]
    fn a_container_that_sets_aws_variables_itself_gets_the_mount_and_none_of_ours() {
        let bindings = [binding(
            "reports",
            "subjects: [{name: app}]\nregion: eu-west-1\nsecret: {profile: reports}\n",
        )];
        let config = format!("{DEFAULT_MOUNT_PATH}/config");
        let ours = pairs(&[
            ("AWS_CONFIG_FILE", &config),
            ("AWS_PROFILE", "reports"),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ]);
        let note = |container: &str, why: &str| {
            format!(
                "kube-sts: container {container} {why}: none of the AWS_* variables added; the credentials are mounted at {DEFAULT_MOUNT_PATH} (AWS_CONFIG_FILE={config} uses them)"
            )
        };
        let by_hand =
            format!("env: [{{name: AWS_CONFIG_FILE, value: {config}}}, {{name: AWS_REGION, value: us-east-1}}]");
        // (case, the container's env and envFrom, the env it ends with, the warning)
        type Case<'a> = (&'a str, &'a str, Vec<(String, String)>, Option<String>);
        let cases: Vec<Case> = vec![
            (
                "nothing set",
                "env: [{name: LOG, value: x}]",
                [pairs(&[("LOG", "x")]), ours.clone()].concat(),
                None,
            ),
            (
                "a region of its own: never beside ours (SDKs disagree on which wins)",
                "env: [{name: AWS_REGION, value: us-east-1}]",
                pairs(&[("AWS_REGION", "us-east-1")]),
                Some(note("app", "sets AWS_REGION itself")),
            ),
            (
                "its own config file: our profile would not be in it",
                "env: [{name: AWS_CONFIG_FILE, value: /etc/aws/config}]",
                pairs(&[("AWS_CONFIG_FILE", "/etc/aws/config")]),
                Some(note("app", "sets AWS_CONFIG_FILE itself")),
            ),
            (
                "keys or a credentials file of its own, each named",
                "env: [{name: AWS_SHARED_CREDENTIALS_FILE, value: /c}, {name: AWS_ACCESS_KEY_ID, valueFrom: {secretKeyRef: {name: s, key: k}}}]",
                pairs(&[("AWS_SHARED_CREDENTIALS_FILE", "/c"), ("AWS_ACCESS_KEY_ID", "")]),
                Some(note(
                    "app",
                    "sets AWS_ACCESS_KEY_ID, AWS_SHARED_CREDENTIALS_FILE itself",
                )),
            ),
            (
                "envFrom may set any of them",
                "envFrom: [{configMapRef: {name: settings}}]",
                vec![],
                Some(note("app", "has envFrom, which may set AWS_* variables")),
            ),
            (
                "wired by hand: AWS_CONFIG_FILE at the mount; the rest is its choice",
                &by_hand,
                pairs(&[("AWS_CONFIG_FILE", &config), ("AWS_REGION", "us-east-1")]),
                None,
            ),
        ];
        for (case, env, want_env, want_warning) in cases {
            let pod = pod(&format!(
                "metadata: {{name: p}}\nspec:\n  serviceAccountName: app\n  containers: [{{name: app, image: x, {env}}}]\n"
            ));
            let m = run(&pod, &bindings, None);
            assert_eq!(m.outcome, Outcome::Injected, "{case}: the mount is added");
            assert_eq!(m.warnings, Vec::from_iter(want_warning), "{case}");
            let out = patched(&pod, &m);
            let container = &out.spec.as_ref().unwrap().containers[0];
            assert_eq!(env_of(container), want_env, "{case}");
            assert!(
                container.volume_mounts.iter().flatten().any(|m| m.name == VOLUME_NAME),
                "{case}"
            );
            // Admitted again: nothing more, and the same warning.
            let again = run(&out, &bindings, None);
            assert_eq!(again.patch, [], "{case}");
            assert_eq!(again.warnings, m.warnings, "{case}");
        }
    }

    #[test]
    fn a_pod_wired_by_hand_is_left_as_it_is() {
        let bindings = [binding("reports", "subjects: [{name: app}]\n")];
        let pod = pod("metadata: {name: p}
spec:
  serviceAccountName: app
  volumes: [{name: aws, secret: {secretName: reports-app}}]
  containers:
    - name: app
      image: x
      env: [{name: AWS_CONFIG_FILE, value: /var/run/secrets/kube-sts.io/config}]
      volumeMounts: [{name: aws, mountPath: /var/run/secrets/kube-sts.io/, readOnly: true}]
");
        let m = run(&pod, &bindings, None);
        assert_eq!((m.outcome, m.patch, m.warnings), (Outcome::Unchanged, vec![], vec![]));
    }

    #[test]
    fn the_existing_volume_of_the_secret_is_mounted_where_a_container_lacks_it() {
        let bindings = [binding("reports", "subjects: [{name: app}]\n")];
        let pod = pod("metadata: {name: p}
spec:
  serviceAccountName: app
  volumes: [{name: aws, secret: {secretName: reports-app}}]
  containers: [{name: app, image: x}]
");
        let m = run(&pod, &bindings, None);
        assert_eq!(m.patch[0].path, "/spec/containers/0/volumeMounts");
        assert_eq!(m.patch[0].value[0]["name"], "aws");
        assert!(m.patch.iter().all(|op| !op.path.starts_with("/spec/volumes")));
    }

    #[test]
    fn a_container_mounting_something_else_at_the_path_is_left_alone_with_a_warning() {
        let bindings = [binding("reports", "subjects: [{name: app}]\n")];
        let pod = pod("metadata: {name: p}
spec:
  serviceAccountName: app
  volumes: [{name: other, emptyDir: {}}]
  containers:
    - {name: app, image: x, volumeMounts: [{name: other, mountPath: /var/run/secrets/kube-sts.io}]}
    - {name: second, image: x}
");
        let m = run(&pod, &bindings, None);
        assert_eq!(m.outcome, Outcome::Injected);
        assert_eq!(
            m.warnings,
            ["kube-sts: container app already mounts volume other at /var/run/secrets/kube-sts.io; left unchanged"]
        );
        assert!(m.patch.iter().all(|op| !op.path.starts_with("/spec/containers/0")));
        assert!(m.patch.iter().any(|op| op.path.starts_with("/spec/containers/1")));

        // Alone, that container leaves nothing to do: refused, not injected.
        let alone = pod_with_subpath_mount();
        let m = run(&alone, &bindings, None);
        assert_eq!((m.outcome, m.patch.len()), (Outcome::Refused, 0));
        assert!(m.warnings[0].contains("a subPath of volume aws"), "{:?}", m.warnings);
    }

    fn pod_with_subpath_mount() -> Pod {
        pod("metadata: {name: p}
spec:
  serviceAccountName: app
  volumes: [{name: aws, secret: {secretName: reports-app}}]
  containers: [{name: app, image: x, volumeMounts: [{name: aws, mountPath: /var/run/secrets/kube-sts.io, subPath: config}]}]
")
    }

    #[test]
    fn opt_outs_and_pods_nobody_binds_are_not_touched() {
        let bindings = [binding("reports", "subjects: [{name: app}]\n")];
        let off = BTreeMap::from([(INJECT.to_string(), "false".to_string())]);
        let m = run(&plain_pod("app"), &bindings, Some(&off));
        assert_eq!((m.outcome, m.patch.len(), m.warnings.len()), (Outcome::OptedOut, 0, 0));
        let mut annotated = plain_pod("app");
        annotated.metadata.annotations = Some(off.clone());
        assert_eq!(run(&annotated, &bindings, None).outcome, Outcome::OptedOut);
        let on = BTreeMap::from([(INJECT.to_string(), "true".to_string())]);
        assert_eq!(run(&plain_pod("app"), &bindings, Some(&on)).outcome, Outcome::Injected);
        let m = run(&plain_pod("other"), &bindings, None);
        assert_eq!((m.outcome, m.patch.len(), m.warnings.len()), (Outcome::NotBound, 0, 0));
    }

    #[test]
    fn a_pod_without_a_service_account_is_the_default_one() {
        let bindings = [binding("reports", "subjects: [{name: default}]\n")];
        let pod = pod("metadata: {name: p}\nspec:\n  containers: [{name: app, image: x}]\n");
        let m = run(&pod, &bindings, None);
        assert_eq!(m.outcome, Outcome::Injected);
        assert_eq!(m.patch[0].value[0]["secret"]["secretName"], "reports-default");
    }

    #[test]
    fn several_bindings_need_the_annotation_which_picks_only_among_them() {
        let bindings = [
            binding("reports", "subjects: [{name: app}]\n"),
            binding("billing", "subjects: [{name: app}, {name: other}]\n"),
            binding("foreign", "subjects: [{name: other}]\n"),
        ];
        let m = run(&plain_pod("app"), &bindings, None);
        assert_eq!((m.outcome, m.patch.len()), (Outcome::Refused, 0));
        assert_eq!(
            m.warnings,
            [
                "kube-sts: ServiceAccount app is a subject of several AWSRoleBindings (billing, reports); name one in the annotation kube-sts.io/binding; nothing injected"
            ]
        );
        let named = |name: &str| {
            let mut p = plain_pod("app");
            p.metadata.annotations = Some(BTreeMap::from([(BINDING_ANNOTATION.to_string(), name.to_string())]));
            run(&p, &bindings, None)
        };
        let m = named("billing");
        assert_eq!(m.outcome, Outcome::Injected);
        assert_eq!(m.patch[0].value[0]["secret"]["secretName"], "billing-app");
        // A binding the ServiceAccount is no subject of, or none at all: nothing.
        let m = named("foreign");
        assert_eq!((m.outcome, m.patch.len()), (Outcome::Refused, 0));
        assert_eq!(
            m.warnings,
            ["kube-sts: AWSRoleBinding foreign does not bind ServiceAccount app; nothing injected"]
        );
        let m = named("missing");
        assert_eq!(
            m.warnings,
            ["kube-sts: no AWSRoleBinding missing in namespace team-a; nothing injected"]
        );
    }

    #[test]
    fn a_secret_name_another_subject_claims_is_not_mounted() {
        // `secret.name` set to another binding's Secret, and two default names that collide.
        for bindings in [
            [
                binding("thief", "subjects: [{name: app}]\nsecret: {name: reports-ci}\n"),
                binding("reports", "subjects: [{name: ci}]\n"),
            ],
            [
                binding("a", "subjects: [{name: b-app}]\n"),
                binding("a-b", "subjects: [{name: app}]\n"),
            ],
        ] {
            let sa = &bindings[0].spec.subjects[0].name;
            let m = run(&plain_pod(sa), &bindings, None);
            assert_eq!((m.outcome, m.patch.len()), (Outcome::Refused, 0), "{bindings:?}");
            assert!(
                m.warnings[0].contains("is also the Secret of AWSRoleBinding"),
                "{:?}",
                m.warnings
            );
        }
    }

    fn reporting_conflict(mut b: AWSRoleBinding) -> AWSRoleBinding {
        b.metadata.generation = Some(1);
        b.status = Some(conflict_status(1));
        b
    }

    fn conflict_status(generation: i64) -> AWSRoleBindingStatus {
        AWSRoleBindingStatus {
            observed_generation: Some(generation),
            conditions: vec![Condition {
                type_: READY.into(),
                status: "False".into(),
                reason: Reason::SecretConflict.as_str().into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
                observed_generation: Some(generation),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_claimant_the_operator_refused_loses_the_secret() {
        let thief = binding("thief", "subjects: [{name: three}]\nsecret: {name: reports-app}\n");
        let reports = binding("reports", "subjects: [{name: app}]\n");
        // Before the operator has written a status: nobody.
        assert_eq!(
            run(&plain_pod("app"), &[thief.clone(), reports.clone()], None).outcome,
            Outcome::Refused
        );
        // The operator refused the thief (the Secret is owned by reports).
        let bindings = [reporting_conflict(thief), reports];
        let m = run(&plain_pod("app"), &bindings, None);
        assert_eq!(m.outcome, Outcome::Injected);
        assert_eq!(m.patch[0].value[0]["secret"]["secretName"], "reports-app");
        let m = run(&plain_pod("three"), &bindings, None);
        assert_eq!((m.outcome, m.patch.len()), (Outcome::Refused, 0));
        assert_eq!(
            m.warnings,
            [
                "kube-sts: AWSRoleBinding thief reports SecretConflict: Secret reports-app is not its own; nothing injected"
            ]
        );
    }

    #[test]
    fn a_binding_reporting_a_secret_conflict_is_not_mounted() {
        let mut b = binding("reports", "subjects: [{name: app}]\nsecret: {name: db-password}\n");
        b.metadata.generation = Some(2);
        let conflict = conflict_status;
        b.status = Some(conflict(2));
        let m = run(&plain_pod("app"), std::slice::from_ref(&b), None);
        assert_eq!((m.outcome, m.patch.len()), (Outcome::Refused, 0));
        // A conflict reported for an older generation no longer counts.
        b.status = Some(conflict(1));
        assert_eq!(run(&plain_pod("app"), &[b], None).outcome, Outcome::Injected);
    }

    #[test]
    fn pull_secret_bindings_are_not_mounted() {
        let pull = binding(
            "pull",
            "subjects: [{name: app}]\nregion: eu-west-1\nsecret: {type: DockerConfigJson}\necr: {registryIds: [\"123456789012\"]}\n",
        );
        let creds = binding("reports", "subjects: [{name: app}]\n");
        assert_eq!(
            run(&plain_pod("app"), std::slice::from_ref(&pull), None).outcome,
            Outcome::NotBound
        );
        // Not ambiguous beside a credentials binding.
        assert_eq!(run(&plain_pod("app"), &[pull, creds], None).outcome, Outcome::Injected);
    }

    #[test]
    fn a_foreign_volume_of_our_name_stops_injection() {
        let bindings = [binding("reports", "subjects: [{name: app}]\n")];
        let pod = pod(&format!(
            "metadata: {{name: p}}\nspec:\n  serviceAccountName: app\n  volumes: [{{name: {VOLUME_NAME}, emptyDir: {{}}}}]\n  containers: [{{name: app, image: x}}]\n"
        ));
        let m = run(&pod, &bindings, None);
        assert_eq!((m.outcome, m.patch.len()), (Outcome::Refused, 0));
    }

    #[test]
    fn a_binding_being_deleted_is_never_used_even_when_named() {
        let mut reports = binding("reports", "subjects: [{name: app}]\n");
        reports.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::UNIX_EPOCH,
        ));
        let bindings = [reports, binding("billing", "subjects: [{name: app}]\n")];
        // Not counted among the ServiceAccount's bindings: billing is the only one.
        let m = run(&plain_pod("app"), &bindings, None);
        assert_eq!(m.binding.as_deref(), Some("billing"));
        let mut named = plain_pod("app");
        named.metadata.annotations = Some(BTreeMap::from([(
            BINDING_ANNOTATION.to_string(),
            "reports".to_string(),
        )]));
        let m = run(&named, &bindings, None);
        assert_eq!((m.outcome, m.patch.len()), (Outcome::Refused, 0));
        assert_eq!(
            m.warnings,
            ["kube-sts: AWSRoleBinding reports is being deleted; nothing injected"]
        );
    }

    #[test]
    fn a_secret_the_status_says_another_binding_wrote_is_not_mounted() {
        // `old` used to write `shared` (its status says so) and now names another Secret;
        // until the operator has moved it, `shared` may still hold old's credentials.
        let mut old = binding("old", "subjects: [{name: ci}]\nsecret: {name: renamed}\n");
        old.metadata.generation = Some(2);
        old.status = Some(AWSRoleBindingStatus {
            observed_generation: Some(1),
            subjects: vec![crate::crd::SubjectStatus {
                name: "ci".into(),
                secret_name: Some("shared".into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        let new = binding("new", "subjects: [{name: app}]\nsecret: {name: shared}\n");
        let m = run(&plain_pod("app"), &[old.clone(), new.clone()], None);
        assert_eq!((m.outcome, m.patch.len()), (Outcome::Refused, 0));
        assert_eq!(
            m.warnings,
            [
                "kube-sts: Secret shared is also the Secret of AWSRoleBinding old for ServiceAccount ci; nothing injected"
            ]
        );
        // Once the operator reports the move, the name is free.
        old.status.as_mut().unwrap().subjects[0].secret_name = Some("renamed".into());
        assert_eq!(run(&plain_pod("app"), &[old, new], None).outcome, Outcome::Injected);
    }

    #[test]
    fn the_projection_keeps_only_what_an_admission_reads() {
        let mut b = binding(
            "reports",
            "subjects: [{name: app}, {name: ci}]\nregion: eu-west-1\nsecret: {name: aws, profile: p, mountPath: /aws, labels: {team: a}, annotations: {big: xxxxxxxx}}\n",
        );
        b.metadata.generation = Some(3);
        b.metadata.annotations = Some(BTreeMap::from([(
            "kubectl.kubernetes.io/last-applied-configuration".to_string(),
            "x".repeat(10_000),
        )]));
        b.status = Some(conflict_status(3));
        let projected = Binding::project(&b);
        assert_eq!(
            projected,
            Binding {
                name: "reports".into(),
                generation: Some(3),
                deleting: false,
                subjects: vec!["app".into(), "ci".into()],
                secret_name: Some("aws".into()),
                mount_path: Some("/aws".into()),
                profile: Some("p".into()),
                secret_type: SecretType::Credentials,
                region: Some("eu-west-1".into()),
                ready: Some(ReadyCondition {
                    reason: "SecretConflict".into(),
                    observed_generation: Some(3),
                }),
                status_secrets: vec![],
            }
        );
        assert!(projected.reports_secret_conflict());
    }

    #[test]
    fn the_index_follows_inserts_replacements_and_removals() {
        let a = Binding::project(&binding("a", "subjects: [{name: app}, {name: ci}]\n"));
        let b = Binding::project(&binding("b", "subjects: [{name: app}]\nsecret: {name: a-ci}\n"));
        let mut index: Bindings = [a.clone(), b.clone()].into_iter().collect();
        let subjects = |index: &Bindings, sa: &str| index.of_subject(sa).map(|b| b.name.clone()).collect::<Vec<_>>();
        let claims = |index: &Bindings, secret: &str| {
            index
                .claimants(secret)
                .map(|(b, s)| format!("{b}/{s}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(subjects(&index, "app"), ["a", "b"]);
        assert_eq!(claims(&index, "a-ci"), ["a/ci", "b/app"]);
        assert_eq!(claims(&index, "a-app"), ["a/app"]);
        // b now binds ci under its default name.
        index.insert(Binding::project(&binding("b", "subjects: [{name: ci}]\n")));
        assert_eq!(subjects(&index, "app"), ["a"]);
        assert_eq!(subjects(&index, "ci"), ["a", "b"]);
        assert_eq!(claims(&index, "a-ci"), ["a/ci"]);
        assert_eq!(claims(&index, "b-ci"), ["b/ci"]);
        assert_eq!(index.remove("a").map(|a| a.name), Some("a".into()));
        assert_eq!(index.remove("a"), None);
        index.remove("b");
        assert!(index.is_empty() && index.by_subject.is_empty() && index.by_secret.is_empty());
    }
}
