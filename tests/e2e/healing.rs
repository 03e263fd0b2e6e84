//! Never stuck, never a loop: problems heal by themselves once their cause is gone, and
//! failures cost what they must and no more (issue "never stuck").

use std::time::Duration;

use crate::harness::*;

fn granted_role(ns: &TestNamespace, external_id: Option<&str>, extra_grant: &str) -> String {
    let arn = create_role(&unique("role"), &operator_arn(), external_id, true);
    let yaml = format!("{}{extra_grant}", grant_yaml(&ns.name, &ns.name, &arn));
    let out = kubectl(&["apply", "--server-side", "-f", "-"], Some(&yaml));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    arn
}

#[tokio::test]
async fn a_conflicting_secret_deleted_heals_the_binding() {
    let ns = TestNamespace::new("conflictheal").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    ns.create_secret("b-app", &[("mine", "yes")]).await;
    let sts = Forwarder::start().await;
    let operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "b", "False", "SecretConflict").await;
    assert_eq!(sts.total(), 0);
    // Nothing touches the binding: the operator looks again by itself.
    ns.secrets().delete("b-app", &Default::default()).await.unwrap();
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    assert_eq!(sts.count("AssumeRole"), 1);
    // Monitoring sees the expiry as a timestamp (alerts compute time() - it).
    let st = ns.bindings().get("b").await.unwrap().status.unwrap();
    let expiration = st.subjects[0].expiration.as_ref().unwrap().0.as_second();
    let series = format!(
        "kube_sts_credential_expiration_timestamp_seconds{{namespace=\"{}\",binding=\"b\",service_account=\"app\"}} {expiration}",
        ns.name
    );
    let metrics = operator.metrics().await;
    assert!(metrics.contains(&series), "{series} not in\n{metrics}");
}

#[tokio::test]
async fn a_referenced_secret_created_later_heals_the_binding() {
    let ns = TestNamespace::new("refheal").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, Some("the-id"), "");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml(
        "b",
        &role,
        &["app"],
        "  externalIdSecretRef: {name: ext, key: id}\n",
    ));
    let message = wait_ready(&ns.bindings(), "b", "False", "InvalidSpec").await;
    assert!(message.contains("Secret ext not found"), "{message}");
    assert_eq!(sts.total(), 0);
    ns.create_secret("ext", &[("id", "the-id")]).await;
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    assert_eq!(sts.count("AssumeRole"), 1);
}

#[tokio::test]
async fn a_secret_the_apiserver_refuses_is_invalid_spec() {
    let ns = TestNamespace::new("badlabels").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml(
        "b",
        &role,
        &["app"],
        "  secret: {labels: {'not a label!': x}}\n",
    ));
    let message = wait_ready(&ns.bindings(), "b", "False", "InvalidSpec").await;
    assert!(message.contains("the apiserver refuses Secret b-app"), "{message}");
    // The credentials were issued once and are kept for the fixed spec's write... which is a
    // new spec: fixing the labels issues again, once.
    assert_eq!(sts.count("AssumeRole"), 1);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], "  secret: {labels: {team: x}}\n"));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    assert_eq!(sts.count("AssumeRole"), 2);
}

#[tokio::test]
async fn a_restarted_operator_resumes_the_recorded_backoff() {
    let ns = TestNamespace::new("resume").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    sts.fail_with(Some((
        "AccessDenied",
        "User is not authorized to perform: sts:AssumeRole",
    )));
    let mut operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    // Wait until the recorded retry is well ahead (the backoff grows with each failure).
    let retry_at = eventually("a retry planned 20 s ahead", Duration::from_secs(240), || async {
        let st = ns.bindings().get("b").await.ok()?.status?;
        let subject = st.subjects.first()?;
        let at = subject.next_refresh_time.as_ref()?.0;
        (subject.consecutive_failures >= 2 && at > jiff::Timestamp::now() + jiff::SignedDuration::from_secs(20))
            .then_some((at, subject.consecutive_failures))
    })
    .await;
    operator.stop();
    let calls = sts.count("AssumeRole");
    let operator = Operator::start(&ns.name, &sts, &[]);
    operator.wait_reconciled().await;
    // The new process waits for the retry the old one planned, keeps the count, and does
    // not ask STS in between.
    let st = ns.bindings().get("b").await.unwrap().status.unwrap();
    assert_eq!(st.subjects[0].next_refresh_time.as_ref().map(|t| t.0), Some(retry_at.0));
    assert_eq!(st.subjects[0].consecutive_failures, retry_at.1);
    assert!(
        jiff::Timestamp::now() < retry_at.0,
        "the restart took past the planned retry"
    );
    assert_eq!(sts.count("AssumeRole"), calls);
}

