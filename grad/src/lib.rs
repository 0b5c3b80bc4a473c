//! grad: the control plane. It owns users and tokens ([`auth`]), the state
//! store ([`store`]), the runner lifecycle ([`runners`]) on top of runner
//! backends ([`backend`]), the connected runner agents ([`agents`]) and
//! execute-code ([`exec`]), batch [`jobs`] and their workers, runners' collected outputs ([`outputs`]) in the
//! blob store ([`blobs`]), users' sealed [`secrets`]; [`api`] translates gRPC to these, and [`server`]
//! serves it all on one port. See ARCHITECTURE.md for the whole picture.

pub mod agents;
pub mod api;
pub mod auth;
pub mod backend;
pub mod blobs;
pub mod config;
pub mod datasets;
pub mod error;
pub mod exec;
pub mod jobs;
pub mod names;
pub mod outputs;
pub mod replicas;
pub mod runners;
pub mod sealed;
pub mod secrets;
pub mod server;
pub mod ssh_keys;
pub mod store;
pub mod tunnel;

pub use error::{Error, Result};
pub use server::serve;

/// Locks a std mutex that only guards single map operations: a panic
/// elsewhere cannot leave such a map half-updated, so poisoning is ignored.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
