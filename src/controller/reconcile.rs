//! The reconcile driver for one binding: grants, references, plan, every subject, status.

use super::*;

pub(super) async fn reconcile(cached: Arc<CachedBinding>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics.reconcile_started();
    let (namespace, name) = cached.key();
    tracing::debug!(binding = %name, %namespace, "reconciling");
    let (binding, result) = match cached.binding() {
        Ok(binding) => {
            let result = reconcile_binding(&binding, &ctx).await;
            (Some(binding), result)
        }
        Err(e) => (None, Err(e)),
    };
    ctx.metrics.reconciled(started.elapsed());
    let gone = ctx.stores.bindings.get(&ObjectRef::from_obj(cached.as_ref())).is_none();
    if let Ok(wake) = &result {
        // The binding's own next reconcile: planned here, not by the controller's scheduler
        // (see `wakeups`). A failed reconcile keeps the one planned before and is retried
        // by the error policy.
        ctx.wakeups.set(&namespace, &name, wake.filter(|_| !gone));
    }
    if gone {
        ctx.failed_reconciles
            .lock()
            .expect("failure lock")
            .remove(&(namespace.clone(), name.clone()));
        // Deleted while this reconcile ran: what it recorded after the delete event goes too.
        forget_binding(&namespace, &name, &ctx.subjects, &ctx.metrics);
    } else if let (Some(binding), Err(error @ Error::Kube(_))) = (&binding, &result) {
        report_kubernetes_error(binding, error, &ctx).await;
    }
    result.map(|_| Action::await_change())
}

/// A reconcile that failed on a Kubernetes request says so in `Degraded` (best effort: the
/// apiserver may be what fails). `Ready` keeps what it said: the Secrets are untouched.
async fn report_kubernetes_error(binding: &AWSRoleBinding, error: &Error, ctx: &Context) {
    let mut status = ctx.current_status(binding).unwrap_or_default();
    conditions::set_condition(
        &mut status.conditions,
        DEGRADED,
        true,
        Reason::KubernetesError,
        &format!("reconciling failed, retried with backoff: {error}"),
        binding.metadata.generation,
        ctx.settings.clock.now(),
    );
    if let Err(e) = write_status(binding, status, ctx).await {
        tracing::debug!(error = %e, "could not report the failure in status");
    }
}

/// A reconcile that met no Kubernetes error ends the binding's backoff.
fn kubernetes_ok(binding: &AWSRoleBinding, ctx: &Context) {
    ctx.failed_reconciles
        .lock()
        .expect("failure lock")
        .remove(&binding_key(binding));
}

/// Counts a reconcile that met a Kubernetes error; says when to try again (full jitter,
/// 5 s doubling to 5 min).
fn kubernetes_backoff(binding: (String, String), ctx: &Context) -> (u32, Duration) {
    let failures = {
        let mut failed = ctx.failed_reconciles.lock().expect("failure lock");
        let count = failed.entry(binding).or_default();
        *count += 1;
        *count
    };
    let delay = timing::backoff_delay(failures, rand::random::<f64>(), ctx.settings.clock.now(), None);
    (failures, delay)
}

/// Reconciles the binding; says when to reconcile it again on its own (none: on a change).
pub(super) async fn reconcile_binding(binding: &AWSRoleBinding, ctx: &Context) -> Result<Option<Duration>> {
    let namespace = binding.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let uid = binding.uid().ok_or(Error::MissingField("metadata.uid"))?;
    if binding.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the Secrets through their owner references.
        return Ok(None);
    }
    let now = ctx.settings.clock.now();

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

    let outcomes = join_all(
        plan.subjects
            .iter()
            .map(|sp| reconcile_subject(binding, &plan, sp, &resolved, ctx, now)),
    )
    .await;
    // A subject that met a Kubernetes error does not cost the others their status or their
    // wake-up: it is reported as such and retried with the binding's backoff.
    let mut failed = None;
    let mut results = Vec::with_capacity(outcomes.len());
    for (sp, outcome) in plan.subjects.iter().zip(outcomes) {
        results.push(outcome.unwrap_or_else(|error| {
            let result = kubernetes_failed(sp, binding, &plan, &error, ctx, now);
            failed.get_or_insert(error);
            result
        }));
    }
    delete_stale_secrets(binding, &uid, &plan, ctx).await?;

    let status = build_status(binding, ctx.current_status(binding), &plan, &mut results, None, now);
    write_status(binding, status, ctx).await?;

    let mut wake = results.iter().filter_map(|r| r.wake_at).min();
    match failed {
        Some(error) => {
            ctx.metrics.reconcile_error(error.metric_label());
            let (failures, delay) = kubernetes_backoff(binding_key(binding), ctx);
            tracing::warn!(binding = %binding.name_any(), namespace, %error, failures, retry_in_s = delay.as_secs(), "a subject's Kubernetes request failed; retrying");
            let retry = now + jiff::SignedDuration::try_from(delay).unwrap_or_default();
            wake = Some(wake.map_or(retry, |w| w.min(retry)));
        }
        None => kubernetes_ok(binding, ctx),
    }
    Ok(wake.map(|at| wake_in(at, now)))
}

