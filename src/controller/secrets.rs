//! Secret I/O: finding a subject's Secret, writing it (create or apply), deleting it,
//! removing run-out credentials, and reading the keys a binding references.

use super::*;

pub(super) fn is_owned_by(secret: &Secret, uid: &str) -> bool {
    secret
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// Reads one key of a Secret in the binding's namespace; `Ok(Err(msg))` says what is missing.
pub(super) async fn read_secret_key(
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

pub(super) fn sa_label(secret: &Secret) -> String {
    secret.labels().get(SERVICE_ACCOUNT_LABEL).cloned().unwrap_or_default()
}

pub(super) fn owned_secrets(ctx: &Context, namespace: &str, binding: &str, uid: &str) -> Vec<Arc<Secret>> {
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

pub(super) async fn delete_secret(ctx: &Context, secret: &Secret) -> Result<()> {
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
pub(super) async fn delete_stale_secrets(
    binding: &AWSRoleBinding,
    uid: &str,
    plan: &BindingPlan,
    ctx: &Context,
) -> Result<()> {
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
pub(super) async fn current_secret(ctx: &Context, target: &render::SecretTarget) -> Result<Option<Arc<Secret>>> {
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
pub(super) async fn write_secret(
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

/// What the decision needs to know of a subject's Secret.
pub(super) fn stored_secret(secret: &Secret, target: &render::SecretTarget) -> decision::StoredSecret {
    let expired = secret.annotations().contains_key(render::EXPIRED_ANNOTATION);
    decision::StoredSecret {
        owned: is_owned_by(secret, &target.binding_uid),
        creds: render::read_credentials(secret, target),
        spec_hash: secret.annotations().get(render::SPEC_HASH_ANNOTATION).cloned(),
        expiration: render::annotation_time(secret, render::EXPIRATION_ANNOTATION).filter(|_| !expired),
    }
}

/// Removes run-out credentials from the Secret (once: an emptied Secret has no expiry
/// annotation left). Says whether the Secret's credentials are gone.
pub(super) async fn expire_credentials(
    ctx: &Context,
    target: &render::SecretTarget,
    existing: Option<&Secret>,
    secret_expiration: Option<Timestamp>,
) -> Result<bool> {
    let Some(secret) = existing else {
        return Ok(false);
    };
    let emptied = secret.annotations().contains_key(render::EXPIRED_ANNOTATION);
    if !emptied {
        let expired_at = secret_expiration.unwrap_or_else(|| ctx.settings.clock.now());
        write_secret(ctx, &render::render_expired_secret(target, expired_at), Some(secret))
            .await?
            .ok();
        tracing::warn!(secret = %secret.name_any(), namespace = %target.namespace, "credentials expired and could not be refreshed; removed them from the Secret");
    }
    Ok(true)
}

/// Removes run-out credentials from a Secret the binding owns when there is no plan to
/// render it from (the spec became invalid): its identity comes from the Secret itself.
pub(super) async fn expire_secret_in_place(ctx: &Context, binding: &AWSRoleBinding, secret: &Secret) -> Result<()> {
    if secret.annotations().contains_key(render::EXPIRED_ANNOTATION) {
        return Ok(());
    }
    let template = binding.spec.secret.clone().unwrap_or_default();
    let target = render::SecretTarget {
        namespace: secret.namespace().unwrap_or_default(),
        name: secret.name_any(),
        binding: binding.name_any(),
        binding_uid: binding.uid().unwrap_or_default(),
        service_account: sa_label(secret),
        spec_hash: secret
            .annotations()
            .get(render::SPEC_HASH_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
        role_arn: secret.annotations().get(render::ROLE_ARN_ANNOTATION).cloned(),
        region: None,
        profile: render::DEFAULT_PROFILE.into(),
        mount_path: render::DEFAULT_MOUNT_PATH.into(),
        secret_type: match secret.type_.as_deref() {
            Some("kubernetes.io/dockerconfigjson") => crate::crd::SecretType::DockerConfigJson,
            _ => crate::crd::SecretType::Credentials,
        },
        extra_labels: template.labels,
        extra_annotations: template.annotations,
    };
    let expired_at =
        render::annotation_time(secret, render::EXPIRATION_ANNOTATION).unwrap_or_else(|| ctx.settings.clock.now());
    write_secret(ctx, &render::render_expired_secret(&target, expired_at), Some(secret))
        .await?
        .ok();
    tracing::warn!(secret = %secret.name_any(), namespace = %target.namespace, "credentials expired while the binding's spec is invalid; removed them from the Secret");
    Ok(())
}
