//! The reconcile loop: read → plan (pure) → act (STS, Secret writes) → status.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt, channel::mpsc::UnboundedSender, future::join_all};
use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::{Namespace, Secret, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;

use crate::{
    Error, Result,
    conditions::{self, DEGRADED, READY, Reason, SubjectOutcome},
    crd::{AWSRoleBinding, AWSRoleBindingStatus, AWSRoleGrant, SubjectStatus},
    grants::{GrantRequest, GrantVerdict, grant_allows},
    metrics::{Metrics, SubjectLabels},
    plan::{self, BindingPlan, IssueSettings, Resolved, SubjectPlan},
    render::{
        self, BINDING_LABEL, Credentials, KEY_ACCESS_KEY_ID, KEY_SECRET_ACCESS_KEY, MANAGED_BY, MANAGED_BY_LABEL,
        SERVICE_ACCOUNT_LABEL,
    },
    sts::{Issuer, StsError, access_denied_hint},
    timing,
};

pub const FIELD_MANAGER: &str = "kube-sts";

/// How the operator runs (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: Option<String>,
    pub require_grants: bool,
    pub issue: IssueSettings,
    pub concurrency: u16,
}

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
pub struct WrittenStatuses(HashMap<(String, String), (String, AWSRoleBindingStatus)>);

fn binding_key(binding: &AWSRoleBinding) -> (String, String) {
    (binding.namespace().unwrap_or_default(), binding.name_any())
}

impl WrittenStatuses {
    /// The binding's status as far as this process knows: what it wrote, while the cached
    /// binding is still the version it wrote from; else the cached status.
    fn current(&self, binding: &AWSRoleBinding) -> Option<AWSRoleBindingStatus> {
        match self.0.get(&binding_key(binding)) {
            Some((version, status)) if binding.resource_version().as_ref() == Some(version) => Some(status.clone()),
            _ => binding.status.clone(),
        }
    }