/// Reads what the binding references in other objects; `Ok(Err(msg))` is an InvalidSpec.
pub(super) async fn resolve_references(
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

/// Why an issuance cannot be prepared now.
pub(super) enum NotPrepared {
    Failed(StsError),
    /// The MFA device's current TOTP code was sent already: try again at this time (the
    /// next 30 s step), without holding a worker.
    NextCodeAt(Timestamp),
}

/// What an issuance needs at the moment it happens: a fresh ServiceAccount token for web
/// identity, an unused TOTP code for MFA.
pub(super) async fn prepare_request(
    binding: &AWSRoleBinding,
    sp: &SubjectPlan,
    resolved: &Resolved,
    ctx: &Context,
) -> std::result::Result<crate::sts::IssueRequest, NotPrepared> {
    let mut request = sp.request.clone();
    if let (Some(mfa), Some(seed)) = (&binding.spec.mfa, &resolved.totp_seed) {
        // STS refuses a code it has seen. Devices are told apart by namespace too: a serial
        // number is only what a binding says it is.
        let device = format!("{}/{}", sp.target.namespace, mfa.serial_number);
        // TOTP codes follow AWS's clock, not a local one that may be wrong.
        let now = ctx.settings.clock.now();
        let unix = now.as_second().max(0) as u64;
        let Some(code) = ctx.mfa_codes.take(&device, seed, unix) else {
            let wait = ctx.mfa_codes.wait_before(&device, unix);
            return Err(NotPrepared::NextCodeAt(
                now + jiff::SignedDuration::try_from(wait).unwrap_or_default(),
            ));
        };
        request.mfa = Some((mfa.serial_number.clone(), code));
    }
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
            .map_err(|e| NotPrepared::Failed(token_request_failed(&sp.service_account, &e)))?;
        request.web_identity_token = token.status.map(|s| s.token);
    }
    Ok(request)
}

/// A TokenRequest failure is the operator's own permission problem (or the apiserver's),
/// not the role's trust policy.
fn token_request_failed(service_account: &str, error: &kube::Error) -> StsError {
    let hint = match error {
        kube::Error::Api(e) if e.code == 403 => {
            " (the operator may not create ServiceAccount tokens: install the chart with rbac.serviceAccountTokens=true, or grant serviceaccounts/token create)"
        }
        _ => "",
    };
    StsError {
        reason: Reason::TokenRequestFailed,
        operation: "TokenRequest",
        code: "TokenRequestFailed".into(),
        message: format!("cannot get a token for ServiceAccount {service_account}: {error}{hint}"),
    }
}

/// The whole binding cannot proceed (invalid spec or not granted). Not granted revokes:
/// the binding's Secrets are deleted. An invalid spec keeps the Secrets it has.
pub(super) async fn binding_problem(
    binding: &AWSRoleBinding,
    ctx: &Context,
    reason: Reason,
    message: String,
    revoke: bool,
    now: Timestamp,
) -> Result<Option<Duration>> {
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
            ctx.metrics.forget_subject(&SubjectLabels {
                namespace: namespace.clone(),
                binding: binding.name_any(),
                service_account: sa_label(&secret),
            });
        }
    }
    // An invalid spec keeps credentials while they are valid, never past their expiry.
    let mut next_expiry: Option<Timestamp> = None;
    if !revoke {
        for secret in owned_secrets(ctx, &namespace, &binding.name_any(), &uid) {
            match render::annotation_time(&secret, render::EXPIRATION_ANNOTATION) {
                Some(expiry) if expiry > now => next_expiry = Some(next_expiry.map_or(expiry, |n| n.min(expiry))),
                _ => expire_secret_in_place(ctx, binding, &secret).await?,
            }
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
        ctx.publish(binding, EventType::Warning, reason.as_str(), message);
    }
    kubernetes_ok(binding, ctx);
    if revoke {
        // Grants are watched: a grant that allows the binding wakes it.
        return Ok(None);
    }
    // What an invalid spec references (a Secret) is not watched: look again soon, and at
    // the latest when the credentials still held run out.
    let recheck = now + RECHECK;
    Ok(Some(wake_in(next_expiry.map_or(recheck, |e| e.min(recheck)), now)))
}

/// How long until `at` (at least a second after `now`, both in STS's time).
pub(super) fn wake_in(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now))
        .unwrap_or_default()
        .max(Duration::from_secs(1))
}

/// A reconcile that failed on a Kubernetes request is retried with its own exponential
/// backoff (full jitter, 5 s doubling to 5 min), so a binding the apiserver keeps refusing
/// does not cost a request every few seconds forever.
pub(super) fn error_policy(binding: Arc<CachedBinding>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(error.metric_label());
    let (failures, delay) = kubernetes_backoff(binding.key(), &ctx);
    tracing::warn!(binding = %binding.name_any(), namespace = binding.namespace().unwrap_or_default(), error = %error, failures, retry_in_s = delay.as_secs(), "reconcile failed; retrying");
    Action::requeue(delay)
}
