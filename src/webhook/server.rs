//! The HTTPS server of `/mutate`: TLS with a serving certificate that can be replaced while
//! it runs (new handshakes get the new one; nothing restarts), and HTTP/1.1 with bounds on
//! what a client can hold ([`Limits`]):
//!
//! - time: the TLS handshake, and then each request, from its first byte (the first one:
//!   from the handshake) until its answer is written, each have a deadline; a client that
//!   trickles a head or a body, or does not read its answer, is closed at it;
//! - size: one request body, and the bodies being read at once (a budget in bytes);
//! - connections: a fixed number; when it is reached, or the body budget is short, room is
//!   made by closing connections of the peer (IP address) holding the most, oldest first,
//!   never of the peer asking. One pod opening connections only ever crowds itself out;
//!   the API server's connections, which hold few, are kept.
//!
//! Who may connect at all is for a NetworkPolicy (the chart's `webhook.networkPolicy.from`).

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    time::{Instant, Sleep},
};

use super::review::Reviewer;

/// The path the API server posts AdmissionReviews to.
pub const PATH: &str = "/mutate";

/// What a client can hold of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A TLS handshake must be done within this time after connecting.
    pub handshake: Duration,
    /// Each request must be received and answered within this time of its first byte (the
    /// first request: of the handshake's end). The API server gives up on a webhook after
    /// its `timeoutSeconds` (at most 30 s; the chart sets 5 s), so an answer later than
    /// that is of no use to anyone.
    pub request: Duration,
    /// How long a kept-alive connection may wait for its next request (hyper's header read
    /// timeout, which runs while a connection waits): longer than the API server keeps an
    /// idle connection (client-go: 90 s), so it is always the API server that closes one,
    /// and it never sends a request on a connection the webhook is closing (Go does not
    /// retry a POST that was written).
    pub idle: Duration,
    /// Connections open at once; one more closes the oldest of the peer holding the most.
    pub max_connections: usize,
    /// The largest request body read.
    pub max_body: usize,
    /// Request bodies being read and reviewed at once, in bytes (declared lengths; a body
    /// without one counts as `max_body`). A request that does not fit closes connections
    /// of the peers holding the most of it (more than the asking peer then would); one that
    /// cannot be made room for is answered 503 at once.
    pub body_budget: usize,
}

/// The limits the webhook runs with.
///
/// `max_body`: an AdmissionReview of a pod CREATE holds the pod once (no `oldObject`). The
/// API server refuses request bodies over 3 MiB (its `MaxRequestBodyBytes`: twice etcd's
/// 1.5 MiB, for JSON's overhead over protobuf), and a pod over etcd's 1.5 MiB cannot be
/// stored at all; 4 MiB covers the largest pod that can exist plus the review around it and
/// what earlier webhooks added. A larger review is answered 413 and the API server admits
/// that pod unchanged.
///
/// `body_budget`: 16 MiB, four reviews of the largest size at once, so that request bodies
/// (and the pods decoded from them) stay well inside the chart's 128 MiB memory limit
/// whatever the number of connections; pods are a few KiB, so thousands fit.
pub const LIMITS: Limits = Limits {
    handshake: Duration::from_secs(10),
    request: Duration::from_secs(10),
    idle: Duration::from_secs(100),
    max_connections: 256,
    max_body: 4 * 1024 * 1024,
    body_budget: 16 * 1024 * 1024,
};

/// The serving certificate and key, replaced in place when the Secret changes.
#[derive(Debug, Default)]
pub struct ServingCert {
    current: RwLock<Option<Served>>,
}

