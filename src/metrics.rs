//! Prometheus metrics and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::Semaphore,
};

use futures::FutureExt;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
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
struct AdmissionLabels {
    outcome: String,
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
    expiration: Family<SubjectLabels, Gauge>,
    consecutive_failures: Family<SubjectLabels, Gauge>,
    writes: Family<WriteLabels, Counter>,
    admissions: Family<AdmissionLabels, Counter>,
    webhook_certificate_expiration: Gauge,
    ready: AtomicBool,
    /// Reconciles running now, and when one last finished (for `/healthz`).
    in_flight: AtomicI64,
    last_progress: Mutex<Instant>,
}

/// `/healthz` fails when reconciles are running and none has finished for this long: far
/// beyond any single STS (45 s) or Kubernetes request, so only a stuck loop reaches it.
pub const STALL_AFTER: Duration = Duration::from_secs(5 * 60);

/// Whether the reconcile loop is stuck: work in flight and no progress for [`STALL_AFTER`].
pub fn stalled(in_flight: i64, since_progress: Duration) -> bool {
    in_flight > 0 && since_progress > STALL_AFTER
}

/// Which process the metrics are for: each shows only its own families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    /// `kube-sts run`.
    Operator,
    /// `kube-sts webhook`.
    Webhook,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Process::Operator)
    }
}

