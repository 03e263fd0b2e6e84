use std::{net::SocketAddr, num::NonZeroU32, sync::Arc};

use clap::{Args, Parser, Subcommand, ValueEnum};
use kube_sts::{
    controller::{self, Settings},
    crd,
    leader::{self, Elector, LeaseSettings},
    metrics::{self, Metrics, Process},
    plan::IssueSettings,
    shards::{Gate, Scope, leases::ShardLeases},
    sts::StsClient,
    webhook::{
        self,
        certs::Policy,
        keeper::{self, Managed},
    },
};

#[derive(Parser)]
#[command(
    name = "kube-sts",
    about = "Kubernetes operator that keeps short-lived AWS STS credentials in Secrets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Command {
    /// Run the operator.
    Run(RunArgs),
    /// Serve the mutating admission webhook that wires credentials into pods.
    Webhook(WebhookArgs),
    /// Print both CRDs as YAML.
    Crd,
    /// Print the version.
    Version,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum SessionTags {
    Auto,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "KUBE_STS_NAMESPACE")]
    namespace: Option<String>,
    /// Cluster name sent as the kubernetes-cluster session tag.
    #[arg(long, env = "KUBE_STS_CLUSTER_NAME", default_value = "kubernetes")]
    cluster_name: String,
    /// Require an AWSRoleGrant for every binding.
    #[arg(long, env = "KUBE_STS_REQUIRE_GRANTS", default_value_t = true, action = clap::ArgAction::Set)]
    require_grants: bool,
    /// Let GetSessionToken/GetFederationToken bindings without sourceCredentialsSecretRef
    /// use the operator's own IAM identity (a grant must set allowOperatorIdentity too).
    #[arg(long, env = "KUBE_STS_ALLOW_OPERATOR_IDENTITY", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    allow_operator_identity: bool,
    /// Add kubernetes-* session tags to AssumeRole (auto) or not (off).
    #[arg(long, env = "KUBE_STS_SESSION_TAGS", value_enum, default_value_t = SessionTags::Auto)]
    session_tags: SessionTags,
    /// Default STS region (otherwise the SDK's own region chain).
    #[arg(long, env = "KUBE_STS_REGION")]
    region: Option<String>,
    /// STS endpoint URL (otherwise AWS_ENDPOINT_URL_STS / AWS_ENDPOINT_URL apply).
    #[arg(long, env = "KUBE_STS_STS_ENDPOINT")]
    sts_endpoint: Option<String>,
    /// Process-wide STS calls per second (AWS's default quota is 600 per account and Region,
    /// shared with every other caller there; throttled subjects back off on their own).
    #[arg(long, env = "KUBE_STS_STS_QPS", default_value = "50")]
    sts_qps: NonZeroU32,
    /// STS calls that may go at once before --sts-qps paces them.
    #[arg(long, env = "KUBE_STS_STS_BURST", default_value = "100")]
    sts_burst: NonZeroU32,
    /// Bindings reconciled at the same time.
    #[arg(long, env = "KUBE_STS_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "KUBE_STS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect a leader through a coordination.k8s.io Lease before reconciling.
    #[arg(long, env = "KUBE_STS_LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    leader_election: bool,
    /// Split the namespaces into this many shards, each reconciled by the one replica
    /// holding its Lease `<lease-name>-shard-<i>` (1: no sharding).
    #[arg(long, env = "KUBE_STS_SHARDS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    shards: u32,
    /// Reconcile only namespaces whose name starts with this (default: all).
    #[arg(long, env = "KUBE_STS_NAMESPACE_PREFIX")]
    namespace_prefix: Option<String>,
    #[arg(long, env = "KUBE_STS_LEASE_NAME", default_value = "kube-sts")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace).
    #[arg(long, env = "KUBE_STS_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    #[arg(long, env = "KUBE_STS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `kube_sts=debug,info`.
    #[arg(long, env = "KUBE_STS_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

