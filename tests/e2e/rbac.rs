//! The chart's RBAC is what the operator and the webhook need, no more and no less: the
//! chart (`helm template`, watchNamespace, leader election and rbac.serviceAccountTokens on)
//! is installed into a namespace of the test's own, the operator runs as the chart's
//! ServiceAccount (a TokenRequest token in a kubeconfig of its own) through the core
//! scenarios, the webhook as the webhook's ServiceAccount (with the chart's arguments)
//! through its own, and then, for every (apiGroup, resource, verb) the rendered Roles and
//! ClusterRoles grant, an installation without just that verb must break the scenario of
//! the process whose ServiceAccount the rule is bound to, with that process logging the 403
//! for exactly that verb and resource. All installations run at once, each in its own
//! namespace with its own release, ServiceAccount, STS forwarder and process.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration, coordination::v1::Lease, core::v1::Secret,
        events::v1::Event,
    },
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::{harness::*, webhook::*};

const KUBE_VERSION: &str = "1.34.0";
/// Kinds of the chart applied here: the operator and the webhook run as local processes, not
/// from the chart's Deployments (the in-cluster tests install the chart as users do). The
/// Secret is the webhook's certificate Secret, which the chart creates (the webhook may
/// not); the ValidatingAdmissionPolicy limits what the webhook may change in its
/// configuration to the caBundle, which its scenario keeps.
const APPLIED_KINDS: [&str; 8] = [
    "ServiceAccount",
    "Secret",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// `helm template` of the chart for `release` in `namespace`, watching that namespace,
/// with leader election and the TokenRequest permission (off by default; the scenario's
/// AssumeRoleWithWebIdentity binding needs it): every object.
fn render_all(release: &str, namespace: &str) -> Vec<Value> {
    let out = Command::new(helm())
        .args(["template", release])
        .arg(env().repo.join("charts/kube-sts"))
        .args(["--namespace", namespace, "--kube-version", KUBE_VERSION])
        .args(["--set", &format!("watchNamespace={namespace}")])
        .args(["--set", "leaderElection.enabled=true"])
        .args(["--set", "rbac.serviceAccountTokens=true"])
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).expect("rendered YAML")
}

