//! The HTTPS server of `/mutate`: TLS with a serving certificate that can be replaced while
//! it runs (new handshakes get the new one; nothing restarts), and HTTP/1.1 with bounds on
//! what a client can hold.

use std::{
    convert::Infallible,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{net::TcpListener, sync::Semaphore};

use super::review::Reviewer;

/// The path the API server posts AdmissionReviews to.
pub const PATH: &str = "/mutate";
/// A TLS handshake must be done within this time after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first request's head must have arrived this long after the handshake.
pub const FIRST_REQUEST_WITHIN: Duration = Duration::from_secs(10);
/// Later request heads, and the idle time between requests (hyper's header read timeout
/// runs while a kept-alive connection waits): longer than the API server keeps an idle
/// connection (client-go: 90 s), so it is always the API server that closes one, and it
/// never sends a request on a connection the webhook is closing (Go does not retry a POST
/// that was written).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(100);
/// Connections served at once; one beyond is closed at once. The API server keeps a few
/// connections alive per replica, so this is far above what it needs.
pub const MAX_CONNECTIONS: usize = 256;
/// The largest AdmissionReview read (a pod is at most 1.5 MiB in etcd; the review holds it
/// once for a CREATE).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

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

async fn handle(req: Request<hyper::body::Incoming>, reviewer: &Reviewer) -> Response<Full<Bytes>> {
    if req.uri().path() != PATH {
        return respond(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec());
    }
    if req.method() != Method::POST {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"POST only\n".to_vec());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            reviewer.unreadable();
            return respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                format!("{e}\n").into_bytes(),
            );
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
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let (acceptor, reviewer) = (acceptor.clone(), reviewer.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "webhook server: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let served = Arc::new(AtomicBool::new(false));
            let seen = served.clone();
            let service = service_fn(move |req| {
                seen.store(true, Ordering::Relaxed);
                let reviewer = reviewer.clone();
                async move { Ok::<_, Infallible>(handle(req, &reviewer).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(IDLE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            let mut connection = std::pin::pin!(connection);
            match tokio::time::timeout(FIRST_REQUEST_WITHIN, connection.as_mut()).await {
                Ok(_) => {}
                // Nothing asked in time: closed (dropped).
                Err(_) if !served.load(Ordering::Relaxed) => {}
                Err(_) => {
                    let _ = connection.await;
                }
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::certs;
    use jiff::Timestamp;

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
