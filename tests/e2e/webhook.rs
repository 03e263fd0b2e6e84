//! The admission webhook (`kube-sts webhook`) against the real API server, which calls it
//! itself: each test runs a webhook process and a MutatingWebhookConfiguration of its own
//! that points at it by URL and selects only the test's namespaces (by a label), so other
//! tests sharing the cluster never see it. The webhook keeps the configuration's caBundle
//! current itself. There is no kubelet: pods are stored, never run.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Pod};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::harness::*;

/// The label that puts a namespace under a test's webhook configuration.
const SELECTOR_LABEL: &str = "kube-sts.io/e2e-webhook";
const MOUNT_PATH: &str = "/var/run/secrets/kube-sts.io";

/// A `kube-sts webhook` process.
pub struct Webhook {
    child: Option<Child>,
    pub log: PathBuf,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

/// How a test starts its webhook.
pub struct WebhookOptions<'a> {
    /// `--namespace` (None: all namespaces).
    pub namespace: Option<&'a str>,
    /// Namespace and name of the certificate Secret.
    pub secret: (&'a str, &'a str),
    /// The configuration whose caBundle it keeps.
    pub configuration: &'a str,
    pub extra: &'a [&'a str],
    pub kubeconfig: &'a Path,
}

impl Webhook {
    /// Starts the webhook; again on other ports when one was taken meanwhile.
    pub async fn start(options: &WebhookOptions<'_>) -> Self {
        for _ in 0..3 {
            let mut webhook = Self::spawn(options);
            let started = poll(Duration::from_secs(30), || {
                let logs = webhook.logs();
                let state = if logs.contains("Address already in use") {
                    Some(false)
                } else if logs.contains("serving /metrics") && logs.contains("webhook listening") {
                    Some(true)
                } else {
                    None
                };
                async move { state }
            })
            .await;
            if started != Some(false) {
                return webhook;
            }
            webhook.kill();
        }
        panic!("the webhook could not bind its ports three times");
    }

    fn spawn(options: &WebhookOptions<'_>) -> Self {
        let logs = env().repo.join(".e2e/logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = logs.join(format!("webhook-{}.log", unique(options.secret.0)));
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kube-sts"));
        command.arg("webhook");
        if let Some(ns) = options.namespace {
            command.args(["--namespace", ns]);
        }
        let child = command
            .args(["--webhook-addr", &addr.to_string()])
            .args(["--metrics-addr", &metrics_addr.to_string()])
            .args([
                "--tls-secret-namespace",
                options.secret.0,
                "--tls-secret",
                options.secret.1,
            ])
            .args(["--webhook-configuration", options.configuration])
            .args(["--cert-name", "127.0.0.1", "--shutdown-delay", "0s"])
            .args(["--log-format", "json", "--log-level", "kube_sts=debug,info"])
            .args(options.extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", options.kubeconfig)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("webhook starts");
        Webhook {
            child: Some(child),
            log,
            addr,
            metrics_addr,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}/mutate", self.addr)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        scrape(self.metrics_addr).await
    }

    /// The value of the counter or gauge `series` (`0` when absent).
    pub async fn metric(&self, series: &str) -> u64 {
        let prefix = format!("{series} ");
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or(0)
    }

    /// How many admissions ended with `outcome`.
    pub async fn admissions(&self, outcome: &str) -> u64 {
        let series = format!("kube_sts_webhook_admissions_total{{outcome=\"{outcome}\"}} ");
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the webhook did not stop on SIGTERM within 20 s");
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A MutatingWebhookConfiguration of the test's own, deleted at drop.
pub struct Configuration {
    pub name: String,
}

impl Drop for Configuration {
    fn drop(&mut self) {
        let _ = kubectl(
            &[
                "delete",
                "mutatingwebhookconfiguration",
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ],
            None,
        );
    }
}

/// The configuration `name`: one webhook per name in `webhooks`, each calling `url`, for
/// pods created in namespaces labelled `SELECTOR_LABEL=<selector>`, without a caBundle
/// (the webhook fills it in).
pub async fn configure(
    name: &str,
    webhooks: &[String],
    url: &str,
    selector: &str,
    failure_policy: &str,
) -> Configuration {
    let webhooks: Vec<Value> = webhooks
        .iter()
        .map(|w| {
            json!({
                "name": w,
                "clientConfig": {"url": url},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {SELECTOR_LABEL: selector}},
                "failurePolicy": failure_policy,
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
                "reinvocationPolicy": "IfNeeded",
            })
        })
        .collect();
    let conf: MutatingWebhookConfiguration =
        serde_json::from_value(json!({"metadata": {"name": name}, "webhooks": webhooks})).unwrap();
    Api::<MutatingWebhookConfiguration>::all(client().await)
        .create(&PostParams::default(), &conf)
        .await
        .expect("create the MutatingWebhookConfiguration");
    Configuration { name: name.into() }
}

/// Puts `namespace` under the configuration selecting `selector`.
pub async fn select_namespace(namespace: &str, selector: &str) {
    label_namespace(namespace, SELECTOR_LABEL, Some(selector)).await;
}

async fn label_namespace(namespace: &str, key: &str, value: Option<&str>) {
    let api = Api::<k8s_openapi::api::core::v1::Namespace>::all(client().await);
    api.patch(
        namespace,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {key: value}}})),
    )
    .await
    .expect("label the namespace");
}

