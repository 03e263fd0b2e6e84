//! Keeps the serving certificate: loads what the Secret holds into the server and, when the
//! webhook manages the certificate, takes the Secret through the steps of `certs` and keeps
//! the `caBundle` of the MutatingWebhookConfiguration current. Every replica runs it; they
//! agree through the Secret alone (writes are guarded by its resourceVersion, a replica
//! that loses a race reads the winner's Secret and decides again). The `caBundle` is only
//! ever set from the Secret as the API has it at that moment (read fresh, not from the
//! cache): a replica whose cache lags behind another's write never takes out a CA the
//! Secret holds as active or staged.

use std::{borrow::Cow, collections::BTreeSet, sync::Arc, time::Duration};

use base64::Engine;
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::{
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt, reflector,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{
    certs::{self, KEY_CERT, KEY_KEY, Policy, Step, Stored, View},
    server::ServingCert,
};
use crate::{controller::FIELD_MANAGER, metrics::Metrics};

/// Where the certificate lives and who keeps it.
#[derive(Clone, Debug)]
pub struct Settings {
    pub secret: String,
    pub namespace: String,
    /// `None`: another tool (cert-manager) fills the Secret and the `caBundle`; the webhook
    /// only serves what the Secret holds.
    pub managed: Option<Managed>,
}

#[derive(Clone, Debug)]
pub struct Managed {
    pub policy: Policy,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept (every webhook in it).
    pub configuration: Option<String>,
}

/// How often the keeper looks again when nothing else wakes it. Changes of the Secret and
/// of the configuration wake it at once; this is the safety net.
const RECHECK: Duration = Duration::from_secs(60);
/// How long after its own write (of the Secret or of the configuration) the keeper waits
/// for the watch to show it, before it decides again on what the cache holds.
const WRITE_SEEN_WITHIN: Duration = Duration::from_secs(10);

/// Watches the one object `name` of `api` (list and watch with a `metadata.name` field
/// selector, which RBAC `resourceNames` can allow); every event notifies `changed`.
fn watch_one<K>(api: Api<K>, name: &str, what: &'static str, changed: Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let config = crate::timing::watch_config_of(Some(name));
    let stream = reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(watch = what, error = %e, "watch failed; retrying with backoff"),
            }
        }
    });
    store
}

/// The CAs (DER) a webhook of the configuration trusts.
fn trusted(webhook: &k8s_openapi::api::admissionregistration::v1::MutatingWebhook) -> BTreeSet<Vec<u8>> {
    webhook
        .client_config
        .ca_bundle
        .as_ref()
        .map(|b| certs::ders(&String::from_utf8_lossy(&b.0)).into_iter().collect())
        .unwrap_or_default()
}

/// Whether every webhook of the configuration trusts the CA `ca` (PEM).
fn trusts(configuration: &MutatingWebhookConfiguration, ca: &str) -> bool {
    let Some(der) = certs::ders(ca).into_iter().next() else {
        return false;
    };
    let webhooks = configuration.webhooks.as_deref().unwrap_or_default();
    !webhooks.is_empty() && webhooks.iter().all(|w| trusted(w).contains(&der))
}

