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
    pub duration_seconds: Option<i32>,
}

impl<'a> GrantRequest<'a> {
    pub fn for_binding(
        spec: &'a AWSRoleBindingSpec,
        namespace: &'a str,
        namespace_labels: &'a BTreeMap<String, String>,
    ) -> Self {
        let mut roles: Vec<&str> = Vec::new();
        if spec.method.assumes_role() {
            roles.extend(spec.chain.iter().flatten().map(|hop| hop.role_arn.as_str()));
            roles.extend(spec.role_arn.as_deref());
        }
        GrantRequest {
            namespace,
            namespace_labels,
            method: spec.method,
            roles,
            service_accounts: spec.subjects.iter().map(|s| s.name.as_str()).collect(),
            duration_seconds: spec.duration_seconds,
        }
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
    Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantVerdict {
    /// Allowed by the named grant.
    Allowed { grant: String },
    /// Denied; the message says which check no grant passed.
    Denied { message: String },
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
    for (name, grant) in grants {
        match failed_check(grant, req) {
            None => {
                return GrantVerdict::Allowed {
                    grant: name.to_string(),
                };
            }
            Some(check) => closest = closest.max(Some(check)),
        }
    }
    GrantVerdict::Denied {
        message: denial_message(closest, req),
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
            GrantVerdict::Allowed { grant: "g".into() }
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
        assert!(matches!(check(&g, &req("x", &yes)), GrantVerdict::Allowed { .. }));
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
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed { .. }));
        g.role_arns = vec!["arn:aws:iam::12345678901?:role/x".into()];
        r.roles = vec!["arn:aws:iam::123456789012:role/x"];
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed { .. }));
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
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed { .. }));
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
        assert!(matches!(check(&g, &r), GrantVerdict::Allowed { .. }));
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
}
