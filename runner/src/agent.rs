//! The agent: dials out to grad (`RunnerAgent.Attach`), registers, sends
//! heartbeats, runs the code grad sends in the kernel sessions and streams
//! the events back, and serves tunnels: when grad asks, it dials back
//! (`RunnerAgent.Tunnel`) and runs the embedded SSH server over that stream.
//! It also runs its owner's batch jobs, as a worker ([`crate::jobs`]) with its
//! runner token.
//! Reconnects with backoff when the stream drops, so a grad restart loses
//! nothing.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use grad_proto::{
    AgentExecEvent, AgentMessage, DatasetsMounted, ExecEvent, Heartbeat, OutputsCollected,
    Register, RunCode, TunnelFrame, agent_command::Command, agent_message::Message,
    exec_event::Event, runner_agent_client::RunnerAgentClient, tunnel::TunnelIo,
};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
};

use crate::{
    datasets::Mounts,
    kernel::{self, Sessions},
    outputs::Collector,
    servers::Servers,
    ssh,
};

pub struct Config {
    pub server: String,
    pub runner_id: String,
    pub name: String,
    pub workspace: PathBuf,
    /// Where the runner keeps what must survive restarts (the SSH host key).
    pub state_dir: PathBuf,
    pub python: String,
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("grad refused this runner: {0}")]
    Refused(String),
    #[error("invalid server URL '{url}': {reason}")]
    Url { url: String, reason: String },
    #[error("the runner token is not valid ASCII")]
    Token,
    #[error("ssh server: {0}")]
    Ssh(#[from] ssh::Error),
    #[error("outputs: {0}")]
    Outputs(#[from] grad_transfer::Error),
}

/// What every connection to grad shares.
struct Runner {
    config: Config,
    servers: Servers,
    auth: MetadataValue<Ascii>,
    sessions: Arc<Sessions>,
    ssh: Arc<ssh::Server>,
    datasets: Arc<Mounts>,
    outputs: Arc<Collector>,
    tunnels: TaskTracker,
    shutdown: CancellationToken,
}

enum Ended {
    Shutdown,
    Disconnected(String),
}

const MAX_BACKOFF: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(20);

/// Runs until `shutdown`, until grad refuses this runner for good, or until
/// the runner's workspace disappears (its runner was deleted behind our back).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let sessions = Arc::new(Sessions::new(kernel::Config {
        python: config.python.clone(),
        workspace: config.workspace.clone(),
        env: Vec::new(),
    }));
    sessions.prestart();
    let ssh = ssh::Server::new(ssh::Config {
        workspace: config.workspace.clone(),
        state_dir: config.state_dir.clone(),
        confine: true,
    })?;
    let servers =
        Servers::parse(&config.server, grad_proto::tunnel::tunnel_endpoint).map_err(|e| {
            Error::Url {
                url: e.url,
                reason: e.reason,
            }
        })?;
    let auth: MetadataValue<_> = format!("Bearer {}", config.token)
        .parse()
        .map_err(|_| Error::Token)?;

    let datasets = Arc::new(Mounts::new(&config.workspace, &config.state_dir));
    let outputs = Arc::new(Collector::new(&config.workspace, &config.state_dir)?);
    // A runner is also a worker for its owner's batch jobs.
    let jobs_stop = shutdown.child_token();
    let jobs = tokio::spawn(crate::jobs::serve(
        crate::jobs::Config {
            server: config.server.clone(),
            token: config.token.clone(),
            work_dir: config.state_dir.join("jobs"),
            gpus: visible_gpus(),
            max_jobs: 1,
            docker: true,
            only_job: None,
        },
        jobs_stop.clone(),
    ));
    let runner = Runner {
        config,
        servers,
        auth,
        sessions,
        ssh,
        datasets,
        outputs,
        tunnels: TaskTracker::new(),
        shutdown,
    };
    let mut backoff = FIRST_BACKOFF;
    let shutdown = &runner.shutdown;
    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        if !runner.config.workspace.exists() {
            tracing::warn!(workspace = %runner.config.workspace.display(), "workspace is gone; exiting");
            break Ok(());
        }
        match runner.attach().await {
            Ok(Ended::Shutdown) => break Ok(()),
            Ok(Ended::Disconnected(why)) => {
                tracing::info!(%why, "disconnected from grad; reconnecting");
                backoff = FIRST_BACKOFF;
            }
            Err(status) if is_final(&status) => {
                break Err(Error::Refused(status.message().to_string()));
            }
            Err(status) => {
                tracing::debug!(%status, ?backoff, "cannot reach grad; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    };
    runner.tunnels.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), runner.tunnels.wait()).await;
    jobs_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(10), jobs).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the runner's job worker"),
        Ok(_) => {}
        Err(_) => tracing::warn!("the runner's job worker did not stop within 10s"),
    }
    runner.datasets.unmount_all().await;
    runner.sessions.shutdown().await;
    result
}

