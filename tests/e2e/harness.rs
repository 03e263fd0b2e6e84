//! What every end-to-end test stands on: the real control plane and STS peer started by
//! `make up` (files under `.e2e/`), an operator process per test scoped to the test's own
//! namespace, and a TCP forwarder in front of the STS peer that counts STS calls at the
//! wire and can cut the peer off.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::process::CommandExt,
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
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
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
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match poll(timeout, check).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for: {what}"),
    }
}

/// Polls `check` until it returns `Some`, or gives `None` once `timeout` has passed.
pub async fn poll<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
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
        Self::named(&unique(prefix)).await
    }

    /// A namespace of exactly this name.
    pub async fn named(name: &str) -> Self {
        let client = client().await;
        let name = name.to_string();
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

    /// Creates a Secret in this namespace with `data` (as stringData).
    pub async fn create_secret(&self, name: &str, data: &[(&str, &str)]) {
        let data: std::collections::BTreeMap<&str, &str> = data.iter().copied().collect();
        let secret: Secret =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "stringData": data})).unwrap();
        self.secrets().create(&PostParams::default(), &secret).await.unwrap();
    }

    /// A new IAM user of the STS peer allowed `actions` (a team's own identity), with its
    /// keys in the Secret `name` of this namespace (for `sourceCredentialsSecretRef`).
    pub async fn team_keys(&self, name: &str, actions: &[&str]) -> IamUser {
        let user = create_user(&unique("team"), actions);
        self.create_secret(
            name,
            &[
                ("AWS_ACCESS_KEY_ID", &user.access_key_id),
                ("AWS_SECRET_ACCESS_KEY", &user.secret_access_key),
            ],
        )
        .await;
        user
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

/// One STS (or ECR) request the forwarder saw, and the answer it gave back.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// When the request had arrived in full.
    pub at: jiff::Timestamp,
    /// The request as text: head, then the (de-chunked) body.
    pub request: String,
    pub actions: Vec<String>,
    /// The answer's body as the client got it (after any rewriting); empty when none came.
    pub answer: String,
}

impl Exchange {
    /// The form parameters of the request body.
    pub fn params(&self) -> HashMap<String, String> {
        let raw = &self.request;
        let body = raw.split_once("\r\n\r\n").map_or(raw.as_str(), |(_, body)| body);
        body.trim_end()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (url_decode(k), url_decode(v)))
            .collect()
    }

    /// The access key that signed the request (`Credential=<key>/` of SigV4).
    pub fn signing_key(&self) -> Option<String> {
        let (_, rest) = self.request.split_once("Credential=")?;
        Some(rest.split('/').next()?.to_string())
    }

    /// The text of the first `<tag>` element of the answer.
    pub fn answer_element(&self, tag: &str) -> Option<String> {
        let open = format!("<{tag}>");
        let start = self.answer.find(&open)? + open.len();
        let len = self.answer[start..].find(&format!("</{tag}>"))?;
        Some(self.answer[start..start + len].to_string())
    }
}

/// An HTTP/1.1 forwarder between one client (an operator, or a consumer of its Secrets) and
/// the STS peer. It reads each request and answer in full (Content-Length or chunked), so
/// it can count STS actions per request, answer a request with an injected error, drop
/// requests as an unreachable STS would, and compress time: rewrite the `<Expiration>` of
/// every answer to `now + S`, so the operator sees sessions of S seconds while the peer
/// (moto, which never expires a session) keeps them valid. Everything else passes through
/// byte for byte, so signatures verify at the peer.
#[derive(Clone)]
pub struct Forwarder {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Ask the STS peer for ECR tokens with moto's own (long past) expiry.
    ecr_upstream_expiry: Arc<AtomicBool>,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
    /// Answer STS requests with this error `(code, message)` instead of forwarding them
    /// (only those containing the third part, when given).
    failure: Arc<Mutex<Option<InjectedFailure>>>,
    /// Rewrite `<Expiration>` in answers to this long after the answer passes.
    session_lifetime: Arc<Mutex<Option<Duration>>>,
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

/// The AWS actions of a request: query-protocol `Action=` (STS) and JSON-protocol
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

/// The request head with one more (unsigned) header after the request line.
fn with_header(head: &[u8], header: &str) -> Vec<u8> {
    match head.windows(2).position(|w| w == b"\r\n") {
        Some(end) => [&head[..end + 2], header.as_bytes(), b"\r\n", &head[end + 2..]].concat(),
        None => head.to_vec(),
    }
}

/// The value of header `name` in an HTTP head (the first such header).
fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
    })
}

