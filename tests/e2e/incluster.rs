//! The operator installed the way users install it: `helm install` of `charts/kube-sts`
//! with the image `make image` builds (imported into the node's containerd, never pulled),
//! running as a pod on the real node with in-cluster config, the ServiceAccount token the
//! kubelet mounts, the chart's probes and securityContext, and the operator identity from
//! a Secret (`aws.existingSecret`). It reaches STS at the peer's address on the node link.

use std::{
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};

use crate::{harness::*, secret_log::*};

fn script_output(script: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(env().repo.join("e2e/scripts").join(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// An image built by `build-image.sh ARGS` ("REF PATH"), imported into the node.
fn import(args: &[&str]) -> String {
    let line = script_output("build-image.sh", args);
    let (reference, path) = line.lines().last().unwrap().split_once(' ').unwrap();
    script_output("node-import.sh", &[path]);
    reference.to_string()
}

/// The operator's image (`make image`), imported into the node once per test run.
fn operator_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| import(&[]))
}

/// The consumer image: the AWS SDK calling GetCallerIdentity every second
/// (`examples/consumer.rs`), with `sh` and `cat` for `credential_process`.
fn consumer_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| import(&["consumer"]))
}

/// A consumer pod that mounts the Secret exactly as the README says: a volume at the
/// default mountPath, no subPath, `AWS_CONFIG_FILE` naming its `config`.
fn consumer_pod(name: &str, service_account: &str, secret: &str, sts: &str) -> String {
    let image = consumer_image();
    let region = &env().aws["AWS_REGION"];
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  serviceAccountName: {service_account}
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {image}
      imagePullPolicy: Never
      env:
        - {{name: AWS_CONFIG_FILE, value: /var/run/secrets/kube-sts.io/config}}
        - {{name: AWS_ENDPOINT_URL_STS, value: "{sts}"}}
        - {{name: AWS_REGION, value: {region}}}
        - {{name: AWS_EC2_METADATA_DISABLED, value: "true"}}
      volumeMounts: [{{name: aws, mountPath: /var/run/secrets/kube-sts.io, readOnly: true}}]
  volumes: [{{name: aws, secret: {{secretName: {secret}}}}}]
"#
    )
}

