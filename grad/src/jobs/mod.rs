//! Batch jobs: the queue of the golden loop. A client uploads a bundle by
//! presigned URL and submits a spec; a worker long-polls, claims a job it
//! can run under a lease (one conditional UPDATE: two workers never get the
//! same attempt), renews the lease while it runs (hearing of a cancel in the
//! answer), streams log lines, uploads the attempt's whole log, and says
//! how it ended. A lease that runs out puts the job back in the queue, or
//! fails it once its attempts are used up.
//!
//! States: `queued → running → succeeded | failed | cancelled`, each with a
//! reason; a failed or lost attempt with attempts left goes back to `queued`.

pub mod logs;
pub mod spec;
pub mod workers;

use std::{collections::HashMap, sync::Arc, time::Duration};

use grad_proto as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::UserCaller,
    blobs::{BlobStore, Key, Presigned, Sha256},
    error::{Error, Result},
    replicas::{Bus, Topic},
    secrets::Secrets,
    store::{self, JobState, Store, now_ms},
};

pub use spec::Spec;
pub use workers::Workers;

/// The largest bundle accepted (one PUT; big data belongs in datasets).
pub const MAX_BUNDLE: u64 = 2 << 30;
/// How long presigned bundle and log URLs live.
const URL_EXPIRY: Duration = Duration::from_secs(30 * 60);
/// Queued jobs looked at per claim.
const CLAIM_SCAN: u32 = 64;
/// The label of the worker grad makes for a job's own pod: the job's id.
pub const JOB_POD_LABEL: &str = "grad.dev/job";
/// The longest a claim waits for work.
const MAX_CLAIM_WAIT: Duration = Duration::from_secs(60);
const DEFAULT_LIST: u32 = 100;

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// An attempt not renewed for this long is lost.
    pub lease: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            lease: Duration::from_secs(15),
        }
    }
}

/// Who runs jobs: a standing worker, or a runner taking its owner's jobs.
#[derive(Debug, Clone)]
pub struct Runs {
    pub worker: store::Worker,
    pub capabilities: pb::WorkerCapabilities,
    /// A runner's agent (the worker's id is the runner's), not a standing
    /// worker: it also takes the jobs that name it.
    pub runner: bool,
}

/// What a worker gets with a claimed job.
pub struct Claimed {
    pub job: store::Job,
    pub spec: Spec,
    pub bundle: Presigned,
    pub secrets: HashMap<String, String>,
    pub renew_every: Duration,
}

/// How an attempt ended, as the worker tells it.
#[derive(Debug, Clone)]
pub enum Outcome {
    Exited(i32),
    TimedOut,
    Cancelled,
    Error(String),
}

/// An attempt's log as the worker uploaded it.
#[derive(Debug, Clone)]
pub struct UploadedLog {
    pub sha256: String,
    pub size: u64,
    pub lines: u32,
}

pub struct Jobs {
    store: Store,
    blobs: Arc<dyn BlobStore>,
    secrets: Secrets,
    timing: Timing,
    /// `Topic::Jobs` is bumped on every submission, state change and
    /// appended log line: waits and log followers wake on it and look
    /// again; `Topic::Queue` when a job joins the queue: idle claims wake
    /// on it. On every replica (see `crate::replicas`).
    bus: Arc<Bus>,
    shutdown: CancellationToken,
}

fn bundle_key(owner_id: &str, sha256: &Sha256) -> Result<Key> {
    Key::new(format!("users/{owner_id}/bundles/{sha256}"))
}

fn log_key(owner_id: &str, sha256: &Sha256) -> Result<Key> {
    Key::new(format!("users/{owner_id}/logs/{sha256}"))
}

/// A new job id: 12 hex digits.
fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

