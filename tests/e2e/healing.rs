//! Never stuck, never a loop: problems heal by themselves once their cause is gone, and
//! failures cost what they must and no more (issue "never stuck").

use std::time::Duration;

use kube::{
    ResourceExt,
    api::{Patch, PatchParams},
};

use crate::harness::*;

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
async fn a_managed_secret_stripped_of_its_labels_gets_them_back_with_the_same_credentials() {
    let ns = TestNamespace::new("relabel").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    let issued = ns.secrets().get("b-app").await.unwrap();
    // Out of the operator's labelled watch, into the watch of other Secrets' names: it is
    // still the binding's own Secret (its controller), so it is written back, not a conflict.
    let strip = serde_json::json!({"metadata": {"labels": null}});
    ns.secrets()
        .patch("b-app", &PatchParams::default(), &Patch::Merge(&strip))
        .await
        .unwrap();
    let restored = eventually("labels restored", Duration::from_secs(30), || async {
        let s = ns.secrets().get("b-app").await.ok()?;
        let labels = s.metadata.labels.clone().unwrap_or_default();
        (labels.get("app.kubernetes.io/managed-by").map(String::as_str) == Some("kube-sts")).then_some(s)
    })
    .await;
    assert_eq!(restored.uid(), issued.uid());
    assert_eq!(restored.data, issued.data);
    assert_eq!(sts.count("AssumeRole"), 1);
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
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
    sts.session_lifetime(Some(Duration::from_secs(60)));
    let operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], "  secret: {labels: {team: x}}\n"));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    let key = secret_value(&ns.secrets().get("b-app").await.unwrap(), "AWS_ACCESS_KEY_ID");
    ns.apply_ok(&binding_yaml(
        "b",
        &role,
        &["app"],
        "  secret: {labels: {'not a label!': x}}\n",
    ));
    let message = wait_ready(&ns.bindings(), "b", "False", "InvalidSpec").await;
    assert!(message.contains("the apiserver refuses Secret b-app"), "{message}");
    // The new spec was asked once; its Secret is refused, so it is not asked again, and the
    // credentials of the last good spec stay until they expire, then go.
    assert_eq!(sts.count("AssumeRole"), 2);
    let secret = expired_and_emptied(&ns, "b-app", &key).await;
    let labels = secret.metadata.labels.unwrap();
    assert_eq!(
        labels.get("kube-sts.io/binding").map(String::as_str),
        Some("b"),
        "{labels:?}"
    );
    operator.touch(&ns.bindings(), "b", "1").await;
    assert_eq!(sts.count("AssumeRole"), 2);
    wait_ready(&ns.bindings(), "b", "False", "CredentialsExpired").await;
    // A fixed spec is a new one: issued once.
    ns.apply_ok(&binding_yaml(
        "b",
        &role,
        &["app"],
        "  secret: {labels: {team: fixed}}\n",
    ));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    assert_eq!(sts.count("AssumeRole"), 3);
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

/// A ValidatingAdmissionPolicy that refuses `operations` on `resource` in the test's
/// namespace only: a Kubernetes request the operator needs fails, for real, until lifted.
struct Refusal {
    name: String,
}

impl Refusal {
    /// In force once `probe` (a kubectl command doing such a request) is refused.
    async fn start(ns: &TestNamespace, resource: &str, operations: &str, probe: &[&str]) -> Refusal {
        let name = unique("refuse");
        let yaml = format!(
            "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicy\nmetadata: {{name: {name}}}\nspec:\n  failurePolicy: Fail\n  matchConstraints:\n    resourceRules:\n    - {{apiGroups: [\"\"], apiVersions: [v1], operations: {operations}, resources: [\"{resource}\"]}}\n  validations:\n  - {{expression: \"false\", message: \"refused by policy {name}\", reason: Forbidden}}\n---\napiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicyBinding\nmetadata: {{name: {name}}}\nspec:\n  policyName: {name}\n  validationActions: [Deny]\n  matchResources:\n    namespaceSelector:\n      matchLabels: {{kubernetes.io/metadata.name: {}}}\n",
            ns.name
        );
        let out = kubectl(&["apply", "--server-side", "-f", "-"], Some(&yaml));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut args = vec!["-n", ns.name.as_str()];
        args.extend_from_slice(probe);
        eventually("the policy in force", Duration::from_secs(60), || {
            let out = kubectl(&args, None);
            let refused = !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(&name);
            async move { refused.then_some(()) }
        })
        .await;
        Refusal { name }
    }

    fn lift(&self) {
        for kind in ["validatingadmissionpolicybinding", "validatingadmissionpolicy"] {
            kubectl(&["delete", kind, &self.name, "--ignore-not-found"], None);
        }
    }
}

impl Drop for Refusal {
    fn drop(&mut self) {
        self.lift();
    }
}