    /// Forgets what the cache now shows (a version other than the one written from).
    fn seen(&mut self, binding: &AWSRoleBinding) {
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
#[derive(Debug, Default)]
pub struct SecretIndex {
    by_owner: HashMap<String, std::collections::HashSet<ObjectRef<Secret>>>,
    owner_of: HashMap<ObjectRef<Secret>, String>,
}

impl SecretIndex {
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

fn controller_uid(secret: &Secret) -> Option<String> {
    secret
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "AWSRoleBinding")
        .map(|o| o.uid.clone())
}

impl Stores {
    async fn wait_ready(&self) {
        let _ = futures::join!(
            self.secrets.wait_until_ready(),
            self.service_accounts.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.grants.wait_until_ready(),
        );
    }
}

type SubjectKey = (String, String, String);

/// Forgets what the operator kept about a deleted binding: per-subject state and metric
/// series (its Secrets go with the garbage collector).
fn forget_binding(binding: &AWSRoleBinding, subjects: &Mutex<HashMap<SubjectKey, SubjectState>>, metrics: &Metrics) {
    let (namespace, name) = binding_key(binding);
    subjects.lock().expect("state lock").retain(|(ns, b, sa), _| {
        let gone = *ns == namespace && *b == name;
        if gone {
            metrics.forget_subject(&SubjectLabels {
                namespace: ns.clone(),
                binding: b.clone(),
                service_account: sa.clone(),
            });
        }
        !gone
    });
}

/// What the operator remembers about one subject between reconciles.
#[derive(Debug, Default, Clone)]
struct SubjectState {
    /// The last credentials this process issued or adopted (to restore an edited Secret).
    creds: Option<(String, Credentials)>,
    failures: u32,
    retry_at: Option<Timestamp>,
    last_error: Option<(Reason, String)>,
    /// The spec hash whose request STS refused as invalid: not asked again until it changes.
    refused_spec: Option<String>,
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub issuer: Arc<dyn Issuer>,
    pub settings: Settings,
    pub stores: Stores,
    subjects: Arc<Mutex<HashMap<SubjectKey, SubjectState>>>,
    mfa_codes: crate::mfa::CodeLedger,
}

impl Context {
    fn current_status(&self, binding: &AWSRoleBinding) -> Option<AWSRoleBindingStatus> {
        self.stores
            .written_statuses
            .lock()
            .expect("status lock")
            .current(binding)
    }

    fn new(
        client: Client,
        metrics: Arc<Metrics>,
        issuer: Arc<dyn Issuer>,
        settings: Settings,
        stores: Stores,
        instance: Option<String>,
        subjects: Arc<Mutex<HashMap<SubjectKey, SubjectState>>>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            issuer,
            settings,
            stores,
            subjects,
            mfa_codes: crate::mfa::CodeLedger::default(),
        }
    }

    fn state(&self, key: &SubjectKey) -> SubjectState {
        self.subjects
            .lock()
            .expect("state lock")
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    fn set_state(&self, key: SubjectKey, state: SubjectState) {
        self.subjects.lock().expect("state lock").insert(key, state);
    }

    fn forget(&self, key: &SubjectKey) {
        self.subjects.lock().expect("state lock").remove(key);
    }

    async fn publish(&self, binding: &AWSRoleBinding, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &binding.object_ref(&())).await {
            tracing::warn!(error = %e, "publishing event failed");
        }
    }
}

fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

fn is_owned_by(secret: &Secret, uid: &str) -> bool {
    secret
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// When credentials should be refreshed (stable across restarts).
fn refresh_time(plan: &SubjectPlan, binding: &AWSRoleBinding, creds: &Credentials) -> Timestamp {
    let key = format!(
        "{}/{}/{}/{}",
        plan.target.namespace, plan.target.binding, plan.service_account, creds.issued_at
    );
    let lead = binding
        .spec
        .refresh_before_seconds
        .map(|s| jiff::SignedDuration::from_secs(i64::from(s)));
    timing::refresh_at(
        creds.issued_at,
        creds.expiration,
        lead,
        timing::stable_jitter_fraction(&key),
    )
}

/// What one subject ended up as, plus when to look at it again.
struct SubjectResult {
    outcome: SubjectOutcome,
    status: SubjectStatus,
    wake_at: Option<Timestamp>,
    /// A note from issuance the Ready message should carry.
    note: Option<String>,
}

async fn reconcile(binding: Arc<AWSRoleBinding>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    tracing::debug!(binding = %binding.name_any(), "reconciling");
    let result = reconcile_binding(&binding, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    if ctx
        .stores
        .bindings
        .get(&ObjectRef::from_obj(binding.as_ref()))
        .is_none()
    {
        // Deleted while this reconcile ran: what it recorded after the delete event goes too.
        forget_binding(&binding, &ctx.subjects, &ctx.metrics);
    }
    result
}

async fn reconcile_binding(binding: &AWSRoleBinding, ctx: &Context) -> Result<Action> {
    let namespace = binding.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let uid = binding.uid().ok_or(Error::MissingField("metadata.uid"))?;
    if binding.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the Secrets through their owner references.
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();

    // Grants first: a binding no grant allows reads nothing (no referenced Secret) and
    // loses its Secrets, whatever else is wrong with it.
    let mut duration_cap = None;
    if ctx.settings.require_grants {
        let labels = ctx
            .stores
            .namespaces
            .get(&ObjectRef::new(&namespace))
            .map(|ns| ns.labels().clone())
            .unwrap_or_default();
        let request = GrantRequest::for_binding(
            &binding.spec,
            &namespace,
            &labels,
            ctx.settings.issue.allow_operator_identity,
        );
        let grants = ctx.stores.grants.state();
        let verdict = grant_allows(
            grants
                .iter()
                .map(|g| (g.metadata.name.as_deref().unwrap_or(""), &g.spec)),
            &request,
        );
        match verdict {
            GrantVerdict::Allowed(admission) => duration_cap = admission.max_duration_seconds,
            GrantVerdict::Denied { message } => {
                return binding_problem(binding, ctx, Reason::RoleNotGranted, message, true, now).await;
            }
        }
    }
    if let Err(e) = plan::check_identity_source(&binding.spec, &ctx.settings.issue) {
        return binding_problem(binding, ctx, Reason::InvalidSpec, e.0, false, now).await;
    }
    let resolved = match resolve_references(binding, &namespace, ctx).await? {
        Ok(resolved) => resolved,
        Err(message) => return binding_problem(binding, ctx, Reason::InvalidSpec, message, false, now).await,
    };
    let plan = match plan::plan_binding(binding, &resolved, &ctx.settings.issue, duration_cap) {
        Ok(plan) => plan,
        Err(e) => return binding_problem(binding, ctx, Reason::InvalidSpec, e.0, false, now).await,
    };

    let results = join_all(
        plan.subjects
            .iter()
            .map(|sp| reconcile_subject(binding, &plan, sp, &resolved, ctx, now)),
    )
    .await;
    let mut results = results.into_iter().collect::<Result<Vec<_>>>()?;
    delete_stale_secrets(binding, &uid, &plan, ctx).await?;

    let status = build_status(binding, ctx.current_status(binding), &plan, &mut results, None, now);
    write_status(binding, status, ctx).await?;

    let wake = results.iter().filter_map(|r| r.wake_at).min();
    Ok(match wake {
        Some(at) => Action::requeue(
            Duration::try_from(at.duration_since(Timestamp::now()))
                .unwrap_or_default()
                .max(Duration::from_secs(1)),
        ),
        None => Action::await_change(),
    })
}

/// Reads one key of a Secret in the binding's namespace; `Ok(Err(msg))` says what is missing.
async fn read_secret_key(
    ctx: &Context,
    namespace: &str,
    field: &str,
    reference: &crate::crd::SecretKeyRef,
) -> Result<std::result::Result<String, String>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(secret) = api.get_opt(&reference.name).await.map_err(Error::Kube)? else {
        return Ok(Err(format!("{field}: Secret {} not found", reference.name)));
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&reference.key))
        .map(|v| String::from_utf8_lossy(&v.0).trim().to_string());
    Ok(value.ok_or_else(|| format!("{field}: Secret {} has no key {}", reference.name, reference.key)))
}

/// Reads what the binding references in other objects; `Ok(Err(msg))` is an InvalidSpec.
async fn resolve_references(
    binding: &AWSRoleBinding,
    namespace: &str,
    ctx: &Context,
) -> Result<std::result::Result<Resolved, String>> {
    let mut resolved = Resolved::default();
    if let Some(reference) = &binding.spec.external_id_secret_ref {
        let value = match read_secret_key(ctx, namespace, "externalIdSecretRef", reference).await? {
            Ok(value) => value,
            Err(message) => return Ok(Err(message)),
        };
        let valid = (2..=1224).contains(&value.len())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c));
        if !valid {
            return Ok(Err(format!(
                "externalIdSecretRef: key {} of Secret {} is not a valid external ID (2..1224 characters of [\\w+=,.@:/-])",
                reference.key, reference.name
            )));
        }
        resolved.external_id = Some(value);
    }
    if let Some(mfa) = &binding.spec.mfa {
        let value = match read_secret_key(ctx, namespace, "mfa.totpSecretRef", &mfa.totp_secret_ref).await? {
            Ok(value) => value,
            Err(message) => return Ok(Err(message)),
        };
        match crate::mfa::Seed::parse(&value) {
            Ok(seed) => resolved.totp_seed = Some(seed),
            Err(e) => {
                return Ok(Err(format!(
                    "mfa.totpSecretRef: key {} of Secret {}: {e}",
                    mfa.totp_secret_ref.key, mfa.totp_secret_ref.name
                )));
            }
        }
    }
    if let Some(reference) = &binding.spec.source_credentials_secret_ref {
        let mut keys = Vec::new();
        for key in [KEY_ACCESS_KEY_ID, KEY_SECRET_ACCESS_KEY] {
            let reference = crate::crd::SecretKeyRef {
                name: reference.name.clone(),
                key: key.into(),
            };
            match read_secret_key(ctx, namespace, "sourceCredentialsSecretRef", &reference).await? {
                Ok(value) if !value.is_empty() => keys.push(value),
                Ok(_) => {
                    return Ok(Err(format!(
                        "sourceCredentialsSecretRef: key {key} of Secret {} is empty",
                        reference.name
                    )));
                }
                Err(message) => return Ok(Err(message)),
            }
        }
        let [access_key_id, secret_access_key] = <[String; 2]>::try_from(keys).expect("two keys read");
        resolved.source_credentials = Some(crate::sts::UserKeys {
            access_key_id,
            secret_access_key,
        });
    }
    Ok(Ok(resolved))
}

