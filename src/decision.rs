//! What to do for one subject, decided from what its Secret holds, what this process
//! remembers, the plan and the time. Pure: the reconcile performs the decision and records
//! metrics from it; every row of the policy is a line in the table test below.

use jiff::Timestamp;

use crate::{conditions::Reason, render::Credentials};

/// What the subject's Secret holds now, as far as the decision needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredSecret {
    /// Controlled by this binding (else it is someone else's and never touched).
    pub owned: bool,
    /// The credentials it holds, when readable and rendered for this subject's target.
    pub creds: Option<Credentials>,
    /// The spec hash it was written for.
    pub spec_hash: Option<String>,
    /// Its expiry annotation (kept, in the past, once its credentials were removed as
    /// expired).
    pub expiration: Option<Timestamp>,
}

/// What this process remembers about a subject between reconciles.
#[derive(Debug, Default, Clone)]
pub struct SubjectState {
    /// The last credentials this process issued or adopted, with the spec hash they are for
    /// (to restore an edited Secret, and to retry a failed write without a new STS call).
    /// Boxed, so that a state is small to move (between reconciles it is kept packed,
    /// `controller::subject_states`).
    pub creds: Option<Box<(String, Credentials)>>,
    pub failures: u32,
    pub retry_at: Option<Timestamp>,
    pub last_error: Option<(Reason, String)>,
    /// The spec hash STS refused as invalid, or whose Secret the apiserver refuses (invalid
    /// labels or annotations): not asked or written again until it changes.
    pub refused_spec: Option<String>,
}

impl SubjectState {
    /// What a new process (a restart, a new leader) takes over from the status a previous
    /// one wrote: the failure count and the planned retry, so a rolling restart does not
    /// retry every failing subject at once. `reason` is the binding's Ready reason. A
    /// failure with no retry planned (a refusal of the spec, by STS or of its Secret by the
    /// apiserver) is retried once at `first_retry` (the caller's backoff for the count):
    /// status cannot tell which spec was refused, and the operator's own settings may have
    /// changed what a spec asks; refused again, it stays refused in the new process.
    pub fn resumed(status: &crate::crd::SubjectStatus, reason: Option<Reason>, first_retry: Timestamp) -> SubjectState {
        if status.consecutive_failures == 0 {
            return SubjectState::default();
        }
        let reason = reason
            .filter(|r| !matches!(r, Reason::CredentialsIssued | Reason::Pending))
            .unwrap_or(Reason::StsUnavailable);
        SubjectState {
            failures: status.consecutive_failures,
            retry_at: Some(status.next_refresh_time.as_ref().map_or(first_retry, |t| t.0)),
            last_error: Some((reason, status.message.clone())),
            ..Default::default()
        }
    }
}

/// Why no STS call is made now although the credentials are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// STS refused this very request as invalid; a changed spec is asked again.
    Refused,
    /// Backing off after a failure.
    BackingOff,
    /// Issued for this spec too recently: whatever the clocks say, a subject is never issued
    /// for more often than [`reissue_floor`].
    Floor,
}

/// The shortest time between two issuances of the same spec for a subject: a tenth of the
/// lifetime, at least a minute (a quarter of the lifetime for very short ones), so no
/// clock, cache or bug can make the operator call STS in a loop. Refreshes come later than
/// this by design (at least 45 % into the lifetime).
pub fn reissue_floor(lifetime: jiff::SignedDuration) -> jiff::SignedDuration {
    (lifetime / 10)
        .max(jiff::SignedDuration::from_secs(60).min(lifetime / 4))
        .max(MIN_REISSUE_FLOOR)
}

/// The floor whatever the lifetime says (an answer expiring at or before its issue time
/// would otherwise allow a call a second).
const MIN_REISSUE_FLOOR: jiff::SignedDuration = jiff::SignedDuration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A Secret of that name is not this binding's: leave it alone.
    Conflict,
    /// The ServiceAccount is gone: its Secret goes, and what is remembered.
    ServiceAccountGone,
    /// Credentials for the current spec are good until `refresh_at`. `restore`: the Secret
    /// does not hold them (deleted, edited, or an older write) and is written back, with no
    /// STS call.
    Keep {
        creds: Credentials,
        restore: bool,
        refresh_at: Timestamp,
    },
    /// Ask STS now.
    Issue,
    /// Due, but not asked now; `retry_at` is when to ask (`None`: not for this spec).
    /// `expire`: the Secret's credentials have run out and are removed from it.
    Wait {
        hold: Hold,
        retry_at: Option<Timestamp>,
        expire: bool,
    },
}