/// grad answers these when it will never accept this runner again.
fn is_final(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied | Code::NotFound | Code::FailedPrecondition
    )
}

impl Runner {
    async fn attach(&self) -> Result<Ended, Status> {
        // A grad that cannot be reached, or will not take us now, is left
        // for the next replica in the list (if there are several).
        let (index, url, endpoint) = self.servers.current();
        let attached = self.attach_to(url, endpoint).await;
        if attached.is_err() {
            self.servers.failed(index);
        }
        attached
    }

    async fn attach_to(&self, url: &str, endpoint: &Endpoint) -> Result<Ended, Status> {
        let (config, sessions, shutdown) = (&self.config, &self.sessions, &self.shutdown);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("connecting to {url}: {e}")))?;
        let (out, rx) = mpsc::channel::<AgentMessage>(256);
        let register = AgentMessage {
            message: Some(Message::Register(Register {
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
                hostname: hostname(),
                python: config.python.clone(),
                python_version: String::new(),
                host_key: self.ssh.host_public_key(),
            })),
        };
        // Cannot fail: the channel is new and has room.
        let _ = out.try_send(register);
        let mut request = Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", self.auth.clone());
        let mut commands = RunnerAgentClient::new(channel.clone())
            .attach(request)
            .await?
            .into_inner();
        let interval = match commands.message().await? {
            Some(grad_proto::AgentCommand {
                command: Some(Command::Registered(r)),
            }) => Duration::from_millis(r.heartbeat_interval_ms.max(10).into()),
            _ => {
                return Err(Status::internal(
                    "grad did not acknowledge the registration",
                ));
            }
        };
        tracing::info!(runner = %config.name, server = %url, "attached to grad");

        let mut heartbeat = tokio::time::interval(interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut running: HashMap<String, CancellationToken> = HashMap::new();
        let mut tasks: JoinSet<String> = JoinSet::new();
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ended::Shutdown,
                _ = heartbeat.tick() => {
                    let beat = AgentMessage {
                        message: Some(Message::Heartbeat(Heartbeat { sessions: sessions.count() as u32 })),
                    };
                    if out.send(beat).await.is_err() {
                        break Ended::Disconnected("outbound stream closed".into());
                    }
                }
                Some(done) = tasks.join_next() => {
                    if let Ok(request_id) = done {
                        running.remove(&request_id);
                    }
                }
                command = commands.message() => match command {
                    Ok(Some(c)) => match c.command {
                        Some(Command::RunCode(run)) => {
                            let cancel = CancellationToken::new();
                            running.insert(run.request_id.clone(), cancel.clone());
                            tasks.spawn(run_code(sessions.clone(), run, out.clone(), cancel));
                        }
                        Some(Command::CancelCode(c)) => {
                            if let Some(token) = running.get(&c.request_id) {
                                token.cancel();
                            }
                        }
                        Some(Command::OpenTunnel(open)) => {
                            self.tunnels.spawn(serve_tunnel(
                                channel.clone(),
                                self.auth.clone(),
                                self.ssh.clone(),
                                open.tunnel_id,
                                shutdown.clone(),
                            ));
                        }
                        Some(Command::AuthorizedKeys(keys)) => {
                            self.ssh.set_authorized_keys(&keys.public_keys);
                        }
                        Some(Command::MountDatasets(mount)) => {
                            let (datasets, out) = (self.datasets.clone(), out.clone());
                            self.tunnels.spawn(async move {
                                let statuses = datasets.apply(mount.datasets).await;
                                let report = AgentMessage {
                                    message: Some(Message::DatasetsMounted(DatasetsMounted {
                                        datasets: statuses,
                                    })),
                                };
                                let _ = out.send(report).await;
                            });
                        }
                        Some(Command::CollectOutputs(collect)) => {
                            let (outputs, out) = (self.outputs.clone(), out.clone());
                            let (channel, auth) = (channel.clone(), self.auth.clone());
                            self.tunnels.spawn(async move {
                                let sink = crate::outputs::Sink::runner(channel, auth);
                                let (report, error) = match outputs.collect(sink).await {
                                    Ok(report) => (report, String::new()),
                                    Err(error) => {
                                        tracing::warn!(%error, "collecting outputs");
                                        (Default::default(), error)
                                    }
                                };
                                let done = AgentMessage {
                                    message: Some(Message::OutputsCollected(OutputsCollected {
                                        request_id: collect.request_id,
                                        error,
                                        uploaded_files: report.uploaded_files,
                                        uploaded_bytes: report.uploaded_bytes,
                                    })),
                                };
                                let _ = out.send(done).await;
                            });
                        }
                        Some(Command::Registered(_)) | None => {}
                    },
                    Ok(None) => break Ended::Disconnected("grad closed the stream".into()),
                    Err(status) if is_final(&status) => return Err(status),
                    Err(status) => break Ended::Disconnected(status.to_string()),
                },
            }
        };
        // grad has already told the callers of running code that it failed;
        // interrupt the code so the sessions are free again.
        for token in running.values() {
            token.cancel();
        }
        while tasks.join_next().await.is_some() {}
        Ok(ended)
    }
}