/// What an issuance needs at the moment it happens: a fresh ServiceAccount token for web
/// identity, an unused TOTP code for MFA.
async fn prepare_request(
    binding: &AWSRoleBinding,
    sp: &SubjectPlan,
    resolved: &Resolved,
    ctx: &Context,
) -> std::result::Result<crate::sts::IssueRequest, StsError> {
    let mut request = sp.request.clone();
    if request.method == crate::crd::Method::AssumeRoleWithWebIdentity {
        let web = binding.spec.web_identity.clone();
        let audience = web
            .as_ref()
            .and_then(|w| w.audience.clone())
            .unwrap_or_else(|| "sts.amazonaws.com".into());
        let expiration = web.as_ref().and_then(|w| w.token_expiration_seconds).unwrap_or(3600);
        let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &sp.target.namespace);
        let token_request = k8s_openapi::api::authentication::v1::TokenRequest {
            spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
                audiences: vec![audience],
                expiration_seconds: Some(expiration),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let token = api
            .create_token_request(&sp.service_account, &PostParams::default(), &token_request)
            .await
            .map_err(|e| StsError {
                reason: Reason::AccessDenied,
                operation: "TokenRequest",
                code: "TokenRequestFailed".into(),
                message: format!("cannot get a token for ServiceAccount {}: {e}", sp.service_account),
            })?;
        request.web_identity_token = token.status.map(|s| s.token);
    }
    if let (Some(mfa), Some(seed)) = (&binding.spec.mfa, &resolved.totp_seed) {
        // STS refuses a code it has seen: wait for the next 30 s step when this one is used.
        let code = loop {
            let now = Timestamp::now().as_second().max(0) as u64;
            if let Some(code) = ctx.mfa_codes.take(&mfa.serial_number, seed, now) {
                break code;
            }
            tokio::time::sleep(ctx.mfa_codes.wait_before(&mfa.serial_number, now)).await;
        };
        request.mfa = Some((mfa.serial_number.clone(), code));
    }
    Ok(request)
}

