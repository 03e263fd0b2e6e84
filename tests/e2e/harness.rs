//! What every end-to-end test stands on: the real control plane and STS peer started by
//! `make up` (files under `.e2e/`), an operator process per test scoped to the test's own
//! namespace, and a TCP forwarder in front of the STS peer that counts STS calls at the
//! wire and can cut the peer off.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use kube_sts::crd::AWSRoleBinding;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub struct Env {
    pub repo: PathBuf,
    pub kubeconfig: PathBuf,
    /// The operator's AWS identity and endpoints (`.e2e/aws.env`).
    pub aws: HashMap<String, String>,
    /// Admin AWS identity for creating roles (`.e2e/aws-admin.env`).
    pub admin: HashMap<String, String>,
    pub python: PathBuf,
}

fn read_env_file(path: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}; start the environment with `make up`", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let e2e = repo.join(".e2e");
        let venv = Command::new("bash")
            .arg(repo.join("e2e/scripts/sts-venv.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("sts-venv.sh runs");
        assert!(venv.status.success(), "sts-venv.sh failed");
        let venv = String::from_utf8(venv.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        Env {
            kubeconfig: e2e.join("kubeconfig"),
            aws: read_env_file(&e2e.join("aws.env")),
            admin: read_env_file(&e2e.join("aws-admin.env")),
            python: PathBuf::from(venv).join("bin/python"),
            repo,
        }
    })
}

pub async fn client() -> Client {
    let kubeconfig = Kubeconfig::read_from(&env().kubeconfig).expect("kubeconfig readable; run `make up`");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    Client::try_from(config).expect("client")
}

pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&env().kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            std::io::Write::write_all(&mut input, text.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{n}-{:x}", std::process::id() % 10000, nanos % 0xfffff)
}

/// A namespace of the test's own, with ServiceAccounts; deleted at drop.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    pub async fn new(prefix: &str) -> Self {
        let client = client().await;
        let name = unique(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        TestNamespace { name, client }
    }

    pub async fn service_account(&self, name: &str) {
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        Api::<ServiceAccount>::namespaced(self.client.clone(), &self.name)
            .create(&PostParams::default(), &sa)
            .await
            .expect("create SA");
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub fn bindings(&self) -> Api<AWSRoleBinding> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// `kubectl apply` of YAML into this namespace; returns the output.
    pub fn apply(&self, yaml: &str) -> Output {
        kubectl(
            &[
                "apply",
                "-n",
                &self.name,
                "--server-side",
                "--field-manager=e2e-test",
                "-f",
                "-",
            ],
            Some(yaml),
        )
    }

    pub fn apply_ok(&self, yaml: &str) {
        let out = self.apply(yaml);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"], None);
    }
}

/// Creates an IAM role in the STS peer (as the admin) that trusts `principal`.
pub fn create_role(name: &str, principal: &str, external_id: Option<&str>, tag_session: bool) -> String {
    create_role_allowing(name, principal, external_id, tag_session, &[])
}