#[derive(Debug)]
struct Served {
    /// The PEM it was loaded from, to tell a change from the same Secret seen again.
    pem: (String, String),
    key: Arc<CertifiedKey>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl ServingCert {
    /// Serves `cert` (PEM chain, leaf first) with `key` from the next handshake on.
    /// `Ok(true)` when this changed what is served.
    pub fn load(&self, cert: &str, key: &str) -> Result<bool, String> {
        let pem = (cert.to_string(), key.to_string());
        if self
            .current
            .read()
            .expect("cert lock")
            .as_ref()
            .is_some_and(|s| s.pem == pem)
        {
            return Ok(false);
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("tls.crt: {e}"))?;
        if chain.is_empty() {
            return Err("tls.crt holds no certificate".into());
        }
        let private = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| format!("tls.key: {e}"))?;
        let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| format!("tls.key: {e}"))?;
        *self.current.write().expect("cert lock") = Some(Served {
            pem,
            key: Arc::new(certified),
        });
        Ok(true)
    }

    pub fn is_loaded(&self) -> bool {
        self.current.read().expect("cert lock").is_some()
    }
}

/// Resolves every handshake to what [`ServingCert`] holds at that moment.
#[derive(Debug)]
struct Resolver(Arc<ServingCert>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0
            .current
            .read()
            .expect("cert lock")
            .as_ref()
            .map(|s| s.key.clone())
    }
}

pub fn tls_config(serving: Arc<ServingCert>) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(serving)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// An error answer after which the connection is closed (its request body may be unread).
fn refuse(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = respond(status, "text/plain", format!("{text}\n").into_bytes());
    response.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    response
}

/// One connection of the table: who, since when, how much of the body budget it holds.
#[derive(Debug)]
struct Entry {
    peer: IpAddr,
    since: Instant,
    reserved: usize,
    task: Option<tokio::task::AbortHandle>,
}

/// The open connections and the body budget they hold.
#[derive(Debug, Default)]
struct Table {
    next: u64,
    entries: HashMap<u64, Entry>,
    reserved: usize,
}

impl Table {
    /// The connection to close to make room: of the peer with the most `weight` (other
    /// than `spare`), the oldest with some; ties go to the peer whose oldest is older. With
    /// that peer's total weight.
    fn victim(&self, weight: impl Fn(&Entry) -> usize, spare: Option<IpAddr>) -> Option<(u64, usize)> {
        let mut per_peer: HashMap<IpAddr, (usize, Instant, u64)> = HashMap::new();
        for (id, entry) in &self.entries {
            let w = weight(entry);
            if w == 0 || Some(entry.peer) == spare {
                continue;
            }
            let peer = per_peer.entry(entry.peer).or_insert((0, entry.since, *id));
            peer.0 += w;
            if (entry.since, *id) < (peer.1, peer.2) {
                (peer.1, peer.2) = (entry.since, *id);
            }
        }
        per_peer
            .into_values()
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)))
            .map(|(total, _, id)| (id, total))
    }

    /// Removes a connection (its task is the caller's to abort).
    fn close(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        self.reserved -= entry.reserved;
        Some(entry)
    }

    /// A new connection from `peer`; with `max` open, the one [`Table::victim`] names by
    /// count is closed first (returned).
    fn open(&mut self, peer: IpAddr, now: Instant, max: usize) -> (u64, Option<Entry>) {
        let closed = if self.entries.len() >= max {
            self.victim(|_| 1, None).and_then(|(id, _)| self.close(id))
        } else {
            None
        };
        self.next += 1;
        let id = self.next;
        self.entries.insert(
            id,
            Entry {
                peer,
                since: now,
                reserved: 0,
                task: None,
            },
        );
        (id, closed)
    }

    /// Reserves `bytes` of `budget` for connection `id`, closing connections of other peers
    /// (as [`Table::victim`] names them by bytes held) while it is short, but only of peers
    /// that hold more than the asking peer then would: a peer never loses to one holding
    /// more. `false`: it does not fit (what was closed is returned all the same).
    fn reserve(&mut self, id: u64, bytes: usize, budget: usize) -> (bool, Vec<Entry>) {
        let Some(peer) = self.entries.get(&id).map(|e| e.peer) else {
            return (false, Vec::new());
        };
        let own: usize = self
            .entries
            .values()
            .filter(|e| e.peer == peer)
            .map(|e| e.reserved)
            .sum();
        let mut closed = Vec::new();
        while self.reserved + bytes > budget {
            match self.victim(|e| e.reserved, Some(peer)) {
                Some((victim, held)) if held > own + bytes => closed.extend(self.close(victim)),
                _ => return (false, closed),
            }
        }
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.reserved += bytes;
            self.reserved += bytes;
        }
        (true, closed)
    }

    fn release(&mut self, id: u64) {
        if let Some(entry) = self.entries.get_mut(&id) {
            self.reserved -= entry.reserved;
            entry.reserved = 0;
        }
    }
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes what the table gave up: their tasks end at their next poll.
fn abort(closed: impl IntoIterator<Item = Entry>, why: &str) {
    for entry in closed {
        tracing::debug!(peer = %entry.peer, why, "webhook server: closing a connection to make room");
        if let Some(task) = entry.task {
            task.abort();
        }
    }
}

