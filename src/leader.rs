//! Leader election through a `coordination.k8s.io/v1` Lease, following client-go's
//! algorithm: every write is a compare-and-swap on the Lease's resourceVersion (get, then
//! create or replace), a candidate takes over a held Lease only after it has seen the
//! record unchanged for a whole lease duration on its own monotonic clock (so clock skew
//! between nodes does not matter), and the leader gives up as soon as it has not renewed
//! for `renew_deadline`, which is shorter than the lease duration: it stops before any
//! other candidate can start.
//!
//! API calls: `get`, `create` and `update` on the one Lease.

use std::{future::Future, time::Duration};

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, api::PostParams};
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// Timing and naming of the election.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// How long a Lease stays held after its last renewal (written into the Lease).
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_period: Duration,
    /// The leader gives up when it has not renewed for this long (< `lease_duration`).
    pub renew_deadline: Duration,
    /// How often a candidate tries to take the Lease.
    pub retry_period: Duration,
    /// Upper bound of one API round trip.
    pub request_timeout: Duration,
}

impl LeaseSettings {
    /// Lease duration 15 s, renewal every 5 s, giving up after 10 s without a renewal,
    /// candidates trying every 2 s.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseSettings {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_period: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            request_timeout: Duration::from_secs(4),
        }
    }
}

/// Who this process is in the election: `POD_NAME`, else the host name, plus a random
/// suffix so that two processes on one host (or a restarted pod) never share an identity.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| hostname::get().ok().map(|h| h.to_string_lossy().into_owned()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "kube-sts".into());
    let suffix: String = (0..6)
        .map(|_| {
            let chars = b"abcdefghijklmnopqrstuvwxyz0123456789";
            chars[rand::random_range(0..chars.len())] as char
        })
        .collect();
    format!("{base}_{suffix}")
}

/// What a candidate may do with the Lease as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    /// Free, released, ours, or expired: write ourselves in.
    Take { ours: bool },
    /// Someone else holds it and it has not expired as far as we have seen.
    Wait { holder: String },
}

/// The lease duration written in the record, else `default`.
pub(crate) fn duration_of(spec: &LeaseSpec, default: Duration) -> Duration {
    spec.lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(default)
}

/// How long (on our clock, at `now`) `spec` has been seen unchanged, recording it when it
/// changed.
pub(crate) fn observe(observed: &mut Option<(LeaseSpec, Instant)>, spec: &LeaseSpec, now: Instant) -> Duration {
    match observed {
        Some((seen, at)) if seen == spec => now - *at,
        _ => {
            *observed = Some((spec.clone(), now));
            Duration::ZERO
        }
    }
}

/// The record of a released Lease: no holder, so the next candidate takes it at once.
pub(crate) fn released_spec(spec: LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        ..spec
    }
}

/// Pure rule: `observed_for` is how long (on our clock) the Lease record has been seen
/// unchanged.
fn decide(spec: &LeaseSpec, identity: &str, observed_for: Duration, default_duration: Duration) -> Decision {
    match spec.holder_identity.as_deref().filter(|h| !h.is_empty()) {
        None => Decision::Take { ours: false },
        Some(h) if h == identity => Decision::Take { ours: true },
        Some(h) => {
            let duration = duration_of(spec, default_duration);
            if observed_for >= duration {
                Decision::Take { ours: false }
            } else {
                Decision::Wait { holder: h.to_string() }
            }
        }
    }
}

/// The record written when taking or renewing.
pub(crate) fn holder_spec(
    previous: &LeaseSpec,
    ours: bool,
    identity: &str,
    duration: Duration,
    now: Timestamp,
) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)),
        acquire_time: if ours {
            previous.acquire_time.clone().or(Some(MicroTime(now)))
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: if ours {
            previous.lease_transitions
        } else {
            Some(previous.lease_transitions.unwrap_or(0).saturating_add(1))
        },
        ..previous.clone()
    }
}

/// Outcome of one try.
#[derive(Debug)]
enum Attempt {
    /// We hold the Lease (taken or renewed).
    Held,
    /// Someone else holds it.
    HeldBy(String),
    /// Someone else wrote the Lease between our read and our write.
    Conflict,
}

/// Why the leader stopped being one.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    #[error("the Lease is now held by {0}")]
    TakenBy(String),
    #[error("could not renew the Lease for {0:?}: {1}")]
    NotRenewed(Duration, String),
}

pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The Lease record last seen and when (our clock) it was first seen like that.
    observed: Option<(LeaseSpec, Instant)>,
    /// Start of the last attempt that left us holding the Lease.
    renewed_at: Option<Instant>,
}

pub(crate) fn api_error_text(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => other.to_string(),
    }
}

impl Elector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
            renewed_at: None,
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    fn observe(&mut self, spec: &LeaseSpec) -> Duration {
        observe(&mut self.observed, spec, Instant::now())
    }

    /// One get, then a create or a replace guarded by the resourceVersion just read.
    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let s = &self.settings;
        let (name, identity, duration) = (s.name.clone(), s.identity.clone(), s.lease_duration);
        let Some(mut lease) = self.api.get_opt(&name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    ..Default::default()
                },
                spec: Some(holder_spec(
                    &LeaseSpec::default(),
                    false,
                    &identity,
                    duration,
                    Timestamp::now(),
                )),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created.spec.unwrap_or_default());
                    Ok(Attempt::Held)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let observed_for = self.observe(&spec);
        let ours = match decide(&spec, &identity, observed_for, duration) {
            Decision::Wait { holder } => return Ok(Attempt::HeldBy(holder)),
            Decision::Take { ours } => ours,
        };
        if !ours && self.renewed_at.is_some() {
            // We held it, and now someone else is in the record (or it was released):
            // that leadership is over whatever the record says now.
            if let Some(holder) = spec.holder_identity.as_ref().filter(|h| !h.is_empty()) {
                return Ok(Attempt::HeldBy(holder.clone()));
            }
        }
        lease.spec = Some(holder_spec(&spec, ours, &identity, duration, Timestamp::now()));
        match self.api.replace(&name, &PostParams::default(), &lease).await {
            Ok(replaced) => {
                self.observe(&replaced.spec.unwrap_or_default());
                Ok(Attempt::Held)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Tries until this process holds the Lease. `on_standby` runs after every try that
    /// reached the API server and found the Lease held by someone else.
    pub async fn acquire(&mut self, mut on_standby: impl FnMut()) {
        let s = self.settings.clone();
        tracing::info!(lease = %s.name, namespace = %s.namespace, identity = %s.identity, "waiting to acquire the leader Lease");
        let mut last_problem = String::new();
        let mut last_holder = String::new();
        loop {
            let started = Instant::now();
            let problem = match timeout(s.request_timeout, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Held)) => {
                    self.renewed_at = Some(started);
                    tracing::info!(lease = %s.name, namespace = %s.namespace, identity = %s.identity, "acquired the leader Lease");
                    return;
                }
                Ok(Ok(Attempt::HeldBy(holder))) => {
                    if holder != last_holder {
                        tracing::info!(lease = %s.name, %holder, "the leader Lease is held by another instance; standing by");
                        last_holder = holder;
                    }
                    on_standby();
                    None
                }
                Ok(Ok(Attempt::Conflict)) => None,
                Ok(Err(e)) => Some(api_error_text(&e)),
                Err(_) => Some(format!("no answer within {:?}", s.request_timeout)),
            };
            if let Some(problem) = problem {
                if problem != last_problem {
                    tracing::warn!(lease = %s.name, namespace = %s.namespace, error = %problem, "cannot acquire the leader Lease; retrying");
                    last_problem = problem;
                }
            } else {
                last_problem.clear();
            }
            // Up to 20 % jitter so candidates do not try in lockstep.
            sleep(s.retry_period.mul_f64(1.0 + rand::random::<f64>() * 0.2)).await;
        }
    }

    /// Renews the Lease every `renew_period` until `stop` completes (`Ok`) or leadership is
    /// lost (`Err`): another holder in the record, or no successful renewal for
    /// `renew_deadline`.
    pub async fn keep(&mut self, stop: impl Future<Output = ()>) -> Result<(), Lost> {
        let s = self.settings.clone();
        let mut stop = std::pin::pin!(stop);
        let mut renewed_at = self.renewed_at.unwrap_or_else(Instant::now);
        loop {
            tokio::select! {
                () = &mut stop => return Ok(()),
                () = sleep_until(renewed_at + s.renew_period) => {}
            }
            let deadline = renewed_at + s.renew_deadline;
            loop {
                let started = Instant::now();
                if started >= deadline {
                    return Err(Lost::NotRenewed(s.renew_deadline, "deadline passed".into()));
                }
                let limit = (deadline - started).min(s.request_timeout);
                let attempt = tokio::select! {
                    () = &mut stop => return Ok(()),
                    attempt = timeout(limit, self.try_acquire_or_renew()) => attempt,
                };
                let problem = match attempt {
                    Ok(Ok(Attempt::Held)) => {
                        renewed_at = started;
                        self.renewed_at = Some(started);
                        tracing::debug!(lease = %s.name, "renewed the leader Lease");
                        break;
                    }
                    Ok(Ok(Attempt::HeldBy(holder))) => {
                        self.renewed_at = None;
                        return Err(Lost::TakenBy(holder));
                    }
                    Ok(Ok(Attempt::Conflict)) => "the Lease changed meanwhile".to_string(),
                    Ok(Err(e)) => api_error_text(&e),
                    Err(_) => format!("no answer within {limit:?}"),
                };
                if Instant::now() >= deadline {
                    self.renewed_at = None;
                    return Err(Lost::NotRenewed(s.renew_deadline, problem));
                }
                tracing::warn!(lease = %s.name, error = %problem, "renewing the leader Lease failed; retrying");
                tokio::select! {
                    () = &mut stop => return Ok(()),
                    () = sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }

    /// Gives the Lease up when this process holds it, so that a candidate takes over at
    /// its next try instead of after the lease duration.
    pub async fn release(&mut self) -> Result<bool, kube::Error> {
        let s = self.settings.clone();
        let work = async {
            let Some(mut lease) = self.api.get_opt(&s.name).await? else {
                return Ok::<bool, kube::Error>(false);
            };
            let spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(s.identity.as_str()) {
                return Ok(false);
            }
            lease.spec = Some(released_spec(spec, Timestamp::now()));
            self.api.replace(&s.name, &PostParams::default(), &lease).await?;
            Ok(true)
        };
        let released = match timeout(s.request_timeout, work).await {
            Ok(result) => result?,
            Err(_) => false,
        };
        self.renewed_at = None;
        if released {
            tracing::info!(lease = %s.name, namespace = %s.namespace, identity = %s.identity, "released the leader Lease");
        }
        Ok(released)
    }

    /// The Lease object's name, for messages.
    pub fn lease_ref(&self) -> String {
        format!("{}/{}", self.settings.namespace, self.settings.name)
    }
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector").field("settings", &self.settings).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn free_or_released_lease_is_taken_at_once() {
        assert_eq!(
            decide(&LeaseSpec::default(), "me", Duration::ZERO, D),
            Decision::Take { ours: false }
        );
        let released = LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            ..Default::default()
        };
        assert_eq!(
            decide(&released, "me", Duration::ZERO, D),
            Decision::Take { ours: false }
        );
    }

    #[test]
    fn own_lease_is_renewed() {
        assert_eq!(
            decide(&held_by("me", 15), "me", Duration::ZERO, D),
            Decision::Take { ours: true }
        );
    }

    #[test]
    fn held_lease_is_taken_only_after_a_full_duration_unchanged() {
        let spec = held_by("other", 15);
        assert_eq!(
            decide(&spec, "me", Duration::from_secs(14), D),
            Decision::Wait { holder: "other".into() }
        );
        assert_eq!(
            decide(&spec, "me", Duration::from_secs(15), D),
            Decision::Take { ours: false }
        );
        // The duration written in the Lease counts, not ours.
        assert_eq!(
            decide(&held_by("other", 30), "me", Duration::from_secs(20), D),
            Decision::Wait { holder: "other".into() }
        );
    }

    #[test]
    fn taking_counts_a_transition_and_renewing_keeps_acquire_time() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(1_005).unwrap();
        let previous = LeaseSpec {
            lease_transitions: Some(3),
            ..held_by("other", 15)
        };
        let taken = holder_spec(&previous, false, "me", D, t0);
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(t0)));
        assert_eq!(taken.lease_duration_seconds, Some(15));
        let renewed = holder_spec(&taken, true, "me", D, t1);
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, Some(MicroTime(t0)));
        assert_eq!(renewed.renew_time, Some(MicroTime(t1)));
    }

    #[test]
    fn identities_differ_per_process_start() {
        assert_ne!(identity(), identity());
    }

    #[test]
    fn renew_deadline_is_inside_the_lease_duration() {
        let s = LeaseSettings::new("l", "ns", "me");
        assert!(s.renew_period < s.renew_deadline && s.renew_deadline < s.lease_duration);
        assert!(s.request_timeout < s.renew_deadline);
    }
}
