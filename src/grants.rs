//! Does any `AWSRoleGrant` allow a binding? Pure: grants, the binding's spec and the labels
//! of its namespace come in; a verdict naming what no grant matched comes out.

use std::collections::BTreeMap;

use globset::{GlobBuilder, GlobMatcher};
use kube::core::{Selector, SelectorExt};

use crate::crd::{AWSRoleBindingSpec, AWSRoleGrantSpec, Method};

/// What a binding asks a grant for.
#[derive(Debug, Clone)]
pub struct GrantRequest<'a> {
    pub namespace: &'a str,
    pub namespace_labels: &'a BTreeMap<String, String>,
    pub method: Method,
    /// Every role the binding assumes: chain hops first, then `roleArn`.
    pub roles: Vec<&'a str>,
    pub service_accounts: Vec<&'a str>,
    /// `durationSeconds` as the binding sets it (`None`: the method's default, which the
    /// operator lowers to the allowing grants' cap).
    pub duration_seconds: Option<i32>,
    /// Identity attributes the binding chose itself, by field: they appear in CloudTrail
    /// and trust-policy conditions, so by default they must start with `<namespace>.`.
    pub chosen_names: Vec<(&'static str, &'a str)>,
    /// Session tag keys the binding sets itself (the operator's own `kubernetes-*` aside).
    pub session_tag_keys: Vec<&'a str>,
    /// The session would be one of the operator's own IAM identity (GetSessionToken or
    /// GetFederationToken without `sourceCredentialsSecretRef`).
    pub operator_identity: bool,
}

impl<'a> GrantRequest<'a> {
    /// `operator_identity_allowed`: the operator runs with `--allow-operator-identity`
    /// (without it such a binding is refused before any grant is asked).
    pub fn for_binding(
        spec: &'a AWSRoleBindingSpec,
        namespace: &'a str,
        namespace_labels: &'a BTreeMap<String, String>,
        operator_identity_allowed: bool,
    ) -> Self {
        let mut roles: Vec<&str> = Vec::new();
        if spec.method.assumes_role() {
            roles.extend(spec.chain.iter().flatten().map(|hop| hop.role_arn.as_str()));
            roles.extend(spec.role_arn.as_deref());
        }
        let chosen_names = [
            ("sessionName", spec.session_name.as_deref()),
            ("sourceIdentity", spec.source_identity.as_deref()),
            (
                "federation.name",
                spec.federation.as_ref().and_then(|f| f.name.as_deref()),
            ),
        ]
        .into_iter()
        .filter_map(|(field, value)| Some((field, value?)))
        .collect();
        GrantRequest {
            namespace,
            namespace_labels,
            method: spec.method,
            roles,
            service_accounts: spec.subjects.iter().map(|s| s.name.as_str()).collect(),
            duration_seconds: spec.duration_seconds,
            chosen_names,
            session_tag_keys: spec.session_tags.iter().flatten().map(|(k, _)| k.as_str()).collect(),
            operator_identity: operator_identity_allowed
                && !spec.method.assumes_role()
                && spec.source_credentials_secret_ref.is_none(),
        }
    }

    /// Chosen names outside the default rule (they do not start with `<namespace>.`).
    fn foreign_names(&self) -> impl Iterator<Item = (&'static str, &'a str)> + '_ {
        let prefix = format!("{}.", self.namespace);
        self.chosen_names
            .iter()
            .copied()
            .filter(move |(_, value)| !value.starts_with(&prefix))
    }
}

/// The checks a grant makes, in the order they are made. A grant that fails a later check
/// came closer to allowing the binding; the denial names the check the closest grant failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GrantCheck {
    Namespace,
    Role,
    Method,
    ServiceAccount,
    OperatorIdentity,
    SessionName,
    SessionTags,
    Duration,
}

/// What the grants allow a binding, when at least one does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The first grant that allows the binding.
    pub grant: String,
    /// The highest `maxDurationSeconds` among the grants that allow it (`None`: no cap).
    pub max_duration_seconds: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantVerdict {
    Allowed(Admission),
    /// Denied; the message says which check no grant passed.
    Denied {
        message: String,
    },
}