/// A connection's entry, removed when its task ends however it ends.
struct Registered {
    id: u64,
    table: Arc<Mutex<Table>>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.table).close(self.id);
    }
}

/// Where a connection is with its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request (hyper's idle timeout runs).
    Idle,
    /// A request is under way and must be answered by `until`.
    Busy { until: Instant, answered: bool },
}

/// The deadline of the request a connection is on, moved by what its I/O and its service
/// see.
#[derive(Debug)]
struct Clock {
    phase: Mutex<Phase>,
    limit: Duration,
}

impl Clock {
    /// The first request must be done within `limit` of `now` (the handshake's end).
    fn new(limit: Duration, now: Instant) -> Self {
        Clock {
            phase: Mutex::new(Phase::Busy {
                until: now + limit,
                answered: false,
            }),
            limit,
        }
    }

    fn update(&self, change: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        *phase = change(*phase);
    }

    fn deadline(&self) -> Option<Instant> {
        match *self.phase.lock().unwrap_or_else(PoisonError::into_inner) {
            Phase::Idle => None,
            Phase::Busy { until, .. } => Some(until),
        }
    }

    /// Bytes arrived: the first ones of a request (after the last answer) start its time.
    fn received(&self, now: Instant) {
        let limit = self.limit;
        self.update(|phase| match phase {
            Phase::Idle | Phase::Busy { answered: true, .. } => Phase::Busy {
                until: now + limit,
                answered: false,
            },
            busy => busy,
        });
    }

    /// A request's head is complete. One that came in with the previous one (pipelined)
    /// starts its time now; otherwise it runs since the request's first byte.
    fn request(&self, now: Instant) {
        self.received(now);
    }

    fn answered(&self) {
        self.update(|phase| match phase {
            Phase::Busy { until, .. } => Phase::Busy { until, answered: true },
            idle => idle,
        });
    }

    /// Everything written is flushed: an answered request is over.
    fn flushed(&self) {
        self.update(|phase| match phase {
            Phase::Busy { answered: true, .. } => Phase::Idle,
            other => other,
        });
    }
}

/// The connection's I/O (inside TLS), failing every read and write once the request under
/// way is past its deadline, and waking the connection then.
struct Deadlined<S> {
    inner: S,
    clock: Arc<Clock>,
    sleep: Pin<Box<Sleep>>,
}

impl<S> Deadlined<S> {
    fn new(inner: S, clock: Arc<Clock>) -> Self {
        let at = clock.deadline().unwrap_or_else(Instant::now);
        Deadlined {
            inner,
            clock,
            sleep: Box::pin(tokio::time::sleep_until(at)),
        }
    }

    /// Whether the request under way is past its deadline; otherwise the deadline wakes
    /// the task.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.clock.deadline() else {
            return false;
        };
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        self.sleep.as_mut().poll(cx).is_ready()
    }
}

fn deadline_passed() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the request was not done by its deadline")
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadlined<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(deadline_passed()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.received(Instant::now());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadlined<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(deadline_passed()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(deadline_passed()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(deadline_passed()));
        }
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        if matches!(polled, Poll::Ready(Ok(()))) {
            this.clock.flushed();
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(deadline_passed()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// What a request's handling needs of its connection.
struct Conn {
    id: u64,
    table: Arc<Mutex<Table>>,
    limits: Limits,
}

/// Body budget held by a request, released when it is answered.
struct Reservation<'a>(&'a Conn);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.0.table).release(self.0.id);
    }
}