/// The whole binding cannot proceed (invalid spec or not granted). Not granted revokes:
/// the binding's Secrets are deleted. An invalid spec keeps the Secrets it has.
async fn binding_problem(
    binding: &AWSRoleBinding,
    ctx: &Context,
    reason: Reason,
    message: String,
    revoke: bool,
    now: Timestamp,
) -> Result<Action> {
    let namespace = binding.namespace().unwrap_or_default();
    let uid = binding.uid().unwrap_or_default();
    let current = ctx.current_status(binding);
    let changed_reason = current
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
        .is_none_or(|c| c.reason != reason.as_str() || c.message != message);
    if revoke {
        for secret in owned_secrets(ctx, &namespace, &binding.name_any(), &uid) {
            delete_secret(ctx, &secret).await?;
            ctx.forget(&(namespace.clone(), binding.name_any(), sa_label(&secret)));
        }
    }
    let mut status = current.unwrap_or_default();
    if revoke {
        status.subjects.clear();
        status.expiration = None;
        status.next_refresh_time = None;
    }
    let verdict = conditions::binding_verdict(Some((reason, message.clone())), &[], None);
    apply_verdict(&mut status, binding, &verdict, now);
    write_status(binding, status, ctx).await?;
    if changed_reason {
        tracing::info!(binding = %binding.name_any(), namespace, reason = reason.as_str(), %message, "binding cannot proceed");
        ctx.publish(binding, EventType::Warning, reason.as_str(), message).await;
    }
    Ok(Action::await_change())
}

fn sa_label(secret: &Secret) -> String {
    secret.labels().get(SERVICE_ACCOUNT_LABEL).cloned().unwrap_or_default()
}

fn owned_secrets(ctx: &Context, namespace: &str, binding: &str, uid: &str) -> Vec<Arc<Secret>> {
    let refs = ctx.stores.secret_owners.lock().expect("index lock").owned_by(uid);
    refs.iter()
        .filter_map(|r| ctx.stores.secrets.get(r))
        .filter(|s| {
            s.namespace().as_deref() == Some(namespace)
                && s.labels().get(BINDING_LABEL).map(String::as_str) == Some(binding)
                && is_owned_by(s, uid)
        })
        .collect()
}

async fn delete_secret(ctx: &Context, secret: &Secret) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &secret.namespace().unwrap_or_default());
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: secret.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&secret.name_any(), &params).await {
        Ok(_) => {
            ctx.metrics.api_write("secrets", "delete");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Deletes Secrets of subjects no longer in the binding.
async fn delete_stale_secrets(binding: &AWSRoleBinding, uid: &str, plan: &BindingPlan, ctx: &Context) -> Result<()> {
    let namespace = binding.namespace().unwrap_or_default();
    let wanted = plan::secret_names(plan);
    for secret in owned_secrets(ctx, &namespace, &binding.name_any(), uid) {
        let sa = sa_label(&secret);
        if wanted.get(sa.as_str()) != Some(&secret.name_any().as_str()) {
            tracing::info!(secret = %secret.name_any(), namespace, "deleting Secret of a removed subject");
            delete_secret(ctx, &secret).await?;
            let key = (namespace.clone(), binding.name_any(), sa.clone());
            if !wanted.contains_key(sa.as_str()) {
                ctx.forget(&key);
                ctx.metrics.forget_subject(&SubjectLabels {
                    namespace: namespace.clone(),
                    binding: binding.name_any(),
                    service_account: sa,
                });
            }
        }
    }
    Ok(())
}

/// The Secret of a subject as it is now: from the cache, or (when the cache has none) from
/// the API, since a Secret someone else created carries none of our labels.
async fn current_secret(ctx: &Context, target: &render::SecretTarget) -> Result<Option<Arc<Secret>>> {
    if let Some(secret) = ctx
        .stores
        .secrets
        .get(&ObjectRef::new(&target.name).within(&target.namespace))
    {
        return Ok(Some(secret));
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &target.namespace);
    Ok(api.get_opt(&target.name).await.map_err(Error::Kube)?.map(Arc::new))
}

/// Writes `desired` over `existing` (apply), or creates it. A Secret's type never changes
/// in Kubernetes, so an owned Secret of the other type (the binding's `secret.type` changed)
/// is deleted and created anew.
async fn write_secret(
    ctx: &Context,
    desired: &Secret,
    existing: Option<&Secret>,
) -> Result<std::result::Result<(), String>> {
    let namespace = desired.namespace().unwrap_or_default();
    let name = desired.name_any();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut exists = existing.is_some();
    if let Some(existing) = existing.filter(|e| e.type_ != desired.type_) {
        delete_secret(ctx, existing).await?;
        exists = false;
    }
    if exists {
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(desired),
        )
        .await
        .map_err(Error::Kube)?;
        ctx.metrics.api_write("secrets", "apply");
        return Ok(Ok(()));
    }
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&params, desired).await {
        Ok(_) => {
            ctx.metrics.api_write("secrets", "create");
            Ok(Ok(()))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Err(format!(
            "Secret {name} was created by someone else meanwhile; it is left untouched"
        ))),
        Err(e) => Err(Error::Kube(e)),
    }
}