/// Everything the decision looks at.
pub struct Inputs<'a> {
    pub secret: Option<&'a StoredSecret>,
    pub service_account_exists: bool,
    pub remembered: &'a SubjectState,
    pub spec_hash: &'a str,
    pub now: Timestamp,
}

/// Decides for one subject. `refresh_at` gives the planned refresh time of credentials;
/// `holds` says whether the Secret already holds exactly what those credentials render.
pub fn decide(
    input: &Inputs,
    refresh_at: impl Fn(&Credentials) -> Timestamp,
    holds: impl Fn(&Credentials) -> bool,
) -> Decision {
    let Inputs {
        secret,
        service_account_exists,
        remembered,
        spec_hash,
        now,
    } = *input;
    if secret.is_some_and(|s| !s.owned) {
        return Decision::Conflict;
    }
    if !service_account_exists {
        return Decision::ServiceAccountGone;
    }
    // Credentials for the current spec: the newest of what the Secret holds (the cache may
    // lag behind this process's own write) and what this process remembers.
    let stored = secret
        .filter(|s| s.spec_hash.as_deref() == Some(spec_hash))
        .and_then(|s| s.creds.as_ref());
    let kept = remembered
        .creds
        .as_deref()
        .filter(|(hash, _)| hash == spec_hash)
        .map(|(_, c)| c);
    let current = match (stored, kept) {
        (Some(s), Some(k)) => Some(if k.issued_at > s.issued_at { k } else { s }),
        (s, k) => s.or(k),
    };
    let refused = remembered.refused_spec.as_deref() == Some(spec_hash);
    if let Some(creds) = current {
        let refresh = refresh_at(creds);
        let restore = !holds(creds);
        // A Secret refused for this spec is not written again (each try would fail the same).
        if now < refresh && !(restore && refused) {
            return Decision::Keep {
                creds: creds.clone(),
                restore,
                refresh_at: refresh,
            };
        }
    }
    // Credentials in the Secret that have run out are never left looking valid.
    let expire = secret.is_some_and(|s| s.expiration.is_none_or(|e| e <= now));
    if refused {
        return Decision::Wait {
            hold: Hold::Refused,
            retry_at: None,
            expire,
        };
    }
    if let Some(creds) = current {
        let earliest = creds.issued_at + reissue_floor(creds.expiration.duration_since(creds.issued_at));
        if now < earliest {
            return Decision::Wait {
                hold: Hold::Floor,
                retry_at: Some(earliest),
                expire,
            };
        }
    }
    if let Some(retry_at) = remembered.retry_at.filter(|at| *at > now) {
        return Decision::Wait {
            hold: Hold::BackingOff,
            retry_at: Some(retry_at),
            expire,
        };
    }
    Decision::Issue
}

#[cfg(test)]
mod tests {
    use jiff::SignedDuration;

    use super::*;

    const NOW: i64 = 1_800_000_000;
    const HASH: &str = "current";

    fn at(offset_s: i64) -> Timestamp {
        Timestamp::from_second(NOW + offset_s).unwrap()
    }

    fn creds(key: &str, issued: i64, expires: i64) -> Credentials {
        Credentials {
            access_key_id: key.into(),
            secret_access_key: "s".into(),
            session_token: "t".into(),
            issued_at: at(issued),
            expiration: at(expires),
            arn: None,
            note: None,
            registries: Vec::new(),
        }
    }

    fn secret(c: Option<Credentials>, hash: &str) -> StoredSecret {
        StoredSecret {
            owned: true,
            expiration: c.as_ref().map(|c| c.expiration),
            creds: c,
            spec_hash: Some(hash.into()),
        }
    }

    /// Refresh two thirds into the lifetime; "holds" when the key is `in_secret`.
    fn run(secret: Option<&StoredSecret>, sa: bool, state: &SubjectState, in_secret: &str) -> Decision {
        decide(
            &Inputs {
                secret,
                service_account_exists: sa,
                remembered: state,
                spec_hash: HASH,
                now: at(0),
            },
            |c| c.issued_at + SignedDuration::from_secs(c.expiration.duration_since(c.issued_at).as_secs() * 2 / 3),
            |c| c.access_key_id == in_secret,
        )
    }

    fn keep(key: &str, issued: i64, expires: i64, restore: bool) -> Decision {
        let c = creds(key, issued, expires);
        let refresh_at = at(issued + (expires - issued) * 2 / 3);
        Decision::Keep {
            creds: c,
            restore,
            refresh_at,
        }
    }

    fn remembered(c: Option<Credentials>, hash: &str) -> SubjectState {
        SubjectState {
            creds: c.map(|c| Box::new((hash.to_string(), c))),
            ..Default::default()
        }
    }