/// Dials back to grad for tunnel `tunnel_id` and runs one SSH connection
/// over it. Tunnels are separate RPCs: they outlive a dropped agent stream.
async fn serve_tunnel(
    channel: Channel,
    auth: MetadataValue<Ascii>,
    ssh: Arc<ssh::Server>,
    tunnel_id: String,
    shutdown: CancellationToken,
) {
    let (out, rx) = mpsc::channel(32);
    let first = TunnelFrame {
        tunnel_id: tunnel_id.clone(),
        ..Default::default()
    };
    // Cannot fail: the channel is new and has room.
    let _ = out.try_send(first);
    let mut request = Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", auth);
    let inbound = match RunnerAgentClient::new(channel).tunnel(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            tracing::warn!(tunnel = %tunnel_id, %status, "cannot open the tunnel");
            return;
        }
    };
    let io = TunnelIo::new(inbound, out);
    tokio::select! {
        served = ssh.serve(io) => {
            if let Err(e) = served {
                tracing::debug!(tunnel = %tunnel_id, error = %e, "ssh connection ended");
            }
        }
        _ = shutdown.cancelled() => {}
    }
}

async fn run_code(
    sessions: Arc<Sessions>,
    run: RunCode,
    out: mpsc::Sender<AgentMessage>,
    cancel: CancellationToken,
) -> String {
    let request_id = run.request_id.clone();
    let wrap = |event: ExecEvent| AgentMessage {
        message: Some(Message::ExecEvent(AgentExecEvent {
            request_id: request_id.clone(),
            event: Some(event),
        })),
    };
    let (events, mut event_rx) = mpsc::channel(256);
    let request = kernel::Request {
        execution_id: run.execution_id,
        code: run.code,
        params_json: run.params_json,
        timeout: (run.timeout_ms > 0).then(|| Duration::from_millis(run.timeout_ms.into())),
    };
    let execute = sessions.execute(&run.session, request, events, cancel);
    let forward = async {
        while let Some(event) = event_rx.recv().await {
            if out.send(wrap(event)).await.is_err() {
                break;
            }
        }
    };
    let (finished, ()) = tokio::join!(execute, forward);
    let _ = out
        .send(wrap(ExecEvent {
            event: Some(Event::Finished(finished)),
        }))
        .await;
    request_id
}

/// The GPUs grad gave this runner (CUDA_VISIBLE_DEVICES, a list of indices).
fn visible_gpus() -> u32 {
    std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|list| list.split(',').filter(|d| !d.trim().is_empty()).count() as u32)
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}
