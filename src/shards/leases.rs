//! The Lease I/O of sharding: every `retry_period` one list of the group's Leases (label
//! `kube-sts.io/lease-group=<lease-name>`), this replica's membership Lease renewed, each
//! shard seen as ours, free or held ([`super::ShardView`]), [`super::plan`] applied with
//! compare-and-swap writes, the held shards renewed every `renew_period`. A shard is lost
//! when another holder shows in its record or it has not been renewed for `renew_deadline`.
//!
//! API calls: `list`, `create`, `update` and `delete` of Leases in the lease namespace.

use std::{collections::HashMap, sync::Arc, time::Duration};

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams, Preconditions},
};
use tokio::time::{Instant, sleep, timeout};

use super::{Gate, Plan, ShardView, may_acquire, member_lease_name, plan, shard_lease_name};
use crate::leader::{LeaseSettings, api_error_text, duration_of, holder_spec, observe, released_spec};

/// Label of every Lease of a shard group (shards and members), valued the lease name.
pub const GROUP_LABEL: &str = "kube-sts.io/lease-group";
/// Annotation of every Lease a replica writes: its `--shards`.
pub const SHARDS_ANNOTATION: &str = "kube-sts.io/shards";

#[derive(Default)]
struct Shard {
    /// The record last seen and when (our clock) it was first seen like that.
    observed: Option<(LeaseSpec, Instant)>,
    /// When it was first seen free, while it is.
    free_since: Option<Instant>,
    /// Start of the last write that left us holding it.
    renewed_at: Option<Instant>,
    draining: bool,
}

enum Write {
    Acquire(u32),
    Renew(u32),
    Release(u32),
}

pub struct ShardLeases {
    api: Api<Lease>,
    settings: LeaseSettings,
    gate: Arc<Gate>,
    shards: Vec<Shard>,
    member: String,
    member_renewed_at: Option<Instant>,
    /// Other members' records as last seen and since when.
    members: HashMap<String, (LeaseSpec, Instant)>,
    last_problem: String,
    /// Replicas with another `--shards` were live at the last round.
    mixed: bool,
    /// Rounds done; the first only announces this replica (its membership Lease), so that
    /// replicas starting together see each other before taking shards.
    rounds: u64,
    /// Turns true at SIGTERM: from then on no shard is taken (they would be given up again
    /// as soon as the controller stopped).
    shutting_down: tokio::sync::watch::Receiver<bool>,
}

fn shard_count(lease: &Lease) -> Option<&str> {
    lease.annotations().get(SHARDS_ANNOTATION).map(String::as_str)
}

fn holder(spec: &LeaseSpec) -> Option<&str> {
    spec.holder_identity.as_deref().filter(|h| !h.is_empty())
}

impl ShardLeases {
    /// `settings.name` is the group's lease name; shard Leases and membership Leases are
    /// named after it.
    pub fn new(
        client: Client,
        settings: LeaseSettings,
        gate: Arc<Gate>,
        shutting_down: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let shards = (0..gate.shards()).map(|_| Shard::default()).collect();
        ShardLeases {
            api: Api::namespaced(client, &settings.namespace),
            member: member_lease_name(&settings.name, &settings.identity),
            settings,
            gate,
            shards,
            member_renewed_at: None,
            members: HashMap::new(),
            last_problem: String::new(),
            mixed: false,
            rounds: 0,
            shutting_down,
        }
    }

