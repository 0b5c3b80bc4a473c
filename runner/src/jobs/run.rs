//! One attempt of a claimed job, start to end: the bundle fetched by
//! presigned URL (SHA-256 checked) and unpacked safely into a fresh
//! directory; the command run there with `sh -c` as a process group, with
//! the job's env, its secrets and its GPUs in the environment (never in
//! argv, never in the log: values are redacted); the lease renewed while it
//! runs (a cancel arrives that way); stopped on cancel or timeout (SIGTERM,
//! then SIGKILL); then the log uploaded and the outcome reported.
//!
//! If grad takes the attempt back (its lease ran out), the process is
//! killed and nothing is reported: the attempt is no longer ours.

use std::{
    collections::HashMap,
    path::Path,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use grad_proto::{
    ClaimedJob, CreateLogUploadRequest, FinishJobRequest, JobOutcome, LogStream, RenewLeaseRequest,
    worker_agent_client::WorkerAgentClient,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    process::Child,
};
use tokio_util::sync::CancellationToken;

use super::{
    Worker,
    logs::{Log, Redactor},
};

/// How long a stopped job has between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Output read per call; a line longer than [`crate::jobs::logs`]' limit
/// is cut into several.
const READ_CHUNK: usize = 16 << 10;
const MAX_LINE: usize = 64 << 10;
/// How long the worker keeps trying to report an attempt grad cannot hear.
const REPORT_FOR: Duration = Duration::from_secs(600);

/// How the attempt ended, as the worker tells grad.
pub(super) enum Ended {
    Exited(i32),
    TimedOut,
    Cancelled,
    Error(String),
    /// Not ours to report: the lease was lost, or the worker is stopping
    /// (grad will give the job to another worker when the lease runs out).
    Abandoned,
}

/// Runs one attempt and reports it.
pub async fn attempt(worker: Arc<Worker>, job: ClaimedJob, stopping: CancellationToken) {
    let id = job.id.clone();
    let attempt = job.attempt;
    let name = job
        .spec
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    tracing::info!(job = %id, attempt, %name, "attempt started");
    let base = worker.work_dir.join(format!("{id}-{attempt}"));
    let dir = base.join("job");
    let log_path = worker.work_dir.join(format!("{id}-{attempt}.log.ndjson"));
    let redactor = Redactor::new(job.secrets.values().cloned());
    let log = match Log::create(&log_path, attempt, redactor) {
        Ok(log) => log,
        Err(e) => {
            let error = format!("the worker cannot write the job's log: {e}");
            report(&worker, &id, attempt, Ended::Error(error), None).await;
            return;
        }
    };
    let lost = CancellationToken::new();
    let cancel = CancellationToken::new();
    let renew_every = Duration::from_millis(job.renew_interval_ms.max(100).into());
    let renewer = tokio::spawn(renew(
        worker.clone(),
        id.clone(),
        attempt,
        renew_every,
        cancel.clone(),
        lost.clone(),
    ));
    let shipper = tokio::spawn(log.clone().ship(
        worker.channel.clone(),
        worker.auth.clone(),
        id.clone(),
        lost.clone(),
    ));
    let gpus = worker.take_gpus(job.spec.as_ref().map_or(0, |s| s.gpus));
    let ended = execute(
        &worker, &job, &base, &dir, &log, &gpus, &cancel, &lost, &stopping,
    )
    .await;
    worker.release_gpus(&gpus);
    let lines = log.close().unwrap_or_default();
    let ended = if lost.is_cancelled() {
        Ended::Abandoned
    } else {
        ended
    };
    let ended = match ended {
        Ended::Exited(_) | Ended::TimedOut | Ended::Cancelled => {
            collect_outputs(&worker, &job, &dir, ended).await
        }
        other => other,
    };
    if !matches!(ended, Ended::Abandoned) {
        // Every line reaches grad before the outcome does.
        let _ = shipper.await;
        let uploaded = upload_log(&worker, &id, attempt, &log_path, lines).await;
        report(&worker, &id, attempt, ended, uploaded).await;
    } else {
        shipper.abort();
        tracing::warn!(job = %id, attempt, "attempt abandoned");
    }
    renewer.abort();
    let _ = tokio::fs::remove_dir_all(&base).await;
}

/// The job's outputs directory inside `dir`, if it is there and is a real
/// directory all the way down: a symbolic link planted by the job (in a
/// container, say) must not make the worker read the host.
fn outputs_root(dir: &Path, outputs: &str) -> Result<Option<std::path::PathBuf>, String> {
    let mut at = dir.to_path_buf();
    for part in outputs.split('/').filter(|p| !p.is_empty() && *p != ".") {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "outputs: {} is a symbolic link; outputs are not collected through links",
                    at.strip_prefix(dir).unwrap_or(&at).display()
                ));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(format!("outputs: {outputs} is not a directory")),
            Err(_) => return Ok(None),
        }
    }
    Ok(Some(at))
}