/// Compiles a grant glob: `*` matches any run of characters (slashes included), `?` one
/// character; every other character is literal.
fn glob(pattern: &str) -> Option<GlobMatcher> {
    let mut escaped = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        if matches!(c, '[' | ']' | '{' | '}' | '\\' | '!') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    GlobBuilder::new(&escaped)
        .literal_separator(false)
        .backslash_escape(true)
        .build()
        .ok()
        .map(|g| g.compile_matcher())
}

fn any_glob_matches(patterns: &[String], value: &str) -> bool {
    patterns.iter().filter_map(|p| glob(p)).any(|g| g.is_match(value))
}

/// The first check `grant` fails for `req`, or `None` when it allows it.
pub fn failed_check(grant: &AWSRoleGrantSpec, req: &GrantRequest) -> Option<GrantCheck> {
    let by_name = grant.namespaces.iter().flatten().any(|ns| ns == req.namespace);
    let by_selector = grant
        .namespace_selector
        .clone()
        .and_then(|s| Selector::try_from(s).ok())
        // The schema refuses an empty selector; one that slipped through matches nothing.
        .filter(|s| !s.selects_all())
        .is_some_and(|s| s.matches(req.namespace_labels));
    if !(by_name || by_selector) {
        return Some(GrantCheck::Namespace);
    }
    if !req.roles.iter().all(|role| any_glob_matches(&grant.role_arns, role)) {
        return Some(GrantCheck::Role);
    }
    let methods = grant.methods.as_deref().unwrap_or(&AWSRoleGrantSpec::DEFAULT_METHODS);
    if !methods.contains(&req.method) {
        return Some(GrantCheck::Method);
    }
    if let Some(patterns) = &grant.service_accounts
        && !req.service_accounts.iter().all(|sa| any_glob_matches(patterns, sa))
    {
        return Some(GrantCheck::ServiceAccount);
    }
    if req.operator_identity && !grant.allow_operator_identity {
        return Some(GrantCheck::OperatorIdentity);
    }
    let names = grant.session_names.as_deref().unwrap_or_default();
    if req.foreign_names().any(|(_, value)| !any_glob_matches(names, value)) {
        return Some(GrantCheck::SessionName);
    }
    let tag_keys = grant.session_tag_keys.as_deref().unwrap_or_default();
    if !req.session_tag_keys.iter().all(|key| any_glob_matches(tag_keys, key)) {
        return Some(GrantCheck::SessionTags);
    }
    if let (Some(cap), Some(asked)) = (grant.max_duration_seconds, req.duration_seconds)
        && asked > cap
    {
        return Some(GrantCheck::Duration);
    }
    None
}

/// Checks `req` against every grant (name, spec).
pub fn grant_allows<'g>(
    grants: impl IntoIterator<Item = (&'g str, &'g AWSRoleGrantSpec)>,
    req: &GrantRequest,
) -> GrantVerdict {
    let mut closest: Option<GrantCheck> = None;
    let mut admission: Option<Admission> = None;
    for (name, grant) in grants {
        match failed_check(grant, req) {
            None => {
                let cap = grant.max_duration_seconds;
                admission = Some(match admission {
                    None => Admission {
                        grant: name.to_string(),
                        max_duration_seconds: cap,
                    },
                    Some(first) => Admission {
                        max_duration_seconds: first.max_duration_seconds.zip(cap).map(|(a, b)| a.max(b)),
                        ..first
                    },
                });
            }
            Some(check) => closest = closest.max(Some(check)),
        }
    }
    match admission {
        Some(admission) => GrantVerdict::Allowed(admission),
        None => GrantVerdict::Denied {
            message: denial_message(closest, req),
        },
    }
}

