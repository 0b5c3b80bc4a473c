//! The runner lifecycle: validation, ownership, states and their transitions,
//! failure detection and reconciliation after a restart. The gRPC layer only
//! translates to and from this module; backends only start and stop processes.
//!
//! Every transition of one runner happens under that runner's lock. A
//! lifecycle RPC takes the lock, records the transitional state (`pausing`,
//! `resuming`, …), answers, and hands the lock to a tracked task that finishes
//! the work, so a client that disconnects cannot leave a runner half-done and
//! the next operation on the same runner waits for the previous one.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use grad_proto::{AgentCommand, AuthorizedKeys, CollectOutputs, OutputsCollected, agent_command};

use crate::{
    agents::{Agent, Agents},
    auth::{Keys, UserCaller},
    backend::{self, Backend},
    datasets,
    error::{Error, Result},
    lock,
    replicas::{Origin, Replicas, Topic},
    sealed::Sealer,
    secrets::Secrets,
    store::{self, Plan, Resources, State, Store, now_ms},
};

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often runner agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// A ready runner with no heartbeat (or no connection) for this long fails.
    pub heartbeat_timeout: Duration,
    /// A starting runner that has not registered within this long fails.
    pub start_timeout: Duration,
    /// A ready runner nobody has used (no execution, no tunnel, no job) for
    /// this long is paused; `None`: never.
    pub idle_pause: Option<Duration>,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(30),
            idle_pause: None,
        }
    }
}

/// How long the liveness monitor leaves a vanished process to the reaper,
/// which knows how it exited.
const EXIT_REPORT_GRACE_MS: i64 = 1000;

pub const DEFAULT_RESOURCES: Resources = Resources {
    cpu_millis: 1000,
    memory_bytes: 2 << 30,
    storage_bytes: 10 << 30,
    gpus: 0,
};

const MAX_NAME: usize = 40;

/// How long execute-code and tunnels wait for a runner that is still starting.
const WAIT_FOR_READY: Duration = Duration::from_secs(30);

/// How long grad waits for a runner to upload its outputs.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where a usable runner's agent is.
pub enum Reach {
    /// Connected to this replica.
    Here(store::Runner, Arc<Agent>),
    /// Connected to the replica at this URL: forward the call there.
    Replica(store::Runner, String),
}

/// The outcome of waiting for a runner.
pub enum Waited {
    Runner(Box<store::Runner>),
    Deleted { name: String, owner: String },
}

pub struct Runners {
    store: Store,
    backend: Arc<dyn Backend>,
    keys: Keys,
    sealer: Sealer,
    secrets: Secrets,
    agents: Arc<Agents>,
    timing: Timing,
    replicas: Arc<Replicas>,
    locks: std::sync::Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    started_at: i64,
    /// Runner id -> when an idle pause was last tried (a refused one, its
    /// outputs failing to collect, is tried again an idle period later).
    idle_tries: std::sync::Mutex<HashMap<String, i64>>,
}

/// Checks a runner name: a DNS label, so it is also a valid pod name part.
pub fn validate_name(name: &str) -> Result<()> {
    crate::names::dns_label("runner name", name, MAX_NAME)
}

/// Fills in defaults (zero means "default") and checks the limits.
pub fn validate_resources(requested: Resources, plan: Plan) -> Result<Resources> {
    let pick = |v: u64, d: u64| if v == 0 { d } else { v };
    let r = Resources {
        cpu_millis: pick(
            requested.cpu_millis.into(),
            DEFAULT_RESOURCES.cpu_millis.into(),
        ) as u32,
        memory_bytes: pick(requested.memory_bytes, DEFAULT_RESOURCES.memory_bytes),
        storage_bytes: pick(requested.storage_bytes, DEFAULT_RESOURCES.storage_bytes),
        gpus: requested.gpus,
    };
    const MI: u64 = 1 << 20;
    const GI: u64 = 1 << 30;
    if !(100..=64_000).contains(&r.cpu_millis) {
        return Err(Error::InvalidArgument(format!(
            "invalid cpu {}m: must be between 100m and 64 cores",
            r.cpu_millis
        )));
    }
    if !(128 * MI..=512 * GI).contains(&r.memory_bytes) {
        return Err(Error::InvalidArgument(format!(
            "invalid memory {} bytes: must be between 128Mi and 512Gi",
            r.memory_bytes
        )));
    }
    if !(GI..=2048 * GI).contains(&r.storage_bytes) {
        return Err(Error::InvalidArgument(format!(
            "invalid storage {} bytes: must be between 1Gi and 2Ti",
            r.storage_bytes
        )));
    }
    if r.gpus > 8 {
        return Err(Error::InvalidArgument(format!(
            "invalid gpus {}: at most 8",
            r.gpus
        )));
    }
    if r.gpus > 0 && plan != Plan::Pro {
        return Err(Error::PermissionDenied(format!(
            "GPUs need the pro plan; your plan is {plan}"
        )));
    }
    Ok(r)
}

