//! `make bench`: throughput, memory and restart figures for kube-sts against the local
//! control plane and STS peer (`make up`). Figures are printed, never asserted.
//!
//! Run through `e2e/scripts/bench.sh`, which starts the environment, installs the CRDs and
//! builds `kube-sts` and this example with `--release`. In one run, in this order:
//!
//! 1. `BENCH_BINDINGS` (1000) bindings, one ServiceAccount subject each, in namespace
//!    `bench-<id>`, reconciled by a release operator (`--namespace`, `--sts-qps 200
//!    --sts-burst 200 --concurrency 32`): time from the first create until the last
//!    binding reports Ready=True (seen through a watch). Beside it, a bare client doing the
//!    operator's writes (one Secret create + one server-side apply of `status`) for a
//!    second set of as many bindings in `bench-<id>-baseline`, which no operator watches.
//! 2. Peak RSS (`VmHWM`) of that operator at `BENCH_BINDINGS`, and again after more
//!    bindings were added to the same namespace up to `BENCH_LARGE` (10000, or as many as
//!    the time budget allows; the table says how many).
//! 3. A restart at that size with every Secret fresh: SIGTERM, start again, wait for
//!    `/readyz` and for the reconcile count to settle; STS calls counted at the wire, the
//!    operator's `kube_sts_api_writes_total` (both expected 0) and how many objects got a
//!    new resourceVersion.
//! 4. `BENCH_NOISE_SECRETS` (20000) small unlabelled Secrets in `bench-<id>-noise`, then a
//!    fresh operator watching all namespaces: its peak RSS once synced and settled. It runs
//!    as a ServiceAccount that may read everywhere but write only in `bench-<id>`, so other
//!    people's bindings in a shared cluster are left alone (they are counted, and their
//!    failing reconciles show in the log summary).
//!
//! Env: BENCH_BINDINGS, BENCH_LARGE, BENCH_NOISE_SECRETS, BENCH_CONCURRENCY (32 requests in
//! flight for the driver's creates), BENCH_BUDGET_SECONDS (780: the large phase stops adding
//! bindings when the rest would not fit), BENCH_RESERVE_SECONDS (time kept for the phases
//! after the large one, 180), BENCH_RESULTS (also write the table as TSV there),
//! KUBE_STS_BIN (default: the `kube-sts` built next to this example).

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