/// The JSON Patch that sets `bundle` as the `caBundle` of every webhook that trusts another
/// set of CAs; `None` when all trust exactly these. Guarded by the resourceVersion and the
/// webhooks' names, so a configuration changed meanwhile is not patched blindly.
fn bundle_patch(configuration: &MutatingWebhookConfiguration, bundle: &str) -> Option<Value> {
    let wanted: BTreeSet<Vec<u8>> = certs::ders(bundle).into_iter().collect();
    let webhooks = configuration.webhooks.as_deref().unwrap_or_default();
    let stale: Vec<(usize, &str)> = webhooks
        .iter()
        .enumerate()
        .filter(|(_, w)| trusted(w) != wanted)
        .map(|(i, w)| (i, w.name.as_str()))
        .collect();
    if wanted.is_empty() || stale.is_empty() {
        return None;
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(bundle);
    let mut ops =
        vec![json!({"op": "test", "path": "/metadata/resourceVersion", "value": configuration.resource_version()})];
    for (i, name) in stale {
        ops.push(json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": name}));
        ops.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
    }
    Some(Value::Array(ops))
}

/// Loads the Secret's `tls.crt` and `tls.key` into the server when they changed.
fn load(serving: &ServingCert, secret: Option<&Secret>, metrics: &Metrics, last_error: &mut Option<String>) {
    let data = secret.and_then(|s| s.data.as_ref());
    let text = |key: &str| {
        data.and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    };
    let (Some(cert), Some(key)) = (text(KEY_CERT), text(KEY_KEY)) else {
        return;
    };
    match serving.load(&cert, &key) {
        Ok(false) => {}
        Ok(true) => {
            *last_error = None;
            let expires = certs::not_after(&cert).ok();
            if let Some(at) = expires {
                metrics.webhook_certificate_expiration(at);
            }
            tracing::info!(expires = ?expires, "serving the certificate of the Secret");
        }
        Err(e) if last_error.as_ref() != Some(&e) => {
            tracing::warn!(error = %e, "the Secret's certificate cannot be served; serving the previous one");
            metrics.webhook_certificate_failure();
            *last_error = Some(e);
        }
        Err(_) => {}
    }
}

/// A certificate Secret as the webhook creates it (the chart creates it itself, empty).
fn new_secret(name: &str, namespace: &str, stored: &Stored) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(
                [
                    ("app.kubernetes.io/part-of", "kube-sts"),
                    ("app.kubernetes.io/component", "webhook-certificate"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(stored.to_data()),
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
enum KeepError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Cert(#[from] certs::CertError),
}

/// What one pass of the keeper did.
enum Pass {
    /// Nothing to write; look again at this time (if nothing wakes the keeper before).
    Idle(Option<Timestamp>),
    /// Wrote the Secret; its resourceVersion.
    Wrote(String),
}

struct Keeper {
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
}

impl Keeper {
    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    /// Publishes the `caBundle`, then takes the rotation step that is due, if any.
    /// `secret`: the Secret as the cache has it. With the pass, the resourceVersion of the
    /// configuration when this pass patched it.
    async fn pass(
        &self,
        managed: &Managed,
        secret: Option<&Secret>,
        configuration: Option<Option<Arc<MutatingWebhookConfiguration>>>,
    ) -> Result<(Pass, Option<String>), KeepError> {
        let now = Timestamp::now();
        let stored_in = |secret: Option<&Secret>| {
            secret
                .and_then(|s| s.data.as_ref())
                .map(Stored::from_data)
                .unwrap_or_default()
        };
        let mut secret = secret.map(Cow::Borrowed);
        let mut stored = stored_in(secret.as_deref());
        let mut patched = None;
        if let (Some(Some(conf)), Some(name)) = (&configuration, &managed.configuration)
            && bundle_patch(conf, &certs::bundle(&stored, now)).is_some()
        {
            // The cache may lag behind another replica's write (a CA it staged): the bundle
            // comes from the Secret as it is now, and so does the rest of this pass.
            let fresh = self.secrets().get_opt(&self.settings.secret).await?;
            stored = stored_in(fresh.as_ref());
            secret = fresh.map(Cow::Owned);
            if let Some(patch) = bundle_patch(conf, &certs::bundle(&stored, now)) {
                let patch: json_patch::Patch = serde_json::from_value(patch).expect("test and add operations");
                let patched_conf = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
                    .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
                    .await?;
                self.metrics.api_write("mutatingwebhookconfigurations", "patch");
                tracing::info!(configuration = %name, "caBundle updated");
                patched = patched_conf.resource_version();
            }
        }
        let next_trusted = match (&configuration, &stored.next) {
            // Nobody to tell: the overlap alone counts.
            (None, _) => true,
            (Some(conf), Some(next)) => conf.as_deref().is_some_and(|c| trusts(c, &next.ca)),
            (Some(_), None) => false,
        };
        let plan = certs::plan(&View::of(&stored), &managed.policy, next_trusted, now);
        let Some((step, why)) = plan.step else {
            return Ok((Pass::Idle(plan.wake_at), patched));
        };
        let updated = certs::apply(&stored, step, &managed.policy, now)?;
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let written = match secret {
            Some(secret) => {
                let mut secret = secret.into_owned();
                secret.data = Some(updated.to_data());
                secret.string_data = None;
                let written = self.secrets().replace(&secret.name_any(), &params, &secret).await?;
                self.metrics.api_write("secrets", "update");
                written
            }
            None => {
                let secret = new_secret(&self.settings.secret, &self.settings.namespace, &updated);
                let written = self.secrets().create(&params, &secret).await?;
                self.metrics.api_write("secrets", "create");
                written
            }
        };
        let expires = updated.active.as_ref().and_then(|g| certs::not_after(&g.cert).ok());
        let step = match step {
            Step::Issue => "issued a certificate",
            Step::Stage => "staged the next certificate (its CA is trusted from now on)",
            Step::Promote => "switched to the staged certificate",
            Step::Retire => "dropped the previous CA from the caBundle",
        };
        tracing::info!(secret = %self.settings.secret, reason = ?why, expires = ?expires, "webhook certificate: {step}");
        Ok((Pass::Wrote(written.resource_version().unwrap_or_default()), patched))
    }
}

/// Keeps the certificate until the process ends; `loaded` turns true once a certificate is
/// served.
pub async fn keep(
    client: Client,
    settings: Settings,
    serving: Arc<ServingCert>,
    metrics: Arc<Metrics>,
    loaded: tokio::sync::watch::Sender<bool>,
) {
    let changed = Arc::new(Notify::new());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let secret_store = watch_one(secrets, &settings.secret, "webhook certificate Secret", changed.clone());
    let configuration = settings
        .managed
        .as_ref()
        .and_then(|m| m.configuration.clone())
        .map(|name| {
            let api = Api::<MutatingWebhookConfiguration>::all(client.clone());
            (
                name.clone(),
                watch_one(api, &name, "mutatingwebhookconfigurations", changed.clone()),
            )
        });
    let _ = secret_store.wait_until_ready().await;
    if let Some((_, store)) = &configuration {
        let _ = store.wait_until_ready().await;
    }
    let secret_ref = ObjectRef::new(&settings.secret).within(&settings.namespace);
    let keeper = Keeper {
        client,
        settings,
        metrics: metrics.clone(),
    };
    let (mut failures, mut last_error) = (0u32, None);
    // The versions of the Secret and of the configuration this replica wrote last, until its
    // caches show them (or newer ones): deciding on an older one would write again.
    let (mut awaiting_secret, mut awaiting_conf): (Option<(String, tokio::time::Instant)>, _) = (None, None);
    loop {
        let secret = secret_store.get(&secret_ref);
        load(&serving, secret.as_deref(), &metrics, &mut last_error);
        if serving.is_loaded() {
            loaded.send_replace(true);
        }
        let conf = configuration
            .as_ref()
            .map(|(name, store)| store.get(&ObjectRef::new(name)));
        let cached_secret = secret.as_ref().and_then(|s| s.resource_version());
        let cached_conf = conf.clone().flatten().and_then(|c| c.resource_version());
        let now = tokio::time::Instant::now();
        let unseen = |awaiting: &Option<(String, tokio::time::Instant)>, cached: &Option<String>| {
            awaiting
                .as_ref()
                .filter(|(version, until)| cached.as_ref() != Some(version) && now < *until)
                .map(|(_, until)| *until)
        };
        if let Some(until) = [
            unseen(&awaiting_secret, &cached_secret),
            unseen(&awaiting_conf, &cached_conf),
        ]
        .into_iter()
        .flatten()
        .min()
        {
            tokio::select! {
                () = changed.notified() => {}
                () = tokio::time::sleep_until(until) => {}
            }
            continue;
        }
        (awaiting_secret, awaiting_conf) = (None, None);
        let mut wake = tokio::time::Instant::now() + RECHECK;
        if let Some(managed) = &keeper.settings.managed {
            let result = keeper
                .pass(managed, secret.as_deref(), conf)
                .await
                .map(|(pass, patched)| {
                    awaiting_conf = patched.map(|version| (version, tokio::time::Instant::now() + WRITE_SEEN_WITHIN));
                    pass
                });
            match result {
                Ok(Pass::Wrote(version)) => {
                    failures = 0;
                    awaiting_secret = Some((version, tokio::time::Instant::now() + WRITE_SEEN_WITHIN));
                    continue;
                }
                Ok(Pass::Idle(at)) => {
                    failures = 0;
                    if let Some(at) = at {
                        let after = Timestamp::now().duration_until(at).max(jiff::SignedDuration::ZERO);
                        wake = wake.min(tokio::time::Instant::now() + after.unsigned_abs());
                    }
                }
                Err(e) => {
                    failures += 1;
                    // A conflict is another replica having written first: not a failure.
                    if !matches!(&e, KeepError::Kube(kube::Error::Api(status)) if status.code == 409) {
                        metrics.webhook_certificate_failure();
                    }
                    let retry = Duration::from_secs(1 << failures.min(6)).min(RECHECK);
                    // A conflict means another replica (or a person) wrote first: the watch
                    // brings that version, and the next pass decides on it.
                    tracing::warn!(error = %e, retry_in = ?retry, "keeping the webhook certificate failed; retrying");
                    wake = tokio::time::Instant::now() + retry;
                }
            }
        }
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configuration(bundles: &[Option<&str>]) -> MutatingWebhookConfiguration {
        let webhooks: Vec<Value> = bundles
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut client = json!({"url": "https://127.0.0.1/mutate"});
                if let Some(b) = b {
                    client["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(b));
                }
                json!({"name": format!("w{i}.kube-sts.io"), "clientConfig": client, "sideEffects": "None", "admissionReviewVersions": ["v1"]})
            })
            .collect();
        serde_json::from_value(json!({"metadata": {"name": "c", "resourceVersion": "7"}, "webhooks": webhooks}))
            .unwrap()
    }

    #[test]
    fn the_ca_bundle_is_patched_only_where_it_differs_and_guarded() {
        let now = Timestamp::now();
        let names = vec!["127.0.0.1".to_string()];
        let a = certs::issue(&names, jiff::SignedDuration::from_hours(1), now).unwrap();
        let b = certs::issue(&names, jiff::SignedDuration::from_hours(1), now).unwrap();
        let both = format!("{}{}", a.ca, b.ca);
        let reordered = format!("{}{}", b.ca, a.ca);
        let conf = configuration(&[Some(&reordered), None, Some(&a.ca)]);
        let patch = bundle_patch(&conf, &both).unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode(&both);
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                {"op": "test", "path": "/webhooks/1/name", "value": "w1.kube-sts.io"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": encoded},
                {"op": "test", "path": "/webhooks/2/name", "value": "w2.kube-sts.io"},
                {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": encoded},
            ])
        );
        assert_eq!(
            bundle_patch(&configuration(&[Some(&reordered)]), &both),
            None,
            "the same CAs in another order"
        );
        assert_eq!(bundle_patch(&conf, ""), None, "nothing to publish yet");
        // The staged CA counts as trusted only once every webhook trusts it.
        assert!(!trusts(&conf, &b.ca));
        assert!(trusts(&configuration(&[Some(&both), Some(&reordered)]), &b.ca));
        assert!(!trusts(&configuration(&[]), &a.ca));
    }

    #[test]
    fn a_lagging_cache_never_takes_a_staged_or_active_ca_out_of_the_bundle() {
        let now = Timestamp::now();
        let names = vec!["127.0.0.1".to_string()];
        let a = certs::issue(&names, jiff::SignedDuration::from_hours(1), now).unwrap();
        let b = certs::issue(&names, jiff::SignedDuration::from_hours(1), now).unwrap();
        // Another replica staged b; the configuration trusts a and b.
        let conf = configuration(&[Some(&format!("{}{}", a.ca, b.ca))]);
        let lagging = Stored {
            active: Some(a.clone()),
            ..Default::default()
        };
        let staged = Stored {
            next: Some(b.clone()),
            ..lagging.clone()
        };
        // From the lagging cache, b would be taken out (which is why the keeper then reads
        // the Secret fresh); from the Secret as it is, nothing changes.
        let from_cache = bundle_patch(&conf, &certs::bundle(&lagging, now)).expect("the cache says: a only");
        assert_eq!(from_cache.as_array().unwrap().len(), 3);
        assert_eq!(bundle_patch(&conf, &certs::bundle(&staged, now)), None);
        // Promoted (b active, a previous): still both.
        let promoted = Stored {
            active: Some(b.clone()),
            next: None,
            previous_ca: Some(a.ca.clone()),
        };
        assert_eq!(bundle_patch(&conf, &certs::bundle(&promoted, now)), None);
        // A Secret read fresh that is gone or empty publishes nothing: the bundle stays.
        assert_eq!(bundle_patch(&conf, &certs::bundle(&Stored::default(), now)), None);
    }
}
