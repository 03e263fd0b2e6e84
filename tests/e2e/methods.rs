//! Every STS way in besides plain AssumeRole, through the same pipeline.

use std::{process::Command, time::Duration};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Secret,
};
use kube::{Api, api::PostParams};
use kube_sts::mfa::Seed;

use crate::harness::*;

const SEED: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

fn apply_grant(ns: &TestNamespace, roles: &str, methods: &str) {
    let yaml = format!(
        "apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleGrant\nmetadata: {{name: {}}}\nspec:\n  namespaces: [{}]\n  roleArns: [{roles}]\n  methods: [{methods}]\n",
        ns.name, ns.name
    );
    let out = kubectl(&["apply", "--server-side", "-f", "-"], Some(&yaml));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn binding(name: &str, spec: &str) -> String {
    format!("apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleBinding\nmetadata: {{name: {name}}}\nspec:\n{spec}")
}

/// Starts moto's request recorder on the STS peer that serves AssumeRoleWithWebIdentity.
fn recorder(verb: &str) -> String {
    let url = format!("{}/moto-api/recorder/{verb}-recording", env().aws["MOTO_NOAUTH_URL"]);
    let out = Command::new(&env().python)
        .args(["-c", "import sys, urllib.request; print(urllib.request.urlopen(urllib.request.Request(sys.argv[1], method='POST')).read().decode())", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "recorder {verb}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The WebIdentityToken values the STS peer received, from its recording.
fn recorded_web_identity_tokens(recording: &str) -> Vec<String> {
    let script = r#"
import base64, json, sys, urllib.parse
for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    rec = json.loads(line)
    body = rec.get("body") or ""
    if rec.get("body_encoded"):
        body = base64.b64decode(body).decode()
    params = urllib.parse.parse_qs(body)
    if params.get("Action") == ["AssumeRoleWithWebIdentity"]:
        print(params["WebIdentityToken"][0])
"#;
    let mut child = Command::new(&env().python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), recording.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn web_identity_uses_the_service_accounts_own_token() {
    let ns = TestNamespace::new("webid").await;
    ns.service_account("app").await;
    let role = format!("arn:aws:iam::{}:role/{}", account(), unique("web"));
    apply_grant(&ns, &format!("\"{role}\""), "AssumeRoleWithWebIdentity");
    recorder("reset");
    recorder("start");
    let sts = Forwarder::start().await;
    let operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding(
        "web",
        &format!("  method: AssumeRoleWithWebIdentity\n  roleArn: {role}\n  subjects: [{{name: app}}]\n  webIdentity: {{audience: kube-sts-e2e, tokenExpirationSeconds: 600}}\n"),
    ));
    wait_ready(&ns.bindings(), "web", "True", "CredentialsIssued").await;
    recorder("stop");
    let tokens = recorded_web_identity_tokens(&recorder("download"));
    assert_eq!(sts.count("AssumeRoleWithWebIdentity"), 1);
    let token = tokens
        .last()
        .expect("the STS peer received a web identity token")
        .clone();

    // The token is the ServiceAccount's own, for the configured audience.
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.clone()),
            audiences: Some(vec!["kube-sts-e2e".into()]),
        },
        ..Default::default()
    };
    let status = Api::<TokenReview>::all(ns.client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(
        status.user.unwrap().username.unwrap(),
        format!("system:serviceaccount:{}:app", ns.name)
    );
    assert_eq!(status.audiences, Some(vec!["kube-sts-e2e".to_string()]));

    // Never written to a Secret or a log.
    let secret: Secret = ns.secrets().get("web-app").await.unwrap();
    let data = serde_json::to_string(&secret).unwrap();
    assert!(!data.contains(&token[..40]) && !operator.logs().contains(&token[..40]));
    let st = ns.bindings().get("web").await.unwrap().status.unwrap();
    assert!(
        st.subjects[0].arn.as_deref().unwrap().contains(":assumed-role/"),
        "{:?}",
        st.subjects[0].arn
    );
}

#[tokio::test]
async fn session_token_with_mfa_sends_fresh_totp_codes() {
    let ns = TestNamespace::new("mfa").await;
    ns.service_account("app").await;
    apply_grant(&ns, "\"*\"", "GetSessionToken");
    let seed: Secret =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "ops-mfa"}, "stringData": {"seed": SEED}}))
            .unwrap();
    ns.secrets().create(&PostParams::default(), &seed).await.unwrap();
    ns.team_keys("keys", &["sts:GetSessionToken"]).await;
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    let serial = format!("arn:aws:iam::{}:mfa/ops", account());
    let spec = |duration: u32| {
        format!(
            "  method: GetSessionToken\n  durationSeconds: {duration}\n  subjects: [{{name: app}}]\n  sourceCredentialsSecretRef: {{name: keys}}\n  mfa: {{serialNumber: {serial}, totpSecretRef: {{name: ops-mfa, key: seed}}}}\n"
        )
    };
    ns.apply_ok(&binding("mfa", &spec(900)));
    wait_ready(&ns.bindings(), "mfa", "True", "CredentialsIssued").await;
    // A spec change right away needs a second code: never the same one.
    ns.apply_ok(&binding("mfa", &spec(1000)));
    eventually("second GetSessionToken", Duration::from_secs(90), || async {
        (sts.count("GetSessionToken") >= 2).then_some(())
    })
    .await;
    wait_ready(&ns.bindings(), "mfa", "True", "CredentialsIssued").await;

    let seed = Seed::parse(SEED).unwrap();
    let now = jiff::Timestamp::now().as_second() as u64;
    let valid: Vec<String> = (0..12).map(|i| seed.code_at(now - i * 30)).collect();
    let sent: Vec<_> = sts.requests("GetSessionToken");
    assert_eq!(sent.len(), 2);
    for params in &sent {
        assert_eq!(params["SerialNumber"], serial);
        assert!(
            valid.contains(&params["TokenCode"]),
            "{} is not a TOTP code of the seed",
            params["TokenCode"]
        );
    }
    assert_ne!(sent[0]["TokenCode"], sent[1]["TokenCode"], "a TOTP code was sent twice");
}

