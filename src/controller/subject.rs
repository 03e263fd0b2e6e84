//! One subject of a binding: decide (pure, `crate::decision`), then act on the decision
//! (keep, restore, issue, wait) and report the outcome.

use super::*;

/// What the operator cannot watch cheaply (a foreign Secret of the wanted name going away)
/// is looked at again this often.
pub(super) const RECHECK: jiff::SignedDuration = jiff::SignedDuration::from_secs(30);

/// When credentials should be refreshed (stable across restarts).
pub(super) fn refresh_time(plan: &SubjectPlan, binding: &AWSRoleBinding, creds: &Credentials) -> Timestamp {
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
pub(super) struct SubjectResult {
    pub(super) outcome: SubjectOutcome,
    pub(super) status: SubjectStatus,
    pub(super) wake_at: Option<Timestamp>,
    /// A note from issuance the Ready message should carry.
    pub(super) note: Option<String>,
}

pub(super) async fn reconcile_subject(
    binding: &AWSRoleBinding,
    plan: &BindingPlan,
    sp: &SubjectPlan,
    resolved: &Resolved,
    ctx: &Context,
    now: Timestamp,
) -> Result<SubjectResult> {
    let target = &sp.target;
    let (key, labels) = subject_ids(sp);
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

    let existing = current_secret(ctx, target).await?;
    let stored = existing.as_ref().map(|secret| stored_secret(secret, target));
    let mut state = ctx.state(&key, binding);
    let decision = decision::decide(
        &decision::Inputs {
            secret: stored.as_ref(),
            service_account_exists: ctx
                .stores
                .service_accounts
                .contains(&target.namespace, &sp.service_account),
            remembered: &state,
            spec_hash: &plan.spec_hash,
            now,
        },
        |creds| refresh_time(sp, binding, creds),
        |creds| {
            existing
                .as_ref()
                .is_some_and(|s| render::secret_matches(s, &render::render_secret(creds, target)))
        },
    );
    // The Secret's credentials while they are still valid (for status and backoff).
    let (secret_expiration, current_spec) = held(stored.as_ref(), plan);

    match decision {
        Decision::Conflict => {
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
                );
            }
            status.message = message.clone();
            Ok(SubjectResult {
                outcome: not_ready(Reason::SecretConflict, message),
                status,
                wake_at: Some(now + RECHECK),
                note: None,
            })
        }
        Decision::ServiceAccountGone => {
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
            Ok(SubjectResult {
                outcome: not_ready(Reason::ServiceAccountNotFound, message),
                status,
                wake_at: None,
                note: None,
            })
        }
        Decision::Keep { creds, restore, .. } => {
            if restore {
                // Deleted or edited by someone, or the cache lags behind: write back what
                // was issued, no STS call.
                let desired = render::render_secret(&creds, target);
                if let Err(refused) = write_subject_secret(ctx, &desired, existing.as_ref()).await? {
                    return Ok(unwritten(sp, plan, state, status, stored.as_ref(), refused, ctx, now));
                }
                tracing::info!(secret = %target.name, namespace = %target.namespace, "restored managed Secret");
            }
            // Good credentials end whatever failing was remembered (resumed from status, or
            // of a spec that was changed back).
            let state = SubjectState {
                creds: Some(Box::new((plan.spec_hash.clone(), creds.clone()))),
                ..Default::default()
            };
            ctx.set_state(key, state.clone());
            // Held here now: the cached Secret need not keep a second copy.
            if let Some(secret) = existing.as_ref().filter(|_| !restore)
                && stored.as_ref().and_then(|s| s.creds.as_ref()) == Some(&creds)
            {
                let version = secret.resource_version().unwrap_or_default();
                ctx.stores
                    .secrets
                    .forget_credentials(&target.namespace, &target.name, &version);
            }
            Ok(ready_result(sp, binding, &creds, status, &state, ctx, &labels, now))
        }
        Decision::Wait { retry_at, expire, .. } => {
            if expire && expire_credentials(ctx, target, existing.as_ref(), secret_expiration).await? {
                state.creds = None;
                ctx.set_state(key, state.clone());
            }
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
        Decision::Issue => {
            issue(
                binding,
                plan,
                sp,
                resolved,
                ctx,
                existing.as_ref(),
                stored.as_ref(),
                status,
                state,
                now,
            )
            .await
        }
    }
}

