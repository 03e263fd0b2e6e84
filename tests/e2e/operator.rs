//! `kube-sts run` against the real control plane and the STS peer with IAM enforcement.

use std::{path::Path, process::Command, time::Duration};

use aws_config::{BehaviorVersion, profile::ProfileFileCredentialsProvider};
use aws_runtime::env_config::file::{EnvConfigFileKind as ProfileFileKind, EnvConfigFiles as ProfileFiles};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use kube_sts::crd::AWSRoleBinding;

use crate::harness::*;

async fn wait_secret(ns: &TestNamespace, name: &str) -> Secret {
    eventually(&format!("Secret {name}"), Duration::from_secs(60), || async {
        ns.secrets()
            .get_opt(name)
            .await
            .unwrap()
            .filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key("credentials.json")))
    })
    .await
}

/// Writes the Secret's keys as files, as the kubelet does for a volume mount.
fn mount(secret: &Secret, dir: &Path) {
    for (key, value) in secret.data.as_ref().unwrap() {
        std::fs::write(dir.join(key), &value.0).unwrap();
    }
}

/// GetCallerIdentity through `credential_process` with the Rust SDK (aws-config).
async fn caller_arn_rust(dir: &Path) -> String {
    let files = ProfileFiles::builder()
        .with_file(ProfileFileKind::Config, dir.join("config"))
        .build();
    let provider = ProfileFileCredentialsProvider::builder().profile_files(files).build();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(env().aws["AWS_REGION"].clone()))
        .endpoint_url(&env().aws["AWS_ENDPOINT_URL_STS"])
        .credentials_provider(provider)
        .load()
        .await;
    aws_sdk_sts::Client::new(&config)
        .get_caller_identity()
        .send()
        .await
        .expect("GetCallerIdentity")
        .arn()
        .unwrap()
        .to_string()
}

/// GetCallerIdentity through `credential_process` with boto3.
fn caller_arn_boto3(dir: &Path) -> String {
    let out = Command::new(&env().python)
        .args([
            "-c",
            "import boto3; print(boto3.client('sts').get_caller_identity()['Arn'])",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_CONFIG_FILE", dir.join("config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("does-not-exist"))
        .env("AWS_DEFAULT_REGION", &env().aws["AWS_REGION"])
        .env("AWS_ENDPOINT_URL_STS", &env().aws["AWS_ENDPOINT_URL_STS"])
        .output()
        .unwrap();
    assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn issues_credentials_that_work_through_credential_process() {
    let ns = TestNamespace::new("issue").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let operator = Operator::start(&ns.name, &sts, &[]);
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("  secret: {{mountPath: {}}}\n", dir.path().display());
    ns.apply_ok(&binding_yaml("reports", &role, &["app"], &extra));

    wait_ready(&ns.bindings(), "reports", "True", "CredentialsIssued").await;
    let secret = wait_secret(&ns, "reports-app").await;
    let keys: Vec<&String> = secret.data.as_ref().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "AWS_ACCESS_KEY_ID",
            "AWS_CREDENTIAL_EXPIRATION",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "config",
            "credentials",
            "credentials.json"
        ]
    );
    assert!(secret_value(&secret, "AWS_ACCESS_KEY_ID").starts_with("ASIA"));
    let labels = secret.labels();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "kube-sts");
    assert_eq!(labels["kube-sts.io/binding"], "reports");
    assert_eq!(labels["kube-sts.io/service-account"], "app");
    assert_eq!(secret.annotations()["kube-sts.io/role-arn"], role);
    let owner = &secret.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.controller), ("AWSRoleBinding", Some(true)));

    mount(&secret, dir.path());
    let role_name = role.rsplit('/').next().unwrap();
    let expected = format!("arn:aws:sts::{}:assumed-role/{role_name}/{}.app", account(), ns.name);
    assert_eq!(caller_arn_rust(dir.path()).await, expected);
    assert_eq!(caller_arn_boto3(dir.path()), expected);

    let b = ns.bindings().get("reports").await.unwrap();
    let st = b.status.unwrap();
    assert_eq!(st.subjects[0].arn.as_deref(), Some(expected.as_str()));
    assert_eq!(
        st.subjects[0].access_key_id.as_deref(),
        Some(secret_value(&secret, "AWS_ACCESS_KEY_ID").as_str())
    );
    assert_eq!(sts.count("AssumeRole"), 1);
    assert!(
        operator
            .metrics()
            .await
            .contains("kube_sts_sts_calls_total{operation=\"AssumeRole\",outcome=\"success\"} 1")
    );
}