/// The objects of `render_all` applied here (ServiceAccounts, the webhook's Secret, RBAC),
/// each rule split so that it names one API group and one resource.
fn render(release: &str, namespace: &str) -> Vec<Value> {
    render_all(release, namespace)
        .into_iter()
        .filter(|d| APPLIED_KINDS.contains(&d["kind"].as_str().unwrap_or_default()))
        .map(|mut d| {
            if let Some(rules) = d.get("rules").and_then(Value::as_array).cloned() {
                let split: Vec<Value> = rules
                    .iter()
                    .flat_map(|rule| {
                        let groups = rule["apiGroups"].as_array().cloned().unwrap_or_default();
                        let resources = rule["resources"].as_array().cloned().unwrap_or_default();
                        groups
                            .into_iter()
                            .flat_map(move |g| {
                                let rule = rule.clone();
                                resources.clone().into_iter().map(move |r| {
                                    let mut one = rule.clone();
                                    one["apiGroups"] = json!([g.clone()]);
                                    one["resources"] = json!([r]);
                                    one
                                })
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect();
                d["rules"] = Value::Array(split);
            }
            d
        })
        .collect()
}

/// One verb of one rule: where it is in the rendering, and what it is.
#[derive(Clone, Debug)]
struct Grant {
    doc: usize,
    rule: usize,
    api_group: String,
    resource: String,
    verb: String,
    label: String,
    /// The ServiceAccount the rule is bound to.
    subject: String,
}

/// Every verb of every rule; `watched` (the namespace the rendering watches) is shown as
/// `<watchNamespace>` in the labels.
fn grants_in(docs: &[Value], fullname: &str, watched: &str) -> Vec<Grant> {
    // (role kind, role name) -> the ServiceAccount its binding names.
    let subjects: BTreeMap<(String, String), String> = docs
        .iter()
        .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
        .map(|d| {
            let role = (
                d["roleRef"]["kind"].as_str().unwrap().to_string(),
                d["roleRef"]["name"].as_str().unwrap().to_string(),
            );
            (role, d["subjects"][0]["name"].as_str().unwrap().to_string())
        })
        .collect();
    let mut out = Vec::new();
    for (doc, d) in docs.iter().enumerate() {
        let Some(rules) = d["rules"].as_array() else { continue };
        let role = d["metadata"]["name"].as_str().unwrap_or_default();
        let subject = subjects[&(d["kind"].as_str().unwrap().to_string(), role.to_string())].clone();
        let role = format!(
            "{}{}",
            d["kind"].as_str().unwrap(),
            role.strip_prefix(fullname).unwrap_or(role)
        );
        for (rule, r) in rules.iter().enumerate() {
            let api_group = r["apiGroups"][0].as_str().unwrap().to_string();
            let resource = r["resources"][0].as_str().unwrap().to_string();
            let names = r["resourceNames"]
                .as_array()
                .map(|n| {
                    let n: Vec<&str> = n
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|n| if n == watched { "<watchNamespace>" } else { n })
                        .collect();
                    format!("[{}]", n.join(","))
                })
                .unwrap_or_default();
            for verb in r["verbs"].as_array().unwrap() {
                let verb = verb.as_str().unwrap().to_string();
                let group = if api_group.is_empty() { "core" } else { &api_group };
                out.push(Grant {
                    doc,
                    rule,
                    label: format!("{role}: {group}/{resource}{names} {verb}"),
                    api_group: api_group.clone(),
                    resource: resource.clone(),
                    verb,
                    subject: subject.clone(),
                });
            }
        }
    }
    out
}

/// The rendering without `grant`'s verb (a rule left without verbs goes).
fn without(docs: &[Value], grant: &Grant) -> Vec<Value> {
    let mut docs = docs.to_vec();
    let rules = docs[grant.doc]["rules"].as_array_mut().unwrap();
    let verbs = rules[grant.rule]["verbs"].as_array_mut().unwrap();
    verbs.retain(|v| v.as_str() != Some(grant.verb.as_str()));
    if verbs.is_empty() {
        rules.remove(grant.rule);
    }
    docs
}

async fn kubectl_async(args: Vec<String>, stdin: Option<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl(&args, stdin.as_deref())
    })
    .await
    .unwrap()
}

async fn kubectl_ok(args: &[&str], stdin: Option<String>) -> String {
    let out = kubectl_async(args.iter().map(|s| s.to_string()).collect(), stdin).await;
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Cluster-scoped leftovers of one installation, deleted at drop.
struct ClusterObjects(Vec<(String, String)>);

impl Drop for ClusterObjects {
    fn drop(&mut self) {
        for (kind, name) in &self.0 {
            let _ = kubectl(&["delete", kind, name, "--ignore-not-found", "--wait=false"], None);
        }
    }
}

/// Which process of the chart an installation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Operator,
    Webhook,
}

/// The running process of an installation.
enum Process {
    Operator {
        operator: Operator,
        _sts: Forwarder,
    },
    Webhook {
        webhook: Webhook,
        configuration: Configuration,
    },
}

impl Process {
    fn logs(&self) -> String {
        match self {
            Process::Operator { operator, .. } => operator.logs(),
            Process::Webhook { webhook, .. } => webhook.logs(),
        }
    }

    fn log(&self) -> PathBuf {
        match self {
            Process::Operator { operator, .. } => operator.log.clone(),
            Process::Webhook { webhook, .. } => webhook.log.clone(),
        }
    }
}

/// One installation of the chart (maybe without one verb) and one of its processes.
struct Install {
    ns: TestNamespace,
    process: Process,
    _dir: tempfile::TempDir,
    _cluster: ClusterObjects,
}

/// The ServiceAccount of `who` in a rendering: the webhook's carries the component label.
fn service_account_of(docs: &[Value], who: Who) -> String {
    docs.iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .find(|d| (d["metadata"]["labels"]["app.kubernetes.io/component"] == "webhook") == (who == Who::Webhook))
        .and_then(|d| d["metadata"]["name"].as_str())
        .expect("the chart renders the ServiceAccount")
        .to_string()
}

/// The webhook's arguments in the chart's Deployment, as `--flag=value`.
fn webhook_args(all: &[Value]) -> Vec<String> {
    let deployment = all
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["labels"]["app.kubernetes.io/component"] == "webhook")
        .expect("the chart renders the webhook's Deployment");
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The value of `--flag=` in `args`.
fn arg<'a>(args: &'a [String], flag: &str) -> &'a str {
    let prefix = format!("--{flag}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the chart passes --{flag}: {args:?}"))
}

