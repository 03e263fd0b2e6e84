//! Prometheus metrics and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StsCallLabels {
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubjectLabels {
    pub namespace: String,
    pub binding: String,
    pub service_account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    resource: String,
    verb: String,
}

pub struct Metrics {
    registry: Registry,
    sts_calls: Family<StsCallLabels, Counter>,
    reconcile_duration: Histogram,
    reconcile_errors: Family<ErrorLabels, Counter>,
    seconds_until_expiry: Family<SubjectLabels, Gauge>,
    consecutive_failures: Family<SubjectLabels, Gauge>,
    writes: Family<WriteLabels, Counter>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kube_sts");
        let sts_calls = Family::<StsCallLabels, Counter>::default();
        registry.register(
            "sts_calls",
            "AWS calls (STS, and ECR for pull Secrets) by operation and outcome",
            sts_calls.clone(),
        );
        let reconcile_duration = Histogram::new([0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        registry.register(
            "reconcile_duration_seconds",
            "Duration of binding reconciles",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register("reconcile_errors", "Reconcile errors by kind", reconcile_errors.clone());
        let seconds_until_expiry = Family::<SubjectLabels, Gauge>::default();
        registry.register(
            "credential_seconds_until_expiry",
            "Seconds until the credentials in a subject's Secret expire",
            seconds_until_expiry.clone(),
        );
        let consecutive_failures = Family::<SubjectLabels, Gauge>::default();
        registry.register(
            "subject_consecutive_failures",
            "Consecutive failed issuances for a subject",
            consecutive_failures.clone(),
        );
        let writes = Family::<WriteLabels, Counter>::default();
        registry.register(
            "api_writes",
            "Writes to the Kubernetes API by resource and verb",
            writes.clone(),
        );
        Metrics {
            registry,
            sts_calls,
            reconcile_duration,
            reconcile_errors,
            seconds_until_expiry,
            consecutive_failures,
            writes,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn sts_call(&self, operation: &str, outcome: &str) {
        self.sts_calls
            .get_or_create(&StsCallLabels {
                operation: operation.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    pub fn reconcile_error(&self, kind: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels { kind: kind.into() })
            .inc();
    }

    pub fn api_write(&self, resource: &str, verb: &str) {
        self.writes
            .get_or_create(&WriteLabels {
                resource: resource.into(),
                verb: verb.into(),
            })
            .inc();
    }

    pub fn subject(&self, labels: &SubjectLabels, seconds_until_expiry: Option<i64>, failures: u32) {
        match seconds_until_expiry {
            Some(s) => {
                self.seconds_until_expiry.get_or_create(labels).set(s);
            }
            None => {
                self.seconds_until_expiry.remove(labels);
            }
        }
        self.consecutive_failures.get_or_create(labels).set(i64::from(failures));
    }

    pub fn forget_subject(&self, labels: &SubjectLabels) {
        self.seconds_until_expiry.remove(labels);
        self.consecutive_failures.remove(labels);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("metrics encode to a String");
        out
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    loop {
        let (stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(match req.uri().path() {
                        "/metrics" => respond(
                            StatusCode::OK,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            metrics.render(),
                        ),
                        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
                        "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
                            respond(StatusCode::OK, "text/plain", "ok\n".into())
                        }
                        "/readyz" => respond(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain",
                            "caches not synced\n".into(),
                        ),
                        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