fn human(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

impl Jobs {
    pub fn new(
        store: Store,
        blobs: Arc<dyn BlobStore>,
        secrets: Secrets,
        timing: Timing,
        bus: Arc<Bus>,
        shutdown: CancellationToken,
    ) -> Arc<Jobs> {
        Arc::new(Jobs {
            store,
            blobs,
            secrets,
            timing,
            bus,
            shutdown,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    fn bump(&self) {
        self.bus.bump(Topic::Jobs);
    }

    /// A job was queued (new, or back for another attempt).
    fn bump_queue(&self) {
        self.bus.bump(Topic::Queue);
        self.bump();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.bus.subscribe(Topic::Jobs)
    }

    /// Where to upload a bundle, unless grad has it.
    pub async fn create_upload(
        &self,
        caller: &UserCaller,
        sha256: &str,
        size: u64,
    ) -> Result<Option<Presigned>> {
        let sha256 = Sha256::parse(sha256)?;
        if size > MAX_BUNDLE {
            return Err(Error::InvalidArgument(format!(
                "the bundle is {size} bytes; at most {MAX_BUNDLE} (2 GiB): leave data out of it \
                 (.gradignore) and read it from a dataset"
            )));
        }
        let key = bundle_key(&caller.id, &sha256)?;
        if self.blobs.head(&key).await?.is_some_and(|o| o.size == size) {
            return Ok(None);
        }
        Ok(Some(
            self.blobs.presign_put(&key, sha256, URL_EXPIRY).await?,
        ))
    }

    /// Queues a job whose bundle was uploaded.
    pub async fn submit(
        &self,
        caller: &UserCaller,
        spec: pb::JobSpec,
        bundle_sha256: &str,
    ) -> Result<store::Job> {
        // The plan as it is now, not as it was when the token was made.
        let plan = self
            .store
            .user_by_id(&caller.id)
            .await?
            .map_or(caller.plan, |u| u.plan);
        let spec = Spec::from_pb(spec, plan)?;
        let target_runner = if spec.runner.is_empty() {
            String::new()
        } else {
            self.store
                .runner_by_name(&caller.id, &spec.runner)
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!("runner: you have no runner '{}'", spec.runner))
                })?
                .id
        };
        let sha256 = Sha256::parse(bundle_sha256)?;
        let bundle = self
            .blobs
            .head(&bundle_key(&caller.id, &sha256)?)
            .await?
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "no bundle {sha256} was uploaded: ask for an upload URL first (CreateUpload)"
                ))
            })?;
        for name in &spec.secrets {
            if self.secrets.value(&caller.id, name).await?.is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "secrets: you have no secret {name}; set it with `gractl secret set {name}`"
                )));
            }
        }
        let now = now_ms();
        let mut job = store::Job {
            id: new_id(),
            owner_id: caller.id.clone(),
            owner_name: caller.name.clone(),
            name: spec.name.clone(),
            spec: spec.to_json()?,
            bundle_sha256: sha256.to_string(),
            bundle_size: bundle.size,
            gpus: spec.gpus,
            needs_docker: !spec.image.is_empty(),
            target_runner,
            state: JobState::Queued,
            reason: String::new(),
            exit_code: None,
            attempt: 0,
            max_attempts: 1 + spec.retries,
            worker_id: None,
            worker_name: String::new(),
            lease_expires_at: None,
            cancelled_by: String::new(),
            created_at: now,
            started_at: None,
            finished_at: None,
            updated_at: now,
        };
        // A clash of random ids is as good as impossible; one more try costs nothing.
        if let Err(e) = self.store.insert_job(&job).await {
            tracing::warn!(error = %e, "inserting a job; trying another id");
            job.id = new_id();
            self.store.insert_job(&job).await?;
        }
        tracing::info!(job = %job.id, name = %job.name, owner = %caller.name, "job queued");
        self.bump_queue();
        Ok(job)
    }

    /// The caller's job by id or unique id prefix (admins: anyone's by id).
    pub async fn get(&self, caller: &UserCaller, id: &str) -> Result<store::Job> {
        let not_found = || Error::NotFound(format!("job '{id}' not found"));
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(not_found());
        }
        if let Some(job) = self.store.job(id).await?
            && (job.owner_id == caller.id || caller.is_admin())
        {
            return Ok(job);
        }
        if id.len() < 4 {
            return Err(Error::InvalidArgument(format!(
                "job id '{id}': give at least 4 characters of it"
            )));
        }
        let mut found = self.store.jobs_with_prefix(&caller.id, id).await?;
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(not_found()),
            _ => Err(Error::InvalidArgument(format!(
                "job id '{id}' is ambiguous: give more of it"
            ))),
        }
    }

    pub async fn list(
        &self,
        caller: &UserCaller,
        all_users: bool,
        limit: u32,
    ) -> Result<Vec<store::Job>> {
        if all_users && !caller.is_admin() {
            return Err(Error::PermissionDenied(
                "only admins can list every user's jobs".into(),
            ));
        }
        let limit = if limit == 0 {
            DEFAULT_LIST
        } else {
            limit.min(1000)
        };
        let owner = (!all_users).then_some(caller.id.as_str());
        self.store.list_jobs(owner, limit).await
    }

    pub async fn cancel(&self, caller: &UserCaller, id: &str) -> Result<store::Job> {
        let job = self.get(caller, id).await?;
        let reason = format!("cancelled by {}", caller.name);
        match job.state {
            JobState::Queued => {
                if self
                    .store
                    .cancel_queued(&job.id, &reason, &caller.name)
                    .await?
                {
                    tracing::info!(job = %job.id, by = %caller.name, "job cancelled");
                }
            }
            JobState::Running => {
                if self.store.request_cancel(&job.id, &caller.name).await? {
                    tracing::info!(job = %job.id, by = %caller.name, "job cancel requested");
                }
            }
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => return Ok(job),
        }
        self.bump();
        self.store
            .job(&job.id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("job '{id}' not found")))
    }

    /// Waits until the job has ended, at most `timeout`.
    pub async fn wait(
        &self,
        caller: &UserCaller,
        id: &str,
        timeout: Duration,
    ) -> Result<store::Job> {
        let job = self.get(caller, id).await?;
        let mut changed = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changed.mark_unchanged();
            let job = self
                .store
                .job(&job.id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("job '{id}' not found")))?;
            if job.state.is_terminal() {
                return Ok(job);
            }
            let woke = tokio::select! {
                woke = tokio::time::timeout_at(deadline, changed.changed()) => woke,
                // Waiters come back to the next grad.
                _ = self.shutdown.cancelled() => {
                    return Err(Error::Unavailable("grad is shutting down; wait again".into()));
                }
            };
            if woke.is_err() {
                return Err(Error::DeadlineExceeded(format!(
                    "job {} is still {} after {}",
                    job.id,
                    job.state,
                    human(timeout)
                )));
            }
        }
    }

    fn can_run(runs: &Runs, job: &store::Job, spec: &Spec) -> bool {
        let worker = &runs.worker;
        // A job's own pod runs in the job's image: no Docker needed there.
        let in_image = worker.labels.get(JOB_POD_LABEL) == Some(&job.id);
        (worker.shared || worker.owner_id == job.owner_id)
            && (job.target_runner.is_empty() || job.target_runner == worker.id)
            && spec.gpus <= runs.capabilities.gpus
            && (spec.image.is_empty() || runs.capabilities.docker || in_image)
            && spec
                .labels
                .iter()
                .all(|(k, v)| worker.labels.get(k).is_some_and(|have| have == v))
    }

    /// Claims the oldest queued job `runs` can run, waiting up to `wait`
    /// for one to come.
    pub async fn claim(
        &self,
        runs: &Runs,
        only: Option<&str>,
        wait: Duration,
    ) -> Result<Option<Claimed>> {
        // A job pod's worker runs its one job and nothing else.
        if let Some(own) = runs.worker.labels.get(JOB_POD_LABEL)
            && only != Some(own.as_str())
        {
            return Ok(None);
        }
        if let Some(id) = only {
            // One job, there or not: a job pod has nothing else to wait for.
            let page = self.store.job(id).await?.into_iter();
            return self
                .claim_from(
                    runs,
                    page.filter(|j| j.state == store::JobState::Queued)
                        .collect(),
                )
                .await;
        }
        let deadline = tokio::time::Instant::now() + wait.min(MAX_CLAIM_WAIT);
        let mut changed = self.bus.subscribe(Topic::Queue);
        let owner = (!runs.worker.shared).then_some(runs.worker.owner_id.as_str());
        let caps = &runs.capabilities;
        loop {
            changed.mark_unchanged();
            // Page through what this worker could run: jobs it cannot (a
            // label it lacks) never hide the ones behind them.
            let mut after: Option<(i64, String)> = None;
            loop {
                let page = self
                    .store
                    .queued_jobs(
                        owner,
                        caps.gpus,
                        caps.docker,
                        runs.runner.then_some(runs.worker.id.as_str()),
                        after.as_ref().map(|(t, id)| (*t, id.as_str())),
                        CLAIM_SCAN,
                    )
                    .await?;
                let full = page.len() as u32 == CLAIM_SCAN;
                after = page.last().map(|j| (j.created_at, j.id.clone()));
                if let Some(claimed) = self.claim_from(runs, page).await? {
                    return Ok(Some(claimed));
                }
                if !full {
                    break;
                }
            }
            tokio::select! {
                woke = tokio::time::timeout_at(deadline, changed.changed()) => {
                    if woke.is_err() {
                        return Ok(None);
                    }
                }
                _ = self.shutdown.cancelled() => return Ok(None),
            }
        }
    }

    /// Claims the first job of `page` the worker can run.
    async fn claim_from(&self, runs: &Runs, page: Vec<store::Job>) -> Result<Option<Claimed>> {
        for job in page {
            let spec = Spec::from_json(&job.spec)?;
            if !Self::can_run(runs, &job, &spec) {
                continue;
            }
            let lease_until = now_ms() + self.timing.lease.as_millis() as i64;
            if !self
                .store
                .claim_job(&job.id, job.attempt, &runs.worker, lease_until)
                .await?
            {
                continue; // another worker was faster
            }
            let attempt = job.attempt + 1;
            tracing::info!(job = %job.id, attempt, worker = %runs.worker.name, "job claimed");
            self.bump();
            match self.hand_over(job, spec).await {
                Ok(claimed) => return Ok(Some(claimed)),
                Err((job, why)) => {
                    // Nothing a retry would change: the job fails now.
                    self.store
                        .end_attempt(&job.id, attempt, None, JobState::Failed, &why, None)
                        .await?;
                    tracing::warn!(job = %job.id, reason = %why, "job failed before it ran");
                    self.bump();
                }
            }
        }
        Ok(None)
    }

    /// What the worker needs for a job just claimed; the error is why the
    /// job cannot run at all.
    async fn hand_over(
        &self,
        mut job: store::Job,
        spec: Spec,
    ) -> std::result::Result<Claimed, (store::Job, String)> {
        let prepared =
            async {
                let sha256 = Sha256::parse(&job.bundle_sha256)?;
                let bundle = self
                    .blobs
                    .presign_get(&bundle_key(&job.owner_id, &sha256)?, URL_EXPIRY)
                    .await?;
                let mut secrets = HashMap::new();
                for name in &spec.secrets {
                    let value = self.secrets.value(&job.owner_id, name).await?.ok_or_else(
                        || {
                            Error::FailedPrecondition(format!(
                                "secret {name} no longer exists (it was deleted after the job was \
                         submitted)"
                            ))
                        },
                    )?;
                    secrets.insert(name.clone(), value);
                }
                Ok::<_, Error>((bundle, secrets))
            };
        match prepared.await {
            Ok((bundle, secrets)) => {
                job.attempt += 1;
                job.state = JobState::Running;
                Ok(Claimed {
                    job,
                    spec,
                    bundle,
                    secrets,
                    renew_every: self.timing.lease / 3,
                })
            }
            Err(e) => Err((job, e.to_string())),
        }
    }

    /// The worker's running attempt of job `id`.
    pub async fn attempt_of(&self, runs: &Runs, id: &str, attempt: u32) -> Result<store::Job> {
        let job = self
            .store
            .job(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("job '{id}' not found")))?;
        if job.state != JobState::Running
            || job.attempt != attempt
            || job.worker_id.as_deref() != Some(runs.worker.id.as_str())
        {
            return Err(lost(&job, attempt));
        }
        Ok(job)
    }

    /// Keeps the lease; answers who cancelled the job, if anyone did.
    pub async fn renew(&self, runs: &Runs, id: &str, attempt: u32) -> Result<Option<String>> {
        let lease_until = now_ms() + self.timing.lease.as_millis() as i64;
        match self
            .store
            .renew_lease(id, attempt, &runs.worker.id, lease_until)
            .await?
        {
            Some(by) => Ok((!by.is_empty()).then_some(by)),
            None => {
                let job = self.store.job(id).await?;
                Err(match job {
                    Some(job) => lost(&job, attempt),
                    None => Error::NotFound(format!("job '{id}' not found")),
                })
            }
        }
    }

    /// Where to upload the attempt's whole log (None: grad has it).
    pub async fn create_log_upload(
        &self,
        runs: &Runs,
        id: &str,
        attempt: u32,
        sha256: &str,
    ) -> Result<Option<Presigned>> {
        let job = self.attempt_of(runs, id, attempt).await?;
        let sha256 = Sha256::parse(sha256)?;
        let key = log_key(&job.owner_id, &sha256)?;
        if self.blobs.head(&key).await?.is_some() {
            return Ok(None);
        }
        Ok(Some(
            self.blobs.presign_put(&key, sha256, URL_EXPIRY).await?,
        ))
    }

    /// Ends the worker's attempt: the job succeeds, fails, is cancelled,
    /// or goes back to the queue for another attempt.
    pub async fn finish(
        &self,
        runs: &Runs,
        id: &str,
        attempt: u32,
        outcome: Outcome,
        log: Option<UploadedLog>,
    ) -> Result<store::Job> {
        let job = self.attempt_of(runs, id, attempt).await?;
        let spec = Spec::from_json(&job.spec)?;
        if let Some(log) = log {
            let sha256 = Sha256::parse(&log.sha256)?;
            let stored = self.blobs.head(&log_key(&job.owner_id, &sha256)?).await?;
            if stored.is_none_or(|o| o.size != log.size) {
                return Err(Error::FailedPrecondition(format!(
                    "the log of attempt {attempt} ({}) is not in the blob store: upload it first",
                    log.sha256
                )));
            }
            self.store
                .archive_log(&job.id, attempt, &log.sha256, log.size, log.lines)
                .await?;
        }
        let (mut state, mut reason, exit_code) = match &outcome {
            Outcome::Exited(0) => (JobState::Succeeded, "exit code 0".to_owned(), Some(0)),
            Outcome::Exited(code) => (JobState::Failed, format!("exit code {code}"), Some(*code)),
            Outcome::TimedOut => (
                JobState::Failed,
                format!(
                    "timed out after {}",
                    human(Duration::from_millis(spec.timeout_ms))
                ),
                None,
            ),
            Outcome::Cancelled => {
                let by = if job.cancelled_by.is_empty() {
                    "its worker"
                } else {
                    &job.cancelled_by
                };
                (JobState::Cancelled, format!("cancelled by {by}"), None)
            }
            Outcome::Error(why) => (JobState::Failed, why.clone(), None),
        };
        let retryable = matches!(outcome, Outcome::Exited(_) | Outcome::TimedOut);
        if state == JobState::Failed && retryable && attempt < job.max_attempts {
            reason = format!(
                "attempt {attempt} of {} failed ({reason}); queued again",
                job.max_attempts
            );
            state = JobState::Queued;
        }
        if !self
            .store
            .end_attempt(
                &job.id,
                attempt,
                Some(&runs.worker.id),
                state,
                &reason,
                exit_code,
            )
            .await?
        {
            return Err(lost(&job, attempt));
        }
        tracing::info!(job = %job.id, attempt, %state, %reason, "job attempt ended");
        if state == JobState::Queued {
            self.bump_queue();
        } else {
            self.bump();
        }
        self.store
            .job(&job.id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("job '{id}' not found")))
    }

    /// Puts back (or fails) the attempts whose lease ran out.
    pub async fn expire_leases(&self) -> Result<()> {
        for job in self.store.expired_leases(now_ms()).await? {
            let worker = &job.worker_name;
            let (state, reason) = if job.attempt < job.max_attempts {
                (
                    JobState::Queued,
                    format!(
                        "attempt {} lost: worker {worker} stopped renewing its lease; queued again",
                        job.attempt
                    ),
                )
            } else {
                (
                    JobState::Failed,
                    format!(
                        "lost: worker {worker} stopped renewing its lease (attempt {} of {})",
                        job.attempt, job.max_attempts
                    ),
                )
            };
            if self
                .store
                .end_attempt(&job.id, job.attempt, None, state, &reason, None)
                .await?
            {
                tracing::warn!(job = %job.id, attempt = job.attempt, %reason, "job lease expired");
                if state == JobState::Queued {
                    self.bump_queue();
                } else {
                    self.bump();
                }
            }
        }
        Ok(())
    }

    /// Watches leases until shutdown. At start, running attempts get a
    /// whole lease to be renewed: their workers may have been waiting for
    /// this grad to come back.
    pub async fn run_monitor(self: Arc<Self>) {
        let until = now_ms() + self.timing.lease.as_millis() as i64;
        match self.store.extend_leases(until).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "leases of running jobs extended after a restart"),
            Err(e) => tracing::error!(error = %e, "extending leases"),
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            if let Err(e) = self.expire_leases().await {
                tracing::error!(error = %e, "expiring job leases");
            }
        }
    }
}

fn lost(job: &store::Job, attempt: u32) -> Error {
    Error::FailedPrecondition(format!(
        "attempt {attempt} of job {} is no longer this worker's (the job is {}, attempt {}): \
         stop it",
        job.id, job.state, job.attempt
    ))
}
