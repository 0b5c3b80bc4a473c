//! The gRPC services. Handlers only translate: read the caller, turn the
//! message into domain values, call one domain function, turn the result back.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use grad_proto::{
    self as pb, AgentCommand, AgentMessage, Registered, TunnelFrame, agent_command::Command,
    agent_message::Message, datasets_server::Datasets as DatasetsRpc, exec_server::Exec,
    runner_agent_server::RunnerAgent, runners_client::RunnersClient,
    runners_server::Runners as RunnersRpc, secrets_server::Secrets as SecretsRpc,
    tunnels_server::Tunnels as TunnelsRpc, users_server::Users,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::TaskTracker,
};
use tonic::{Request, Response, Status, Streaming};

mod jobs;
mod outputs;

use crate::{
    auth::{self, Caller},
    blobs::BlobStore,
    datasets, exec,
    outputs::Outputs,
    replicas::Origin,
    runners::{Runners, Waited},
    ssh_keys,
    store::{self, State},
    tunnel::{Splice, Tunnels},
};

#[derive(Clone)]
pub struct Api {
    pub runners: Arc<Runners>,
    pub tunnels: Arc<Tunnels>,
    pub blobs: Arc<dyn BlobStore>,
    pub outputs: Arc<Outputs>,
    pub jobs: Arc<crate::jobs::Jobs>,
    pub workers: crate::jobs::Workers,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn state_to_pb(state: State) -> pb::RunnerState {
    match state {
        State::Pending => pb::RunnerState::Pending,
        State::Starting => pb::RunnerState::Starting,
        State::Ready => pb::RunnerState::Ready,
        State::Pausing => pb::RunnerState::Pausing,
        State::Paused => pb::RunnerState::Paused,
        State::Resuming => pb::RunnerState::Resuming,
        State::Deleting => pb::RunnerState::Deleting,
        State::Failed => pb::RunnerState::Failed,
    }
}

/// The stored state a wire state names; DELETED and UNSPECIFIED name none.
fn state_from_pb(state: pb::RunnerState) -> Option<State> {
    match state {
        pb::RunnerState::Pending => Some(State::Pending),
        pb::RunnerState::Starting => Some(State::Starting),
        pb::RunnerState::Ready => Some(State::Ready),
        pb::RunnerState::Pausing => Some(State::Pausing),
        pb::RunnerState::Paused => Some(State::Paused),
        pb::RunnerState::Resuming => Some(State::Resuming),
        pb::RunnerState::Deleting => Some(State::Deleting),
        pb::RunnerState::Failed => Some(State::Failed),
        pb::RunnerState::Deleted | pb::RunnerState::Unspecified => None,
    }
}

impl Api {
    async fn runner_to_pb(&self, r: store::Runner) -> Result<pb::Runner, Status> {
        let mut list = self.runners_to_pb(vec![r]).await?;
        Ok(list.remove(0))
    }

    async fn runners_to_pb(&self, runners: Vec<store::Runner>) -> Result<Vec<pb::Runner>, Status> {
        let ids: Vec<&str> = runners.iter().map(|r| r.id.as_str()).collect();
        let connected = self.runners.connected(&ids).await?;
        Ok(runners
            .into_iter()
            .zip(connected)
            .map(|(r, connected)| runner_pb(r, connected))
            .collect())
    }