fn denial_message(closest: Option<GrantCheck>, req: &GrantRequest) -> String {
    let ns = req.namespace;
    match closest {
        None | Some(GrantCheck::Namespace) => format!("no AWSRoleGrant covers namespace {ns}"),
        Some(GrantCheck::Role) => {
            format!(
                "no AWSRoleGrant for namespace {ns} allows role(s) {}",
                req.roles.join(", ")
            )
        }
        Some(GrantCheck::Method) => format!(
            "no AWSRoleGrant for namespace {ns} and this role allows method {} (methods other than AssumeRole and AssumeRoleWithWebIdentity must be listed explicitly)",
            req.method
        ),
        Some(GrantCheck::ServiceAccount) => format!(
            "no AWSRoleGrant for namespace {ns}, this role and method allows service account(s) {}",
            req.service_accounts.join(", ")
        ),
        Some(GrantCheck::OperatorIdentity) => format!(
            "{} without sourceCredentialsSecretRef would issue a session of the operator's own IAM identity, and no AWSRoleGrant for namespace {ns} sets allowOperatorIdentity",
            req.method
        ),
        Some(GrantCheck::SessionName) => {
            let names: Vec<String> = req
                .foreign_names()
                .map(|(field, value)| format!("{field} {value}"))
                .collect();
            format!(
                "{} must start with \"{ns}.\" unless it matches sessionNames of an AWSRoleGrant that otherwise allows this binding",
                names.join(", ")
            )
        }
        Some(GrantCheck::SessionTags) => format!(
            "session tag key(s) {} are not listed in sessionTagKeys of any AWSRoleGrant that otherwise allows this binding",
            req.session_tag_keys.join(", ")
        ),
        Some(GrantCheck::Duration) => format!(
            "durationSeconds {} exceeds maxDurationSeconds of every AWSRoleGrant that otherwise allows this binding",
            req.duration_seconds.unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    const ROLE: &str = "arn:aws:iam::123456789012:role/team-a-reader";

    fn grant() -> AWSRoleGrantSpec {
        AWSRoleGrantSpec {
            namespaces: Some(vec!["team-a".into()]),
            namespace_selector: None,
            role_arns: vec!["arn:aws:iam::123456789012:role/team-a-*".into()],
            methods: None,
            service_accounts: None,
            max_duration_seconds: None,
            session_tag_keys: None,
            session_names: None,
            allow_operator_identity: false,
        }
    }

    fn req<'a>(ns: &'a str, labels: &'a BTreeMap<String, String>) -> GrantRequest<'a> {
        GrantRequest {
            namespace: ns,
            namespace_labels: labels,
            method: Method::AssumeRole,
            roles: vec![ROLE],
            service_accounts: vec!["app"],
            duration_seconds: Some(3600),
            chosen_names: vec![],
            session_tag_keys: vec![],
            operator_identity: false,
        }
    }

    fn check(g: &AWSRoleGrantSpec, r: &GrantRequest) -> GrantVerdict {
        grant_allows([("g", g)], r)
    }

    #[test]
    fn allows_matching_namespace_role_and_default_method() {
        let labels = BTreeMap::new();
        assert_eq!(
            check(&grant(), &req("team-a", &labels)),
            GrantVerdict::Allowed(Admission {
                grant: "g".into(),
                max_duration_seconds: None
            })
        );
    }

    #[test]
    fn other_namespace_is_denied_naming_the_namespace() {
        let labels = BTreeMap::new();
        let GrantVerdict::Denied { message } = check(&grant(), &req("team-b", &labels)) else {
            panic!()
        };
        assert!(message.contains("namespace team-b"), "{message}");
    }

    #[test]
    fn namespace_selector_matches_labels() {
        let mut g = grant();
        g.namespaces = None;
        g.namespace_selector = Some(LabelSelector {
            match_labels: Some([("team".to_string(), "a".to_string())].into()),
            ..Default::default()
        });
        let yes: BTreeMap<_, _> = [("team".to_string(), "a".to_string())].into();
        let no: BTreeMap<_, _> = [("team".to_string(), "b".to_string())].into();
        assert!(matches!(check(&g, &req("x", &yes)), GrantVerdict::Allowed(_)));
        assert!(matches!(check(&g, &req("x", &no)), GrantVerdict::Denied { .. }));
    }

    #[test]
    fn role_glob_semantics() {
        let labels = BTreeMap::new();
        let mut r = req("team-a", &labels);
        r.roles = vec!["arn:aws:iam::123456789012:role/team-b-reader"];
        let GrantVerdict::Denied { message } = check(&grant(), &r) else {
            panic!()
        };
        assert!(
            message.contains("role(s) arn:aws:iam::123456789012:role/team-b-reader"),
            "{message}"
        );
        // `*` crosses path separators; `?` is exactly one character.
        let mut g = grant();
        g.role_arns = vec!["arn:aws:iam::123456789012:role/*".into()];
        r.roles = vec!["arn:aws:iam::123456789012:role/path/to/x"];
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed(_)));
        g.role_arns = vec!["arn:aws:iam::12345678901?:role/x".into()];
        r.roles = vec!["arn:aws:iam::123456789012:role/x"];
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed(_)));
        r.roles = vec!["arn:aws:iam::1234567890123:role/x"];
        assert!(matches!(check(&g, &r), GrantVerdict::Denied { .. }));
        // Brackets are literal, not a character class.
        g.role_arns = vec!["arn:aws:iam::123456789012:role/[ab]".into()];
        r.roles = vec!["arn:aws:iam::123456789012:role/a"];
        assert!(matches!(check(&g, &r), GrantVerdict::Denied { .. }));
    }

    #[test]
    fn every_chain_hop_must_match() {
        let labels = BTreeMap::new();
        let mut r = req("team-a", &labels);
        r.roles = vec!["arn:aws:iam::111111111111:role/hub", ROLE];
        assert!(matches!(check(&grant(), &r), GrantVerdict::Denied { .. }));
        let mut g = grant();
        g.role_arns.push("arn:aws:iam::111111111111:role/hub".into());
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed(_)));
    }

    #[test]
    fn non_default_methods_must_be_listed() {
        let labels = BTreeMap::new();
        let mut r = req("team-a", &labels);
        r.method = Method::GetSessionToken;
        r.roles = vec![];
        let GrantVerdict::Denied { message } = check(&grant(), &r) else {
            panic!()
        };
        assert!(message.contains("method GetSessionToken"), "{message}");
        let mut g = grant();
        g.methods = Some(vec![Method::GetSessionToken]);
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed(_)));
    }

    #[test]
    fn service_account_globs_and_duration_cap() {
        let labels = BTreeMap::new();
        let mut g = grant();
        g.service_accounts = Some(vec!["report-*".into()]);
        let GrantVerdict::Denied { message } = check(&g, &req("team-a", &labels)) else {
            panic!()
        };
        assert!(message.contains("service account(s) app"), "{message}");
        g.service_accounts = Some(vec!["*".into()]);
        g.max_duration_seconds = Some(1800);
        let GrantVerdict::Denied { message } = check(&g, &req("team-a", &labels)) else {
            panic!()
        };
        assert!(message.contains("maxDurationSeconds"), "{message}");
    }

    #[test]
    fn closest_grant_names_the_failure() {
        let labels = BTreeMap::new();
        let other_ns = AWSRoleGrantSpec {
            namespaces: Some(vec!["zzz".into()]),
            ..grant()
        };
        let mut wrong_method = grant();
        wrong_method.methods = Some(vec![Method::GetFederationToken]);
        let GrantVerdict::Denied { message } =
            grant_allows([("a", &other_ns), ("b", &wrong_method)], &req("team-a", &labels))
        else {
            panic!()
        };
        assert!(message.contains("method AssumeRole"), "{message}");
    }

    #[test]
    fn no_grants_at_all() {
        let labels = BTreeMap::new();
        let GrantVerdict::Denied { message } = grant_allows([], &req("team-a", &labels)) else {
            panic!()
        };
        assert_eq!(message, "no AWSRoleGrant covers namespace team-a");
    }

    #[test]
    fn an_empty_selector_matches_nothing() {
        let mut g = grant();
        g.namespaces = None;
        g.namespace_selector = Some(LabelSelector::default());
        let labels: BTreeMap<_, _> = [("team".to_string(), "a".to_string())].into();
        assert!(matches!(
            check(&g, &req("team-a", &labels)),
            GrantVerdict::Denied { .. }
        ));
    }

    #[test]
    fn operator_identity_needs_a_grant_that_says_so() {
        let labels = BTreeMap::new();
        let mut r = req("team-a", &labels);
        r.method = Method::GetSessionToken;
        r.roles = vec![];
        let mut g = grant();
        g.methods = Some(vec![Method::GetSessionToken]);
        // With the team's own user keys the method grant is enough.
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed(_)));
        r.operator_identity = true;
        let GrantVerdict::Denied { message } = check(&g, &r) else {
            panic!()
        };
        assert!(message.contains("allowOperatorIdentity"), "{message}");
        g.allow_operator_identity = true;
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed(_)));
    }

    #[test]
    fn chosen_names_start_with_the_namespace_unless_a_grant_widens() {
        let labels = BTreeMap::new();
        // (field, value, allowed by default)
        let table = [
            ("sessionName", "team-a.reports", true),
            ("sessionName", "team-a.", true),
            ("sessionName", "team-b.reports", false),
            ("sessionName", "team-a-reports", false),
            ("sourceIdentity", "admin", false),
            ("federation.name", "team-a.x", true),
        ];
        for (field, value, allowed) in table {
            let mut r = req("team-a", &labels);
            r.chosen_names = vec![(field, value)];
            match check(&grant(), &r) {
                GrantVerdict::Allowed(_) => assert!(allowed, "{field} {value} allowed"),
                GrantVerdict::Denied { message } => {
                    assert!(!allowed, "{field} {value} denied: {message}");
                    assert!(
                        message.contains(&format!("{field} {value} must start with \"team-a.\"")),
                        "{message}"
                    );
                }
            }
        }
        let mut r = req("team-a", &labels);
        r.chosen_names = vec![("sourceIdentity", "ci-runner")];
        let mut g = grant();
        g.session_names = Some(vec!["ci-*".into()]);
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed(_)));
    }

    #[test]
    fn session_tag_keys_need_a_grant_that_lists_them() {
        let labels = BTreeMap::new();
        let mut r = req("team-a", &labels);
        r.session_tag_keys = vec!["team", "cost-center"];
        let GrantVerdict::Denied { message } = check(&grant(), &r) else {
            panic!()
        };
        assert!(message.contains("session tag key(s) team, cost-center"), "{message}");
        let mut g = grant();
        g.session_tag_keys = Some(vec!["cost-*".into()]);
        assert!(matches!(check(&g, &r), GrantVerdict::Denied { .. }));
        g.session_tag_keys = Some(vec!["cost-*".into(), "team".into()]);
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed(_)));
    }

    #[test]
    fn the_most_generous_cap_of_the_allowing_grants_is_admitted() {
        let labels = BTreeMap::new();
        let mut r = req("team-a", &labels);
        r.duration_seconds = None;
        let capped = |cap| AWSRoleGrantSpec {
            max_duration_seconds: cap,
            ..grant()
        };
        let other_ns = AWSRoleGrantSpec {
            namespaces: Some(vec!["zzz".into()]),
            ..capped(Some(40000))
        };
        let admitted = |grants: &[(&str, &AWSRoleGrantSpec)]| match grant_allows(grants.iter().copied(), &r) {
            GrantVerdict::Allowed(a) => a.max_duration_seconds,
            GrantVerdict::Denied { message } => panic!("{message}"),
        };
        assert_eq!(admitted(&[("a", &capped(Some(900)))]), Some(900));
        assert_eq!(
            admitted(&[("a", &capped(Some(900))), ("b", &capped(Some(1800)))]),
            Some(1800)
        );
        assert_eq!(admitted(&[("a", &capped(Some(900))), ("b", &capped(None))]), None);
        // A grant that does not allow the binding lends it nothing.
        assert_eq!(admitted(&[("a", &capped(Some(900))), ("z", &other_ns)]), Some(900));
    }
}