    #[test]
    fn decision_table() {
        let fresh = || Some(creds("FRESH", -60, 3540));
        let due = || Some(creds("DUE", -3000, 600));
        let expired = || Some(creds("EXPIRED", -3700, -100));
        let newer = || Some(creds("NEWER", -10, 3590));
        let nothing = SubjectState::default();
        let backing_off = SubjectState {
            failures: 2,
            retry_at: Some(at(30)),
            ..Default::default()
        };
        let backoff_over = SubjectState {
            failures: 2,
            retry_at: Some(at(-1)),
            ..Default::default()
        };
        let refused = SubjectState {
            failures: 1,
            refused_spec: Some(HASH.into()),
            ..Default::default()
        };
        let refused_older_spec = SubjectState {
            refused_spec: Some("older".into()),
            ..Default::default()
        };
        let foreign = StoredSecret {
            owned: false,
            ..secret(fresh(), HASH)
        };
        let emptied = StoredSecret {
            creds: None,
            expiration: None,
            ..secret(None, HASH)
        };
        // (row, Secret, ServiceAccount exists, remembered, key the Secret holds, decision)
        type Row<'a> = (&'a str, Option<StoredSecret>, bool, SubjectState, &'a str, Decision);
        let cases: Vec<Row> = vec![
            (
                "someone else's Secret",
                Some(foreign),
                true,
                nothing.clone(),
                "",
                Decision::Conflict,
            ),
            (
                "ServiceAccount gone",
                Some(secret(fresh(), HASH)),
                false,
                nothing.clone(),
                "FRESH",
                Decision::ServiceAccountGone,
            ),
            ("new subject", None, true, nothing.clone(), "", Decision::Issue),
            (
                "fresh Secret is adopted",
                Some(secret(fresh(), HASH)),
                true,
                nothing.clone(),
                "FRESH",
                keep("FRESH", -60, 3540, false),
            ),
            (
                "edited Secret is restored from the Secret's own annotations",
                Some(secret(fresh(), HASH)),
                true,
                nothing.clone(),
                "",
                keep("FRESH", -60, 3540, true),
            ),
            (
                "deleted Secret is restored from memory",
                None,
                true,
                remembered(fresh(), HASH),
                "",
                keep("FRESH", -60, 3540, true),
            ),
            (
                "the cache lags behind this process's write: the newer credentials win",
                Some(secret(fresh(), HASH)),
                true,
                remembered(newer(), HASH),
                "FRESH",
                keep("NEWER", -10, 3590, true),
            ),
            (
                "memory older than the Secret: the Secret wins",
                Some(secret(newer(), HASH)),
                true,
                remembered(fresh(), HASH),
                "NEWER",
                keep("NEWER", -10, 3590, false),
            ),
            (
                "spec changed: reissue",
                Some(secret(fresh(), "older")),
                true,
                remembered(fresh(), "older"),
                "FRESH",
                Decision::Issue,
            ),
            (
                "refresh due",
                Some(secret(due(), HASH)),
                true,
                nothing.clone(),
                "DUE",
                Decision::Issue,
            ),
            (
                "refresh due while backing off",
                Some(secret(due(), HASH)),
                true,
                backing_off.clone(),
                "DUE",
                Decision::Wait {
                    hold: Hold::BackingOff,
                    retry_at: Some(at(30)),
                    expire: false,
                },
            ),
            (
                "backoff over",
                Some(secret(due(), HASH)),
                true,
                backoff_over,
                "DUE",
                Decision::Issue,
            ),
            (
                "expired while backing off: removed",
                Some(secret(expired(), HASH)),
                true,
                backing_off.clone(),
                "EXPIRED",
                Decision::Wait {
                    hold: Hold::BackingOff,
                    retry_at: Some(at(30)),
                    expire: true,
                },
            ),
            (
                "already emptied: nothing more to remove, still expired",
                Some(emptied.clone()),
                true,
                backing_off,
                "",
                Decision::Wait {
                    hold: Hold::BackingOff,
                    retry_at: Some(at(30)),
                    expire: true,
                },
            ),
            (
                "refused by STS: not asked again",
                Some(secret(due(), HASH)),
                true,
                refused.clone(),
                "DUE",
                Decision::Wait {
                    hold: Hold::Refused,
                    retry_at: None,
                    expire: false,
                },
            ),
            (
                "refused Secret holding good credentials: kept as they are",
                Some(secret(fresh(), HASH)),
                true,
                refused.clone(),
                "FRESH",
                keep("FRESH", -60, 3540, false),
            ),
            (
                "refused Secret that would need a restore: not written again",
                Some(secret(fresh(), HASH)),
                true,
                refused.clone(),
                "EDITED",
                Decision::Wait {
                    hold: Hold::Refused,
                    retry_at: None,
                    expire: false,
                },
            ),
            (
                "refused and expired: removed, still not asked",
                Some(secret(expired(), HASH)),
                true,
                refused,
                "EXPIRED",
                Decision::Wait {
                    hold: Hold::Refused,
                    retry_at: None,
                    expire: true,
                },
            ),
            (
                "a refusal of an older spec does not hold the new one",
                None,
                true,
                refused_older_spec,
                "",
                Decision::Issue,
            ),
            (
                "a new spec is not held by the floor",
                Some(secret(Some(creds("NOW", -10, 3590)), "older")),
                true,
                nothing.clone(),
                "NOW",
                Decision::Issue,
            ),
        ];
        for (name, stored, sa, state, in_secret, want) in cases {
            assert_eq!(run(stored.as_ref(), sa, &state, in_secret), want, "{name}");
        }
    }