    /// Sends a call about runner `name` to the replica its agent is
    /// connected to, when that is another one: `Some(answer)`.
    async fn forward_if_elsewhere<T, R, F, Fut>(
        &self,
        req: &Request<T>,
        name: &str,
        call: F,
    ) -> Result<Option<Response<R>>, Status>
    where
        T: Clone,
        F: FnOnce(tonic::transport::Channel, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let caller = auth::user(req)?;
        let origin = Origin::of(req);
        let replicas = self.runners.replicas();
        let mut call = Some(call);
        let mut moved = false;
        loop {
            let Some((runner, url)) = self.runners.held_elsewhere(caller, name, &origin).await?
            else {
                return Ok(None);
            };
            if !replicas.reachable(&url).await {
                if moved || !self.runners.wait_moved(&runner.id, &url).await? {
                    return Err(replicas
                        .unreachable_error(name, &url, "no answer to a health check")
                        .into());
                }
                moved = true;
                continue;
            }
            let forwarded = replicas.forward(&origin, req.get_ref().clone());
            let call = call
                .take()
                .ok_or_else(|| Status::internal("forwarded twice"))?;
            return call(replicas.channel(&url)?, forwarded).await.map(Some);
        }
    }
}

fn runner_pb(r: store::Runner, connected: bool) -> pb::Runner {
    {
        pb::Runner {
            connected,
            name: r.name,
            owner: r.owner_name,
            state: state_to_pb(r.state) as i32,
            reason: r.reason,
            resources: Some(pb::Resources {
                cpu_millis: r.resources.cpu_millis,
                memory_bytes: r.resources.memory_bytes,
                storage_bytes: r.resources.storage_bytes,
                gpus: r.resources.gpus,
            }),
            backend: r.backend,
            workspace: r.workspace,
            create_time: Some(timestamp(r.created_at)),
            update_time: Some(timestamp(r.updated_at)),
            host_key: r.host_key,
            datasets: r.datasets.iter().map(|d| d.to_status()).collect(),
        }
    }
}

fn ssh_key_to_pb(k: store::SshKey) -> pb::SshKey {
    pb::SshKey {
        public_key: k.public_key,
        fingerprint: k.fingerprint,
        name: k.name,
        create_time: Some(timestamp(k.created_at)),
    }
}

type RpcResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl RunnersRpc for Api {
    async fn create_runner(&self, req: Request<pb::CreateRunnerRequest>) -> RpcResult<pb::Runner> {
        let caller = auth::user(&req)?.clone();
        let msg = req.into_inner();
        let res = msg.resources.unwrap_or_default();
        let resources = store::Resources {
            cpu_millis: res.cpu_millis,
            memory_bytes: res.memory_bytes,
            storage_bytes: res.storage_bytes,
            gpus: res.gpus,
        };
        let runner = self
            .runners
            .create(&caller, &msg.name, resources, msg.datasets)
            .await?;
        Ok(Response::new(self.runner_to_pb(runner).await?))
    }

    async fn get_runner(&self, req: Request<pb::GetRunnerRequest>) -> RpcResult<pb::Runner> {
        let caller = auth::user(&req)?;
        let runner = self.runners.get(caller, &req.get_ref().name).await?;
        Ok(Response::new(self.runner_to_pb(runner).await?))
    }

    async fn list_runners(
        &self,
        req: Request<pb::ListRunnersRequest>,
    ) -> RpcResult<pb::ListRunnersResponse> {
        let caller = auth::user(&req)?;
        let runners = self.runners.list(caller, req.get_ref().all_users).await?;
        Ok(Response::new(pb::ListRunnersResponse {
            runners: self.runners_to_pb(runners).await?,
        }))
    }

    async fn pause_runner(&self, req: Request<pb::PauseRunnerRequest>) -> RpcResult<pb::Runner> {
        // Its outputs are collected through its agent, wherever that is.
        let name = &req.get_ref().name;
        if let Some(answer) = self
            .forward_if_elsewhere(&req, name, |channel, req| async move {
                RunnersClient::new(channel).pause_runner(req).await
            })
            .await?
        {
            return Ok(answer);
        }
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let runner = self
            .runners
            .pause(caller, &msg.name, msg.skip_outputs)
            .await?;
        Ok(Response::new(self.runner_to_pb(runner).await?))
    }

    async fn resume_runner(&self, req: Request<pb::ResumeRunnerRequest>) -> RpcResult<pb::Runner> {
        let caller = auth::user(&req)?;
        let runner = self.runners.resume(caller, &req.get_ref().name).await?;
        Ok(Response::new(self.runner_to_pb(runner).await?))
    }

    async fn delete_runner(&self, req: Request<pb::DeleteRunnerRequest>) -> RpcResult<pb::Runner> {
        let name = &req.get_ref().name;
        if let Some(answer) = self
            .forward_if_elsewhere(&req, name, |channel, req| async move {
                RunnersClient::new(channel).delete_runner(req).await
            })
            .await?
        {
            return Ok(answer);
        }
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let runner = self
            .runners
            .delete(caller, &msg.name, msg.skip_outputs)
            .await?;
        Ok(Response::new(self.runner_to_pb(runner).await?))
    }

    async fn wait_runner(&self, req: Request<pb::WaitRunnerRequest>) -> RpcResult<pb::Runner> {
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let mut states = Vec::new();
        let mut want_deleted = false;
        for s in &msg.states {
            match pb::RunnerState::try_from(*s) {
                Ok(pb::RunnerState::Deleted) => want_deleted = true,
                Ok(pb::RunnerState::Unspecified) | Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "states: unknown state {s}"
                    )));
                }
                Ok(pb) => states.extend(state_from_pb(pb)),
            }
        }
        if states.is_empty() && !want_deleted {
            return Err(Status::invalid_argument("states: name at least one state"));
        }
        let timeout = match msg.timeout_ms {
            0 => Duration::from_secs(60),
            ms => Duration::from_millis(ms.into()),
        };
        let waited = self
            .runners
            .wait(caller, &msg.name, &states, want_deleted, timeout)
            .await?;
        Ok(Response::new(match waited {
            Waited::Runner(r) => self.runner_to_pb(*r).await?,
            Waited::Deleted { name, owner } => pb::Runner {
                name,
                owner,
                state: pb::RunnerState::Deleted as i32,
                ..Default::default()
            },
        }))
    }
}