async fn reconcile_subject(
    binding: &AWSRoleBinding,
    plan: &BindingPlan,
    sp: &SubjectPlan,
    resolved: &Resolved,
    ctx: &Context,
    now: Timestamp,
) -> Result<SubjectResult> {
    let target = &sp.target;
    let uid = target.binding_uid.as_str();
    let key: SubjectKey = (
        target.namespace.clone(),
        target.binding.clone(),
        sp.service_account.clone(),
    );
    let labels = SubjectLabels {
        namespace: target.namespace.clone(),
        binding: target.binding.clone(),
        service_account: sp.service_account.clone(),
    };
    let mut status = SubjectStatus {
        name: sp.service_account.clone(),
        secret_name: Some(target.name.clone()),
        ..Default::default()
    };
    let not_ready = |reason: Reason, message: String| SubjectOutcome {
        name: sp.service_account.clone(),
        ready: false,
        has_valid_credentials: false,
        problem: Some((reason, message)),
    };

    let sa_exists = ctx
        .stores
        .service_accounts
        .get(&ObjectRef::new(&sp.service_account).within(&target.namespace))
        .is_some();
    let existing = current_secret(ctx, target).await?;

    if let Some(secret) = &existing
        && !is_owned_by(secret, uid)
    {
        let message = format!(
            "Secret {} exists and is not owned by this binding; it is left untouched",
            target.name
        );
        if binding_ready_reason(binding) != Some(Reason::SecretConflict.as_str()) {
            ctx.publish(
                binding,
                EventType::Warning,
                Reason::SecretConflict.as_str(),
                message.clone(),
            )
            .await;
        }
        status.message = message.clone();
        return Ok(SubjectResult {
            outcome: not_ready(Reason::SecretConflict, message),
            status,
            wake_at: None,
            note: None,
        });
    }

    if !sa_exists {
        if let Some(secret) = &existing {
            delete_secret(ctx, secret).await?;
        }
        ctx.forget(&key);
        ctx.metrics.forget_subject(&labels);
        let message = format!(
            "ServiceAccount {} not found in namespace {}",
            sp.service_account, target.namespace
        );
        status.message = message.clone();
        return Ok(SubjectResult {
            outcome: not_ready(Reason::ServiceAccountNotFound, message),
            status,
            wake_at: None,
            note: None,
        });
    }

    let mut state = ctx.state(&key);
    let expired_marker = existing
        .as_ref()
        .is_some_and(|s| s.annotations().contains_key(render::EXPIRED_ANNOTATION));
    let stored = existing.as_deref().and_then(|s| render::read_credentials(s, target));
    let stored_hash = existing
        .as_ref()
        .and_then(|s| s.annotations().get(render::SPEC_HASH_ANNOTATION).cloned());
    let secret_expiration = existing
        .as_deref()
        .filter(|_| !expired_marker)
        .and_then(|s| render::annotation_time(s, render::EXPIRATION_ANNOTATION));

    // Credentials good for the current spec: what the Secret holds, else what we remember.
    let current = match (&stored, &state.creds) {
        (Some(c), _) if stored_hash.as_deref() == Some(plan.spec_hash.as_str()) => Some(c.clone()),
        (_, Some((hash, c))) if hash == &plan.spec_hash => Some(c.clone()),
        _ => None,
    };
    if let Some(creds) = current.filter(|c| now < refresh_time(sp, binding, c)) {
        let desired = render::render_secret(&creds, target);
        let intact = existing.as_deref().is_some_and(|s| render::secret_matches(s, &desired));
        if !intact {
            // Deleted or edited by someone: put back what we issued, no STS call.
            if let Err(message) = write_secret(ctx, &desired, existing.as_deref()).await? {
                status.message = message.clone();
                return Ok(SubjectResult {
                    outcome: not_ready(Reason::SecretConflict, message),
                    status,
                    wake_at: None,
                    note: None,
                });
            }
            tracing::info!(secret = %target.name, namespace = %target.namespace, "restored managed Secret");
        }
        state.creds = Some((plan.spec_hash.clone(), creds.clone()));
        ctx.set_state(key, state.clone());
        return Ok(ready_result(sp, binding, &creds, status, &state, ctx, &labels, now));
    }

    // Issuance is due (new, refresh, spec change, or lost credentials) unless STS refused
    // this very request as invalid (asking again cannot help) or backing off.
    let current_spec = stored_hash.as_deref() == Some(&plan.spec_hash);
    if state.refused_spec.as_deref() == Some(plan.spec_hash.as_str()) {
        if expire_credentials(ctx, target, existing.as_deref(), secret_expiration, expired_marker, now).await? {
            state.creds = None;
            ctx.set_state(key, state.clone());
        }
        return Ok(failed_result(
            sp,
            &state,
            status,
            secret_expiration,
            current_spec,
            None,
            now,
            ctx,
            &labels,
        ));
    }
    if let Some(retry_at) = state.retry_at.filter(|at| *at > now) {
        return Ok(failed_result(
            sp,
            &state,
            status,
            secret_expiration,
            current_spec,
            Some(retry_at),
            now,
            ctx,
            &labels,
        ));
    }
    tracing::debug!(service_account = %sp.service_account, "issuing credentials");
    let issued = match prepare_request(binding, sp, resolved, ctx).await {
        Ok(request) => ctx.issuer.issue(&request).await,
        Err(e) => Err(e),
    };
    match issued {
        Ok(crate::sts::Issued { creds }) => {
            // Remembered before writing: should the write fail, the retry writes these
            // credentials again instead of asking STS for new ones.
            let state = SubjectState {
                creds: Some((plan.spec_hash.clone(), creds.clone())),
                ..Default::default()
            };
            ctx.set_state(key, state.clone());
            let desired = render::render_secret(&creds, target);
            if let Err(message) = write_secret(ctx, &desired, existing.as_deref()).await? {
                status.message = message.clone();
                return Ok(SubjectResult {
                    outcome: not_ready(Reason::SecretConflict, message),
                    status,
                    wake_at: None,
                    note: None,
                });
            }
            let refreshed = existing.is_some() && !expired_marker;
            let note = format!(
                "{} credentials for ServiceAccount {} into Secret {} (access key {}, expires {})",
                if refreshed { "refreshed" } else { "issued" },
                sp.service_account,
                target.name,
                creds.access_key_id,
                render::rfc3339(creds.expiration)
            );
            tracing::info!(namespace = %target.namespace, binding = %target.binding, service_account = %sp.service_account, access_key_id = %creds.access_key_id, expiration = %render::rfc3339(creds.expiration), refreshed, "credentials written");
            ctx.publish(
                binding,
                EventType::Normal,
                if refreshed {
                    "CredentialsRefreshed"
                } else {
                    "CredentialsIssued"
                },
                note,
            )
            .await;
            Ok(ready_result(sp, binding, &creds, status, &state, ctx, &labels, now))
        }
        Err(err) => {
            let err = describe_failure(sp, err);
            state.failures += 1;
            state.last_error = Some((err.reason, err.message.clone()));
            let retry_at = if err.reason == Reason::InvalidSpec {
                // STS refused the request itself: the same spec will be refused again.
                state.refused_spec = Some(plan.spec_hash.clone());
                state.retry_at = None;
                None
            } else {
                let delay = timing::backoff_delay(state.failures, rand::random::<f64>(), now, secret_expiration);
                let at = now + jiff::SignedDuration::try_from(delay).unwrap_or_default();
                state.retry_at = Some(at);
                Some(at)
            };
            tracing::warn!(namespace = %target.namespace, binding = %target.binding, service_account = %sp.service_account, reason = err.reason.as_str(), code = %err.code, error = %err.message, failures = state.failures, retry_at = ?retry_at.map(render::rfc3339), "issuing credentials failed");
            ctx.publish(
                binding,
                EventType::Warning,
                "IssueFailed",
                format!(
                    "{} for ServiceAccount {}: {}",
                    err.reason.as_str(),
                    sp.service_account,
                    err.message
                ),
            )
            .await;
            if expire_credentials(ctx, target, existing.as_deref(), secret_expiration, expired_marker, now).await? {
                state.creds = None;
            }
            ctx.set_state(key, state.clone());
            Ok(failed_result(
                sp,
                &state,
                status,
                secret_expiration,
                current_spec,
                retry_at,
                now,
                ctx,
                &labels,
            ))
        }
    }
}