fn has_token(head: &[u8], name: &str, token: &str) -> bool {
    header(head, name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// How the body of an HTTP message ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

fn framing(head: &[u8], response: bool) -> std::io::Result<Framing> {
    if has_token(head, "transfer-encoding", "chunked") {
        return Ok(Framing::Chunked);
    }
    match header(head, "content-length") {
        Some(n) => n
            .parse()
            .map(Framing::Length)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad Content-Length")),
        None if response => Ok(Framing::UntilClose),
        None => Ok(Framing::Empty),
    }
}

/// Reads an HTTP head up to and including its empty line; `None` at a clean end of stream.
async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        if r.read_until(b'\n', &mut head).await? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        if matches!(&head[start..], b"\r\n" | b"\n") {
            if start == 0 {
                head.clear(); // a stray empty line between messages
                continue;
            }
            return Ok(Some(head));
        }
    }
}

/// Reads a body framed by `framing`: `(as sent, decoded)`.
async fn read_body<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    framing: Framing,
) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    match framing {
        Framing::Empty => Ok((Vec::new(), Vec::new())),
        Framing::Length(n) => {
            let mut body = vec![0u8; n];
            r.read_exact(&mut body).await?;
            Ok((body.clone(), body))
        }
        Framing::UntilClose => {
            let mut body = Vec::new();
            r.read_to_end(&mut body).await?;
            Ok((body.clone(), body))
        }
        Framing::Chunked => {
            let (mut raw, mut body) = (Vec::new(), Vec::new());
            loop {
                let start = raw.len();
                if r.read_until(b'\n', &mut raw).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                let line = String::from_utf8_lossy(&raw[start..]).into_owned();
                let size = usize::from_str_radix(line.split(';').next().unwrap_or_default().trim(), 16)
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        let start = raw.len();
                        if r.read_until(b'\n', &mut raw).await? == 0 || matches!(&raw[start..], b"\r\n" | b"\n") {
                            return Ok((raw, body));
                        }
                    }
                }
                let mut chunk = vec![0u8; size];
                r.read_exact(&mut chunk).await?;
                raw.extend_from_slice(&chunk);
                body.extend_from_slice(&chunk);
                r.read_until(b'\n', &mut raw).await?;
            }
        }
    }
}

/// `body` with the text of every `<Expiration>` element replaced by `expiration`.
fn rewrite_expiration(body: &str, expiration: &str) -> Option<String> {
    const OPEN: &str = "<Expiration>";
    const CLOSE: &str = "</Expiration>";
    if !body.contains(OPEN) {
        return None;
    }
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(start) = rest.find(OPEN) {
        let Some(len) = rest[start..].find(CLOSE) else { break };
        out.push_str(&rest[..start + OPEN.len()]);
        out.push_str(expiration);
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    Some(out)
}

/// A response head for a body of `len` bytes: its framing headers replaced by Content-Length.
fn head_with_length(head: &[u8], len: usize) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let name = line.split_once(':').map(|(n, _)| n.trim().to_ascii_lowercase());
        if matches!(name.as_deref(), Some("content-length" | "transfer-encoding")) {
            continue;
        }
        if line.trim().is_empty() {
            out.push_str(&format!("Content-Length: {len}\r\n"));
        }
        out.push_str(line);
    }
    out.into_bytes()
}

type Peer = (
    tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
);

/// An answer read from the peer: head and body as sent, decoded body, and whether the
/// peer closes the connection after it.
struct Answer {
    head: Vec<u8>,
    raw: Vec<u8>,
    body: Vec<u8>,
    close: bool,
}

/// Sends one request over `peer` and reads its final answer (interim 1xx answers are
/// dropped: the client already got its `100 Continue` from the forwarder).
async fn exchange(peer: &mut Peer, head: &[u8], body: &[u8], is_head: bool) -> std::io::Result<Option<Answer>> {
    let (reader, writer) = peer;
    writer.write_all(head).await?;
    writer.write_all(body).await?;
    loop {
        let Some(head) = read_head(reader).await? else {
            return Ok(None);
        };
        let status: u16 = String::from_utf8_lossy(&head)
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if (100..200).contains(&status) {
            continue;
        }
        let framing = if is_head || status == 204 || status == 304 {
            Framing::Empty
        } else {
            framing(&head, true)?
        };
        let (raw, body) = read_body(reader, framing).await?;
        let close = framing == Framing::UntilClose || has_token(&head, "connection", "close");
        return Ok(Some(Answer { head, raw, body, close }));
    }
}