/// The consumer's calls so far (its log: one JSON object per call).
fn consumer_calls(namespace: &str, pod: &str) -> Vec<serde_json::Value> {
    let out = kubectl(&["logs", "-n", namespace, pod], None);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits for three successful calls of the consumer pod `pod`, then checks that every call
/// it made succeeded as a session of `role`.
async fn assert_consumer_acts_as(namespace: &str, pod: &str, role: &str) {
    let role_name = role.rsplit('/').next().unwrap();
    let calls = eventually("the consumer's calls succeed", Duration::from_secs(120), || async {
        let calls = consumer_calls(namespace, pod);
        (calls.iter().filter(|c| c["ok"] == true).count() >= 3).then_some(calls)
    })
    .await;
    for call in &calls {
        assert_eq!(call["ok"], true, "{call}");
        let arn = call["arn"].as_str().unwrap();
        assert!(
            arn.starts_with(&format!("arn:aws:sts::{}:assumed-role/{role_name}/", account())),
            "{arn}"
        );
    }
}

fn helm_run(args: &[&str]) {
    let out = Command::new(helm())
        .args(args)
        .env("KUBECONFIG", &env().kubeconfig)
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A release of the chart installed the user's way: `helm install` into a namespace of its
/// own (`op`, named after the release, so its cluster-scoped objects never collide with
/// another test's), with the chart's defaults plus the image, the operator identity (an IAM
/// user's keys in a Secret of `op`), STS at `sts`, and `tenant` as the one namespace it
/// watches (tests run side by side), where the bindings and workloads are. Dropped, also
/// when the test fails, it uninstalls the release and deletes the tenant's grant: the
/// namespaces' deletion would take Helm's record with it and leave the cluster-scoped
/// objects behind.
struct Release {
    op: TestNamespace,
    tenant: TestNamespace,
    installed: bool,
}

impl Release {
    async fn install(prefix: &str, sts: &str, extra: &[&str]) -> Release {
        let op = TestNamespace::new(&format!("{prefix}-op")).await;
        let tenant = TestNamespace::new(prefix).await;
        let image = operator_image();
        let (repository, tag) = image.rsplit_once(':').unwrap();
        op.create_secret(
            "operator-aws",
            &[
                ("AWS_ACCESS_KEY_ID", &env().aws["AWS_ACCESS_KEY_ID"]),
                ("AWS_SECRET_ACCESS_KEY", &env().aws["AWS_SECRET_ACCESS_KEY"]),
            ],
        )
        .await;
        let chart = env().repo.join("charts/kube-sts");
        let sets = [
            format!("image.repository={repository}"),
            format!("image.tag={tag}"),
            "image.pullPolicy=Never".to_string(),
            format!("watchNamespace={}", tenant.name),
            "aws.existingSecret=operator-aws".to_string(),
            format!("aws.region={}", env().aws["AWS_REGION"]),
            format!("stsEndpoint={sts}"),
        ];
        let name = op.name.clone();
        let mut args = vec!["install", &name, chart.to_str().unwrap(), "--namespace", &name];
        for set in &sets {
            args.extend(["--set", set.as_str()]);
        }
        args.extend_from_slice(extra);
        // Guarded before the install: a failed one may have left objects behind.
        let release = Release {
            op,
            tenant,
            installed: true,
        };
        helm_run(&args);
        release
    }

    /// `helm upgrade` of the release with `extra` over the values it has.
    fn upgrade(&self, extra: &[&str]) {
        let chart = env().repo.join("charts/kube-sts");
        let mut args = vec![
            "upgrade",
            &self.op.name,
            chart.to_str().unwrap(),
            "--namespace",
            &self.op.name,
            "--reuse-values",
        ];
        args.extend_from_slice(extra);
        helm_run(&args);
    }

    /// `helm uninstall --wait`.
    fn uninstall(&mut self) {
        self.installed = false;
        helm_run(&["uninstall", &self.op.name, "--namespace", &self.op.name, "--wait"]);
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.installed {
            let _ = Command::new(helm())
                .args(["uninstall", &self.op.name, "--namespace", &self.op.name, "--wait"])
                .env("KUBECONFIG", &env().kubeconfig)
                .output();
        }
        let _ = kubectl(
            &["delete", "awsrolegrant", &self.tenant.name, "--ignore-not-found"],
            None,
        );
    }
}

/// The label selector of the release's operator pods (not its webhook's, which share the
/// instance label).
fn operator_pods(ns: &TestNamespace) -> String {
    format!("app.kubernetes.io/instance={},app.kubernetes.io/name=kube-sts", ns.name)
}

/// The release's operator pods in `ns`, as listed now.
async fn list_operator_pods(ns: &TestNamespace) -> kube::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    Ok(pods
        .list(&ListParams::default().labels(&operator_pods(ns)))
        .await?
        .items)
}

/// The operator's pod once it is Ready, other than `not` (a pod deleted since).
async fn operator_pod(ns: &TestNamespace, not: Option<&str>) -> Pod {
    eventually("the operator pod is Ready", Duration::from_secs(180), || async {
        for pod in list_operator_pods(ns).await.ok()? {
            let name = pod.metadata.name.as_deref()?;
            if Some(name) != not
                && pod.metadata.deletion_timestamp.is_none()
                && let Some(pod) = pod_ready(&ns.client, &ns.name, name).await
            {
                return Some(pod);
            }
        }
        None
    })
    .await
}

/// Waits until the operator in `pod` finished at least one reconcile (its metrics, read
/// from the host at the pod's address).
async fn wait_pod_reconciled(pod: &Pod) {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("pod IP");
    let addr = std::net::SocketAddr::new(ip.parse().unwrap(), 8080);
    eventually("a reconcile finished in the pod", Duration::from_secs(60), || async {
        let m = metrics_at(addr).await?;
        m.lines()
            .any(|l| l.starts_with("kube_sts_reconcile_duration_seconds_count") && !l.ends_with(" 0"))
            .then_some(())
    })
    .await;
}

/// A role that trusts the operator, granted to the test's namespace, and a binding of it
/// for the ServiceAccount `app`; returns the role's ARN once the binding is Ready.
async fn issued_binding(ns: &TestNamespace) -> String {
    issued_binding_with(ns, "").await
}

/// [`issued_binding`] with `extra` lines in the binding's spec.
async fn issued_binding_with(ns: &TestNamespace, extra: &str) -> String {
    let role = granted_role(ns, None, "");
    ns.service_account("app").await;
    ns.apply_ok(&binding_yaml("reports", &role, &["app"], extra));
    wait_ready(&ns.bindings(), "reports", "True", "CredentialsIssued").await;
    role
}

#[tokio::test]
async fn helm_install_runs_the_operator_as_a_pod_that_issues_credentials() {
    let release = Release::install("incluster", &sts_url_for_pods(), &[]).await;
    let ns = &release.tenant;
    let image = operator_image();
    let pod = operator_pod(&release.op, None).await;
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.containers[0].image.as_deref(), Some(image));
    let sc = spec.containers[0].security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));

    // A binding, issued by the operator in the pod.
    let role = issued_binding(ns).await;
    let secret = ns.secrets().get("reports-app").await.expect("the binding's Secret");
    assert!(secret_value(&secret, "AWS_ACCESS_KEY_ID").starts_with("ASIA"));

    // A workload on the node uses it: its SDK's calls succeed as the role's session.
    ns.apply_ok(&consumer_pod("consumer", "app", "reports-app", &sts_url_for_pods()));
    assert_consumer_acts_as(&ns.name, "consumer", &role).await;
}

