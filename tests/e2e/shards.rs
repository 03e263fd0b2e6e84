//! `--shards`: three operator processes share four shards of namespaces through Leases,
//! each behind its own STS forwarder (sessions compressed to a minute). Every binding is
//! issued once; a replica killed with SIGKILL has its shards taken over and their bindings
//! refreshed by the others; restarted, it gets shards back. Throughout, each shard is held by
//! one process at a time and every reconcile of a binding ran in the process holding its
//! shard; no subject is issued twice within one refresh period; every Secret shows each
//! issued key once, in order.

use std::{collections::BTreeMap, process::Command, time::Duration};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, api::ListParams};
use kube_sts::shards::shard_of;
use serde_json::{Value, json};

use crate::{
    harness::*,
    secret_log::{SecretLog, Seen},
};

const SHARDS: u32 = 4;
const LIFETIME: Duration = Duration::from_secs(60);
/// Generous deadlines: a lapsed Lease is taken over after its 15 s duration, and each step
/// waits on a loaded machine.
const SETTLE: Duration = Duration::from_secs(90);

struct Replica {
    operator: Operator,
    sts: Forwarder,
}

fn args<'a>(lease_ns: &'a str, lease: &'a str, prefix: &'a str) -> [&'a str; 8] {
    [
        "--shards",
        "4",
        "--lease-namespace",
        lease_ns,
        "--lease-name",
        lease,
        "--namespace-prefix",
        prefix,
    ]
}

async fn start(args: &[&str]) -> Replica {
    let sts = Forwarder::start().await;
    sts.session_lifetime(Some(LIFETIME));
    Replica {
        operator: Operator::start_cluster_wide(&sts, args, &env().kubeconfig),
        sts,
    }
}

/// One JSON log line of an operator.
struct Line {
    at: Timestamp,
    message: String,
    fields: serde_json::Value,
}

fn lines(operator: &Operator) -> Vec<Line> {
    operator
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            Some(Line {
                at: v["timestamp"].as_str()?.parse().ok()?,
                message: v["message"].as_str()?.to_string(),
                fields: v,
            })
        })
        .collect()
}

/// The identity the operator joined the shard group as.
fn identity(operator: &Operator) -> Option<String> {
    lines(operator)
        .into_iter()
        .find(|l| l.message == "joining the shard group")
        .and_then(|l| l.fields["identity"].as_str().map(str::to_string))
}

/// Holder of each shard Lease (`None`: missing or free).
async fn holders(api: &Api<Lease>, lease: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for i in 0..SHARDS {
        let holder = api
            .get_opt(&format!("{lease}-shard-{i}"))
            .await
            .unwrap()
            .and_then(|l| l.spec?.holder_identity)
            .filter(|h| !h.is_empty());
        out.push(holder);
    }
    out
}

/// Every shard held by one of `ids`, none more than its fair share, each of `ids` at least one.
fn balanced(holders: &[Option<String>], ids: &[String]) -> bool {
    let fair = (SHARDS as usize).div_ceil(ids.len());
    holders.iter().all(|h| h.as_ref().is_some_and(|h| ids.contains(h)))
        && ids.iter().all(|id| {
            let n = holders.iter().filter(|h| h.as_deref() == Some(id.as_str())).count();
            (1..=fair).contains(&n)
        })
}

/// AssumeRole calls for the subject of namespace `ns` (its session tags name it), by time.
fn assume_roles(replicas: &[&Forwarder], ns: &str) -> Vec<(Timestamp, String)> {
    let mut calls: Vec<(Timestamp, String)> = replicas
        .iter()
        .flat_map(|sts| sts.exchanges("AssumeRole"))
        .filter(|e| e.params().values().any(|v| v == ns))
        .map(|e| (e.at, e.answer_element("AccessKeyId").unwrap_or_default()))
        .collect();
    calls.sort();
    calls
}