#[tokio::test]
async fn mfa_with_a_missing_or_malformed_seed_is_invalid_spec() {
    let ns = TestNamespace::new("mfabad").await;
    ns.service_account("app").await;
    apply_grant(&ns, "\"*\"", "GetSessionToken");
    ns.team_keys("keys", &["sts:GetSessionToken"]).await;
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    let serial = format!("arn:aws:iam::{}:mfa/ops", account());
    ns.apply_ok(&binding(
        "m",
        &format!("  method: GetSessionToken\n  subjects: [{{name: app}}]\n  sourceCredentialsSecretRef: {{name: keys}}\n  mfa: {{serialNumber: {serial}, totpSecretRef: {{name: nope, key: seed}}}}\n"),
    ));
    let message = wait_ready(&ns.bindings(), "m", "False", "InvalidSpec").await;
    assert!(message.contains("Secret nope not found"), "{message}");
    let bad: Secret = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "nope"}, "stringData": {"seed": "not base32!"}}),
    )
    .unwrap();
    ns.secrets().create(&PostParams::default(), &bad).await.unwrap();
    // A change to the binding re-reads the reference.
    ns.apply_ok(&binding(
        "m",
        &format!("  method: GetSessionToken\n  durationSeconds: 901\n  subjects: [{{name: app}}]\n  sourceCredentialsSecretRef: {{name: keys}}\n  mfa: {{serialNumber: {serial}, totpSecretRef: {{name: nope, key: seed}}}}\n"),
    ));
    eventually("InvalidSpec naming base32", Duration::from_secs(30), || async {
        ready(&ns.bindings(), "m")
            .await
            .filter(|(_, r, m)| r == "InvalidSpec" && m.contains("base32"))
            .map(|_| ())
    })
    .await;
    assert_eq!(sts.total(), 0);
}

#[tokio::test]
async fn federation_token_for_a_derived_user_name() {
    let ns = TestNamespace::new("fed").await;
    ns.service_account("app").await;
    apply_grant(&ns, "\"*\"", "GetFederationToken");
    ns.team_keys("keys", &["sts:GetFederationToken"]).await;
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#;
    ns.apply_ok(&binding(
        "fed",
        &format!("  method: GetFederationToken\n  subjects: [{{name: app}}]\n  sourceCredentialsSecretRef: {{name: keys}}\n  sessionPolicy: '{policy}'\n"),
    ));
    wait_ready(&ns.bindings(), "fed", "True", "CredentialsIssued").await;
    let sent = sts.requests("GetFederationToken");
    let expected_name: String = format!("{}.app", ns.name).chars().take(32).collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["Name"].len(), expected_name.len().min(32));
    assert!(
        sent[0]["Name"].len() >= 2 && sent[0]["Name"].len() <= 32,
        "{}",
        sent[0]["Name"]
    );
    assert_eq!(sent[0]["Policy"], policy);
    let st = ns.bindings().get("fed").await.unwrap().status.unwrap();
    assert!(
        st.subjects[0].arn.as_deref().unwrap().contains(":federated-user/"),
        "{:?}",
        st.subjects[0].arn
    );
}

