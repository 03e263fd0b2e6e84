//! The reconcile loop: read → plan (pure) → act (STS, Secret writes) → status.
//!
//! - `mod.rs`: settings, the shared [`Context`], and [`run`], which wires the watches to the
//!   controller;
//! - `caches`: the caches and indexes the reconciler reads from, and the watch plumbing;
//! - `reconcile`: one binding end to end (grants, references, plan, subjects, status);
//! - `subject`: one subject: the pure decision (`crate::decision`) and acting on it;
//!   `subject_states`: what is remembered of each subject between reconciles;
//! - `secrets`: Secret I/O; `status`: conditions and the status write;
//! - `binding_cache`, `secret_cache`, `packing`: the compact caches of bindings and Secrets;
//!   `name_cache`: which ServiceAccounts, and which Secrets the operator does not manage,
//!   exist;
//!   `wakeups`: when each binding is reconciled next.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt, channel::mpsc::UnboundedSender, future::join_all};
use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::{Namespace, Secret, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        reflector,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;

use crate::{
    Error, Result,
    conditions::{self, DEGRADED, READY, Reason, SubjectOutcome},
    crd::{AWSRoleBinding, AWSRoleBindingStatus, AWSRoleGrant, SubjectStatus},
    decision::{self, Decision, SubjectState},
    events::{EventType, Publisher},
    grants::{GrantRequest, GrantVerdict, grant_allows},
    metrics::{Metrics, SubjectLabels},
    plan::{self, BindingPlan, IssueSettings, Resolved, SubjectPlan},
    render::{
        self, BINDING_LABEL, Credentials, KEY_ACCESS_KEY_ID, KEY_SECRET_ACCESS_KEY, MANAGED_BY, MANAGED_BY_LABEL,
        SERVICE_ACCOUNT_LABEL,
    },
    shards::{Scope, gate::ShardEvent, shard_of},
    sts::{Issuer, StsError, access_denied_hint},
    timing,
};

mod binding_cache;
mod caches;
mod name_cache;
mod packing;
mod reconcile;
mod secret_cache;
mod secrets;
mod status;
mod subject;
mod subject_states;
mod wakeups;

use self::{
    binding_cache::*, caches::*, reconcile::*, secrets::*, status::*, subject::*, subject_states::SubjectStates,
    wakeups::Wakeups,
};
pub use binding_cache::CachedBinding;
pub use caches::{Stores, WrittenStatuses};
pub use name_cache::NameCache;
pub use secret_cache::SecretCache;

pub const FIELD_MANAGER: &str = "kube-sts";

/// How the operator runs (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: Option<String>,
    pub require_grants: bool,
    pub issue: IssueSettings,
    pub concurrency: u16,
    /// STS's time, shared with the STS client that keeps it.
    pub clock: Arc<crate::clock::Clock>,
    /// Which namespaces this process caches and reconciles (`--namespace-prefix`, shards).
    pub scope: Scope,
}

type SubjectKey = (String, String, String);

/// Forgets what the operator kept about a deleted binding: per-subject state and metric
/// series (its Secrets go with the garbage collector).
fn forget_binding(namespace: &str, name: &str, subjects: &SubjectStates, metrics: &Metrics) {
    forget_subjects_where(subjects, metrics, |ns, b| ns == namespace && b == name);
}

/// Forgets the per-subject state (it holds credentials) and metric series of every subject
/// whose binding `(namespace, name)` matches `gone`.
fn forget_subjects_where(subjects: &SubjectStates, metrics: &Metrics, gone: impl Fn(&str, &str) -> bool) {
    subjects.forget_where(gone, |ns, b, sa| {
        metrics.forget_subject(&SubjectLabels {
            namespace: ns.into(),
            binding: b.into(),
            service_account: sa.into(),
        });
    });
}

pub struct Context {
    pub client: Client,
    pub events: Publisher,
    pub metrics: Arc<Metrics>,
    pub issuer: Arc<dyn Issuer>,
    pub settings: Settings,
    pub stores: Stores,
    subjects: Arc<SubjectStates>,
    mfa_codes: crate::mfa::CodeLedger,
    /// When each binding is next reconciled on its own.
    wakeups: Arc<Wakeups>,
    /// Consecutive failed reconciles (Kubernetes errors) by binding, for their backoff.
    failed_reconciles: Mutex<HashMap<(String, String), u32>>,
}