#[tokio::test]
async fn every_sts_attempt_passes_the_rate_limit_and_is_counted() {
    let ns = TestNamespace::new("attempts").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    sts.fail_with(Some(("Throttling", "Rate exceeded")));
    let operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "b", "False", "Throttled").await;
    let (wire, failures) = eventually("two failures recorded", Duration::from_secs(120), || async {
        let wire = sts.count("AssumeRole");
        let failures = ns
            .bindings()
            .get("b")
            .await
            .ok()?
            .status?
            .subjects
            .first()?
            .consecutive_failures;
        (failures >= 2).then_some((wire, failures))
    })
    .await;
    // One request per failure (one more may be on its way): no SDK retries behind the
    // operator's back.
    assert!(wire <= failures as usize + 1, "{wire} requests for {failures} failures");
    let metrics = operator.metrics().await;
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("kube_sts_sts_calls_total{") && l.contains("AssumeRole"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        counted >= f64::from(failures),
        "metrics counted {counted} calls for {failures} failures"
    );
}

#[tokio::test]
async fn fifty_mfa_subjects_do_not_hold_up_another_binding() {
    let ns = TestNamespace::new("mfawait").await;
    let subjects: Vec<String> = (0..50).map(|i| format!("mfa{i}")).collect();
    for s in &subjects {
        ns.service_account(s).await;
    }
    ns.service_account("app").await;
    let role = create_role(&unique("role"), &operator_arn(), None, true);
    let grant = format!(
        "apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleGrant\nmetadata: {{name: {}}}\nspec:\n  namespaces: [{}]\n  roleArns: [\"{role}\"]\n  methods: [AssumeRole, GetSessionToken]\n",
        ns.name, ns.name
    );
    assert!(
        kubectl(&["apply", "--server-side", "-f", "-"], Some(&grant))
            .status
            .success()
    );
    ns.team_keys("keys", &["sts:GetSessionToken"]).await;
    ns.create_secret("mfa", &[("seed", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")])
        .await;
    let sts = Forwarder::start().await;
    // One worker: a reconcile that waited for TOTP steps inside would hold it for 25 min.
    let _operator = Operator::start(&ns.name, &sts, &["--concurrency", "1"]);
    let list: Vec<String> = subjects.iter().map(|s| format!("{{name: {s}}}")).collect();
    let serial = format!("arn:aws:iam::{}:mfa/ops", account());
    ns.apply_ok(&format!(
        "apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleBinding\nmetadata: {{name: mfa}}\nspec:\n  method: GetSessionToken\n  subjects: [{}]\n  sourceCredentialsSecretRef: {{name: keys}}\n  mfa: {{serialNumber: {serial}, totpSecretRef: {{name: mfa, key: seed}}}}\n",
        list.join(", ")
    ));
    eventually("the first MFA subject issued", Duration::from_secs(60), || async {
        (sts.count("GetSessionToken") >= 1).then_some(())
    })
    .await;
    ns.apply_ok(&binding_yaml("plain", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "plain", "True", "CredentialsIssued").await;
    // Meanwhile the MFA subjects go on, one TOTP step each, never a code twice.
    let codes: Vec<String> = sts
        .requests("GetSessionToken")
        .into_iter()
        .map(|p| p["TokenCode"].clone())
        .collect();
    let mut unique_codes = codes.clone();
    unique_codes.sort();
    unique_codes.dedup();
    assert_eq!(unique_codes.len(), codes.len(), "a TOTP code was sent twice: {codes:?}");
}

#[tokio::test]
async fn a_role_session_operator_falls_back_to_an_hour() {
    let ns = TestNamespace::new("chained").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    // What AWS answers when the caller is itself a role session (IRSA, Pod Identity).
    sts.fail_requests_containing(
        "DurationSeconds=7200",
        "ValidationError",
        "The requested DurationSeconds exceeds the 1 hour session limit for roles assumed by role chaining.",
    );
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], "  durationSeconds: 7200\n"));
    let message = wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    assert!(message.contains("role chaining"), "{message}");
    let durations: Vec<String> = sts
        .requests("AssumeRole")
        .into_iter()
        .map(|p| p["DurationSeconds"].clone())
        .collect();
    assert_eq!(durations, ["7200", "3600"]);
}

#[tokio::test]
async fn a_clock_hours_ahead_does_not_loop_or_expire_credentials() {
    let ns = TestNamespace::new("skew").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    // Two hours ahead: more than the 15-minute lifetime, so by the local clock every
    // credential would be expired the moment it is issued.
    let operator = Operator::start_with_clock_offset(&ns.name, &sts, &[], "+2h");
    ns.apply_ok(&binding_yaml("b", &role, &["app"], "  durationSeconds: 900\n"));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    let st = ns.bindings().get("b").await.unwrap().status.unwrap();
    let issued = st.subjects[0].issued_at.as_ref().unwrap().0;
    let true_now = jiff::Timestamp::now();
    assert!(
        issued <= true_now,
        "issue time {issued} follows the local clock, not STS's"
    );
    // Whatever wakes the binding, it is not issued again, and its Secret keeps the keys.
    for touch in 0..3 {
        operator.touch(&ns.bindings(), "b", &touch.to_string()).await;
    }
    assert_eq!(sts.count("AssumeRole"), 1);
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    let secret = ns.secrets().get("b-app").await.unwrap();
    assert!(secret.data.unwrap().contains_key("AWS_SECRET_ACCESS_KEY"));
}