#[tokio::test]
async fn a_refused_kubernetes_request_is_reported_backed_off_and_healed() {
    let ns = TestNamespace::new("kubeerr").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let refusal = Refusal::start(
        &ns,
        "secrets",
        "[CREATE, UPDATE]",
        &["create", "secret", "generic", "probe"],
    )
    .await;
    let sts = Forwarder::start().await;
    let operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    // The status says what fails; the credentials STS gave are kept for the retries.
    let message = wait_ready(&ns.bindings(), "b", "False", "KubernetesError").await;
    assert!(message.contains(&refusal.name), "{message}");
    eventually("retries", Duration::from_secs(60), || async {
        (metric_sum(&operator.metrics().await, "kube_sts_reconcile_errors_total") >= 2.0).then_some(())
    })
    .await;
    assert_eq!(sts.count("AssumeRole"), 1, "a retry asked STS again");
    // Nothing touches the binding: once the refusal is lifted, the backoff's retry heals it,
    // writing the credentials issued before.
    refusal.lift();
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    assert_eq!(sts.count("AssumeRole"), 1);
    let st = ns.bindings().get("b").await.unwrap().status.unwrap();
    let degraded = st.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(degraded.status, "False", "{degraded:?}");
}

#[tokio::test]
async fn a_failed_token_request_has_its_own_reason() {
    let ns = TestNamespace::new("tokenfail").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "  methods: [AssumeRoleWithWebIdentity]\n");
    let refusal = Refusal::start(&ns, "serviceaccounts/token", "[CREATE]", &["create", "token", "app"]).await;
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml(
        "b",
        &role,
        &["app"],
        "  method: AssumeRoleWithWebIdentity\n",
    ));
    let message = wait_ready(&ns.bindings(), "b", "False", "TokenRequestFailed").await;
    assert!(
        message.contains("cannot get a token for ServiceAccount app") && message.contains(&refusal.name),
        "{message}"
    );
    assert!(!message.contains("trust policy"), "{message}");
    assert_eq!(sts.total(), 0);
}

#[tokio::test]
async fn credentials_run_out_while_the_spec_is_invalid() {
    let ns = TestNamespace::new("invalidexpiry").await;
    ns.service_account("app").await;
    let role = granted_role(&ns, None, "");
    let sts = Forwarder::start().await;
    sts.session_lifetime(Some(Duration::from_secs(60)));
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    let key = secret_value(&ns.secrets().get("b-app").await.unwrap(), "AWS_ACCESS_KEY_ID");
    // The spec becomes invalid: the credentials stay while valid, and go at their expiry
    // with no STS call.
    ns.apply_ok(&binding_yaml(
        "b",
        &role,
        &["app"],
        "  externalIdSecretRef: {name: missing, key: id}\n",
    ));
    wait_ready(&ns.bindings(), "b", "False", "InvalidSpec").await;
    expired_and_emptied(&ns, "b-app", &key).await;
    assert_eq!(sts.count("AssumeRole"), 1);
    wait_ready(&ns.bindings(), "b", "False", "InvalidSpec").await;
}

/// Waits until the Secret carries the expired marker and nothing of the credentials of
/// access key `key`.
async fn expired_and_emptied(ns: &TestNamespace, name: &str, key: &str) -> k8s_openapi::api::core::v1::Secret {
    eventually("credentials removed at expiry", Duration::from_secs(150), || async {
        let secret = ns.secrets().get(name).await.ok()?;
        let expired = secret
            .metadata
            .annotations
            .as_ref()?
            .contains_key("kube-sts.io/expired");
        let data = secret.data.clone().unwrap_or_default();
        let clean = !data.contains_key("AWS_SECRET_ACCESS_KEY")
            && !data.contains_key("AWS_SESSION_TOKEN")
            && data.values().all(|v| !String::from_utf8_lossy(&v.0).contains(key));
        (expired && clean).then_some(secret)
    })
    .await
}

#[tokio::test]
async fn a_new_operator_never_resends_the_previous_ones_mfa_code() {
    let ns = TestNamespace::new("mfahandover").await;
    ns.service_account("app").await;
    granted_role(&ns, None, "  methods: [GetSessionToken]\n");
    ns.team_keys("keys", &["sts:GetSessionToken"]).await;
    ns.create_secret("mfa", &[("seed", "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")])
        .await;
    let serial = format!("arn:aws:iam::{}:mfa/ops", account());
    let binding = |duration: u32| {
        format!(
            "apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleBinding\nmetadata: {{name: b}}\nspec:\n  method: GetSessionToken\n  durationSeconds: {duration}\n  subjects: [{{name: app}}]\n  sourceCredentialsSecretRef: {{name: keys}}\n  mfa: {{serialNumber: {serial}, totpSecretRef: {{name: mfa, key: seed}}}}\n"
        )
    };
    let sts = Forwarder::start().await;
    let mut first = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding(900));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    // Handed over at once (a new leader, a restart) with a spec to issue for: the code the
    // first process sent may not go out again, though its 30 s step may still run.
    first.stop();
    ns.apply_ok(&binding(1000));
    let _second = Operator::start(&ns.name, &sts, &[]);
    eventually("issued by the second process", Duration::from_secs(120), || async {
        (sts.count("GetSessionToken") == 2).then_some(())
    })
    .await;
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    let codes: Vec<String> = sts
        .requests("GetSessionToken")
        .into_iter()
        .map(|p| p["TokenCode"].clone())
        .collect();
    assert_ne!(codes[0], codes[1], "the second process resent the first one's code");
}