impl Metrics {
    pub fn new(process: Process) -> Self {
        let mut operator = Registry::with_prefix("kube_sts");
        let mut webhook = Registry::with_prefix("kube_sts");
        let sts_calls = Family::<StsCallLabels, Counter>::default();
        operator.register(
            "sts_calls",
            "AWS calls (STS, and ECR for pull Secrets) by operation and outcome",
            sts_calls.clone(),
        );
        let reconcile_duration = Histogram::new([0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        operator.register(
            "reconcile_duration_seconds",
            "Duration of binding reconciles",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        operator.register("reconcile_errors", "Reconcile errors by kind", reconcile_errors.clone());
        let seconds_until_expiry = Family::<SubjectLabels, Gauge>::default();
        operator.register(
            "credential_seconds_until_expiry",
            "Seconds until the credentials in a subject's Secret expire",
            seconds_until_expiry.clone(),
        );
        let expiration = Family::<SubjectLabels, Gauge>::default();
        operator.register(
            "credential_expiration_timestamp_seconds",
            "When the credentials in a subject's Secret expire (Unix time; alert on time() - this)",
            expiration.clone(),
        );
        let consecutive_failures = Family::<SubjectLabels, Gauge>::default();
        operator.register(
            "subject_consecutive_failures",
            "Consecutive failed issuances for a subject",
            consecutive_failures.clone(),
        );
        let writes = Family::<WriteLabels, Counter>::default();
        for registry in [&mut operator, &mut webhook] {
            registry.register(
                "api_writes",
                "Writes to the Kubernetes API by resource and verb",
                writes.clone(),
            );
        }
        let admissions = Family::<AdmissionLabels, Counter>::default();
        webhook.register(
            "webhook_admissions",
            "Pod admissions of the webhook by outcome (injected, unchanged, not_bound, opted_out, refused, invalid)",
            admissions.clone(),
        );
        let webhook_certificate_expiration = Gauge::default();
        webhook.register(
            "webhook_certificate_expiration_timestamp_seconds",
            "When the certificate the webhook serves expires (Unix time; 0 before one is served)",
            webhook_certificate_expiration.clone(),
        );
        Metrics {
            registry: match process {
                Process::Operator => operator,
                Process::Webhook => webhook,
            },
            sts_calls,
            reconcile_duration,
            reconcile_errors,
            seconds_until_expiry,
            expiration,
            consecutive_failures,
            writes,
            admissions,
            webhook_certificate_expiration,
            ready: AtomicBool::new(false),
            in_flight: AtomicI64::new(0),
            last_progress: Mutex::new(Instant::now()),
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

    pub fn reconcile_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        *self.last_progress.lock().expect("progress lock") = Instant::now();
    }

    fn is_stalled(&self) -> bool {
        let since = self.last_progress.lock().expect("progress lock").elapsed();
        stalled(self.in_flight.load(Ordering::Relaxed), since)
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

    /// One admission of the webhook, by outcome.
    pub fn admission(&self, outcome: &str) {
        self.admissions
            .get_or_create(&AdmissionLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn webhook_certificate_expiration(&self, at: jiff::Timestamp) {
        self.webhook_certificate_expiration.set(at.as_second());
    }

    /// A subject's state after a reconcile: when its valid credentials expire (`None`: it
    /// has none), as of `now`, and its consecutive failures.
    pub fn subject(
        &self,
        labels: &SubjectLabels,
        expiration: Option<jiff::Timestamp>,
        now: jiff::Timestamp,
        failures: u32,
    ) {
        match expiration {
            Some(at) => {
                self.seconds_until_expiry
                    .get_or_create(labels)
                    .set(at.duration_since(now).as_secs());
                self.expiration.get_or_create(labels).set(at.as_second());
            }
            None => {
                self.seconds_until_expiry.remove(labels);
                self.expiration.remove(labels);
            }
        }
        self.consecutive_failures.get_or_create(labels).set(i64::from(failures));
    }

    pub fn forget_subject(&self, labels: &SubjectLabels) {
        self.seconds_until_expiry.remove(labels);
        self.expiration.remove(labels);
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

// Limits of the server of `/metrics`, `/healthz` and `/readyz`. Scrapers and probes send
// one small request and read one small answer, so the limits can be tight.

/// A client must send a whole request head within this time after connecting (hyper's
/// header read timeout, which also runs while a connection waits for its first byte):
/// a connection that sends nothing, or half a request, is closed after it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Whatever a connection does (e.g. a client that stops reading the answer), it is closed
/// this long after it was accepted. Keep-alive is off: every answer closes its connection.
pub const CONNECTION_MAX_AGE: Duration = Duration::from_secs(60);
/// Connections served at once. A connection accepted beyond that is answered
/// `503 Service Unavailable` at once and closed, without reading its request.
pub const MAX_CONNECTIONS: usize = 64;
/// After a failed `accept` (e.g. EMFILE: out of file descriptors; the connection stays in
/// the backlog) the server waits before it accepts again: from the first of these, doubling
/// up to the second, back to the first after a success.
const ACCEPT_BACKOFF: Backoff = Backoff {
    first: Duration::from_millis(50),
    max: Duration::from_secs(1),
};

#[derive(Clone, Copy, Debug)]
struct Backoff {
    first: Duration,
    max: Duration,
}

/// Written to a connection beyond `MAX_CONNECTIONS`.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
connection: close\r\ncontent-length: 26\r\n\r\ntoo many open connections\n";

fn route(metrics: &Metrics, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" if metrics.is_stalled() => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "reconcile loop stalled\n".into(),
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "caches not synced\n".into(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends. Fails only when it
/// cannot bind `addr`; errors accepting a connection are logged and retried.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(
        %addr,
        max_connections = MAX_CONNECTIONS,
        header_read_timeout_seconds = HEADER_READ_TIMEOUT.as_secs(),
        "serving /metrics, /healthz and /readyz"
    );
    let listener = &listener;
    match accept_loop(move || listener.accept(), ACCEPT_BACKOFF, metrics).await {}
}

/// Accepts connections from `accept` and serves each in a task of its own, at most
/// `MAX_CONNECTIONS` at once; waits `backoff` after a failed accept. Never returns.
async fn accept_loop<A, F, S, P>(mut accept: A, backoff: Backoff, metrics: Arc<Metrics>) -> Infallible
where
    A: FnMut() -> F,
    F: Future<Output = std::io::Result<(S, P)>>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut wait = backoff.first;
    loop {
        let mut stream = match accept().await {
            Ok((stream, _)) => {
                wait = backoff.first;
                stream
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "metrics server: accepting a connection failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(backoff.max);
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Never waits: a fresh connection's send buffer takes these few bytes at once.
            let _ = async {
                stream.write_all(TOO_MANY_CONNECTIONS).await?;
                stream.shutdown().await
            }
            .now_or_never();
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = route(&metrics, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_MAX_AGE, connection).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, io};

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    /// Connections (or accept errors) for the listener of `fed_listener`.
    type Feed = tokio::sync::mpsc::UnboundedSender<io::Result<DuplexStream>>;
    type Accepting = std::pin::Pin<Box<dyn Future<Output = io::Result<(DuplexStream, ())>> + Send>>;

    /// A listener fed by the test: `accept` takes the next connection (or error) sent.
    fn fed_listener() -> (Feed, impl FnMut() -> Accepting) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<io::Result<DuplexStream>>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let accept = move || {
            let rx = rx.clone();
            Box::pin(async move {
                match rx.lock().await.recv().await {
                    Some(next) => next.map(|stream| (stream, ())),
                    None => std::future::pending().await,
                }
            }) as Accepting
        };
        (tx, accept)
    }

    /// Sends `GET path` on a new connection handed to the listener; returns everything the
    /// server wrote until it closed the connection.
    async fn get(tx: &Feed, path: &str) -> String {
        let (mut client, server) = duplex(64 * 1024);
        tx.send(Ok(server)).unwrap();
        client
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        out
    }

    /// No backoff: the tests do not wait.
    const NO_BACKOFF: Backoff = Backoff {
        first: Duration::ZERO,
        max: Duration::ZERO,
    };

    #[tokio::test]
    async fn accept_errors_are_retried() {
        let (tx, accept) = fed_listener();
        let server = tokio::spawn(accept_loop(accept, NO_BACKOFF, Arc::new(Metrics::default())));
        // EMFILE, ECONNABORTED, EMFILE, as accept(2) reports them.
        for errno in [24, 103, 24] {
            tx.send(Err(io::Error::from_raw_os_error(errno))).unwrap();
        }
        let answer = tokio::time::timeout(Duration::from_secs(30), get(&tx, "/healthz"))
            .await
            .expect("the connection after the failed accepts is served");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
        assert!(!server.is_finished(), "the server keeps accepting");
    }

    #[tokio::test]
    async fn a_connection_beyond_the_cap_is_refused_until_one_closes() {
        let (tx, accept) = fed_listener();
        tokio::spawn(accept_loop(accept, NO_BACKOFF, Arc::new(Metrics::default())));
        // MAX_CONNECTIONS connections that send nothing hold every slot.
        let mut idle = VecDeque::new();
        for _ in 0..MAX_CONNECTIONS {
            let (client, server) = duplex(1024);
            tx.send(Ok(server)).unwrap();
            idle.push_back(client);
        }
        let (mut refused, server) = duplex(1024);
        tx.send(Ok(server)).unwrap();
        let mut answer = String::new();
        refused.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
                && answer.ends_with("too many open connections\n"),
            "{answer}"
        );
        // Connections the cap refused hold no slot: still refused.
        let answer = get(&tx, "/healthz").await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        // One idle client goes away: its slot frees, and the next connection is served.
        drop(idle.pop_front());
        let served = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let answer = get(&tx, "/healthz").await;
                if !answer.starts_with("HTTP/1.1 503 ") {
                    return answer;
                }
                tokio::task::yield_now().await;
            }
        });
        let answer = served.await.expect("a connection is served once a slot is free");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
    }

    #[test]
    fn healthz_fails_only_when_work_is_stuck() {
        assert!(!stalled(0, Duration::from_secs(3600)), "idle is healthy");
        assert!(!stalled(3, Duration::from_secs(60)), "progressing");
        assert!(stalled(1, STALL_AFTER + Duration::from_secs(1)));
    }

    #[test]
    fn expiration_is_exported_as_a_timestamp_and_forgotten() {
        let metrics = Metrics::default();
        let labels = SubjectLabels {
            namespace: "ns".into(),
            binding: "b".into(),
            service_account: "sa".into(),
        };
        let now: jiff::Timestamp = "2026-11-29T10:00:00Z".parse().unwrap();
        let at = now + jiff::SignedDuration::from_secs(600);
        metrics.subject(&labels, Some(at), now, 0);
        let text = metrics.render();
        assert!(
            text.contains(&format!(
                "kube_sts_credential_expiration_timestamp_seconds{{namespace=\"ns\",binding=\"b\",service_account=\"sa\"}} {}",
                at.as_second()
            )),
            "{text}"
        );
        assert!(text.contains(
            "kube_sts_credential_seconds_until_expiry{namespace=\"ns\",binding=\"b\",service_account=\"sa\"} 600"
        ));
        metrics.forget_subject(&labels);
        assert!(!metrics.render().contains("namespace=\"ns\""));
    }
}
