//! The runner agents connected to this grad right now: one bidirectional
//! stream per runner, over which commands go out and execution events come
//! back, routed by request id.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
};

use grad_proto::{AgentCommand, ExecEvent, OutputsCollected};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{lock, store::now_ms};

pub struct Agent {
    pub conn: u64,
    pub commands: mpsc::Sender<AgentCommand>,
    /// Closes this agent's stream (on pause, delete, or a newer connection).
    pub closed: CancellationToken,
    last_seen: AtomicI64,
    pending: Mutex<HashMap<String, mpsc::Sender<ExecEvent>>>,
    collections: Mutex<HashMap<String, oneshot::Sender<OutputsCollected>>>,
    /// Executions and tunnels in progress, and when the last one began or
    /// ended: what makes a runner idle or not.
    busy: AtomicUsize,
    active_at: AtomicI64,
}

/// A user's use of a runner (an execution, a tunnel) while it lasts.
pub struct Activity(Arc<Agent>);

impl Drop for Activity {
    fn drop(&mut self) {
        self.0.active_at.store(now_ms(), Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Agent {
    /// Marks the runner in use until the answer is dropped.
    pub fn activity(self: &Arc<Self>) -> Activity {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.active_at.store(now_ms(), Ordering::Relaxed);
        Activity(self.clone())
    }

    /// Since when nothing has used the runner through this connection;
    /// `None` while something does.
    pub fn idle_since(&self) -> Option<i64> {
        (self.busy.load(Ordering::Relaxed) == 0).then(|| self.active_at.load(Ordering::Relaxed))
    }

    pub fn touch(&self) {
        self.last_seen.store(now_ms(), Ordering::Relaxed);
    }

    pub fn last_seen_ms(&self) -> i64 {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Starts routing events for `request_id` to a new channel.
    pub fn expect(&self, request_id: &str) -> mpsc::Receiver<ExecEvent> {
        let (tx, rx) = mpsc::channel(256);
        lock(&self.pending).insert(request_id.to_string(), tx);
        rx
    }

    pub fn forget(&self, request_id: &str) {
        lock(&self.pending).remove(request_id);
    }

    /// The channel for `request_id`'s events, if someone still listens.
    pub fn route(&self, request_id: &str) -> Option<mpsc::Sender<ExecEvent>> {
        lock(&self.pending).get(request_id).cloned()
    }

    /// Starts waiting for the end of output collection `request_id`; the
    /// receiver fails if the agent goes away first.
    pub fn expect_collection(&self, request_id: &str) -> oneshot::Receiver<OutputsCollected> {
        let (tx, rx) = oneshot::channel();
        lock(&self.collections).insert(request_id.to_string(), tx);
        rx
    }

    pub fn collected(&self, report: OutputsCollected) {
        if let Some(waiter) = lock(&self.collections).remove(&report.request_id) {
            let _ = waiter.send(report);
        }
    }

    pub fn forget_collection(&self, request_id: &str) {
        lock(&self.collections).remove(request_id);
    }

    /// Ends every pending execution's event channel and collection (the
    /// agent went away).
    fn drop_pending(&self) {
        lock(&self.pending).clear();
        lock(&self.collections).clear();
    }
}

#[derive(Default)]
pub struct Agents {
    next_conn: AtomicU64,
    connected: Mutex<HashMap<String, Arc<Agent>>>,
    /// When each runner's agent last disconnected (ms), for the monitor.
    disconnected_at: Mutex<HashMap<String, i64>>,
}

impl Agents {
    /// Registers a new connection for `runner_id`, replacing (and closing)
    /// any older one.
    pub fn attach(&self, runner_id: &str, commands: mpsc::Sender<AgentCommand>) -> Arc<Agent> {
        let agent = Arc::new(Agent {
            conn: self.next_conn.fetch_add(1, Ordering::Relaxed),
            commands,
            closed: CancellationToken::new(),
            last_seen: AtomicI64::new(now_ms()),
            pending: Mutex::new(HashMap::new()),
            collections: Mutex::new(HashMap::new()),
            busy: AtomicUsize::new(0),
            active_at: AtomicI64::new(now_ms()),
        });
        let old = lock(&self.connected).insert(runner_id.to_string(), agent.clone());
        lock(&self.disconnected_at).remove(runner_id);
        if let Some(old) = old {
            old.closed.cancel();
            old.drop_pending();
        }
        agent
    }

    /// Forgets connection `conn` of `runner_id` if it is still the current one.
    pub fn detach(&self, runner_id: &str, conn: u64) {
        let mut connected = lock(&self.connected);
        if connected.get(runner_id).is_some_and(|a| a.conn == conn) {
            if let Some(agent) = connected.remove(runner_id) {
                agent.closed.cancel();
                agent.drop_pending();
            }
            lock(&self.disconnected_at).insert(runner_id.to_string(), now_ms());
        }
    }

    /// Closes `runner_id`'s connection, whichever it is.
    pub fn close(&self, runner_id: &str) {
        if let Some(agent) = lock(&self.connected).remove(runner_id) {
            agent.closed.cancel();
            agent.drop_pending();
        }
        lock(&self.disconnected_at).remove(runner_id);
    }

    pub fn get(&self, runner_id: &str) -> Option<Arc<Agent>> {
        lock(&self.connected).get(runner_id).cloned()
    }

    pub fn is_connected(&self, runner_id: &str) -> bool {
        lock(&self.connected).contains_key(runner_id)
    }

    pub fn disconnected_at(&self, runner_id: &str) -> Option<i64> {
        lock(&self.disconnected_at).get(runner_id).copied()
    }

    /// Closes every connection (grad is shutting down).
    pub fn close_all(&self) {
        for (_, agent) in lock(&self.connected).drain() {
            agent.closed.cancel();
            agent.drop_pending();
        }
    }
}