impl Runners {
    // The collaborators a server wires together once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        backend: Arc<dyn Backend>,
        keys: Keys,
        agents: Arc<Agents>,
        sealer: Sealer,
        timing: Timing,
        replicas: Arc<Replicas>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Runners> {
        Arc::new(Runners {
            secrets: Secrets::new(store.clone(), sealer.clone()),
            store,
            backend,
            keys,
            sealer,
            agents,
            timing,
            replicas,
            locks: std::sync::Mutex::new(HashMap::new()),
            tracker,
            shutdown,
            started_at: now_ms(),
            idle_tries: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Users' secrets (what datasets' keys may come from).
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    pub fn agents(&self) -> &Arc<Agents> {
        &self.agents
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn replicas(&self) -> &Arc<Replicas> {
        &self.replicas
    }

    /// Registers a runner's new agent connection here, and tells the other
    /// replicas where it is.
    pub async fn connect_agent(
        &self,
        runner_id: &str,
        commands: mpsc::Sender<AgentCommand>,
    ) -> Result<Arc<Agent>> {
        let agent = self.agents.attach(runner_id, commands);
        if let Err(e) = self
            .store
            .set_agent_route(runner_id, self.replicas.id(), agent.conn)
            .await
        {
            self.agents.detach(runner_id, agent.conn);
            return Err(e);
        }
        self.bump();
        Ok(agent)
    }

    /// An agent connection ended.
    pub async fn disconnect_agent(&self, runner_id: &str, conn: u64) {
        self.agents.detach(runner_id, conn);
        if let Err(e) = self
            .store
            .detach_agent_route(runner_id, self.replicas.id(), conn)
            .await
        {
            tracing::warn!(%runner_id, error = %e, "recording an agent's disconnection");
        }
        self.bump();
    }

    /// Closes the runner's agent connection, here or on no replica: it was
    /// stopped on purpose.
    async fn close_agent(&self, runner_id: &str) -> Result<()> {
        self.agents.close(runner_id);
        self.store.delete_agent_route(runner_id).await
    }

    /// Which of `ids`' agents are connected, to this replica or a live one.
    pub async fn connected(&self, ids: &[&str]) -> Result<Vec<bool>> {
        let elsewhere: std::collections::HashSet<String> =
            match ids.iter().all(|id| self.agents.is_connected(id)) {
                true => Default::default(),
                false => self
                    .store
                    .agent_routes()
                    .await?
                    .into_iter()
                    .filter(|route| self.replicas.elsewhere(route).is_some())
                    .map(|route| route.runner_id)
                    .collect(),
            };
        Ok(ids
            .iter()
            .map(|id| self.agents.is_connected(id) || elsewhere.contains(*id))
            .collect())
    }

    /// The replica at `from`, which held the runner's agent, could not be
    /// reached: waits for the agent to connect to another (a runner whose
    /// replica died does within a second or two). Answers whether it did,
    /// giving up once the dead replica's route would no longer count.
    pub async fn wait_moved(&self, runner_id: &str, from: &str) -> Result<bool> {
        let mut changed = self.replicas.bus().subscribe(Topic::Runners);
        let deadline =
            tokio::time::Instant::now() + crate::replicas::DEAD_AFTER + Duration::from_secs(2);
        loop {
            changed.mark_unchanged();
            if self.agents.is_connected(runner_id) {
                return Ok(true);
            }
            if self
                .store
                .agent_route(runner_id)
                .await?
                .is_some_and(|route| {
                    self.replicas
                        .elsewhere(&route)
                        .is_some_and(|url| url != from)
                })
            {
                return Ok(true);
            }
            let tick = tokio::time::sleep(Duration::from_millis(200));
            tokio::select! {
                _ = changed.changed() => {}
                _ = tick => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(false),
            }
        }
    }

    /// The URL of the replica to forward a call about runner `name` to: the
    /// one its agent is connected to, when that is another replica and the
    /// call was not forwarded already.
    pub async fn held_elsewhere(
        &self,
        caller: &UserCaller,
        name: &str,
        origin: &Origin,
    ) -> Result<Option<(store::Runner, String)>> {
        if origin.forwarded {
            return Ok(None);
        }
        let runner = self.resolve(caller, name).await?;
        if self.agents.is_connected(&runner.id) {
            return Ok(None);
        }
        Ok(self
            .replicas
            .holder(&runner.id)
            .await?
            .map(|url| (runner, url)))
    }

    /// The caller's runner, ready, and where its agent is connected: what
    /// execute-code and tunnels need. Waits for a runner that is still
    /// starting.
    pub async fn usable(&self, caller: &UserCaller, name: &str, origin: &Origin) -> Result<Reach> {
        let mut runner = self.resolve(caller, name).await?;
        if matches!(
            runner.state,
            State::Pending | State::Starting | State::Resuming
        ) {
            runner = match self
                .wait_for(&runner, &[State::Ready], false, WAIT_FOR_READY)
                .await?
            {
                Waited::Runner(r) => *r,
                Waited::Deleted { .. } => {
                    return Err(Error::NotFound(format!("runner '{name}' not found")));
                }
            };
        }
        match runner.state {
            State::Ready => {}
            State::Paused | State::Pausing => {
                return Err(Error::FailedPrecondition(format!(
                    "runner {name} is paused; run `gractl runner resume {name}`"
                )));
            }
            State::Failed => {
                return Err(Error::FailedPrecondition(format!(
                    "runner {name} failed: {}; run `gractl runner resume {name}` to restart it",
                    runner.reason
                )));
            }
            State::Deleting => {
                return Err(Error::FailedPrecondition(format!(
                    "runner {name} is being deleted"
                )));
            }
            State::Pending | State::Starting | State::Resuming => {
                return Err(Error::Unavailable(format!(
                    "runner {name} is still {}; try again shortly",
                    runner.state
                )));
            }
        }
        if let Some(agent) = self.agents.get(&runner.id) {
            return Ok(Reach::Here(runner, agent));
        }
        if !origin.forwarded
            && let Some(url) = self.replicas.holder(&runner.id).await?
        {
            return Ok(Reach::Replica(runner, url));
        }
        Err(Error::Unavailable(format!(
            "runner {name} is not connected to grad right now; retry in a few seconds"
        )))
    }

    /// Sends the owner's current SSH keys to each of their connected
    /// runners, here and on the other replicas.
    pub async fn push_authorized_keys(&self, owner_id: &str) -> Result<()> {
        self.replicas.bus().keys_changed(owner_id);
        self.push_keys_here(owner_id).await
    }

    /// Pushes the SSH keys that changed on other replicas to the runners
    /// connected here, until shutdown.
    pub async fn run_key_pushes(self: Arc<Self>) {
        let mut changes = self.replicas.bus().key_changes();
        loop {
            let owner_id = tokio::select! {
                changed = changes.recv() => changed,
                _ = self.shutdown.cancelled() => return,
            };
            match owner_id {
                Ok(owner_id) => {
                    if let Err(e) = self.push_keys_here(&owner_id).await {
                        tracing::warn!(error = %e, "pushing SSH keys changed elsewhere");
                    }
                }
                // Too many changes at once: push everyone's.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let runners = self.store.list_runners(None).await.unwrap_or_default();
                    let owners: std::collections::BTreeSet<_> =
                        runners.into_iter().map(|r| r.owner_id).collect();
                    for owner_id in owners {
                        let _ = self.push_keys_here(&owner_id).await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn push_keys_here(&self, owner_id: &str) -> Result<()> {
        let keys = self.authorized_keys(owner_id).await?;
        for runner in self.store.list_runners(Some(owner_id)).await? {
            if let Some(agent) = self.agents.get(&runner.id) {
                let _ = agent.commands.send(keys.clone()).await;
            }
        }
        Ok(())
    }

    pub async fn authorized_keys(&self, owner_id: &str) -> Result<AgentCommand> {
        let public_keys = self
            .store
            .ssh_keys(owner_id)
            .await?
            .into_iter()
            .map(|k| k.public_key)
            .collect();
        Ok(AgentCommand {
            command: Some(agent_command::Command::AuthorizedKeys(AuthorizedKeys {
                public_keys,
            })),
        })
    }

    /// The command that mounts `runner`'s datasets (sent at each registration).
    pub fn mount_datasets(&self, runner: &store::Runner) -> Result<AgentCommand> {
        datasets::mount_command(runner, &self.sealer)
    }

    /// Records what a runner's agent reported about its datasets.
    pub async fn datasets_mounted(
        &self,
        runner_id: &str,
        statuses: &[grad_proto::DatasetStatus],
    ) -> Result<()> {
        let Some(runner) = self.store.runner_by_id(runner_id).await? else {
            return Ok(());
        };
        for status in statuses.iter().filter(|s| !s.mounted) {
            tracing::warn!(runner = %runner.name, dataset = %status.name, error = %status.error, "dataset not mounted");
        }
        let datasets = datasets::with_statuses(runner.datasets, statuses);
        self.store.set_runner_datasets(runner_id, &datasets).await?;
        self.bump();
        Ok(())
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn bump(&self) {
        self.replicas.bus().bump(Topic::Runners);
    }

    async fn lock_runner(&self, id: &str) -> OwnedMutexGuard<()> {
        let m = lock(&self.locks)
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(AsyncMutex::new(())))
            .clone();
        m.lock_owned().await
    }

    /// Finds the caller's runner by name. Admins may name another user's
    /// runner as `OWNER/NAME`. Anyone else's runner is "not found", never
    /// "forbidden", so existence does not leak.
    pub async fn resolve(&self, caller: &UserCaller, name: &str) -> Result<store::Runner> {
        let (owner_id, short) = self.owner_of(caller, name).await?;
        self.store
            .runner_by_name(&owner_id, short)
            .await?
            .ok_or_else(|| not_found(name))
    }

    /// Whose runners `name` is among, and its name there: the caller's,
    /// or for admins `OWNER/NAME`'s.
    pub async fn owner_of<'n>(
        &self,
        caller: &UserCaller,
        name: &'n str,
    ) -> Result<(String, &'n str)> {
        let (owner_id, short) = match name.split_once('/') {
            Some((owner, short)) if caller.is_admin() => {
                let owner = self
                    .store
                    .user_by_name(owner)
                    .await?
                    .ok_or_else(|| not_found(name))?;
                (owner.id, short)
            }
            Some(_) => return Err(not_found(name)),
            None => (caller.id.clone(), name),
        };
        if short.is_empty() {
            return Err(Error::InvalidArgument("runner name is empty".into()));
        }
        Ok((owner_id, short))
    }

    pub async fn create(
        self: &Arc<Self>,
        caller: &UserCaller,
        name: &str,
        requested: Resources,
        datasets: Vec<grad_proto::Dataset>,
    ) -> Result<store::Runner> {
        validate_name(name)?;
        // The plan as it is now, not as it was when the token was made.
        let plan = self
            .store
            .user_by_id(&caller.id)
            .await?
            .map_or(caller.plan, |u| u.plan);
        let resources = validate_resources(requested, plan)?;
        let id = uuid::Uuid::new_v4().to_string();
        let datasets = datasets::with_secret_keys(datasets, &self.secrets, &caller.id).await?;
        let (datasets, dataset_credentials) = datasets::accept(datasets, &self.sealer, &id)?;
        let now = now_ms();
        let runner = store::Runner {
            id,
            owner_id: caller.id.clone(),
            owner_name: caller.name.clone(),
            name: name.to_string(),
            state: State::Pending,
            reason: String::new(),
            resources,
            backend: self.backend.name().to_string(),
            workspace: self
                .backend
                .workspace(&caller.name, name)
                .display()
                .to_string(),
            token_id: String::new(),
            pid: None,
            host_key: String::new(),
            created_at: now,
            updated_at: now,
            datasets,
            dataset_credentials,
        };
        let guard = self.lock_runner(&runner.id).await;
        self.store.insert_runner(&runner).await?;
        tracing::info!(runner = %runner.name, owner = %caller.name, "runner created");
        self.bump();
        self.spawn_with(guard, runner.id.clone(), |this, id| async move {
            this.start(&id).await
        });
        Ok(runner)
    }

    pub async fn get(&self, caller: &UserCaller, name: &str) -> Result<store::Runner> {
        self.resolve(caller, name).await
    }

    pub async fn list(&self, caller: &UserCaller, all_users: bool) -> Result<Vec<store::Runner>> {
        if all_users && !caller.is_admin() {
            return Err(Error::PermissionDenied(
                "only admins can list every user's runners".into(),
            ));
        }
        let owner = (!all_users).then_some(caller.id.as_str());
        self.store.list_runners(owner).await
    }

    /// Pauses the runner, collecting its outputs first unless `skip_outputs`.
    pub async fn pause(
        self: &Arc<Self>,
        caller: &UserCaller,
        name: &str,
        skip_outputs: bool,
    ) -> Result<store::Runner> {
        let decide = |r: &store::Runner| match r.state {
            State::Paused | State::Pausing => Ok(None),
            State::Deleting => Err(deleting(name)),
            State::Pending | State::Starting | State::Ready | State::Resuming | State::Failed => {
                Ok(Some(State::Pausing))
            }
        };
        let collect = (!skip_outputs).then_some("pause");
        self.transition(caller, name, decide, collect, |this, id| async move {
            this.stop(&id, "").await
        })
        .await
    }

    pub async fn resume(
        self: &Arc<Self>,
        caller: &UserCaller,
        name: &str,
    ) -> Result<store::Runner> {
        let decide = |r: &store::Runner| match r.state {
            State::Paused | State::Failed => Ok(Some(State::Resuming)),
            State::Pending | State::Starting | State::Ready | State::Resuming => Ok(None),
            State::Deleting => Err(deleting(name)),
            // Unreachable in practice: pausing ends under the lock we hold.
            State::Pausing => Err(Error::FailedPrecondition(format!(
                "runner {name} is pausing; resume it once it is paused"
            ))),
        };
        self.transition(caller, name, decide, None, |this, id| async move {
            this.start(&id).await
        })
        .await
    }

    /// Deletes the runner, collecting its outputs first unless `skip_outputs`.
    pub async fn delete(
        self: &Arc<Self>,
        caller: &UserCaller,
        name: &str,
        skip_outputs: bool,
    ) -> Result<store::Runner> {
        // Deleting again retries a delete that failed half-way.
        let decide = |_: &store::Runner| Ok(Some(State::Deleting));
        let collect = (!skip_outputs).then_some("delete");
        self.transition(caller, name, decide, collect, |this, id| async move {
            this.remove(&id).await
        })
        .await
    }

    /// Has the runner's agent upload what changed in its outputs/ (see
    /// `crate::outputs`) and waits for it to finish.
    pub async fn collect_outputs(
        &self,
        runner: &store::Runner,
        agent: &Agent,
    ) -> Result<OutputsCollected> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let done = agent.expect_collection(&request_id);
        let command = AgentCommand {
            command: Some(agent_command::Command::CollectOutputs(CollectOutputs {
                request_id: request_id.clone(),
            })),
        };
        let gone = || {
            Error::Unavailable(format!(
                "runner {} disconnected while collecting its outputs",
                runner.name
            ))
        };
        if agent.commands.send(command).await.is_err() {
            agent.forget_collection(&request_id);
            return Err(gone());
        }
        let report = match tokio::time::timeout(COLLECT_TIMEOUT, done).await {
            Ok(Ok(report)) => report,
            Ok(Err(_)) => return Err(gone()),
            Err(_) => {
                agent.forget_collection(&request_id);
                return Err(Error::DeadlineExceeded(format!(
                    "runner {} did not finish collecting its outputs within {}",
                    runner.name,
                    humantime::format_duration(COLLECT_TIMEOUT)
                )));
            }
        };
        if !report.error.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "collecting the outputs of runner {}: {}",
                runner.name, report.error
            )));
        }
        tracing::info!(
            runner = %runner.name, files = report.uploaded_files, bytes = report.uploaded_bytes,
            "outputs collected"
        );
        Ok(report)
    }

    /// The shape of every lifecycle RPC: under the runner's lock, `decide`
    /// from its current state what to move to (`None`: nothing to do),
    /// collect a ready runner's outputs when the transition is `collect`
    /// (named by its verb; a failure changes nothing), record the state, and
    /// hand the lock to a task that does `work`.
    async fn transition<D, F, Fut>(
        self: &Arc<Self>,
        caller: &UserCaller,
        name: &str,
        decide: D,
        collect: Option<&str>,
        work: F,
    ) -> Result<store::Runner>
    where
        D: Fn(&store::Runner) -> Result<Option<State>>,
        F: FnOnce(Arc<Runners>, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let found = self.resolve(caller, name).await?;
        let guard = self.lock_runner(&found.id).await;
        let mut collected = false;
        // The lock is this replica's; another replica may move the runner
        // meanwhile: the state is recorded only if it is still the one
        // decided from, else decided again from the new one.
        let runner = loop {
            let mut runner = self
                .store
                .runner_by_id(&found.id)
                .await?
                .ok_or_else(|| not_found(name))?;
            let Some(next) = decide(&runner)? else {
                return Ok(runner);
            };
            if let Some(verb) = collect
                && !collected
                && runner.state == State::Ready
                && let Some(agent) = self.agents.get(&runner.id)
            {
                self.collect_outputs(&runner, &agent).await.map_err(|e| {
                    e.explained(&format!(
                        "; the runner was left as it was: try again, or \
                         `gractl runner {verb} {name} --skip-outputs` to {verb} it without collecting"
                    ))
                })?;
                collected = true;
            }
            if runner.state == next {
                break runner;
            }
            if self
                .store
                .set_runner_state_from(&runner.id, runner.state, next)
                .await?
            {
                runner.state = next;
                runner.reason.clear();
                self.bump();
                break runner;
            }
        };
        self.spawn_with(guard, runner.id.clone(), work);
        Ok(runner)
    }

    /// Waits until the runner is in one of `states` (or failed, or gone), at
    /// most `timeout`.
    pub async fn wait(
        &self,
        caller: &UserCaller,
        name: &str,
        states: &[State],
        want_deleted: bool,
        timeout: Duration,
    ) -> Result<Waited> {
        let runner = self.resolve(caller, name).await?;
        self.wait_for(&runner, states, want_deleted, timeout).await
    }

    pub async fn wait_for(
        &self,
        runner: &store::Runner,
        states: &[State],
        want_deleted: bool,
        timeout: Duration,
    ) -> Result<Waited> {
        let mut changed = self.replicas.bus().subscribe(Topic::Runners);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changed.mark_unchanged();
            match self.store.runner_by_id(&runner.id).await? {
                None if want_deleted => {
                    return Ok(Waited::Deleted {
                        name: runner.name.clone(),
                        owner: runner.owner_name.clone(),
                    });
                }
                None => {
                    return Err(Error::NotFound(format!(
                        "runner '{}' was deleted",
                        runner.name
                    )));
                }
                Some(r) if states.contains(&r.state) || r.state == State::Failed => {
                    return Ok(Waited::Runner(Box::new(r)));
                }
                Some(r) => {
                    let woke = tokio::time::timeout_at(deadline, changed.changed()).await;
                    if woke.is_err() {
                        return Err(Error::DeadlineExceeded(format!(
                            "runner {} is still {} after {}",
                            r.name,
                            r.state,
                            humantime::format_duration(timeout)
                        )));
                    }
                }
            }
        }
    }

