//! `--leader-election`: two operator processes on one namespace, each behind its own STS
//! forwarder; only the Lease holder reconciles, a standby takes over after the leader is
//! killed (within the lease duration) or at once after it released the Lease on SIGTERM,
//! and a leader that lost its Lease exits.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, api::PostParams};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::*;

/// Lease duration of the operator (src/leader.rs) and how often a standby tries.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

fn election_args<'a>(ns: &'a str, lease: &'a str) -> [&'a str; 5] {
    ["--leader-election", "--lease-namespace", ns, "--lease-name", lease]
}

/// Sum of `kube_sts_api_writes_total` over all labels.
fn api_writes(metrics: &str) -> f64 {
    metric_sum(metrics, "kube_sts_api_writes_total")
}

fn reconciles(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("kube_sts_reconcile_duration_seconds_count"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The identity the operator logged when it acquired the Lease.
fn acquired_as(operator: &Operator) -> Option<String> {
    operator.logs().lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v["message"] == "acquired the leader Lease").then(|| v["identity"].as_str().map(str::to_string))?
    })
}

async fn wait_acquired(operator: &Operator, within: Duration) -> String {
    eventually("operator acquires the leader Lease", within, || async {
        acquired_as(operator)
    })
    .await
}

async fn holder(ns: &TestNamespace, lease: &str) -> Option<String> {
    Api::<Lease>::namespaced(ns.client.clone(), &ns.name)
        .get_opt(lease)
        .await
        .unwrap()?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// Status code of a plain HTTP GET.
async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).await.expect("metrics endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over_after_a_kill() {
    let ns = TestNamespace::new("leader").await;
    for sa in ["a", "b", "c"] {
        ns.service_account(sa).await;
    }
    let role = granted_role(&ns, None, "");
    let lease = unique("lease");
    let args = election_args(&ns.name, &lease);
    let (sts1, sts2) = (Forwarder::start().await, Forwarder::start().await);

    let mut first = Operator::start(&ns.name, &sts1, &args);
    let first_id = wait_acquired(&first, Duration::from_secs(30)).await;
    let second = Operator::start(&ns.name, &sts2, &args);
    eventually("second operator stands by", Duration::from_secs(30), || async {
        second.logs().contains("standing by").then_some(())
    })
    .await;
    // A standby serves /healthz, /metrics and /readyz (a rollout can start it).
    assert_eq!(http_status(second.metrics_addr, "/healthz").await, 200);
    assert_eq!(http_status(second.metrics_addr, "/readyz").await, 200);

    ns.apply_ok(&binding_yaml("early", &role, &["a", "b", "c"], ""));
    wait_ready(&ns.bindings(), "early", "True", "CredentialsIssued").await;
    eventually("three Secrets", Duration::from_secs(30), || async {
        (managed_secrets(&ns).await.len() == 3).then_some(())
    })
    .await;
    assert_eq!(sts1.count("AssumeRole"), 3);
    assert_eq!(sts2.total(), 0, "the standby called STS");
    assert!(
        api_writes(&first.metrics().await) >= 4.0,
        "leader wrote 3 Secrets and status"
    );
    let standby_metrics = second.metrics().await;
    assert_eq!(api_writes(&standby_metrics), 0.0, "the standby wrote to the API");
    assert_eq!(reconciles(&standby_metrics), 0.0, "the standby reconciled");
    assert!(
        !second.logs().contains("caches synced"),
        "the standby started its controller"
    );
    assert_eq!(holder(&ns, &lease).await.as_deref(), Some(first_id.as_str()));

    let secrets_before = resource_versions(&managed_secrets(&ns).await);
    first.kill();
    let killed = Instant::now();
    // A binding created after the kill needs the new leader.
    ns.apply_ok(&binding_yaml("late", &role, &["a"], ""));
    let within = LEASE_DURATION + RETRY_PERIOD + Duration::from_secs(8);
    let second_id = wait_acquired(&second, within).await;
    assert_ne!(second_id, first_id);
    eventually(
        "the new leader issues for the late binding",
        within.saturating_sub(killed.elapsed()),
        || async {
            ready(&ns.bindings(), "late")
                .await
                .filter(|(s, r, _)| s == "True" && r == "CredentialsIssued")
        },
    )
    .await;
    let took = killed.elapsed();
    assert!(took < within, "takeover took {took:?}");
    assert_eq!(holder(&ns, &lease).await.as_deref(), Some(second_id.as_str()));
    assert_eq!(http_status(second.metrics_addr, "/readyz").await, 200);

    // Adopted: early's fresh Secrets untouched and not issued again; only late's subject is new.
    assert_eq!(sts2.count("AssumeRole"), 1);
    assert_eq!(sts1.count("AssumeRole") + sts2.count("AssumeRole"), 3 + 1);
    let after: Vec<(String, String)> = resource_versions(&managed_secrets(&ns).await)
        .into_iter()
        .filter(|(name, _)| name.starts_with("early-"))
        .collect();
    assert_eq!(after, secrets_before, "the new leader rewrote adopted Secrets");
    assert!(
        !second
            .metrics()
            .await
            .contains("kube_sts_api_writes_total{resource=\"secrets\",verb=\"apply\"}"),
        "the new leader patched Secrets"
    );
}