#[tokio::test]
async fn a_deleted_operator_pod_is_recreated_and_adopts_the_secrets_with_no_sts_call() {
    let sts = Forwarder::start_for_pods().await;
    let release = Release::install("adopt", &sts.url(), &[]).await;
    let (op, ns) = (&release.op, &release.tenant);
    let first = operator_pod(op, None).await;
    issued_binding(ns).await;
    wait_pod_reconciled(&first).await;
    assert_eq!(sts.count("AssumeRole"), 1);
    let before = ns.secrets().get("reports-app").await.unwrap();

    let first_name = first.metadata.name.clone().unwrap();
    let out = kubectl(&["delete", "pod", "-n", &op.name, &first_name, "--wait=false"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = operator_pod(op, Some(&first_name)).await;
    assert_ne!(second.metadata.uid, first.metadata.uid, "the Deployment made a new pod");
    wait_pod_reconciled(&second).await;

    assert_eq!(
        sts.count("AssumeRole"),
        1,
        "the new pod adopted the Secret: no STS call"
    );
    assert_eq!(sts.total(), 1, "no other STS request either");
    let after = ns.secrets().get("reports-app").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "and no write"
    );
    wait_ready(&ns.bindings(), "reports", "True", "CredentialsIssued").await;
}

/// The pods of the release that run (started, whether Ready or standing by), by name.
async fn running_pods(ns: &TestNamespace) -> Vec<String> {
    list_operator_pods(ns)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|c| c.iter().all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())))
        })
        .filter_map(|p| p.metadata.name)
        .collect()
}

/// The pod whose operator holds the Lease (its identity starts with the pod's name).
async fn lease_holder(ns: &TestNamespace, among: &[String]) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    let holder = leases.get_opt("kube-sts").await.ok()??.spec?.holder_identity?;
    among.iter().find(|p| holder.starts_with(p.as_str())).cloned()
}

