//! Condition types, reasons and the pure rules that turn what happened to each subject into
//! the binding's `Ready` and `Degraded` conditions.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const DEGRADED: &str = "Degraded";

/// Condition reasons (API contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    CredentialsIssued,
    AsExpected,
    Pending,
    RoleNotGranted,
    InvalidSpec,
    ServiceAccountNotFound,
    SecretConflict,
    AccessDenied,
    Throttled,
    StsUnavailable,
    CredentialsExpired,
    TokenRequestFailed,
    /// A Kubernetes request the operator needs fails (forbidden, refused by admission,
    /// apiserver unavailable): retried with backoff.
    KubernetesError,
}

impl Reason {
    const ALL: [Reason; 13] = [
        Reason::CredentialsIssued,
        Reason::AsExpected,
        Reason::Pending,
        Reason::RoleNotGranted,
        Reason::InvalidSpec,
        Reason::ServiceAccountNotFound,
        Reason::SecretConflict,
        Reason::AccessDenied,
        Reason::Throttled,
        Reason::StsUnavailable,
        Reason::CredentialsExpired,
        Reason::TokenRequestFailed,
        Reason::KubernetesError,
    ];

    /// The reason a condition names (as written by [`Reason::as_str`]).
    pub fn parse(text: &str) -> Option<Reason> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::CredentialsIssued => "CredentialsIssued",
            Reason::AsExpected => "AsExpected",
            Reason::Pending => "Pending",
            Reason::RoleNotGranted => "RoleNotGranted",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::ServiceAccountNotFound => "ServiceAccountNotFound",
            Reason::SecretConflict => "SecretConflict",
            Reason::AccessDenied => "AccessDenied",
            Reason::Throttled => "Throttled",
            Reason::StsUnavailable => "STSUnavailable",
            Reason::CredentialsExpired => "CredentialsExpired",
            Reason::TokenRequestFailed => "TokenRequestFailed",
            Reason::KubernetesError => "KubernetesError",
        }
    }

    /// Which reason wins when subjects are not ready for different reasons: problems a
    /// user must fix first, then lost credentials, then transient failures.
    fn severity(self) -> u8 {
        match self {
            Reason::SecretConflict => 10,
            Reason::InvalidSpec => 9,
            Reason::ServiceAccountNotFound => 8,
            Reason::AccessDenied | Reason::TokenRequestFailed => 7,
            Reason::CredentialsExpired => 6,
            Reason::KubernetesError => 5,
            Reason::Throttled => 4,
            Reason::StsUnavailable => 3,
            Reason::Pending => 2,
            _ => 0,
        }
    }
}

/// Where one subject stands after a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectOutcome {
    pub name: String,
    /// Credentials in the Secret are unexpired and issued for the current spec.
    pub ready: bool,
    /// The Secret holds unexpired credentials (maybe for an older spec).
    pub has_valid_credentials: bool,
    /// Why the subject is not ready, or why its last refresh failed.
    pub problem: Option<(Reason, String)>,
}

/// The binding-level verdict: `(ready, reason, message)` and `(degraded, reason, message)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ready: (bool, Reason, String),
    pub degraded: (bool, Reason, String),
}

/// A problem for the whole binding (invalid spec, not granted) overrides every subject.
pub fn binding_verdict(problem: Option<(Reason, String)>, subjects: &[SubjectOutcome], note: Option<&str>) -> Verdict {
    let failing_with_valid: Vec<&SubjectOutcome> = subjects
        .iter()
        .filter(|s| s.has_valid_credentials && s.problem.is_some())
        .collect();
    let degraded = match failing_with_valid.first().and_then(|s| s.problem.clone()) {
        Some((reason, msg)) => (
            true,
            reason,
            format!(
                "refresh failed for {}; current credentials stay valid until they expire: {msg}",
                subjects_named(&failing_with_valid)
            ),
        ),
        None => (false, Reason::AsExpected, String::new()),
    };
    if let Some((reason, msg)) = problem {
        return Verdict {
            ready: (false, reason, msg),
            degraded,
        };
    }
    let not_ready: Vec<&SubjectOutcome> = subjects.iter().filter(|s| !s.ready).collect();
    let ready = if not_ready.is_empty() {
        let mut msg = format!("credentials issued for {} subject(s)", subjects.len());
        if let Some(note) = note {
            msg.push_str("; ");
            msg.push_str(note);
        }
        (true, Reason::CredentialsIssued, msg)
    } else {
        let worst = not_ready
            .iter()
            .filter_map(|s| s.problem.as_ref().map(|(r, m)| (*r, m, &s.name)))
            .max_by_key(|(r, _, _)| r.severity());
        match worst {
            Some((reason, msg, name)) => (false, reason, format!("{name}: {msg}")),
            None => (
                false,
                Reason::Pending,
                format!("waiting for credentials for {}", subjects_named(&not_ready)),
            ),
        }
    };
    Verdict { ready, degraded }
}