#[tokio::test]
async fn role_chain_assumes_each_hop_and_clamps_to_one_hour() {
    let ns = TestNamespace::new("chain").await;
    ns.service_account("app").await;
    let hub_name = unique("hub");
    let hub = {
        let out = Command::new(&env().python)
            .arg(env().repo.join("e2e/sts/iam.py"))
            .args([
                "create-role",
                "--name",
                &hub_name,
                "--principal",
                &operator_arn(),
                "--external-id",
                "hub-id",
                "--allow-assume",
            ])
            .envs(&env().admin)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    // The target trusts the hub's sessions.
    let target = create_role(&unique("target"), "*", None, true);
    apply_grant(&ns, &format!("\"{hub}\", \"{target}\""), "AssumeRole");
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&binding(
        "chained",
        &format!("  roleArn: {target}\n  durationSeconds: 7200\n  chain: [{{roleArn: {hub}, externalId: hub-id}}]\n  subjects: [{{name: app}}]\n"),
    ));
    let message = wait_ready(&ns.bindings(), "chained", "True", "CredentialsIssued").await;
    assert!(message.contains("clamped to 3600"), "{message}");
    let sent = sts.requests("AssumeRole");
    assert_eq!(sent.len(), 2);
    assert_eq!(
        (sent[0]["RoleArn"].as_str(), sent[0]["ExternalId"].as_str()),
        (hub.as_str(), "hub-id")
    );
    assert_eq!(sent[1]["RoleArn"], target);
    assert!(sent.iter().all(|p| p["DurationSeconds"] == "3600"));
    let st = ns.bindings().get("chained").await.unwrap().status.unwrap();
    let target_name = target.rsplit('/').next().unwrap();
    assert!(
        st.subjects[0]
            .arn
            .as_deref()
            .unwrap()
            .contains(&format!("assumed-role/{target_name}/"))
    );
}