    /// The Lease to write: `previous` (guarded by its resourceVersion) or a new one named
    /// `name` in the group, with `spec` and this replica's shard count.
    fn to_write(&self, previous: Option<Lease>, name: String, spec: LeaseSpec) -> Lease {
        let mut lease = previous.unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(name),
                labels: Some([(GROUP_LABEL.to_string(), self.settings.name.clone())].into()),
                ..Default::default()
            },
            spec: None,
        });
        lease.spec = Some(spec);
        lease
            .annotations_mut()
            .insert(SHARDS_ANNOTATION.into(), self.shards.len().to_string());
        lease
    }

    fn problem(&mut self, problem: String) {
        if problem != self.last_problem {
            tracing::warn!(lease = %self.settings.name, namespace = %self.settings.namespace, error = %problem, "shard Leases: retrying");
            self.last_problem = problem;
        }
    }

    fn lose(&mut self, shard: u32, why: &str) {
        let state = &mut self.shards[shard as usize];
        if state.renewed_at.take().is_some() {
            state.draining = false;
            tracing::error!(shard, lease = %shard_lease_name(&self.settings.name, shard), reason = why, "lost shard; stopped reconciling it");
            self.gate.dropped(shard);
        }
    }

    /// Takes, keeps and gives up shards until `stop` completes; then gives every shard up
    /// (the controller has stopped by then) and deletes the membership Lease.
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        tracing::info!(lease = %self.settings.name, namespace = %self.settings.namespace, identity = %self.settings.identity, shards = self.shards.len(), "joining the shard group");
        loop {
            self.round().await;
            let pause = self.settings.retry_period.mul_f64(1.0 + rand::random::<f64>() * 0.2);
            tokio::select! {
                () = &mut stop => break,
                () = sleep(pause) => {}
            }
        }
        self.leave().await;
    }

    async fn list(&mut self) -> Option<HashMap<String, Lease>> {
        let params = ListParams::default().labels(&format!("{GROUP_LABEL}={}", self.settings.name));
        match timeout(self.settings.request_timeout, self.api.list(&params)).await {
            Ok(Ok(list)) => Some(list.items.into_iter().map(|l| (l.name_any(), l)).collect()),
            Ok(Err(e)) => {
                self.problem(api_error_text(&e));
                None
            }
            Err(_) => {
                self.problem(format!("no answer within {:?}", self.settings.request_timeout));
                None
            }
        }
    }

    /// One compare-and-swap write of `lease` (create when it has no resourceVersion).
    async fn write(api: &Api<Lease>, lease: Lease, limit: Duration) -> Result<Lease, String> {
        let name = lease.name_any();
        let work = async {
            if lease.metadata.resource_version.is_none() {
                api.create(&PostParams::default(), &lease).await
            } else {
                api.replace(&name, &PostParams::default(), &lease).await
            }
        };
        match timeout(limit, work).await {
            Ok(Ok(written)) => Ok(written),
            Ok(Err(kube::Error::Api(e))) if e.code == 409 => Err("changed meanwhile".into()),
            Ok(Err(e)) => Err(api_error_text(&e)),
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }

    async fn round(&mut self) {
        let s = self.settings.clone();
        let now = Instant::now();
        for shard in 0..self.shards.len() as u32 {
            if self.shards[shard as usize]
                .renewed_at
                .is_some_and(|at| now >= at + s.renew_deadline)
            {
                self.lose(shard, "not renewed within the renew deadline");
            }
        }
        let Some(leases) = self.list().await else {
            return;
        };
        let now = Instant::now();

        // This replica's membership, written with the shard Leases below.
        let membership = self
            .member_renewed_at
            .is_none_or(|at| now >= at + s.renew_period)
            .then(|| {
                let previous = leases.get(&self.member).cloned();
                let spec = holder_spec(
                    &previous.as_ref().and_then(|l| l.spec.clone()).unwrap_or_default(),
                    true,
                    &s.identity,
                    s.lease_duration,
                    Timestamp::now(),
                );
                self.to_write(previous, self.member.clone(), spec)
            });
        // Other members: live while their record changes within its duration.
        let member_prefix = member_lease_name(&s.name, "");
        let mut live = Vec::new();
        let mut counts: Vec<Option<String>> = Vec::new();
        let mut lapsed = Vec::new();
        for (name, lease) in &leases {
            if !name.starts_with(&member_prefix) || *name == self.member {
                continue;
            }
            let spec = lease.spec.clone().unwrap_or_default();
            let mut observed = self.members.remove(name);
            let unchanged_for = observe(&mut observed, &spec, now);
            self.members.insert(name.clone(), observed.expect("observed"));
            let duration = duration_of(&spec, s.lease_duration);
            match holder(&spec) {
                Some(h) if unchanged_for < duration => {
                    live.push(h.to_string());
                    counts.push(shard_count(lease).map(str::to_string));
                }
                _ if unchanged_for >= 2 * duration => lapsed.push(lease.clone()),
                _ => {}
            }
        }
        self.members.retain(|name, _| leases.contains_key(name));

        // The shards as seen now.
        let mut views = Vec::with_capacity(self.shards.len());
        let mut lost = Vec::new();
        for (i, state) in self.shards.iter_mut().enumerate() {
            let spec = leases
                .get(&shard_lease_name(&s.name, i as u32))
                .and_then(|l| l.spec.clone())
                .unwrap_or_default();
            let unchanged_for = observe(&mut state.observed, &spec, now);
            let count = leases
                .get(&shard_lease_name(&s.name, i as u32))
                .and_then(|l| shard_count(l).map(str::to_string));
            let view = match holder(&spec) {
                // Also a record naming us that we do not know we hold (an earlier write whose
                // answer was lost): renewed as ours.
                Some(h) if h == s.identity => ShardView::Ours,
                Some(h) if state.renewed_at.is_some() => {
                    lost.push((i as u32, format!("now held by {h}")));
                    ShardView::Held { holder: h.to_string() }
                }
                Some(h) if unchanged_for < duration_of(&spec, s.lease_duration) => {
                    ShardView::Held { holder: h.to_string() }
                }
                _ => {
                    if state.renewed_at.is_some() {
                        lost.push((i as u32, "released by someone else".to_string()));
                    }
                    ShardView::Free {
                        for_: now - *state.free_since.get_or_insert(now),
                    }
                }
            };
            if !matches!(view, ShardView::Free { .. }) {
                state.free_since = None;
            }
            if matches!(view, ShardView::Held { .. }) {
                counts.push(count);
            }
            views.push(view);
        }
        for (shard, why) in lost {
            self.lose(shard, &why);
        }
        let draining: Vec<u32> = (0..self.shards.len() as u32)
            .filter(|i| self.shards[*i as usize].draining)
            .collect();
        let mixed = !may_acquire(self.shards.len() as u32, counts.iter().map(Option::as_deref));
        if mixed != self.mixed {
            if mixed {
                tracing::warn!(
                    shards = self.shards.len(),
                    "replicas with another --shards are live: taking and giving up no shard until they are gone"
                );
            } else {
                tracing::info!(
                    shards = self.shards.len(),
                    "every live replica runs with the same --shards again"
                );
            }
            self.mixed = mixed;
        }
        self.rounds += 1;
        let plan = if mixed || self.rounds == 1 {
            Plan::default()
        } else {
            let mut plan = plan(&views, &live, &draining, 2 * s.lease_duration);
            if *self.shutting_down.borrow() {
                plan.acquire.clear();
            }
            plan
        };
        for shard in &plan.release {
            tracing::info!(
                shard,
                "above the fair share while another replica is below it: giving the shard up"
            );
            self.shards[*shard as usize].draining = true;
            self.gate.drain(*shard);
        }

        let mut writes = Vec::new();
        for (i, state) in self.shards.iter().enumerate() {
            let shard = i as u32;
            if state.draining && self.gate.drained(shard) {
                writes.push(Write::Release(shard));
            } else if views[i] == ShardView::Ours && state.renewed_at.is_none_or(|at| now >= at + s.renew_period) {
                writes.push(Write::Renew(shard));
            }
        }
        writes.extend(plan.acquire.iter().map(|shard| Write::Acquire(*shard)));
        let started = Instant::now();
        let stamp = Timestamp::now();
        let requests = writes.iter().map(|write| {
            let (shard, ours, release) = match write {
                Write::Acquire(i) => (*i, false, false),
                Write::Renew(i) => (*i, true, false),
                Write::Release(i) => (*i, true, true),
            };
            let name = shard_lease_name(&s.name, shard);
            let previous = leases.get(&name).cloned();
            let spec = previous.as_ref().and_then(|l| l.spec.clone()).unwrap_or_default();
            let spec = if release {
                released_spec(spec, stamp)
            } else {
                holder_spec(&spec, ours, &s.identity, s.lease_duration, stamp)
            };
            let lease = self.to_write(previous, name, spec);
            Self::write(&self.api, lease, s.request_timeout)
        });
        let member_write = async {
            match membership {
                Some(lease) => Some(Self::write(&self.api, lease, s.request_timeout).await),
                None => None,
            }
        };
        // All at once: a slow answer must not hold a renewal back past its deadline.
        let (member_result, results) = futures::join!(member_write, futures::future::join_all(requests));
        match member_result {
            Some(Ok(_)) => self.member_renewed_at = Some(now),
            Some(Err(problem)) => self.problem(format!("membership Lease {}: {problem}", self.member)),
            None => {}
        }
        for (write, result) in writes.into_iter().zip(results) {
            match (write, result) {
                (Write::Acquire(shard), Ok(lease)) => {
                    let state = &mut self.shards[shard as usize];
                    observe(&mut state.observed, &lease.spec.unwrap_or_default(), Instant::now());
                    state.renewed_at = Some(started);
                    state.free_since = None;
                    tracing::info!(shard, lease = %shard_lease_name(&s.name, shard), "acquired shard");
                    self.gate.acquired(shard, started, s.renew_deadline);
                }
                (Write::Renew(shard), Ok(lease)) => {
                    let state = &mut self.shards[shard as usize];
                    observe(&mut state.observed, &lease.spec.unwrap_or_default(), Instant::now());
                    if state.renewed_at.is_none() {
                        tracing::info!(shard, lease = %shard_lease_name(&s.name, shard), "acquired shard");
                        self.gate.acquired(shard, started, s.renew_deadline);
                    } else if !self.gate.renewed(shard, started, s.renew_deadline) {
                        // Answered after the deadline: its reconciles were cancelled. Still
                        // ours (the write succeeded), so it starts over as a new holding.
                        tracing::warn!(shard, lease = %shard_lease_name(&s.name, shard), "shard Lease renewed after its deadline; taking it afresh");
                        self.gate.dropped(shard);
                        self.gate.acquired(shard, started, s.renew_deadline);
                    }
                    state.renewed_at = Some(started);
                }
                (Write::Release(shard), Ok(_)) => {
                    let state = &mut self.shards[shard as usize];
                    state.renewed_at = None;
                    state.draining = false;
                    tracing::info!(shard, lease = %shard_lease_name(&s.name, shard), "released shard");
                    self.gate.dropped(shard);
                }
                (Write::Acquire(shard) | Write::Renew(shard) | Write::Release(shard), Err(problem)) => {
                    tracing::debug!(shard, error = %problem, "shard Lease write failed");
                    if problem != "changed meanwhile" {
                        self.problem(format!("shard {shard}: {problem}"));
                    }
                }
            }
        }
        // Membership Leases of replicas long gone (killed): deleted, guarded by the version seen.
        for lease in lapsed {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: lease.resource_version(),
                    uid: lease.uid(),
                }),
                ..Default::default()
            };
            let name = lease.name_any();
            if let Ok(Ok(_)) = timeout(s.request_timeout, self.api.delete(&name, &params)).await {
                tracing::info!(lease = %name, "deleted the membership Lease of a replica gone");
            }
        }
    }

    /// Gives every held shard up and leaves the group.
    async fn leave(mut self) {
        let s = self.settings.clone();
        let deadline = Instant::now() + s.renew_deadline;
        for shard in 0..self.shards.len() as u32 {
            if self.shards[shard as usize].renewed_at.is_none() {
                continue;
            }
            self.gate.drain(shard);
            while !self.gate.drained(shard) && Instant::now() < deadline {
                sleep(Duration::from_millis(50)).await;
            }
            let name = shard_lease_name(&s.name, shard);
            let released = async {
                let mut lease = self.api.get(&name).await.map_err(|e| api_error_text(&e))?;
                let spec = lease.spec.clone().unwrap_or_default();
                if holder(&spec) != Some(s.identity.as_str()) {
                    return Ok(false);
                }
                lease.spec = Some(released_spec(spec, Timestamp::now()));
                Self::write(&self.api, lease, s.request_timeout).await.map(|_| true)
            };
            match timeout(s.request_timeout, released).await {
                Ok(Ok(true)) => tracing::info!(shard, lease = %name, "released shard"),
                Ok(Ok(false)) => {}
                Ok(Err(problem)) => {
                    tracing::warn!(shard, lease = %name, error = %problem, "releasing the shard failed")
                }
                Err(_) => tracing::warn!(shard, lease = %name, "releasing the shard: no answer"),
            }
            self.shards[shard as usize].renewed_at = None;
            self.gate.dropped(shard);
        }
        match timeout(
            s.request_timeout,
            self.api.delete(&self.member, &DeleteParams::default()),
        )
        .await
        {
            Ok(Ok(_)) => tracing::info!(lease = %self.member, "left the shard group"),
            Ok(Err(e)) => {
                tracing::warn!(lease = %self.member, error = %api_error_text(&e), "deleting the membership Lease failed")
            }
            Err(_) => tracing::warn!(lease = %self.member, "deleting the membership Lease: no answer"),
        }
    }
}