    /// Runs `work` as a tracked task that holds the runner's lock until done.
    fn spawn_with<F, Fut>(self: &Arc<Self>, guard: OwnedMutexGuard<()>, id: String, work: F)
    where
        F: FnOnce(Arc<Runners>, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let this = self.clone();
        self.tracker.spawn(async move {
            let _guard = guard;
            if let Err(e) = work(this.clone(), id.clone()).await {
                tracing::error!(runner_id = %id, error = %e, "runner transition failed");
                let _ = this
                    .store
                    .set_runner_state(&id, State::Failed, &e.to_string())
                    .await;
                this.bump();
            }
        });
    }

    /// Starts (or restarts) the runner's process with a fresh agent token.
    /// Caller holds the runner's lock.
    async fn start(&self, id: &str) -> Result<()> {
        let Some(mut runner) = self.store.runner_by_id(id).await? else {
            return Ok(());
        };
        if !matches!(runner.state, State::Pending | State::Resuming) {
            return Ok(());
        }
        let token_id = uuid::Uuid::new_v4().to_string();
        self.store.set_runner_token(id, &token_id).await?;
        runner.token_id = token_id.clone();
        let spec = backend::Spec {
            token: self.keys.issue_runner(id, &token_id)?,
            runner: runner.clone(),
            servers: self.replicas.servers().await,
        };
        // Starting before the backend starts it: what the backend says
        // while it comes up (a pod waiting to be scheduled) is kept.
        if runner.state == State::Pending {
            self.store.set_runner_state(id, State::Starting, "").await?;
        }
        match self.backend.start(&spec).await {
            Ok(pid) => {
                self.store.set_runner_pid(id, pid).await?;
                tracing::info!(runner = %runner.name, ?pid, "runner process started");
            }
            Err(e) => {
                tracing::warn!(runner = %runner.name, error = %e, "runner failed to start");
                self.store
                    .set_runner_state(id, State::Failed, &e.to_string())
                    .await?;
            }
        }
        self.bump();
        Ok(())
    }

