//! Jobs: grad-runner as a worker (`grad-runner agent`). It long-polls grad
//! for a job it can run (`WorkerAgent.ClaimJob`), runs each claimed attempt
//! ([`run`]) — bundle fetched by presigned URL and unpacked safely, secrets
//! in the environment only, the command as a process in the job's directory
//! or in a Docker container ([`docker`]),
//! lease renewed, log lines shipped ([`logs`]) — and reports how it ended.
//! It dials out, so it works from any machine that can reach grad.

pub mod docker;
pub mod logs;
pub mod run;

use std::{path::PathBuf, sync::Arc, time::Duration};

use grad_proto::{ClaimJobRequest, WorkerCapabilities, worker_agent_client::WorkerAgentClient};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
};

use crate::servers::{GradChannel, Servers};

/// How long one claim waits for work at grad.
const CLAIM_WAIT: Duration = Duration::from_secs(20);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid server URL '{url}': {reason}")]
    Url { url: String, reason: String },
    #[error("the worker token is not valid ASCII")]
    Token,
    #[error("grad refused this worker: {0}")]
    Refused(String),
    #[error("preparing {what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP client: {0}")]
    Http(#[from] grad_transfer::Error),
}

/// The authorization every call carries.
#[derive(Clone)]
pub struct Auth(MetadataValue<Ascii>);

impl Auth {
    pub fn new(token: &str) -> Result<Auth, Error> {
        format!("Bearer {}", token.trim())
            .parse()
            .map(Auth)
            .map_err(|_| Error::Token)
    }

    /// The header value itself, for clients that add it on their own.
    pub fn header(&self) -> MetadataValue<Ascii> {
        self.0.clone()
    }

    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        request
    }
}

pub struct Config {
    pub server: String,
    pub token: String,
    /// Where attempts get their directories and logs.
    pub work_dir: PathBuf,
    pub gpus: u32,
    /// Attempts run at once.
    pub max_jobs: usize,
    /// Look for a Docker engine (DOCKER_HOST or the default socket) for
    /// jobs with an image.
    pub docker: bool,
    /// Run this one job (in the image this agent runs in) and exit.
    pub only_job: Option<String>,
}

/// What every attempt shares.
pub struct Worker {
    pub channel: GradChannel,
    pub auth: Auth,
    pub http: grad_transfer::Client,
    pub work_dir: PathBuf,
    pub gpus: u32,
    pub docker: Option<docker::Docker>,
    /// GPUs in use by running attempts (indices).
    pub gpus_in_use: std::sync::Mutex<Vec<bool>>,
    /// This agent runs in the job's image (a job's own pod): a job with an
    /// image runs as a process here.
    pub in_image: bool,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Runs until `shutdown`: claims and runs jobs, `max_jobs` at a time. On
/// shutdown, running attempts are stopped and reported as such... only if
/// grad can be told; otherwise their leases run out and grad retries them.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    std::fs::create_dir_all(&config.work_dir).map_err(|source| Error::Setup {
        what: config.work_dir.display().to_string(),
        source,
    })?;
    let channel = Servers::parse(&config.server, |endpoint| {
        endpoint
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
    })
    .map_err(|e| Error::Url {
        url: e.url,
        reason: e.reason,
    })?
    .channel();
    let worker = Arc::new(Worker {
        channel,
        auth: Auth::new(&config.token)?,
        http: grad_transfer::Client::new()?,
        work_dir: config.work_dir,
        gpus: config.gpus,
        docker: if config.docker {
            docker::Docker::connect().await
        } else {
            None
        },
        gpus_in_use: std::sync::Mutex::new(vec![false; config.gpus as usize]),
        in_image: config.only_job.is_some(),
    });
    let capabilities = WorkerCapabilities {
        gpus: config.gpus,
        docker: worker.docker.is_some(),
        hostname: hostname(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    tracing::info!(
        server = %config.server, gpus = config.gpus, max_jobs = config.max_jobs,
        docker = capabilities.docker, "worker started"
    );
    let mut running: JoinSet<()> = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    let stopping = shutdown.child_token();
    loop {
        while running.len() >= config.max_jobs.max(1) {
            tokio::select! {
                _ = running.join_next() => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        let free_gpus = worker.free_gpus();
        let request = worker.auth.request(ClaimJobRequest {
            capabilities: Some(WorkerCapabilities {
                gpus: free_gpus,
                ..capabilities.clone()
            }),
            wait_ms: CLAIM_WAIT.as_millis() as u32,
            job_id: config.only_job.clone().unwrap_or_default(),
        });
        let mut client = WorkerAgentClient::new(worker.channel.clone());
        let claimed = tokio::select! {
            claimed = client.claim_job(request) => claimed,
            _ = shutdown.cancelled() => break,
            // A finished attempt frees capacity: ask again with it.
            Some(_) = running.join_next(), if !running.is_empty() => continue,
        };
        match claimed {
            Ok(response) => {
                backoff = Duration::from_millis(100);
                match (response.into_inner().job, &config.only_job) {
                    (Some(job), None) => {
                        running.spawn(run::attempt(worker.clone(), job, stopping.clone()));
                    }
                    // The one job: run it, then stop.
                    (Some(job), Some(_)) => {
                        run::attempt(worker.clone(), job, stopping.clone()).await;
                        break;
                    }
                    (None, Some(id)) => {
                        tracing::info!(job = %id, "the job is not there to run (taken, cancelled or gone)");
                        break;
                    }
                    (None, None) => {}
                }
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                stopping.cancel();
                while running.join_next().await.is_some() {}
                return Err(Error::Refused(status.message().to_owned()));
            }
            Err(status) => {
                tracing::debug!(%status, ?backoff, "cannot claim work; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    stopping.cancel();
    while running.join_next().await.is_some() {}
    tracing::info!("worker stopped");
    Ok(())
}

impl Worker {
    fn free_gpus(&self) -> u32 {
        let used = self.gpus_in_use.lock().unwrap_or_else(|p| p.into_inner());
        used.iter().filter(|u| !**u).count() as u32
    }

    /// Takes `n` free GPUs; answers their indices.
    fn take_gpus(&self, n: u32) -> Vec<usize> {
        let mut used = self.gpus_in_use.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken = Vec::new();
        for (index, busy) in used.iter_mut().enumerate() {
            if taken.len() as u32 == n {
                break;
            }
            if !*busy {
                *busy = true;
                taken.push(index);
            }
        }
        taken
    }

    fn release_gpus(&self, indices: &[usize]) {
        let mut used = self.gpus_in_use.lock().unwrap_or_else(|p| p.into_inner());
        for &index in indices {
            if let Some(busy) = used.get_mut(index) {
                *busy = false;
            }
        }
    }
}

/// GPUs this machine has, as `nvidia-smi -L` lists them (0 without it).
pub fn detect_gpus() -> u32 {
    std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count() as u32
        })
        .unwrap_or(0)
}
