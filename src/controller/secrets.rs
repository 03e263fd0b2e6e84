//! Secret I/O: finding a subject's Secret, writing it (create or apply), deleting it,
//! removing run-out credentials, and reading the keys a binding references.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

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

pub(super) fn owned_secrets(ctx: &Context, namespace: &str, binding: &str, uid: &str) -> Vec<Secret> {
    ctx.stores
        .secrets
        .owned_by(uid)
        .into_iter()
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

/// The Secret of a subject as it is now: from the managed cache; else, when a Secret of
/// its name exists without the operator's label (someone else's, or one whose label was
/// removed), from the API; else none. A name cache lagging behind someone's create only
/// makes the operator's create refused (409): no Secret is ever written over.
pub(super) async fn current_secret(ctx: &Context, target: &render::SecretTarget) -> Result<Option<Secret>> {
    if let Some(secret) = ctx.stores.secrets.get(&target.namespace, &target.name) {
        return Ok(Some(secret));
    }
    if !ctx.stores.unmanaged_secrets.contains(&target.namespace, &target.name) {
        return Ok(None);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &target.namespace);
    api.get_opt(&target.name).await.map_err(Error::Kube)
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
    if let Some(existing) = existing.filter(|_| exists) {
        return write_over(ctx, &api, desired, existing).await;
    }
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&params, desired).await {
        Ok(written) => {
            ctx.metrics.api_write("secrets", "create");
            ctx.stores.secrets.wrote(&written);
            Ok(Ok(()))
        }
        // One of the name exists that the caches do not show yet (they lag behind the
        // watches): read it to tell the operator's own, written over, from someone else's.
        Err(kube::Error::Api(e)) if e.code == 409 && e.reason == "AlreadyExists" => {
            match api.get_opt(&name).await.map_err(Error::Kube)? {
                // Owned as the decision tells it (`stored_secret`): controlled by this binding.
                Some(live) if controller_uid(desired).is_some_and(|binding| is_owned_by(&live, binding)) => {
                    if live.type_ != desired.type_ {
                        return Ok(Err(format!(
                            "Secret {name} of this binding is of another type than wanted; it is looked at again"
                        )));
                    }
                    write_over(ctx, &api, desired, &live).await
                }
                Some(_) => Ok(Err(format!(
                    "Secret {name} was created by someone else meanwhile; it is left untouched"
                ))),
                None => Ok(Err(format!(
                    "Secret {name} was created and deleted by someone else meanwhile; it is looked at again"
                ))),
            }
        }
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Writes `desired` over `existing`, a Secret of the binding, by apply. The apply names the
/// uid it was decided on: a Secret deleted or replaced since (the decision may predate an
/// STS call) is refused, never written over.
async fn write_over(
    ctx: &Context,
    api: &Api<Secret>,
    desired: &Secret,
    existing: &Secret,
) -> Result<std::result::Result<(), String>> {
    let mut desired = desired.clone();
    desired.metadata.uid = existing.uid();
    if removes_data_keys(existing, &desired) {
        move_create_entry_first(ctx, api, &desired).await?;
    }
    match apply_secret(ctx, api, &desired).await {
        Ok(written) => {
            ctx.stores.secrets.wrote(&written);
            Ok(Ok(()))
        }
        Err(Error::Kube(kube::Error::Api(e))) if replaced_meanwhile(&e) => Ok(Err(format!(
            "Secret {} was deleted or replaced meanwhile; it is looked at again",
            desired.name_any()
        ))),
        Err(e) => Err(e),
    }
}

/// Whether an apply naming a uid was refused because the object is not that one any more:
/// gone (409, uid mismatch) or another object of the name (422 on `metadata.uid`).
fn replaced_meanwhile(e: &kube::core::Status) -> bool {
    let causes = e.details.as_ref().map(|d| d.causes.as_slice()).unwrap_or_default();
    (e.code == 409 && e.message.contains("uid mismatch"))
        || (e.code == 422 && causes.iter().any(|c| c.field == "metadata.uid"))
}

/// Server-side apply of `desired`, leaving nothing behind that the operator wrote before and
/// no longer wants.
///
/// A Secret is created with POST, so that one someone else created meanwhile is refused
/// (409) and never taken over. That records the operator as an *Update* manager owning every
/// field of the first version, and an apply removes a field it omits only when no other
/// manager owns it: without more, credential keys removed at expiry, or a label dropped from
/// `spec.secret.labels`, would stay in the Secret, owned by that Update entry. So when an
/// apply's answer still shows the operator's Update entry, its fields are moved into the
/// operator's Apply entry (a write of managedFields alone, guarded by the resourceVersion,
/// once per Secret), and the apply is repeated if the moved fields hold anything `desired`
/// lacks. A create stays one write; the first write after it costs one or two more.
/// Returns the Secret as the last of these writes left it.
async fn apply_secret(ctx: &Context, api: &Api<Secret>, desired: &Secret) -> Result<Secret> {
    let name = desired.name_any();
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let mut attempts = 0;
    loop {
        let applied = api
            .patch(&name, &apply, &Patch::Apply(desired))
            .await
            .map_err(Error::Kube)?;
        ctx.metrics.api_write("secrets", "apply");
        let Some((managed_fields, leftovers)) = absorb_create_entry(&applied, desired) else {
            return Ok(applied);
        };
        let patch = json!({"metadata": {
            "resourceVersion": applied.resource_version(),
            "managedFields": managed_fields,
        }});
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let patched = match api.patch(&name, &params, &Patch::Merge(&patch)).await {
            Ok(patched) => {
                ctx.metrics.api_write("secrets", "patch");
                patched
            }
            // Written meanwhile: apply again and look at the managedFields it answers with.
            Err(kube::Error::Api(e)) if e.code == 409 && attempts < 3 => {
                attempts += 1;
                continue;
            }
            Err(e) => return Err(Error::Kube(e)),
        };
        if !leftovers {
            return Ok(patched);
        }
        let applied = api
            .patch(&name, &apply, &Patch::Apply(desired))
            .await
            .map_err(Error::Kube)?;
        ctx.metrics.api_write("secrets", "apply");
        return Ok(applied);
    }
}

/// Whether writing `desired` over `existing` drops data keys (credentials at expiry).
fn removes_data_keys(existing: &Secret, desired: &Secret) -> bool {
    let wanted = desired.data.as_ref();
    existing
        .data
        .iter()
        .flatten()
        .any(|(key, _)| !wanted.is_some_and(|d| d.contains_key(key)))
}

/// Before a write that drops data keys, moves the create's field ownership into the
/// operator's Apply entry (read with managedFields, written guarded by the resourceVersion),
/// so the one apply that follows removes the keys: no version of the Secret shows the
/// expired marker beside the old credentials. Written meanwhile: the apply's own follow-up
/// (in `apply_secret`) does it instead.
async fn move_create_entry_first(ctx: &Context, api: &Api<Secret>, desired: &Secret) -> Result<()> {
    let Some(live) = api.get_opt(&desired.name_any()).await.map_err(Error::Kube)? else {
        // Gone: the apply that follows, naming the uid, says so.
        return Ok(());
    };
    if live.uid() != desired.uid() {
        // Another Secret of the name: not ours to write (the apply is refused too).
        return Ok(());
    }
    let Some((managed_fields, _)) = absorb_create_entry(&live, desired) else {
        return Ok(());
    };
    let patch = json!({"metadata": {
        "resourceVersion": live.resource_version(),
        "managedFields": managed_fields,
    }});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.patch(&desired.name_any(), &params, &Patch::Merge(&patch)).await {
        Ok(_) => {
            ctx.metrics.api_write("secrets", "patch");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(Error::Kube(e)),
    }
}

fn is_entry_of(entry: &ManagedFieldsEntry, operation: &str) -> bool {
    entry.manager.as_deref() == Some(FIELD_MANAGER)
        && entry.operation.as_deref() == Some(operation)
        && entry.subresource.as_deref().unwrap_or_default().is_empty()
}

/// The managedFields of `applied` with the operator's Update entry (from the create) merged
/// into its Apply entry, and whether the merged fields hold a data key, label or annotation
/// `desired` does not; `None` when there is no such Update entry.
fn absorb_create_entry(applied: &Secret, desired: &Secret) -> Option<(Vec<ManagedFieldsEntry>, bool)> {
    let entries = applied.metadata.managed_fields.as_ref()?;
    let created = entries.iter().position(|e| is_entry_of(e, "Update"))?;
    let created_fields = entries[created]
        .fields_v1
        .as_ref()
        .map_or_else(|| json!({}), |f| f.0.clone());
    let mut kept: Vec<ManagedFieldsEntry> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != created)
        .map(|(_, e)| e.clone())
        .collect();
    match kept.iter_mut().find(|e| is_entry_of(e, "Apply")) {
        Some(applied_entry) => {
            let fields = applied_entry.fields_v1.get_or_insert_with(|| FieldsV1(json!({})));
            union_fields(&mut fields.0, &created_fields);
        }
        None => kept.push(ManagedFieldsEntry {
            operation: Some("Apply".into()),
            ..entries[created].clone()
        }),
    }
    Some((kept, holds_unwanted(&created_fields, desired)))
}

/// Adds the field set `from` to `into` (both in the `FieldsV1` JSON form).
fn union_fields(into: &mut serde_json::Value, from: &serde_json::Value) {
    if let (serde_json::Value::Object(into), serde_json::Value::Object(from)) = (into, from) {
        for (key, value) in from {
            union_fields(into.entry(key.clone()).or_insert_with(|| json!({})), value);
        }
    }
}

/// Whether the field set `fields` owns a data key, label or annotation `desired` lacks.
fn holds_unwanted(fields: &serde_json::Value, desired: &Secret) -> bool {
    let owned = |path: &[&str]| -> Vec<String> {
        path.iter()
            .try_fold(fields, |at, step| at.get(*step))
            .and_then(serde_json::Value::as_object)
            .map(|o| {
                o.keys()
                    .filter_map(|k| k.strip_prefix("f:"))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let data = desired.data.clone().unwrap_or_default();
    let labels = desired.metadata.labels.clone().unwrap_or_default();
    let annotations = desired.metadata.annotations.clone().unwrap_or_default();
    owned(&["f:data"]).iter().any(|k| !data.contains_key(k))
        || owned(&["f:metadata", "f:labels"])
            .iter()
            .any(|k| !labels.contains_key(k))
        || owned(&["f:metadata", "f:annotations"])
            .iter()
            .any(|k| !annotations.contains_key(k))
}

/// What the decision needs to know of a subject's Secret.
pub(super) fn stored_secret(secret: &Secret, target: &render::SecretTarget) -> decision::StoredSecret {
    decision::StoredSecret {
        owned: is_owned_by(secret, &target.binding_uid),
        creds: render::read_credentials(secret, target),
        spec_hash: secret.annotations().get(render::SPEC_HASH_ANNOTATION).cloned(),
        // An emptied Secret keeps the (past) expiry of what it held: still expired, and
        // reported as CredentialsExpired, not as the last STS error.
        expiration: render::annotation_time(secret, render::EXPIRATION_ANNOTATION),
    }
}

/// Removes run-out credentials from the Secret (once: an emptied Secret carries the
/// `kube-sts.io/expired` annotation). Says whether the Secret's credentials are gone.
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
        match write_secret(ctx, &render::render_expired_secret(target, expired_at), Some(secret)).await {
            Ok(written) => {
                if let Err(message) = written {
                    tracing::info!(secret = %secret.name_any(), namespace = %target.namespace, %message, "expired credentials not removed yet");
                    return Ok(false);
                }
            }
            // The current spec renders a Secret the apiserver refuses (say, invalid labels):
            // the credentials go all the same, the Secret keeping its own labels.
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 422 => {
                let owner = (target.binding.as_str(), target.binding_uid.as_str());
                if !expire_in_place(ctx, secret, owner, (&target.extra_labels, &target.extra_annotations)).await? {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
        tracing::warn!(secret = %secret.name_any(), namespace = %target.namespace, "credentials expired and could not be refreshed; removed them from the Secret");
    }
    Ok(true)
}

/// Removes run-out credentials from a Secret the binding owns when there is no plan to
/// render it from (the spec became invalid).
pub(super) async fn expire_secret_in_place(ctx: &Context, binding: &AWSRoleBinding, secret: &Secret) -> Result<()> {
    if secret.annotations().contains_key(render::EXPIRED_ANNOTATION) {
        return Ok(());
    }
    let template = binding.spec.secret.clone().unwrap_or_default();
    let wanted = (&template.labels, &template.annotations);
    let owner = (binding.name_any(), binding.uid().unwrap_or_default());
    if !expire_in_place(ctx, secret, (&owner.0, &owner.1), wanted).await? {
        return Ok(());
    }
    tracing::warn!(secret = %secret.name_any(), namespace = %secret.namespace().unwrap_or_default(), "credentials expired while the binding's spec is invalid; removed them from the Secret");
    Ok(())
}

/// Writes `secret` of binding `(name, uid)` without its credentials when its spec cannot
/// render it (invalid, or refused by the apiserver); says whether they are gone. Its type,
/// spec hash and role come from the Secret itself; of the labels and annotations `wanted`
/// asks for, only those it already carries are written (so nothing refused is written, and
/// nothing someone else added is taken over).
async fn expire_in_place(
    ctx: &Context,
    secret: &Secret,
    (binding, binding_uid): (&str, &str),
    wanted: (&BTreeMap<String, String>, &BTreeMap<String, String>),
) -> Result<bool> {
    let carried = |wanted: &BTreeMap<String, String>, has: &BTreeMap<String, String>| {
        wanted
            .iter()
            .filter(|(k, v)| has.get(*k) == Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let target = render::SecretTarget {
        namespace: secret.namespace().unwrap_or_default(),
        name: secret.name_any(),
        binding: binding.into(),
        binding_uid: binding_uid.into(),
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
            Some(render::TYPE_DOCKER_CONFIG) => crate::crd::SecretType::DockerConfigJson,
            _ => crate::crd::SecretType::Credentials,
        },
        extra_labels: carried(wanted.0, secret.labels()),
        extra_annotations: carried(wanted.1, secret.annotations()),
    };
    let expired_at =
        render::annotation_time(secret, render::EXPIRATION_ANNOTATION).unwrap_or_else(|| ctx.settings.clock.now());
    match write_secret(ctx, &render::render_expired_secret(&target, expired_at), Some(secret)).await {
        Ok(written) => Ok(written.is_ok()),
        // Refused even so (its own metadata grew invalid, say annotations over the size
        // limit): the Secret is the binding's, and an expired credential must not stay.
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 422 => {
            tracing::warn!(secret = %secret.name_any(), namespace = %target.namespace, error = %e.message, "the apiserver refuses the Secret without its expired credentials; deleting it");
            delete_secret(ctx, secret).await?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(manager: &str, operation: &str, fields: serde_json::Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            api_version: Some("v1".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            ..Default::default()
        }
    }

    fn secret(data: &[&str], labels: &[&str], managed: Vec<ManagedFieldsEntry>) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                labels: Some(labels.iter().map(|l| (l.to_string(), "v".to_string())).collect()),
                managed_fields: Some(managed),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|k| (k.to_string(), k8s_openapi::ByteString(b"v".to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn the_create_entry_moves_into_the_apply_entry() {
        let created = json!({"f:data": {".": {}, "f:KEY": {}, "f:OLD": {}}, "f:metadata": {"f:labels": {"f:team": {}, "f:tier": {}}}});
        let applied = json!({"f:data": {"f:KEY": {}}, "f:metadata": {"f:labels": {"f:team": {}}}});
        let foreign = json!({"f:metadata": {"f:labels": {"f:added-by": {}}}});
        let live = secret(
            &["KEY", "OLD"],
            &["team", "tier", "added-by"],
            vec![
                entry(FIELD_MANAGER, "Update", created),
                entry(FIELD_MANAGER, "Apply", applied),
                entry("someone-else", "Update", foreign.clone()),
            ],
        );
        let desired = secret(&["KEY"], &["team"], vec![]);
        let (entries, leftovers) = absorb_create_entry(&live, &desired).unwrap();
        assert!(leftovers);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[0].fields_v1.as_ref().unwrap().0,
            json!({"f:data": {".": {}, "f:KEY": {}, "f:OLD": {}}, "f:metadata": {"f:labels": {"f:team": {}, "f:tier": {}}}})
        );
        assert_eq!(entries[0].operation.as_deref(), Some("Apply"));
        assert_eq!(entries[1].fields_v1.as_ref().unwrap().0, foreign);

        // Nothing to remove: the entries move, no second apply is needed.
        let same = secret(&["KEY", "OLD"], &["team", "tier"], vec![]);
        assert!(!absorb_create_entry(&live, &same).unwrap().1);
        // Already moved: nothing to do.
        let moved = secret(&["KEY"], &["team"], entries);
        assert!(absorb_create_entry(&moved, &desired).is_none());
    }
}