#[tonic::async_trait]
impl DatasetsRpc for Api {
    async fn test_dataset(
        &self,
        req: Request<pb::TestDatasetRequest>,
    ) -> RpcResult<pb::TestDatasetResponse> {
        let caller = auth::user(&req)?.clone();
        let dataset = req.into_inner().dataset.unwrap_or_default();
        let name = dataset.name.clone();
        let dataset = datasets::with_secret_keys(vec![dataset], self.runners.secrets(), &caller.id)
            .await?
            .remove(0);
        let response = match datasets::test(dataset).await? {
            Ok(probe) => pb::TestDatasetResponse {
                ok: true,
                sample: probe.sample,
                truncated: probe.truncated,
                ..Default::default()
            },
            Err(failed) => {
                tracing::info!(user = %caller.name, dataset = %name, code = %failed.code, "dataset test failed");
                pb::TestDatasetResponse {
                    ok: false,
                    error_code: failed.code,
                    error: failed.message,
                    ..Default::default()
                }
            }
        };
        Ok(Response::new(response))
    }
}

fn secret_to_pb(secret: store::Secret) -> pb::Secret {
    pb::Secret {
        name: secret.name,
        create_time: Some(timestamp(secret.created_at)),
        update_time: Some(timestamp(secret.updated_at)),
    }
}

#[tonic::async_trait]
impl SecretsRpc for Api {
    async fn set_secret(&self, req: Request<pb::SetSecretRequest>) -> RpcResult<pb::Secret> {
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let secret = self
            .runners
            .secrets()
            .set(caller, &msg.name, &msg.value)
            .await?;
        Ok(Response::new(secret_to_pb(secret)))
    }

    async fn list_secrets(
        &self,
        req: Request<pb::ListSecretsRequest>,
    ) -> RpcResult<pb::ListSecretsResponse> {
        let caller = auth::user(&req)?;
        let secrets = self.runners.secrets().list(caller).await?;
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: secrets.into_iter().map(secret_to_pb).collect(),
        }))
    }

    async fn delete_secret(&self, req: Request<pb::DeleteSecretRequest>) -> RpcResult<pb::Secret> {
        let caller = auth::user(&req)?;
        let secret = self
            .runners
            .secrets()
            .delete(caller, &req.get_ref().name)
            .await?;
        Ok(Response::new(secret_to_pb(secret)))
    }
}

#[tonic::async_trait]
impl Exec for Api {
    type ExecuteCodeStream = exec::Events;

    async fn execute_code(
        &self,
        req: Request<pb::ExecuteCodeRequest>,
    ) -> RpcResult<Self::ExecuteCodeStream> {
        let caller = auth::user(&req)?.clone();
        let origin = Origin::of(&req);
        let msg = req.into_inner();
        let events = exec::execute(
            &self.runners,
            &caller,
            exec::Request {
                runner: msg.runner,
                code: msg.code,
                session: msg.session,
                params_json: msg.params_json,
                timeout_ms: msg.timeout_ms,
            },
            &origin,
        )
        .await?;
        Ok(Response::new(events))
    }

