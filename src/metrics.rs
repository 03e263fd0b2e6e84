//! Prometheus metrics and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite};

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

/// A subject's labels as the per-subject families hold them: one allocation shared by the
/// three series of a subject (each family would otherwise keep its own three strings).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct SharedSubjectLabels(std::sync::Arc<SubjectLabels>);

impl EncodeLabelSet for SharedSubjectLabels {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

pub struct Metrics {
    registry: Registry,
    sts_calls: Family<StsCallLabels, Counter>,
    reconcile_duration: Histogram,
    reconcile_errors: Family<ErrorLabels, Counter>,
    seconds_until_expiry: Family<SharedSubjectLabels, Gauge>,
    expiration: Family<SharedSubjectLabels, Gauge>,
    consecutive_failures: Family<SharedSubjectLabels, Gauge>,
    writes: Family<WriteLabels, Counter>,
    admissions: Family<AdmissionLabels, Counter>,
    webhook_certificate_expiration: Gauge,
    webhook_certificate_failures: Counter,
    shards_held: Gauge,
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
        let seconds_until_expiry = Family::<SharedSubjectLabels, Gauge>::default();
        operator.register(
            "credential_seconds_until_expiry",
            "Seconds until the credentials in a subject's Secret expire",
            seconds_until_expiry.clone(),
        );
        let expiration = Family::<SharedSubjectLabels, Gauge>::default();
        operator.register(
            "credential_expiration_timestamp_seconds",
            "When the credentials in a subject's Secret expire (Unix time; alert on time() - this)",
            expiration.clone(),
        );
        let consecutive_failures = Family::<SharedSubjectLabels, Gauge>::default();
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
        let shards_held = Gauge::default();
        operator.register(
            "shards_held",
            "Shards whose Lease this replica holds (--shards > 1)",
            shards_held.clone(),
        );
        let webhook_certificate_failures = Counter::default();
        webhook.register(
            "webhook_certificate_failures",
            "Failures keeping the webhook's certificate (API errors but for write conflicts between replicas, a certificate in the Secret that cannot be served); each is retried",
            webhook_certificate_failures.clone(),
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
            webhook_certificate_failures,
            shards_held,
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

    /// A reconcile that started and was cancelled (its shard no longer held).
    pub fn reconcile_abandoned(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
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

    pub fn webhook_certificate_failure(&self) {
        self.webhook_certificate_failures.inc();
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
        // Created by the first series that needs it, shared by the others (a series that
        // exists keeps the labels it was created with, equal to these).
        let labels = SharedSubjectLabels(std::sync::Arc::new(labels.clone()));
        match expiration {
            Some(at) => {
                self.seconds_until_expiry
                    .get_or_create(&labels)
                    .set(at.duration_since(now).as_secs());
                self.expiration.get_or_create(&labels).set(at.as_second());
            }
            None => {
                self.seconds_until_expiry.remove(&labels);
                self.expiration.remove(&labels);
            }
        }
        self.consecutive_failures
            .get_or_create(&labels)
            .set(i64::from(failures));
    }

    pub fn forget_subject(&self, labels: &SubjectLabels) {
        let labels = SharedSubjectLabels(std::sync::Arc::new(labels.clone()));
        self.seconds_until_expiry.remove(&labels);
        self.expiration.remove(&labels);
        self.consecutive_failures.remove(&labels);
    }

    pub fn set_shards_held(&self, held: i64) {
        self.shards_held.set(held);
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
/// Connections served at once. When a connection arrives with this many open, the oldest
/// connection of the peer holding the most is closed to make room: one client holding
/// connections open (a tenant's pod, say) loses its own, and a kubelet probe or a scraper,
/// whose request arrives at once, is still served.
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

/// The open connections, by id: their peer and when they were accepted.
#[derive(Default)]
struct Open {
    next: u64,
    by_id: HashMap<u64, (IpAddr, Instant)>,
}

impl Open {
    /// The connection to close for a new one when full: the oldest of the peer holding the
    /// most (ties: the peer whose oldest is older).
    fn victim(&self) -> Option<u64> {
        let mut per_peer: HashMap<IpAddr, (usize, Instant, u64)> = HashMap::new();
        for (id, (peer, since)) in &self.by_id {
            let entry = per_peer.entry(*peer).or_insert((0, *since, *id));
            entry.0 += 1;
            if *since < entry.1 || (*since == entry.1 && *id < entry.2) {
                (entry.1, entry.2) = (*since, *id);
            }
        }
        per_peer
            .into_values()
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)))
            .map(|(_, _, id)| id)
    }
}

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
    let accept = move || async move { listener.accept().await.map(|(stream, peer)| (stream, peer.ip())) };
    match accept_loop(accept, ACCEPT_BACKOFF, metrics).await {}
}

/// Accepts connections from `accept` and serves each in a task of its own, at most
/// `MAX_CONNECTIONS` at once (making room as [`Open::victim`] says); waits `backoff` after
/// a failed accept. Never returns.
async fn accept_loop<A, F, S>(mut accept: A, backoff: Backoff, metrics: Arc<Metrics>) -> Infallible
where
    A: FnMut() -> F,
    F: Future<Output = std::io::Result<(S, IpAddr)>>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let open = Arc::new(Mutex::new(Open::default()));
    let mut tasks: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    let mut wait = backoff.first;
    loop {
        let (stream, peer) = match accept().await {
            Ok(accepted) => {
                wait = backoff.first;
                accepted
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "metrics server: accepting a connection failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(backoff.max);
                continue;
            }
        };
        let id = {
            let mut open = open.lock().expect("connections lock");
            tasks.retain(|id, _| open.by_id.contains_key(id));
            if open.by_id.len() >= MAX_CONNECTIONS
                && let Some(victim) = open.victim()
            {
                open.by_id.remove(&victim);
                if let Some(task) = tasks.remove(&victim) {
                    task.abort();
                }
            }
            open.next += 1;
            let id = open.next;
            open.by_id.insert(id, (peer, Instant::now()));
            id
        };
        let (metrics, registry) = (metrics.clone(), open.clone());
        let task = tokio::spawn(async move {
            // Leaves the table however the task ends (answered, timed out, closed for room).
            let _registered = Registered { id, open: registry };
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
        });
        tasks.insert(id, task.abort_handle());
    }
}

