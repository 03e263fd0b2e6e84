//! `make bench`: throughput, memory, rest and restart figures for kube-sts against the local
//! control plane and STS peer (`make up`). Figures are printed, never asserted.
//!
//! Run through `e2e/scripts/bench.sh`, which starts the environment, installs the CRDs and
//! builds `kube-sts` and this example with `--release`. In one run, in this order:
//!
//! 1. `BENCH_BINDINGS` (1000) bindings, one ServiceAccount subject each, to Ready, six times,
//!    each in a namespace of its own: a bare client, then a release operator (`--namespace`)
//!    at its default flags and at tuned flags (`--sts-qps 200 --sts-burst 200
//!    --concurrency 32`), with the bindings created before the operator starts (timed from
//!    the process start) and while it runs (timed from the first create), then the bare
//!    client again; every operator time is also given as a ratio to the mean of the two bare
//!    runs. The bare client does one binding's minimum work: one signed AssumeRole (the
//!    operator's request, with its identity, through the same kind of forwarder to the same
//!    STS peer), one Secret create and one server-side apply of `status`, with 32 bindings in
//!    flight (the tuned concurrency). A third bare run adds the request the operator makes
//!    beyond that minimum (an Event, which the operator creates in the background), waiting
//!    for it, to show what it costs; a
//!    fourth works on each binding as soon as the driver's create of it is answered, the
//!    creates running beside it as they do beside an operator whose bindings are created
//!    while it runs (those runs are given as a ratio to it as well). Time to Ready is seen
//!    through a watch.
//! 2. Peak RSS (`VmHWM`) of the tuned operator at `BENCH_BINDINGS`, and again after more
//!    bindings were added to the same namespace up to `BENCH_LARGE` (10000, or as many as
//!    the time budget allows; the table says how many).
//! 3. At rest at that size, every binding fresh: for `BENCH_REST_SECONDS` (600: longer
//!    than the longest life of a watch, 300 to 599 s, so every watch is renewed in it) the apiserver requests the operator causes and its CPU, then as long with the
//!    operator stopped (the idle cluster). Read from kube-apiserver's own `/metrics`: the operator's
//!    requests exactly, through a FlowSchema of its own
//!    (`apiserver_flowcontrol_dispatched_requests_total`), and `apiserver_request_total`
//!    over the window minus the idle window (which other clients of a shared environment
//!    make noisy).
//! 4. A restart at that size: start again, wait for `/readyz` and for the reconcile count
//!    to settle; STS calls counted at the wire, the operator's `kube_sts_api_writes_total`
//!    (both expected 0) and how many objects got a new resourceVersion.
//! 5. `BENCH_NOISE_SECRETS` (20000) small unlabelled Secrets in `bench-<id>-noise`, then a
//!    fresh operator watching all namespaces: its peak RSS once synced and settled.
//!
//! Every operator (and the bare client) runs as a ServiceAccount that may read everywhere but
//! write only in the bench's namespaces, so other people's bindings in a shared cluster are
//! left alone (they are counted, and their failing reconciles show in the log summary), and
//! so that the apiserver can count its requests apart from everyone else's.
//!
//! Env: BENCH_BINDINGS, BENCH_LARGE, BENCH_NOISE_SECRETS, BENCH_REST_SECONDS,
//! BENCH_CONCURRENCY (32 requests in flight for the driver's creates and the bare client),
//! BENCH_BUDGET_SECONDS (1560: the large phase stops adding bindings when the rest would not
//! fit), BENCH_RESERVE_SECONDS (time kept for the restart and noise phases after the large
//! one, 180; the rest windows come on top), BENCH_RESULTS (also write the table as TSV
//! there), KUBE_STS_BIN (default: the `kube-sts` built next to this example).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt, TryStreamExt, stream};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{Namespace, Secret, ServiceAccount},
        events::v1::Event,
        flowcontrol::v1::FlowSchema,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use kube_sts::{
    conditions::{self, DEGRADED, READY, SubjectOutcome},
    crd::{
        AWSRoleBinding, AWSRoleBindingSpec, AWSRoleBindingStatus, AWSRoleGrant, AWSRoleGrantSpec, Subject,
        SubjectStatus,
    },
    events::{EventType, Publisher},
    plan::{self, IssueSettings, Resolved},
    render::{self, Credentials, MANAGED_BY, MANAGED_BY_LABEL},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Label on everything the bench creates, so `bench.sh` can clean up after a failed run.
const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "kube-sts-bench");
const BASELINE_MANAGER: &str = "kube-sts-bench";
/// Reconciles are settled when their count has not moved (beyond retries of failing
/// bindings) for this long.
const SETTLE_QUIET: Duration = Duration::from_secs(5);

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn read_env_file(path: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}; start the environment with `make up`", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Progress on stderr, with the time since the bench started.
macro_rules! say {
    ($bench:expr, $($arg:tt)*) => {
        eprintln!("[bench {:>6.1}s] {}", $bench.started.elapsed().as_secs_f64(), format!($($arg)*))
    };
}

/// The figures, printed as a table at the end.
#[derive(Default)]
struct Results {
    rows: Vec<(String, String, String)>,
}

impl Results {
    fn add(&mut self, section: &str, metric: impl Into<String>, value: impl Into<String>) {
        let (metric, value) = (metric.into(), value.into());
        eprintln!("  => {section} | {metric}: {value}");
        self.rows.push((section.into(), metric, value));
    }

    fn print(&self) {
        let w0 = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = self.rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        let mut last = "";
        for (section, metric, value) in &self.rows {
            let shown = if section == last { "" } else { section.as_str() };
            println!("{shown:<w0$}  {metric:<w1$}  {value}");
            last = section;
        }
    }

    fn write_tsv(&self, path: &Path) {
        let text: String = self.rows.iter().map(|(s, m, v)| format!("{s}\t{m}\t{v}\n")).collect();
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// Who the operators and the bare client are to the apiserver (see
/// [`Bench::operator_identity`]).
struct Identity {
    kubeconfig: PathBuf,
    client: Client,
    flow_schema: String,
}

/// Requests kube-apiserver counted: all of them, and the operator identity's.
#[derive(Debug, Default, Clone, Copy)]
struct ApiCounts {
    all: f64,
    operator: f64,
}

impl std::ops::Sub for ApiCounts {
    type Output = ApiCounts;
    fn sub(self, earlier: ApiCounts) -> ApiCounts {
        ApiCounts {
            all: self.all - earlier.all,
            operator: self.operator - earlier.operator,
        }
    }
}

/// The operator's flags in a run. Tuned is what a large installation would set; default is
/// no flag at all (what `kube-sts run` and the chart start with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flags {
    Default,
    Tuned,
}

const TUNED: &[&str] = &["--sts-qps", "200", "--sts-burst", "200", "--concurrency", "32"];

impl Flags {
    fn args(self) -> &'static [&'static str] {
        match self {
            Flags::Default => &[],
            Flags::Tuned => TUNED,
        }
    }

    fn describe(self) -> String {
        match self {
            Flags::Default => "default flags".into(),
            Flags::Tuned => format!("tuned ({})", TUNED.join(" ")),
        }
    }
}

/// When a run's bindings are created: all before the operator starts (timed from the
/// process start), or while it runs (timed from the first create).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Created {
    Before,
    While,
}

struct Bench {
    started: Instant,
    deadline: Instant,
    repo: PathBuf,
    kubeconfig: PathBuf,
    aws: HashMap<String, String>,
    operator_bin: PathBuf,
    client: Client,
    id: String,
    concurrency: usize,
}

impl Bench {
    async fn new() -> Self {
        let started = Instant::now();
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let kubeconfig = std::env::var_os("KUBECONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join(".e2e/kubeconfig"));
        let config = Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig).expect("kubeconfig readable; run `make up`"),
            &KubeConfigOptions::default(),
        )
        .await
        .expect("kubeconfig valid");
        let operator_bin = std::env::var_os("KUBE_STS_BIN").map(PathBuf::from).unwrap_or_else(|| {
            // target/<profile>/examples/bench -> target/<profile>/kube-sts
            let exe = std::env::current_exe().expect("own path");
            exe.parent()
                .and_then(Path::parent)
                .expect("examples dir")
                .join("kube-sts")
        });
        assert!(
            operator_bin.exists(),
            "{} not found: `cargo build --release` first (or set KUBE_STS_BIN)",
            operator_bin.display()
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Bench {
            started,
            deadline: started + Duration::from_secs(env_usize("BENCH_BUDGET_SECONDS", 1560) as u64),
            aws: read_env_file(&repo.join(".e2e/aws.env")),
            kubeconfig,
            operator_bin,
            client: Client::try_from(config).expect("client"),
            id: format!("{:06x}", (nanos / 1000) & 0xff_ffff),
            concurrency: env_usize("BENCH_CONCURRENCY", 32).max(1),
            repo,
        }
    }