impl Forwarder {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1").await
    }

    /// A forwarder that pods on the local node reach: on the host's end of the node link.
    pub async fn start_for_pods() -> Self {
        Self::start_on(&node_env("KUBE_STS_NODE_HOST_ADDRESS")).await
    }

    async fn start_on(ip: &str) -> Self {
        let upstream: String = env().aws["AWS_ENDPOINT_URL_STS"]
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let fwd = Forwarder {
            addr: listener.local_addr().unwrap(),
            up: Arc::new(AtomicBool::new(true)),
            ecr_upstream_expiry: Arc::default(),
            exchanges: Arc::default(),
            failure: Arc::default(),
            session_lifetime: Arc::default(),
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
                    let Ok((inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !f.up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let (f, upstream) = (f.clone(), upstream.clone());
                    tokio::spawn(async move {
                        let _ = f.serve(inbound, &upstream).await;
                    });
                }
            })
        });
        fwd
    }

    /// Serves one client connection, request by request (keep-alive included).
    async fn serve(&self, inbound: TcpStream, upstream: &str) -> std::io::Result<()> {
        let (reader, mut client) = inbound.into_split();
        let mut reader = tokio::io::BufReader::new(reader);
        let mut peer: Option<Peer> = None;
        loop {
            let Some(head) = read_head(&mut reader).await? else {
                return Ok(());
            };
            if has_token(&head, "expect", "100-continue") {
                client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            }
            let (raw_body, body) = read_body(&mut reader, framing(&head, false)?).await?;
            // Down: the request goes unanswered and the connection drops, as when STS is
            // unreachable mid-connection.
            if !self.up.load(Ordering::SeqCst) {
                return Ok(());
            }
            let actions = actions_in(&[head.as_slice(), &body].concat());
            let index = (!actions.is_empty()).then(|| {
                let mut exchanges = self.exchanges.lock().unwrap();
                exchanges.push(Exchange {
                    at: jiff::Timestamp::now(),
                    request: format!("{}{}", String::from_utf8_lossy(&head), String::from_utf8_lossy(&body)),
                    actions: actions.clone(),
                    answer: String::new(),
                });
                exchanges.len() - 1
            });
            let failure = self.failure.lock().unwrap().clone();
            let request = [head.as_slice(), &body].concat();
            let text = String::from_utf8_lossy(&request);
            let refused = failure
                .filter(|(_, _, needle)| index.is_some() && needle.as_ref().is_none_or(|n| text.contains(n.as_str())));
            if let Some((code, message, _)) = refused {
                let answer = sts_error_response(&code, &message);
                self.exchanges.lock().unwrap()[index.unwrap()].answer = answer.clone();
                client.write_all(answer.as_bytes()).await?;
                return client.shutdown().await;
            }
            let head = if self.ecr_upstream_expiry.load(Ordering::SeqCst)
                && actions.iter().any(|a| a == "GetAuthorizationToken")
            {
                with_header(&head, "X-Kube-Sts-Ecr-Expires: upstream")
            } else {
                head
            };
            let is_head = head.starts_with(b"HEAD ");
            // A kept-alive connection to the peer may have been closed meanwhile: one retry
            // on a fresh connection.
            let mut answer = None;
            for _ in 0..2 {
                let fresh = peer.is_none();
                if fresh {
                    let stream = TcpStream::connect(upstream).await?;
                    let (r, w) = stream.into_split();
                    peer = Some((tokio::io::BufReader::new(r), w));
                }
                match exchange(peer.as_mut().unwrap(), &head, &raw_body, is_head).await {
                    Ok(Some(a)) => {
                        answer = Some(a);
                        break;
                    }
                    Ok(None) | Err(_) if !fresh => peer = None,
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            let Some(Answer { head, raw, body, close }) = answer else {
                return Ok(());
            };
            let lifetime = *self.session_lifetime.lock().unwrap();
            let rewritten = lifetime.and_then(|lifetime| {
                let expiration = jiff::Timestamp::now() + lifetime;
                rewrite_expiration(&String::from_utf8_lossy(&body), &kube_sts::render::rfc3339(expiration))
            });
            let (out_head, out_body, text) = match rewritten {
                Some(text) => (head_with_length(&head, text.len()), text.clone().into_bytes(), text),
                None => (head, raw, String::from_utf8_lossy(&body).into_owned()),
            };
            if let Some(i) = index {
                self.exchanges.lock().unwrap()[i].answer = text;
            }
            client.write_all(&out_head).await?;
            client.write_all(&out_body).await?;
            if close {
                peer = None;
            }
            if close || has_token(&out_head, "connection", "close") {
                return client.shutdown().await;
            }
        }
    }

    /// From now on, STS requests are answered with the error `code` as STS sends it,
    /// without reaching the peer; `None` forwards again.
    pub fn fail_with(&self, failure: Option<(&str, &str)>) {
        *self.failure.lock().unwrap() = failure.map(|(c, m)| (c.to_string(), m.to_string(), None));
    }

    /// Like `fail_with`, only for requests whose text contains `needle` (e.g.
    /// `DurationSeconds=7200`); the others reach the peer.
    pub fn fail_requests_containing(&self, needle: &str, code: &str, message: &str) {
        *self.failure.lock().unwrap() = Some((code.to_string(), message.to_string(), Some(needle.to_string())));
    }

    /// Compressed time: from now on, every `<Expiration>` in an answer says `lifetime`
    /// after the moment the answer passes (`None`: the peer's own).
    pub fn session_lifetime(&self, lifetime: Option<Duration>) {
        *self.session_lifetime.lock().unwrap() = lifetime;
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, ECR tokens come with the STS peer's own expiry (moto: 2015-01-01).
    pub fn ecr_tokens_already_expired(&self) {
        self.ecr_upstream_expiry.store(true, Ordering::SeqCst);
    }

    /// Down: new connections are refused and requests on open ones dropped unanswered.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    pub fn count(&self, action: &str) -> usize {
        self.exchanges(action).len()
    }

    /// Every request for `action` with its answer, in order.
    pub fn exchanges(&self, action: &str) -> Vec<Exchange> {
        self.exchanges
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.actions.iter().any(|a| a == action))
            .cloned()
            .collect()
    }

    /// Form parameters of every request for `action`, in order.
    pub fn requests(&self, action: &str) -> Vec<HashMap<String, String>> {
        self.exchanges(action).iter().map(Exchange::params).collect()
    }

    /// Every request that carried `action` as text, headers included, e.g. to see which
    /// access key signed it.
    pub fn raw(&self, action: &str) -> Vec<String> {
        self.exchanges(action).into_iter().map(|e| e.request).collect()
    }

    pub fn total(&self) -> usize {
        self.exchanges.lock().unwrap().iter().map(|e| e.actions.len()).sum()
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

pub fn free_port() -> u16 {
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
        Self::spawn(Some(namespace), sts, extra, kubeconfig, None)
    }

    /// Like `start`, watching every namespace (`extra` should narrow it, e.g. with
    /// `--namespace-prefix`, so that other tests' bindings stay out of its reach).
    pub fn start_cluster_wide(sts: &Forwarder, extra: &[&str], kubeconfig: &Path) -> Self {
        Self::spawn(None, sts, extra, kubeconfig, None)
    }

    /// Like `start`, with the process's clock shifted by `offset` (libfaketime's `faketime`,
    /// e.g. `+2h`): the wall clock only, timers run as usual.
    pub fn start_with_clock_offset(namespace: &str, sts: &Forwarder, extra: &[&str], offset: &str) -> Self {
        Self::spawn(Some(namespace), sts, extra, &env().kubeconfig, Some(offset))
    }

    fn spawn(
        namespace: Option<&str>,
        sts: &Forwarder,
        extra: &[&str],
        kubeconfig: &Path,
        clock_offset: Option<&str>,
    ) -> Self {
        let logs = env().repo.join(".e2e/logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = logs.join(format!("operator-{}-{}.log", namespace.unwrap_or("all"), unique("run")));
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
            .args(namespace.map(|ns| ["--namespace", ns]).into_iter().flatten())
            .args(["--log-format", "json", "--log-level"])
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
            // A process group of its own, signalled as a whole: `faketime` runs the operator
            // as its child and passes no signal on.
            .process_group(0)
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
            signal_group(&child, "TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().unwrap() {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            signal_group(&child, "KILL");
            let _ = child.wait();
            panic!("operator did not stop on SIGTERM within 20 s");
        }
        None
    }

    /// SIGKILL: the process gets no chance to clean up (e.g. to release a Lease).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(&child, "KILL");
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

    /// How many reconciles the process finished.
    pub async fn reconciles(&self) -> u64 {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with("kube_sts_reconcile_duration_seconds_count"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Wakes binding `name` without changing its spec (an annotation `touched: value`) and
    /// waits until the process finished a reconcile after that.
    pub async fn touch(&self, bindings: &Api<AWSRoleBinding>, name: &str, value: &str) {
        let before = self.reconciles().await;
        bindings
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(serde_json::json!({"metadata": {"annotations": {"touched": value}}})),
            )
            .await
            .unwrap();
        eventually("a reconcile after the touch", Duration::from_secs(30), || async {
            (self.reconciles().await > before).then_some(())
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
        scrape(self.metrics_addr).await
    }
}

/// `GET /metrics` of a kube-sts process: the whole answer, head included.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(&child, "KILL");
            let _ = child.wait();
        }
    }
}

/// Sends `signal` to the process group `child` leads (it and whatever it started).
fn signal_group(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{}", child.id())])
        .status();
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
/// A role in the STS peer that trusts the operator (with `external_id` when given), granted
/// to `ns` by a grant named after it, with `extra_grant` lines added to the grant's spec.
pub fn granted_role(ns: &TestNamespace, external_id: Option<&str>, extra_grant: &str) -> String {
    let arn = create_role(&unique("role"), &operator_arn(), external_id, true);
    let yaml = format!("{}{extra_grant}", grant_yaml(&ns.name, &ns.name, &arn));
    let out = kubectl(&["apply", "--server-side", "-f", "-"], Some(&yaml));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    arn
}

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

/// One version of a Secret a [`Projection`] wrote into its directory.
#[derive(Clone, Debug)]
pub struct Projected {
    pub data: std::collections::BTreeMap<String, Vec<u8>>,
}

impl Projected {
    pub fn value(&self, key: &str) -> Option<String> {
        self.data.get(key).map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// A Secret volume as the kubelet keeps it: the Secret is read through the API every
/// `every`, and on every change its keys are written into a new timestamped directory,
/// `..data` is switched to it by renaming a symlink (atomic), each key is a symlink
/// `<key> -> ..data/<key>`, and the old directory goes. Runs on a thread of its own until
/// dropped.
pub struct Projection {
    history: Arc<Mutex<Vec<Projected>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Projection {
    pub fn start(namespace: &str, name: &str, dir: &Path, every: Duration) -> Self {
        let history: Arc<Mutex<Vec<Projected>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (namespace, name, target) = (namespace.to_string(), name.to_string(), dir.to_path_buf());
        let (h, s) = (history.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let api: Api<Secret> = Api::namespaced(client().await, &namespace);
                let mut generation = 0u64;
                let mut current: Option<PathBuf> = None;
                while !s.load(Ordering::SeqCst) {
                    if let Ok(Some(secret)) = api.get_opt(&name).await {
                        let data: std::collections::BTreeMap<String, Vec<u8>> = secret
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0))
                            .collect();
                        let changed = h.lock().unwrap().last().is_none_or(|p| p.data != data);
                        if changed {
                            generation += 1;
                            current = Some(project(&target, &data, generation, current.take()));
                            h.lock().unwrap().push(Projected { data });
                        }
                    }
                    tokio::time::sleep(every).await;
                }
            });
        });
        Projection {
            history,
            stop,
            thread: Some(thread),
        }
    }

    /// Every version projected so far, oldest first.
    pub fn history(&self) -> Vec<Projected> {
        self.history.lock().unwrap().clone()
    }
}

impl Drop for Projection {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes one version of a Secret volume (see [`Projection`]); returns its directory.
fn project(
    dir: &Path,
    data: &std::collections::BTreeMap<String, Vec<u8>>,
    generation: u64,
    previous: Option<PathBuf>,
) -> PathBuf {
    use std::os::unix::fs::symlink;
    let stamp = format!(
        "..{}.{generation}",
        jiff::fmt::strtime::format("%Y_%m_%d_%H_%M_%S", jiff::Timestamp::now()).unwrap()
    );
    let version = dir.join(&stamp);
    std::fs::create_dir_all(&version).unwrap();
    for (key, value) in data {
        std::fs::write(version.join(key), value).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for key in data.keys() {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(key), &link).unwrap();
        }
    }
    // Keys the Secret no longer has disappear from the volume.
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !data.contains_key(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Some(previous) = previous {
        let _ = std::fs::remove_dir_all(previous);
    }
    version
}

#[tokio::test]
async fn forwarder_rewrites_expirations_and_reframes_chunked_answers() {
    // An answer as a peer might send it: chunked, the element split across chunks.
    let body = "<AssumeRoleResult><Credentials><Expiration>2026-11-26T10:00:00.123Z</Expiration></Credentials></AssumeRoleResult>";
    let (a, b) = body.split_at(50);
    let wire = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\nNEXT",
        a.len(),
        b.len()
    );
    let mut reader = tokio::io::BufReader::new(wire.as_bytes());
    let head = read_head(&mut reader).await.unwrap().unwrap();
    assert_eq!(framing(&head, true).unwrap(), Framing::Chunked);
    let (raw, decoded) = read_body(&mut reader, Framing::Chunked).await.unwrap();
    assert_eq!(decoded, body.as_bytes());
    assert!(wire.contains(std::str::from_utf8(&raw).unwrap()));
    let mut rest = String::new();
    reader.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "NEXT", "the next message starts where the body ended");

    let rewritten = rewrite_expiration(body, "2030-01-01T00:01:00Z").unwrap();
    assert_eq!(
        rewritten,
        "<AssumeRoleResult><Credentials><Expiration>2030-01-01T00:01:00Z</Expiration></Credentials></AssumeRoleResult>"
    );
    let head = String::from_utf8(head_with_length(&head, rewritten.len())).unwrap();
    assert_eq!(
        head,
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
            rewritten.len()
        )
    );
    assert_eq!(rewrite_expiration("<GetCallerIdentityResult/>", "x"), None);
}