/// Like `create_role`; the role's sessions may also call `actions`.
pub fn create_role_allowing(
    name: &str,
    principal: &str,
    external_id: Option<&str>,
    tag_session: bool,
    actions: &[&str],
) -> String {
    let mut cmd = Command::new(&env().python);
    cmd.arg(env().repo.join("e2e/sts/iam.py"))
        .args(["create-role", "--name", name, "--principal", principal]);
    if let Some(id) = external_id {
        cmd.args(["--external-id", id]);
    }
    if !tag_session {
        cmd.arg("--no-tag-session");
    }
    for action in actions {
        cmd.args(["--allow", action]);
    }
    let out = cmd.envs(&env().admin).output().expect("iam.py runs");
    assert!(
        out.status.success(),
        "create-role failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// An IAM user of the STS peer with long-term keys, allowed `actions` (besides
/// GetCallerIdentity).
pub struct IamUser {
    pub access_key_id: String,
    pub secret_access_key: String,
}

pub fn create_user(name: &str, actions: &[&str]) -> IamUser {
    let mut cmd = Command::new(&env().python);
    cmd.arg(env().repo.join("e2e/sts/iam.py"))
        .args(["create-user", "--name", name]);
    for action in actions {
        cmd.args(["--allow", action]);
    }
    let out = cmd.envs(&env().admin).output().expect("iam.py runs");
    assert!(
        out.status.success(),
        "create-user failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    IamUser {
        access_key_id: lines[0].into(),
        secret_access_key: lines[1].into(),
    }
}

pub fn operator_arn() -> String {
    env().aws["KUBE_STS_OPERATOR_ARN"].clone()
}

pub fn account() -> String {
    env().aws["AWS_ACCOUNT_ID"].clone()
}

/// A TCP forwarder between one operator and the STS peer. Counts the STS actions sent
/// through it and can refuse connections to stand in for an unreachable STS.
#[derive(Clone)]
pub struct Forwarder {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Ask the STS peer for ECR tokens with moto's own (long past) expiry.
    ecr_upstream_expiry: Arc<AtomicBool>,
    actions: Arc<Mutex<Vec<String>>>,
    bodies: Arc<Mutex<Vec<String>>>,
    /// Answer STS requests with this error `(code, message)` instead of forwarding them
    /// (only those containing the third part, when given).
    failure: Arc<Mutex<Option<InjectedFailure>>>,
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%' && i + 3 <= bytes.len())
            .then(|| u8::from_str_radix(&s[i + 1..i + 3], 16).ok())
            .flatten();
        match (bytes[i], hex) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (byte, None) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The AWS actions in a chunk of requests: query-protocol `Action=` (STS) and JSON-protocol
/// `X-Amz-Target: <service>.<Action>` headers (ECR).
fn actions_in(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let word = |rest: &str| -> String { rest.chars().take_while(|c| c.is_ascii_alphanumeric()).collect() };
    let query = text.match_indices("Action=").map(|(i, _)| word(&text[i + 7..]));
    let json = text.lines().filter_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("x-amz-target")
            .then(|| word(value.trim().rsplit('.').next().unwrap_or_default()))
    });
    query.chain(json).collect()
}

/// The request chunk with one more (unsigned) header after the request line.
fn with_header(chunk: &[u8], header: &str) -> Vec<u8> {
    match chunk.windows(2).position(|w| w == b"\r\n") {
        Some(end) => [&chunk[..end + 2], header.as_bytes(), b"\r\n", &chunk[end + 2..]].concat(),
        None => chunk.to_vec(),
    }
}

impl Forwarder {
    pub async fn start() -> Self {
        let upstream: String = env().aws["AWS_ENDPOINT_URL_STS"]
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let fwd = Forwarder {
            addr: listener.local_addr().unwrap(),
            up: Arc::new(AtomicBool::new(true)),
            ecr_upstream_expiry: Arc::default(),
            actions: Arc::default(),
            bodies: Arc::default(),
            failure: Arc::default(),
        };
        let f = fwd.clone();
        // A runtime of its own: tests block their thread on kubectl, which must not stall STS.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !f.up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let f = f.clone();
                    tokio::spawn(async move {
                        // The first chunk decides whether the peer is asked at all (each
                        // connection is checked when it opens; injected answers close it).
                        let mut first = vec![0u8; 64 * 1024];
                        let n = match inbound.read(&mut first).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let failure = f.failure.lock().unwrap().clone();
                        let text = String::from_utf8_lossy(&first[..n]).into_owned();
                        let refused = failure.filter(|(_, _, needle)| {
                            !actions_in(&first[..n]).is_empty()
                                && needle.as_ref().is_none_or(|n| text.contains(n.as_str()))
                        });
                        if let Some((code, message, _)) = refused {
                            f.record(&first[..n]);
                            let _ = inbound.write_all(sts_error_response(&code, &message).as_bytes()).await;
                            let _ = inbound.shutdown().await;
                            return;
                        }
                        let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        if outbound.write_all(&f.record(&first[..n])).await.is_err() {
                            return;
                        }
                        let (mut ri, mut wi) = inbound.split();
                        let (mut ro, mut wo) = outbound.split();
                        let client_to_peer = async {
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = match ri.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                if !f.up.load(Ordering::SeqCst) {
                                    break;
                                }
                                if wo.write_all(&f.record(&buf[..n])).await.is_err() {
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
            })
        });
        fwd
    }

    /// Counts the actions of a request chunk and keeps it; returns what to send upstream.
    fn record(&self, chunk: &[u8]) -> Vec<u8> {
        let actions = actions_in(chunk);
        if actions.is_empty() {
            return chunk.to_vec();
        }
        self.bodies
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(chunk).into_owned());
        let ask_upstream_expiry =
            self.ecr_upstream_expiry.load(Ordering::SeqCst) && actions.iter().any(|a| a == "GetAuthorizationToken");
        self.actions.lock().unwrap().extend(actions);
        if ask_upstream_expiry {
            with_header(chunk, "X-Kube-Sts-Ecr-Expires: upstream")
        } else {
            chunk.to_vec()
        }
    }

    /// From now on (for connections opened from now on), STS requests are answered with
    /// the error `code` as STS sends it, without reaching the peer; `None` forwards again.
    pub fn fail_with(&self, failure: Option<(&str, &str)>) {
        *self.failure.lock().unwrap() = failure.map(|(c, m)| (c.to_string(), m.to_string(), None));
    }

    /// Like `fail_with`, only for requests whose text contains `needle` (e.g.
    /// `DurationSeconds=7200`); the others reach the peer.
    pub fn fail_requests_containing(&self, needle: &str, code: &str, message: &str) {
        *self.failure.lock().unwrap() = Some((code.to_string(), message.to_string(), Some(needle.to_string())));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, ECR tokens come with the STS peer's own expiry (moto: 2015-01-01).
    pub fn ecr_tokens_already_expired(&self) {
        self.ecr_upstream_expiry.store(true, Ordering::SeqCst);
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    pub fn count(&self, action: &str) -> usize {
        self.actions.lock().unwrap().iter().filter(|a| *a == action).count()
    }

    /// Form parameters of every request for `action`, in order.
    pub fn requests(&self, action: &str) -> Vec<HashMap<String, String>> {
        let bodies = self.bodies.lock().unwrap();
        bodies
            .iter()
            .map(|raw| {
                let body = raw.split_once("\r\n\r\n").map_or(raw.as_str(), |(_, body)| body);
                body.trim_end()
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (url_decode(k), url_decode(v)))
                    .collect::<HashMap<String, String>>()
            })
            .filter(|params| params.get("Action").map(String::as_str) == Some(action))
            .collect()
    }

    /// The raw bytes (as text) of every request chunk that carried `action`: headers
    /// included, e.g. to see which access key signed it.
    pub fn raw(&self, action: &str) -> Vec<String> {
        let bodies = self.bodies.lock().unwrap();
        bodies
            .iter()
            .filter(|raw| actions_in(raw.as_bytes()).iter().any(|a| a == action))
            .cloned()
            .collect()
    }

    pub fn total(&self) -> usize {
        self.actions.lock().unwrap().len()
    }
}

/// An error the forwarder answers instead of the peer: `(code, message, only requests
/// containing this)`.
type InjectedFailure = (String, String, Option<String>);

/// An STS query-protocol error answer (what STS sends for a refused request).
fn sts_error_response(code: &str, message: &str) -> String {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    );
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A kubeconfig for the API server of `.e2e/kubeconfig` with a bearer token.
pub fn token_kubeconfig(path: &Path, token: &str, namespace: &str) {
    let admin = Kubeconfig::read_from(&env().kubeconfig).unwrap();
    let cluster = admin.clusters[0].cluster.clone().unwrap();
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {
            "server": cluster.server,
            "certificate-authority-data": cluster.certificate_authority_data,
        }}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "e2e", "user": "operator", "namespace": namespace}}],
        "current-context": "operator",
    });
    std::fs::write(path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

/// A `kube-sts run` process watching one namespace, talking to STS through a forwarder.
pub struct Operator {
    child: Option<Child>,
    pub log: PathBuf,
    pub metrics_addr: SocketAddr,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Operator {
    pub fn start(namespace: &str, sts: &Forwarder, extra: &[&str]) -> Self {
        Self::start_with_kubeconfig(namespace, sts, extra, &env().kubeconfig)
    }

    /// Like `start`, with the Kubernetes identity of another kubeconfig (e.g. a
    /// ServiceAccount token).
    pub fn start_with_kubeconfig(namespace: &str, sts: &Forwarder, extra: &[&str], kubeconfig: &Path) -> Self {
        Self::spawn(namespace, sts, extra, kubeconfig, None)
    }

    /// Like `start`, with the process's clock shifted by `offset` (libfaketime's `faketime`,
    /// e.g. `+2h`): the wall clock only, timers run as usual.
    pub fn start_with_clock_offset(namespace: &str, sts: &Forwarder, extra: &[&str], offset: &str) -> Self {
        Self::spawn(namespace, sts, extra, &env().kubeconfig, Some(offset))
    }

    fn spawn(namespace: &str, sts: &Forwarder, extra: &[&str], kubeconfig: &Path, clock_offset: Option<&str>) -> Self {
        let logs = env().repo.join(".e2e/logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = logs.join(format!("operator-{namespace}-{}.log", unique("run")));
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let file = std::fs::File::create(&log).unwrap();
        let mut command = match clock_offset {
            Some(offset) => {
                let mut c = Command::new("faketime");
                c.args(["-f", offset, env!("CARGO_BIN_EXE_kube-sts")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_kube-sts")),
        };
        let child = command
            .arg("run")
            .args(["--namespace", namespace, "--log-format", "json", "--log-level"])
            .arg(std::env::var("E2E_OPERATOR_LOG").unwrap_or_else(|_| "kube_sts=debug,info".into()))
            .args([
                "--sts-endpoint",
                &sts.url(),
                "--metrics-addr",
                &metrics_addr.to_string(),
                "--cluster-name",
                "e2e",
            ])
            .args(extra)
            .env_clear()
            // Read only by libfaketime, when the clock is shifted: timers stay real.
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", kubeconfig)
            .env("AWS_ACCESS_KEY_ID", &env().aws["AWS_ACCESS_KEY_ID"])
            .env("AWS_SECRET_ACCESS_KEY", &env().aws["AWS_SECRET_ACCESS_KEY"])
            .env("AWS_REGION", &env().aws["AWS_REGION"])
            .env("AWS_ENDPOINT_URL_ECR", sts.url())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("operator starts");
        Operator {
            child: Some(child),
            log,
            metrics_addr,
        }
    }

    /// Sends SIGTERM and waits for the process to end; returns how it ended.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().unwrap() {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("operator did not stop on SIGTERM within 20 s");
        }
        None
    }

    /// SIGKILL: the process gets no chance to clean up (e.g. to release a Lease).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the process synced its caches and finished at least one reconcile.
    pub async fn wait_reconciled(&self) {
        eventually("operator synced its caches", Duration::from_secs(30), || async {
            self.logs().contains("caches synced").then_some(())
        })
        .await;
        eventually("a reconcile finished", Duration::from_secs(30), || async {
            let m = self.metrics().await;
            m.lines()
                .any(|l| l.starts_with("kube_sts_reconcile_duration_seconds_count") && !l.ends_with(" 0"))
                .then_some(())
        })
        .await;
    }

    /// The exit status once the process has ended by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().unwrap()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(self.metrics_addr).await.expect("metrics endpoint");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
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

/// The Ready condition of a binding as `(status, reason, message)`.
pub async fn ready(api: &Api<AWSRoleBinding>, name: &str) -> Option<(String, String, String)> {
    let b = api.get_opt(name).await.ok()??;
    let st = b.status?;
    if st.observed_generation != b.metadata.generation {
        return None;
    }
    st.conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits for Ready with the given status and reason; returns the message.
pub async fn wait_ready(api: &Api<AWSRoleBinding>, name: &str, status: &str, reason: &str) -> String {
    eventually(
        &format!("{name} Ready={status} reason {reason}"),
        Duration::from_secs(60),
        || async {
            ready(api, name)
                .await
                .filter(|(s, r, _)| s == status && r == reason)
                .map(|(_, _, m)| m)
        },
    )
    .await
}

pub fn secret_value(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

pub async fn delete_binding(api: &Api<AWSRoleBinding>, name: &str) {
    api.delete(name, &DeleteParams::background())
        .await
        .expect("delete binding");
}

pub fn resource_versions(secrets: &[Secret]) -> Vec<(String, String)> {
    secrets
        .iter()
        .map(|s| (s.name_any(), s.resource_version().unwrap_or_default()))
        .collect()
}

/// A grant letting `namespace` bind roles matching `role_glob`.
pub fn grant_yaml(name: &str, namespace: &str, role_glob: &str) -> String {
    format!(
        "apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleGrant\nmetadata: {{name: {name}}}\nspec:\n  namespaces: [{namespace}]\n  roleArns: [\"{role_glob}\"]\n"
    )
}

/// An AWSRoleBinding of `role` for `subjects`, with `extra` spec lines (indented two spaces).
pub fn binding_yaml(name: &str, role: &str, subjects: &[&str], extra: &str) -> String {
    let subjects: Vec<String> = subjects.iter().map(|s| format!("{{name: {s}}}")).collect();
    format!(
        "apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleBinding\nmetadata: {{name: {name}}}\nspec:\n  roleArn: {role}\n  subjects: [{}]\n{extra}",
        subjects.join(", ")
    )
}

/// The Secrets the operator manages in `ns`.
pub async fn managed_secrets(ns: &TestNamespace) -> Vec<Secret> {
    ns.secrets()
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=kube-sts"))
        .await
        .unwrap()
        .items
}