/// A connection's entry in the table of open ones, removed when its task ends.
struct Registered {
    id: u64,
    open: Arc<Mutex<Open>>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.open.lock().expect("connections lock").by_id.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, io};

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use futures::FutureExt;

    use super::*;

    /// Connections (with their peer) or accept errors for the listener of `fed_listener`.
    type Feed = tokio::sync::mpsc::UnboundedSender<io::Result<(DuplexStream, IpAddr)>>;
    type Accepting = std::pin::Pin<Box<dyn Future<Output = io::Result<(DuplexStream, IpAddr)>> + Send>>;

    /// A listener fed by the test: `accept` takes the next connection (or error) sent.
    fn fed_listener() -> (Feed, impl FnMut() -> Accepting) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<io::Result<(DuplexStream, IpAddr)>>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let accept = move || {
            let rx = rx.clone();
            Box::pin(async move {
                match rx.lock().await.recv().await {
                    Some(next) => next,
                    None => std::future::pending().await,
                }
            }) as Accepting
        };
        (tx, accept)
    }

    const PROBE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const POD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    /// Sends `GET path` from `peer` on a new connection handed to the listener; returns
    /// everything the server wrote until it closed the connection.
    async fn get_from(tx: &Feed, peer: IpAddr, path: &str) -> String {
        let (mut client, server) = duplex(64 * 1024);
        tx.send(Ok((server, peer))).unwrap();
        client
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn get(tx: &Feed, path: &str) -> String {
        get_from(tx, PROBE, path).await
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
    async fn a_client_holding_every_connection_loses_its_oldest_not_the_probe() {
        let (tx, accept) = fed_listener();
        tokio::spawn(accept_loop(accept, NO_BACKOFF, Arc::new(Metrics::default())));
        // One peer holds every connection, sending nothing.
        let mut idle = VecDeque::new();
        for _ in 0..MAX_CONNECTIONS {
            let (client, server) = duplex(1024);
            tx.send(Ok((server, POD))).unwrap();
            idle.push_back(client);
        }
        // A probe from elsewhere is served...
        let answer = tokio::time::timeout(Duration::from_secs(30), get(&tx, "/healthz"))
            .await
            .expect("the probe is served");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        // ...in the room made by closing that peer's oldest connection, and only that one.
        let mut oldest = idle.pop_front().unwrap();
        let mut rest = String::new();
        tokio::time::timeout(Duration::from_secs(30), oldest.read_to_string(&mut rest))
            .await
            .expect("the oldest idle connection is closed")
            .unwrap();
        assert_eq!(rest, "");
        let mut next = idle.pop_front().unwrap();
        let mut byte = [0u8; 1];
        assert!(
            next.read(&mut byte).now_or_never().is_none(),
            "a younger connection was closed too"
        );
    }

    #[test]
    fn room_is_made_by_the_peer_holding_the_most() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let open = |conns: &[(u64, IpAddr, u64)]| Open {
            next: 0,
            by_id: conns.iter().map(|(id, peer, s)| (*id, (*peer, at(*s)))).collect(),
        };
        assert_eq!(open(&[]).victim(), None);
        // The pod holds more than the probe: its oldest goes, though the probe's is older.
        assert_eq!(open(&[(1, PROBE, 0), (2, POD, 5), (3, POD, 3)]).victim(), Some(3));
        // As many each: the peer whose oldest is older.
        assert_eq!(open(&[(1, PROBE, 2), (2, POD, 1)]).victim(), Some(2));
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
