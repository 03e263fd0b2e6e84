//! The server of `/metrics`, `/healthz` and `/readyz` bounds what a client can hold open:
//! a connection that sends half a request head, or nothing, is closed (header read
//! timeout); an answered request closes its connection (no keep-alive); and while
//! `MAX_CONNECTIONS` connections are open, one more is refused with a 503 at once, until
//! one of them closes.

use std::{net::SocketAddr, time::Duration};

use kube_sts::metrics::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::*;

/// How long a test waits for the server to close a connection: well past the server's own
/// limits, so that only a server that never closes it fails.
const CLOSE_DEADLINE: Duration = Duration::from_secs(60);

/// An operator on a namespace of its own, once it serves `/metrics`; started again when
/// its port was taken between the harness choosing it and the operator binding it.
async fn serving_operator() -> (TestNamespace, Forwarder, Operator) {
    let ns = TestNamespace::new("metrics").await;
    let sts = Forwarder::start().await;
    for attempt in 1.. {
        let mut operator = Operator::start(&ns.name, &sts, &[]);
        let serving = eventually("the operator serves /metrics or exits", Duration::from_secs(30), || {
            let seen = if operator.logs().contains("serving /metrics") {
                Some(true)
            } else {
                operator.exited().map(|_| false)
            };
            async move { seen }
        })
        .await;
        if serving {
            return (ns, sts, operator);
        }
        let log = operator.logs();
        assert!(
            attempt < 3 && log.contains("Address already in use"),
            "the operator exited: {log}"
        );
    }
    unreachable!()
}

/// Everything the server wrote until it closed the connection (a reset counts as closed);
/// `None` when the connection is still open after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut out)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(e)) => panic!("reading from the metrics server: {e}"),
        Err(_) => return None,
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// A full `GET path` on a new connection; the answer once the server closed it.
async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.expect("metrics endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_until_closed(&mut stream, CLOSE_DEADLINE).await
}

#[tokio::test]
async fn a_connection_that_sends_half_a_request_or_nothing_is_closed() {
    let (_ns, _sts, operator) = serving_operator().await;
    let addr = operator.metrics_addr;
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();

    let answer = read_until_closed(&mut half, CLOSE_DEADLINE).await.unwrap_or_else(|| {
        panic!(
            "a connection that sent half a request head is still open after {CLOSE_DEADLINE:?} \
             (header read timeout {HEADER_READ_TIMEOUT:?})"
        )
    });
    assert!(!answer.contains(" 200 "), "half a request was answered: {answer}");
    let answer = read_until_closed(&mut silent, CLOSE_DEADLINE)
        .await
        .unwrap_or_else(|| panic!("a connection that sent nothing is still open after {CLOSE_DEADLINE:?}"));
    assert!(!answer.contains(" 200 "), "an empty request was answered: {answer}");

    let answer = get(addr, "/healthz").await.expect("/healthz answered and closed");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
}

#[tokio::test]
async fn an_answered_request_closes_its_connection() {
    let (_ns, _sts, operator) = serving_operator().await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        // HTTP/1.1 asks for keep-alive; the server answers and closes all the same.
        let answer = get(operator.metrics_addr, path)
            .await
            .unwrap_or_else(|| panic!("{path}: the connection is still open after the answer"));
        let (head, _) = answer.split_once("\r\n\r\n").expect("a whole answer");
        assert!(head.starts_with("HTTP/1.1 "), "{path}: {answer}");
        assert!(
            head.lines().any(|l| l.eq_ignore_ascii_case("connection: close")),
            "{path}: the answer does not say `connection: close`: {head}"
        );
    }
}

#[tokio::test]
async fn beyond_the_connection_cap_a_connection_is_refused_until_one_closes() {
    let (_ns, _sts, mut operator) = serving_operator().await;
    let addr = operator.metrics_addr;
    // The server accepts connections in the order they were made, so these hold every slot
    // when the next one is accepted (for HEADER_READ_TIMEOUT: they send nothing).
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut refused = TcpStream::connect(addr).await.unwrap();
    let answer = read_until_closed(&mut refused, CLOSE_DEADLINE)
        .await
        .unwrap_or_else(|| panic!("with {MAX_CONNECTIONS} connections open, one more is neither refused nor closed"));
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n") && answer.ends_with("too many open connections\n"),
        "with {MAX_CONNECTIONS} connections open, one more got: {answer:?}"
    );

    drop(idle);
    eventually(
        "/healthz is served again once the idle connections closed",
        Duration::from_secs(30),
        || async {
            get(addr, "/healthz")
                .await
                .filter(|a| a.starts_with("HTTP/1.1 200 OK\r\n"))
        },
    )
    .await;
    assert_eq!(operator.exited(), None, "the operator keeps running");
}