#[tokio::test]
async fn refreshes_before_expiry() {
    let ns = TestNamespace::new("refresh").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    // The shortest session AWS allows, refreshed as early as allowed (L/2).
    ns.apply_ok(&binding_yaml(
        "short",
        &role,
        &["app"],
        "  durationSeconds: 900\n  refreshBeforeSeconds: 450\n",
    ));
    let first = wait_secret(&ns, "short-app").await;
    let first_key = secret_value(&first, "AWS_ACCESS_KEY_ID");
    let first_expiry: jiff::Timestamp = secret_value(&first, "AWS_CREDENTIAL_EXPIRATION").parse().unwrap();
    let planned: jiff::Timestamp = eventually("nextRefreshTime", Duration::from_secs(30), || async {
        ns.bindings()
            .get("short")
            .await
            .ok()?
            .status?
            .next_refresh_time
            .map(|t| t.0)
    })
    .await;
    assert!(
        planned < first_expiry - jiff::SignedDuration::from_secs(449),
        "refresh {planned} vs expiry {first_expiry}"
    );
    let refreshed = eventually("a refreshed Secret", Duration::from_secs(600), || async {
        let s = ns.secrets().get("short-app").await.ok()?;
        (secret_value(&s, "AWS_ACCESS_KEY_ID") != first_key).then_some(s)
    })
    .await;
    let now = jiff::Timestamp::now();
    assert!(now < first_expiry, "refreshed only after the old credentials expired");
    assert!(now >= planned, "refreshed before the planned time");
    let new_expiry: jiff::Timestamp = secret_value(&refreshed, "AWS_CREDENTIAL_EXPIRATION").parse().unwrap();
    assert!(new_expiry > first_expiry);
    assert_eq!(sts.count("AssumeRole"), 2);
}

#[tokio::test]
async fn wrong_external_id_is_access_denied_without_a_secret() {
    let ns = TestNamespace::new("extid").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, Some("the-right-id"), "");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("wrong", &role, &["app"], "  externalId: the-wrong-id\n"));
    let message = wait_ready(&ns.bindings(), "wrong", "False", "AccessDenied").await;
    assert!(message.contains("externalId"), "{message}");
    assert!(managed_secrets(&ns).await.is_empty());
    // The right ID, given through a Secret, works.
    let id_secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ext"}, "stringData": {"id": "the-right-id"}}))
    .unwrap();
    ns.secrets().create(&PostParams::default(), &id_secret).await.unwrap();
    ns.apply_ok(&binding_yaml(
        "wrong",
        &role,
        &["app"],
        "  externalIdSecretRef: {name: ext, key: id}\n",
    ));
    wait_ready(&ns.bindings(), "wrong", "True", "CredentialsIssued").await;
}

#[tokio::test]
async fn untrusted_role_is_access_denied() {
    let ns = TestNamespace::new("untrusted").await;
    ns.service_account("app").await;
    let role = create_role(
        &unique("role"),
        &format!("arn:aws:iam::{}:user/somebody", account()),
        None,
        true,
    );
    kubectl(
        &["apply", "--server-side", "-f", "-"],
        Some(&grant_yaml(&ns.name, &ns.name, &role)),
    );
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("nope", &role, &["app"], ""));
    let message = wait_ready(&ns.bindings(), "nope", "False", "AccessDenied").await;
    assert!(message.contains("trust policy"), "{message}");
    assert!(managed_secrets(&ns).await.is_empty());
    let b = ns.bindings().get("nope").await.unwrap();
    assert!(b.status.unwrap().subjects[0].consecutive_failures >= 1);
}

#[tokio::test]
async fn ungranted_namespace_is_refused_without_sts_calls() {
    let ns = TestNamespace::new("ungranted").await;
    ns.service_account("app").await;
    let role = create_role(&unique("role"), &operator_arn(), None, true);
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    let message = wait_ready(&ns.bindings(), "b", "False", "RoleNotGranted").await;
    assert!(message.contains(&format!("namespace {}", ns.name)), "{message}");
    assert_eq!(sts.total(), 0);
    assert!(managed_secrets(&ns).await.is_empty());
    // A grant for it takes effect from the watch; removing it revokes.
    let grant_name = unique("g");
    let out = kubectl(
        &["apply", "--server-side", "-f", "-"],
        Some(&grant_yaml(&grant_name, &ns.name, &role)),
    );
    assert!(out.status.success());
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    assert_eq!(sts.count("AssumeRole"), 1);
    assert!(kubectl(&["delete", "awsrolegrant", &grant_name], None).status.success());
    wait_ready(&ns.bindings(), "b", "False", "RoleNotGranted").await;
    eventually("revoked Secret deleted", Duration::from_secs(30), || async {
        managed_secrets(&ns).await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn foreign_secret_is_a_conflict_and_stays_byte_identical() {
    let ns = TestNamespace::new("conflict").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let foreign: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "mine-app", "labels": {"owner": "someone"}}, "stringData": {"token": "keep me"}}))
    .unwrap();
    let before = ns.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("mine", &role, &["app"], ""));
    let message = wait_ready(&ns.bindings(), "mine", "False", "SecretConflict").await;
    assert!(message.contains("mine-app"), "{message}");
    let after = ns.secrets().get("mine-app").await.unwrap();
    assert_eq!(after.resource_version(), before.resource_version());
    assert_eq!(after.data, before.data);
    assert_eq!(after.metadata.labels, before.metadata.labels);
    assert_eq!(sts.total(), 0);
}

