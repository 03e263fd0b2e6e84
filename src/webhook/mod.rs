//! `kube-sts webhook`: a mutating admission webhook that wires a binding's Secret into the
//! pods of its subjects.
//!
//! - `mutate`: the pure decision (pod, bindings, namespace labels → JSON patch, warnings);
//! - `bindings`: the cache of bindings, compact and by namespace;
//! - `review`: one AdmissionReview in, one out, from the caches;
//! - `certs`: the serving certificate's generations and the pure rotation policy;
//! - `keeper`: the certificate's I/O (Secret, `caBundle`) and loading it into the server;
//! - `server`: HTTPS with a certificate replaced in place, closing connections until ready.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};

use crate::{crd::AWSRoleBinding, metrics::Metrics};

pub mod bindings;
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

/// The caches the admissions read: the bindings (compact, by namespace) and the labels of
/// the namespaces, of one namespace or all.
fn caches(client: &Client, namespace: Option<&str>) -> (Arc<bindings::Cache>, Store<PartialObjectMeta<Namespace>>) {
    let cache = Arc::new(bindings::Cache::default());
    let api: Api<AWSRoleBinding> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let stream = watcher(api, crate::timing::watch_config()).default_backoff();
    let fed = cache.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => fed.apply(event),
                Err(e) => tracing::warn!(watch = "awsrolebindings", error = %e, "watch failed; retrying with backoff"),
            }
        }
    });

    let (namespaces, writer) = reflector::store();
    let config = crate::timing::watch_config_of(namespace);
    let api = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
    // Only the labels are read: annotations (a last-applied configuration, say) are not kept.
    let stream = reflector(
        writer,
        watcher(api, config).modify(|n| {
            n.managed_fields_mut().clear();
            n.annotations_mut().clear();
        }),
    )
    .default_backoff();
    drive("namespaces", stream);
    (cache, namespaces)
}

/// Serves until `serving` completes, unless the certificate keeper stops first (it never
/// returns; a panic ends it): then the process must end and be restarted, since nothing
/// would keep the certificate any more.
async fn supervised(serving: impl Future<Output = ()>, keeper: tokio::task::JoinHandle<()>) -> Result<(), String> {
    tokio::select! {
        () = serving => Ok(()),
        ended = keeper => Err(match ended {
            Err(e) if e.is_panic() => "the certificate keeper panicked".to_string(),
            Err(e) => format!("the certificate keeper stopped: {e}"),
            Ok(()) => "the certificate keeper stopped".to_string(),
        }),
    }
}

/// Runs the webhook until `shutdown` completes (and the shutdown delay has passed).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    // Bound at once, so that a port that cannot be had fails the process at start.
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .map_err(|e| format!("cannot listen on --webhook-addr {}: {e}", settings.addr))?;
    tracing::info!(addr = %settings.addr, path = server::PATH, "webhook listening; answering once the caches are synced and a certificate is loaded");
    let shutdown = shutdown.shared();
    let (bindings, namespaces) = caches(&client, settings.namespace.as_deref());
    let serving = Arc::new(server::ServingCert::default());
    let tls = server::tls_config(serving.clone())?;
    let (loaded_tx, mut loaded) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(keeper::keep(
        client,
        settings.certificate.clone(),
        serving,
        metrics.clone(),
        loaded_tx,
    ));
    // Until the caches are complete and a certificate is loaded, connections are closed at
    // once: the API server then admits the pod unchanged at once (failurePolicy Ignore)
    // instead of getting answers from an empty cache.
    let accepting = Arc::new(AtomicBool::new(false));
    let becoming_ready = {
        let (bindings, namespaces, accepting, metrics) =
            (bindings.clone(), namespaces.clone(), accepting.clone(), metrics.clone());
        tokio::spawn(async move {
            let _ = futures::join!(bindings.wait_until_ready(), namespaces.wait_until_ready());
            if loaded.wait_for(|loaded| *loaded).await.is_err() {
                return; // the keeper is gone (and the process is ending): never serve
            }
            accepting.store(true, Ordering::Relaxed);
            metrics.set_ready(true);
            tracing::info!("serving the admission webhook");
        })
    };
    let reviewer = Arc::new(review::Reviewer {
        bindings,
        namespaces,
        metrics: metrics.clone(),
    });
    let delay = settings.shutdown_delay;
    let stop = async move {
        shutdown.await;
        becoming_ready.abort();
        metrics.set_ready(false);
        tracing::info!(delay = ?delay, "shutting down: not ready, serving on for the shutdown delay");
        tokio::time::sleep(delay).await;
    };
    let serving = server::serve(listener, tls, reviewer, accepting, stop);
    supervised(serving, keeper).await?;
    tracing::info!("webhook stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn the_webhook_ends_with_an_error_when_its_certificate_keeper_stops() {
        let panicked = tokio::spawn(async { panic!("a bug in the keeper") });
        let ended = supervised(std::future::pending(), panicked).await;
        assert_eq!(ended, Err("the certificate keeper panicked".to_string()));
        let returned = tokio::spawn(async {});
        assert!(supervised(std::future::pending(), returned).await.is_err());
        // Serving to its end (a shutdown) with the keeper running is a clean stop.
        let running = tokio::spawn(std::future::pending::<()>());
        assert_eq!(supervised(async {}, running).now_or_never(), Some(Ok(())));
    }
}
