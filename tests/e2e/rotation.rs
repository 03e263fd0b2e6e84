//! Rotation, expiry and recovery with compressed time: the test's forwarder rewrites the
//! `<Expiration>` of every STS answer to a minute or two after it passes, so the operator
//! plans real refreshes (lead `L/2` for such short sessions, see docs/API.md "Refresh
//! timing") while the STS peer keeps the sessions valid. Ten rotations fit in minutes.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use aws_config::{BehaviorVersion, profile::ProfileFileCredentialsProvider};
use aws_runtime::env_config::file::{EnvConfigFileKind as ProfileFileKind, EnvConfigFiles as ProfileFiles};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    ResourceExt,
    api::{Patch, PatchParams},
};

use crate::{harness::*, secret_log::*};

/// The session lifetime the operator sees: refreshed every ~30 s (lead L/2).
const LIFETIME: Duration = Duration::from_secs(60);
const ROTATIONS: usize = 10;
/// Generous: ten rotations take about five minutes, on a loaded machine a bit more.
const ROTATIONS_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// A forwarder whose answers carry sessions of `LIFETIME`.
async fn compressed_sts() -> Forwarder {
    let sts = Forwarder::start().await;
    sts.session_lifetime(Some(LIFETIME));
    sts
}

/// The first credentials of a subject's Secret, once it has them.
async fn wait_credentials(ns: &TestNamespace, name: &str) -> Secret {
    eventually(
        &format!("credentials in Secret {name}"),
        Duration::from_secs(60),
        || async {
            ns.secrets()
                .get_opt(name)
                .await
                .ok()?
                .filter(|s| value(s, "credentials.json").is_some())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sts_call_per_subject_per_lifetime_over_ten_rotations() {
    let ns = TestNamespace::new("rotate").await;
    let subjects = ["a", "b", "c"];
    for sa in subjects {
        ns.service_account(sa).await;
    }
    let role = granted_role(&ns, None, "");
    let sts = compressed_sts().await;
    let mut operator = Operator::start(&ns.name, &sts, &[]);
    let log = SecretLog::start(&ns);
    ns.apply_ok(&binding_yaml("rot", &role, &subjects, ""));

    eventually(
        &format!("{ROTATIONS} rotations of every subject"),
        ROTATIONS_DEADLINE,
        || async {
            subjects
                .iter()
                .all(|sa| log.keys(&format!("rot-{sa}")).len() > ROTATIONS)
                .then_some(())
        },
    )
    .await;
    // A stopped operator finishes what it was doing; then the watch catches up with it.
    operator.stop();
    for sa in subjects {
        let name = format!("rot-{sa}");
        let current = value(&ns.secrets().get(&name).await.unwrap(), "AWS_ACCESS_KEY_ID").unwrap();
        eventually(
            &format!("the watch saw {name}'s last key"),
            Duration::from_secs(30),
            || async { (log.keys(&name).last().map(|s| &s.key) == Some(&current)).then_some(()) },
        )
        .await;
    }

    let calls = sts.exchanges("AssumeRole");
    for sa in subjects {
        let name = format!("rot-{sa}");
        let session = format!("{}.{sa}", ns.name);
        let issued: Vec<String> = calls
            .iter()
            .filter(|c| c.params().get("RoleSessionName") == Some(&session))
            .map(|c| {
                c.answer_element("AccessKeyId")
                    .unwrap_or_else(|| panic!("AssumeRole for {sa} failed: {}", c.answer))
            })
            .collect();
        let seen = log.keys(&name);
        let written: Vec<String> = seen.iter().map(|s| s.key.clone()).collect();
        // Each call's key reached the Secret, in order, and no key came without a call:
        // exactly one STS call per lifetime.
        assert_eq!(
            issued, written,
            "{sa}: keys issued by STS vs keys written to its Secret"
        );
        assert_rotated_before_expiry(&name, &seen);
        assert_eq!(
            data_key_owners(&ns, &name),
            [("kube-sts".to_string(), "Apply".to_string())],
            "{name}: only the operator's apply owns data keys"
        );
    }
    assert_eq!(sts.total(), calls.len(), "only AssumeRole was called");
}

/// GetCallerIdentity every second with one long-lived Rust SDK client (aws-config's
/// `credential_process` provider and identity cache) until `stop`; the outcome of each call.
async fn rust_consumer(
    config_file: std::path::PathBuf,
    endpoint: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Result<String, String>> {
    let files = ProfileFiles::builder()
        .with_file(ProfileFileKind::Config, config_file)
        .build();
    let provider = ProfileFileCredentialsProvider::builder().profile_files(files).build();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(env().aws["AWS_REGION"].clone()))
        .endpoint_url(endpoint)
        .credentials_provider(provider)
        .load()
        .await;
    let client = aws_sdk_sts::Client::new(&config);
    let mut outcomes = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let tick = tokio::time::sleep(Duration::from_secs(1));
        let outcome = client.get_caller_identity().send().await;
        outcomes.push(
            outcome
                .map(|o| o.arn().unwrap_or_default().to_string())
                .map_err(|e| format!("{:?}", aws_sdk_sts::error::DisplayErrorContext(e))),
        );
        tick.await;
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_never_fail_nor_present_an_expired_key_over_ten_rotations() {
    let ns = TestNamespace::new("soak").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = compressed_sts().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    let extra = format!("  secret: {{mountPath: {}}}\n", volume.display());
    ns.apply_ok(&binding_yaml("soak", &role, &["app"], &extra));
    wait_credentials(&ns, "soak-app").await;
    let projection = Projection::start(&ns.name, "soak-app", &volume, Duration::from_secs(1));
    eventually("the volume holds credentials", Duration::from_secs(30), || async {
        volume.join("credentials.json").exists().then_some(())
    })
    .await;

    // Each consumer talks to STS through a forwarder of its own, which records the access
    // key that signed each call and when it arrived.
    let boto3_sts = Forwarder::start().await;
    let rust_sts = Forwarder::start().await;
    let mut boto3 = Command::new(&env().python)
        .arg(env().repo.join("e2e/sts/consumer.py"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_CONFIG_FILE", volume.join("config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("does-not-exist"))
        .env("AWS_DEFAULT_REGION", &env().aws["AWS_REGION"])
        .env("AWS_ENDPOINT_URL_STS", boto3_sts.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("consumer.py runs");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rust = tokio::spawn(rust_consumer(volume.join("config"), rust_sts.url(), stop.clone()));

    let distinct = |history: &[Projected]| {
        let mut keys: Vec<String> = history.iter().filter_map(|p| p.value("AWS_ACCESS_KEY_ID")).collect();
        keys.dedup();
        keys.len()
    };
    eventually(&format!("{ROTATIONS} rotations"), ROTATIONS_DEADLINE, || async {
        (distinct(&projection.history()) > ROTATIONS).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rust_outcomes = rust.await.unwrap();
    drop(boto3.stdin.take());
    let boto3_out = boto3.wait_with_output().unwrap();
    assert!(
        boto3_out.status.success(),
        "consumer.py: {}",
        String::from_utf8_lossy(&boto3_out.stderr)
    );

    // Zero failed calls.
    let boto3_lines: Vec<serde_json::Value> = BufReader::new(boto3_out.stdout.as_slice())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let boto3_failed: Vec<&serde_json::Value> = boto3_lines.iter().filter(|l| l["ok"] != true).collect();
    assert!(boto3_failed.is_empty(), "boto3 calls failed: {boto3_failed:?}");
    let rust_failed: Vec<&String> = rust_outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(rust_failed.is_empty(), "Rust SDK calls failed: {rust_failed:?}");

    // Never an expired key: each key a call presented was, as the Secret said while it
    // held that key, valid when the call arrived.
    let expirations: HashMap<String, Timestamp> = projection
        .history()
        .iter()
        .filter_map(|p| {
            Some((
                p.value("AWS_ACCESS_KEY_ID")?,
                expiration(&p.value("AWS_CREDENTIAL_EXPIRATION")?),
            ))
        })
        .collect();
    for (consumer, fwd, calls) in [
        ("boto3", &boto3_sts, boto3_lines.len()),
        ("Rust SDK", &rust_sts, rust_outcomes.len()),
    ] {
        let exchanges = fwd.exchanges("GetCallerIdentity");
        assert_eq!(exchanges.len(), calls, "{consumer}: one request per call, no retries");
        let mut used: Vec<String> = Vec::new();
        for call in &exchanges {
            let key = call.signing_key().expect("a signed call");
            let expires = expirations
                .get(&key)
                .unwrap_or_else(|| panic!("{consumer} presented {key}, a key the Secret never held"));
            assert!(
                call.at < *expires,
                "{consumer} presented {key} at {}, after it expired at {expires}",
                call.at
            );
            if used.last() != Some(&key) {
                used.push(key);
            }
        }
        // The consumer followed the rotations (keys in the order they were issued).
        assert!(
            used.len() >= ROTATIONS,
            "{consumer} used only {} keys over {ROTATIONS} rotations",
            used.len()
        );
    }
}

/// The `(manager, operation)` of every managedFields entry that owns a data key.
fn data_key_owners(ns: &TestNamespace, secret: &str) -> Vec<(String, String)> {
    let out = kubectl(
        &[
            "get",
            "secret",
            "-n",
            &ns.name,
            secret,
            "-o",
            "json",
            "--show-managed-fields",
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let object: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    object["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["fieldsV1"].get("f:data").is_some())
        .map(|e| {
            (
                e["manager"].as_str().unwrap_or_default().to_string(),
                e["operation"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_past_expiry_leaves_no_trace_of_the_expired_credentials_and_recovers() {
    let ns = TestNamespace::new("expire").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = compressed_sts().await;
    let operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("gone", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "gone", "True", "CredentialsIssued").await;
    let issued = wait_credentials(&ns, "gone-app").await;
    let secrets: Vec<(&str, String)> = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
        .into_iter()
        .map(|k| (k, value(&issued, k).unwrap()))
        .collect();
    let expires = expiration(&value(&issued, "AWS_CREDENTIAL_EXPIRATION").unwrap());

    sts.set_up(false);
    let emptied = eventually("the Secret marked expired", LIFETIME * 3, || async {
        ns.secrets()
            .get("gone-app")
            .await
            .ok()
            .filter(|s| s.annotations().contains_key("kube-sts.io/expired"))
    })
    .await;
    assert!(Timestamp::now() >= expires);
    for (key, v) in emptied.data.clone().unwrap_or_default() {
        let v = String::from_utf8_lossy(&v.0);
        for (what, s) in &secrets {
            assert!(!v.contains(s.as_str()), "data key {key} still holds the expired {what}");
        }
    }
    for (key, v) in emptied.annotations() {
        for (what, s) in &secrets[1..] {
            assert!(!v.contains(s.as_str()), "annotation {key} holds the expired {what}");
        }
    }
    let keys: Vec<&String> = emptied.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["AWS_CREDENTIAL_EXPIRATION"]);
    assert_eq!(
        data_key_owners(&ns, "gone-app"),
        [("kube-sts".to_string(), "Apply".to_string())],
        "only the operator's apply owns data keys"
    );
    // The binding says why, and goes on saying it while STS stays unreachable, whatever
    // wakes it (the write that emptied the Secret is one such event).
    let mut reasons: Vec<(String, String)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((status, reason, _)) = ready(&ns.bindings(), "gone").await {
            if status == "False" && reason == "CredentialsExpired" {
                break;
            }
            if reasons.last() != Some(&(status.clone(), reason.clone())) {
                reasons.push((status, reason));
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expired credentials, yet Ready was only ever {reasons:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Woken again (a metadata change of the binding), it still says so.
    operator.touch(&ns.bindings(), "gone", "1").await;
    let (status, reason, _) = ready(&ns.bindings(), "gone").await.unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "CredentialsExpired"));
    let st = ns.bindings().get("gone").await.unwrap().status.unwrap();
    assert_eq!(st.subjects[0].access_key_id, None, "status still names the expired key");

    sts.set_up(true);
    // The retry after expiry follows the backoff (full jitter, capped at five minutes).
    eventually("Ready=True after the outage", Duration::from_secs(6 * 60), || async {
        ready(&ns.bindings(), "gone")
            .await
            .filter(|(s, r, _)| s == "True" && r == "CredentialsIssued")
    })
    .await;
    let renewed = wait_credentials(&ns, "gone-app").await;
    assert_ne!(value(&renewed, "AWS_ACCESS_KEY_ID"), Some(secrets[0].1.clone()));
    assert!(expiration(&value(&renewed, "AWS_CREDENTIAL_EXPIRATION").unwrap()) > Timestamp::now());
    assert_eq!(renewed.data.as_ref().unwrap().len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restarted_past_the_refresh_time_refreshes_at_once_with_one_call() {
    let ns = TestNamespace::new("late").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    // Two minutes: the refresh is due a minute before expiry.
    let lifetime = Duration::from_secs(120);
    sts.session_lifetime(Some(lifetime));
    let mut first = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("late", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "late", "True", "CredentialsIssued").await;
    let issued = wait_credentials(&ns, "late-app").await;
    let first_key = value(&issued, "AWS_ACCESS_KEY_ID").unwrap();
    let first_expiry = expiration(&value(&issued, "AWS_CREDENTIAL_EXPIRATION").unwrap());
    let planned = eventually("nextRefreshTime", Duration::from_secs(30), || async {
        ns.bindings()
            .get("late")
            .await
            .ok()?
            .status?
            .next_refresh_time
            .map(|t| t.0)
    })
    .await;
    first.stop();
    assert_eq!(sts.count("AssumeRole"), 1);

    eventually("the refresh time passes", lifetime, || async {
        (Timestamp::now() >= planned).then_some(())
    })
    .await;
    let log = SecretLog::start(&ns);
    let second_sts = Forwarder::start().await;
    second_sts.session_lifetime(Some(lifetime));
    let mut second = Operator::start(&ns.name, &second_sts, &[]);
    // Refreshed at once, and then again a lifetime later: one call for each key written.
    eventually("two refreshes by the restarted operator", lifetime * 2, || async {
        (log.keys("late-app").len() >= 3).then_some(())
    })
    .await;
    second.stop();
    let seen = log.keys("late-app");
    assert_eq!(seen[0].key, first_key, "the watch starts at the first key");
    assert_eq!(seen[0].expiration, first_expiry);
    assert_rotated_before_expiry("late-app", &seen);
    let issued: Vec<String> = second_sts
        .exchanges("AssumeRole")
        .iter()
        .map(|c| c.answer_element("AccessKeyId").expect("AssumeRole answered"))
        .collect();
    let written: Vec<String> = seen[1..].iter().map(|s| s.key.clone()).collect();
    assert_eq!(issued, written, "keys issued after the restart vs keys written");
    assert_eq!(sts.count("AssumeRole"), 1, "the stopped operator called STS");
}

#[tokio::test]
async fn labels_and_annotations_dropped_from_the_spec_leave_the_secret() {
    let ns = TestNamespace::new("relabel").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml(
        "lbl",
        &role,
        &["app"],
        "  secret:\n    labels: {team: a, tier: gold}\n    annotations: {owner: x, drop-me: later}\n",
    ));
    let first = wait_credentials(&ns, "lbl-app").await;
    assert_eq!(first.labels().get("tier").map(String::as_str), Some("gold"));
    // Someone else labels the Secret: theirs to keep.
    let patch = serde_json::json!({"metadata": {"labels": {"added-by": "someone"}}});
    ns.secrets()
        .patch(
            "lbl-app",
            &PatchParams {
                field_manager: Some("someone-else".into()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();

    ns.apply_ok(&binding_yaml(
        "lbl",
        &role,
        &["app"],
        "  secret:\n    labels: {team: b}\n    annotations: {owner: x}\n",
    ));
    let spec_hash = |s: &Secret| s.annotations().get("kube-sts.io/spec-hash").cloned();
    // The write for the new spec and the one that drops what the create left may be two:
    // wait until both are done (a label or annotation that stays fails the deadline).
    let rewritten = eventually(
        "the Secret rewritten for the new spec, without the dropped label and annotation",
        Duration::from_secs(60),
        || async {
            let s = ns.secrets().get("lbl-app").await.ok()?;
            (spec_hash(&s) != spec_hash(&first)
                && s.labels().get("team").map(String::as_str) == Some("b")
                && !s.labels().contains_key("tier")
                && !s.annotations().contains_key("drop-me"))
            .then_some(s)
        },
    )
    .await;
    wait_ready(&ns.bindings(), "lbl", "True", "CredentialsIssued").await;
    let labels = rewritten.labels();
    assert_eq!(labels.get("added-by").map(String::as_str), Some("someone"));
    let annotations = rewritten.annotations();
    assert_eq!(annotations.get("owner").map(String::as_str), Some("x"));
    let keys: Vec<&String> = rewritten.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys.len(), 7);
}