#[tokio::test]
async fn deleted_or_edited_secret_is_restored_without_sts() {
    let ns = TestNamespace::new("restore").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("r", &role, &["app"], ""));
    let original = wait_secret(&ns, "r-app").await;

    let patch = serde_json::json!({"data": {"AWS_SECRET_ACCESS_KEY": ByteString(b"tampered".to_vec())}});
    ns.secrets()
        .patch("r-app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually("edited Secret restored", Duration::from_secs(30), || async {
        let s = ns.secrets().get("r-app").await.ok()?;
        (s.data == original.data).then_some(())
    })
    .await;

    ns.secrets().delete("r-app", &Default::default()).await.unwrap();
    let restored = eventually("deleted Secret restored", Duration::from_secs(30), || async {
        let s = ns.secrets().get_opt("r-app").await.ok()??;
        (s.uid() != original.uid()).then_some(s)
    })
    .await;
    assert_eq!(restored.data, original.data);
    assert_eq!(sts.count("AssumeRole"), 1);
}

#[tokio::test]
async fn removed_subject_loses_its_secret_and_deleted_binding_is_collected() {
    let ns = TestNamespace::new("subjects").await;
    ns.service_account("a").await;
    ns.service_account("b").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("two", &role, &["a", "b"], ""));
    wait_ready(&ns.bindings(), "two", "True", "CredentialsIssued").await;
    wait_secret(&ns, "two-a").await;
    wait_secret(&ns, "two-b").await;

    ns.apply_ok(&binding_yaml("two", &role, &["a"], ""));
    eventually(
        "Secret of the removed subject deleted",
        Duration::from_secs(30),
        || async { ns.secrets().get_opt("two-b").await.unwrap().is_none().then_some(()) },
    )
    .await;
    assert!(ns.secrets().get_opt("two-a").await.unwrap().is_some());

    let series = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("kube_sts_credential_seconds_until_expiry{") && l.contains("binding=\"two\""))
            .count()
    };
    assert_eq!(series(&operator.metrics().await), 1, "one subject left, one series");

    delete_binding(&ns.bindings(), "two").await;
    eventually("Secrets garbage-collected", Duration::from_secs(60), || async {
        managed_secrets(&ns).await.is_empty().then_some(())
    })
    .await;
    eventually(
        "metric series of the deleted binding gone",
        Duration::from_secs(30),
        || async { (series(&operator.metrics().await) == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn deleted_service_account_loses_its_secret() {
    let ns = TestNamespace::new("sagone").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("s", &role, &["app"], ""));
    wait_secret(&ns, "s-app").await;
    assert!(kubectl(&["delete", "sa", "app", "-n", &ns.name], None).status.success());
    wait_ready(&ns.bindings(), "s", "False", "ServiceAccountNotFound").await;
    assert!(ns.secrets().get_opt("s-app").await.unwrap().is_none());
}

#[tokio::test]
async fn restart_adopts_fresh_secrets_without_sts_calls_or_writes() {
    let ns = TestNamespace::new("restart").await;
    for sa in ["a", "b", "c"] {
        ns.service_account(sa).await;
    }
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let mut first = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("x", &role, &["a", "b", "c"], ""));
    wait_ready(&ns.bindings(), "x", "True", "CredentialsIssued").await;
    first.stop();
    let secrets_before = resource_versions(&managed_secrets(&ns).await);
    let binding_before = ns.bindings().get("x").await.unwrap().resource_version();
    let calls_before = sts.total();

    let second_sts = Forwarder::start().await;
    let second = Operator::start(&ns.name, &second_sts, &[]);
    second.wait_reconciled().await;
    assert_eq!(second_sts.total(), 0, "restart called STS");
    assert_eq!(sts.total(), calls_before);
    assert_eq!(resource_versions(&managed_secrets(&ns).await), secrets_before);
    assert_eq!(ns.bindings().get("x").await.unwrap().resource_version(), binding_before);
    assert!(
        !second.metrics().await.contains("kube_sts_api_writes_total{"),
        "restart wrote to the API"
    );
}

/// After a restart the operator still knows which Secrets are a binding's: removing the
/// grant revokes (deletes them), and so does removing a subject. (It once learnt the owners
/// from the cache, which a listing fills only at its end: after a restart it knew none.)
#[tokio::test]
async fn after_a_restart_a_revoked_grant_and_a_removed_subject_still_delete_their_secrets() {
    let ns = TestNamespace::new("revokeafter").await;
    for sa in ["a", "b"] {
        ns.service_account(sa).await;
    }
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let mut first = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("two", &role, &["a", "b"], ""));
    ns.apply_ok(&binding_yaml("one", &role, &["a"], ""));
    wait_ready(&ns.bindings(), "two", "True", "CredentialsIssued").await;
    wait_ready(&ns.bindings(), "one", "True", "CredentialsIssued").await;
    first.stop();

    let second = Operator::start(&ns.name, &sts, &[]);
    second.wait_reconciled().await;
    ns.apply_ok(&binding_yaml("two", &role, &["a"], ""));
    eventually(
        "the removed subject's Secret deleted",
        Duration::from_secs(30),
        || async { ns.secrets().get_opt("two-b").await.ok()?.is_none().then_some(()) },
    )
    .await;
    assert!(kubectl(&["delete", "awsrolegrant", &ns.name], None).status.success());
    wait_ready(&ns.bindings(), "one", "False", "RoleNotGranted").await;
    eventually("the revoked Secrets deleted", Duration::from_secs(30), || async {
        managed_secrets(&ns).await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn sts_outage_degrades_keeps_the_secret_and_recovers() {
    let ns = TestNamespace::new("outage").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("o", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "o", "True", "CredentialsIssued").await;
    let before = wait_secret(&ns, "o-app").await;

    sts.set_up(false);
    // A spec change asks for new credentials while STS is unreachable.
    ns.apply_ok(&binding_yaml("o", &role, &["app"], "  durationSeconds: 1800\n"));
    eventually("Degraded=True with STSUnavailable", Duration::from_secs(60), || async {
        let st = ns.bindings().get("o").await.ok()?.status?;
        st.conditions
            .iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "STSUnavailable")
            .map(|_| ())
    })
    .await;
    let during = ns.secrets().get("o-app").await.unwrap();
    assert_eq!(during.data, before.data);
    assert_eq!(during.resource_version(), before.resource_version());

    sts.set_up(true);
    wait_ready(&ns.bindings(), "o", "True", "CredentialsIssued").await;
    let st = ns.bindings().get("o").await.unwrap().status.unwrap();
    let degraded = st.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", "AsExpected")
    );
    assert_ne!(ns.secrets().get("o-app").await.unwrap().data, before.data);
}

/// `kubectl wait --for=condition=Ready` on a binding, as a user would run it.
fn kubectl_wait_ready(ns: &TestNamespace, name: &str) {
    let target = format!("arb/{name}");
    let out = kubectl(
        &[
            "wait",
            "-n",
            &ns.name,
            "--for=condition=Ready",
            "--timeout=60s",
            &target,
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn kubectl_wait_sees_ready_after_a_spec_change() {
    let ns = TestNamespace::new("wait").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("w", &role, &["app"], ""));
    kubectl_wait_ready(&ns, "w");
    let first = ns.secrets().get("w-app").await.unwrap();
    ns.apply_ok(&binding_yaml("w", &role, &["app"], "  durationSeconds: 2000\n"));
    let generation = ns.bindings().get("w").await.unwrap().metadata.generation.unwrap();
    kubectl_wait_ready(&ns, "w");
    let b: AWSRoleBinding = ns.bindings().get("w").await.unwrap();
    let ready = b
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.observed_generation, Some(generation));
    let second = ns.secrets().get("w-app").await.unwrap();
    assert_ne!(
        secret_value(&second, "AWS_ACCESS_KEY_ID"),
        secret_value(&first, "AWS_ACCESS_KEY_ID")
    );
}

#[tokio::test]
async fn no_secret_material_in_logs_events_or_status() {
    let ns = TestNamespace::new("leak").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("l", &role, &["app"], "  durationSeconds: 900\n"));
    wait_ready(&ns.bindings(), "l", "True", "CredentialsIssued").await;
    let first = wait_secret(&ns, "l-app").await;
    // A spec change issues a second set.
    ns.apply_ok(&binding_yaml("l", &role, &["app"], "  durationSeconds: 1000\n"));
    let second = eventually("second set", Duration::from_secs(60), || async {
        let s = ns.secrets().get("l-app").await.ok()?;
        (s.data != first.data).then_some(s)
    })
    .await;
    let secrets: Vec<String> = [&first, &second]
        .iter()
        .flat_map(|s| {
            [
                secret_value(s, "AWS_SECRET_ACCESS_KEY"),
                secret_value(s, "AWS_SESSION_TOKEN"),
            ]
        })
        .collect();
    let status = serde_json::to_string(&ns.bindings().get("l").await.unwrap().status).unwrap();
    let events = String::from_utf8(kubectl(&["get", "events", "-n", &ns.name, "-o", "json"], None).stdout).unwrap();
    assert!(events.contains("CredentialsIssued"), "events were recorded");
    let logs = operator.logs();
    assert!(logs.contains("credentials written"));
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "operator log leaks secret material");
        assert!(!events.contains(s.as_str()), "events leak secret material");
        assert!(!status.contains(s.as_str()), "status leaks secret material");
    }
}