    /// `seconds` from now, but not so late that cleanup (up to 90 s) overruns the budget.
    fn phase_deadline(&self, seconds: u64) -> Instant {
        let wanted = Instant::now() + Duration::from_secs(seconds);
        let latest = self
            .deadline
            .checked_sub(Duration::from_secs(90))
            .unwrap_or(self.deadline);
        wanted.min(latest.max(Instant::now() + Duration::from_secs(15)))
    }

    fn logs_dir(&self) -> PathBuf {
        let dir = self.repo.join(".e2e/logs");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// An IAM role in the STS peer that trusts the operator (as the tests create them).
    fn create_role(&self, name: &str) -> String {
        let venv = Command::new("bash")
            .arg(self.repo.join("e2e/scripts/sts-venv.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("sts-venv.sh runs");
        assert!(venv.status.success(), "sts-venv.sh failed");
        let venv = String::from_utf8_lossy(&venv.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        let out = Command::new(Path::new(&venv).join("bin/python"))
            .arg(self.repo.join("e2e/sts/iam.py"))
            .args([
                "create-role",
                "--name",
                name,
                "--principal",
                &self.aws["KUBE_STS_OPERATOR_ARN"],
            ])
            .envs(read_env_file(&self.repo.join(".e2e/aws-admin.env")))
            .output()
            .expect("iam.py runs");
        assert!(
            out.status.success(),
            "create-role: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    async fn create_namespace(&self, name: &str) {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(PART_OF.0.into(), PART_OF.1.into())])),
                ..Default::default()
            },
            ..Default::default()
        };
        create_all(&Api::<Namespace>::all(self.client.clone()), vec![ns], 1).await;
    }

    async fn create_service_accounts(&self, namespace: &str, names: &[String]) {
        let sas = names
            .iter()
            .map(|n| ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(n.clone()),
                    ..Default::default()
                },
                ..Default::default()
            })
            .collect();
        create_all(&Api::namespaced(self.client.clone(), namespace), sas, self.concurrency).await;
    }

    /// Creates the bindings; returns when each create was answered, by name.
    async fn create_bindings_timed(&self, namespace: &str, role: &str, names: &[String]) -> HashMap<String, Instant> {
        let bindings = names.iter().map(|n| binding(n, role)).collect();
        create_all_timed(
            &Api::namespaced(self.client.clone(), namespace),
            bindings,
            self.concurrency,
        )
        .await
        .into_iter()
        .map(|(b, at)| (b.name_any(), at))
        .collect()
    }

    async fn create_bindings(&self, namespace: &str, role: &str, names: &[String]) -> Vec<AWSRoleBinding> {
        let bindings = names.iter().map(|n| binding(n, role)).collect();
        create_all(
            &Api::namespaced(self.client.clone(), namespace),
            bindings,
            self.concurrency,
        )
        .await
    }

    /// The identity every operator and the bare client run as: a ServiceAccount in `home`
    /// that may read everywhere (as the chart's ClusterRole allows) and write only where
    /// [`Bench::allow_writes`] lets it (an operator watching all namespaces of a shared
    /// cluster must not touch other people's bindings and Secrets), and a FlowSchema that
    /// makes the apiserver count its requests apart from everyone else's. The FlowSchema
    /// sends them to the `exempt` priority level, as the admin's requests are: no queueing
    /// that the admin identity would not see either.
    async fn operator_identity(&self, home: &str) -> Identity {
        let name = format!("kube-sts-bench-{}", self.id);
        let labels = json!({PART_OF.0: PART_OF.1});
        let read: ClusterRole = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "rules": [
                {"apiGroups": ["kube-sts.io"], "resources": ["awsrolebindings", "awsrolegrants"], "verbs": ["list", "watch"]},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["serviceaccounts", "namespaces"], "verbs": ["list", "watch"]},
            ],
        }))
        .expect("ClusterRole");
        let subject = json!([{"kind": "ServiceAccount", "name": "operator", "namespace": home}]);
        let read_binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": subject,
        }))
        .expect("ClusterRoleBinding");
        let flow_schema: FlowSchema = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                // Before the built-in `service-accounts` (9000); the `exempt` schema (1)
                // matches only system:masters.
                "matchingPrecedence": 1000,
                "priorityLevelConfiguration": {"name": "exempt"},
                "rules": [{
                    "subjects": [{"kind": "ServiceAccount", "serviceAccount": {"name": "operator", "namespace": home}}],
                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": true, "namespaces": ["*"]}],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                }],
            },
        }))
        .expect("FlowSchema");
        let c = || self.client.clone();
        create_all(&Api::<ClusterRole>::all(c()), vec![read], 1).await;
        create_all(&Api::<ClusterRoleBinding>::all(c()), vec![read_binding], 1).await;
        create_all(&Api::<FlowSchema>::all(c()), vec![flow_schema], 1).await;
        self.create_service_accounts(home, &["operator".to_string()]).await;
        self.allow_writes(home, home).await;
        let token = Api::<ServiceAccount>::namespaced(c(), home)
            .create_token_request(
                "operator",
                &PostParams::default(),
                &TokenRequest {
                    spec: TokenRequestSpec {
                        expiration_seconds: Some(4 * 3600),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .expect("TokenRequest")
            .status
            .expect("token")
            .token;
        let mut kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        for user in &mut kubeconfig.auth_infos {
            user.auth_info = Some(serde_json::from_value(json!({"token": token})).expect("AuthInfo"));
        }
        let dir = self.repo.join(".e2e/bench");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}-operator.kubeconfig", self.id));
        std::fs::write(&path, serde_saphyr::to_string(&kubeconfig).expect("kubeconfig YAML")).unwrap();
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("operator kubeconfig valid");
        Identity {
            kubeconfig: path,
            client: Client::try_from(config).expect("operator client"),
            flow_schema: name,
        }
    }

    /// Lets the operator identity (a ServiceAccount in `home`) write what the operator
    /// writes in `namespace`: binding status, Secrets, Events.
    async fn allow_writes(&self, home: &str, namespace: &str) {
        let rules = |rules: serde_json::Value| serde_json::from_value(rules).expect("policy rules");
        let write: Role = Role {
            metadata: ObjectMeta {
                name: Some("kube-sts-bench-operator".into()),
                ..Default::default()
            },
            rules: Some(rules(json!([
                {"apiGroups": ["kube-sts.io"], "resources": ["awsrolebindings/status"], "verbs": ["patch"]},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch", "delete"]},
                {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            ]))),
        };
        let write_binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "kube-sts-bench-operator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kube-sts-bench-operator"},
            "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": home}],
        }))
        .expect("RoleBinding");
        let c = || self.client.clone();
        create_all(&Api::<Role>::namespaced(c(), namespace), vec![write], 1).await;
        create_all(&Api::<RoleBinding>::namespaced(c(), namespace), vec![write_binding], 1).await;
    }

    /// A namespace for one run: labelled, the operator identity may write there.
    async fn run_namespace(&self, home: &str, name: &str) {
        self.create_namespace(name).await;
        self.allow_writes(home, name).await;
    }

    /// What kube-apiserver's own `/metrics` counts so far: every request
    /// (`apiserver_request_total`) and those of the operator identity's FlowSchema.
    async fn apiserver_counts(&self, flow_schema: &str) -> ApiCounts {
        let request = http::Request::get("/metrics").body(Vec::new()).expect("request");
        let text = self
            .client
            .request_text(request)
            .await
            .expect("kube-apiserver /metrics");
        let ours = format!("flow_schema=\"{flow_schema}\"");
        let mut counts = ApiCounts::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value = value.parse::<f64>().unwrap_or(0.0);
            if name.starts_with("apiserver_request_total{") {
                counts.all += value;
            } else if name.starts_with("apiserver_flowcontrol_dispatched_requests_total{") && name.contains(&ours) {
                counts.operator += value;
            }
        }
        counts
    }

    /// Deletes a namespace's objects one by one (see [`Bench::cleanup`]), then the namespace,
    /// and waits a while for it to go, so that the next timed run does not share the
    /// apiserver with the namespace controller.
    async fn clear_namespace(&self, namespace: &str) {
        let t = Instant::now();
        let deleted = self.delete_objects(namespace).await;
        let api = Api::<Namespace>::all(self.client.clone());
        let _ = api.delete(namespace, &DeleteParams::background()).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && api.get_opt(namespace).await.ok().flatten().is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        say!(self, "{namespace}: {deleted} objects deleted ({})", secs(t.elapsed()));
    }

    async fn delete_objects(&self, ns: &str) -> usize {
        let c = || self.client.clone();
        let mut deleted = 0;
        deleted += delete_each(&Api::<Secret>::namespaced(c(), ns), self.concurrency).await;
        deleted += delete_each(&Api::<AWSRoleBinding>::namespaced(c(), ns), self.concurrency).await;
        deleted += delete_each(&Api::<ServiceAccount>::namespaced(c(), ns), self.concurrency).await;
        deleted += delete_each(&Api::<Event>::namespaced(c(), ns), self.concurrency).await;
        deleted
    }

    /// Deletes what the bench created (namespaces, grant, RBAC, FlowSchema) and waits a
    /// while for the namespaces to go.
    async fn cleanup(&self, namespaces: &[String], grant: &str) {
        let _ = Api::<AWSRoleGrant>::all(self.client.clone())
            .delete(grant, &DeleteParams::background())
            .await;
        let rbac = format!("kube-sts-bench-{}", self.id);
        let _ = Api::<ClusterRoleBinding>::all(self.client.clone())
            .delete(&rbac, &DeleteParams::background())
            .await;
        let _ = Api::<ClusterRole>::all(self.client.clone())
            .delete(&rbac, &DeleteParams::background())
            .await;
        let _ = Api::<FlowSchema>::all(self.client.clone())
            .delete(&rbac, &DeleteParams::background())
            .await;
        let _ = std::fs::remove_file(self.repo.join(format!(".e2e/bench/{}-operator.kubeconfig", self.id)));
        // The namespace controller empties a namespace with one DELETE per resource type,
        // which times out (and is retried for many minutes) with 10,000s of objects: delete
        // them one by one first, the way they were created.
        let t = Instant::now();
        let mut deleted = 0;
        for ns in namespaces {
            deleted += self.delete_objects(ns).await;
        }
        say!(self, "{deleted} objects deleted ({})", secs(t.elapsed()));
        let api = Api::<Namespace>::all(self.client.clone());
        for ns in namespaces {
            let _ = api.delete(ns, &DeleteParams::background()).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut left = Vec::new();
            for ns in namespaces {
                if api.get_opt(ns).await.ok().flatten().is_some() {
                    left.push(ns.clone());
                }
            }
            if left.is_empty() {
                say!(self, "namespaces deleted");
                return;
            }
            if Instant::now() > deadline {
                say!(
                    self,
                    "still terminating (the namespace controller finishes on its own): {left:?}"
                );
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// Deletes every object `api` lists, with at most `concurrency` requests in flight;
/// returns how many there were.
async fn delete_each<K>(api: &Api<K>, concurrency: usize) -> usize
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let Ok(list) = api.list_metadata(&ListParams::default()).await else {
        return 0;
    };
    let names: Vec<String> = list.items.iter().map(|o| o.name_any()).collect();
    let count = names.len();
    stream::iter(names)
        .map(|name| {
            let api = api.clone();
            async move {
                let _ = api.delete(&name, &DeleteParams::background()).await;
            }
        })
        .buffer_unordered(concurrency)
        .for_each(|_| async {})
        .await;
    count
}

fn binding(name: &str, role: &str) -> AWSRoleBinding {
    let spec = AWSRoleBindingSpec {
        role_arn: Some(role.into()),
        subjects: vec![Subject {
            kind: Default::default(),
            name: name.into(),
        }],
        ..serde_json::from_value(json!({"subjects": []})).expect("minimal spec")
    };
    AWSRoleBinding::new(name, spec)
}

/// Creates every object with at most `concurrency` requests in flight; an object that
/// already exists is read back. Transient failures are retried a few times.
async fn create_all<K>(api: &Api<K>, objects: Vec<K>, concurrency: usize) -> Vec<K>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug + Send + Sync + 'static,
{
    create_all_timed(api, objects, concurrency)
        .await
        .into_iter()
        .map(|(object, _)| object)
        .collect()
}

/// Creates `objects` as the stream is polled, `concurrency` at a time, and yields each as its
/// create is answered.
fn creating<K>(api: &Api<K>, objects: Vec<K>, concurrency: usize) -> impl Stream<Item = K> + use<K>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let api = api.clone();
    stream::iter(objects)
        .map(move |obj| {
            let api = api.clone();
            async move { create_one(&api, &obj).await }
        })
        .buffer_unordered(concurrency)
}

/// Creates `obj` (or reads it, when it exists), retrying a failed create a few times.
async fn create_one<K>(api: &Api<K>, obj: &K) -> K
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let mut attempt = 0u32;
    loop {
        match api.create(&PostParams::default(), obj).await {
            Ok(created) => return created,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                return api.get(&name).await.unwrap_or_else(|e| panic!("get {name}: {e}"));
            }
            Err(e) if attempt < 5 => {
                attempt += 1;
                eprintln!("  create {name} failed ({e}); retry {attempt}");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(e) => panic!("create {name}: {e}"),
        }
    }
}

