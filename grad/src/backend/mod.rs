//! Runner backends: where a runner's `grad-runner` process lives. The
//! lifecycle (states, tokens, reconciliation) is the caller's
//! ([`crate::runners`]); a backend only starts, stops and removes.

pub mod job_pods;
pub mod kubernetes;
pub mod local;

use std::{future::Future, path::PathBuf, pin::Pin};

use crate::store;

pub use kubernetes::Kubernetes;
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
    /// The Kubernetes API refused or failed; `message` is its own words.
    #[error("{context}: {message}")]
    Kube { context: String, message: String },
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
    /// The runner's pod (or whatever stands for it) ended, cannot start,
    /// or vanished: the runner fails with `reason` — if `token_id` (the
    /// runner token it was started with) is still the runner's: news of
    /// an earlier start's pod is no news.
    Gone {
        runner_id: String,
        token_id: Option<String>,
        reason: String,
    },
    /// The runner is still on its way up; `reason` says what it waits for
    /// (the scheduler's or the kubelet's words).
    Waiting {
        runner_id: String,
        token_id: Option<String>,
        reason: String,
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
    /// Why a runner that is not `alive` is gone, where the backend knows
    /// more than that.
    fn why_gone(&self, runner: &store::Runner) -> Option<String> {
        let _ = runner;
        None
    }
    /// Resolves once `alive` can be believed (a watch has listed what
    /// exists); at once for backends that know at any time.
    fn ready(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Ids of the runners that have something in the backend (so that what
    /// no runner in the store owns can be removed); none tracked by default.
    fn leftovers(&self) -> BoxFuture<'_, Result<Vec<String>, Error>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Removes everything the backend has for `runner_id`, a runner the
    /// store no longer knows.
    fn remove_leftover<'a>(&'a self, runner_id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        let _ = runner_id;
        Box::pin(async { Ok(()) })
    }
}