/// Collects the job's outputs directory for this attempt. A job that
/// succeeded but whose outputs cannot be kept fails with the reason; a job
/// that failed keeps its own reason.
async fn collect_outputs(worker: &Worker, job: &ClaimedJob, dir: &Path, ended: Ended) -> Ended {
    let outputs = job
        .spec
        .as_ref()
        .map(|s| s.outputs.as_str())
        .unwrap_or("outputs");
    let result = match outputs_root(dir, outputs) {
        Ok(None) => return ended,
        Ok(Some(root)) => {
            let collector = crate::outputs::Collector::of(root, None, worker.http.clone());
            let sink = crate::outputs::Sink::job(
                worker.channel.clone(),
                worker.auth.header(),
                &job.id,
                job.attempt,
            );
            collector.collect(sink).await.map(|report| {
                tracing::info!(
                    job = %job.id, files = report.uploaded_files, bytes = report.uploaded_bytes,
                    "job outputs collected"
                );
            })
        }
        Err(why) => Err(why),
    };
    match (result, ended) {
        (Ok(()), ended) => ended,
        (Err(why), Ended::Exited(0)) => Ended::Error(format!(
            "the job exited 0 but its outputs were not kept: {why}"
        )),
        (Err(why), ended) => {
            tracing::warn!(job = %job.id, error = %why, "collecting the outputs of a failed job");
            ended
        }
    }
}

/// Renews the lease until aborted; `cancel` when grad says so, `lost` when
/// the attempt is no longer ours.
async fn renew(
    worker: Arc<Worker>,
    id: String,
    attempt: u32,
    every: Duration,
    cancel: CancellationToken,
    lost: CancellationToken,
) {
    let mut client = WorkerAgentClient::new(worker.channel.clone());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let request = worker.auth.request(RenewLeaseRequest {
            id: id.clone(),
            attempt,
        });
        match client.renew_lease(request).await {
            Ok(response) => {
                let response = response.into_inner();
                if response.cancel && !cancel.is_cancelled() {
                    tracing::info!(job = %id, reason = %response.reason, "job cancelled");
                    cancel.cancel();
                }
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::NotFound
                ) =>
            {
                tracing::warn!(job = %id, %status, "lease lost");
                lost.cancel();
                return;
            }
            // grad away (restarting): it extends leases when it is back.
            Err(status) => tracing::debug!(job = %id, %status, "renewing the lease"),
        }
    }
}

/// What every job sees besides its own env: who it is.
pub(super) fn job_variables(job: &ClaimedJob) -> HashMap<String, String> {
    let mut env = HashMap::new();
    if let Some(spec) = &job.spec {
        env.extend(spec.env.clone());
        env.insert("GRAD_JOB_NAME".into(), spec.name.clone());
    }
    env.insert("GRAD_JOB_ID".into(), job.id.clone());
    env.insert("GRAD_JOB_ATTEMPT".into(), job.attempt.to_string());
    env
}

/// The environment of a job's process: the worker's own, less grad's
/// variables (the worker's token among them), plus the job's, its secrets
/// and its GPUs.
fn environment(job: &ClaimedJob, gpus: &[usize]) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = std::env::vars()
        .filter(|(name, _)| !name.starts_with("GRAD_"))
        .collect();
    env.extend(job_variables(job));
    env.extend(job.secrets.clone());
    let visible: Vec<String> = gpus.iter().map(ToString::to_string).collect();
    env.insert("CUDA_VISIBLE_DEVICES".into(), visible.join(","));
    env
}