    /// Stops the runner's processes, keeping its files; `reason` says why
    /// it paused ("" when asked to). Caller holds the lock.
    async fn stop(&self, id: &str, reason: &str) -> Result<()> {
        let Some(runner) = self.store.runner_by_id(id).await? else {
            return Ok(());
        };
        self.close_agent(id).await?;
        self.backend.stop(&runner).await?;
        self.store.set_runner_pid(id, None).await?;
        self.store
            .set_runner_state(id, State::Paused, reason)
            .await?;
        tracing::info!(runner = %runner.name, "runner paused");
        self.bump();
        Ok(())
    }

    /// Stops the runner and removes everything it had. Caller holds the lock.
    async fn remove(&self, id: &str) -> Result<()> {
        let Some(runner) = self.store.runner_by_id(id).await? else {
            return Ok(());
        };
        self.agents.close(id);
        self.backend.stop(&runner).await?;
        self.backend.remove(&runner).await?;
        self.store.delete_runner(id).await?;
        lock(&self.locks).remove(id);
        tracing::info!(runner = %runner.name, "runner deleted");
        self.bump();
        Ok(())
    }

    /// Marks a runner failed (if it is still in `expected` state) and stops
    /// whatever is left of it.
    async fn fail(&self, id: &str, expected: State, reason: String) -> Result<()> {
        let _guard = self.lock_runner(id).await;
        let Some(runner) = self.store.runner_by_id(id).await? else {
            return Ok(());
        };
        if runner.state != expected {
            return Ok(());
        }
        tracing::warn!(runner = %runner.name, %reason, "runner failed");
        // Its token goes first: what is left of it (a process or pod on
        // its way down) cannot attach again and make it ready; resume
        // starts it with a new one.
        self.store.set_runner_token(id, "").await?;
        self.close_agent(id).await?;
        self.store
            .set_runner_state(id, State::Failed, &reason)
            .await?;
        self.bump();
        if let Err(e) = self.backend.stop(&runner).await {
            tracing::warn!(runner = %runner.name, error = %e, "stopping a failed runner");
        }
        self.store.set_runner_pid(id, None).await?;
        Ok(())
    }

