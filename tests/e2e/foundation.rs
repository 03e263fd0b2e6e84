//! The real control plane and STS peer do what the operator relies on.

use std::time::Duration;

use aws_config::BehaviorVersion;
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec},
    core::v1::{ConfigMap, ServiceAccount},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams},
};

use crate::harness::*;

#[tokio::test]
async fn crds_are_established() {
    let out = kubectl(
        &[
            "apply",
            "--server-side",
            "-f",
            env().repo.join("crds").to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for crd in ["awsrolebindings.kube-sts.io", "awsrolegrants.kube-sts.io"] {
        let out = kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{crd}"),
            ],
            None,
        );
        assert!(out.status.success(), "{crd}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

const GOOD: &str = "roleArn: arn:aws:iam::123456789012:role/r\n  subjects: [{name: app}]";

fn binding(spec: &str) -> String {
    format!("apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleBinding\nmetadata: {{name: bad}}\nspec:\n  {spec}\n")
}

fn grant(spec: &str) -> String {
    format!("apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleGrant\nmetadata: {{name: bad-grant}}\nspec:\n  {spec}\n")
}

#[tokio::test]
async fn malformed_bindings_and_grants_are_rejected_naming_the_field() {
    let ns = TestNamespace::new("reject").await;
    let cases: Vec<(String, &str)> = vec![
        (
            binding("roleArn: not-an-arn\n  subjects: [{name: app}]"),
            "spec.roleArn",
        ),
        (
            binding("roleArn: arn:aws:iam::123456789012:role/r\n  subjects: []"),
            "spec.subjects",
        ),
        (
            binding("roleArn: arn:aws:iam::123456789012:role/r\n  subjects: [{name: a}, {name: a}]"),
            ".spec.subjects: duplicate entries",
        ),
        (binding(&format!("{GOOD}\n  method: AssumeRoot")), "spec.method"),
        (
            binding(&format!("{GOOD}\n  durationSeconds: 100")),
            "spec.durationSeconds",
        ),
        (
            binding(&format!("{GOOD}\n  durationSeconds: 50000")),
            "durationSeconds must be at most 43200",
        ),
        (
            binding(&format!("{GOOD}\n  sessionName: has space")),
            "spec.sessionName",
        ),
        (
            binding(&format!("{GOOD}\n  sessionTags: {{kubernetes-namespace: x}}")),
            "kubernetes- are reserved",
        ),
        (
            binding(&format!(
                "{GOOD}\n  externalId: abc\n  externalIdSecretRef: {{name: s, key: k}}"
            )),
            "externalId and externalIdSecretRef are mutually exclusive",
        ),
        (binding("subjects: [{name: app}]"), "roleArn is required"),
        (
            binding(&format!("{GOOD}\n  sessionTags: {{a: b}}\n  transitiveTagKeys: [c]")),
            "transitiveTagKeys must be keys of sessionTags",
        ),
        (
            binding("roleArn: arn:aws:iam::123456789012:role/r\n  subjects: [{kind: Group, name: g}]"),
            "spec.subjects[0].kind",
        ),
        (
            binding("method: GetFederationToken\n  subjects: [{name: app}]"),
            "GetFederationToken needs sessionPolicy or policyArns",
        ),
        (
            binding(&format!("{GOOD}\n  webIdentity: {{tokenExpirationSeconds: 100}}")),
            "spec.webIdentity.tokenExpirationSeconds",
        ),
        (binding(&format!("{GOOD}\n  policyArns: [nope]")), "spec.policyArns[0]"),
        (binding(&format!("{GOOD}\n  externalId: x")), "spec.externalId"),
        (
            grant("roleArns: [\"*\"]"),
            "at least one of namespaces and namespaceSelector is required",
        ),
        (grant("namespaces: [a]\n  roleArns: []"), "spec.roleArns"),
        (
            grant("namespaces: [a]\n  roleArns: [\"*\"]\n  methods: [Sudo]"),
            "spec.methods[0]",
        ),
    ];
    for (yaml, expected) in &cases {
        let out = ns.apply(yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted but should not be:\n{yaml}");
        assert!(
            stderr.contains(expected),
            "rejection of\n{yaml}\nshould name {expected:?}, got: {stderr}"
        );
    }
    assert!(ns.bindings().list(&Default::default()).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn valid_binding_is_accepted_and_printed_with_columns() {
    let ns = TestNamespace::new("columns").await;
    ns.apply_ok(&binding(GOOD).replace("name: bad", "name: good"));
    let out = kubectl(&["get", "arb", "-n", &ns.name], None);
    let table = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "ROLE", "METHOD", "READY", "EXPIRES", "AGE"], "{table}");
    assert!(
        table.contains("arn:aws:iam::123456789012:role/r") && table.contains("AssumeRole"),
        "{table}"
    );
    // The short name and category resolve too.
    assert!(kubectl(&["get", "kube-sts", "-n", &ns.name], None).status.success());
}

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_binding() {
    let ns = TestNamespace::new("gc").await;
    ns.apply_ok(&binding(GOOD).replace("name: bad", "name: owner"));
    let owner = ns.bindings().get("owner").await.unwrap();
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "dependent", "ownerReferences": [{
            "apiVersion": "kube-sts.io/v1alpha1", "kind": "AWSRoleBinding",
            "name": "owner", "uid": owner.uid().unwrap(), "controller": true}]},
    }))
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    cms.create(&PostParams::default(), &cm).await.unwrap();
    ns.bindings()
        .delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    eventually(
        "garbage collection of the dependent ConfigMap",
        Duration::from_secs(60),
        || async { cms.get_opt("dependent").await.unwrap().is_none().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn token_request_yields_a_token_that_token_review_accepts() {
    let ns = TestNamespace::new("token").await;
    ns.service_account("app").await;
    let sas: Api<ServiceAccount> = Api::namespaced(ns.client.clone(), &ns.name);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["sts.amazonaws.com".into()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request("app", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: Some(vec!["sts.amazonaws.com".into()]),
        },
        ..Default::default()
    };
    let reviews: Api<TokenReview> = Api::all(ns.client.clone());
    let status = reviews
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
}

async fn sts_client(access_key: &str, secret_key: &str) -> aws_sdk_sts::Client {
    let creds = aws_credential_types::Credentials::new(access_key, secret_key, None, None, "e2e");
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(env().aws["AWS_REGION"].clone()))
        .endpoint_url(&env().aws["AWS_ENDPOINT_URL_STS"])
        .credentials_provider(creds)
        .load()
        .await;
    aws_sdk_sts::Client::new(&config)
}

#[tokio::test]
async fn sts_peer_refuses_a_wrong_signature_and_accepts_the_operator() {
    use aws_sdk_sts::error::ProvideErrorMetadata;
    let key = &env().aws["AWS_ACCESS_KEY_ID"];
    let wrong = sts_client(key, "0000000000000000000000000000000000000000").await;
    let err = wrong
        .get_caller_identity()
        .send()
        .await
        .expect_err("a wrong secret key must be refused");
    assert_eq!(err.code(), Some("SignatureDoesNotMatch"), "{err:?}");
    let right = sts_client(key, &env().aws["AWS_SECRET_ACCESS_KEY"]).await;
    let who = right
        .get_caller_identity()
        .send()
        .await
        .expect("the operator's key works");
    assert_eq!(who.arn(), Some(operator_arn().as_str()));
}