use futures::{StreamExt, TryStreamExt, stream};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{Namespace, Secret, ServiceAccount},
        events::v1::Event,
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
    plan::{self, IssueSettings, Resolved},
    render::{
        self, Credentials, KEY_ACCESS_KEY_ID, KEY_SECRET_ACCESS_KEY, KEY_SESSION_TOKEN, MANAGED_BY, MANAGED_BY_LABEL,
    },
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
            deadline: started + Duration::from_secs(env_usize("BENCH_BUDGET_SECONDS", 780) as u64),
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

    async fn create_bindings(&self, namespace: &str, role: &str, names: &[String]) -> Vec<AWSRoleBinding> {
        let bindings = names.iter().map(|n| binding(n, role)).collect();
        create_all(
            &Api::namespaced(self.client.clone(), namespace),
            bindings,
            self.concurrency,
        )
        .await
    }

    /// A kubeconfig for an operator that may read everywhere (as the chart's ClusterRole
    /// allows) but write only in `namespace`: an operator watching all namespaces of a
    /// shared cluster must not touch other people's bindings and Secrets.
    async fn restricted_kubeconfig(&self, namespace: &str) -> PathBuf {
        let name = format!("kube-sts-bench-{}", self.id);
        let rules = |rules: serde_json::Value| serde_json::from_value(rules).expect("policy rules");
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
        let write: Role = Role {
            metadata: ObjectMeta {
                name: Some("operator".into()),
                ..Default::default()
            },
            rules: Some(rules(json!([
                {"apiGroups": ["kube-sts.io"], "resources": ["awsrolebindings/status"], "verbs": ["patch"]},
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch", "delete"]},
                {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            ]))),
        };
        let subject = json!([{"kind": "ServiceAccount", "name": "operator", "namespace": namespace}]);
        let read_binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": subject,
        }))
        .expect("ClusterRoleBinding");
        let write_binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "operator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "operator"},
            "subjects": subject,
        }))
        .expect("RoleBinding");
        let c = || self.client.clone();
        create_all(&Api::<ClusterRole>::all(c()), vec![read], 1).await;
        create_all(&Api::<ClusterRoleBinding>::all(c()), vec![read_binding], 1).await;
        create_all(&Api::<Role>::namespaced(c(), namespace), vec![write], 1).await;
        create_all(&Api::<RoleBinding>::namespaced(c(), namespace), vec![write_binding], 1).await;
        self.create_service_accounts(namespace, &["operator".to_string()]).await;
        let token = Api::<ServiceAccount>::namespaced(c(), namespace)
            .create_token_request(
                "operator",
                &PostParams::default(),
                &TokenRequest {
                    spec: TokenRequestSpec {
                        expiration_seconds: Some(3600),
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
        path
    }

    /// Deletes what the bench created (namespaces, grant, RBAC) and waits a while for the
    /// namespaces to go.
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
        let _ = std::fs::remove_file(self.repo.join(format!(".e2e/bench/{}-operator.kubeconfig", self.id)));
        // The namespace controller empties a namespace with one DELETE per resource type,
        // which times out (and is retried for many minutes) with 10,000s of objects: delete
        // them one by one first, the way they were created.
        let t = Instant::now();
        let mut deleted = 0;
        for ns in namespaces {
            let c = || self.client.clone();
            deleted += delete_each(&Api::<AWSRoleBinding>::namespaced(c(), ns), self.concurrency).await;
            deleted += delete_each(&Api::<Secret>::namespaced(c(), ns), self.concurrency).await;
            deleted += delete_each(&Api::<ServiceAccount>::namespaced(c(), ns), self.concurrency).await;
            deleted += delete_each(&Api::<Event>::namespaced(c(), ns), self.concurrency).await;
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
    stream::iter(objects)
        .map(|obj| {
            let api = api.clone();
            async move {
                let name = obj.meta().name.clone().unwrap_or_default();
                let mut attempt = 0u32;
                loop {
                    match api.create(&PostParams::default(), &obj).await {
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
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
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
    fn start(bench: &Bench, label: &str, namespace: Option<&str>, kubeconfig: &Path, sts: &Forwarder) -> Self {
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
            .args(["--sts-qps", "200", "--sts-burst", "200", "--concurrency", "32"])
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
            "operator {label} started (pid {}, {}), log {}",
            child.id(),
            namespace
                .map(|n| format!("--namespace {n}"))
                .unwrap_or_else(|| "all namespaces".into()),
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

/// Credentials shaped like the ones the STS peer issued (same lengths), not real ones.
fn fake_credentials(real: &Secret, arn: String, i: usize, now: Timestamp) -> Credentials {
    let len = |key: &str| real.data.as_ref().and_then(|d| d.get(key)).map_or(40, |v| v.0.len());
    let filler = |prefix: &str, n: usize| {
        let mut s = format!("{prefix}{i:08}");
        while s.len() < n {
            s.push_str("bench0123456789");
        }
        s.truncate(n.max(prefix.len()));
        s
    };
    Credentials {
        access_key_id: filler("ASIABENCH", len(KEY_ACCESS_KEY_ID)),
        secret_access_key: filler("secret", len(KEY_SECRET_ACCESS_KEY)),
        session_token: filler("token", len(KEY_SESSION_TOKEN)),
        issued_at: now,
        expiration: now + SignedDuration::from_hours(1),
        arn: Some(arn),
        note: None,
        registries: Vec::new(),
    }
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

/// The bare-client baseline: for each binding, the Secret create and the status apply the
/// operator does, with as many requests in flight as the operator has reconciles.
async fn baseline_writes(bench: &Bench, namespace: &str, bindings: &[AWSRoleBinding], template: &Secret) -> Duration {
    let settings = IssueSettings {
        cluster_name: "kubernetes".into(),
        session_tags: true,
        allow_operator_identity: false,
        default_region: bench.aws.get("AWS_REGION").cloned(),
    };
    let account = bench.aws.get("AWS_ACCOUNT_ID").cloned().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(bench.client.clone(), namespace);
    let api: Api<AWSRoleBinding> = Api::namespaced(bench.client.clone(), namespace);
    let now = Timestamp::now();
    let work: Vec<(AWSRoleBinding, Secret, AWSRoleBindingStatus)> = bindings
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let plan = plan::plan_binding(b, &Resolved::default(), &settings, None).expect("binding plans");
            let sp = &plan.subjects[0];
            let arn = format!("arn:aws:sts::{account}:assumed-role/bench/{}", sp.request.session_name);
            let creds = fake_credentials(template, arn, i, now);
            let secret = render::render_secret(&creds, &sp.target);
            let status = ready_status(b, &sp.target.name, &creds, now);
            (b.clone(), secret, status)
        })
        .collect();
    let t0 = Instant::now();
    stream::iter(work)
        .map(|(b, secret, status)| {
            let (secrets, api) = (secrets.clone(), api.clone());
            async move {
                let params = PostParams {
                    field_manager: Some(BASELINE_MANAGER.into()),
                    ..Default::default()
                };
                secrets.create(&params, &secret).await?;
                let patch = json!({
                    "apiVersion": "kube-sts.io/v1alpha1",
                    "kind": "AWSRoleBinding",
                    "status": status,
                });
                api.patch_status(
                    &b.name_any(),
                    &PatchParams::apply(BASELINE_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await?;
                Ok::<_, kube::Error>(())
            }
        })
        .buffer_unordered(bench.concurrency)
        .try_collect::<Vec<_>>()
        .await
        .expect("baseline writes");
    t0.elapsed()
}

#[tokio::main]
async fn main() {
    let bench = Bench::new().await;
    let n = env_usize("BENCH_BINDINGS", 1000).max(1);
    let large = env_usize("BENCH_LARGE", 10_000).max(n);
    let noise = env_usize("BENCH_NOISE_SECRETS", 20_000);
    let reserve = Duration::from_secs(env_usize("BENCH_RESERVE_SECONDS", 180) as u64);
    let ns = format!("bench-{}", bench.id);
    let ns_baseline = format!("{ns}-baseline");
    let ns_noise = format!("{ns}-noise");
    let grant_name = format!("bench-{}", bench.id);
    let mut results = Results::default();
    say!(
        bench,
        "run {}: {n} bindings, large {large}, {noise} noise Secrets, {} requests in flight, budget {}",
        bench.id,
        bench.concurrency,
        secs(bench.deadline - bench.started)
    );

    // ---- setup: role, namespace, grant, ServiceAccounts
    let role = bench.create_role(&format!("bench-{}", bench.id));
    bench.create_namespace(&ns).await;
    let mut grant = AWSRoleGrant::new(
        &grant_name,
        AWSRoleGrantSpec {
            namespaces: Some(vec![ns.clone()]),
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
        "role {role}, namespace {ns}, grant, {n} ServiceAccounts ({})",
        secs(t.elapsed())
    );

    // ---- phase 1: N bindings to Ready through the operator
    let section = &format!("1. {n} bindings to Ready");
    let sts = Forwarder::start(&bench.aws["AWS_ENDPOINT_URL_STS"], &ns).await;
    let mut operator = Operator::start(&bench, "a", Some(&ns), &bench.kubeconfig, &sts);
    if operator
        .wait_ready(Instant::now() + Duration::from_secs(60))
        .await
        .is_none()
    {
        results.add(section, "operator /readyz", "not 200 within 60 s");
    }
    let bindings: Api<AWSRoleBinding> = Api::namespaced(bench.client.clone(), &ns);
    let mut watch = ReadyWatch::start(bindings.clone()).await;
    let t0 = Instant::now();
    bench.create_bindings(&ns, &role, &first).await;
    let created = t0.elapsed();
    say!(bench, "{n} bindings created in {}", secs(created));
    let (ready, last) = watch
        .wait_all(&bench, &first, Instant::now() + Duration::from_secs(300))
        .await;
    let operator_time = last.map(|l| l - t0).unwrap_or_default();
    assert!(
        ready == n,
        "only {ready}/{n} bindings Ready within 300 s; see {}",
        operator.log.display()
    );
    let (scrape, _) = operator.settle(0, Instant::now() + Duration::from_secs(60)).await;
    let hwm_small = operator.vm_hwm();
    results.add(
        section,
        "operator: first create -> last Ready=True",
        secs(operator_time),
    );
    results.add(section, "  of which the driver's binding creates", secs(created));
    results.add(section, "  operator CPU time", secs(operator.cpu_time()));
    results.add(
        section,
        "  bindings/s",
        format!("{:.0}", n as f64 / operator_time.as_secs_f64()),
    );
    results.add(section, "  STS calls at the wire", sts.calls().to_string());
    results.add(section, "  reconciles", scrape.reconciles.to_string());
    results.add(section, "  API writes (operator metric)", scrape.writes_detail());

    // The baseline: the same writes from a bare client, for bindings no operator watches.
    bench.create_namespace(&ns_baseline).await;
    let plain = names("sa-", 0..n);
    let t = Instant::now();
    let plain_bindings = bench.create_bindings(&ns_baseline, &role, &plain).await;
    say!(
        bench,
        "{n} baseline bindings created in {} (not timed)",
        secs(t.elapsed())
    );
    let template = Api::<Secret>::namespaced(bench.client.clone(), &ns)
        .list(
            &ListParams::default()
                .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))
                .limit(1),
        )
        .await
        .expect("list managed Secrets")
        .items
        .pop()
        .expect("the operator wrote Secrets");
    let baseline = baseline_writes(&bench, &ns_baseline, &plain_bindings, &template).await;
    results.add(
        section,
        "bare client: Secret create + status apply per binding",
        secs(baseline),
    );
    results.add(
        section,
        "ratio operator / bare client",
        format!("{:.2}", operator_time.as_secs_f64() / baseline.as_secs_f64()),
    );
    let _ = Api::<Namespace>::all(bench.client.clone())
        .delete(&ns_baseline, &DeleteParams::background())
        .await;

    // ---- phase 2a: peak RSS at N and at the large count (same operator, more bindings)
    let section = "2. operator peak RSS (VmHWM)";
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

    // ---- phase 3: restart with every Secret fresh
    let section = &format!("3. restart at {ready_large} bindings");
    let before = versions(&bench.client, &ns).await;
    let shutdown = operator.stop().await;
    let sts = Forwarder::start(&bench.aws["AWS_ENDPOINT_URL_STS"], &ns).await;
    let mut operator = Operator::start(&bench, "a-restarted", Some(&ns), &bench.kubeconfig, &sts);
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

    // ---- phase 2b: unrelated Secrets, operator watching all namespaces
    let section = &format!("2. {noise} unrelated Secrets");
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
    let kubeconfig = bench.restricted_kubeconfig(&ns).await;
    let sts = Forwarder::start(&bench.aws["AWS_ENDPOINT_URL_STS"], &ns).await;
    let mut operator = Operator::start(&bench, "all-namespaces", None, &kubeconfig, &sts);
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
    say!(bench, "deleting {ns}, {ns_baseline}, {ns_noise} and grant {grant_name}");
    bench.cleanup(&[ns.clone(), ns_baseline, ns_noise], &grant_name).await;
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