#[tokio::test]
async fn two_replicas_with_leader_election_fail_over_when_the_leader_pod_is_deleted() {
    let release = Release::install(
        "leader",
        &sts_url_for_pods(),
        &["--set", "replicas=2", "--set", "leaderElection.enabled=true"],
    )
    .await;
    let (op, ns) = (&release.op, &release.tenant);
    let pods = eventually("two operator pods run", Duration::from_secs(180), || async {
        let pods = running_pods(op).await;
        (pods.len() == 2).then_some(pods)
    })
    .await;
    let leader = eventually("one of them holds the Lease", Duration::from_secs(60), || {
        lease_holder(op, &pods)
    })
    .await;
    // Both pods are Ready (Ready means "in the election": the standby counts, so that a
    // rolling update and a PodDisruptionBudget work); the leader reconciles.
    for pod in &pods {
        eventually(&format!("{pod} Ready"), Duration::from_secs(60), || {
            pod_ready(&op.client, &op.name, pod)
        })
        .await;
    }
    let role = issued_binding(ns).await;

    let out = kubectl(&["delete", "pod", "-n", &op.name, &leader, "--wait=false"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let successor = eventually("another pod holds the Lease", Duration::from_secs(120), || async {
        let others: Vec<String> = running_pods(op).await.into_iter().filter(|p| *p != leader).collect();
        lease_holder(op, &others).await
    })
    .await;
    assert_ne!(successor, leader);
    // The successor reconciles: a new binding is issued.
    ns.apply_ok(&binding_yaml("second", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "second", "True", "CredentialsIssued").await;
}

/// Rotations the consumer pod must run through.
const ROTATIONS: usize = 5;

/// The session lifetime the operator in the pod soak sees. It refreshes at half of it
/// (60 s before expiry); the kubelet (`syncFrequency` 10 s in the local environment) puts
/// the new key into the volume within about 20 s of the write, and the SDK reads
/// `credential_process` again 10 to 15 s before its key expires: about 25 s to spare.
const POD_SOAK_LIFETIME: Duration = Duration::from_secs(120);

/// Zero-downtime rotation in a real pod: the operator (a pod, installed with helm) sees
/// sessions of [`POD_SOAK_LIFETIME`] (its forwarder rewrites `<Expiration>`); the kubelet
/// swaps the Secret volume's `..data`; the consumer's SDK reads `credential_process` again
/// before its cached key expires. Its STS calls go through a forwarder of their own, which
/// records the key that signed each call and when.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_through_rotations_with_no_failed_call_and_never_an_expired_key() {
    let operator_sts = Forwarder::start_for_pods().await;
    operator_sts.session_lifetime(Some(POD_SOAK_LIFETIME));
    let release = Release::install("podsoak", &operator_sts.url(), &[]).await;
    let ns = &release.tenant;
    let log = SecretLog::start(ns);
    operator_pod(&release.op, None).await;
    issued_binding(ns).await;
    let consumer_sts = Forwarder::start_for_pods().await;
    ns.apply_ok(&consumer_pod("consumer", "app", "reports-app", &consumer_sts.url()));

    // The keys the consumer presented, in order, each once.
    let used = |exchanges: &[Exchange]| {
        let mut keys: Vec<String> = exchanges.iter().filter_map(Exchange::signing_key).collect();
        keys.dedup();
        keys
    };
    eventually(
        &format!("the consumer used {} keys", ROTATIONS + 1),
        Duration::from_secs(10 * 60),
        || async { (used(&consumer_sts.exchanges("GetCallerIdentity")).len() > ROTATIONS).then_some(()) },
    )
    .await;
    // The calls so far, once answered (the last may still be in flight).
    let count = consumer_sts.exchanges("GetCallerIdentity").len();
    let calls = eventually("every call so far answered", Duration::from_secs(30), || async {
        let calls: Vec<Exchange> = consumer_sts
            .exchanges("GetCallerIdentity")
            .into_iter()
            .take(count)
            .collect();
        calls.iter().all(|c| !c.answer.is_empty()).then_some(calls)
    })
    .await;
    let seen = log.keys("reports-app");
    assert_rotated_before_expiry("reports-app", &seen);

    // Every call answered, each signed with a key the Secret held, before that key expired.
    for call in &calls {
        assert!(call.answer_element("Arn").is_some(), "a failed call: {}", call.answer);
        let key = call.signing_key().expect("a signed call");
        let held = seen
            .iter()
            .find(|s| s.key == key)
            .unwrap_or_else(|| panic!("the consumer presented {key}, a key the Secret never held"));
        assert!(
            call.at < held.expiration,
            "the consumer presented {key} at {}, after it expired at {} (the Secret had it at {})",
            call.at,
            held.expiration,
            held.at
        );
    }
    // The keys were used in the order they were issued: each came through the volume.
    let issued: Vec<&String> = seen.iter().map(|s| &s.key).collect();
    let used = used(&calls);
    let positions: Vec<usize> = used
        .iter()
        .map(|k| issued.iter().position(|i| *i == k).unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "keys used out of order: {used:?} of {issued:?}"
    );
    // And the SDK saw no failure either (its own log, one line per call).
    let logged = consumer_calls(&ns.name, "consumer");
    assert!(
        logged.len() >= calls.len() - 1,
        "{} calls logged, {} made",
        logged.len(),
        calls.len()
    );
    let failed: Vec<&serde_json::Value> = logged.iter().filter(|c| c["ok"] != true).collect();
    assert!(failed.is_empty(), "the consumer logged failures: {failed:?}");
}

/// README "Upgrade and uninstall": `helm upgrade` with changed values replaces the operator's
/// pod, and the new one adopts the Secrets with no STS call and no write; `helm uninstall`
/// removes the operator and leaves the bindings and their Secrets. A pod using the Secret
/// keeps working through both.
#[tokio::test]
async fn helm_upgrade_and_uninstall_keep_the_credentials_a_running_pod_uses() {
    let sts = Forwarder::start_for_pods().await;
    let mut release = Release::install("upgrade", &sts.url(), &[]).await;
    let first = operator_pod(&release.op, None).await;
    let ns = &release.tenant;
    issued_binding(ns).await;
    wait_pod_reconciled(&first).await;
    let before = ns.secrets().get("reports-app").await.unwrap();
    ns.apply_ok(&consumer_pod("consumer", "app", "reports-app", &sts_url_for_pods()));
    let ok_calls = |ns: String| async move {
        let calls = consumer_calls(&ns, "consumer");
        calls.iter().filter(|c| c["ok"] == true).count()
    };
    eventually("the consumer's calls succeed", Duration::from_secs(120), || async {
        (ok_calls(ns.name.clone()).await > 0).then_some(())
    })
    .await;

    release.upgrade(&["--set", "logLevel=debug"]);
    let first_name = first.metadata.name.clone().unwrap();
    let second = operator_pod(&release.op, Some(&first_name)).await;
    let args = second.spec.as_ref().unwrap().containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        args.iter().any(|a| a == "--log-level=debug"),
        "the new value reached the pod: {args:?}"
    );
    wait_pod_reconciled(&second).await;
    assert_eq!(sts.count("AssumeRole"), 1, "the upgraded operator adopted the Secret");
    let after = ns.secrets().get("reports-app").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "and did not write it"
    );

    release.uninstall();
    let (op, ns) = (&release.op, &release.tenant);
    // The pods go by the garbage collector (Deployment, then ReplicaSet, then pods), which
    // lags by minutes while the whole suite churns objects (seen: over two minutes; 15 s
    // alone). Meanwhile the pod cannot act: its ServiceAccount is gone with the release.
    eventually("no operator pod is left", Duration::from_secs(300), || async {
        list_operator_pods(op).await.ok()?.is_empty().then_some(())
    })
    .await;
    assert!(
        ns.bindings().get_opt("reports").await.unwrap().is_some(),
        "the binding stays"
    );
    let kept = ns.secrets().get("reports-app").await.expect("the Secret stays");
    assert_eq!(kept.metadata.resource_version, before.metadata.resource_version);
    // The pod goes on calling with the credentials it has.
    let so_far = ok_calls(ns.name.clone()).await;
    eventually(
        "the consumer's calls go on succeeding",
        Duration::from_secs(60),
        || async { (ok_calls(ns.name.clone()).await > so_far + 2).then_some(()) },
    )
    .await;
    let failed: Vec<serde_json::Value> = consumer_calls(&ns.name, "consumer")
        .into_iter()
        .filter(|c| c["ok"] != true)
        .collect();
    assert!(failed.is_empty(), "the consumer logged failures: {failed:?}");
}

