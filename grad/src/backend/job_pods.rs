//! Jobs on Kubernetes: a queued job can run as its own Pod. For each queued
//! job that names no runner and asks for no worker labels, once it has
//! waited `delay` (so standing workers, which long-poll, take theirs
//! first), grad makes a worker of the job's owner's for this one attempt
//! (labelled with the job's id, its token in a Secret) and a Pod that runs
//! `grad-runner agent --job ID` with it: in the runner image, or in the
//! job's own `image` with grad-runner copied in by an init container from
//! the runner image. That agent claims exactly this job (grad refuses it
//! any other), runs the command as a process in the Pod, streams its log
//! like any worker, and exits. GPUs are the device plugin's
//! `nvidia.com/gpu`; cpu and memory are the job's.
//!
//! The dispatcher is level-triggered too: every pass lists the job Pods
//! and the queue and makes them agree. A Pod whose attempt ended (or whose
//! job ended, or was taken by another worker) goes, with its Secret and its
//! worker; a Pod that could not start before claiming (an image that
//! cannot be pulled) fails its job with the cluster's reason; a job queued
//! again for a retry gets a new Pod.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
    Secret, SecretVolumeSource, Volume, VolumeMount,
};
use kube::api::{DeleteParams, ListParams};
use tokio_util::sync::CancellationToken;

use super::kubernetes::{
    Kubernetes, MANAGED_BY, OWNER_ID, OWNER_NAME, Seen, TOKEN_DIR, gpu_tolerations, quantity, seen,
};
use crate::{
    auth::Keys,
    error::Result,
    jobs::{JOB_POD_LABEL, Spec},
    replicas::{Bus, Topic},
    store::{self, JobState, Store, now_ms},
};

pub const JOB_ID: &str = "grad.dev/job-id";
pub const JOB_ATTEMPT: &str = "grad.dev/job-attempt";
const SELECTOR: &str = "app.kubernetes.io/managed-by=grad,grad.dev/job-id";
/// Where the job Pod keeps grad-runner (copied in) and the job's files.
const GRAD_DIR: &str = "/grad";
/// grad-runner in the runner image.
const RUNNER_BIN: &str = "/usr/local/bin/grad-runner";
const PASS_EVERY: Duration = Duration::from_secs(1);

pub struct JobPods {
    kube: Arc<Kubernetes>,
    store: Store,
    keys: Keys,
    bus: Arc<Bus>,
    /// How long a job waits for a standing worker before it gets a Pod.
    delay: Duration,
}

pub fn pod_name(job_id: &str, attempt: u32) -> String {
    format!("job-{job_id}-{attempt}")
}

fn secret_name(job_id: &str, attempt: u32) -> String {
    format!("job-{job_id}-{attempt}-token")
}

/// The job, attempt and owner a job Pod's (or Secret's) labels name.
fn attempt_of<K: kube::Resource>(object: &K) -> Option<(String, u32, String)> {
    let labels = object.meta().labels.as_ref()?;
    Some((
        labels.get(JOB_ID)?.clone(),
        labels.get(JOB_ATTEMPT)?.parse().ok()?,
        labels.get(OWNER_ID)?.clone(),
    ))
}

impl JobPods {
    pub fn new(
        kube: Arc<Kubernetes>,
        store: Store,
        keys: Keys,
        bus: Arc<Bus>,
        delay: Duration,
    ) -> JobPods {
        JobPods {
            kube,
            store,
            keys,
            bus,
            delay,
        }
    }