fn subjects_named(subjects: &[&SubjectOutcome]) -> String {
    subjects.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// Sets condition `type_` in `conditions`, keeping `lastTransitionTime` unless the status flips.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous.map(|i| &conditions[i]) {
        Some(old) if old.status == status => old.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: type_.to_string(),
        status,
        reason: reason.as_str().to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(name: &str) -> SubjectOutcome {
        SubjectOutcome {
            name: name.into(),
            ready: true,
            has_valid_credentials: true,
            problem: None,
        }
    }

    #[test]
    fn all_ready_is_ready_and_not_degraded() {
        let v = binding_verdict(None, &[ok("a"), ok("b")], None);
        assert!(v.ready.0);
        assert_eq!(v.ready.1, Reason::CredentialsIssued);
        assert_eq!(v.degraded, (false, Reason::AsExpected, String::new()));
    }

    #[test]
    fn failed_refresh_with_valid_credentials_is_ready_and_degraded() {
        let mut b = ok("b");
        b.problem = Some((Reason::StsUnavailable, "connection refused".into()));
        let v = binding_verdict(None, &[ok("a"), b], None);
        assert!(v.ready.0);
        assert!(v.degraded.0);
        assert_eq!(v.degraded.1, Reason::StsUnavailable);
        assert!(v.degraded.2.contains("refresh failed for b"));
    }

    #[test]
    fn worst_reason_wins_when_not_ready() {
        let lost = SubjectOutcome {
            name: "x".into(),
            ready: false,
            has_valid_credentials: false,
            problem: Some((Reason::CredentialsExpired, "expired".into())),
        };
        let conflict = SubjectOutcome {
            name: "y".into(),
            ready: false,
            has_valid_credentials: false,
            problem: Some((Reason::SecretConflict, "Secret y exists".into())),
        };
        let v = binding_verdict(None, &[lost, conflict], None);
        assert_eq!(v.ready, (false, Reason::SecretConflict, "y: Secret y exists".into()));
        assert!(!v.degraded.0);
    }

    #[test]
    fn binding_problem_overrides_subjects() {
        let v = binding_verdict(Some((Reason::RoleNotGranted, "no grant".into())), &[ok("a")], None);
        assert_eq!(v.ready, (false, Reason::RoleNotGranted, "no grant".into()));
    }

    #[test]
    fn not_ready_without_problem_is_pending() {
        let waiting = SubjectOutcome {
            name: "a".into(),
            ready: false,
            has_valid_credentials: false,
            problem: None,
        };
        assert_eq!(binding_verdict(None, &[waiting], None).ready.1, Reason::Pending);
    }

    #[test]
    fn transition_time_moves_only_on_flip() {
        let t0: Timestamp = "2026-11-26T09:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-11-26T09:10:00Z".parse().unwrap();
        let mut conds = vec![];
        set_condition(&mut conds, READY, false, Reason::Pending, "", Some(1), t0);
        set_condition(&mut conds, READY, false, Reason::AccessDenied, "denied", Some(2), t1);
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, Time(t0));
        assert_eq!(conds[0].reason, "AccessDenied");
        assert_eq!(conds[0].observed_generation, Some(2));
        set_condition(&mut conds, READY, true, Reason::CredentialsIssued, "", Some(2), t1);
        assert_eq!(conds[0].last_transition_time, Time(t1));
    }

    #[test]
    fn reasons_parse_back() {
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(Reason::parse("Whatever"), None);
    }
}