/// [`create_all`], with the moment each create was answered.
async fn create_all_timed<K>(api: &Api<K>, objects: Vec<K>, concurrency: usize) -> Vec<(K, Instant)>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug + Send + Sync + 'static,
{
    stream::iter(objects)
        .map(|obj| {
            let api = api.clone();
            async move { (create_one(&api, &obj).await, Instant::now()) }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// `p`-quantile (0..=1) of `values` (sorted in place), nearest rank.
fn quantile(values: &mut [Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

fn is_ready(b: &AWSRoleBinding) -> bool {
    b.status.as_ref().is_some_and(|st| {
        st.observed_generation == b.metadata.generation
            && st.conditions.iter().any(|c| c.type_ == READY && c.status == "True")
    })
}

/// Watches the bindings of a namespace and remembers when each first reported Ready=True.
struct ReadyWatch {
    ready: Arc<Mutex<HashMap<String, Instant>>>,
    changed: tokio::sync::watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadyWatch {
    /// Returns once the initial list is done, so later changes are seen as they happen.
    async fn start(api: Api<AWSRoleBinding>) -> Self {
        let ready: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let (tx, changed) = tokio::sync::watch::channel(0u64);
        let (listed_tx, listed) = tokio::sync::oneshot::channel();
        let seen = ready.clone();
        let task = tokio::spawn(async move {
            let mut listed_tx = Some(listed_tx);
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
            while let Some(event) = events.next().await {
                let object = match event {
                    Ok(watcher::Event::Apply(b) | watcher::Event::InitApply(b)) => b,
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = listed_tx.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        eprintln!("  binding watch: {e}");
                        continue;
                    }
                };
                if is_ready(&object) {
                    let mut seen = seen.lock().unwrap();
                    if let std::collections::hash_map::Entry::Vacant(entry) = seen.entry(object.name_any()) {
                        entry.insert(Instant::now());
                        tx.send_modify(|n| *n += 1);
                    }
                }
            }
        });
        let _ = listed.await;
        ReadyWatch { ready, changed, task }
    }

    /// Waits until every binding in `names` was Ready or the deadline passed; returns how
    /// many were and when the last of them became Ready.
    async fn wait_all(&mut self, bench: &Bench, names: &[String], deadline: Instant) -> (usize, Option<Instant>) {
        self.wait_for(bench, names, names.len(), deadline).await
    }

    /// Waits until at least `want` of `names` were Ready, or the deadline passed.
    async fn wait_for(
        &mut self,
        bench: &Bench,
        names: &[String],
        want: usize,
        deadline: Instant,
    ) -> (usize, Option<Instant>) {
        let mut last_report = Instant::now();
        loop {
            let (count, last) = {
                let seen = self.ready.lock().unwrap();
                let times: Vec<Instant> = names.iter().filter_map(|n| seen.get(n).copied()).collect();
                (times.len(), times.into_iter().max())
            };
            if count >= want || Instant::now() >= deadline {
                return (count, last);
            }
            if last_report.elapsed() >= Duration::from_secs(15) {
                say!(bench, "  {count}/{} Ready", names.len());
                last_report = Instant::now();
            }
            let next = deadline.min(Instant::now() + Duration::from_secs(15));
            let _ = tokio::time::timeout_at(next.into(), self.changed.changed()).await;
        }
    }

    fn is_ready(&self, name: &str) -> bool {
        self.ready.lock().unwrap().contains_key(name)
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP forwarder in front of the STS peer that counts the STS actions sent through it
/// (the `Action=` parameters of the query protocol), as the e2e harness does, and among
/// them those for the bench's own sessions (`RoleSessionName=<namespace>.`).
#[derive(Clone)]
struct Forwarder {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    own_calls: Arc<AtomicU64>,
}

const ACTION: &[u8] = b"Action=";

/// Matches of each needle in what was read so far, counting a match split across reads
/// once: `carry` keeps the tail of the previous reads (shorter than the longest needle).
fn count_needles<const N: usize>(carry: &mut Vec<u8>, chunk: &[u8], needles: [&[u8]; N]) -> [u64; N] {
    let old = carry.len();
    carry.extend_from_slice(chunk);
    let counts = needles.map(|needle| {
        carry
            .windows(needle.len())
            .enumerate()
            .filter(|(i, w)| *w == needle && i + needle.len() > old)
            .count() as u64
    });
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(1);
    let keep = carry.len().min(longest - 1);
    carry.drain(..carry.len() - keep);
    counts
}

impl Forwarder {
    async fn start(upstream: &str, own_namespace: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
        let own: Arc<Vec<u8>> = Arc::new(format!("RoleSessionName={own_namespace}.").into_bytes());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind forwarder");
        let fwd = Forwarder {
            addr: listener.local_addr().unwrap(),
            calls: Arc::default(),
            own_calls: Arc::default(),
        };
        let (calls, own_calls) = (fwd.calls.clone(), fwd.own_calls.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (upstream, calls, own_calls, own) =
                    (upstream.clone(), calls.clone(), own_calls.clone(), own.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.split();
                    let (mut ro, mut wo) = outbound.split();
                    let client_to_peer = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut carry = Vec::new();
                        loop {
                            let n = match ri.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let [all, mine] = count_needles(&mut carry, &buf[..n], [ACTION, own.as_slice()]);
                            calls.fetch_add(all, Ordering::Relaxed);
                            own_calls.fetch_add(mine, Ordering::Relaxed);
                            if wo.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = wo.shutdown().await;
                    };
                    let peer_to_client = async {
                        let _ = tokio::io::copy(&mut ro, &mut wi).await;
                        let _ = wi.shutdown().await;
                    };
                    tokio::join!(client_to_peer, peer_to_client);
                });
            }
        });
        fwd
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn own_calls(&self) -> u64 {
        self.own_calls.load(Ordering::Relaxed)
    }
}

/// What the operator's `/metrics` says, summed over labels.
#[derive(Debug, Default, Clone)]
struct Scrape {
    reconciles: u64,
    reconcile_seconds: f64,
    reconcile_errors: u64,
    sts_calls: u64,
    writes: u64,
    writes_by: Vec<(String, u64)>,
}

impl Scrape {
    /// Total writes with the per-resource/verb split, e.g. `3 (secrets/create 2, ...)`.
    fn writes_detail(&self) -> String {
        if self.writes_by.is_empty() {
            return "0".into();
        }
        let by: Vec<String> = self
            .writes_by
            .iter()
            .map(|(labels, n)| {
                let label = |key: &str| {
                    labels
                        .split(&format!("{key}=\""))
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .unwrap_or("?")
                        .to_string()
                };
                format!("{} {} {n}", label("resource"), label("verb"))
            })
            .collect();
        format!("{} ({})", self.writes, by.join(", "))
    }
}

fn parse_metrics(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value = value.parse::<f64>().unwrap_or(0.0) as u64;
        if name == "kube_sts_reconcile_duration_seconds_count" {
            s.reconciles = value;
        } else if name == "kube_sts_reconcile_duration_seconds_sum" {
            s.reconcile_seconds = line.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()).unwrap_or(0.0);
        } else if name.starts_with("kube_sts_reconcile_errors_total") {
            s.reconcile_errors += value;
        } else if name.starts_with("kube_sts_sts_calls_total") {
            s.sts_calls += value;
        } else if let Some(labels) = name.strip_prefix("kube_sts_api_writes_total") {
            s.writes += value;
            s.writes_by.push((labels.to_string(), value));
        }
    }
    s
}

/// One `kube-sts run` process (release build) talking to STS through a forwarder.
struct Operator {
    child: Option<Child>,
    pid: u32,
    metrics_addr: SocketAddr,
    log: PathBuf,
    started: Instant,
}

impl Operator {
    fn start(
        bench: &Bench,
        label: &str,
        namespace: Option<&str>,
        kubeconfig: &Path,
        sts: &Forwarder,
        flags: Flags,
    ) -> Self {
        let log = bench
            .logs_dir()
            .join(format!("bench-{}-operator-{label}.log", bench.id));
        let metrics_addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(&bench.operator_bin);
        cmd.arg("run");
        if let Some(ns) = namespace {
            cmd.args(["--namespace", ns]);
        }
        let child = cmd
            .args([
                "--sts-endpoint",
                &sts.url(),
                "--metrics-addr",
                &metrics_addr.to_string(),
            ])
            .args(flags.args())
            .args(["--log-format", "json", "--log-level", "info"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", kubeconfig)
            .env("AWS_ACCESS_KEY_ID", &bench.aws["AWS_ACCESS_KEY_ID"])
            .env("AWS_SECRET_ACCESS_KEY", &bench.aws["AWS_SECRET_ACCESS_KEY"])
            .env("AWS_REGION", &bench.aws["AWS_REGION"])
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("operator starts");
        say!(
            bench,
            "operator {label} started (pid {}, {}, {}), log {}",
            child.id(),
            namespace
                .map(|n| format!("--namespace {n}"))
                .unwrap_or_else(|| "all namespaces".into()),
            flags.describe(),
            log.strip_prefix(&bench.repo).unwrap_or(&log).display()
        );
        Operator {
            pid: child.id(),
            child: Some(child),
            metrics_addr,
            log,
            started: Instant::now(),
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        tokio::time::timeout(Duration::from_secs(10), self.get_once(path))
            .await
            .ok()
            .flatten()
    }

    async fn get_once(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(self.metrics_addr).await.ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        stream.read_to_string(&mut out).await.ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((code, body))
    }

    async fn scrape(&self) -> Scrape {
        let (_, body) = self.get("/metrics").await.expect("operator /metrics answers");
        parse_metrics(&body)
    }

    fn assert_alive(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("operator exited ({status}); see {}", self.log.display());
        }
    }

    /// Time from start until `/readyz` answers 200 (caches synced), or `None` when it did
    /// not by the deadline (the bench goes on: an operator that never reports ready is a
    /// finding, not a reason to stop).
    async fn wait_ready(&mut self, deadline: Instant) -> Option<Duration> {
        loop {
            if matches!(self.get("/readyz").await, Some((200, _))) {
                return Some(self.started.elapsed());
            }
            self.assert_alive();
            if Instant::now() >= deadline {
                eprintln!(
                    "  /readyz of operator {} is not 200 after {}",
                    self.pid,
                    secs(self.started.elapsed())
                );
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the reconcile count grew by at most `noise` over [`SETTLE_QUIET`] (or the
    /// deadline); returns the metrics then and when that quiet window began. `noise` allows
    /// for bindings that keep failing and are retried (other people's, in a shared cluster).
    async fn settle(&mut self, noise: u64, deadline: Instant) -> (Scrape, Instant) {
        let mut samples: std::collections::VecDeque<(Instant, u64)> = Default::default();
        loop {
            self.assert_alive();
            let scrape = self.scrape().await;
            let now = Instant::now();
            samples.push_back((now, scrape.reconciles));
            while samples.len() > 1 && now - samples[1].0 >= SETTLE_QUIET {
                samples.pop_front();
            }
            let (since, then) = samples[0];
            let quiet = now - since >= SETTLE_QUIET && scrape.reconciles - then <= noise;
            if (scrape.reconciles > 0 && quiet) || now >= deadline {
                return (scrape, since);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// CPU time (user + system) the process used so far.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // Fields after the command name (which may contain spaces): utime and stime are the
        // 12th and 13th, in clock ticks (USER_HZ, 100 on Linux).
        let ticks: u64 = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        Duration::from_millis(ticks * 10)
    }

    /// Peak resident set size so far (`VmHWM`), in KiB.
    fn vm_hwm(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// SIGTERM, then waits for the exit; returns how long shutting down took.
    async fn stop(&mut self) -> Duration {
        let Some(mut child) = self.child.take() else {
            return Duration::ZERO;
        };
        let t0 = Instant::now();
        let _ = Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status();
        while t0.elapsed() < Duration::from_secs(30) {
            if child.try_wait().ok().flatten().is_some() {
                return t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("  operator {} ignored SIGTERM for 30 s; killing it", self.pid);
        let _ = child.kill();
        let _ = child.wait();
        t0.elapsed()
    }

    /// Warnings and errors in the log, counted by message, with one example each.
    fn log_problems(&self) -> Vec<(String, usize, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut by: BTreeMap<String, (usize, String)> = BTreeMap::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                if !line.trim().is_empty() {
                    by.entry(format!("(not JSON) {line}")).or_insert((0, String::new())).0 += 1;
                }
                continue;
            };
            let level = v["level"].as_str().unwrap_or_default();
            if level == "WARN" || level == "ERROR" {
                let message = format!("{level} {}", v["message"].as_str().unwrap_or_default());
                let entry = by.entry(message).or_insert((0, String::new()));
                entry.0 += 1;
                if entry.1.is_empty() {
                    entry.1 = v["error"].as_str().unwrap_or_default().chars().take(240).collect();
                }
            }
        }
        by.into_iter().map(|(m, (n, e))| (m, n, e)).collect()
    }

    fn report_problems(&self, bench: &Bench, results: &mut Results, section: &str) {
        let problems = self.log_problems();
        if problems.is_empty() {
            results.add(section, "operator log warnings/errors", "none");
        }
        for (message, count, example) in problems {
            say!(
                bench,
                "  log: {count} x {message}{}",
                if example.is_empty() {
                    String::new()
                } else {
                    format!(" (e.g. {example})")
                }
            );
            results.add(section, format!("log: {message}"), count.to_string());
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Touches a binding (an annotation) and says whether the operator reconciled anything
/// within 10 s: a controller whose reconcile slots are all taken by stuck reconciles would not.
async fn responds(operator: &Operator, api: &Api<AWSRoleBinding>, name: &str) -> bool {
    let before = operator.scrape().await.reconciles;
    let patch = json!({"metadata": {"annotations": {"bench.kube-sts.io/touched": Timestamp::now().to_string()}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("touch a binding");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if operator.scrape().await.reconciles > before {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

fn ready_text(ready_after: Option<Duration>) -> String {
    ready_after.map_or_else(|| "never (not 200 within 60 s)".into(), secs)
}

fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i:05}")).collect()
}

/// `(name, resourceVersion)` of every binding and managed Secret of a namespace.
async fn versions(client: &Client, namespace: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let bindings: Api<AWSRoleBinding> = Api::namespaced(client.clone(), namespace);
    for b in bindings
        .list(&ListParams::default())
        .await
        .expect("list bindings")
        .items
    {
        out.insert(
            format!("binding/{}", b.name_any()),
            b.resource_version().unwrap_or_default(),
        );
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let managed = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    for s in secrets.list(&managed).await.expect("list secrets").items {
        out.insert(
            format!("secret/{}", s.name_any()),
            s.resource_version().unwrap_or_default(),
        );
    }
    out
}

/// The status the operator would write for a one-subject binding with `creds`.
fn ready_status(
    binding: &AWSRoleBinding,
    secret_name: &str,
    creds: &Credentials,
    now: Timestamp,
) -> AWSRoleBindingStatus {
    let generation = binding.metadata.generation;
    let subject = binding.spec.subjects[0].name.clone();
    let verdict = conditions::binding_verdict(
        None,
        &[SubjectOutcome {
            name: subject.clone(),
            ready: true,
            has_valid_credentials: true,
            problem: None,
        }],
        None,
    );
    let refresh = Time(creds.expiration - SignedDuration::from_mins(20));
    let mut status = AWSRoleBindingStatus {
        observed_generation: generation,
        expiration: Some(Time(creds.expiration)),
        next_refresh_time: Some(refresh.clone()),
        subjects: vec![SubjectStatus {
            name: subject,
            secret_name: Some(secret_name.into()),
            arn: creds.arn.clone(),
            access_key_id: Some(creds.access_key_id.clone()),
            issued_at: Some(Time(creds.issued_at)),
            expiration: Some(Time(creds.expiration)),
            next_refresh_time: Some(refresh),
            consecutive_failures: 0,
            message: String::new(),
        }],
        ..Default::default()
    };
    let (ready, reason, message) = &verdict.ready;
    conditions::set_condition(&mut status.conditions, READY, *ready, *reason, message, generation, now);
    let (degraded, reason, message) = &verdict.degraded;
    conditions::set_condition(
        &mut status.conditions,
        DEGRADED,
        *degraded,
        *reason,
        message,
        generation,
        now,
    );
    status
}

/// An STS client as bare as it gets: the operator's own identity (the static keys of
/// `.e2e/aws.env`), one attempt per call, through `endpoint`.
async fn bare_sts_client(bench: &Bench, endpoint: &str) -> aws_sdk_sts::Client {
    let keys = aws_credential_types::Credentials::new(
        &bench.aws["AWS_ACCESS_KEY_ID"],
        &bench.aws["AWS_SECRET_ACCESS_KEY"],
        None,
        None,
        "bench",
    );
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(bench.aws["AWS_REGION"].clone()))
        .endpoint_url(endpoint)
        .credentials_provider(keys)
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .load()
        .await;
    aws_sdk_sts::Client::new(&config)
}

/// The bare client: for each binding exactly one binding's minimum work, with
/// `bench.concurrency` bindings in flight: one AssumeRole (the request the operator sends for
/// it: role, session name, duration, session tags), one Secret create holding what STS
/// answered (rendered as the operator renders it), one server-side apply of a Ready status.
/// As the operator identity, against the same apiserver and STS peer. With `extras`, it also
/// makes the request the operator adds for a new binding, and waits for it: an Event, as the
/// operator publishes it (in the background). The bindings come from `bindings` (created already, or created as
/// the stream is polled: then the bare client works on each as soon as its create is
/// answered). Returns the time from the first request to the last answer.
async fn bare_client(
    bench: &Bench,
    identity: &Identity,
    sts: &Forwarder,
    namespace: &str,
    bindings: impl Stream<Item = AWSRoleBinding>,
    extras: bool,
) -> Duration {
    let settings = IssueSettings {
        cluster_name: "kubernetes".into(),
        session_tags: true,
        allow_operator_identity: false,
        default_region: bench.aws.get("AWS_REGION").cloned(),
    };
    let client = bare_sts_client(bench, &sts.url()).await;
    let secrets: Api<Secret> = Api::namespaced(identity.client.clone(), namespace);
    let api: Api<AWSRoleBinding> = Api::namespaced(identity.client.clone(), namespace);
    // The operator's own Event publisher (one create per Event).
    let publisher = Arc::new(Publisher::new(
        identity.client.clone(),
        BASELINE_MANAGER,
        None,
        bench.concurrency,
    ));
    let t0 = Instant::now();
    bindings
        .map(|b| {
            let mut plan = plan::plan_binding(&b, &Resolved::default(), &settings, None).expect("binding plans");
            (b, plan.subjects.swap_remove(0))
        })
        .map(|(b, sp)| {
            let (client, secrets, api, publisher) = (client.clone(), secrets.clone(), api.clone(), publisher.clone());
            async move {
                let req = &sp.request;
                let tags = req
                    .tags
                    .iter()
                    .map(|(k, v)| aws_sdk_sts::types::Tag::builder().key(k).value(v).build())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let out = client
                    .assume_role()
                    .set_role_arn(req.role_arn.clone())
                    .role_session_name(&req.session_name)
                    .set_external_id(req.external_id.clone())
                    .set_duration_seconds(req.duration_seconds)
                    .set_tags((!tags.is_empty()).then_some(tags))
                    .send()
                    .await
                    .map_err(|e| format!("AssumeRole: {}", aws_sdk_sts::error::DisplayErrorContext(e)))?;
                let issued = out.credentials().ok_or("AssumeRole answered no credentials")?;
                let now = Timestamp::now();
                let creds = Credentials {
                    access_key_id: issued.access_key_id().to_string(),
                    secret_access_key: issued.secret_access_key().to_string(),
                    session_token: issued.session_token().to_string(),
                    issued_at: now,
                    expiration: Timestamp::from_second(issued.expiration().secs()).map_err(|e| e.to_string())?,
                    arn: out.assumed_role_user().map(|u| u.arn().to_string()),
                    note: None,
                    registries: Vec::new(),
                };
                let params = PostParams {
                    field_manager: Some(BASELINE_MANAGER.into()),
                    ..Default::default()
                };
                secrets
                    .create(&params, &render::render_secret(&creds, &sp.target))
                    .await
                    .map_err(|e| format!("Secret create: {e}"))?;
                if extras {
                    let note = format!(
                        "issued credentials for ServiceAccount {} into Secret {} (access key {}, expires {})",
                        sp.service_account,
                        sp.target.name,
                        creds.access_key_id,
                        render::rfc3339(creds.expiration)
                    );
                    publisher
                        .publish_now(
                            &b.object_ref(&()),
                            EventType::Normal,
                            "CredentialsIssued",
                            "Reconcile",
                            &note,
                        )
                        .await
                        .map_err(|e| format!("Event: {e}"))?;
                }
                let patch = json!({
                    "apiVersion": "kube-sts.io/v1alpha1",
                    "kind": "AWSRoleBinding",
                    "status": ready_status(&b, &sp.target.name, &creds, now),
                });
                api.patch_status(
                    &b.name_any(),
                    &PatchParams::apply(BASELINE_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
                .map_err(|e| format!("status apply: {e}"))?;
                Ok::<_, String>(())
            }
        })
        .buffer_unordered(bench.concurrency)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_or_else(|e| panic!("bare client: {e}"));
    t0.elapsed()
}

/// What one operator run to Ready measured.
struct Measured {
    /// Bindings created before the start: process start -> last Ready; created while it
    /// runs: first create -> last Ready.
    time: Duration,
    /// The driver's creates (bindings created while it runs).
    creates: Option<Duration>,
    /// Create answered -> Ready, per binding: median, 90th percentile, maximum (bindings
    /// created while it runs).
    latency: Option<[Duration; 3]>,
    to_readyz: Option<Duration>,
    sts_calls: u64,
    scrape: Scrape,
    /// Requests the apiserver counted for the operator identity, start to settled.
    api_requests: f64,
    cpu: Duration,
}

/// One operator run of `names` bindings to Ready in `namespace` (which exists, with its
/// ServiceAccounts): returns the figures, and the operator, its STS forwarder and the
/// watch, still running.
#[allow(clippy::too_many_arguments)]
async fn to_ready(
    bench: &Bench,
    identity: &Identity,
    role: &str,
    namespace: &str,
    names: &[String],
    flags: Flags,
    created: Created,
    label: &str,
) -> (Measured, Operator, Forwarder, ReadyWatch) {
    let bindings: Api<AWSRoleBinding> = Api::namespaced(bench.client.clone(), namespace);
    let sts = Forwarder::start(&bench.aws["AWS_ENDPOINT_URL_STS"], namespace).await;
    let before = bench.apiserver_counts(&identity.flow_schema).await;
    let (mut operator, mut watch, t0, creates, to_readyz);
    let mut created_at = HashMap::new();
    match created {
        Created::Before => {
            bench.create_bindings(namespace, role, names).await;
            watch = ReadyWatch::start(bindings).await;
            operator = Operator::start(bench, label, Some(namespace), &identity.kubeconfig, &sts, flags);
            t0 = operator.started;
            to_readyz = operator.wait_ready(Instant::now() + Duration::from_secs(60)).await;
            creates = None;
        }
        Created::While => {
            operator = Operator::start(bench, label, Some(namespace), &identity.kubeconfig, &sts, flags);
            to_readyz = operator.wait_ready(Instant::now() + Duration::from_secs(60)).await;
            watch = ReadyWatch::start(bindings).await;
            t0 = Instant::now();
            created_at = bench.create_bindings_timed(namespace, role, names).await;
            creates = Some(t0.elapsed());
        }
    }
    let n = names.len();
    let (ready, last) = watch
        .wait_all(bench, names, Instant::now() + Duration::from_secs(300))
        .await;
    assert!(
        ready == n,
        "only {ready}/{n} bindings Ready within 300 s; see {}",
        operator.log.display()
    );
    let time = last.map(|l| l - t0).unwrap_or_default();
    say!(bench, "{label}: {n} bindings Ready in {}", secs(time));
    // How long each binding waited for Ready after its create was answered (bindings created
    // while it runs): an operator that keeps pace shows a flat latency, one that falls behind
    // a growing one.
    let mut latencies: Vec<Duration> = {
        let ready = watch.ready.lock().unwrap();
        created_at
            .iter()
            .filter_map(|(name, at)| Some(ready.get(name)?.saturating_duration_since(*at)))
            .collect()
    };
    let latency = (!latencies.is_empty()).then(|| [0.5, 0.9, 1.0].map(|p| quantile(&mut latencies, p)));
    let (scrape, _) = operator.settle(0, Instant::now() + Duration::from_secs(60)).await;
    let api_requests = (bench.apiserver_counts(&identity.flow_schema).await - before).operator;
    let measured = Measured {
        time,
        creates,
        latency,
        to_readyz,
        sts_calls: sts.calls(),
        scrape,
        api_requests,
        cpu: operator.cpu_time(),
    };
    (measured, operator, sts, watch)
}

fn ratio(time: Duration, bare: Duration) -> String {
    format!("{:.2}x", time.as_secs_f64() / bare.as_secs_f64().max(0.001))
}

/// `bare`: the bare client's time with the bindings created before it starts, and with them
/// created while it runs (the baseline for a run whose bindings are created while it runs).
fn report_run(results: &mut Results, section: &str, what: &str, m: &Measured, bare: (Duration, Duration), n: usize) {
    let against = match m.creates {
        None => format!("{} bare client", ratio(m.time, bare.0)),
        Some(_) => format!(
            "{} bare client with the same creates, {} bare client",
            ratio(m.time, bare.1),
            ratio(m.time, bare.0)
        ),
    };
    results.add(section, what.to_string(), format!("{} ({against})", secs(m.time)));
    if let Some(creates) = m.creates {
        results.add(section, "  of which the driver's binding creates", secs(creates));
    }
    if let Some([p50, p90, max]) = m.latency {
        results.add(
            section,
            "  per binding, create -> Ready: median / p90 / max",
            format!("{} / {} / {}", secs(p50), secs(p90), secs(max)),
        );
    }
    if m.scrape.reconciles > 0 {
        results.add(
            section,
            "  mean reconcile time",
            format!(
                "{:.0} ms",
                m.scrape.reconcile_seconds * 1000.0 / m.scrape.reconciles as f64
            ),
        );
    }
    results.add(section, "  start -> /readyz 200", ready_text(m.to_readyz));
    results.add(
        section,
        "  bindings/s",
        format!("{:.0}", n as f64 / m.time.as_secs_f64().max(0.001)),
    );
    results.add(section, "  STS calls at the wire", m.sts_calls.to_string());
    results.add(section, "  reconciles", m.scrape.reconciles.to_string());
    results.add(section, "  API writes (operator metric)", m.scrape.writes_detail());
    results.add(
        section,
        "  apiserver requests by the operator (its FlowSchema)",
        format!("{:.0}", m.api_requests),
    );
    results.add(section, "  operator CPU time", secs(m.cpu));
}

#[tokio::main]
async fn main() {
    let bench = Bench::new().await;
    let n = env_usize("BENCH_BINDINGS", 1000).max(1);
    let large = env_usize("BENCH_LARGE", 10_000).max(n);
    let noise = env_usize("BENCH_NOISE_SECRETS", 20_000);
    let rest = Duration::from_secs(env_usize("BENCH_REST_SECONDS", 600).max(1) as u64);
    let reserve = Duration::from_secs(env_usize("BENCH_RESERVE_SECONDS", 180) as u64) + 2 * rest;
    let ns = format!("bench-{}", bench.id);
    let ns_noise = format!("{ns}-noise");
    let grant_name = format!("bench-{}", bench.id);
    // One namespace per run of section 1 (the tuned operator with bindings created while it
    // runs uses `ns`, and goes on into the large phase).
    let ns_bare = [
        format!("{ns}-bare-1"),
        format!("{ns}-bare-2"),
        format!("{ns}-bare-extras"),
        format!("{ns}-bare-while"),
    ];
    let ns_default_before = format!("{ns}-default-before");
    let ns_default_while = format!("{ns}-default-while");
    let ns_tuned_before = format!("{ns}-tuned-before");
    let run_namespaces: Vec<String> = ns_bare
        .iter()
        .cloned()
        .chain([
            ns_default_before.clone(),
            ns_default_while.clone(),
            ns_tuned_before.clone(),
        ])
        .collect();
    let mut results = Results::default();
    say!(
        bench,
        "run {}: {n} bindings, large {large}, {noise} noise Secrets, rest windows {}, {} requests in flight, budget {}",
        bench.id,
        secs(rest),
        bench.concurrency,
        secs(bench.deadline - bench.started)
    );

    // ---- setup: role, namespaces, grant, operator identity, ServiceAccounts
    let role = bench.create_role(&format!("bench-{}", bench.id));
    bench.create_namespace(&ns).await;
    let identity = bench.operator_identity(&ns).await;
    let mut grant = AWSRoleGrant::new(
        &grant_name,
        AWSRoleGrantSpec {
            namespaces: Some(std::iter::once(ns.clone()).chain(run_namespaces.clone()).collect()),
            role_arns: vec![role.clone()],
            ..serde_json::from_value(json!({"roleArns": []})).expect("minimal grant")
        },
    );
    grant
        .metadata
        .labels
        .get_or_insert_default()
        .insert(PART_OF.0.into(), PART_OF.1.into());
    create_all(&Api::<AWSRoleGrant>::all(bench.client.clone()), vec![grant], 1).await;
    let first = names("sa-", 0..n);
    let t = Instant::now();
    bench.create_service_accounts(&ns, &first).await;
    say!(
        bench,
        "role {role}, namespace {ns}, operator identity (FlowSchema {}), grant, {n} ServiceAccounts ({})",
        identity.flow_schema,
        secs(t.elapsed())
    );

    // ---- phase 1: N bindings to Ready: bare client, operator at default and tuned flags
    let section = &format!("1. {n} bindings to Ready");
    let bare_run = async |namespace: &str, extras: bool, created: Created| {
        bench.run_namespace(&ns, namespace).await;
        let sts = Forwarder::start(&bench.aws["AWS_ENDPOINT_URL_STS"], namespace).await;
        let api = Api::<AWSRoleBinding>::namespaced(bench.client.clone(), namespace);
        let (time, requests) = match created {
            Created::Before => {
                let bindings = bench.create_bindings(namespace, &role, &first).await;
                let before = bench.apiserver_counts(&identity.flow_schema).await;
                let time = bare_client(&bench, &identity, &sts, namespace, stream::iter(bindings), extras).await;
                (
                    time,
                    (bench.apiserver_counts(&identity.flow_schema).await - before).operator,
                )
            }
            Created::While => {
                let before = bench.apiserver_counts(&identity.flow_schema).await;
                let creates = first.iter().map(|n| binding(n, &role)).collect();
                let time = bare_client(
                    &bench,
                    &identity,
                    &sts,
                    namespace,
                    creating(&api, creates, bench.concurrency),
                    extras,
                )
                .await;
                (
                    time,
                    (bench.apiserver_counts(&identity.flow_schema).await - before).operator,
                )
            }
        };
        say!(bench, "bare client: {n} bindings in {}", secs(time));
        bench.clear_namespace(namespace).await;
        (time, sts.calls(), requests)
    };
    let bare_first = bare_run(&ns_bare[0], false, Created::Before).await;
    let mut runs = Vec::new();
    for (namespace, flags, created) in [
        (&ns_default_before, Flags::Default, Created::Before),
        (&ns_default_while, Flags::Default, Created::While),
        (&ns_tuned_before, Flags::Tuned, Created::Before),
    ] {
        bench.run_namespace(&ns, namespace).await;
        bench.create_service_accounts(namespace, &first).await;
        let label = namespace.strip_prefix(&format!("{ns}-")).unwrap_or(namespace);
        let (measured, mut operator, _sts, _watch) =
            to_ready(&bench, &identity, &role, namespace, &first, flags, created, label).await;
        operator.stop().await;
        bench.clear_namespace(namespace).await;
        runs.push((flags, created, measured));
    }
    let bare_second = bare_run(&ns_bare[1], false, Created::Before).await;
    let bare_extras = bare_run(&ns_bare[2], true, Created::Before).await;
    let bare_while = bare_run(&ns_bare[3], false, Created::While).await;
    let (measured, mut operator, sts, mut watch) =
        to_ready(&bench, &identity, &role, &ns, &first, Flags::Tuned, Created::While, "a").await;
    let operator_time = measured.time;
    let hwm_small = operator.vm_hwm();
    runs.push((Flags::Tuned, Created::While, measured));
    let bare = (bare_first.0 + bare_second.0) / 2;
    results.add(
        section,
        format!(
            "bare client: AssumeRole + Secret create + status apply, {} in flight",
            bench.concurrency
        ),
        format!(
            "{} (runs: {} before the operators, {} after)",
            secs(bare),
            secs(bare_first.0),
            secs(bare_second.0)
        ),
    );
    results.add(
        section,
        "  STS calls at the wire / apiserver requests (both runs)",
        format!("{} / {:.0}", bare_first.1 + bare_second.1, bare_first.2 + bare_second.2),
    );
    results.add(
        section,
        "bare client + the operator's Event per binding, waited for",
        format!(
            "{} ({} bare client; STS calls {}, apiserver requests {:.0})",
            secs(bare_extras.0),
            ratio(bare_extras.0, bare),
            bare_extras.1,
            bare_extras.2
        ),
    );
    results.add(
        section,
        "bare client, bindings created while it runs (first create -> last answer)",
        format!(
            "{} (STS calls {}, apiserver requests {:.0}; the driver's creates, {} in flight, not counted)",
            secs(bare_while.0),
            bare_while.1,
            bare_while.2,
            bench.concurrency
        ),
    );
    for (flags, created, measured) in &runs {
        let when = match created {
            Created::Before => "created before it starts (start -> last Ready)",
            Created::While => "created while it runs (first create -> last Ready)",
        };
        report_run(
            &mut results,
            section,
            &format!("operator, {}, bindings {when}", flags.describe()),
            measured,
            (bare, bare_while.0),
            n,
        );
    }
    let bindings: Api<AWSRoleBinding> = Api::namespaced(bench.client.clone(), &ns);

    // ---- phase 2: peak RSS at N and at the large count (same operator, more bindings)
    let section = "2. operator peak RSS (VmHWM), tuned flags";
    results.add(section, format!("at {n} bindings"), mib(hwm_small));
    let large_deadline = bench.deadline.checked_sub(reserve).unwrap_or(bench.deadline);
    // Created at the pace the operator keeps up with (at most one chunk waiting): creating
    // far ahead only slows it down, and whatever is not Ready by the deadline would spoil
    // the restart below.
    let chunk = 500;
    let mut total = n;
    let large_started = Instant::now();
    let first_rate = n as f64 / operator_time.as_secs_f64().max(0.001);
    while total < large {
        let created = names("sa-", 0..total);
        let (ready_now, _) = watch
            .wait_for(&bench, &created, total.saturating_sub(chunk), large_deadline)
            .await;
        let rate = match ready_now.saturating_sub(n) {
            0 => first_rate,
            done => done as f64 / large_started.elapsed().as_secs_f64(),
        };
        let next = (total + chunk).min(large);
        let needed = Duration::from_secs_f64((next - ready_now) as f64 / rate.max(0.1) * 1.2);
        if Instant::now() + needed > large_deadline {
            say!(bench, "time budget: stopping at {total} bindings ({rate:.0} Ready/s)");
            break;
        }
        let more = names("sa-", total..next);
        bench.create_service_accounts(&ns, &more).await;
        bench.create_bindings(&ns, &role, &more).await;
        total = next;
        if total.is_multiple_of(2000) || total == large {
            say!(bench, "{total} bindings created, {ready_now}+ Ready ({rate:.0}/s)");
        }
    }
    let all = names("sa-", 0..total);
    let (ready_large, last) = watch.wait_all(&bench, &all, large_deadline).await;
    let large_time = last.map(|l| l - large_started).unwrap_or_default();
    if ready_large < total {
        // The restart must find every Secret fresh: drop what the operator did not finish.
        let late: Vec<String> = all.iter().filter(|b| !watch.is_ready(b)).cloned().collect();
        say!(bench, "deleting {} bindings not Ready by the deadline", late.len());
        stream::iter(late)
            .map(|name| {
                let bindings = bindings.clone();
                async move { bindings.delete(&name, &DeleteParams::background()).await.map(|_| ()) }
            })
            .buffer_unordered(bench.concurrency)
            .for_each(|_| async {})
            .await;
        results.add(
            section,
            "  bindings not Ready by the deadline (deleted before the restart)",
            (total - ready_large).to_string(),
        );
    }
    let (scrape, _) = operator.settle(0, Instant::now() + Duration::from_secs(30)).await;
    let hwm_large = operator.vm_hwm();
    results.add(
        section,
        format!("at {ready_large} bindings (of {large} asked)"),
        mib(hwm_large),
    );
    results.add(
        section,
        format!("  {} more bindings: first create -> last Ready", ready_large - n),
        format!(
            "{} ({:.0}/s)",
            secs(large_time),
            (ready_large - n) as f64 / large_time.as_secs_f64().max(0.001)
        ),
    );
    results.add(
        section,
        "  STS calls at the wire (whole run so far)",
        sts.calls().to_string(),
    );
    results.add(
        section,
        "  reconciles (whole run so far)",
        scrape.reconciles.to_string(),
    );
    results.add(section, "  reconcile errors", scrape.reconcile_errors.to_string());
    results.add(
        section,
        "  operator CPU time (whole run so far)",
        secs(operator.cpu_time()),
    );
    operator.report_problems(&bench, &mut results, section);
    drop(watch);

    // ---- phase 3: at rest, every binding fresh; then the same window with it stopped
    let section = &format!("3. at rest with {ready_large} bindings");
    say!(bench, "at rest: {} with the operator running", secs(rest));
    let (busy, busy_cpu, busy_reconciles) = {
        let (r0, c0, cpu0, t0) = (
            operator.scrape().await.reconciles,
            bench.apiserver_counts(&identity.flow_schema).await,
            operator.cpu_time(),
            Instant::now(),
        );
        tokio::time::sleep(rest).await;
        let c1 = bench.apiserver_counts(&identity.flow_schema).await;
        let cpu = operator.cpu_time() - cpu0;
        let reconciles = operator.scrape().await.reconciles - r0;
        ((c1 - c0, t0.elapsed()), cpu, reconciles)
    };
    let before = versions(&bench.client, &ns).await;
    let shutdown = operator.stop().await;
    say!(bench, "at rest: {} with the operator stopped", secs(rest));
    let idle = {
        let (c0, t0) = (bench.apiserver_counts(&identity.flow_schema).await, Instant::now());
        tokio::time::sleep(rest).await;
        (bench.apiserver_counts(&identity.flow_schema).await - c0, t0.elapsed())
    };
    let per_min = |count: f64, window: Duration| count * 60.0 / window.as_secs_f64();
    let per_1000 = |rate: f64| rate * 1000.0 / ready_large.max(1) as f64;
    let operator_rate = per_min(busy.0.operator, busy.1);
    results.add(
        section,
        "apiserver requests by the operator (its FlowSchema)",
        format!(
            "{:.0} in {} = {:.2}/min, {:.2}/min per 1,000 bindings",
            busy.0.operator,
            secs(busy.1),
            operator_rate,
            per_1000(operator_rate)
        ),
    );
    let difference = per_min(busy.0.all, busy.1) - per_min(idle.0.all, idle.1);
    results.add(
        section,
        "apiserver_request_total: operator running - stopped",
        format!(
            "{:.1}/min - {:.1}/min = {:.1}/min, {:.1}/min per 1,000 bindings (others' traffic included)",
            per_min(busy.0.all, busy.1),
            per_min(idle.0.all, idle.1),
            difference,
            per_1000(difference)
        ),
    );
    results.add(
        section,
        "operator CPU",
        format!(
            "{} in {} = {:.2} % of a core",
            secs(busy_cpu),
            secs(busy.1),
            busy_cpu.as_secs_f64() * 100.0 / busy.1.as_secs_f64()
        ),
    );
    // A grant anywhere in the cluster (other people's tests in a shared environment) makes
    // the operator look at every binding again: no request, a little CPU.
    results.add(
        section,
        "reconciles in the window (every grant event re-checks all bindings)",
        busy_reconciles.to_string(),
    );

    // ---- phase 4: restart with every Secret fresh
    let section = &format!("4. restart at {ready_large} bindings");
    let sts = Forwarder::start(&bench.aws["AWS_ENDPOINT_URL_STS"], &ns).await;
    let mut operator = Operator::start(
        &bench,
        "a-restarted",
        Some(&ns),
        &identity.kubeconfig,
        &sts,
        Flags::Tuned,
    );
    let ready_after = operator.wait_ready(Instant::now() + Duration::from_secs(60)).await;
    let (scrape, moved) = operator.settle(0, bench.phase_deadline(180)).await;
    let cpu = operator.cpu_time();
    let after = versions(&bench.client, &ns).await;
    let changed = after.iter().filter(|(k, v)| before.get(*k) != Some(*v)).count();
    let listed = bindings
        .list(&ListParams::default())
        .await
        .expect("list bindings")
        .items;
    let ready_now = listed.iter().filter(|b| is_ready(b)).count();
    let responsive = responds(&operator, &bindings, &first[0]).await;
    results.add(section, "SIGTERM -> exit", secs(shutdown));
    results.add(section, "start -> /readyz 200", ready_text(ready_after));
    results.add(section, "start -> reconciles settled", secs(moved - operator.started));
    results.add(section, "operator CPU time until settled", secs(cpu));
    results.add(
        section,
        "reconciles",
        format!("{} (bindings: {ready_large})", scrape.reconciles),
    );
    results.add(section, "STS calls at the wire", sts.calls().to_string());
    results.add(section, "kube_sts_api_writes_total", scrape.writes_detail());
    results.add(
        section,
        "bindings/Secrets with a new resourceVersion",
        changed.to_string(),
    );
    results.add(
        section,
        "bindings Ready afterwards",
        format!("{ready_now}/{}", listed.len()),
    );
    results.add(section, "still reconciles a touched binding", yes_no(responsive));
    results.add(section, "peak RSS of the restarted operator", mib(operator.vm_hwm()));
    operator.report_problems(&bench, &mut results, section);
    operator.stop().await;

    // ---- phase 5: unrelated Secrets, operator watching all namespaces
    let section = &format!("5. {noise} unrelated Secrets");
    bench.create_namespace(&ns_noise).await;
    let t = Instant::now();
    let noise_secrets = names("noise-", 0..noise)
        .into_iter()
        .map(|name| Secret {
            metadata: ObjectMeta {
                name: Some(name),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "value".to_string(),
                ByteString(b"not a credential".to_vec()),
            )])),
            ..Default::default()
        })
        .collect();
    create_all(
        &Api::<Secret>::namespaced(bench.client.clone(), &ns_noise),
        noise_secrets,
        bench.concurrency,
    )
    .await;
    say!(bench, "{noise} Secrets created in {ns_noise} ({})", secs(t.elapsed()));
    // Bindings of other people in a shared cluster get reconciled (and call STS) too.
    let foreign = Api::<AWSRoleBinding>::all(bench.client.clone())
        .list_metadata(&ListParams::default())
        .await
        .expect("list bindings")
        .items
        .iter()
        .filter(|b| !b.namespace().unwrap_or_default().starts_with(&ns))
        .count();
    let sts = Forwarder::start(&bench.aws["AWS_ENDPOINT_URL_STS"], &ns).await;
    let mut operator = Operator::start(&bench, "all-namespaces", None, &identity.kubeconfig, &sts, Flags::Tuned);
    let ready_after = operator.wait_ready(Instant::now() + Duration::from_secs(60)).await;
    let (scrape, moved) = operator.settle(foreign as u64, bench.phase_deadline(120)).await;
    let cpu = operator.cpu_time();
    results.add(
        section,
        format!("peak RSS, all namespaces ({ready_large} bindings + {noise} other Secrets)"),
        mib(operator.vm_hwm()),
    );
    results.add(section, "start -> /readyz 200", ready_text(ready_after));
    results.add(section, "start -> reconciles settled", secs(moved - operator.started));
    results.add(section, "operator CPU time until settled", secs(cpu));
    results.add(
        section,
        "reconciles",
        format!("{} (bindings: {ready_large} + {foreign} others)", scrape.reconciles),
    );
    results.add(
        section,
        "STS calls at the wire",
        format!("{} (for the bench's bindings: {})", sts.calls(), sts.own_calls()),
    );
    results.add(section, "kube_sts_api_writes_total", scrape.writes_detail());
    results.add(section, "bindings outside the bench's namespaces", foreign.to_string());
    let responsive = responds(&operator, &bindings, &first[0]).await;
    results.add(section, "still reconciles a touched binding", yes_no(responsive));
    operator.report_problems(&bench, &mut results, section);
    operator.stop().await;

    // ---- cleanup and the table
    say!(bench, "deleting {ns}, {ns_noise} and grant {grant_name}");
    let mut namespaces = vec![ns.clone(), ns_noise];
    namespaces.extend(run_namespaces);
    bench.cleanup(&namespaces, &grant_name).await;
    results.add("run", "driver wall time", secs(bench.started.elapsed()));
    println!();
    results.print();
    if let Some(path) = std::env::var_os("BENCH_RESULTS") {
        results.write_tsv(Path::new(&path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut values: Vec<Duration> = [5, 1, 4, 2, 3].map(Duration::from_secs).to_vec();
        assert_eq!(quantile(&mut values, 0.5), Duration::from_secs(3));
        assert_eq!(quantile(&mut values, 0.9), Duration::from_secs(5));
        assert_eq!(quantile(&mut values, 1.0), Duration::from_secs(5));
        assert_eq!(quantile(&mut values, 0.0), Duration::from_secs(1));
        assert_eq!(quantile(&mut [], 0.5), Duration::ZERO);
    }

    #[test]
    fn needles_split_across_reads_are_counted_once() {
        let body = b"Action=AssumeRole&RoleSessionName=bench-1.sa-1&Action=GetCallerIdentity";
        for size in 1..body.len() {
            let mut carry = Vec::new();
            let mut total = [0, 0];
            for chunk in body.chunks(size) {
                let [a, b] = count_needles(&mut carry, chunk, [ACTION, b"RoleSessionName=bench-1."]);
                total = [total[0] + a, total[1] + b];
            }
            assert_eq!(total, [2, 1], "reads of {size} bytes");
        }
    }
}
