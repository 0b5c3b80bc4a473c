//! Runner backends: where a runner's `grad-runner` process lives. The
//! lifecycle (states, tokens, reconciliation) is the caller's
//! ([`crate::runners`]); a backend only starts, stops and removes.

pub mod local;

use std::{future::Future, path::PathBuf, pin::Pin};

use crate::store;

pub use local::Local;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("starting runner '{name}': {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("runner process {pid} did not stop within {seconds}s")]
    StopTimeout { pid: u32, seconds: u64 },
}

/// What a backend needs to start one runner.
#[derive(Debug, Clone)]
pub struct Spec {
    pub runner: store::Runner,
    /// The runner's agent token; handed over out of band (env), never argv.
    pub token: String,
    /// The grad URLs the runner dials, in order (the replicas; see
    /// `crate::replicas`); empty: the backend's own.
    pub servers: Vec<String>,
}

/// Something a backend noticed on its own.
#[derive(Debug)]
pub enum Event {
    /// The runner's process ended without being asked to.
    Exited {
        runner_id: String,
        pid: u32,
        status: String,
    },
}

pub trait Backend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Where the runner's workspace lives (recorded in the store, shown to users).
    fn workspace(&self, owner: &str, name: &str) -> PathBuf;
    /// Starts the runner; returns the process id where there is one.
    fn start<'a>(&'a self, spec: &'a Spec) -> BoxFuture<'a, Result<Option<u32>, Error>>;
    /// Stops the runner's processes and keeps its files.
    fn stop<'a>(&'a self, runner: &'a store::Runner) -> BoxFuture<'a, Result<(), Error>>;
    /// Removes everything the runner had (its processes must be stopped).
    fn remove<'a>(&'a self, runner: &'a store::Runner) -> BoxFuture<'a, Result<(), Error>>;
    /// Whether the runner's process still exists (best effort).
    fn alive(&self, runner: &store::Runner) -> bool;
}