/// Asks STS, writes the Secret, and records the outcome.
#[allow(clippy::too_many_arguments)]
pub(super) async fn issue(
    binding: &AWSRoleBinding,
    plan: &BindingPlan,
    sp: &SubjectPlan,
    resolved: &Resolved,
    ctx: &Context,
    existing: Option<&Secret>,
    stored: Option<&decision::StoredSecret>,
    status: SubjectStatus,
    mut state: SubjectState,
    now: Timestamp,
) -> Result<SubjectResult> {
    let target = &sp.target;
    let (key, labels) = subject_ids(sp);
    let (secret_expiration, current_spec) = held(stored, plan);
    tracing::debug!(service_account = %sp.service_account, "issuing credentials");
    let issued = match prepare_request(binding, sp, resolved, ctx).await {
        Ok(request) => ctx.issuer.issue(&request).await,
        Err(NotPrepared::Failed(e)) => Err(e),
        Err(NotPrepared::NextCodeAt(at)) => {
            // Not a failure: the next TOTP step comes within 30 s.
            return Ok(failed_result(
                sp,
                &state,
                status,
                secret_expiration,
                current_spec,
                Some(at),
                now,
                ctx,
                &labels,
            ));
        }
    };
    // The Secret held credentials before (the cache may have handed its copy to the state).
    let refreshed = stored.is_some_and(|s| s.creds.is_some()) || (existing.is_some() && state.creds.is_some());
    match issued {
        Ok(crate::sts::Issued { creds }) => {
            // Remembered before writing: should the write fail, the retry writes these
            // credentials again instead of asking STS for new ones.
            let state = SubjectState {
                creds: Some(Box::new((plan.spec_hash.clone(), creds.clone()))),
                ..Default::default()
            };
            ctx.set_state(key, state.clone());
            let desired = render::render_secret(&creds, target);
            if let Err(refused) = write_subject_secret(ctx, &desired, existing).await? {
                return Ok(unwritten(sp, plan, state, status, stored, refused, ctx, now));
            }
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
            );
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
            );
            // Recorded before the Secret write below: should it fail, the backoff stands.
            ctx.set_state(key.clone(), state.clone());
            let run_out = secret_expiration.is_none_or(|e| e <= now);
            if run_out && expire_credentials(ctx, target, existing, secret_expiration).await? {
                state.creds = None;
                ctx.set_state(key, state.clone());
            }
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

pub(super) fn describe_failure(sp: &SubjectPlan, mut err: StsError) -> StsError {
    if err.reason == Reason::AccessDenied {
        err.message = access_denied_hint(&sp.request, &err.message);
    }
    err
}

#[allow(clippy::too_many_arguments)]
pub(super) fn ready_result(
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
    ctx.metrics.subject(labels, Some(creds.expiration), now, state.failures);
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
pub(super) fn failed_result(
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
    // What the Secret holds (not credentials this process keeps but could not write).
    let in_secret = |c: &&(String, Credentials)| valid_until == Some(c.1.expiration);
    if let Some((_, creds)) = state.creds.as_deref().filter(in_secret) {
        status.access_key_id = Some(creds.access_key_id.clone());
        status.arn = creds.arn.clone();
        status.issued_at = Some(Time(creds.issued_at));
    }
    ctx.metrics.subject(labels, valid_until, now, state.failures);
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

/// Writes a subject's Secret; `Ok(Err(..))` says why it was not written, as a reason for
/// status: someone else's Secret of that name (`SecretConflict`), or a Secret the apiserver
/// refuses as invalid (`InvalidSpec`, e.g. `spec.secret.labels` that are no valid labels),
/// which no retry can fix.
async fn write_subject_secret(
    ctx: &Context,
    desired: &Secret,
    existing: Option<&Secret>,
) -> Result<std::result::Result<(), (Reason, String)>> {
    match write_secret(ctx, desired, existing).await {
        Ok(Ok(())) => Ok(Ok(())),
        Ok(Err(message)) => Ok(Err((Reason::SecretConflict, message))),
        Err(Error::Kube(kube::Error::Api(e))) if refuses_metadata(&e) => Ok(Err((
            Reason::InvalidSpec,
            format!("the apiserver refuses Secret {}: {}", desired.name_any(), e.message),
        ))),
        // Anything else (an admission policy, a webhook, a quota) is a Kubernetes error,
        // retried with backoff.
        Err(e) => Err(e),
    }
}

/// Whether the apiserver refused a Secret as invalid for its labels or annotations alone
/// (what `spec.secret` sets, or what was added to the Secret): every cause names one.
fn refuses_metadata(e: &kube::core::Status) -> bool {
    let causes = e.details.as_ref().map(|d| d.causes.as_slice()).unwrap_or_default();
    e.code == 422
        && !causes.is_empty()
        && causes
            .iter()
            .all(|c| c.field.starts_with("metadata.labels") || c.field.starts_with("metadata.annotations"))
}

/// The result of a subject whose Secret could not be written for `reason`.
///
/// Someone else's Secret of that name (`SecretConflict`) is not watched: looked at again
/// soon. A Secret the apiserver refuses (`InvalidSpec`) is refused for this spec whatever
/// is retried: the spec is remembered as refused (no STS call until it changes), the
/// credentials the Secret still holds stay until they expire, and are removed then.
#[allow(clippy::too_many_arguments)]
fn unwritten(
    sp: &SubjectPlan,
    plan: &BindingPlan,
    mut state: SubjectState,
    mut status: SubjectStatus,
    stored: Option<&decision::StoredSecret>,
    (reason, message): (Reason, String),
    ctx: &Context,
    now: Timestamp,
) -> SubjectResult {
    if reason == Reason::InvalidSpec {
        let (key, labels) = subject_ids(sp);
        // Counted once per spec: a count that changed at every pass would write status,
        // and the status write wake the binding again.
        if state.refused_spec.as_deref() != Some(plan.spec_hash.as_str()) {
            state.failures += 1;
        }
        state.creds = None;
        state.retry_at = None;
        state.refused_spec = Some(plan.spec_hash.clone());
        state.last_error = Some((reason, message));
        ctx.set_state(key, state.clone());
        let (secret_expiration, current_spec) = held(stored, plan);
        return failed_result(
            sp,
            &state,
            status,
            secret_expiration,
            current_spec,
            None,
            now,
            ctx,
            &labels,
        );
    }
    status.message = message.clone();
    SubjectResult {
        outcome: SubjectOutcome {
            name: sp.service_account.clone(),
            ready: false,
            has_valid_credentials: false,
            problem: Some((reason, message)),
        },
        status,
        wake_at: Some(now + RECHECK),
        note: None,
    }
}

/// The result of a subject whose reconcile failed on a Kubernetes request: what it holds
/// is reported from the cache, the failure counted, and the retry is the binding's backoff.
pub(super) fn kubernetes_failed(
    sp: &SubjectPlan,
    binding: &AWSRoleBinding,
    plan: &BindingPlan,
    error: &Error,
    ctx: &Context,
    now: Timestamp,
) -> SubjectResult {
    let (key, labels) = subject_ids(sp);
    let target = &sp.target;
    let stored = ctx
        .stores
        .secrets
        .get(&target.namespace, &target.name)
        .map(|secret| stored_secret(&secret, target));
    let mut state = ctx.state(&key, binding);
    let message = format!("{error}");
    state.last_error = Some((Reason::KubernetesError, message));
    let (secret_expiration, current_spec) = held(stored.as_ref(), plan);
    failed_result(
        sp,
        &state,
        SubjectStatus {
            name: sp.service_account.clone(),
            secret_name: Some(target.name.clone()),
            ..Default::default()
        },
        secret_expiration,
        current_spec,
        state.retry_at,
        now,
        ctx,
        &labels,
    )
}

/// What status needs of the subject's Secret: the expiry of what it holds (or held, once
/// emptied), and whether it was written for the current spec.
fn held(stored: Option<&decision::StoredSecret>, plan: &BindingPlan) -> (Option<Timestamp>, bool) {
    (
        stored.and_then(|s| s.expiration),
        stored.is_some_and(|s| s.spec_hash.as_deref() == Some(plan.spec_hash.as_str())),
    )
}

/// A subject's key in the remembered state and its metric labels.
fn subject_ids(sp: &SubjectPlan) -> (SubjectKey, SubjectLabels) {
    let target = &sp.target;
    let key = (
        target.namespace.clone(),
        target.binding.clone(),
        sp.service_account.clone(),
    );
    let labels = SubjectLabels {
        namespace: target.namespace.clone(),
        binding: target.binding.clone(),
        service_account: sp.service_account.clone(),
    };
    (key, labels)
}