#[derive(Args, Debug)]
struct WebhookArgs {
    /// Read bindings of this namespace only (default: all namespaces).
    #[arg(long, env = "KUBE_STS_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the HTTPS endpoint `/mutate` the API server calls.
    #[arg(long, env = "KUBE_STS_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    webhook_addr: SocketAddr,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "KUBE_STS_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Secret holding the serving certificate (tls.crt, tls.key, ca.crt).
    #[arg(long, env = "KUBE_STS_TLS_SECRET", default_value = "kube-sts-webhook-tls")]
    tls_secret: String,
    /// Namespace of that Secret (default: the pod's namespace, then the kubeconfig's).
    #[arg(long, env = "KUBE_STS_TLS_SECRET_NAMESPACE")]
    tls_secret_namespace: Option<String>,
    /// Create and rotate the certificate in the Secret; false: serve what another tool
    /// (cert-manager) keeps there.
    #[arg(long, env = "KUBE_STS_MANAGE_CERTIFICATE", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    manage_certificate: bool,
    /// MutatingWebhookConfiguration whose caBundle the webhook keeps current (with
    /// --manage-certificate).
    #[arg(long, env = "KUBE_STS_WEBHOOK_CONFIGURATION")]
    webhook_configuration: Option<String>,
    /// DNS names and IP addresses of the serving certificate (comma-separated or repeated).
    #[arg(long = "cert-name", env = "KUBE_STS_CERT_NAME", value_delimiter = ',')]
    cert_names: Vec<String>,
    /// Lifetime of a serving certificate (and of the CA made for it), e.g. 2160h.
    #[arg(long, env = "KUBE_STS_CERT_VALIDITY", default_value = "2160h")]
    cert_validity: jiff::SignedDuration,
    /// How long a new CA is trusted before its certificate is served, e.g. 5m.
    #[arg(long, env = "KUBE_STS_CERT_OVERLAP", default_value = "5m")]
    cert_overlap: jiff::SignedDuration,
    /// After SIGTERM: not ready at once, serving on for this long (endpoints catch up).
    #[arg(long, env = "KUBE_STS_SHUTDOWN_DELAY", default_value = "5s")]
    shutdown_delay: jiff::SignedDuration,
    #[arg(long, env = "KUBE_STS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `kube_sts=debug,info`.
    #[arg(long, env = "KUBE_STS_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

fn init_logging(format: LogFormat, level: &str) -> RunResult {
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("--log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

/// `run` fails with a message for the user.
type RunResult = Result<(), String>;

async fn run(args: RunArgs) -> RunResult {
    init_logging(args.log_format, &args.log_level)?;
    if args.shards > 1 && args.namespace.is_some() {
        return Err("--shards splits namespaces between replicas; with --namespace there is one".into());
    }
    if args.shards > 1 && args.leader_election {
        return Err("--shards > 1 coordinates replicas through shard Leases; drop --leader-election".into());
    }
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot build a Kubernetes client: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    let clock = Arc::new(kube_sts::clock::Clock::default());
    let sts = StsClient::new(
        args.region.clone(),
        args.sts_endpoint.clone(),
        args.sts_qps,
        args.sts_burst,
        metrics.clone(),
        clock.clone(),
    )
    .await;
    let settings = Settings {
        namespace: args.namespace.clone(),
        require_grants: args.require_grants,
        issue: IssueSettings {
            cluster_name: args.cluster_name.clone(),
            session_tags: args.session_tags == SessionTags::Auto,
            default_region: sts.default_region(),
            allow_operator_identity: args.allow_operator_identity,
        },
        concurrency: args.concurrency,
        clock,
        scope: Scope {
            prefix: args.namespace_prefix.clone().filter(|p| !p.is_empty()),
            gate: (args.shards > 1).then(|| Gate::new(args.shards, metrics.clone())),
        },
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        require_grants = args.require_grants,
        region = settings.issue.default_region.as_deref().unwrap_or("<sdk default>"),
        leader_election = args.leader_election,
        shards = args.shards,
        "starting kube-sts"
    );
    let server = tokio::spawn(metrics::serve(args.metrics_addr, metrics.clone()));
    let metrics_addr = args.metrics_addr;
    let server_failed = async move {
        match server.await {
            Ok(Err(e)) => format!("metrics server on {metrics_addr}: {e}"),
            _ => "metrics server stopped".to_string(),
        }
    };
    let mut server_failed = std::pin::pin!(server_failed);
    let instance = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok());
    // Handled from here on, whatever the process is doing when the signal comes (syncing
    // caches, standing by, the instant after winning the Lease).
    let shutdown = shutdown_signal()?;
    let lease_namespace = own_namespace(args.lease_namespace.as_deref(), &client);
    if let Some(gate) = settings.scope.gate.clone() {
        // Sharded: the controller runs at once and reconciles the shards held; the Leases
        // are kept beside it and given up after it stopped (in-flight reconciles finished).
        let leases = ShardLeases::new(
            client.clone(),
            LeaseSettings::new(&args.lease_name, lease_namespace, leader::identity()),
            gate.clone(),
            shutdown.clone(),
        );
        let watchdog = tokio::spawn(gate.watchdog());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut keeper = tokio::spawn(leases.run(async {
            let _ = stopped.await;
        }));
        let result = tokio::select! {
            () = controller::run(client, Arc::new(sts), metrics, settings, instance, signalled(shutdown)) => {
                let _ = stop.send(());
                (&mut keeper).await.map_err(|e| format!("shard Lease task failed: {e}"))
            }
            result = &mut keeper => match result {
                Ok(()) => Err("the shard Lease task stopped unexpectedly".into()),
                Err(e) => Err(format!("shard Lease task failed: {e}")),
            },
            message = &mut server_failed => Err(message),
        };
        watchdog.abort();
        return result;
    }
    if !args.leader_election {
        return tokio::select! {
            () = controller::run(client, Arc::new(sts), metrics, settings, instance, signalled(shutdown)) => Ok(()),
            message = &mut server_failed => Err(message),
        };
    }

    // Leader election: serve /healthz and /metrics at once, reconcile only while holding
    // the Lease.
    let mut elector = Elector::new(
        client.clone(),
        LeaseSettings::new(&args.lease_name, lease_namespace, leader::identity()),
    );
    {
        // Ready means "in the election": a rolling update must be able to start a new
        // replica while the old one still leads, and a PodDisruptionBudget must count the
        // standby. (Not "caches synced", which only the leader ever gets to.)
        let standby = metrics.clone();
        tokio::select! {
            () = elector.acquire(|| standby.set_ready(true)) => {}
            () = signalled(shutdown.clone()) => {
                // An attempt cut short may have made us the holder: give it back.
                if let Err(e) = elector.release().await {
                    tracing::warn!(error = %e, "releasing the leader Lease failed");
                }
                tracing::info!("stopped while standing by");
                return Ok(());
            }
            message = &mut server_failed => return Err(message),
        }
    }
    metrics.set_ready(true);
    let lease = elector.lease_ref();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut keeper = tokio::spawn(async move {
        let result = elector
            .keep(async {
                let _ = stopped.await;
            })
            .await;
        (elector, result)
    });
    let lost = |lost: leader::Lost| {
        tracing::error!(lease = %lease, error = %lost, "lost the leader Lease; exiting so that only the new leader reconciles");
        format!("lost the leader Lease {lease}: {lost}")
    };
    tokio::select! {
        // Returns after SIGTERM/SIGINT, once in-flight reconciles finished.
        () = controller::run(client, Arc::new(sts), metrics, settings, instance, signalled(shutdown)) => {
            let _ = stop.send(());
            match keeper.await {
                Ok((mut elector, Ok(()))) => {
                    // Hand over at once instead of after the lease duration.
                    if let Err(e) = elector.release().await {
                        tracing::warn!(error = %e, "releasing the leader Lease failed");
                    }
                    Ok(())
                }
                Ok((_, Err(e))) => Err(lost(e)),
                Err(e) => Err(format!("leader election task failed: {e}")),
            }
        }
        result = &mut keeper => match result {
            Ok((_, Err(e))) => Err(lost(e)),
            Ok((_, Ok(()))) => Err("leader election stopped unexpectedly".into()),
            Err(e) => Err(format!("leader election task failed: {e}")),
        },
        message = &mut server_failed => Err(message),
    }
}

async fn run_webhook(args: WebhookArgs) -> RunResult {
    init_logging(args.log_format, &args.log_level)?;
    let managed = args.manage_certificate.then(|| Managed {
        policy: Policy {
            names: args.cert_names.clone(),
            validity: args.cert_validity,
            overlap: args.cert_overlap,
        },
        configuration: args.webhook_configuration.clone().filter(|c| !c.is_empty()),
    });
    if let Some(managed) = &managed {
        managed.policy.check()?;
    }
    let shutdown_delay = args
        .shutdown_delay
        .try_into()
        .map_err(|_| "--shutdown-delay must not be negative".to_string())?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot build a Kubernetes client: {e}"))?;
    let secret_namespace = own_namespace(args.tls_secret_namespace.as_deref(), &client);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        secret = %format!("{secret_namespace}/{}", args.tls_secret),
        manage_certificate = args.manage_certificate,
        configuration = args.webhook_configuration.as_deref().unwrap_or("<none>"),
        "starting the kube-sts webhook"
    );
    if args.manage_certificate && managed.as_ref().is_some_and(|m| m.configuration.is_none()) {
        tracing::warn!("no --webhook-configuration: the caBundle is not kept current by the webhook");
    }
    let settings = webhook::Settings {
        namespace: args.namespace.clone().filter(|n| !n.is_empty()),
        addr: args.webhook_addr,
        certificate: keeper::Settings {
            secret: args.tls_secret.clone(),
            namespace: secret_namespace,
            managed,
        },
        shutdown_delay,
    };
    let metrics = Arc::new(Metrics::new(Process::Webhook));
    let server = tokio::spawn(metrics::serve(args.metrics_addr, metrics.clone()));
    let shutdown = shutdown_signal()?;
    let metrics_addr = args.metrics_addr;
    tokio::select! {
        result = webhook::run(client, settings, metrics, signalled(shutdown)) => result,
        result = server => match result {
            Ok(Err(e)) => Err(format!("metrics server on {metrics_addr}: {e}")),
            _ => Err("metrics server stopped".to_string()),
        },
    }
}

/// Starts handling SIGTERM and SIGINT: the receiver turns `true` at the first one; a second
/// one ends the process at once (as `kubectl delete --force` users expect).
fn shutdown_signal() -> Result<tokio::sync::watch::Receiver<bool>, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        for _ in 0..2 {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if tx.send_replace(true) {
                tracing::warn!("second shutdown signal; exiting at once");
                std::process::exit(1);
            }
            tracing::info!("shutdown signal received; finishing in-flight work");
        }
    });
    Ok(rx)
}

/// Completes once a shutdown signal came.
async fn signalled(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|signalled| *signalled).await;
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => {
            print!("{}", crd::crds_yaml());
            Ok(())
        }
        Command::Version => {
            println!("kube-sts {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Run(args) => run(args).await,
        Command::Webhook(args) => run_webhook(args).await,
    };
    if let Err(message) = result {
        eprintln!("kube-sts: {message}");
        std::process::exit(1);
    }
}

/// The namespace a flag names, else the pod's own (`POD_NAMESPACE`), else the kubeconfig's.
fn own_namespace(flag: Option<&str>, client: &kube::Client) -> String {
    flag.filter(|n| !n.is_empty())
        .map(str::to_string)
        .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty()))
        .unwrap_or_else(|| client.default_namespace().to_string())
}