impl Context {
    fn current_status(&self, binding: &AWSRoleBinding) -> Option<AWSRoleBindingStatus> {
        self.stores
            .written_statuses
            .lock()
            .expect("status lock")
            .current(binding)
    }

    /// What this process remembers of a subject. One that remembers nothing (it just
    /// started, or just became leader) takes over the failure count and retry time that the
    /// binding's status records.
    fn state(&self, key: &SubjectKey, binding: &AWSRoleBinding) -> SubjectState {
        if let Some(state) = self.subjects.get(key) {
            return state;
        }
        let Some(status) = self.current_status(binding) else {
            return SubjectState::default();
        };
        let reason = status
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .and_then(|c| Reason::parse(&c.reason));
        let now = self.settings.clock.now();
        status
            .subjects
            .iter()
            .find(|s| s.name == key.2)
            .map(|s| {
                let delay = timing::backoff_delay(s.consecutive_failures, rand::random::<f64>(), now, None);
                let first_retry = now + jiff::SignedDuration::try_from(delay).unwrap_or_default();
                SubjectState::resumed(s, reason, first_retry)
            })
            .unwrap_or_default()
    }

    fn set_state(&self, key: SubjectKey, state: SubjectState) {
        self.subjects.set(&key, &state);
    }

    fn forget(&self, key: &SubjectKey) {
        self.subjects.remove(key);
    }

    fn publish(&self, binding: &AWSRoleBinding, type_: EventType, reason: &str, note: String) {
        let regarding = binding.object_ref(&());
        self.events.publish(&regarding, type_, reason, "Reconcile", &note);
    }
}