/// A pod to admit; stored, never run: no scheduler has its `schedulerName`, so the local
/// node's kubelet never tries to start the hundreds of pods these tests create.
pub fn pod_json(name: &str, service_account: Option<&str>, extra_spec: Value, annotations: Value) -> Value {
    let mut spec = json!({
        "containers": [{"name": "app", "image": "registry.invalid/app"}],
        "schedulerName": "kube-sts-e2e-never",
    });
    if let Some(sa) = service_account {
        spec["serviceAccountName"] = json!(sa);
    }
    if let Value::Object(extra) = extra_spec {
        for (k, v) in extra {
            spec[k] = v;
        }
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": annotations}, "spec": spec})
}

pub async fn create_pod(namespace: &str, pod: &Value, dry_run: bool) -> Result<Pod, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client().await, namespace);
    let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
    api.create(
        &PostParams {
            dry_run,
            ..Default::default()
        },
        &pod,
    )
    .await
}

/// The Secret a pod got from the webhook (`None`: not injected).
pub fn injected_secret(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "kube-sts-credentials")?;
    volume.secret.as_ref()?.secret_name.clone()
}

fn env_of(container: &k8s_openapi::api::core::v1::Container) -> Vec<(String, String)> {
    container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

/// Waits until pods of `service_account` created in `namespace` come back injected (the API
/// server has seen the caBundle and calls the webhook); dry runs, nothing is stored.
pub async fn wait_effective(namespace: &str, service_account: &str) {
    eventually("the API server calls the webhook", Duration::from_secs(60), || async {
        let pod = pod_json("probe", Some(service_account), json!({}), json!({}));
        let created = create_pod(namespace, &pod, true).await.ok()?;
        injected_secret(&created).map(|_| ())
    })
    .await;
}

/// `kubectl create` of a pod: the stored pod and what kubectl printed to stderr (warnings).
fn kubectl_create(namespace: &str, pod: &Value) -> (Pod, String) {
    let out = kubectl(
        &["create", "-n", namespace, "-o", "json", "-f", "-"],
        Some(&pod.to_string()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kubectl create: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

/// The apiserver's count of calls to webhook `name` that failed and were ignored.
fn apiserver_fail_open(name: &str) -> u64 {
    let out = kubectl(&["get", "--raw", "/metrics"], None);
    assert!(out.status.success(), "apiserver /metrics");
    let text = String::from_utf8_lossy(&out.stdout);
    let label = format!("name=\"{name}\"");
    text.lines()
        .filter(|l| l.starts_with("apiserver_admission_webhook_fail_open_count{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn binding(name: &str, subjects: &[&str], extra: &str) -> String {
    binding_yaml(name, "arn:aws:iam::123456789012:role/webhook", subjects, extra)
}

/// A test namespace under a fresh webhook configuration and a running webhook.
struct Setup {
    ns: TestNamespace,
    webhook: Webhook,
    configuration: Configuration,
    webhook_names: Vec<String>,
    secret: String,
}

async fn setup(prefix: &str, all_namespaces: bool, webhooks: usize, failure_policy: &str, extra: &[&str]) -> Setup {
    let ns = TestNamespace::new(prefix).await;
    let conf_name = format!("e2e-{}", ns.name);
    let secret = "webhook-tls".to_string();
    let webhook = Webhook::start(&WebhookOptions {
        namespace: (!all_namespaces).then_some(ns.name.as_str()),
        secret: (&ns.name, &secret),
        configuration: &conf_name,
        extra,
        kubeconfig: &env().kubeconfig,
    })
    .await;
    let webhook_names: Vec<String> = (0..webhooks).map(|i| format!("w{i}.{}.kube-sts.io", ns.name)).collect();
    let configuration = configure(&conf_name, &webhook_names, &webhook.url(), &ns.name, failure_policy).await;
    select_namespace(&ns.name, &ns.name).await;
    Setup {
        ns,
        webhook,
        configuration,
        webhook_names,
        secret,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_injects_the_binding_into_pods_of_its_subjects() {
    // All namespaces: the webhook sees another namespace's binding of the same name too.
    // Two webhooks in the configuration: the second call is a second admission of what the
    // first made of the pod.
    let s = setup("wh", true, 2, "Ignore", &[]).await;
    let ns = &s.ns;
    for sa in ["app", "two", "three"] {
        ns.service_account(sa).await;
    }
    ns.apply_ok(
        &[
            binding("reports", &["app"], "  region: eu-west-1\n"),
            binding("billing", &["two"], ""),
            binding("audit", &["two"], "  secret: {profile: audit, mountPath: /aws}\n"),
            binding("dflt", &["default"], ""),
        ]
        .join("---\n"),
    );
    let other = TestNamespace::new("wh-other").await;
    other.service_account("app").await;
    select_namespace(&other.name, &ns.name).await;
    wait_effective(&ns.name, "app").await;

    // A pod with only its ServiceAccount (and an init container) is stored wired in.
    let pod = pod_json(
        "reports",
        Some("app"),
        json!({"initContainers": [{"name": "init", "image": "registry.invalid/init"}]}),
        json!({}),
    );
    let stored = create_pod(&ns.name, &pod, false).await.unwrap();
    let spec = stored.spec.as_ref().unwrap();
    assert_eq!(injected_secret(&stored).as_deref(), Some("reports-app"));
    let ours: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.name == "kube-sts-credentials")
        .collect();
    assert_eq!(ours.len(), 1, "one volume after two admissions: {:?}", spec.volumes);
    for c in spec.init_containers.iter().flatten().chain(&spec.containers) {
        let mounts: Vec<_> = c
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.name == "kube-sts-credentials")
            .collect();
        assert_eq!(mounts.len(), 1, "{}: {mounts:?}", c.name);
        assert_eq!(mounts[0].mount_path, MOUNT_PATH);
        assert_eq!((mounts[0].read_only, mounts[0].sub_path.as_deref()), (Some(true), None));
        assert_eq!(
            env_of(c),
            [
                ("AWS_CONFIG_FILE".to_string(), format!("{MOUNT_PATH}/config")),
                ("AWS_REGION".to_string(), "eu-west-1".to_string()),
                ("AWS_DEFAULT_REGION".to_string(), "eu-west-1".to_string()),
            ],
            "{}",
            c.name
        );
    }
    assert!(
        s.webhook.admissions("unchanged").await >= 1,
        "the second webhook call changed nothing"
    );

    // The stored pod admitted once more (a copy of its spec) comes back exactly as it was.
    let copy = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reports-copy"}, "spec": stored.spec});
    let again = create_pod(&ns.name, &copy, false).await.unwrap();
    assert_eq!(again.spec, stored.spec, "a second admission changes nothing");

    // The default ServiceAccount, a custom profile and mount path.
    let dflt = create_pod(&ns.name, &pod_json("dflt", None, json!({}), json!({})), false)
        .await
        .unwrap();
    assert_eq!(injected_secret(&dflt).as_deref(), Some("dflt-default"));

    // Several bindings: admitted unchanged with a warning, until the pod names one.
    let (ambiguous, warnings) = kubectl_create(&ns.name, &pod_json("ambiguous", Some("two"), json!({}), json!({})));
    assert_eq!(injected_secret(&ambiguous), None);
    assert!(
        warnings.contains("Warning: kube-sts: ServiceAccount two is a subject of several AWSRoleBindings (audit, billing); name one in the annotation kube-sts.io/binding"),
        "{warnings}"
    );
    let named = pod_json("named", Some("two"), json!({}), json!({"kube-sts.io/binding": "audit"}));
    let named = create_pod(&ns.name, &named, false).await.unwrap();
    assert_eq!(injected_secret(&named).as_deref(), Some("audit-two"));
    assert_eq!(
        env_of(&named.spec.as_ref().unwrap().containers[0]),
        [
            ("AWS_CONFIG_FILE".to_string(), "/aws/config".to_string()),
            ("AWS_PROFILE".to_string(), "audit".to_string()),
        ]
    );

    // A container that mounts something else at the path is left alone, with a warning.
    let busy = pod_json(
        "busy",
        Some("app"),
        json!({"volumes": [{"name": "own", "emptyDir": {}}], "containers": [
            {"name": "app", "image": "registry.invalid/app", "volumeMounts": [{"name": "own", "mountPath": MOUNT_PATH}]},
            {"name": "sidecar", "image": "registry.invalid/sidecar"}]}),
        json!({}),
    );
    let (busy, warnings) = kubectl_create(&ns.name, &busy);
    assert!(
        warnings.contains(
            "kube-sts: container app already mounts volume own at /var/run/secrets/kube-sts.io; left unchanged"
        ),
        "{warnings}"
    );
    let containers = &busy.spec.as_ref().unwrap().containers;
    assert_eq!(env_of(&containers[0]), []);
    assert_eq!(env_of(&containers[1]).len(), 3);

    // The AWS variables are one group: a container that sets one itself, or has envFrom,
    // gets the mount and none of ours, with a warning saying why.
    let own = pod_json(
        "own-env",
        Some("app"),
        json!({"containers": [
            {"name": "app", "image": "registry.invalid/app", "env": [{"name": "AWS_REGION", "value": "us-east-1"}]},
            {"name": "sidecar", "image": "registry.invalid/sidecar", "envFrom": [{"configMapRef": {"name": "settings"}}]}]}),
        json!({}),
    );
    let (own, warnings) = kubectl_create(&ns.name, &own);
    assert_eq!(injected_secret(&own).as_deref(), Some("reports-app"));
    let containers = &own.spec.as_ref().unwrap().containers;
    assert_eq!(
        env_of(&containers[0]),
        [("AWS_REGION".to_string(), "us-east-1".to_string())]
    );
    assert_eq!(env_of(&containers[1]), []);
    for c in containers {
        assert!(
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "kube-sts-credentials" && m.mount_path == MOUNT_PATH),
            "{}: {:?}",
            c.name,
            c.volume_mounts
        );
    }
    for why in [
        "container app sets AWS_REGION itself: none of the AWS_* variables added",
        "container sidecar has envFrom, which may set AWS_* variables: none of the AWS_* variables added",
    ] {
        assert!(warnings.contains(why), "{why}: {warnings}");
    }

    // Opt-outs: the pod's annotation, and the namespace's label (from the webhook's cache).
    let off = pod_json("off", Some("app"), json!({}), json!({"kube-sts.io/inject": "false"}));
    assert_eq!(injected_secret(&create_pod(&ns.name, &off, false).await.unwrap()), None);
    label_namespace(&ns.name, "kube-sts.io/inject", Some("false")).await;
    eventually("the namespace label is honoured", Duration::from_secs(30), || async {
        let probe = create_pod(&ns.name, &pod_json("probe", Some("app"), json!({}), json!({})), true)
            .await
            .ok()?;
        injected_secret(&probe).is_none().then_some(())
    })
    .await;
    let unlabelled = create_pod(&ns.name, &pod_json("ns-off", Some("app"), json!({}), json!({})), false).await;
    assert_eq!(injected_secret(&unlabelled.unwrap()), None);
    label_namespace(&ns.name, "kube-sts.io/inject", None).await;
    wait_effective(&ns.name, "app").await;

    // A pod cannot name a binding its ServiceAccount is no subject of, nor one of another
    // namespace.
    let foreign = pod_json(
        "foreign",
        Some("three"),
        json!({}),
        json!({"kube-sts.io/binding": "reports"}),
    );
    let (foreign, warnings) = kubectl_create(&ns.name, &foreign);
    assert_eq!(injected_secret(&foreign), None);
    assert!(
        warnings.contains("AWSRoleBinding reports does not bind ServiceAccount three"),
        "{warnings}"
    );
    let elsewhere = create_pod(
        &other.name,
        &pod_json("elsewhere", Some("app"), json!({}), json!({})),
        false,
    )
    .await;
    assert_eq!(
        injected_secret(&elsewhere.unwrap()),
        None,
        "ns {}'s binding of app",
        ns.name
    );
    let named_elsewhere = pod_json(
        "named-elsewhere",
        Some("app"),
        json!({}),
        json!({"kube-sts.io/binding": "reports"}),
    );
    let (named_elsewhere, warnings) = kubectl_create(&other.name, &named_elsewhere);
    assert_eq!(injected_secret(&named_elsewhere), None);
    assert!(
        warnings.contains(&format!(
            "kube-sts: no AWSRoleBinding reports in namespace {}",
            other.name
        )),
        "{warnings}"
    );

    for outcome in ["injected", "unchanged", "not_bound", "opted_out", "refused"] {
        assert!(s.webhook.admissions(outcome).await >= 1, "outcome {outcome} counted");
    }
    assert_eq!(s.webhook.admissions("invalid").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_admits_pods_unchanged_and_the_api_server_counts_it() {
    let mut s = setup("wh-down", false, 1, "Ignore", &[]).await;
    let ns = &s.ns;
    ns.service_account("app").await;
    ns.apply_ok(&binding("reports", &["app"], ""));
    wait_effective(&ns.name, "app").await;
    let before = apiserver_fail_open(&s.webhook_names[0]);

    assert!(s.webhook.stop().success(), "the webhook exits 0 on SIGTERM");
    let pod = create_pod(
        &ns.name,
        &pod_json("while-down", Some("app"), json!({}), json!({})),
        false,
    )
    .await
    .expect("a pod is created while the webhook is down");
    assert_eq!(injected_secret(&pod), None);
    assert_eq!(
        apiserver_fail_open(&s.webhook_names[0]),
        before + 1,
        "the failed call is counted"
    );

    // Started again on the same Secret: it serves the certificate it has (no new one).
    let secret = ns.secrets().get(&s.secret).await.unwrap();
    let restarted = Webhook::start(&WebhookOptions {
        namespace: Some(&ns.name),
        secret: (&ns.name, &s.secret),
        configuration: &s.configuration.name,
        extra: &[],
        kubeconfig: &env().kubeconfig,
    })
    .await;
    let conf = Api::<MutatingWebhookConfiguration>::all(client().await);
    let url = restarted.url();
    conf.patch(
        &s.configuration.name,
        &PatchParams::default(),
        &Patch::Json::<()>(
            serde_json::from_value(json!([{"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": url}]))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    wait_effective(&ns.name, "app").await;
    let after = ns.secrets().get(&s.secret).await.unwrap();
    assert_eq!(
        after.data, secret.data,
        "the restarted webhook serves the stored certificate"
    );
    assert!(!restarted.logs().contains("issued a certificate"));
}

/// A TLS connection to the webhook from a client that trusts what `bundle` holds.
async fn tls_connect(
    addr: SocketAddr,
    bundle: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in kube_sts::webhook::certs::ders(&String::from_utf8_lossy(bundle)) {
        roots.add(der.into()).map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// A client that trusts what `bundle` holds: the served certificate, if the handshake passes.
async fn handshake(addr: SocketAddr, bundle: &[u8]) -> Result<Vec<u8>, String> {
    let tls = tls_connect(addr, bundle).await?;
    let (_, session) = tls.get_ref();
    Ok(session.peer_certificates().ok_or("no certificate")?[0].to_vec())
}

/// The caBundle of the first webhook of the configuration `name`.
async fn published_bundle(name: &str) -> Vec<u8> {
    let conf = Api::<MutatingWebhookConfiguration>::all(client().await)
        .get(name)
        .await
        .unwrap();
    conf.webhooks.unwrap()[0]
        .client_config
        .ca_bundle
        .clone()
        .expect("a caBundle")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_closes_a_client_that_trickles_its_request_and_keeps_admitting() {
    // failurePolicy Fail: an admission the webhook does not answer refuses the pod.
    let s = setup("wh-slow", false, 1, "Fail", &[]).await;
    let ns = &s.ns;
    ns.service_account("app").await;
    ns.apply_ok(&binding("reports", &["app"], ""));
    wait_effective(&ns.name, "app").await;

    // A request head promising a body of 1 MB, then a byte a second: days of it.
    let total = 1_000_000;
    let tls = tls_connect(s.webhook.addr, &published_bundle(&s.configuration.name).await)
        .await
        .unwrap();
    let (mut reader, mut writer) = tokio::io::split(tls);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {total}\r\n\r\n{{"
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    writer.flush().await.unwrap();
    let started = Instant::now();
    let trickling = tokio::spawn(async move {
        let mut sent = 1;
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                read = reader.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { return sent },
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if writer.write_all(b" ").await.is_err() || writer.flush().await.is_err() {
                        return sent;
                    }
                    sent += 1;
                }
            }
        }
    });

    // Meanwhile pods are admitted and injected as ever.
    for i in 0..3 {
        let pod = create_pod(
            &ns.name,
            &pod_json(&format!("p-{i}"), Some("app"), json!({}), json!({})),
            false,
        )
        .await
        .expect("admitted while a client trickles");
        assert_eq!(injected_secret(&pod).as_deref(), Some("reports-app"));
    }
    let sent = tokio::time::timeout(Duration::from_secs(120), trickling)
        .await
        .expect("the webhook closes the trickling client")
        .unwrap();
    assert!(sent < total, "closed after {sent} of {total} bytes");
    println!("trickling client closed after {:?} ({sent} bytes)", started.elapsed());
    assert_eq!(
        s.webhook.admissions("invalid").await,
        1,
        "the cut request counts as unreadable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_certificate_rotates_without_a_rejected_admission() {
    // The shortest lifetimes the webhook accepts: a generation lives 4 min and is staged
    // after 160 s; the new CA is trusted for the minimum overlap, 1 min, before it is
    // served; the old CA leaves the bundle when its certificate expires (240 s). One whole
    // rotation, every step of it. failurePolicy Fail: a failed call rejects the pod.
    let s = setup(
        "wh-rotate",
        false,
        1,
        "Fail",
        &["--cert-validity", "4m", "--cert-overlap", "1m"],
    )
    .await;
    let ns = &s.ns;
    ns.service_account("app").await;
    ns.apply_ok(&binding("reports", &["app"], ""));
    wait_effective(&ns.name, "app").await;

    let started = Instant::now();
    let (mut created, mut failed, mut unmutated) = (0, Vec::new(), 0);
    let mut served = BTreeSet::new();
    let (mut most_cas, mut cas) = (0, 0);
    let retired = || s.webhook.logs().contains("dropped the previous CA from the caBundle");
    // Until the second certificate is served and the first CA has left the bundle, with a
    // deadline.
    while !(served.len() >= 2 && retired() && cas == 1) && started.elapsed() < Duration::from_secs(420) {
        match create_pod(
            &ns.name,
            &pod_json(&format!("p-{created}"), Some("app"), json!({}), json!({})),
            false,
        )
        .await
        {
            Ok(pod) if injected_secret(&pod).is_some() => {}
            Ok(_) => unmutated += 1,
            Err(e) => failed.push(e.to_string()),
        }
        created += 1;
        // What the API server would see right now: the caBundle, and the certificate served.
        let bundle = published_bundle(&s.configuration.name).await;
        cas = kube_sts::webhook::certs::ders(&String::from_utf8_lossy(&bundle)).len();
        most_cas = most_cas.max(cas);
        match handshake(s.webhook.addr, &bundle).await {
            Ok(cert) => {
                served.insert(cert);
            }
            Err(e) => failed.push(format!("handshake with the published caBundle: {e}")),
        }
        // A steady load of about two pods a second, not a wait for anything.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(failed.is_empty(), "{} of {created} failed: {failed:?}", failed.len());
    assert_eq!(unmutated, 0, "every pod was injected");
    let log = s.webhook.log.display();
    assert!(
        served.len() >= 2,
        "two certificates served in {:?} ({} seen); log {log}",
        started.elapsed(),
        served.len(),
    );
    assert_eq!(most_cas, 2, "old and new CA were trusted together during the overlap");
    assert!(retired() && cas == 1, "the old CA left the bundle; log {log}");
    let logs = s.webhook.logs();
    for step in [
        "staged the next certificate",
        "switched to the staged certificate",
        "dropped the previous CA from the caBundle",
    ] {
        assert!(logs.contains(step), "{step}: log {log}");
    }
    assert_eq!(
        s.webhook.metric("kube_sts_webhook_certificate_failures_total").await,
        0,
        "no failed attempt to keep the certificate (e.g. a patch on a stale configuration); log {log}"
    );
    println!("{created} pods created across a rotation in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_never_mounts_the_secret_of_another_binding() {
    let s = setup("wh-thief", false, 1, "Ignore", &[]).await;
    let ns = &s.ns;
    ns.service_account("app").await;
    ns.service_account("three").await;
    let role = create_role(&unique("wh"), &operator_arn(), None, true);
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &["--require-grants=false"]);
    ns.apply_ok(&binding_yaml("reports", &role, &["app"], ""));
    wait_ready(&ns.bindings(), "reports", "True", "CredentialsIssued").await;
    // A hostile binding names the Secret of `reports` for a ServiceAccount `reports` does not
    // bind; the operator refuses to write it, and the webhook to mount it.
    ns.apply_ok(&binding_yaml(
        "thief",
        &role,
        &["three"],
        "  secret: {name: reports-app}\n",
    ));
    // Waited for here rather than with `wait_ready`: a timeout shows what the operator wrote.
    let refused = poll(Duration::from_secs(60), || async {
        ready(&ns.bindings(), "thief")
            .await
            .filter(|(s, r, _)| s == "False" && r == "SecretConflict")
    })
    .await;
    if refused.is_none() {
        let thief = ns.bindings().get("thief").await.unwrap();
        let secret = ns.secrets().get("reports-app").await.unwrap();
        panic!(
            "the operator did not report SecretConflict for thief within 60 s: generation {:?}, status {:?}; Secret reports-app owned by {:?}",
            thief.metadata.generation, thief.status, secret.metadata.owner_references
        );
    }
    wait_effective(&ns.name, "app").await;

    let (pod, warnings) = kubectl_create(&ns.name, &pod_json("thief", Some("three"), json!({}), json!({})));
    assert_eq!(injected_secret(&pod), None);
    assert!(
        warnings.contains("kube-sts: AWSRoleBinding thief reports SecretConflict: Secret reports-app is not its own"),
        "{warnings}"
    );
    let named = pod_json(
        "named",
        Some("three"),
        json!({}),
        json!({"kube-sts.io/binding": "reports"}),
    );
    let (named, warnings) = kubectl_create(&ns.name, &named);
    assert_eq!(injected_secret(&named), None);
    assert!(
        warnings.contains("AWSRoleBinding reports does not bind ServiceAccount three"),
        "{warnings}"
    );
    // The rightful subject gets it.
    let pod = create_pod(&ns.name, &pod_json("app", Some("app"), json!({}), json!({})), false)
        .await
        .unwrap();
    assert_eq!(injected_secret(&pod).as_deref(), Some("reports-app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_container_gets_the_roles_identity_from_sts() {
    // No kubelet here: the test does its part. It mounts the Secret where the injected
    // volumeMount says and runs boto3 with exactly the environment the webhook gave the
    // container (plus the STS peer's endpoint), as the container would.
    let s = setup("wh-sts", false, 1, "Ignore", &[]).await;
    let ns = &s.ns;
    ns.service_account("app").await;
    let role = create_role(&unique("wh"), &operator_arn(), None, true);
    let sts = Forwarder::start().await;
    let _operator = Operator::start(&ns.name, &sts, &["--require-grants=false"]);
    let volume = tempfile::tempdir().unwrap();
    let extra = format!(
        "  region: {}\n  secret: {{mountPath: {}}}\n",
        env().aws["AWS_REGION"],
        volume.path().display()
    );
    ns.apply_ok(&binding_yaml("reports", &role, &["app"], &extra));
    wait_ready(&ns.bindings(), "reports", "True", "CredentialsIssued").await;
    wait_effective(&ns.name, "app").await;

    let pod = create_pod(&ns.name, &pod_json("app", Some("app"), json!({}), json!({})), false)
        .await
        .unwrap();
    let container = &pod.spec.as_ref().unwrap().containers[0];
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "kube-sts-credentials")
        .expect("the volume is mounted");
    assert_eq!(mount.mount_path, volume.path().display().to_string());
    let secret = ns.secrets().get(&injected_secret(&pod).unwrap()).await.unwrap();
    for (key, value) in secret.data.unwrap() {
        std::fs::write(volume.path().join(key), value.0).unwrap();
    }
    let out = Command::new(&env().python)
        .args([
            "-c",
            "import boto3; print(boto3.client('sts').get_caller_identity()['Arn'])",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env_of(container))
        .env("AWS_ENDPOINT_URL_STS", &env().aws["AWS_ENDPOINT_URL_STS"])
        .output()
        .unwrap();
    assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
    let role_name = role.rsplit('/').next().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("arn:aws:sts::{}:assumed-role/{role_name}/{}.app", account(), ns.name)
    );
}