async fn handle(req: Request<hyper::body::Incoming>, reviewer: &Reviewer, conn: &Conn) -> Response<Full<Bytes>> {
    if req.uri().path() != PATH {
        return respond(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec());
    }
    if req.method() != Method::POST {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"POST only\n".to_vec());
    }
    let max = conn.limits.max_body;
    let declared = hyper::body::Body::size_hint(req.body()).exact();
    let wanted = match declared.map(|n| usize::try_from(n).unwrap_or(usize::MAX)) {
        Some(n) if n > max => {
            reviewer.unreadable();
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body of {n} bytes; at most {max} are read"),
            );
        }
        Some(n) => n,
        None => max,
    };
    let (fits, closed) = lock(&conn.table).reserve(conn.id, wanted, conn.limits.body_budget);
    abort(closed, "request body budget");
    if !fits {
        // Debug only: the peer that fills the budget is the one that gets these.
        tracing::debug!(
            bytes = wanted,
            "webhook server: no room in the request body budget for this request (its peer holds as much as the others); answered 503"
        );
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "too many request bodies under way");
    }
    let _reservation = Reservation(conn);
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            reviewer.unreadable();
            let status = if e.is::<LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return refuse(status, &format!("reading the request body: {e}"));
        }
    };
    match reviewer.review(&body) {
        Ok(answer) => respond(StatusCode::OK, "application/json", answer),
        Err(message) => respond(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("{message}\n").into_bytes(),
        ),
    }
}

/// Serves `/mutate` on `listener` until `stop` completes; while `accepting` is false every
/// connection is closed at once.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    reviewer: Arc<Reviewer>,
    accepting: Arc<AtomicBool>,
    stop: impl Future<Output = ()>,
) {
    let listener = &listener;
    let accept = move || async move { listener.accept().await.map(|(stream, peer)| (stream, peer.ip())) };
    serve_with(accept, tls, reviewer, accepting, LIMITS, Arc::default(), stop).await;
}

/// [`serve`] of the connections `accept` gives (with their peer), within `limits`, keeping
/// the open ones in `table`.
async fn serve_with<A, F, S>(
    mut accept: A,
    tls: Arc<ServerConfig>,
    reviewer: Arc<Reviewer>,
    accepting: Arc<AtomicBool>,
    limits: Limits,
    table: Arc<Mutex<Table>>,
    stop: impl Future<Output = ()>,
) where
    A: FnMut() -> F,
    F: Future<Output = io::Result<(S, IpAddr)>>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook server: accepting a connection failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        if !accepting.load(Ordering::Relaxed) {
            continue; // dropped: closed at once
        }
        let mut open = lock(&table);
        let (id, closed) = open.open(peer, Instant::now(), limits.max_connections);
        abort(closed, "connections");
        let conn = Conn {
            id,
            table: table.clone(),
            limits,
        };
        let task = tokio::spawn(connection(stream, conn, acceptor.clone(), reviewer.clone()));
        if let Some(entry) = open.entries.get_mut(&id) {
            entry.task = Some(task.abort_handle());
        }
    }
}

