//! kube-sts: a Kubernetes operator that keeps short-lived AWS STS credentials in Secrets.
pub mod clock;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod decision;
pub mod events;
pub mod grants;
pub mod leader;
pub mod metrics;
pub mod mfa;
pub mod naming;
pub mod plan;
pub mod render;
pub mod shards;
pub mod sts;
pub mod timing;
pub mod webhook;

/// Failures of a reconcile that are retried with backoff (STS failures are not errors
/// here: they are recorded per subject and reported in status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("object lacks {0}")]
    MissingField(&'static str),
    #[error("cached object unreadable: {0}")]
    Cache(String),
}

impl Error {
    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::MissingField(_) => "missing_field",
            Error::Cache(_) => "cache",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