/// The sum of metric `name` over all its label sets, in the text exposition `metrics`.
pub fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The helm binary `e2e/scripts/build-helm.sh` installs into the cache (once per run).
pub fn helm() -> &'static Path {
    static HELM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HELM.get_or_init(|| {
        let out = Command::new("bash")
            .arg(env().repo.join("e2e/scripts/build-helm.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("build-helm.sh runs");
        assert!(out.status.success(), "build-helm.sh failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim())
    })
}

/// The STS peer as pods reach it: its proxy's port, on the host's end of the node link.
pub fn sts_url_for_pods() -> String {
    let local = &env().aws["AWS_ENDPOINT_URL_STS"];
    let port = local.rsplit(':').next().unwrap().trim_end_matches('/');
    format!("http://{}:{port}", node_env("KUBE_STS_NODE_HOST_ADDRESS"))
}

/// A value of `.e2e/node.env`, which `make up` writes for the node (`KUBE_STS_NODE_*`).
pub fn node_env(key: &str) -> String {
    let path = env().repo.join(".e2e/node.env");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; make up starts the node", path.display()));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} in {}", path.display()))
        .to_string()
}

/// `GET /metrics` of an operator at `addr` (a local process, or a pod: the host reaches
/// pod addresses through the node link).
pub async fn metrics_at(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// The local node's test image (`e2e/scripts/build-images.sh`): Debian's static busybox
/// with its applets, imported into the node's containerd (never pulled).
pub const BUSYBOX_IMAGE: &str = "kube-sts.local/busybox:e2e";

/// The pod `name` of `namespace` once it runs with every container ready, or None.
pub async fn pod_ready(client: &Client, namespace: &str, name: &str) -> Option<k8s_openapi::api::core::v1::Pod> {
    let pod = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .ok()??;
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .as_ref()?
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    (status.phase.as_deref() == Some("Running") && ready).then_some(pod)
}

/// `kubectl exec` of `command` in the pod's first container: its stdout when it exits 0,
/// None otherwise (the command failed or the pod is not there yet).
pub fn pod_exec(namespace: &str, pod: &str, command: &[&str]) -> Option<String> {
    let mut args = vec!["exec", "-n", namespace, pod, "--"];
    args.extend_from_slice(command);
    let out = kubectl(&args, None);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