async fn install(grant: Option<&Grant>, who: Who) -> Install {
    let ns = TestNamespace::new("rbac").await;
    let release = ns.name.clone();
    let all = {
        let (release, namespace) = (release.clone(), ns.name.clone());
        tokio::task::spawn_blocking(move || render_all(&release, &namespace))
            .await
            .unwrap()
    };
    let docs = {
        let (release, namespace) = (release.clone(), ns.name.clone());
        tokio::task::spawn_blocking(move || render(&release, &namespace))
            .await
            .unwrap()
    };
    let docs = match grant {
        Some(g) => without(&docs, g),
        None => docs,
    };
    let cluster = ClusterObjects(
        docs.iter()
            .filter(|d| {
                d["kind"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("Cluster") || k.starts_with("ValidatingAdmissionPolicy"))
            })
            .map(|d| {
                (
                    d["kind"].as_str().unwrap().to_string(),
                    d["metadata"]["name"].as_str().unwrap().to_string(),
                )
            })
            .chain([("awsrolegrant".to_string(), ns.name.clone())])
            .collect(),
    );
    let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
    kubectl_ok(&["apply", "-f", "-"], Some(list.to_string())).await;
    let sa = service_account_of(&docs, who);
    let token = kubectl_ok(&["create", "token", &sa, "-n", &ns.name, "--duration=3600s"], None).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    token_kubeconfig(&kubeconfig, token.trim(), &ns.name);
    if who == Who::Webhook {
        let (webhook, configuration) = start_webhook(&ns, &all, &kubeconfig).await;
        return Install {
            ns,
            process: Process::Webhook { webhook, configuration },
            _dir: dir,
            _cluster: cluster,
        };
    }
    let sts = Forwarder::start().await;
    // The Lease namespace comes from the kubeconfig's context and the name is the chart's
    // default. One STS call per second makes the subjects of a binding publish their Events
    // about a second apart, so the later ones patch the first (an event series).
    let operator = start_operator(
        &ns.name,
        &sts,
        &["--leader-election", "--sts-qps", "1", "--sts-burst", "1"],
        &kubeconfig,
    )
    .await;
    Install {
        ns,
        process: Process::Operator { operator, _sts: sts },
        _dir: dir,
        _cluster: cluster,
    }
}

/// The webhook with the chart's arguments (but for the addresses it listens on and the
/// certificate's names, which are the local ones), and a configuration of the chart's name
/// that calls it by URL for this namespace only, with failurePolicy Fail: a pod created
/// without an answer of the webhook is refused, so an answer is told from a failed call.
async fn start_webhook(ns: &TestNamespace, all: &[Value], kubeconfig: &Path) -> (Webhook, Configuration) {
    let args = webhook_args(all);
    let (secret, secret_namespace, configuration) = (
        arg(&args, "tls-secret"),
        arg(&args, "tls-secret-namespace"),
        arg(&args, "webhook-configuration"),
    );
    let set_here = [
        "--namespace=",
        "--tls-secret=",
        "--tls-secret-namespace=",
        "--webhook-configuration=",
        "--webhook-addr=",
        "--metrics-addr=",
        "--cert-name=",
        "--shutdown-delay=",
        "--log-format=",
        "--log-level=",
    ];
    let extra: Vec<&str> = args
        .iter()
        .skip(1) // the subcommand
        .map(String::as_str)
        .filter(|a| !set_here.iter().any(|p| a.starts_with(p)))
        .collect();
    let webhook = Webhook::start(&WebhookOptions {
        namespace: Some(arg(&args, "namespace")),
        secret: (secret_namespace, secret),
        configuration,
        extra: &extra,
        kubeconfig,
    })
    .await;
    let names = [format!("pods.{}.kube-sts.io", ns.name)];
    let configuration = configure(configuration, &names, &webhook.url(), &ns.name, "Fail").await;
    select_namespace(&ns.name, &ns.name).await;
    (webhook, configuration)
}