#[allow(clippy::too_many_arguments)] // the attempt's pieces, each used once
async fn execute(
    worker: &Worker,
    job: &ClaimedJob,
    base: &Path,
    dir: &Path,
    log: &Arc<Log>,
    gpus: &[usize],
    cancel: &CancellationToken,
    lost: &CancellationToken,
    stopping: &CancellationToken,
) -> Ended {
    let Some(spec) = &job.spec else {
        return Ended::Error("grad sent no spec".into());
    };
    let Some(bundle_url) = &job.bundle else {
        return Ended::Error("grad sent no bundle URL".into());
    };
    if let Err(e) = tokio::fs::create_dir_all(base).await {
        return Ended::Error(format!("the worker cannot make the job's directory: {e}"));
    }
    let bundle = base.join("bundle.tar.gz");
    if let Err(e) = worker
        .http
        .get_file(
            bundle_url,
            &bundle,
            job.bundle_size,
            &job.bundle_sha256,
            None,
            None,
        )
        .await
    {
        return Ended::Error(format!("downloading the bundle: {e}"));
    }
    let unpacked = {
        let (bundle, dir) = (bundle.clone(), dir.to_owned());
        tokio::task::spawn_blocking(move || {
            let file =
                std::fs::File::open(&bundle).map_err(|e| format!("reading the bundle: {e}"))?;
            grad_bundle::extract(file, &dir, grad_bundle::Limits::default())
                .map_err(|e| format!("the bundle was refused: {e}"))
        })
        .await
    };
    match unpacked {
        Ok(Ok(_)) => {}
        Ok(Err(why)) => return Ended::Error(why),
        Err(e) => return Ended::Error(format!("unpacking the bundle: {e}")),
    }
    let _ = tokio::fs::remove_file(&bundle).await;

    let timeout = (spec.timeout_ms > 0).then(|| Duration::from_millis(spec.timeout_ms));
    let stops = Stops {
        cancel,
        lost,
        stopping,
        deadline: timeout.map(|t| tokio::time::Instant::now() + t),
    };
    let started = Instant::now();
    let ended = if spec.image.is_empty() || worker.in_image {
        run_process(job, dir, log, gpus, &stops).await
    } else {
        match &worker.docker {
            Some(docker) => docker.run(job, base, dir, log, gpus, &stops).await,
            None => Ended::Error(format!(
                "this worker has no Docker engine for image {}",
                spec.image
            )),
        }
    };
    tracing::info!(job = %job.id, attempt = job.attempt, elapsed = ?started.elapsed(), "job ended");
    ended
}

/// What ends an attempt besides its own exit.
pub(super) struct Stops<'a> {
    pub cancel: &'a CancellationToken,
    pub lost: &'a CancellationToken,
    pub stopping: &'a CancellationToken,
    pub deadline: Option<tokio::time::Instant>,
}

impl Stops<'_> {
    /// Resolves when one of them happens, with how the attempt then ends.
    pub(super) async fn fired(&self) -> Ended {
        tokio::select! {
            _ = self.cancel.cancelled() => Ended::Cancelled,
            _ = sleep_until(self.deadline) => Ended::TimedOut,
            _ = self.lost.cancelled() => Ended::Abandoned,
            _ = self.stopping.cancelled() => Ended::Abandoned,
        }
    }
}

/// The command as a process group on this machine.
async fn run_process(
    job: &ClaimedJob,
    dir: &Path,
    log: &Arc<Log>,
    gpus: &[usize],
    stops: &Stops<'_>,
) -> Ended {
    let command = job
        .spec
        .as_ref()
        .map(|s| s.command.as_str())
        .unwrap_or_default();
    let mut child = match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .env_clear()
        .envs(environment(job, gpus))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return Ended::Error(format!("starting `sh -c` for the command: {e}")),
    };
    let pid = child.id();
    let stdout = child
        .stdout
        .take()
        .map(|out| tokio::spawn(pump(out, log.clone(), LogStream::Stdout)));
    let stderr = child
        .stderr
        .take()
        .map(|err| tokio::spawn(pump(err, log.clone(), LogStream::Stderr)));
    let ended = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => Ended::Exited(exit_code(status)),
            Err(e) => Ended::Error(format!("waiting for the job's process: {e}")),
        },
        ended = stops.fired() => {
            stop(&mut child, pid).await;
            ended
        }
    };
    // What the process wrote before it ended; a leftover background process
    // holding the pipes does not keep the attempt open.
    for pump in [stdout, stderr].into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
    }
    ended
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// SIGTERM to the job's process group, then SIGKILL after the grace.
async fn stop(child: &mut Child, pid: Option<u32>) {
    use rustix::process::{Pid, Signal, kill_process_group};
    let group = pid.and_then(|p| Pid::from_raw(p as i32));
    if let Some(group) = group {
        let _ = kill_process_group(group, Signal::TERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        if let Some(group) = group {
            let _ = kill_process_group(group, Signal::KILL);
        }
        let _ = child.wait().await;
    }
}

/// Cuts a byte stream into log lines: at each newline, and every
/// [`MAX_LINE`] bytes of a line that has none.
#[derive(Default)]
pub(super) struct Lines {
    line: Vec<u8>,
}

impl Lines {
    pub(super) fn feed(&mut self, bytes: &[u8], log: &Log, stream: LogStream) {
        for &byte in bytes {
            if byte == b'\n' {
                log.push(stream, &String::from_utf8_lossy(&self.line));
                self.line.clear();
            } else {
                self.line.push(byte);
                if self.line.len() >= MAX_LINE {
                    log.push(stream, &String::from_utf8_lossy(&self.line));
                    self.line.clear();
                }
            }
        }
    }

    pub(super) fn finish(&mut self, log: &Log, stream: LogStream) {
        if !self.line.is_empty() {
            log.push(stream, &String::from_utf8_lossy(&self.line));
            self.line.clear();
        }
    }
}

/// Reads one of the process's pipes into log lines.
async fn pump(mut pipe: impl AsyncRead + Unpin, log: Arc<Log>, stream: LogStream) {
    let mut buffer = vec![0u8; READ_CHUNK];
    let mut lines = Lines::default();
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => lines.feed(&buffer[..n], &log, stream),
        }
    }
    lines.finish(&log, stream);
}