/// Per shard, the spans (process, from, to) in which a process held it, from its log lines
/// (`end` for a process still running or killed at `end`).
fn holdings(logs: &[(usize, Vec<Line>, Timestamp)]) -> BTreeMap<u32, Vec<(usize, Timestamp, Timestamp)>> {
    let mut spans: BTreeMap<u32, Vec<(usize, Timestamp, Timestamp)>> = BTreeMap::new();
    for (process, lines, end) in logs {
        let mut open: BTreeMap<u32, Timestamp> = BTreeMap::new();
        for line in lines {
            let Some(shard) = line.fields["shard"].as_u64().map(|s| s as u32) else {
                continue;
            };
            match line.message.as_str() {
                "acquired shard" => {
                    open.insert(shard, line.at);
                }
                // A holder stops reconciling at its renewal deadline (before the Lease can
                // lapse) and notices a takeover only later: the earlier line ends its span.
                "released shard"
                | "lost shard; stopped reconciling it"
                | "shard Lease not renewed in time; cancelling its reconciles" => {
                    if let Some(from) = open.remove(&shard) {
                        spans.entry(shard).or_default().push((*process, from, line.at));
                    }
                }
                _ => {}
            }
        }
        for (shard, from) in open {
            spans.entry(shard).or_default().push((*process, from, *end));
        }
    }
    spans
}

