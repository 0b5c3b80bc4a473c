//! Several grads on one PostgreSQL database: replicas behind one Service.
//!
//! Everything durable is in the database, so any replica answers any call,
//! with two exceptions that live in one process: a runner's agent stream
//! (its commands and execution events) and the tunnels it dials back. Each
//! replica heartbeats a row in `replicas`, and records in `agent_routes`
//! which one holds each runner's agent. A call that needs the agent and
//! lands elsewhere is **forwarded**: the replica re-sends it, with the
//! caller's own token (verified again there) and an `x-grad-forwarded`
//! header, to the holder's URL, and streams the answer back. A forwarded
//! call is never forwarded again.
//!
//! Forwarding rather than relaying through PostgreSQL: execute-code events
//! and tunnels are streams with backpressure (SFTP, SSH) that
//! LISTEN/NOTIFY could only carry as polled rows, at a round trip per frame.
//! What *is* shared through the database is the "something changed" signal
//! ([`Bus`]): a job queued on one replica wakes the claims waiting on
//! another, a log line appended wakes followers, a runner moving wakes
//! waits, an SSH key added reaches runners connected elsewhere. On
//! PostgreSQL that is `NOTIFY grad_events`, heard by every replica's
//! `LISTEN`; on SQLite (one grad) it stays in the process.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

use crate::{
    error::{Error, Result},
    lock,
    store::{AgentRoute, Store, now_ms},
};

/// How often each replica records that it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A replica silent this long is dead: its runners' routes no longer count.
pub const DEAD_AFTER: Duration = Duration::from_secs(3);
/// The header a forwarded call carries (the forwarding replica's id).
pub const FORWARDED: &str = "x-grad-forwarded";
const CHANNEL: &str = "grad_events";

/// What changed, for the waiters of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// A runner's state or connection.
    Runners,
    /// A job's state or log.
    Jobs,
    /// A job joined the queue.
    Queue,
}

impl Topic {
    const ALL: [Topic; 3] = [Topic::Runners, Topic::Jobs, Topic::Queue];