/// Starts the operator; again when its metrics port was taken between the harness
/// choosing it and the operator binding it (many processes start at once here).
async fn start_operator(namespace: &str, sts: &Forwarder, args: &[&str], kubeconfig: &Path) -> Operator {
    let mut attempts = 0;
    loop {
        let mut operator = Operator::start_with_kubeconfig(namespace, sts, args, kubeconfig);
        attempts += 1;
        let serving = poll(Duration::from_secs(20), || {
            let seen = if operator.logs().contains("serving /metrics") {
                Some(true)
            } else {
                operator.exited().map(|_| false)
            };
            async move { seen }
        })
        .await;
        if serving == Some(false) && operator.logs().contains("Address already in use") && attempts < 3 {
            continue;
        }
        return operator;
    }
}

fn binding_yaml(name: &str, spec: &str) -> String {
    format!("apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleBinding\nmetadata: {{name: {name}}}\nspec:\n{spec}")
}

async fn apply(ns: &TestNamespace, yaml: String) -> Result<(), String> {
    let args = [
        "apply",
        "-n",
        &ns.name,
        "--server-side",
        "--field-manager=e2e-test",
        "-f",
        "-",
    ];
    let out = kubectl_async(args.iter().map(|s| s.to_string()).collect(), Some(yaml)).await;
    out.status
        .success()
        .then_some(())
        .ok_or_else(|| format!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr)))
}

async fn ready_is(ns: &TestNamespace, name: &str, status: &str, reason: &str, within: Duration) -> bool {
    poll(within, || async {
        ready(&ns.bindings(), name)
            .await
            .filter(|(s, r, _)| s == status && r == reason)
    })
    .await
    .is_some()
}

async fn issued_secret(ns: &TestNamespace, name: &str, within: Duration) -> Option<Secret> {
    poll(within, || async {
        ns.secrets()
            .get_opt(name)
            .await
            .ok()?
            .filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key("credentials.json")))
    })
    .await
}

const STEP: Duration = Duration::from_secs(30);

/// The core scenarios, in order; `Err` names the first step that did not happen.
async fn scenario(ns: &TestNamespace, operator: &mut Operator, role: &str) -> Result<(), String> {
    poll(STEP, || async {
        operator.logs().contains("caches synced").then_some(())
    })
    .await
    .ok_or("the operator leads and its caches sync")?;

    // Everything the bindings need is created after the operator started, so that it
    // must come through the watches.
    ns.service_account("app").await;
    ns.service_account("other").await;
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": {"name": "taken"}, "stringData": {"token": "keep me"}}))
    .unwrap();
    let foreign = ns.secrets().create(&PostParams::default(), &foreign).await.unwrap();
    let label = "kube-sts.io/rbac-test";
    let grant = format!(
        "apiVersion: kube-sts.io/v1alpha1\nkind: AWSRoleGrant\nmetadata: {{name: {n}}}\nspec:\n  namespaceSelector: {{matchLabels: {{{label}: {n}}}}}\n  roleArns: [\"{role}\"]\n",
        n = ns.name
    );
    kubectl_ok(&["apply", "--server-side", "-f", "-"], Some(grant)).await;
    kubectl_ok(&["label", "namespace", &ns.name, &format!("{label}={}", ns.name)], None).await;

    let main = |subjects: &str| binding_yaml("main", &format!("  roleArn: {role}\n  subjects: [{subjects}]\n"));
    ns.service_account("third").await;
    apply(ns, main("{name: app}, {name: other}, {name: third}")).await?;
    if !ready_is(ns, "main", "True", "CredentialsIssued", STEP).await {
        return Err("credentials issued: Ready=True (status written)".into());
    }
    issued_secret(ns, "main-app", Duration::from_secs(5))
        .await
        .ok_or("credentials issued: Secret main-app written")?;
    issued_secret(ns, "main-other", Duration::from_secs(5))
        .await
        .ok_or("credentials issued: Secret main-other written")?;

    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    poll(Duration::from_secs(20), || async {
        let issued = events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some("CredentialsIssued")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("main")
            })
            .count();
        (issued >= 3).then_some(())
    })
    .await
    .ok_or("Events recorded: CredentialsIssued for main, one per subject")?;

    apply(
        ns,
        binding_yaml(
            "conflict",
            &format!("  roleArn: {role}\n  subjects: [{{name: app}}]\n  secret: {{name: taken}}\n"),
        ),
    )
    .await?;
    if !ready_is(ns, "conflict", "False", "SecretConflict", STEP).await {
        return Err("a foreign Secret is a SecretConflict".into());
    }
    let after = ns.secrets().get("taken").await.unwrap();
    if after.resource_version() != foreign.resource_version() {
        return Err("the foreign Secret stays untouched".into());
    }

    apply(ns, main("{name: app}, {name: third}")).await?;
    poll(STEP, || async {
        ns.secrets().get_opt("main-other").await.ok()?.is_none().then_some(())
    })
    .await
    .ok_or("the removed subject's Secret is deleted")?;

    // Taken now: removing a subject changed the spec, which re-issues for the others.
    let issued = ns.secrets().get("main-app").await.unwrap();
    let tamper = json!({"data": {"AWS_SECRET_ACCESS_KEY": ByteString(b"tampered".to_vec())}});
    ns.secrets()
        .patch("main-app", &PatchParams::default(), &Patch::Merge(&tamper))
        .await
        .unwrap();
    poll(STEP, || async {
        let s = ns.secrets().get("main-app").await.ok()?;
        (s.data == issued.data).then_some(())
    })
    .await
    .ok_or("an edited Secret is restored")?;

    apply(
        ns,
        binding_yaml(
            "web",
            &format!("  method: AssumeRoleWithWebIdentity\n  roleArn: {role}\n  subjects: [{{name: app}}]\n"),
        ),
    )
    .await?;
    if !ready_is(ns, "web", "True", "CredentialsIssued", STEP).await {
        return Err("web identity (TokenRequest) credentials issued".into());
    }

    let leases: Api<Lease> = Api::namespaced(ns.client.clone(), &ns.name);
    poll(Duration::from_secs(20), || async {
        let spec = leases.get_opt("kube-sts").await.ok()??.spec?;
        (spec.holder_identity.is_some() && spec.renew_time?.0 > spec.acquire_time?.0).then_some(())
    })
    .await
    .ok_or("the leader renews its Lease")?;
    if let Some(status) = operator.exited() {
        return Err(format!("the operator keeps running (exited: {status})"));
    }
    Ok(())
}

