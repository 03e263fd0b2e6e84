//! End-to-end tests against the real control plane and STS peer (`make up`).
mod foundation;
mod harness;
mod healing;
mod leader;
mod methods;
mod metrics;
mod operator;
mod rbac;
mod rotation;
mod security;
mod webhook;