    #[test]
    fn a_new_process_resumes_the_backoff_status_recorded() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let failing = crate::crd::SubjectStatus {
            name: "app".into(),
            consecutive_failures: 3,
            next_refresh_time: Some(Time(at(40))),
            message: "AccessDenied: not trusted".into(),
            ..Default::default()
        };
        let state = SubjectState::resumed(&failing, Some(Reason::AccessDenied), at(5));
        assert_eq!(state.failures, 3);
        assert_eq!(state.retry_at, Some(at(40)));
        assert_eq!(
            state.last_error,
            Some((Reason::AccessDenied, "AccessDenied: not trusted".into()))
        );
        // Resumed, the decision waits for the recorded retry instead of asking at once.
        assert_eq!(
            run(None, true, &state, ""),
            Decision::Wait {
                hold: Hold::BackingOff,
                retry_at: Some(at(40)),
                expire: false
            }
        );
        let healthy = crate::crd::SubjectStatus {
            name: "app".into(),
            next_refresh_time: Some(Time(at(40))),
            ..Default::default()
        };
        assert_eq!(
            SubjectState::resumed(&healthy, Some(Reason::CredentialsIssued), at(5)).retry_at,
            None
        );
        let generic = SubjectState::resumed(&failing, Some(Reason::Pending), at(5));
        assert_eq!(generic.last_error.unwrap().0, Reason::StsUnavailable);

        // A refusal (no retry planned) is retried once, at the backoff the caller gives,
        // not at once and not never.
        let refused = crate::crd::SubjectStatus {
            name: "app".into(),
            consecutive_failures: 1,
            message: "ValidationError: bad tag".into(),
            ..Default::default()
        };
        let state = SubjectState::resumed(&refused, Some(Reason::InvalidSpec), at(5));
        assert_eq!(state.refused_spec, None);
        assert_eq!(
            run(None, true, &state, ""),
            Decision::Wait {
                hold: Hold::BackingOff,
                retry_at: Some(at(5)),
                expire: false
            }
        );
    }

    #[test]
    fn the_floor_stays_below_the_earliest_refresh() {
        assert_eq!(reissue_floor(SignedDuration::ZERO), SignedDuration::from_secs(10));
        assert_eq!(
            reissue_floor(SignedDuration::from_secs(-60)),
            SignedDuration::from_secs(10)
        );
        for (lifetime, floor) in [(60, 15), (120, 30), (900, 90), (3600, 360), (43200, 4320)] {
            let got = reissue_floor(SignedDuration::from_secs(lifetime));
            assert_eq!(got, SignedDuration::from_secs(floor), "lifetime {lifetime}");
            // The refresh policy never refreshes earlier than 45 % into the lifetime.
            assert!(got.as_secs() * 100 < lifetime * 45, "lifetime {lifetime}");
        }
    }

    #[test]
    fn a_refresh_that_looks_due_right_after_issuance_waits_for_the_floor() {
        // Whatever makes a refresh look due (a clock that jumped, a bug), the same spec is not
        // issued again within the floor: a tenth of the hour here.
        let state = remembered(Some(creds("NOW", -10, 3590)), HASH);
        let decide_due = |state: &SubjectState| {
            decide(
                &Inputs {
                    secret: None,
                    service_account_exists: true,
                    remembered: state,
                    spec_hash: HASH,
                    now: at(0),
                },
                |_| at(-1),
                |_| false,
            )
        };
        assert_eq!(
            decide_due(&state),
            Decision::Wait {
                hold: Hold::Floor,
                retry_at: Some(at(350)),
                expire: false
            }
        );
        // Past the floor it issues.
        let state = remembered(Some(creds("EARLIER", -400, 3200)), HASH);
        assert_eq!(decide_due(&state), Decision::Issue);
    }
}