    async fn list_executions(
        &self,
        req: Request<pb::ListExecutionsRequest>,
    ) -> RpcResult<pb::ListExecutionsResponse> {
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let rows = exec::list(&self.runners, caller, &msg.runner, msg.limit).await?;
        Ok(Response::new(pb::ListExecutionsResponse {
            executions: rows
                .into_iter()
                .map(|(e, runner)| pb::Execution {
                    id: e.id,
                    runner,
                    session: e.session,
                    code: e.code,
                    status: exec::status_from_name(&e.status) as i32,
                    execution_count: e.execution_count,
                    duration_us: e.duration_us,
                    start_time: Some(timestamp(e.started_at)),
                })
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl Users for Api {
    async fn who_am_i(&self, req: Request<pb::WhoAmIRequest>) -> RpcResult<pb::User> {
        let caller = auth::user(&req)?;
        Ok(Response::new(pb::User {
            name: caller.name.clone(),
            role: caller.role.to_string(),
            plan: caller.plan.to_string(),
        }))
    }

    async fn add_ssh_key(&self, req: Request<pb::AddSshKeyRequest>) -> RpcResult<pb::SshKey> {
        let caller = auth::user(&req)?;
        let msg = req.get_ref();
        let key = ssh_keys::parse(&msg.public_key)?;
        let name = if msg.name.is_empty() {
            key.comment
        } else {
            msg.name.clone()
        };
        let stored = self
            .runners
            .store()
            .insert_ssh_key(
                &caller.id,
                &store::SshKey {
                    fingerprint: key.fingerprint,
                    public_key: key.text,
                    name,
                    created_at: store::now_ms(),
                },
            )
            .await?;
        self.runners.push_authorized_keys(&caller.id).await?;
        Ok(Response::new(ssh_key_to_pb(stored)))
    }

    async fn list_ssh_keys(
        &self,
        req: Request<pb::ListSshKeysRequest>,
    ) -> RpcResult<pb::ListSshKeysResponse> {
        let caller = auth::user(&req)?;
        let keys = self.runners.store().ssh_keys(&caller.id).await?;
        Ok(Response::new(pb::ListSshKeysResponse {
            keys: keys.into_iter().map(ssh_key_to_pb).collect(),
        }))
    }

    async fn delete_ssh_key(&self, req: Request<pb::DeleteSshKeyRequest>) -> RpcResult<pb::SshKey> {
        let caller = auth::user(&req)?;
        let fingerprint = &req.get_ref().fingerprint;
        let store = self.runners.store();
        let key = store
            .ssh_key(&caller.id, fingerprint)
            .await?
            .ok_or_else(|| {
                Status::not_found(format!("no SSH key with fingerprint '{fingerprint}'"))
            })?;
        store.delete_ssh_key(&caller.id, fingerprint).await?;
        self.runners.push_authorized_keys(&caller.id).await?;
        Ok(Response::new(ssh_key_to_pb(key)))
    }
}

#[tonic::async_trait]
impl TunnelsRpc for Api {
    type OpenStream = Splice;

    async fn open(&self, req: Request<Streaming<TunnelFrame>>) -> RpcResult<Splice> {
        let caller = auth::user(&req)?.clone();
        let origin = Origin::of(&req);
        let frames = self
            .tunnels
            .open(&self.runners, &caller, req.into_inner(), &origin)
            .await?;
        Ok(Response::new(frames))
    }
}

fn runner_caller<T>(req: &Request<T>) -> Result<(String, String), Status> {
    match req.extensions().get::<Caller>() {
        Some(Caller::Runner {
            runner_id,
            token_id,
        }) => Ok((runner_id.clone(), token_id.clone())),
        _ => Err(Status::permission_denied(
            "only runner agent tokens can call RunnerAgent",
        )),
    }
}

impl Api {
    /// The runner whose current agent token made this call: a replaced
    /// token (the runner was restarted) may do nothing more.
    async fn current_runner<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let (runner_id, token_id) = runner_caller(req)?;
        let runner = self
            .runners
            .store()
            .runner_by_id(&runner_id)
            .await
            .map_err(Status::from)?;
        if runner.is_none_or(|r| r.token_id != token_id) {
            return Err(Status::permission_denied(
                "this runner token has been replaced",
            ));
        }
        Ok(runner_id)
    }
}

/// A stream of commands that ends when its agent connection is closed.
pub struct CommandStream {
    inner: ReceiverStream<AgentCommand>,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Stream for CommandStream {
    type Item = Result<AgentCommand, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_next(cx).map(|c| c.map(Ok))
    }
}

const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

#[tonic::async_trait]
impl RunnerAgent for Api {
    type AttachStream = CommandStream;
    type TunnelStream = Splice;

    async fn tunnel(&self, req: Request<Streaming<TunnelFrame>>) -> RpcResult<Splice> {
        let runner_id = self.current_runner(&req).await?;
        Ok(Response::new(
            self.tunnels.accept(&runner_id, req.into_inner()).await?,
        ))
    }

    async fn plan_outputs(&self, req: Request<pb::OutputManifest>) -> RpcResult<pb::OutputUploads> {
        let runner_id = self.current_runner(&req).await?;
        let set = self.outputs.runner_set(&runner_id).await?;
        let uploads = self.outputs.plan(&set, req.into_inner()).await?;
        Ok(Response::new(pb::OutputUploads {
            uploads: uploads.into_iter().map(outputs::upload_to_pb).collect(),
        }))
    }

    async fn begin_part_upload(
        &self,
        req: Request<pb::BeginPartUploadRequest>,
    ) -> RpcResult<pb::PartUpload> {
        let runner_id = self.current_runner(&req).await?;
        let set = self.outputs.runner_set(&runner_id).await?;
        let multipart = self.outputs.begin_parts(&set, req.into_inner()).await?;
        Ok(Response::new(pb::PartUpload {
            upload_id: multipart.upload_id,
            parts: multipart
                .parts
                .iter()
                .map(outputs::presigned_to_pb)
                .collect(),
        }))
    }

    async fn commit_outputs(
        &self,
        req: Request<pb::CommitOutputsRequest>,
    ) -> RpcResult<pb::OutputSet> {
        let runner_id = self.current_runner(&req).await?;
        let set = self.outputs.runner_set(&runner_id).await?;
        let recorded = self.outputs.commit(&set, req.into_inner()).await?;
        Ok(Response::new(outputs::set_to_pb(&recorded, &[], None)))
    }

    async fn attach(&self, req: Request<Streaming<AgentMessage>>) -> RpcResult<CommandStream> {
        let (runner_id, token_id) = runner_caller(&req)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no register message within 10s"))??;
        let Some(AgentMessage {
            message: Some(Message::Register(register)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message on an agent stream must be register",
            ));
        };
        let runner = self
            .runners
            .attached(&runner_id, &token_id, &register.host_key)
            .await?;
        tracing::info!(
            runner = %runner.name, owner = %runner.owner_name, pid = register.pid,
            python = %register.python, python_version = %register.python_version,
            "runner agent attached"
        );
        let (commands, rx) = mpsc::channel(256);
        let agent = self
            .runners
            .connect_agent(&runner_id, commands.clone())
            .await?;
        let registered = AgentCommand {
            command: Some(Command::Registered(Registered {
                heartbeat_interval_ms: self.runners.timing().heartbeat_interval.as_millis() as u32,
            })),
        };
        // Cannot fail: the channel is new and has room for both.
        let _ = commands.try_send(registered);
        let _ = commands.try_send(self.runners.authorized_keys(&runner.owner_id).await?);
        let _ = commands.try_send(self.runners.mount_datasets(&runner)?);

        let runners = self.runners.clone();
        let shutdown = self.shutdown.clone();
        let reader_agent = agent.clone();
        self.tracker.spawn(async move {
            let agent = reader_agent;
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = agent.closed.cancelled() => break,
                    _ = shutdown.cancelled() => break,
                };
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(runner = %runner.name, %status, "agent stream error");
                        break;
                    }
                };
                agent.touch();
                match msg.message {
                    Some(Message::ExecEvent(e)) => {
                        if let (Some(route), Some(event)) = (agent.route(&e.request_id), e.event) {
                            let _ = route.send(event).await;
                        }
                    }
                    Some(Message::DatasetsMounted(report)) => {
                        if let Err(e) = runners.datasets_mounted(&runner_id, &report.datasets).await
                        {
                            tracing::warn!(runner = %runner.name, error = %e, "recording dataset mounts");
                        }
                    }
                    Some(Message::OutputsCollected(report)) => agent.collected(report),
                    Some(Message::Heartbeat(_)) | Some(Message::Register(_)) | None => {}
                }
            }
            runners.disconnect_agent(&runner_id, agent.conn).await;
            tracing::info!(runner = %runner.name, "runner agent detached");
        });
        Ok(Response::new(CommandStream {
            inner: ReceiverStream::new(rx),
            closed: Box::pin(agent.closed.clone().cancelled_owned()),
        }))
    }
}