    /// Makes the job Pods agree with the queue until `shutdown`: after
    /// every change to the queue, and every second (jobs waiting out the
    /// delay, Pods changing).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut queue = self.bus.subscribe(Topic::Queue);
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "job pods");
            }
            tokio::select! {
                _ = queue.changed() => {}
                _ = tokio::time::sleep(PASS_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn pass(&self) -> Result<()> {
        let params = ListParams::default().labels(SELECTOR);
        let pods = self
            .kube
            .api::<Pod>()
            .list(&params)
            .await
            .map_err(super::kubernetes::kube_error("listing job pods"))?;
        // Job id -> the attempt its live Pod is for.
        let mut live: HashMap<String, u32> = HashMap::new();
        let mut pod_names: HashSet<String> = HashSet::new();
        for pod in pods.items {
            let Some((job_id, attempt, owner_id)) = attempt_of(&pod) else {
                continue;
            };
            pod_names.insert(pod_name(&job_id, attempt));
            // One Pod's trouble is not every job's.
            match self.settle(&pod, &job_id, attempt, &owner_id).await {
                Ok(true) => {
                    live.insert(job_id, attempt);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(job = %job_id, attempt, error = %e, "job pod"),
            }
        }
        self.collect_secrets(&pod_names).await?;

        let now = now_ms();
        let mut after: Option<(i64, String)> = None;
        loop {
            let page = self
                .store
                .queued_jobs(
                    None,
                    u32::MAX,
                    true,
                    None,
                    after.as_ref().map(|(t, id)| (*t, id.as_str())),
                    64,
                )
                .await?;
            let full = page.len() == 64;
            after = page.last().map(|j| (j.created_at, j.id.clone()));
            for job in page {
                let attempt = job.attempt + 1;
                if live.get(&job.id) == Some(&attempt)
                    || !job.target_runner.is_empty()
                    || now - job.updated_at < self.delay.as_millis() as i64
                {
                    continue;
                }
                let started = match Spec::from_json(&job.spec) {
                    // Labels are for the workers that have them.
                    Ok(spec) if !spec.labels.is_empty() => Ok(()),
                    Ok(spec) => self.start(&job, &spec, attempt).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = started {
                    tracing::warn!(job = %job.id, attempt, error = %e, "cannot make the job's pod");
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Removes a job Pod that is done with; answers whether it stays (it
    /// is about to run, or running, its attempt).
    async fn settle(&self, pod: &Pod, job_id: &str, attempt: u32, owner_id: &str) -> Result<bool> {
        let job = self.store.job(job_id).await?;
        let ours = worker_name(job_id, attempt);
        let done = match (&job, seen(pod)) {
            (None, _) => true,
            (Some(job), _) if job.state.is_terminal() => true,
            // It cannot start: before it claimed, the job fails with the
            // cluster's words (an image that cannot be pulled stays so).
            (Some(job), Seen::Stuck(reason)) => {
                if job.state == JobState::Queued && job.attempt < attempt {
                    let why = format!("{}: {reason}", pod_name(job_id, attempt));
                    if self.store.fail_queued(job_id, &why).await? {
                        tracing::warn!(job = %job_id, reason = %why, "job failed before it started");
                        self.bus.bump(Topic::Jobs);
                    }
                }
                true
            }
            // It ended while its attempt ran (OOMKilled, evicted): the
            // attempt ends now, with the cluster's reason, rather than when
            // its lease runs out.
            (Some(job), Seen::Ended(reason))
                if job.state == JobState::Running
                    && job.attempt == attempt
                    && job.worker_name == ours =>
            {
                let pod = pod_name(job_id, attempt);
                let (state, why) = if job.attempt < job.max_attempts {
                    (
                        JobState::Queued,
                        format!("attempt {attempt} lost: its pod {pod}: {reason}; queued again"),
                    )
                } else {
                    (
                        JobState::Failed,
                        format!(
                            "its pod {pod}: {reason} (attempt {attempt} of {})",
                            job.max_attempts
                        ),
                    )
                };
                if self
                    .store
                    .end_attempt(job_id, attempt, None, state, &why, None)
                    .await?
                {
                    tracing::warn!(job = %job_id, attempt, reason = %why, "job pod ended mid-attempt");
                    if state == JobState::Queued {
                        self.bus.bump(Topic::Queue);
                    }
                    self.bus.bump(Topic::Jobs);
                }
                true
            }
            // It ended: its attempt is over (or was never claimed: evicted,
            // preempted; the next pass makes a new Pod for a queued job).
            (Some(_), Seen::Ended(_)) => true,
            // Another worker took this attempt: the agent finds nothing.
            (Some(job), _) => job.attempt >= attempt && job.worker_name != ours,
        };
        if done {
            self.remove(job_id, attempt, owner_id).await?;
        }
        Ok(!done)
    }

    /// Secrets of job Pods that are gone (deleted from outside, or a pass
    /// that died between the two), with their workers; a Secret is made
    /// just before its Pod, so only those older than a minute.
    async fn collect_secrets(&self, pod_names: &HashSet<String>) -> Result<()> {
        let params = ListParams::default().labels(SELECTOR);
        let secrets = self
            .kube
            .api::<Secret>()
            .list(&params)
            .await
            .map_err(super::kubernetes::kube_error("listing job secrets"))?;
        let cutoff =
            k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(60);
        for secret in secrets.items {
            let Some((job_id, attempt, owner_id)) = attempt_of(&secret) else {
                continue;
            };
            let old = secret
                .metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| t.0 < cutoff);
            if old && !pod_names.contains(&pod_name(&job_id, attempt)) {
                self.remove(&job_id, attempt, &owner_id).await?;
            }
        }
        Ok(())
    }

    /// Makes (or makes again: a pass that failed half-way, a Pod deleted
    /// from outside) the worker, Secret and Pod for `job`'s attempt
    /// `attempt`. Applying is idempotent, so two replicas doing it at once
    /// make one of each.
    async fn start(&self, job: &store::Job, spec: &Spec, attempt: u32) -> Result<()> {
        let name = worker_name(&job.id, attempt);
        let worker = match self.store.worker_by_name(&job.owner_id, &name).await? {
            Some(worker) => worker,
            None => {
                let worker = store::Worker {
                    id: uuid::Uuid::new_v4().to_string(),
                    owner_id: job.owner_id.clone(),
                    owner_name: job.owner_name.clone(),
                    name: name.clone(),
                    shared: false,
                    labels: BTreeMap::from([(JOB_POD_LABEL.to_owned(), job.id.clone())]),
                    token_id: uuid::Uuid::new_v4().to_string(),
                    created_at: now_ms(),
                    last_seen_at: 0,
                };
                if let Err(e) = self.store.insert_worker(&worker).await {
                    // Another replica's pass, a moment earlier.
                    match self.store.worker_by_name(&job.owner_id, &name).await? {
                        Some(theirs) => theirs,
                        None => return Err(e),
                    }
                } else {
                    worker
                }
            }
        };
        let token = self.keys.issue_worker(&worker.id, &worker.token_id)?;
        let settings = self.kube.settings();
        let meta = |name: String| k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name),
            namespace: Some(settings.namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.to_owned(), "grad".to_owned()),
                ("app.kubernetes.io/name".to_owned(), "grad-job".to_owned()),
                (JOB_ID.to_owned(), job.id.clone()),
                (JOB_ATTEMPT.to_owned(), attempt.to_string()),
                (OWNER_ID.to_owned(), job.owner_id.clone()),
            ])),
            annotations: Some(BTreeMap::from([
                (OWNER_NAME.to_owned(), job.owner_name.clone()),
                ("grad.dev/job".to_owned(), spec.name.clone()),
            ])),
            ..Default::default()
        };
        let secret = Secret {
            metadata: meta(secret_name(&job.id, attempt)),
            string_data: Some(BTreeMap::from([("token".to_owned(), token)])),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        self.kube
            .apply(&secret_name(&job.id, attempt), &secret)
            .await?;
        let pod = job_pod(
            job,
            spec,
            attempt,
            settings,
            meta(pod_name(&job.id, attempt)),
        );
        self.kube.apply(&pod_name(&job.id, attempt), &pod).await?;
        tracing::info!(job = %job.id, attempt, pod = %pod_name(&job.id, attempt), "job pod applied");
        Ok(())
    }

    /// The Pod, Secret and worker of one attempt go (the worker's token
    /// with it).
    async fn remove(&self, job_id: &str, attempt: u32, owner_id: &str) -> Result<()> {
        let params = DeleteParams::default();
        self.kube
            .delete::<Pod>(&pod_name(job_id, attempt), &params)
            .await?;
        self.kube
            .delete::<Secret>(&secret_name(job_id, attempt), &params)
            .await?;
        if let Some(worker) = self
            .store
            .worker_by_name(owner_id, &worker_name(job_id, attempt))
            .await?
        {
            self.store.delete_worker(&worker.id).await?;
        }
        tracing::info!(job = %job_id, attempt, "job pod removed");
        Ok(())
    }
}

/// The worker grad makes for a job's Pod.
pub fn worker_name(job_id: &str, attempt: u32) -> String {
    format!("pod-{job_id}-{attempt}")
}

/// The Pod of one attempt of `job`.
pub fn job_pod(
    job: &store::Job,
    spec: &Spec,
    attempt: u32,
    settings: &super::kubernetes::Settings,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Pod {
    let own_image = !spec.image.is_empty();
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    };
    let mut limits = BTreeMap::new();
    if spec.cpu_millis > 0 {
        limits.insert("cpu".to_owned(), quantity(format!("{}m", spec.cpu_millis)));
    }
    if spec.memory_bytes > 0 {
        limits.insert("memory".to_owned(), quantity(spec.memory_bytes));
    }
    if spec.gpus > 0 {
        limits.insert("nvidia.com/gpu".to_owned(), quantity(spec.gpus));
    }
    let binary = if own_image {
        format!("{GRAD_DIR}/bin/grad-runner")
    } else {
        RUNNER_BIN.to_owned()
    };
    let args = vec![
        "agent".to_owned(),
        "--server".to_owned(),
        settings.server_url.clone(),
        "--token-file".to_owned(),
        format!("{TOKEN_DIR}/token"),
        "--job".to_owned(),
        job.id.clone(),
        "--gpus".to_owned(),
        spec.gpus.to_string(),
        "--work-dir".to_owned(),
        format!("{GRAD_DIR}/work"),
    ];
    let job_container = Container {
        name: "job".into(),
        image: Some(if own_image {
            spec.image.clone()
        } else {
            settings.image.clone()
        }),
        image_pull_policy: settings.image_pull_policy.clone(),
        command: Some(vec![binary]),
        args: Some(args),
        resources: (!limits.is_empty()).then(|| ResourceRequirements {
            requests: Some(limits.clone()),
            limits: Some(limits),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount("grad", GRAD_DIR, false),
            mount("token", TOKEN_DIR, true),
        ]),
        ..Default::default()
    };
    // The job's own image need not have grad-runner: the runner image's
    // is copied in first.
    let init_containers = own_image.then(|| {
        vec![Container {
            name: "grad-runner".into(),
            image: Some(settings.image.clone()),
            image_pull_policy: settings.image_pull_policy.clone(),
            command: Some(vec![
                "sh".into(),
                "-c".into(),
                format!("mkdir -p {GRAD_DIR}/bin && cp {RUNNER_BIN} {GRAD_DIR}/bin/grad-runner"),
            ]),
            volume_mounts: Some(vec![mount("grad", GRAD_DIR, false)]),
            ..Default::default()
        }]
    });
    let tolerations = gpu_tolerations(spec.gpus);
    Pod {
        metadata,
        spec: Some(PodSpec {
            init_containers,
            containers: vec![job_container],
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            // The runner image's user; a job's own image runs as its own.
            security_context: (!own_image).then(|| PodSecurityContext {
                run_as_user: Some(1000),
                run_as_group: Some(1000),
                run_as_non_root: Some(true),
                fs_group: Some(1000),
                ..Default::default()
            }),
            tolerations,
            volumes: Some(vec![
                Volume {
                    name: "grad".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
                Volume {
                    name: "token".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(secret_name(&job.id, attempt)),
                        // Readable by whatever user the job's image runs as;
                        // the token can claim this one job only.
                        default_mode: Some(0o444),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}
