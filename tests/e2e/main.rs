//! End-to-end tests against the real control plane, node and STS peer (`make up`).
mod foundation;
mod harness;
mod healing;
mod image;
mod incluster;
mod leader;
mod methods;
mod metrics;
mod node;
mod operator;
mod rbac;
mod rotation;
mod secret_log;
mod security;
mod shards;
mod webhook;