/// Uploads the attempt's whole log; answers (sha256, size, lines) if grad
/// has it afterwards.
async fn upload_log(
    worker: &Worker,
    id: &str,
    attempt: u32,
    path: &Path,
    lines: u32,
) -> Option<(String, u64, u32)> {
    let digest = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || grad_transfer::hash_file(&path, None))
            .await
            .ok()?
            .ok()?
    };
    let mut client = WorkerAgentClient::new(worker.channel.clone());
    let request = worker.auth.request(CreateLogUploadRequest {
        id: id.to_owned(),
        attempt,
        sha256: digest.sha256.clone(),
        size: digest.size,
    });
    let upload = match client.create_log_upload(request).await {
        Ok(response) => response.into_inner().upload,
        Err(status) => {
            tracing::warn!(job = %id, %status, "no URL for the job's log; its lines stay in grad");
            return None;
        }
    };
    if let Some(put) = upload
        && let Err(e) = worker.http.put_file(&put, path, 0, digest.size, None).await
    {
        tracing::warn!(job = %id, error = %e, "uploading the job's log; its lines stay in grad");
        return None;
    }
    Some((digest.sha256, digest.size, lines))
}

/// Tells grad how the attempt ended, trying again while grad is away.
async fn report(
    worker: &Worker,
    id: &str,
    attempt: u32,
    ended: Ended,
    log: Option<(String, u64, u32)>,
) {
    let (outcome, exit_code, error) = match ended {
        Ended::Exited(code) => (JobOutcome::Exited, code, String::new()),
        Ended::TimedOut => (JobOutcome::TimedOut, 0, String::new()),
        Ended::Cancelled => (JobOutcome::Cancelled, 0, String::new()),
        Ended::Error(why) => (JobOutcome::Error, 0, why),
        Ended::Abandoned => return,
    };
    let (log_sha256, log_size, log_lines) = log.unwrap_or_default();
    let message = FinishJobRequest {
        id: id.to_owned(),
        attempt,
        outcome: outcome as i32,
        exit_code,
        error,
        log_sha256,
        log_size,
        log_lines,
    };
    let mut client = WorkerAgentClient::new(worker.channel.clone());
    let started = Instant::now();
    loop {
        match client
            .finish_job(worker.auth.request(message.clone()))
            .await
        {
            Ok(response) => {
                let job = response.into_inner();
                tracing::info!(job = %id, attempt, reason = %job.reason, "attempt reported");
                return;
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition
                        | tonic::Code::NotFound
                        | tonic::Code::InvalidArgument
                ) =>
            {
                tracing::warn!(job = %id, attempt, %status, "grad would not take the outcome");
                return;
            }
            Err(status) if started.elapsed() < REPORT_FOR => {
                tracing::debug!(job = %id, %status, "reporting the outcome; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => {
                tracing::error!(job = %id, %status, "gave up reporting the outcome");
                return;
            }
        }
    }
}
