//! The server of `/metrics`, `/healthz` and `/readyz` bounds what a client can hold open:
//! a connection that sends half a request head, or nothing, is closed (header read
//! timeout); an answered request closes its connection (no keep-alive); and a client
//! holding `MAX_CONNECTIONS` connections open loses its oldest to the next connection, so a
//! probe or a scraper is still served.

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
async fn a_client_holding_every_connection_does_not_keep_the_probe_out() {
    let (_ns, _sts, mut operator) = serving_operator().await;
    let addr = operator.metrics_addr;
    // Another address of this machine stands for a pod holding connections open (sending
    // nothing); the probe comes from the usual one.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(socket.connect(addr).await.unwrap());
    }
    let answer = get(addr, "/healthz")
        .await
        .unwrap_or_else(|| panic!("with {MAX_CONNECTIONS} connections held by another client, /healthz got no answer"));
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    // The room was made by closing the holder's oldest connection.
    let closed = read_until_closed(&mut idle[0], CLOSE_DEADLINE).await;
    assert_eq!(
        closed.as_deref(),
        Some(""),
        "the oldest held connection is closed, answered nothing"
    );
    assert_eq!(operator.exited(), None, "the operator keeps running");
}