    fn name(self) -> &'static str {
        match self {
            Topic::Runners => "runners",
            Topic::Jobs => "jobs",
            Topic::Queue => "queue",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// "Something changed" signals, local to the process and, on PostgreSQL,
/// shared with the other replicas (see the module docs).
pub struct Bus {
    replica: String,
    topics: [watch::Sender<u64>; 3],
    /// Owners whose SSH keys changed on another replica.
    keys: broadcast::Sender<String>,
    shared: AtomicBool,
    outbox: Mutex<BTreeSet<String>>,
    wake: Notify,
}

impl Bus {
    pub fn new(replica: &str) -> Arc<Bus> {
        Arc::new(Bus {
            replica: replica.to_string(),
            topics: [(); 3].map(|_| watch::channel(0).0),
            keys: broadcast::channel(64).0,
            shared: AtomicBool::new(false),
            outbox: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
        })
    }

    /// Wakes this process's waiters on `topic`, and the other replicas'.
    pub fn bump(&self, topic: Topic) {
        self.bump_here(topic);
        self.send(topic.name().to_string());
    }

    pub fn subscribe(&self, topic: Topic) -> watch::Receiver<u64> {
        self.topics[topic.index()].subscribe()
    }

    /// Tells the other replicas that `owner_id`'s SSH keys changed.
    pub fn keys_changed(&self, owner_id: &str) {
        self.send(format!("keys {owner_id}"));
    }

    /// Owners whose SSH keys changed on another replica.
    pub fn key_changes(&self) -> broadcast::Receiver<String> {
        self.keys.subscribe()
    }

    fn bump_here(&self, topic: Topic) {
        self.topics[topic.index()].send_modify(|v| *v = v.wrapping_add(1));
    }

    fn send(&self, message: String) {
        if self.shared.load(Ordering::Relaxed) {
            lock(&self.outbox).insert(message);
            self.wake.notify_one();
        }
    }

    /// A notification from the database: another replica's, or our own
    /// coming back (ignored).
    fn receive(&self, payload: &str) {
        let Some((from, message)) = payload.split_once(' ') else {
            return;
        };
        if from == self.replica {
            return;
        }
        match message.split_once(' ') {
            Some(("keys", owner)) => {
                let _ = self.keys.send(owner.to_string());
            }
            _ => {
                if let Some(topic) = Topic::ALL.into_iter().find(|t| t.name() == message) {
                    self.bump_here(topic);
                }
            }
        }
    }

    /// Shares the signals through PostgreSQL until `shutdown`: sends what
    /// [`Bus::bump`] queued, coalesced (many bumps between two sends are
    /// one notification), and listens for the other replicas'. After the
    /// listening connection drops, everything is bumped: what was missed
    /// is read again from the tables.
    pub async fn share(self: Arc<Self>, store: Store, shutdown: CancellationToken) {
        let Some(url) = store.postgres_url().map(str::to_string) else {
            return;
        };
        self.shared.store(true, Ordering::Relaxed);
        let sender = {
            let this = self.clone();
            let store = store.clone();
            let shutdown = shutdown.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = this.wake.notified() => {}
                        _ = shutdown.cancelled() => return,
                    }
                    let batch = std::mem::take(&mut *lock(&this.outbox));
                    for message in batch {
                        let payload = format!("{} {message}", this.replica);
                        if let Err(e) = store.notify(CHANNEL, &payload).await {
                            tracing::warn!(error = %e, "sharing a change with the other replicas");
                        }
                    }
                }
            }
        };
        tokio::join!(sender, self.listen(&url, shutdown.clone()));
    }

    async fn listen(&self, url: &str, shutdown: CancellationToken) {
        loop {
            match sqlx::postgres::PgListener::connect(url).await {
                Ok(mut listener) => match listener.listen(CHANNEL).await {
                    Ok(()) => loop {
                        let received = tokio::select! {
                            r = listener.try_recv() => r,
                            _ = shutdown.cancelled() => return,
                        };
                        match received {
                            Ok(Some(notification)) => self.receive(notification.payload()),
                            // The connection dropped (it reconnects on the
                            // next call): something may have been missed.
                            Ok(None) => self.bump_all(),
                            Err(e) => {
                                tracing::warn!(error = %e, "listening for other replicas' changes");
                                break;
                            }
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "LISTEN {CHANNEL}"),
                },
                Err(e) => tracing::warn!(error = %e, "connecting to listen for other replicas"),
            }
            self.bump_all();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    fn bump_all(&self) {
        for topic in Topic::ALL {
            self.bump_here(topic);
        }
    }
}

/// This replica, the others, and the way to them.
pub struct Replicas {
    id: String,
    url: String,
    started_at: i64,
    store: Store,
    bus: Arc<Bus>,
    peers: Mutex<HashMap<String, Channel>>,
}

/// How a user's call arrived: the token to forward it with, and whether it
/// was forwarded to us already.
#[derive(Clone, Default)]
pub struct Origin {
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    pub forwarded: bool,
}

impl Origin {
    pub fn of<T>(request: &Request<T>) -> Origin {
        Origin {
            authorization: request.metadata().get("authorization").cloned(),
            forwarded: request.metadata().contains_key(FORWARDED),
        }
    }
}

impl Replicas {
    /// A new replica (a fresh id each start) that others reach at `url`.
    pub fn new(store: Store, url: &str) -> Arc<Replicas> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        Arc::new(Replicas {
            bus: Bus::new(&id),
            id,
            url: url.to_string(),
            started_at: now_ms(),
            store,
            peers: Mutex::new(HashMap::new()),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// Records this replica as alive; forgets replicas long gone.
    pub async fn register(&self) -> Result<()> {
        self.store
            .heartbeat_replica(&self.id, &self.url, self.started_at)
            .await?;
        self.store.prune_replicas(now_ms() - 3600 * 1000).await?;
        tracing::info!(replica = %self.id, url = %self.url, "replica registered");
        Ok(())
    }

    /// Heartbeats until `shutdown`, then leaves the table.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            if let Err(e) = self
                .store
                .heartbeat_replica(&self.id, &self.url, self.started_at)
                .await
            {
                tracing::warn!(error = %e, "replica heartbeat");
            }
        }
        if let Err(e) = self.store.remove_replica(&self.id).await {
            tracing::warn!(error = %e, "leaving the replicas table");
        }
    }

    pub fn is_alive(&self, heartbeat_at: i64) -> bool {
        now_ms() - heartbeat_at <= DEAD_AFTER.as_millis() as i64
    }

    /// The URL of the other, live replica that holds the runner's agent
    /// connection right now, if one does.
    pub fn elsewhere(&self, route: &AgentRoute) -> Option<String> {
        (route.replica_id != self.id
            && route.detached_at.is_none()
            && !route.replica_url.is_empty()
            && self.is_alive(route.replica_heartbeat_at))
        .then(|| route.replica_url.clone())
    }

    /// Where `runner_id`'s agent is, when on another live replica.
    pub async fn holder(&self, runner_id: &str) -> Result<Option<String>> {
        Ok(self
            .store
            .agent_route(runner_id)
            .await?
            .and_then(|route| self.elsewhere(&route)))
    }

    /// The URLs a runner should dial, this replica's first.
    pub async fn servers(&self) -> Vec<String> {
        let mut urls = vec![self.url.clone()];
        let since = now_ms() - DEAD_AFTER.as_millis() as i64;
        match self.store.live_replicas(since).await {
            Ok(replicas) => urls.extend(
                replicas
                    .into_iter()
                    .map(|r| r.url)
                    .filter(|u| *u != self.url),
            ),
            Err(e) => tracing::warn!(error = %e, "listing the other replicas"),
        }
        urls
    }

    /// A channel to the replica at `url` (one per peer, reused).
    pub fn channel(&self, url: &str) -> Result<Channel> {
        if let Some(channel) = lock(&self.peers).get(url) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| Error::Unavailable(format!("replica URL '{url}': {e}")))?;
        let channel = grad_proto::tunnel::tunnel_endpoint(endpoint).connect_lazy();
        lock(&self.peers).insert(url.to_string(), channel.clone());
        Ok(channel)
    }

    /// The replica at `url` could not be reached: its channel is dropped,
    /// and the next call to it connects afresh.
    pub fn unreachable(&self, url: &str) {
        lock(&self.peers).remove(url);
    }

    /// Whether the replica at `url` answers (its health service, no token).
    pub async fn reachable(&self, url: &str) -> bool {
        let Ok(channel) = self.channel(url) else {
            return false;
        };
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let check = health.check(tonic_health::pb::HealthCheckRequest::default());
        match tokio::time::timeout(Duration::from_secs(2), check).await {
            Ok(Ok(_)) => true,
            _ => {
                self.unreachable(url);
                false
            }
        }
    }

    /// An error for a call that could not reach the replica holding the
    /// runner's agent, and the runner did not move to another in time.
    pub fn unreachable_error(&self, runner: &str, url: &str, why: &str) -> Error {
        Error::Unavailable(format!(
            "runner {runner} is connected to the grad replica at {url}, which cannot be \
             reached ({why}); a runner whose replica is gone reconnects to another within \
             seconds: try again"
        ))
    }

    /// `message` as a call forwarded on the caller's behalf.
    pub fn forward<T>(&self, origin: &Origin, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(authorization) = &origin.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        if let Ok(id) = self.id.parse() {
            request.metadata_mut().insert(FORWARDED, id);
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replica_ignores_its_own_notifications_and_wakes_on_others() {
        let bus = Bus::new("r1");
        let mut runners = bus.subscribe(Topic::Runners);
        let mut queue = bus.subscribe(Topic::Queue);
        runners.mark_unchanged();
        queue.mark_unchanged();
        bus.receive("r1 runners");
        assert!(!runners.has_changed().unwrap());
        bus.receive("r2 queue");
        assert!(queue.has_changed().unwrap());
        assert!(!runners.has_changed().unwrap());
        let mut keys = bus.key_changes();
        bus.receive("r2 keys user-1");
        assert_eq!(keys.try_recv().unwrap(), "user-1");
        bus.receive("garbage");
        bus.receive("r2 unknown-topic");
        assert!(!runners.has_changed().unwrap());
    }
}