/// Credentials that have run out are never left looking valid: once the Secret's expiry
/// has passed they are removed from it. Says whether they have run out.
async fn expire_credentials(
    ctx: &Context,
    target: &render::SecretTarget,
    existing: Option<&Secret>,
    secret_expiration: Option<Timestamp>,
    expired_marker: bool,
    now: Timestamp,
) -> Result<bool> {
    let Some(secret) = existing else {
        return Ok(false);
    };
    if secret_expiration.is_some_and(|e| e > now) {
        return Ok(false);
    }
    if !expired_marker {
        let expired_at = secret_expiration.unwrap_or(now);
        write_secret(ctx, &render::render_expired_secret(target, expired_at), Some(secret))
            .await?
            .ok();
        tracing::warn!(secret = %secret.name_any(), namespace = %target.namespace, "credentials expired and could not be refreshed; removed them from the Secret");
    }
    Ok(true)
}

fn binding_ready_reason(binding: &AWSRoleBinding) -> Option<&str> {
    binding
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.as_str())
}

fn describe_failure(sp: &SubjectPlan, mut err: StsError) -> StsError {
    if err.reason == Reason::AccessDenied {
        err.message = access_denied_hint(&sp.request, &err.message);
    }
    err
}

#[allow(clippy::too_many_arguments)]
fn ready_result(
    sp: &SubjectPlan,
    binding: &AWSRoleBinding,
    creds: &Credentials,
    mut status: SubjectStatus,
    state: &SubjectState,
    ctx: &Context,
    labels: &SubjectLabels,
    now: Timestamp,
) -> SubjectResult {
    let refresh = refresh_time(sp, binding, creds);
    status.arn = creds.arn.clone();
    status.access_key_id = Some(creds.access_key_id.clone());
    status.issued_at = Some(Time(creds.issued_at));
    status.expiration = Some(Time(creds.expiration));
    status.next_refresh_time = Some(Time(refresh));
    ctx.metrics.subject(
        labels,
        Some(creds.expiration.duration_since(now).as_secs()),
        state.failures,
    );
    SubjectResult {
        outcome: SubjectOutcome {
            name: sp.service_account.clone(),
            ready: true,
            has_valid_credentials: true,
            problem: None,
        },
        status,
        wake_at: Some(refresh),
        note: creds.note.clone(),
    }
}