/// Serves one connection: the handshake, then its requests, each within its deadline.
async fn connection<S>(stream: S, conn: Conn, acceptor: tokio_rustls::TlsAcceptor, reviewer: Arc<Reviewer>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _registered = Registered {
        id: conn.id,
        table: conn.table.clone(),
    };
    let tls = match tokio::time::timeout(conn.limits.handshake, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "webhook server: TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let clock = Arc::new(Clock::new(conn.limits.request, Instant::now()));
    let idle = conn.limits.idle;
    let io = Deadlined::new(tls, clock.clone());
    let conn = Arc::new(conn);
    let service = service_fn(move |req| {
        let (reviewer, conn, clock) = (reviewer.clone(), conn.clone(), clock.clone());
        async move {
            clock.request(Instant::now());
            let response = handle(req, &reviewer, &conn).await;
            clock.answered();
            Ok::<_, Infallible>(response)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "webhook server: connection closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::certs;
    use jiff::Timestamp;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    type Client = tokio_rustls::client::TlsStream<DuplexStream>;

    const HOG: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9));
    const API: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    /// A server fed connections by the test, and a client configuration that trusts it.
    struct Server {
        feed: tokio::sync::mpsc::UnboundedSender<(DuplexStream, IpAddr)>,
        table: Arc<Mutex<Table>>,
        client: Arc<rustls::ClientConfig>,
        reviewer: Arc<Reviewer>,
    }

    fn reviewer() -> Reviewer {
        let bindings = Arc::new(crate::webhook::bindings::Cache::default());
        bindings.apply(kube::runtime::watcher::Event::Init);
        bindings.apply(kube::runtime::watcher::Event::InitDone);
        let (namespaces, _) = kube::runtime::reflector::store();
        Reviewer {
            bindings,
            namespaces,
            metrics: Arc::new(crate::metrics::Metrics::new(crate::metrics::Process::Webhook)),
        }
    }

    fn start(limits: Limits) -> Server {
        let generation = certs::issue(
            &["localhost".to_string()],
            jiff::SignedDuration::from_hours(1),
            Timestamp::now(),
        )
        .unwrap();
        let serving = Arc::new(ServingCert::default());
        serving.load(&generation.cert, &generation.key).unwrap();
        let (feed, rx) = tokio::sync::mpsc::unbounded_channel::<(DuplexStream, IpAddr)>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let accept = move || {
            let rx = rx.clone();
            async move {
                match rx.lock().await.recv().await {
                    Some(next) => Ok(next),
                    None => std::future::pending().await,
                }
            }
        };
        let table = Arc::new(Mutex::new(Table::default()));
        let reviewer = Arc::new(reviewer());
        tokio::spawn(serve_with(
            accept,
            tls_config(serving).unwrap(),
            reviewer.clone(),
            Arc::new(AtomicBool::new(true)),
            limits,
            table.clone(),
            std::future::pending(),
        ));
        let mut roots = rustls::RootCertStore::empty();
        for der in certs::ders(&generation.ca) {
            roots.add(der.into()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Server {
            feed,
            table,
            client: Arc::new(client),
            reviewer,
        }
    }

    impl Server {
        /// A new connection from `peer`, its TLS handshake done.
        async fn connect(&self, peer: IpAddr) -> Client {
            let (client, server) = tokio::io::duplex(256 * 1024);
            self.feed.send((server, peer)).unwrap();
            tokio_rustls::TlsConnector::from(self.client.clone())
                .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), client)
                .await
                .expect("TLS handshake")
        }

        /// Waits (polling) until the table satisfies `done`.
        async fn until(&self, what: &str, done: impl Fn(&Table) -> bool) {
            let waited = tokio::time::timeout(Duration::from_secs(60), async {
                while !done(&lock(&self.table)) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            assert!(waited.is_ok(), "timed out waiting for: {what}: {:?}", lock(&self.table));
        }
    }

    fn head(length: usize, close: bool) -> String {
        let connection = if close { "connection: close\r\n" } else { "" };
        format!(
            "POST {PATH} HTTP/1.1\r\nhost: x\r\n{connection}content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
        )
    }

    /// An AdmissionReview of a pod nobody binds.
    fn review() -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "team-a",
                "operation": "CREATE",
                "userInfo": {"username": "someone"},
                "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "x"}]}},
            }
        }))
        .unwrap()
    }

    /// Everything the server writes until it closes the connection.
    async fn read_all(stream: &mut Client) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the server did not close the connection");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// One response on a kept-alive connection (head and a body of its content-length).
    async fn read_response(stream: &mut Client) -> String {
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        while !out.ends_with(b"\r\n\r\n") {
            assert_eq!(
                stream.read(&mut byte).await.expect("reading a response"),
                1,
                "closed: {out:?}"
            );
            out.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&out).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.trim().parse().ok())
            .expect("content-length");
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.unwrap();
        out.extend(body);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// POSTs `body` with `connection: close`: the whole answer (which may come, and the
    /// connection close, before the body is written: write errors are not the test's).
    async fn post(stream: &mut Client, body: &[u8]) -> String {
        let request = [head(body.len(), true).as_bytes(), body].concat();
        if stream.write_all(&request).await.is_ok() {
            let _ = stream.flush().await;
        }
        read_all(stream).await
    }

    fn answered(response: &str) {
        assert!(
            response.starts_with("HTTP/1.1 200 OK\r\n") && response.contains("\"allowed\":true"),
            "{response}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_trickling_its_body_is_closed_at_the_deadline_while_others_are_answered() {
        let server = start(Limits {
            request: Duration::from_secs(3),
            ..LIMITS
        });
        // A head promising a large body, then a byte every 100 ms: it would take hours.
        let total = 1_000_000;
        let trickler = server.connect(HOG).await;
        let (mut reader, mut writer) = tokio::io::split(trickler);
        writer.write_all(head(total, false).as_bytes()).await.unwrap();
        writer.flush().await.unwrap();
        let trickling = tokio::spawn(async move {
            let mut sent = 0;
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    read = reader.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { return sent },
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        if writer.write_all(b" ").await.is_err() || writer.flush().await.is_err() {
                            return sent;
                        }
                        sent += 1;
                    }
                }
            }
        });
        server
            .until("the trickler's body is being read", |t| t.reserved == total)
            .await;
        answered(&post(&mut server.connect(API).await, &review()).await);
        let sent = tokio::time::timeout(Duration::from_secs(60), trickling)
            .await
            .expect("the trickling client is closed")
            .unwrap();
        assert!(sent < total, "closed after {sent} of {total} bytes");
        server
            .until("every connection is gone and the budget free", |t| {
                t.entries.is_empty() && t.reserved == 0
            })
            .await;
        assert!(
            server
                .reviewer
                .metrics
                .render()
                .contains("kube_sts_webhook_admissions_total{outcome=\"invalid\"} 1"),
            "the trickled request counts as unreadable"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_alive_connection_outlives_the_deadline_of_its_answered_request() {
        let server = start(Limits {
            request: Duration::from_secs(3),
            ..LIMITS
        });
        let mut conn = server.connect(API).await;
        for _ in 0..2 {
            let body = review();
            conn.write_all(head(body.len(), false).as_bytes()).await.unwrap();
            conn.write_all(&body).await.unwrap();
            conn.flush().await.unwrap();
            answered(&read_response(&mut conn).await);
            // Idle past the request deadline (only time passing can show that nothing
            // closes the connection).
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_holding_every_connection_loses_its_oldest() {
        let server = start(Limits {
            max_connections: 3,
            ..LIMITS
        });
        let mut hog = Vec::new();
        for _ in 0..3 {
            hog.push(server.connect(HOG).await);
        }
        answered(&post(&mut server.connect(API).await, &review()).await);
        assert_eq!(read_all(&mut hog[0]).await, "", "the oldest of the hog's is closed");
        answered(&post(&mut hog[1], &review()).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_body_budget_goes_to_other_peers_at_the_expense_of_the_peer_holding_it() {
        let max = 64 * 1024;
        let server = start(Limits {
            max_body: max,
            body_budget: 2 * max,
            ..LIMITS
        });
        let mut hog = Vec::new();
        for _ in 0..2 {
            let mut conn = server.connect(HOG).await;
            conn.write_all(head(max, false).as_bytes()).await.unwrap();
            conn.flush().await.unwrap();
            hog.push(conn);
        }
        server
            .until("the hog holds the budget", |t| t.reserved == 2 * max)
            .await;
        // The hog's next request does not fit, and closes nothing.
        let refused = post(&mut server.connect(HOG).await, &review()).await;
        assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
        // Another peer's does, at the hog's expense.
        answered(&post(&mut server.connect(API).await, &review()).await);
        assert_eq!(read_all(&mut hog[0]).await, "", "the hog's oldest is closed");
        server
            .until("the budget is free but for the hog's other", |t| t.reserved == max)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_over_the_cap_is_refused_unread() {
        let server = start(Limits {
            max_body: 1024,
            ..LIMITS
        });
        let mut conn = server.connect(API).await;
        conn.write_all(head(1025, false).as_bytes()).await.unwrap();
        conn.flush().await.unwrap();
        let answer = read_all(&mut conn).await;
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        assert!(
            answer.contains("request body of 1025 bytes; at most 1024 are read"),
            "{answer}"
        );
    }

    #[test]
    fn a_requests_time_runs_from_its_first_byte_until_its_answer_is_flushed() {
        let limit = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let clock = Clock::new(limit, t0);
        assert_eq!(clock.deadline(), Some(at(10)), "the first request: from the handshake");
        clock.received(at(1));
        clock.request(at(2));
        assert_eq!(clock.deadline(), Some(at(10)), "a head does not move it");
        clock.flushed();
        assert_eq!(
            clock.deadline(),
            Some(at(10)),
            "flushing before the answer ends nothing"
        );
        clock.answered();
        clock.flushed();
        assert_eq!(clock.deadline(), None, "answered and flushed: idle");
        clock.received(at(50));
        assert_eq!(clock.deadline(), Some(at(60)), "the next request: from its first byte");
        clock.received(at(55));
        assert_eq!(clock.deadline(), Some(at(60)), "more bytes do not move it");
        // A request that came in with the answered one starts its own time.
        clock.answered();
        clock.request(at(57));
        assert_eq!(clock.deadline(), Some(at(67)));
    }

    #[test]
    fn room_is_made_at_the_expense_of_the_peer_holding_the_most() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut table = Table::default();
        let (a1, _) = table.open(API, at(0), 4);
        let (h1, _) = table.open(HOG, at(1), 4);
        let (h2, _) = table.open(HOG, at(2), 4);
        let (h3, _) = table.open(HOG, at(3), 4);
        let (_, closed) = table.open(API, at(4), 4);
        assert_eq!(closed.map(|e| (e.peer, e.since)), Some((HOG, at(1))));
        assert!(table.entries.contains_key(&a1) && !table.entries.contains_key(&h1));
        // Bytes: the hog holds the most; a request of the API server closes the hog's
        // oldest holder; the hog asking for more than the budget minus its own gets nothing.
        let (ok, closed) = table.reserve(h2, 40, 100);
        assert!(ok && closed.is_empty());
        let (ok, closed) = table.reserve(h3, 40, 100);
        assert!(ok && closed.is_empty());
        let (ok, closed) = table.reserve(a1, 30, 100);
        assert!(ok);
        assert_eq!(closed.iter().map(|e| e.since).collect::<Vec<_>>(), [at(2)]);
        assert_eq!(table.reserved, 70);
        let (ok, closed) = table.reserve(h3, 40, 100);
        assert!(
            !ok && closed.is_empty(),
            "the hog would hold 80, the API server's 30 stay"
        );
        table.release(a1);
        assert_eq!(table.reserved, 40);
        table.close(h3);
        assert_eq!(table.reserved, 0);
    }

    #[test]
    fn a_new_certificate_is_served_from_the_next_handshake_and_garbage_is_refused() {
        let now = Timestamp::now();
        let names = vec!["127.0.0.1".to_string()];
        let first = certs::issue(&names, jiff::SignedDuration::from_hours(1), now).unwrap();
        let second = certs::issue(&names, jiff::SignedDuration::from_hours(1), now).unwrap();
        let serving = Arc::new(ServingCert::default());
        let resolver = Resolver(serving.clone());
        let served = || {
            resolver
                .0
                .current
                .read()
                .unwrap()
                .as_ref()
                .map(|s| s.key.cert[0].to_vec())
        };
        assert!(!serving.is_loaded() && served().is_none());
        assert_eq!(serving.load(&first.cert, &first.key), Ok(true));
        assert_eq!(
            serving.load(&first.cert, &first.key),
            Ok(false),
            "the same again changes nothing"
        );
        assert_eq!(served(), Some(certs::ders(&first.cert)[0].clone()));
        assert_eq!(serving.load(&second.cert, &second.key), Ok(true));
        assert_eq!(served(), Some(certs::ders(&second.cert)[0].clone()));
        // A key of another certificate is refused; what was served stays.
        assert!(serving.load(&first.cert, &second.key).is_err());
        assert_eq!(served(), Some(certs::ders(&second.cert)[0].clone()));
    }
}