/// The chart's admission webhook as users get it: the apiserver calls it through its
/// Service (at an endpoint's pod IP). A pod that names only its ServiceAccount (and, for
/// the STS peer standing in for AWS, the STS endpoint) is stored with the binding's Secret
/// mounted and `AWS_CONFIG_FILE` and the region set, runs on the node, and its SDK acts as
/// the role.
#[tokio::test]
async fn the_charts_webhook_wires_the_secret_into_a_pod_that_names_only_its_service_account() {
    let release = Release::install("webhook", &sts_url_for_pods(), &[]).await;
    let tenant = &release.tenant;
    let region = &env().aws["AWS_REGION"];
    let role = issued_binding_with(tenant, &format!("  region: {region}\n")).await;

    let image = consumer_image();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "consumer"},
        "spec": {
            "serviceAccountName": "app",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": image,
                "imagePullPolicy": "Never",
                "env": [{"name": "AWS_ENDPOINT_URL_STS", "value": sts_url_for_pods()}],
            }],
        },
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(tenant.client.clone(), &tenant.name);
    // Until the webhook serves (its pods started, the caBundle in place, the binding in its
    // cache), the apiserver admits pods unchanged (failurePolicy Ignore): ask with dry runs,
    // until several in a row are wired (the apiserver picks one of two replicas each time).
    let dry_run = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let in_a_row = std::sync::Mutex::new(0);
    eventually("the webhook wires dry-run pods", Duration::from_secs(180), || async {
        let wired = pods.create(&dry_run, &pod).await.ok().is_some_and(|admitted| {
            admitted
                .spec
                .and_then(|s| s.volumes)
                .into_iter()
                .flatten()
                .any(|v| v.secret.and_then(|s| s.secret_name).as_deref() == Some("reports-app"))
        });
        let mut count = in_a_row.lock().unwrap();
        *count = if wired { *count + 1 } else { 0 };
        (*count >= 6).then_some(())
    })
    .await;
    let stored = pods
        .create(&Default::default(), &pod)
        .await
        .expect("the pod is created");
    let spec = stored.spec.unwrap();
    let container = &spec.containers[0];
    let env: std::collections::BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        env.get("AWS_CONFIG_FILE").map(String::as_str),
        Some("/var/run/secrets/kube-sts.io/config"),
        "{env:?}"
    );
    assert_eq!(env.get("AWS_REGION"), Some(region), "{env:?}");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/var/run/secrets/kube-sts.io")
        .expect("the Secret mounted");
    assert_eq!(mount.read_only, Some(true));
    assert!(mount.sub_path.is_none());

    assert_consumer_acts_as(&tenant.name, "consumer", &role).await;
}