#[allow(clippy::too_many_arguments)]
fn failed_result(
    sp: &SubjectPlan,
    state: &SubjectState,
    mut status: SubjectStatus,
    secret_expiration: Option<Timestamp>,
    current_spec: bool,
    retry_at: Option<Timestamp>,
    now: Timestamp,
    ctx: &Context,
    labels: &SubjectLabels,
) -> SubjectResult {
    let valid_until = secret_expiration.filter(|e| *e > now);
    let (reason, message) = state
        .last_error
        .clone()
        .unwrap_or((Reason::Pending, "waiting to retry".into()));
    let problem = match (valid_until, secret_expiration) {
        (None, Some(_)) => (
            Reason::CredentialsExpired,
            format!("credentials expired and refreshing failed: {message}"),
        ),
        _ => (reason, message.clone()),
    };
    status.consecutive_failures = state.failures;
    status.message = message;
    status.expiration = valid_until.map(Time);
    status.next_refresh_time = retry_at.map(Time);
    if let Some((_, creds)) = state.creds.as_ref().filter(|_| valid_until.is_some()) {
        status.access_key_id = Some(creds.access_key_id.clone());
        status.arn = creds.arn.clone();
        status.issued_at = Some(Time(creds.issued_at));
    }
    ctx.metrics.subject(
        labels,
        valid_until.map(|e| e.duration_since(now).as_secs()),
        state.failures,
    );
    // Wake for the retry, or earlier when the current credentials run out.
    let wake_at = match (retry_at, valid_until) {
        (Some(retry), Some(expiry)) => Some(retry.min(expiry)),
        (retry, expiry) => retry.or(expiry),
    };
    SubjectResult {
        outcome: SubjectOutcome {
            name: sp.service_account.clone(),
            ready: valid_until.is_some() && current_spec,
            has_valid_credentials: valid_until.is_some(),
            problem: Some(problem),
        },
        status,
        wake_at,
        note: None,
    }
}

fn apply_verdict(
    status: &mut AWSRoleBindingStatus,
    binding: &AWSRoleBinding,
    verdict: &conditions::Verdict,
    now: Timestamp,
) {
    let generation = binding.metadata.generation;
    status.observed_generation = generation;
    let (ready, reason, message) = &verdict.ready;
    conditions::set_condition(&mut status.conditions, READY, *ready, *reason, message, generation, now);
    let (degraded, reason, message) = &verdict.degraded;
    conditions::set_condition(
        &mut status.conditions,
        DEGRADED,
        *degraded,
        *reason,
        message,
        generation,
        now,
    );
}

fn build_status(
    binding: &AWSRoleBinding,
    current: Option<AWSRoleBindingStatus>,
    plan: &BindingPlan,
    results: &mut [SubjectResult],
    problem: Option<(Reason, String)>,
    now: Timestamp,
) -> AWSRoleBindingStatus {
    let mut status = current.unwrap_or_default();
    let outcomes: Vec<SubjectOutcome> = results.iter().map(|r| r.outcome.clone()).collect();
    let mut notes: Vec<String> = plan.note.iter().cloned().collect();
    for note in results.iter().filter_map(|r| r.note.clone()) {
        if !notes.contains(&note) {
            notes.push(note);
        }
    }
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    let verdict = conditions::binding_verdict(problem, &outcomes, note.as_deref());
    apply_verdict(&mut status, binding, &verdict, now);
    status.subjects = results.iter().map(|r| r.status.clone()).collect();
    status.expiration = status
        .subjects
        .iter()
        .filter_map(|s| s.expiration.clone())
        .min_by_key(|t| t.0);
    status.next_refresh_time = status
        .subjects
        .iter()
        .filter_map(|s| s.next_refresh_time.clone())
        .min_by_key(|t| t.0);
    status
}