/// Runs the controller until a shutdown signal.
pub async fn run(
    client: Client,
    issuer: Arc<dyn Issuer>,
    metrics: Arc<Metrics>,
    settings: Settings,
    instance: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = settings.namespace.clone();
    let (bindings, writer) = reflector::store();
    let written_statuses = Arc::new(Mutex::new(WrittenStatuses::default()));
    let subjects = Arc::new(SubjectStates::default());
    let wakeups = Arc::new(Wakeups::default());
    let (written, kept, meter, cached, planned) = (
        written_statuses.clone(),
        subjects.clone(),
        metrics.clone(),
        bindings.clone(),
        wakeups.clone(),
    );
    let scope = settings.scope.clone();
    let api = api_for::<AWSRoleBinding>(&client, ns.as_deref());
    let binding_events = reflector(
        writer,
        scope
            .watch(move || watcher(api.clone(), timing::watch_config()), namespace_of)
            .map_ok(packed),
    )
    .default_backoff()
    // The echo of the operator's own status write is no news: it reconciles nothing.
    .try_filter(move |event| {
        let news = match event {
            watcher::Event::Apply(binding) | watcher::Event::InitApply(binding) => {
                let echo = written
                    .lock()
                    .expect("status lock")
                    .echo_of_write(binding.key(), binding.resource_version());
                !(echo && matches!(event, watcher::Event::Apply(_)))
            }
            watcher::Event::Delete(binding) => {
                let key = binding.key();
                written.lock().expect("status lock").0.remove(&key);
                forget_binding(&key.0, &key.1, &kept, &meter);
                planned.set(&key.0, &key.1, None);
                true
            }
            watcher::Event::InitDone => {
                // A relist after a watch gap: bindings deleted meanwhile sent no delete event.
                let exists = |ns: &str, name: &str| cached.get(&ObjectRef::new(name).within(ns)).is_some();
                forget_subjects_where(&kept, &meter, |ns, b| !exists(ns, b));
                planned.retain(exists);
                written
                    .lock()
                    .expect("status lock")
                    .0
                    .retain(|(ns, b), _| exists(ns, b));
                true
            }
            watcher::Event::Init => true,
        };
        futures::future::ready(news)
    })
    .applied_objects();
    let controller = Controller::for_stream(binding_events, bindings.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(settings.concurrency));
    let (requests, requested) = futures::channel::mpsc::unbounded();

    let secrets = SecretCache::default();
    let selector = managed_selector();
    let api = api_for::<Secret>(&client, ns.as_deref());
    let cache = secrets.clone();
    let stream = scope
        .watch(
            move || watcher(api.clone(), timing::watch_config().labels(&selector)),
            namespace_of,
        )
        .default_backoff()
        .try_filter(move |event| futures::future::ready(cache.apply(event)));
    drive("secrets", stream, requests.clone(), move |secret: Secret| {
        let namespace = secret.namespace().unwrap_or_default();
        secret
            .owner_references()
            .iter()
            .filter(|o| is_binding_controller(&o.kind, o.controller))
            .map(|o| ObjectRef::new(&o.name).within(&namespace))
            .collect()
    });

    // The names of the Secrets the operator does not manage (metadata only): a subject's
    // Secret that is not in the managed cache is read from the API only when one of its
    // name exists; else it is created without a read.
    let unmanaged_secrets = NameCache::default();
    let api = api_for::<PartialObjectMeta<Secret>>(&client, ns.as_deref());
    let selector = unmanaged_selector();
    let cache = unmanaged_secrets.clone();
    let stream = scope
        .watch(
            move || watcher(api.clone(), timing::watch_config().labels(&selector)),
            namespace_of,
        )
        .default_backoff()
        .inspect_ok(move |event| cache.apply(event));
    // A foreign Secret going away is noticed by the conflicting subject's recheck.
    drive("unmanaged secrets", stream, requests.clone(), |_| Vec::new());

    let service_accounts = NameCache::default();
    let api: Api<PartialObjectMeta<ServiceAccount>> = match ns.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let cache = service_accounts.clone();
    let stream = scope
        .watch(move || watcher(api.clone(), timing::watch_config()), namespace_of)
        .default_backoff()
        .inspect_ok(move |event| cache.apply(event));
    let store = bindings.clone();
    drive(
        "serviceaccounts",
        stream,
        requests.clone(),
        move |sa: PartialObjectMeta<ServiceAccount>| {
            let (namespace, name) = (sa.namespace(), sa.name_any());
            bindings_where(&store, |b| b.namespace() == namespace && b.has_subject(&name))
        },
    );

    let (namespaces, writer) = reflector::store();
    let config = timing::watch_config_of(ns.as_deref());
    let api = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
    let stream = reflector(
        writer,
        scope.watch(
            move || watcher(api.clone(), config.clone()).modify(trim_namespace),
            |namespace: &PartialObjectMeta<Namespace>| namespace.name_any(),
        ),
    )
    .default_backoff();
    let store = bindings.clone();
    drive(
        "namespaces",
        stream,
        requests.clone(),
        move |namespace: PartialObjectMeta<Namespace>| {
            let name = namespace.name_any();
            bindings_where(&store, |b| b.namespace().as_deref() == Some(name.as_str()))
        },
    );

    let (grants, writer) = reflector::store();
    let api = Api::<AWSRoleGrant>::all(client.clone());
    let stream = reflector(
        writer,
        watcher(api, timing::watch_config()).modify(strip_managed_fields),
    )
    .default_backoff();
    let store = bindings.clone();
    // A grant may allow or forbid any binding: re-check them all.
    let shard_requests = requests.clone();
    drive("awsrolegrants", stream, requests, move |_: AWSRoleGrant| {
        bindings_where(&store, |_| true)
    });

    let stores = Stores {
        bindings: bindings.clone(),
        secrets,
        unmanaged_secrets,
        service_accounts,
        namespaces,
        grants,
        written_statuses,
    };
    // Decide nothing before every cache is complete (a restart must see every Secret).
    // Waited for once, here: Store::wait_until_ready wakes only the last of several waiters.
    let shutdown = futures::FutureExt::shared(shutdown);
    tokio::select! {
        () = stores.wait_ready() => {}
        () = shutdown.clone() => {
            tracing::info!("stopped before the caches synced");
            return;
        }
    }
    metrics.set_ready(true);
    tracing::info!("caches synced");

    let ctx = Arc::new(Context {
        events: Publisher::new(
            client.clone(),
            FIELD_MANAGER,
            instance,
            2 * usize::from(settings.concurrency.max(1)),
        ),
        client,
        metrics,
        issuer,
        settings,
        stores,
        subjects,
        mfa_codes: crate::mfa::CodeLedger::default(),
        wakeups: wakeups.clone(),
        failed_reconciles: Mutex::default(),
    });
    tokio::spawn(wakeups.run(shard_requests.clone()));
    if let Some(events) = ctx.settings.scope.gate.as_ref().and_then(|g| g.take_events()) {
        tokio::spawn(follow_shards(events, ctx.clone(), shard_requests));
    }
    let running = controller
        .reconcile_on(requested)
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_held, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        });
    // The controller runs no reconcile before the binding cache has its first listing, and
    // its graceful shutdown would wait for that listing (which a slow or unreachable
    // apiserver may never finish): stopped then, there is nothing in flight to finish.
    let unlisted_at_shutdown = async {
        shutdown.await;
        if futures::FutureExt::now_or_never(bindings.wait_until_ready()).is_some() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = running => tracing::info!("controller stopped"),
        () = unlisted_at_shutdown => tracing::info!("stopped before the binding cache was listed"),
    }
}