#[tokio::test]
async fn sigterm_releases_the_lease_and_the_standby_takes_over_at_once() {
    let ns = TestNamespace::new("handover").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let lease = unique("lease");
    let args = election_args(&ns.name, &lease);
    let (sts1, sts2) = (Forwarder::start().await, Forwarder::start().await);

    let mut first = Operator::start(&ns.name, &sts1, &args);
    let first_id = wait_acquired(&first, Duration::from_secs(30)).await;
    let second = Operator::start(&ns.name, &sts2, &args);
    eventually("second operator stands by", Duration::from_secs(30), || async {
        second.logs().contains("standing by").then_some(())
    })
    .await;
    ns.apply_ok(&binding_yaml("h", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "h", "True", "CredentialsIssued").await;

    first.stop();
    let stopped = Instant::now();
    assert!(first.logs().contains("released the leader Lease"), "{}", first.logs());
    // Without the release the standby would wait a whole lease duration (15 s) after the
    // last renewal it saw; with it, its next try (every 2 s) succeeds.
    let within = RETRY_PERIOD + Duration::from_secs(4);
    let second_id = wait_acquired(&second, within).await;
    assert!(stopped.elapsed() < LEASE_DURATION - Duration::from_secs(5));
    assert_ne!(second_id, first_id);
    assert_eq!(holder(&ns, &lease).await.as_deref(), Some(second_id.as_str()));
    // The new leader adopts the fresh Secret: no STS call, no write.
    eventually("the new leader reconciled", Duration::from_secs(30), || async {
        (reconciles(&second.metrics().await) > 0.0).then_some(())
    })
    .await;
    assert_eq!(sts2.total(), 0);
    assert_eq!(sts1.count("AssumeRole"), 1);
    assert_eq!(api_writes(&second.metrics().await), 0.0);
}

#[tokio::test]
async fn a_leader_that_loses_its_lease_exits_non_zero() {
    let ns = TestNamespace::new("lost").await;
    let lease = unique("lease");
    let sts = Forwarder::start().await;
    let mut operator = Operator::start(&ns.name, &sts, &election_args(&ns.name, &lease));
    wait_acquired(&operator, Duration::from_secs(30)).await;
    eventually("caches synced", Duration::from_secs(30), || async {
        operator.logs().contains("caches synced").then_some(())
    })
    .await;

    // Someone else writes itself into the Lease (as a leader elsewhere would).
    let api = Api::<Lease>::namespaced(ns.client.clone(), &ns.name);
    let mut taken = api.get(&lease).await.unwrap();
    let spec = taken.spec.as_mut().unwrap();
    spec.holder_identity = Some("intruder".into());
    spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        jiff::Timestamp::now(),
    ));
    api.replace(&lease, &PostParams::default(), &taken).await.unwrap();

    // The leader notices at its next renewal (every 5 s) and exits.
    let status = eventually("the operator exits", Duration::from_secs(15), || {
        let exited = operator.exited();
        async move { exited }
    })
    .await;
    assert!(!status.success(), "exit status {status:?}");
    assert!(operator.logs().contains("lost the leader Lease"), "{}", operator.logs());
    assert_eq!(holder(&ns, &lease).await.as_deref(), Some("intruder"));
}
