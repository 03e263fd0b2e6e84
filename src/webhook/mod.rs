//! `kube-sts webhook`: a mutating admission webhook that wires a binding's Secret into the
//! pods of its subjects.
//!
//! - `mutate`: the pure decision (pod, bindings, namespace labels → JSON patch, warnings);
//! - `review`: one AdmissionReview in, one out, from the caches;
//! - `certs`: the serving certificate's generations and the pure rotation policy;
//! - `keeper`: the certificate's I/O (Secret, `caBundle`) and loading it into the server;
//! - `server`: HTTPS with a certificate replaced in place.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};

use crate::{crd::AWSRoleBinding, metrics::Metrics};

pub mod certs;
pub mod keeper;
pub mod mutate;
pub mod review;
pub mod server;

/// How the webhook runs (from the command line).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Read bindings of this namespace only.
    pub namespace: Option<String>,
    /// Where `/mutate` is served (HTTPS).
    pub addr: SocketAddr,
    pub certificate: keeper::Settings,
    /// After a shutdown signal: not ready at once, serving on for this long, so that the
    /// API server stops sending requests before the server goes.
    pub shutdown_delay: Duration,
}

/// Drives a reflector in a task of its own, logging watch failures.
fn drive<K, S>(name: &'static str, stream: S)
where
    K: Send + 'static,
    S: futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(watch = name, error = %e, "watch failed; retrying with backoff");
            }
        }
    });
}

/// The caches the admissions read: the bindings (managedFields dropped) and the metadata of
/// the namespaces (their labels), of one namespace or all.
fn caches(client: &Client, namespace: Option<&str>) -> (Store<AWSRoleBinding>, Store<PartialObjectMeta<Namespace>>) {
    let (bindings, writer) = reflector::store();
    let api: Api<AWSRoleBinding> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(|b| b.managed_fields_mut().clear()),
    )
    .default_backoff();
    drive("awsrolebindings", stream);

    let (namespaces, writer) = reflector::store();
    let config = match namespace {
        Some(name) => watcher::Config::default().fields(&format!("metadata.name={name}")),
        None => watcher::Config::default(),
    };
    let api = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
    let stream = reflector(writer, watcher(api, config).modify(|n| n.managed_fields_mut().clear())).default_backoff();
    drive("namespaces", stream);
    (bindings, namespaces)
}

/// Runs the webhook until `shutdown` completes (and the shutdown delay has passed).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let shutdown = shutdown.shared();
    let (bindings, namespaces) = caches(&client, settings.namespace.as_deref());
    let serving = Arc::new(server::ServingCert::default());
    let (loaded_tx, mut loaded) = tokio::sync::watch::channel(false);
    tokio::spawn(keeper::keep(
        client,
        settings.certificate.clone(),
        serving.clone(),
        metrics.clone(),
        loaded_tx,
    ));
    // Served only once the caches are complete and a certificate is loaded: until then the
    // API server finds no listener and admits the pod unchanged (failurePolicy Ignore) at
    // once, instead of getting answers from an empty cache.
    let ready = async {
        let _ = futures::join!(bindings.wait_until_ready(), namespaces.wait_until_ready());
        let _ = loaded.wait_for(|loaded| *loaded).await;
    };
    tokio::select! {
        () = ready => {}
        () = shutdown.clone() => {
            tracing::info!("stopped before the webhook was ready");
            return Ok(());
        }
    }
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .map_err(|e| format!("cannot listen on --webhook-addr {}: {e}", settings.addr))?;
    let tls = server::tls_config(serving)?;
    tracing::info!(addr = %settings.addr, path = server::PATH, "serving the admission webhook");
    metrics.set_ready(true);
    let reviewer = Arc::new(review::Reviewer {
        bindings,
        namespaces,
        metrics: metrics.clone(),
    });
    let delay = settings.shutdown_delay;
    let stop = async move {
        shutdown.await;
        metrics.set_ready(false);
        tracing::info!(delay = ?delay, "shutting down: not ready, serving on for the shutdown delay");
        tokio::time::sleep(delay).await;
    };
    server::serve(listener, tls, reviewer, stop).await;
    tracing::info!("webhook stopped");
    Ok(())
}