/// The value of a counter family member in Prometheus text, 0 when absent.
fn counter(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn a_secret_write_that_keeps_failing_does_not_reissue() {
    let ns = TestNamespace::new("writefail").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    // A ResourceQuota that says the namespace has used up its Secrets: the apiserver's
    // quota admission refuses every new Secret until the quota is gone. (No quota
    // controller runs here to recount, so the usage written into status stays.)
    ns.apply_ok(
        "apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: no-secrets}\nspec: {hard: {count/secrets: '1'}}\n",
    );
    let out = kubectl(
        &[
            "-n",
            &ns.name,
            "patch",
            "resourcequota",
            "no-secrets",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"hard":{"count/secrets":"1"},"used":{"count/secrets":"1"}}}"#,
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("quota admission refuses Secrets", Duration::from_secs(30), || async {
        let probe: Secret = serde_json::from_value(serde_json::json!({"metadata": {"name": "probe"}})).unwrap();
        match ns.secrets().create(&PostParams::default(), &probe).await {
            Err(e) if e.to_string().contains("exceeded quota") => Some(()),
            Ok(_) => {
                // Admission has not seen the quota yet: try again.
                let _ = ns.secrets().delete("probe", &Default::default()).await;
                None
            }
            Err(_) => None,
        }
    })
    .await;
    let sts = Forwarder::start().await;
    let operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("w", &role, &["app"], ""));
    eventually("three failed Secret writes", Duration::from_secs(90), || async {
        (counter(&operator.metrics().await, "kube_sts_reconcile_errors_total{") >= 3).then_some(())
    })
    .await;
    assert!(
        operator.logs().contains("exceeded quota"),
        "the write failed for another reason"
    );
    assert_eq!(sts.count("AssumeRole"), 1, "a failed write asked STS again");

    let out = kubectl(&["-n", &ns.name, "delete", "resourcequota", "no-secrets"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_ready(&ns.bindings(), "w", "True", "CredentialsIssued").await;
    let secret = wait_secret(&ns, "w-app").await;
    assert_eq!(sts.count("AssumeRole"), 1, "the credentials issued first were written");
    let status = ns.bindings().get("w").await.unwrap().status.unwrap();
    assert_eq!(
        status.subjects[0].access_key_id.as_deref(),
        Some(secret_value(&secret, "AWS_ACCESS_KEY_ID").as_str())
    );
}

#[tokio::test]
async fn sigterm_before_the_caches_sync_stops_cleanly() {
    let ns = TestNamespace::new("earlystop").await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    // An identity the apiserver rejects: no watch ever succeeds, so the caches never sync.
    token_kubeconfig(&kubeconfig, "not-a-valid-token", &ns.name);
    let sts = Forwarder::start().await;
    let mut operator = Operator::start_with_kubeconfig(&ns.name, &sts, &[], &kubeconfig);
    eventually("a watch failed", Duration::from_secs(30), || async {
        operator.logs().contains("watch failed").then_some(())
    })
    .await;
    let status = operator.stop().expect("the operator was running");
    assert!(status.success(), "{status:?}\n{}", operator.logs());
    assert!(operator.logs().contains("stopped before the caches synced"));
    assert!(!operator.logs().contains(r#""message":"caches synced""#));
}
