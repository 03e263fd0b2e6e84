//! The access keys the managed Secrets of a namespace held, in order, from a watch: what
//! rotation tests compare their consumers' calls with.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use futures::TryStreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    ResourceExt,
    runtime::{WatchStreamExt, watcher},
};

use crate::harness::TestNamespace;

/// The text of `key` in the Secret's data.
pub fn value(secret: &Secret, key: &str) -> Option<String> {
    let v = secret.data.as_ref()?.get(key)?;
    Some(String::from_utf8_lossy(&v.0).into_owned())
}

/// An RFC 3339 expiry as the Secret writes it.
pub fn expiration(value: &str) -> Timestamp {
    value.parse().unwrap_or_else(|e| panic!("expiration {value:?}: {e}"))
}

/// One version of a Secret as seen by a watch: when, its access key and expiry.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Timestamp,
    pub key: String,
    pub expiration: Timestamp,
}

/// Every access key the managed Secrets of a namespace held, per Secret, in order, from a
/// watch (every write is an event).
#[derive(Clone, Default)]
pub struct SecretLog(Arc<Mutex<BTreeMap<String, Vec<Seen>>>>);

impl SecretLog {
    pub fn start(ns: &TestNamespace) -> Self {
        let log = SecretLog::default();
        let (inner, api) = (log.0.clone(), ns.secrets());
        let config = watcher::Config::default().labels("app.kubernetes.io/managed-by=kube-sts");
        tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
            loop {
                // A watch error (the stream retries with backoff) is not the end of the log.
                let secret = match events.try_next().await {
                    Ok(Some(secret)) => secret,
                    Ok(None) => break,
                    Err(_) => continue,
                };
                let (Some(key), Some(exp)) = (
                    value(&secret, "AWS_ACCESS_KEY_ID"),
                    value(&secret, "AWS_CREDENTIAL_EXPIRATION"),
                ) else {
                    continue;
                };
                let mut log = inner.lock().unwrap();
                let versions = log.entry(secret.name_any()).or_default();
                if versions.last().is_none_or(|s| s.key != key) {
                    versions.push(Seen {
                        at: Timestamp::now(),
                        key,
                        expiration: expiration(&exp),
                    });
                }
            }
        });
        log
    }

    pub fn keys(&self, secret: &str) -> Vec<Seen> {
        self.0.lock().unwrap().get(secret).cloned().unwrap_or_default()
    }
}

/// Every new key reached the Secret while the key before it was still valid.
pub fn assert_rotated_before_expiry(secret: &str, seen: &[Seen]) {
    for pair in seen.windows(2) {
        assert!(
            pair[1].at < pair[0].expiration,
            "{secret}: {} replaced {} only at {}, after it expired at {}",
            pair[1].key,
            pair[0].key,
            pair[1].at,
            pair[0].expiration
        );
    }
}