#[tokio::test]
async fn shards_are_spread_taken_over_after_a_kill_and_given_back() {
    let prefix = format!("{}-", unique("shd"));
    // One namespace per shard.
    let mut namespaces = Vec::new();
    for shard in 0..SHARDS {
        let name = (0..)
            .map(|k| format!("{prefix}{k}"))
            .find(|n| shard_of(n, SHARDS) == shard)
            .unwrap();
        let ns = TestNamespace::named(&name).await;
        ns.service_account("app").await;
        namespaces.push(ns);
    }
    let leases_ns = TestNamespace::new("shd-leases").await;
    let lease = unique("shd");
    let leases = Api::<Lease>::namespaced(leases_ns.client.clone(), &leases_ns.name);
    let role = create_role(&unique("role"), &operator_arn(), None, true);
    let names: Vec<&str> = namespaces.iter().map(|ns| ns.name.as_str()).collect();
    let grant = format!(
        "apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleGrant\nmetadata: {{name: {prefix}grant}}\nspec:\n  namespaces: [{}]\n  roleArns: [\"{role}\"]\n",
        names.join(", ")
    );
    let out = kubectl(&["apply", "--server-side", "-f", "-"], Some(&grant));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let secret_logs: Vec<SecretLog> = namespaces.iter().map(SecretLog::start).collect();
    for ns in &namespaces {
        ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    }

    let args = args(&leases_ns.name, &lease, &prefix);
    let mut replicas = vec![start(&args).await, start(&args).await, start(&args).await];
    let mut ids = Vec::new();
    for r in &replicas {
        ids.push(
            eventually("the replica joined the shard group", SETTLE, || async {
                identity(&r.operator)
            })
            .await,
        );
    }
    eventually("every shard held, spread over the three replicas", SETTLE, || async {
        balanced(&holders(&leases, &lease).await, &ids).then_some(())
    })
    .await;
    for ns in &namespaces {
        wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    }
    let forwarders = |replicas: &[Replica]| -> Vec<Forwarder> { replicas.iter().map(|r| r.sts.clone()).collect() };
    for ns in &namespaces {
        let all = forwarders(&replicas);
        let calls = assume_roles(&all.iter().collect::<Vec<_>>(), &ns.name);
        assert!(!calls.is_empty(), "{}: not issued", ns.name);
    }
    for (r, id) in replicas.iter().zip(&ids) {
        let held = holders(&leases, &lease)
            .await
            .iter()
            .filter(|h| h.as_deref() == Some(id.as_str()))
            .count();
        eventually("kube_sts_shards_held shows the Leases held", SETTLE, || async {
            (metric_sum(&r.operator.metrics().await, "kube_sts_shards_held") == held as f64).then_some(())
        })
        .await;
    }

    // SIGKILL the replica holding the most shards: no release, its Leases lapse.
    let before = holders(&leases, &lease).await;
    let victim = (0..3)
        .max_by_key(|i| before.iter().filter(|h| h.as_deref() == Some(ids[*i].as_str())).count())
        .unwrap();
    let orphaned: Vec<u32> = (0..SHARDS)
        .filter(|s| before[*s as usize].as_deref() == Some(ids[victim].as_str()))
        .collect();
    replicas[victim].operator.kill();
    let killed = Timestamp::now();
    let survivors: Vec<String> = (0..3).filter(|i| *i != victim).map(|i| ids[i].clone()).collect();
    eventually(
        "the killed replica's shards taken over by the two others",
        SETTLE,
        || async { balanced(&holders(&leases, &lease).await, &survivors).then_some(()) },
    )
    .await;
    // Their bindings are refreshed by the new holders, and stay Ready.
    let survivor_sts: Vec<Forwarder> = (0..3)
        .filter(|i| *i != victim)
        .map(|i| replicas[i].sts.clone())
        .collect();
    for shard in &orphaned {
        let ns = &namespaces[*shard as usize];
        eventually(
            &format!("{} refreshed by the new holder of shard {shard}", ns.name),
            LIFETIME * 3,
            || async {
                assume_roles(&survivor_sts.iter().collect::<Vec<_>>(), &ns.name)
                    .iter()
                    .any(|(at, _)| *at > killed)
                    .then_some(())
            },
        )
        .await;
        wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    }

    // The killed replica comes back (a new process, a new identity): shards spread again.
    let dead = std::mem::replace(&mut replicas[victim], start(&args).await);
    let returned = eventually("the restarted replica joined", SETTLE, || async {
        identity(&replicas[victim].operator)
    })
    .await;
    let mut live = survivors.clone();
    live.push(returned.clone());
    eventually("shards spread over the three replicas again", SETTLE, || async {
        balanced(&holders(&leases, &lease).await, &live).then_some(())
    })
    .await;
    let now_held = holders(&leases, &lease).await;
    let given_back: Vec<u32> = (0..SHARDS)
        .filter(|s| now_held[*s as usize].as_deref() == Some(returned.as_str()))
        .collect();
    // It reconciles (and, when due, refreshes) the bindings of the shards it got back.
    for shard in &given_back {
        let ns = &namespaces[*shard as usize];
        eventually(
            &format!("{} refreshed by the restarted replica", ns.name),
            LIFETIME * 3,
            || async { (!assume_roles(&[&replicas[victim].sts], &ns.name).is_empty()).then_some(()) },
        )
        .await;
    }
    // Each replica caches the bindings of its own shards only (one namespace per shard,
    // one binding each).
    let final_holders = holders(&leases, &lease).await;
    for r in &replicas {
        let me = identity(&r.operator).unwrap();
        let held = final_holders
            .iter()
            .filter(|h| h.as_deref() == Some(me.as_str()))
            .count() as u64;
        eventually("the caches hold the shards held", SETTLE, || async {
            lines(&r.operator)
                .iter()
                .rev()
                .find(|l| l.message == "the caches hold the objects of the shards held, and no others")
                .and_then(|l| l.fields["bindings"].as_u64())
                .filter(|n| *n == held)
        })
        .await;
    }
    // One holder per shard at any time, and every reconcile inside its process's holding.
    // A live replica's shards count as held until the moment right after its log was read
    // (every line read was written before it; one taken for all would let a shard handed
    // from a replica read earlier to one read later look held by both).
    let mut logs = vec![(3, lines(&dead.operator), killed)];
    for (i, r) in replicas.iter().enumerate() {
        let lines = lines(&r.operator);
        logs.push((i, lines, Timestamp::now()));
    }
    let spans = holdings(&logs);
    assert_eq!(spans.len(), SHARDS as usize, "{spans:?}");
    for (shard, spans) in &spans {
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                assert!(
                    a.0 == b.0 || a.2 <= b.1 || b.2 <= a.1,
                    "shard {shard} held by two processes at once: {a:?} and {b:?}"
                );
            }
        }
    }
    for (process, lines, _) in &logs {
        for line in lines.iter().filter(|l| l.message == "reconciling") {
            let ns = line.fields["namespace"].as_str().unwrap_or_default();
            if !ns.starts_with(&prefix) {
                continue;
            }
            let shard = shard_of(ns, SHARDS);
            assert!(
                spans[&shard]
                    .iter()
                    .any(|(p, from, to)| p == process && *from <= line.at && line.at <= *to),
                "process {process} reconciled {ns} at {} without holding shard {shard}: {:?}",
                line.at,
                spans[&shard]
            );
        }
    }

    // No subject issued twice within one refresh period (due at the earliest 45 % of the
    // lifetime after an issue: half the lifetime ahead, minus a jitter of a twentieth), and
    // every key issued reached its Secret once, in issue order.
    let mut all = forwarders(&replicas);
    all.push(dead.sts.clone());
    let all: Vec<&Forwarder> = all.iter().collect();
    for (ns, log) in namespaces.iter().zip(&secret_logs) {
        let calls = assume_roles(&all, &ns.name);
        for pair in calls.windows(2) {
            let gap = pair[1].0.duration_since(pair[0].0);
            assert!(
                gap >= jiff::SignedDuration::try_from(LIFETIME.mul_f64(0.4)).unwrap(),
                "{}: AssumeRole at {} and again at {}",
                ns.name,
                pair[0].0,
                pair[1].0
            );
        }
        let seen: Vec<String> = log.keys("b-app").into_iter().map(|s: Seen| s.key).collect();
        let issued: Vec<String> = calls.into_iter().map(|(_, key)| key).collect();
        let distinct: std::collections::HashSet<&String> = seen.iter().collect();
        assert_eq!(distinct.len(), seen.len(), "{}: a key came back: {seen:?}", ns.name);
        let order: Vec<usize> = seen
            .iter()
            .map(|k| {
                issued
                    .iter()
                    .position(|i| i == k)
                    .unwrap_or_else(|| panic!("{}: key {k} was never issued", ns.name))
            })
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{}: keys out of order: {order:?}",
            ns.name
        );
    }
}