/// Writes status with server-side apply, only when it differs from what is there.
async fn write_status(binding: &AWSRoleBinding, status: AWSRoleBindingStatus, ctx: &Context) -> Result<()> {
    if ctx.current_status(binding).as_ref() == Some(&status) {
        return Ok(());
    }
    let key = binding_key(binding);
    let api: Api<AWSRoleBinding> = Api::namespaced(ctx.client.clone(), &key.0);
    let patch = json!({
        "apiVersion": "kube-sts.io/v1alpha1",
        "kind": "AWSRoleBinding",
        "status": status,
    });
    match api
        .patch_status(
            &binding.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => {
            ctx.metrics.api_write("awsrolebindings/status", "apply");
            let version = binding.resource_version().unwrap_or_default();
            ctx.stores
                .written_statuses
                .lock()
                .expect("status lock")
                .0
                .insert(key, (version, status));
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

fn error_policy(_binding: Arc<AWSRoleBinding>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, "reconcile failed; retrying");
    ctx.metrics.reconcile_error(error.metric_label());
    Action::requeue(Duration::from_secs(5))
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The caches keep no managedFields: the operator never reads them, and they are often the
/// largest part of an object's metadata.
fn strip_managed_fields<K: ResourceExt>(object: &mut K) {
    object.managed_fields_mut().clear();
}

/// Drives a reflector in a task of its own (so its cache fills whatever the controller is
/// doing) and turns every touched object into reconcile requests for the bindings it affects.
fn drive<K, S, M>(name: &'static str, stream: S, requests: UnboundedSender<ObjectRef<AWSRoleBinding>>, affected: M)
where
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

fn bindings_where(
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

/// Runs the controller until a shutdown signal.
pub async fn run(
    client: Client,
    issuer: Arc<dyn Issuer>,
    metrics: Arc<Metrics>,
    settings: Settings,
    instance: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = settings.namespace.clone();
    let (bindings, writer) = reflector::store();
    let written_statuses = Arc::new(Mutex::new(WrittenStatuses::default()));
    let subjects = Arc::new(Mutex::new(HashMap::new()));
    let (written, kept, meter) = (written_statuses.clone(), subjects.clone(), metrics.clone());
    let binding_events = reflector(
        writer,
        watcher(
            api_for::<AWSRoleBinding>(&client, ns.as_deref()),
            watcher::Config::default(),
        )
        .modify(strip_managed_fields),
    )
    .default_backoff()
    .inspect_ok(move |event| match event {
        watcher::Event::Apply(binding) | watcher::Event::InitApply(binding) => {
            written.lock().expect("status lock").seen(binding);
        }
        watcher::Event::Delete(binding) => {
            written.lock().expect("status lock").0.remove(&binding_key(binding));
            forget_binding(binding, &kept, &meter);
        }
        watcher::Event::Init | watcher::Event::InitDone => {}
    })
    .applied_objects();
    let controller = Controller::for_stream(binding_events, bindings.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(settings.concurrency));
    let (requests, requested) = futures::channel::mpsc::unbounded();

    let (secrets, writer) = reflector::store();
    let selector = managed_selector();
    let api = api_for::<Secret>(&client, ns.as_deref());
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().labels(&selector)).modify(strip_managed_fields),
    )
    .default_backoff();
    let secret_owners = Arc::new(Mutex::new(SecretIndex::default()));
    let (index, cache) = (secret_owners.clone(), secrets.clone());
    drive(
        "secrets",
        stream.touched_objects(),
        requests.clone(),
        move |secret: Secret| {
            let namespace = secret.namespace().unwrap_or_default();
            // The reflector has applied the event already: the cache says whether it is gone.
            let at = ObjectRef::from(&secret);
            let owner = cache.get(&at).as_deref().and_then(controller_uid);
            index.lock().expect("index lock").update(at, owner);
            secret
                .owner_references()
                .iter()
                .filter(|o| o.controller == Some(true) && o.kind == "AWSRoleBinding")
                .map(|o| ObjectRef::new(&o.name).within(&namespace))
                .collect()
        },
    );

    let (service_accounts, writer) = reflector::store();
    let api: Api<PartialObjectMeta<ServiceAccount>> = match ns.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(strip_managed_fields),
    )
    .default_backoff();
    let store = bindings.clone();
    drive(
        "serviceaccounts",
        stream.touched_objects(),
        requests.clone(),
        move |sa: PartialObjectMeta<ServiceAccount>| {
            let (namespace, name) = (sa.namespace(), sa.name_any());
            bindings_where(&store, |b| {
                b.namespace() == namespace && b.spec.subjects.iter().any(|s| s.name == name)
            })
        },
    );

    let (namespaces, writer) = reflector::store();
    let config = match &ns {
        Some(name) => watcher::Config::default().fields(&format!("metadata.name={name}")),
        None => watcher::Config::default(),
    };
    let api = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
    let stream = reflector(writer, watcher(api, config).modify(strip_managed_fields)).default_backoff();
    let store = bindings.clone();
    drive(
        "namespaces",
        stream.touched_objects(),
        requests.clone(),
        move |namespace: PartialObjectMeta<Namespace>| {
            let name = namespace.name_any();
            bindings_where(&store, |b| b.namespace().as_deref() == Some(name.as_str()))
        },
    );

    let (grants, writer) = reflector::store();
    let api = Api::<AWSRoleGrant>::all(client.clone());
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(strip_managed_fields),
    )
    .default_backoff();
    let store = bindings.clone();
    // A grant may allow or forbid any binding: re-check them all.
    drive(
        "awsrolegrants",
        stream.touched_objects(),
        requests,
        move |_: AWSRoleGrant| bindings_where(&store, |_| true),
    );

    let stores = Stores {
        bindings: bindings.clone(),
        secrets,
        service_accounts,
        namespaces,
        grants,
        secret_owners,
        written_statuses,
    };
    // Decide nothing before every cache is complete (a restart must see every Secret).
    // Waited for once, here: Store::wait_until_ready wakes only the last of several waiters.
    let shutdown = futures::FutureExt::shared(shutdown);
    tokio::select! {
        () = stores.wait_ready() => {}
        () = shutdown.clone() => {
            tracing::info!("stopped before the caches synced");
            return;
        }
    }
    metrics.set_ready(true);
    tracing::info!("caches synced");

    let ctx = Arc::new(Context::new(
        client, metrics, issuer, settings, stores, instance, subjects,
    ));
    controller
        .reconcile_on(requested)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    tracing::info!("controller stopped");
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