fn pull_binding(name: &str, role: &str, registries: &[String]) -> String {
    binding(
        name,
        &format!(
            "  roleArn: {role}\n  subjects: [{{name: app}}]\n  secret: {{type: DockerConfigJson}}\n  ecr: {{registryIds: [{}]}}\n",
            registries
                .iter()
                .map(|r| format!("\"{r}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

/// A namespace with the ServiceAccount `app` and a role it may pull with (granted, with
/// `other_roles`, for AssumeRole).
async fn pull_setup(prefix: &str, other_roles: &[&str]) -> (TestNamespace, String) {
    let ns = TestNamespace::new(prefix).await;
    ns.service_account("app").await;
    let role = create_role_allowing(
        &unique("puller"),
        &operator_arn(),
        None,
        true,
        &["ecr:GetAuthorizationToken"],
    );
    let roles: Vec<String> = std::iter::once(role.as_str())
        .chain(other_roles.iter().copied())
        .map(|r| format!("\"{r}\""))
        .collect();
    apply_grant(&ns, &roles.join(", "), "AssumeRole");
    (ns, role)
}

#[tokio::test]
async fn ecr_pull_secret_holds_the_token_for_each_registry() {
    use base64::Engine;
    let no_pull = create_role(&unique("nopull"), &operator_arn(), None, true);
    let (ns, role) = pull_setup("ecr", &[&no_pull]).await;
    let sts = Forwarder::start().await;
    let mut first = Operator::start(&ns.name, &sts, &[]);

    // Plain credentials first; then the same binding asks for a pull Secret instead.
    ns.apply_ok(&binding(
        "pull",
        &format!("  roleArn: {role}\n  subjects: [{{name: app}}]\n"),
    ));
    wait_ready(&ns.bindings(), "pull", "True", "CredentialsIssued").await;
    let plain = ns.secrets().get("pull-app").await.unwrap();
    let other = "210987654321".to_string();
    ns.apply_ok(&pull_binding("pull", &role, &[account(), other.clone()]));
    wait_ready(&ns.bindings(), "pull", "True", "CredentialsIssued").await;

    // Kubernetes never changes a Secret's type: the Secret was replaced.
    let secret = ns.secrets().get("pull-app").await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    assert_ne!(secret.metadata.uid, plain.metadata.uid);
    let keys: Vec<_> = secret.data.as_ref().unwrap().keys().cloned().collect();
    assert_eq!(keys, [".dockerconfigjson"]);
    let config: serde_json::Value = serde_json::from_str(&secret_value(&secret, ".dockerconfigjson")).unwrap();
    let auths = config["auths"].as_object().unwrap();
    let region = &env().aws["AWS_REGION"];
    let mut hosts: Vec<&String> = auths.keys().collect();
    hosts.sort();
    let mut want = [
        format!("{}.dkr.ecr.{region}.amazonaws.com", account()),
        format!("{other}.dkr.ecr.{region}.amazonaws.com"),
    ];
    want.sort();
    assert_eq!(hosts, want.iter().collect::<Vec<_>>());
    // One token serves every registry the session may pull from (moto's is AWS:<account>-auth-token).
    let mut tokens = Vec::new();
    for entry in auths.values() {
        let auth = entry["auth"].as_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD.decode(auth).unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            format!("AWS:{}-auth-token", account())
        );
        tokens.push(auth.to_string());
    }

    // Status names the session that fetched the token; times are the token's own (12 h),
    // not the one-hour session's, and the refresh is planned from them.
    let status = ns.bindings().get("pull").await.unwrap().status.unwrap();
    let subject = &status.subjects[0];
    let access_key = subject.access_key_id.clone().unwrap();
    assert_eq!(
        secret.metadata.annotations.as_ref().unwrap()["kube-sts.io/access-key-id"],
        access_key
    );
    let issued = subject.issued_at.as_ref().unwrap().0;
    let expires = subject.expiration.as_ref().unwrap().0;
    let lifetime = expires.duration_since(issued).as_secs();
    assert!(
        (11 * 3600..=12 * 3600).contains(&lifetime),
        "token lifetime {lifetime} s"
    );
    let lead = expires
        .duration_since(subject.next_refresh_time.as_ref().unwrap().0)
        .as_secs();
    let planned = lifetime / 3;
    assert!(
        (planned..=planned + 300).contains(&lead),
        "refresh {lead} s before expiry, planned {planned} s plus jitter"
    );

    // At the wire: one token request, signed by the issued session, not the operator.
    assert_eq!(sts.count("AssumeRole"), 2);
    assert_eq!(sts.count("GetAuthorizationToken"), 1);
    let request = sts.raw("GetAuthorizationToken").concat();
    assert!(request.contains(&format!("Credential={access_key}/")), "{request}");
    assert!(!request.contains(&format!("Credential={}/", env().aws["AWS_ACCESS_KEY_ID"])));

    // A restart adopts the pull Secret: no STS or ECR call, no write.
    first.stop();
    let second_sts = Forwarder::start().await;
    let second = Operator::start(&ns.name, &second_sts, &[]);
    second.wait_reconciled().await;
    assert_eq!(second_sts.total(), 0, "restart called AWS");
    assert_eq!(
        ns.secrets().get("pull-app").await.unwrap().metadata.resource_version,
        secret.metadata.resource_version
    );

    // A role without ecr:GetAuthorizationToken: AccessDenied naming the permission, no Secret.
    ns.apply_ok(&pull_binding("nopull", &no_pull, &[account()]));
    let message = wait_ready(&ns.bindings(), "nopull", "False", "AccessDenied").await;
    assert!(message.contains("ecr:GetAuthorizationToken"), "{message}");
    assert!(ns.secrets().get_opt("nopull-app").await.unwrap().is_none());

    for log in [first.logs(), second.logs()] {
        for token in &tokens {
            assert!(!log.contains(token.as_str()), "a registry token was logged");
        }
    }
}

#[tokio::test]
async fn an_already_expired_ecr_token_is_refused_with_backoff() {
    let (ns, role) = pull_setup("ecrold", &[]).await;
    let sts = Forwarder::start().await;
    // What moto itself answers: a token that expired on 2015-01-01.
    sts.ecr_tokens_already_expired();
    let _operator = Operator::start(&ns.name, &sts, &[]);
    ns.apply_ok(&pull_binding("old", &role, &[account()]));
    let subject = eventually("three refused tokens", Duration::from_secs(90), || async {
        let status = ns.bindings().get("old").await.ok()?.status?;
        let subject = status.subjects.first()?.clone();
        (subject.consecutive_failures >= 3).then_some(subject)
    })
    .await;
    assert!(subject.message.contains("2015-01-01T00:00:00Z"), "{}", subject.message);
    let (ready, reason, _) = ready(&ns.bindings(), "old").await.unwrap();
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "STSUnavailable"));
    // Each failure is one attempt after a backoff, not a loop: as many token requests as
    // failures counted so far (one more may be under way).
    let failures = ns.bindings().get("old").await.unwrap().status.unwrap().subjects[0].consecutive_failures as usize;
    let calls = sts.count("GetAuthorizationToken");
    assert!(
        (failures..=failures + 1).contains(&calls),
        "{calls} token requests for {failures} failures"
    );
    assert!(
        ns.secrets().get_opt("old-app").await.unwrap().is_none(),
        "an expired token was written"
    );
}
