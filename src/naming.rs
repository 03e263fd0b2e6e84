//! Names derived from a binding: Secret names, STS session names, federated user names.

use sha2::{Digest, Sha256};

/// Longest Kubernetes object name (DNS subdomain).
const MAX_OBJECT_NAME: usize = 253;
/// Longest RoleSessionName STS accepts.
const MAX_SESSION_NAME: usize = 64;
/// Longest federated user name STS accepts.
const MAX_FEDERATED_NAME: usize = 32;
/// Hex characters of the stable hash appended when a name is cut.
const HASH_LEN: usize = 8;

/// First `HASH_LEN` hex characters of SHA-256 over `input`.
pub fn short_hash(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    hex::encode(digest)[..HASH_LEN].to_string()
}

/// Cuts `name` to `max` characters, replacing the tail with `-<hash of the whole name>`
/// when it is too long, so distinct long names stay distinct.
fn fit(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        return name.to_string();
    }
    let hash = short_hash(name);
    let keep = max - HASH_LEN - 1;
    let head: String = name.chars().take(keep).collect();
    format!("{}-{hash}", head.trim_end_matches(['-', '.']))
}

/// Default Secret name `<binding>-<serviceaccount>`, shortened with a hash past 253 chars.
pub fn default_secret_name(binding: &str, service_account: &str) -> String {
    fit(&format!("{binding}-{service_account}"), MAX_OBJECT_NAME)
}

/// Replaces characters STS does not allow in session names (`[\w+=,.@-]`) with `-`.
fn sanitize_sts_name(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Default RoleSessionName `<namespace>.<serviceaccount>` (at most 64 characters).
pub fn default_session_name(namespace: &str, service_account: &str) -> String {
    fit(
        &sanitize_sts_name(&format!("{namespace}.{service_account}")),
        MAX_SESSION_NAME,
    )
}

/// Default federated user name (2..32 characters) for GetFederationToken.
pub fn default_federated_name(namespace: &str, service_account: &str) -> String {
    fit(
        &sanitize_sts_name(&format!("{namespace}.{service_account}")),
        MAX_FEDERATED_NAME,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_name_is_namespace_dot_serviceaccount() {
        assert_eq!(default_session_name("team-a", "reports"), "team-a.reports");
    }

    #[test]
    fn session_name_replaces_disallowed_characters() {
        assert_eq!(default_session_name("ns", "a:b/c d"), "ns.a-b-c-d");
    }

    #[test]
    fn long_session_name_is_cut_to_64_with_stable_hash() {
        let ns = "n".repeat(63);
        let sa = "s".repeat(200);
        let name = default_session_name(&ns, &sa);
        assert_eq!(name.len(), 64);
        assert_eq!(name, default_session_name(&ns, &sa));
        assert!(name.ends_with(&format!("-{}", short_hash(&format!("{ns}.{sa}")))));
        // A different long name yields a different session name.
        assert_ne!(name, default_session_name(&ns, &"t".repeat(200)));
    }

    #[test]
    fn session_name_of_exactly_64_is_kept() {
        let name = format!("{}.{}", "a".repeat(30), "b".repeat(33));
        assert_eq!(name.len(), 64);
        assert_eq!(default_session_name(&"a".repeat(30), &"b".repeat(33)), name);
    }

    #[test]
    fn secret_name_default_and_long() {
        assert_eq!(default_secret_name("reports", "app"), "reports-app");
        let long = default_secret_name(&"b".repeat(200), &"s".repeat(200));
        assert_eq!(long.len(), 253);
        assert_ne!(long, default_secret_name(&"b".repeat(200), &"x".repeat(200)));
    }

    #[test]
    fn federated_name_fits_32() {
        let name = default_federated_name("a-long-namespace-name", "a-long-service-account");
        assert!(name.len() <= 32 && name.len() >= 2, "{name}");
        assert_eq!(default_federated_name("ns", "sa"), "ns.sa");
    }
}