    /// A runner's agent attached with a valid runner token: checks it is the
    /// runner's current token and marks the runner ready.
    pub async fn attached(
        &self,
        runner_id: &str,
        token_id: &str,
        host_key: &str,
    ) -> Result<store::Runner> {
        let _guard = self.lock_runner(runner_id).await;
        let mut runner = self
            .store
            .runner_by_id(runner_id)
            .await?
            .ok_or_else(|| Error::NotFound("this runner no longer exists".into()))?;
        if runner.token_id != token_id {
            return Err(Error::PermissionDenied(
                "this runner token has been replaced; the runner was restarted elsewhere".into(),
            ));
        }
        match runner.state {
            State::Pending | State::Starting | State::Resuming | State::Ready | State::Failed => {
                if !host_key.is_empty() && host_key != runner.host_key {
                    if !runner.host_key.is_empty() {
                        tracing::warn!(runner = %runner.name, "the runner's SSH host key changed");
                    }
                    self.store.set_runner_host_key(runner_id, host_key).await?;
                    runner.host_key = host_key.to_string();
                }
                if runner.state != State::Ready || !runner.reason.is_empty() {
                    self.store
                        .set_runner_state(runner_id, State::Ready, "")
                        .await?;
                    runner.state = State::Ready;
                    runner.reason.clear();
                }
                Ok(runner)
            }
            State::Pausing | State::Paused | State::Deleting => {
                Err(Error::FailedPrecondition(format!(
                    "runner {} is {}; not accepting its agent",
                    runner.name, runner.state
                )))
            }
        }
    }