/// The chart rendered for `release` in its namespace with `sharding.shards=2` (no webhook):
/// its ServiceAccount and RBAC.
fn chart_rbac(release: &str) -> Vec<Value> {
    let out = Command::new(helm())
        .args(["template", release])
        .arg(env().repo.join("charts/kube-sts"))
        .args(["--namespace", release, "--kube-version", "1.34.0"])
        .args(["--set", "sharding.shards=2", "--set", "webhook.enabled=false"])
        .output()
        .expect("helm runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
    docs.into_iter()
        .filter(|d| {
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .contains(&d["kind"].as_str().unwrap_or_default())
        })
        .collect()
}

#[tokio::test]
async fn the_charts_rbac_is_enough_for_a_sharded_replica() {
    // The release's namespace holds the Leases; its name makes the chart's full name.
    let release_ns = TestNamespace::new("kube-sts-shd").await;
    let release = release_ns.name.clone();
    let prefix = format!("{}-", unique("shdr"));
    let ns = TestNamespace::named(&format!("{prefix}0")).await;
    ns.service_account("app").await;
    let role = create_role(&unique("role"), &operator_arn(), None, true);
    let out = kubectl(
        &["apply", "--server-side", "-f", "-"],
        Some(&grant_yaml(&ns.name, &ns.name, &role)),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let docs = {
        let release = release.clone();
        tokio::task::spawn_blocking(move || chart_rbac(&release)).await.unwrap()
    };
    let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
    let out = kubectl(&["apply", "-f", "-"], Some(&list.to_string()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sa = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .and_then(|d| d["metadata"]["name"].as_str())
        .unwrap()
        .to_string();
    let token = kubectl(&["create", "token", &sa, "-n", &release, "--duration=3600s"], None);
    assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    token_kubeconfig(&kubeconfig, String::from_utf8_lossy(&token.stdout).trim(), &release);

    let sts = Forwarder::start().await;
    let mut operator = Operator::start_cluster_wide(
        &sts,
        &[
            "--shards",
            "2",
            "--lease-namespace",
            &release,
            "--namespace-prefix",
            &prefix,
        ],
        &kubeconfig,
    );
    ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    eventually("both shards held", SETTLE, || async {
        (metric_sum(&operator.metrics().await, "kube_sts_shards_held") == 2.0).then_some(())
    })
    .await;
    let leases = Api::<Lease>::namespaced(release_ns.client.clone(), &release);
    let group = ListParams::default().labels("kube-sts.io/lease-group=kube-sts");
    assert_eq!(
        leases.list(&group).await.unwrap().items.len(),
        3,
        "two shards, one member"
    );

    // SIGTERM: both shards released, the membership Lease deleted.
    let status = operator.stop().unwrap();
    assert!(status.success(), "{status:?}");
    let logs = operator.logs();
    assert!(!logs.contains("forbidden"), "{logs}");
    let left = leases.list(&group).await.unwrap().items;
    assert_eq!(left.len(), 2, "the membership Lease is deleted");
    assert!(
        left.iter()
            .all(|l| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).is_none()),
        "released: {left:?}"
    );

    let out = kubectl(
        &[
            "delete",
            "clusterrole,clusterrolebinding",
            &release,
            "--ignore-not-found",
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn no_shard_is_taken_while_a_replica_with_another_shard_count_lives() {
    // The same Lease names cover other namespaces under another N: a rollout changing
    // --shards must not let the two counts reconcile side by side.
    let leases_ns = TestNamespace::new("shd-count").await;
    let lease = unique("shd");
    let leases = Api::<Lease>::namespaced(leases_ns.client.clone(), &leases_ns.name);
    // No namespace has this prefix: the Leases are all there is to see.
    let prefix = format!("{}-", unique("shdc"));
    let with = |shards: &'static str| {
        [
            "--shards",
            shards,
            "--lease-namespace",
            leases_ns.name.as_str(),
            "--lease-name",
            lease.as_str(),
            "--namespace-prefix",
            prefix.as_str(),
        ]
    };
    let (sts_old, sts_new) = (Forwarder::start().await, Forwarder::start().await);
    let mut old = Operator::start_cluster_wide(&sts_old, &with("2"), &env().kubeconfig);
    let old_id = eventually("the first replica joined", SETTLE, || async { identity(&old) }).await;
    eventually("both of its shards held", SETTLE, || async {
        let held = holders(&leases, &lease).await;
        (held[..2].iter().all(|h| h.as_deref() == Some(old_id.as_str()))).then_some(())
    })
    .await;

    let new = Operator::start_cluster_wide(&sts_new, &with("3"), &env().kubeconfig);
    let new_id = eventually("the second replica joined", SETTLE, || async { identity(&new) }).await;
    eventually("the second replica sees the other count", SETTLE, || async {
        new.logs()
            .contains("replicas with another --shards are live")
            .then_some(())
    })
    .await;
    eventually("the first replica sees it too", SETTLE, || async {
        old.logs()
            .contains("replicas with another --shards are live")
            .then_some(())
    })
    .await;
    let held = holders(&leases, &lease).await;
    assert!(
        held[..2].iter().all(|h| h.as_deref() == Some(old_id.as_str())),
        "{held:?}"
    );
    assert_eq!(held[2], None, "{held:?}");
    assert_eq!(metric_sum(&new.metrics().await, "kube_sts_shards_held"), 0.0);

    // Once the other count is gone, every shard of the new count is taken.
    assert!(old.stop().unwrap().success());
    eventually("the second replica holds its three shards", SETTLE, || async {
        let held = holders(&leases, &lease).await;
        (held[..3].iter().all(|h| h.as_deref() == Some(new_id.as_str()))).then_some(())
    })
    .await;
}