/// The webhook's scenario, in order; `Err` names the first step that did not happen.
async fn webhook_scenario(ns: &TestNamespace, webhook: &Webhook, configuration: &Configuration) -> Result<(), String> {
    poll(STEP, || async {
        webhook.logs().contains("serving the admission webhook").then_some(())
    })
    .await
    .ok_or("the webhook syncs its caches, issues its certificate (Secret update) and serves it")?;
    let confs = Api::<MutatingWebhookConfiguration>::all(ns.client.clone());
    let published = || async {
        let conf = confs.get(&configuration.name).await.ok()?;
        conf.webhooks?[0].client_config.ca_bundle.as_ref().map(|_| ())
    };
    poll(STEP, published).await.ok_or("the caBundle is published")?;

    // Created after the webhook started: it must come through the watch.
    ns.service_account("app").await;
    apply(
        ns,
        binding_yaml(
            "main",
            "  roleArn: arn:aws:iam::123456789012:role/r\n  subjects: [{name: app}]\n",
        ),
    )
    .await?;
    let injected = |want: bool| async move {
        poll(STEP, || async {
            let pod = create_pod(&ns.name, &pod_json("probe", Some("app"), json!({}), json!({})), true)
                .await
                .ok()?;
            (injected_secret(&pod).is_some() == want).then_some(())
        })
        .await
    };
    injected(true)
        .await
        .ok_or("a pod of a binding's subject is injected (binding watch)")?;

    // The namespace label comes through the namespace watch.
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(ns.client.clone());
    let label = |value: Option<&str>| {
        let patch = json!({"metadata": {"labels": {"kube-sts.io/inject": value}}});
        let namespaces = namespaces.clone();
        async move {
            namespaces
                .patch(&ns.name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .unwrap();
        }
    };
    label(Some("false")).await;
    injected(false)
        .await
        .ok_or("a namespace labelled kube-sts.io/inject=false is left alone (namespace watch)")?;
    label(None).await;
    injected(true)
        .await
        .ok_or("the label removed, pods are injected again")?;

    // A caBundle wiped (as `helm upgrade --force` would) is restored (configuration watch).
    let wipe: json_patch::Patch = serde_json::from_value(json!([
        {"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}
    ]))
    .unwrap();
    confs
        .patch(&configuration.name, &PatchParams::default(), &Patch::Json::<()>(wipe))
        .await
        .map_err(|e| format!("wiping the caBundle: {e}"))?;
    poll(STEP, published).await.ok_or("a wiped caBundle is restored")?;
    injected(true)
        .await
        .ok_or("pods are injected after the caBundle came back")?;
    Ok(())
}

/// Whether the process logged the API server's 403 for `verb` on `resource`.
fn logged_forbidden(log: &str, grant: &Grant) -> bool {
    let log = log.replace("\\\"", "\"");
    let group = if grant.api_group.is_empty() {
        "in API group \"\"".to_string()
    } else {
        format!("in API group \"{}\"", grant.api_group)
    };
    log.lines().any(|l| {
        l.contains(&format!(
            "cannot {} resource \"{}\" {group}",
            grant.verb, grant.resource
        ))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chart_rbac_is_exactly_what_the_operator_and_the_webhook_need() {
    let started = Instant::now();
    let role = tokio::task::spawn_blocking(|| create_role(&unique("rbac"), &operator_arn(), None, true))
        .await
        .unwrap();
    let probe = tokio::task::spawn_blocking(|| render("probe", "probe")).await.unwrap();
    let grants = grants_in(&probe, "probe-kube-sts", "probe");
    assert!(grants.len() > 10, "rules found: {grants:?}");
    let webhook_sa = service_account_of(&probe, Who::Webhook);
    let who = |g: &Grant| {
        if g.subject == webhook_sa {
            Who::Webhook
        } else {
            Who::Operator
        }
    };
    assert!(
        grants.iter().any(|g| who(g) == Who::Webhook) && grants.iter().any(|g| who(g) == Who::Operator),
        "rules of both ServiceAccounts: {grants:?}"
    );

    // E2E_RBAC_ONLY=<text>: only the variants whose label contains <text> (for debugging).
    let only = std::env::var("E2E_RBAC_ONLY").ok();
    let variants = grants
        .iter()
        .filter(|g| only.as_deref().is_none_or(|o| g.label.contains(o)))
        .map(|g| (Some(g.clone()), who(g)));
    let baselines = [(None, Who::Operator), (None, Who::Webhook)];
    let runs = baselines.into_iter().chain(variants).map(|(grant, who)| {
        let role = role.clone();
        tokio::spawn(async move {
            let mut install = install(grant.as_ref(), who).await;
            let result = match &mut install.process {
                Process::Operator { operator, .. } => scenario(&install.ns, operator, &role).await,
                Process::Webhook { webhook, configuration } => {
                    webhook_scenario(&install.ns, webhook, configuration).await
                }
            };
            (grant, who, result, install.process.logs(), install.process.log())
        })
    });
    let results = futures::future::join_all(runs).await;

    let mut problems = Vec::new();
    let mut table = BTreeMap::new();
    for r in results {
        let (grant, who, result, log, path) = r.expect("variant task");
        match grant {
            None => {
                if let Err(step) = &result {
                    problems.push(format!(
                        "with the chart's RBAC the {who:?} scenario failed at: {step} (log {})",
                        path.display()
                    ));
                }
                if log.contains("is forbidden") {
                    problems.push(format!(
                        "with the chart's RBAC the {who:?} was refused something (log {})",
                        path.display()
                    ));
                }
                table.insert(format!("(none removed: {who:?})"), format!("{result:?}"));
            }
            Some(g) => {
                let forbidden = logged_forbidden(&log, &g);
                match &result {
                    Ok(()) => problems.push(format!(
                        "without `{}` the scenario still passes: the rule is not needed (log {})",
                        g.label,
                        path.display()
                    )),
                    Err(_) if !forbidden => problems.push(format!(
                        "without `{}` the scenario broke, but the {who:?} did not log a 403 for it (log {})",
                        g.label,
                        path.display()
                    )),
                    Err(_) => {}
                }
                table.insert(
                    g.label.clone(),
                    format!(
                        "breaks at: {} | 403 logged: {forbidden}",
                        result.err().unwrap_or_default()
                    ),
                );
            }
        }
    }
    for (rule, outcome) in &table {
        println!("{rule:<70} {outcome}");
    }
    println!("{} installations in {:?}", table.len(), started.elapsed());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