    /// Handles what the backend noticed on its own (a process exiting).
    pub async fn run_backend_events(self: Arc<Self>, mut events: mpsc::Receiver<backend::Event>) {
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                _ = self.shutdown.cancelled() => None,
            };
            let Some(event) = event else {
                return;
            };
            // Each on its own: one waiting for its runner's lock (a pause
            // collecting outputs) holds up no other.
            let this = self.clone();
            self.tracker.spawn(async move {
                if let Err(e) = this.backend_event(event).await {
                    tracing::error!(error = %e, "handling a backend event");
                }
            });
        }
    }

    async fn backend_event(&self, event: backend::Event) -> Result<()> {
        let (runner_id, pid, token_id, reason, fails) = match event {
            backend::Event::Exited {
                runner_id,
                pid,
                status,
            } => (
                runner_id,
                Some(pid),
                None,
                format!("runner process exited ({status})"),
                true,
            ),
            backend::Event::Gone {
                runner_id,
                token_id,
                reason,
            } => (runner_id, None, token_id, reason, true),
            backend::Event::Waiting {
                runner_id,
                token_id,
                reason,
            } => (runner_id, None, token_id, reason, false),
        };
        let Some(runner) = self.store.runner_by_id(&runner_id).await? else {
            return Ok(());
        };
        if (pid.is_some() && runner.pid != pid) || token_id.is_some_and(|t| t != runner.token_id) {
            return Ok(()); // about an earlier start
        }
        match runner.state {
            State::Starting | State::Ready | State::Resuming if fails => {
                self.fail(&runner_id, runner.state, reason).await
            }
            State::Pending | State::Starting | State::Resuming
                if !fails && runner.reason != reason =>
            {
                self.store.set_runner_reason(&runner_id, &reason).await?;
                self.bump();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Notices runners whose agent stopped heartbeating or never registered.
    pub async fn run_monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            if let Err(e) = self.check_liveness().await {
                tracing::error!(error = %e, "runner liveness check");
            }
        }
    }

    /// Pauses the ready runners whose agent is here and that nobody has
    /// used for `idle_pause`: no execution or tunnel in progress or since,
    /// and no job running on them. Their outputs are collected first, as
    /// for any pause.
    async fn pause_idle(self: &Arc<Self>, runners: &[store::Runner]) -> Result<()> {
        let Some(idle) = self.timing.idle_pause else {
            return Ok(());
        };
        let now = now_ms();
        let idle_ms = idle.as_millis() as i64;
        for runner in runners.iter().filter(|r| r.state == State::Ready) {
            let Some(since) = self.agents.get(&runner.id).and_then(|a| a.idle_since()) else {
                continue;
            };
            let tried = lock(&self.idle_tries).get(&runner.id).copied();
            let since = since.max(runner.updated_at).max(tried.unwrap_or(0));
            if now - since < idle_ms || self.store.running_jobs_on(&runner.id).await? > 0 {
                continue;
            }
            lock(&self.idle_tries).insert(runner.id.clone(), now);
            let owner = UserCaller {
                id: runner.owner_id.clone(),
                name: runner.owner_name.clone(),
                role: store::Role::User,
                plan: Plan::Free,
            };
            let reason = format!(
                "paused after {} without use",
                humantime::format_duration(idle)
            );
            tracing::info!(runner = %runner.name, owner = %runner.owner_name, %reason, "pausing an idle runner");
            let decide =
                |r: &store::Runner| Ok((r.state == State::Ready).then_some(State::Pausing));
            // Its own task: collecting outputs may take long, and the
            // liveness checks of every other runner go on meanwhile.
            let (this, name) = (self.clone(), runner.name.clone());
            self.tracker.spawn(async move {
                let paused = this
                    .transition(&owner, &name, decide, Some("pause"), move |this, id| async move {
                        this.stop(&id, &reason).await
                    })
                    .await;
                if let Err(e) = paused {
                    tracing::warn!(runner = %name, error = %e, "an idle runner could not be paused");
                }
            });
        }
        Ok(())
    }

    async fn check_liveness(self: &Arc<Self>) -> Result<()> {
        let now = now_ms();
        let heartbeat_ms = self.timing.heartbeat_timeout.as_millis() as i64;
        let start_ms = self.timing.start_timeout.as_millis() as i64;
        let routes: HashMap<String, store::AgentRoute> = self
            .store
            .agent_routes()
            .await?
            .into_iter()
            .map(|r| (r.runner_id.clone(), r))
            .collect();
        let runners = self.store.list_runners(None).await?;
        self.pause_idle(&runners).await?;
        for runner in runners {
            let reason = match runner.state {
                State::Ready => match self.agents.get(&runner.id) {
                    Some(agent) if now - agent.last_seen_ms() > heartbeat_ms => Some(format!(
                        "no heartbeat from the runner for {}",
                        humantime::format_duration(self.timing.heartbeat_timeout)
                    )),
                    Some(_) => None,
                    // A process of this grad's reports its own exit, with
                    // its status (`run_backend_events`): this is for the
                    // others (started by an earlier grad), after a moment.
                    None if runner.pid.is_some()
                        && !self.backend.alive(&runner)
                        && self
                            .agents
                            .disconnected_at(&runner.id)
                            .is_none_or(|at| now - at > EXIT_REPORT_GRACE_MS) =>
                    {
                        Some("runner process is gone".to_string())
                    }
                    None => {
                        // Since when the runner has had no agent anywhere:
                        // the replica that holds it watches its heartbeats.
                        let since = match routes.get(&runner.id) {
                            Some(route) if self.replicas.elsewhere(route).is_some() => None,
                            Some(route) => Some(match route.detached_at {
                                Some(at) => at,
                                // Its replica died with the connection up.
                                None => route.replica_heartbeat_at.max(route.attached_at),
                            }),
                            None => Some(
                                self.agents
                                    .disconnected_at(&runner.id)
                                    .unwrap_or(self.started_at),
                            ),
                        };
                        since.map(|s| s.max(runner.updated_at)).and_then(|since| {
                            (now - since > heartbeat_ms).then(|| {
                                format!(
                                    "runner agent disconnected and did not come back within {}",
                                    humantime::format_duration(self.timing.heartbeat_timeout)
                                )
                            })
                        })
                    }
                },
                State::Starting | State::Resuming => {
                    let since = runner.updated_at.max(self.started_at);
                    (now - since > start_ms).then(|| {
                        let waiting = match runner.reason.as_str() {
                            "" => String::new(),
                            reason => format!(" ({reason})"),
                        };
                        format!(
                            "runner did not register within {}{waiting}",
                            humantime::format_duration(self.timing.start_timeout)
                        )
                    })
                }
                _ => None,
            };
            if let Some(reason) = reason {
                let this = self.clone();
                self.tracker.spawn(async move {
                    if let Err(e) = this.fail(&runner.id, runner.state, reason).await {
                        tracing::error!(error = %e, "marking runner failed");
                    }
                });
            }
        }
        Ok(())
    }

    /// Every `every`, removes what the backend has for runners the store
    /// does not know (a grad that died between making a pod and recording
    /// a delete, someone's copy of a runner's objects).
    pub async fn run_leftover_collection(self: Arc<Self>, every: Duration) {
        tokio::select! {
            _ = self.backend.ready() => {}
            _ = self.shutdown.cancelled() => return,
        }
        loop {
            if let Err(e) = self.collect_leftovers().await {
                tracing::warn!(error = %e, "collecting what no runner owns");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn collect_leftovers(&self) -> Result<()> {
        // The backend first, then the store: a runner is recorded before
        // anything of it is made, so an id missing from the later read is
        // one nobody owns.
        let found = self.backend.leftovers().await?;
        if found.is_empty() {
            return Ok(());
        }
        let known: HashSet<String> = self
            .store
            .list_runners(None)
            .await?
            .into_iter()
            .map(|r| r.id)
            .collect();
        for id in found.iter().filter(|id| !known.contains(*id)) {
            tracing::warn!(runner_id = %id, backend = self.backend.name(), "removing objects no runner owns");
            self.backend.remove_leftover(id).await?;
        }
        Ok(())
    }

    /// Finishes what a previous grad left half-done, and notices runners
    /// whose process is gone. Live runners simply reconnect.
    pub async fn reconcile(self: &Arc<Self>) -> Result<()> {
        for runner in self.store.list_runners(None).await? {
            let guard = self.lock_runner(&runner.id).await;
            let id = runner.id.clone();
            match runner.state {
                State::Pending => {
                    self.spawn_with(guard, id, |t, id| async move { t.start(&id).await })
                }
                State::Resuming if !self.backend.alive(&runner) => {
                    self.spawn_with(guard, id, |t, id| async move { t.start(&id).await })
                }
                State::Pausing => {
                    self.spawn_with(guard, id, |t, id| async move { t.stop(&id, "").await })
                }
                State::Deleting => {
                    self.spawn_with(guard, id, |t, id| async move { t.remove(&id).await })
                }
                State::Starting | State::Ready if !self.backend.alive(&runner) => {
                    drop(guard);
                    let reason = match self.backend.why_gone(&runner) {
                        Some(why) => format!("{why} (seen when grad started)"),
                        None => "runner process was gone when grad started".into(),
                    };
                    self.fail(&id, runner.state, reason).await?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("runner '{name}' not found"))
}

fn deleting(name: &str) -> Error {
    Error::FailedPrecondition(format!("runner {name} is being deleted"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_names_must_be_dns_labels() {
        for good in ["r1", "a", "train-gpu-2"] {
            validate_name(good).unwrap();
        }
        for bad in ["", "R1", "1r", "r_1", "r1-", "a/b", &"a".repeat(41)] {
            let err = validate_name(bad).unwrap_err().to_string();
            assert!(err.contains("invalid runner name"), "{bad}: {err}");
        }
    }

    #[test]
    fn zero_resources_take_the_defaults() {
        let zero = Resources {
            cpu_millis: 0,
            memory_bytes: 0,
            storage_bytes: 0,
            gpus: 0,
        };
        assert_eq!(
            validate_resources(zero, Plan::Free).unwrap(),
            DEFAULT_RESOURCES
        );
    }

    #[test]
    fn resources_out_of_range_are_refused_with_the_limits() {
        let mut r = DEFAULT_RESOURCES;
        r.cpu_millis = 50;
        assert!(
            validate_resources(r, Plan::Pro)
                .unwrap_err()
                .to_string()
                .contains("100m")
        );
        let mut r = DEFAULT_RESOURCES;
        r.memory_bytes = 1 << 40;
        assert!(
            validate_resources(r, Plan::Pro)
                .unwrap_err()
                .to_string()
                .contains("512Gi")
        );
    }

    #[test]
    fn gpus_need_the_pro_plan() {
        let mut r = DEFAULT_RESOURCES;
        r.gpus = 1;
        let err = validate_resources(r, Plan::Free).unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
        assert_eq!(validate_resources(r, Plan::Pro).unwrap().gpus, 1);
    }
}