fn namespace_of<K: ResourceExt>(object: &K) -> String {
    object.namespace().unwrap_or_default()
}

/// Sharded: reconciles a binding only while this replica holds its shard (and the caches
/// hold it completely), and stops the reconcile when the shard stops being held.
async fn reconcile_held(binding: Arc<CachedBinding>, ctx: Arc<Context>) -> Result<Action> {
    let Some(gate) = ctx.settings.scope.gate.clone() else {
        return reconcile(binding, ctx).await;
    };
    let (namespace, name) = binding.key();
    // Not reconciled now, while the shard is still held here (its Lease renewed late, its
    // caches listing, or draining): tried again shortly, since the wake-up that may have
    // brought this request is spent. A shard given up plans nothing (its new holder
    // reconciles the binding; `Dropped` removes what was planned here).
    let later = |ctx: &Context| {
        if gate.holds(&namespace) {
            ctx.wakeups.set(&namespace, &name, Some(RETRY_WHILE_HELD));
        }
        Ok(Action::await_change())
    };
    let Some(mut permit) = gate.enter(&namespace) else {
        tracing::debug!(binding = %name, %namespace, "not reconciled: its shard is not active here");
        return later(&ctx);
    };
    let metrics = ctx.metrics.clone();
    tokio::select! {
        // Polled first, so the reconcile has started (and counted itself) before any cancel.
        biased;
        result = reconcile(binding.clone(), ctx.clone()) => result,
        () = permit.revoked() => {
            metrics.reconcile_abandoned();
            tracing::warn!(binding = %name, %namespace, "reconcile cancelled: its shard is no longer held");
            later(&ctx)
        }
    }
}

/// How soon a binding whose shard is held but not active is tried again.
const RETRY_WHILE_HELD: Duration = Duration::from_secs(5);

/// Reconciles the bindings of shards once the caches hold them, and forgets what was kept
/// about the subjects of shards given up or lost (a new holder adopts their Secrets).
async fn follow_shards(
    mut events: tokio::sync::mpsc::UnboundedReceiver<ShardEvent>,
    ctx: Arc<Context>,
    requests: UnboundedSender<ObjectRef<CachedBinding>>,
) {
    let shards = ctx.settings.scope.gate.as_ref().map_or(1, |g| g.shards());
    while let Some(event) = events.recv().await {
        match event {
            ShardEvent::Active(active) => {
                let of = |ns: &str| active.contains(&shard_of(ns, shards));
                for binding in bindings_where(&ctx.stores.bindings, |b| of(&namespace_of(b))) {
                    if requests.unbounded_send(binding).is_err() {
                        return;
                    }
                }
            }
            ShardEvent::Listed => {
                let s = &ctx.stores;
                tracing::info!(
                    bindings = s.bindings.len(),
                    secrets = s.secrets.count(),
                    service_accounts = s.service_accounts.count(),
                    namespaces = s.namespaces.len(),
                    wakeups = ctx.wakeups.len(),
                    subjects = ctx.subjects.count(),
                    "the caches hold the objects of the shards held, and no others"
                );
            }
            ShardEvent::Dropped(dropped) => {
                let of = |ns: &str| dropped.contains(&shard_of(ns, shards));
                forget_subjects_where(&ctx.subjects, &ctx.metrics, |ns, _| of(ns));
                ctx.wakeups.retain(|ns, _| !of(ns));
                ctx.failed_reconciles
                    .lock()
                    .expect("failures lock")
                    .retain(|(namespace, _), _| !of(namespace));
                // The Secret index follows the watch, whose listing after the change
                // replaces it.
            }
        }
    }
}
