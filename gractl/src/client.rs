//! A connection to grad: one HTTP/2 channel plus the caller's token, shared by
//! every call. Cloning is cheap (the channel is a handle), so a program keeps
//! one `Client` and never reconnects per call.

use std::{error::Error as _, io, sync::Arc, time::Duration};

use grad_proto::{
    AddSshKeyRequest, CollectOutputsRequest, CreateRunnerRequest, DeleteOutputsRequest,
    DeleteRunnerRequest, DeleteSecretRequest, DeleteSshKeyRequest, ExecEvent, ExecuteCodeRequest,
    Execution, GetOutputsRequest, GetRunnerRequest, ListExecutionsRequest, ListOutputsRequest,
    ListRunnersRequest, ListSecretsRequest, ListSshKeysRequest, OutputSet, PauseRunnerRequest,
    Resources, ResumeRunnerRequest, Runner, RunnerState, Secret, SetSecretRequest, SshKey,
    TestDatasetRequest, TestDatasetResponse, TunnelFrame, User, WaitRunnerRequest, WhoAmIRequest,
    datasets_client::DatasetsClient, exec_client::ExecClient, outputs_client::OutputsClient,
    runners_client::RunnersClient, secrets_client::SecretsClient, tunnel::TunnelIo,
    tunnels_client::TunnelsClient, users_client::UsersClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status, Streaming,
    metadata::AsciiMetadataValue,
    transport::{Channel, Endpoint},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Rich outputs (figures) can be large; tonic's 4 MiB default is too small.
const MAX_MESSAGE_BYTES: usize = 64 << 20;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long past the server's own wait deadline we wait for its answer.
const WAIT_GRACE: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows. hyper's defaults (64 KiB per stream) cap a
/// tunnel at one window per round trip; SSH and SFTP pipelining need more
/// bytes in flight to match sshfs over the same link.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 8 << 20;
/// Tunnel frames queued towards grad before writes wait.
const TUNNEL_FRAMES: usize = 32;

/// A tunnel to a runner's SSH server as a byte stream (see [`Client::open_tunnel`]).
pub type Tunnel = TunnelIo<Streaming<TunnelFrame>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot reach grad at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the token cannot be sent in an authorization header (it must be printable ASCII)")]
    InvalidToken,
    /// grad's answer: its message is printed as is.
    #[error("{}", status_message(.0))]
    Status(Status),
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::Status(status)
    }
}

impl ClientError {
    /// The gRPC status, when grad answered with one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Status(status) => Some(status),
            _ => None,
        }
    }
}

fn status_message(status: &Status) -> String {
    if crate::exit::Code::from_grpc(status) == crate::exit::Code::Unavailable
        && status.code() == tonic::Code::Unknown
    {
        format!(
            "the connection to grad broke during the call ({}); try again",
            status.message()
        )
    } else if status.message().is_empty() {
        format!("{:?}", status.code()).to_lowercase()
    } else {
        status.message().to_owned()
    }
}

/// A connected grad client. See the module docs.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    authorization: AsciiMetadataValue,
    server: Arc<str>,
}

impl std::fmt::Debug for Client {
    // Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `server` (`http://HOST:PORT`; a bare `HOST:PORT` means
    /// http) now, so an unreachable server is reported here, naming the URL.
    pub async fn connect(server: &str, token: &str) -> Result<Client, ClientError> {
        let url = normalize_url(server)?;
        let authorization = AsciiMetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| ClientError::InvalidToken)?;
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| ClientError::InvalidUrl {
                url: server.to_owned(),
                reason: deepest_message(&error),
            })?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            // Keeps a quiet, long execution's connection alive through NATs and proxies.
            .http2_keep_alive_interval(KEEP_ALIVE)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(256 << 10)
            .user_agent(concat!("gractl/", env!("CARGO_PKG_VERSION")))
            .map_err(|_| ClientError::InvalidUrl {
                url: server.to_owned(),
                reason: "cannot build a user agent".into(),
            })?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| ClientError::Connect {
                url: url.clone(),
                reason: connect_reason(&error),
            })?;
        Ok(Client {
            channel,
            authorization,
            server: url.into(),
        })
    }

    /// The URL this client talks to, normalized (`http://127.0.0.1:7070`).
    pub fn server(&self) -> &str {
        &self.server
    }

    pub async fn create_runner(
        &self,
        name: &str,
        resources: Resources,
        datasets: Vec<grad_proto::Dataset>,
    ) -> Result<Runner, ClientError> {
        let request = CreateRunnerRequest {
            name: name.to_owned(),
            resources: Some(resources),
            datasets,
        };
        Ok(self
            .runners()
            .create_runner(self.request(request))
            .await?
            .into_inner())
    }

    pub async fn get_runner(&self, name: &str) -> Result<Runner, ClientError> {
        let request = GetRunnerRequest {
            name: name.to_owned(),
        };
        Ok(self
            .runners()
            .get_runner(self.request(request))
            .await?
            .into_inner())
    }

    /// The caller's runners, or everyone's with `all_users` (admins only).
    pub async fn list_runners(&self, all_users: bool) -> Result<Vec<Runner>, ClientError> {
        let request = ListRunnersRequest { all_users };
        let response = self.runners().list_runners(self.request(request)).await?;
        Ok(response.into_inner().runners)
    }

    /// Pauses the runner; grad collects its outputs first unless `skip_outputs`.
    pub async fn pause_runner(
        &self,
        name: &str,
        skip_outputs: bool,
    ) -> Result<Runner, ClientError> {
        let request = PauseRunnerRequest {
            name: name.to_owned(),
            skip_outputs,
        };
        Ok(self
            .runners()
            .pause_runner(self.request(request))
            .await?
            .into_inner())
    }

    pub async fn resume_runner(&self, name: &str) -> Result<Runner, ClientError> {
        let request = ResumeRunnerRequest {
            name: name.to_owned(),
        };
        Ok(self
            .runners()
            .resume_runner(self.request(request))
            .await?
            .into_inner())
    }

    /// Deletes the runner; grad collects its outputs first unless `skip_outputs`.
    pub async fn delete_runner(
        &self,
        name: &str,
        skip_outputs: bool,
    ) -> Result<Runner, ClientError> {
        let request = DeleteRunnerRequest {
            name: name.to_owned(),
            skip_outputs,
        };
        Ok(self
            .runners()
            .delete_runner(self.request(request))
            .await?
            .into_inner())
    }

    /// Waits until the runner reaches one of `states` or a terminal state
    /// (FAILED, DELETED); past `timeout` grad answers DEADLINE_EXCEEDED.
    pub async fn wait_runner(
        &self,
        name: &str,
        states: &[RunnerState],
        timeout: Duration,
    ) -> Result<Runner, ClientError> {
        let request = WaitRunnerRequest {
            name: name.to_owned(),
            states: states.iter().map(|state| *state as i32).collect(),
            timeout_ms: millis(timeout),
        };
        let mut runners = self.runners();
        let call = runners.wait_runner(self.request(request));
        // grad enforces `timeout`; this only guards against a server that never answers.
        match tokio::time::timeout(timeout.saturating_add(WAIT_GRACE), call).await {
            Ok(response) => Ok(response?.into_inner()),
            Err(_) => Err(ClientError::Status(Status::deadline_exceeded(format!(
                "timed out after {}s waiting for runner {name}",
                timeout.as_secs()
            )))),
        }
    }

    /// Starts code in the runner's interpreter; events arrive on the stream
    /// as they happen and it ends with `finished`. Dropping the stream
    /// interrupts the code.
    pub async fn execute_code(
        &self,
        request: ExecuteCodeRequest,
    ) -> Result<Streaming<ExecEvent>, ClientError> {
        Ok(self
            .exec()
            .execute_code(self.request(request))
            .await?
            .into_inner())
    }

    /// The runner's most recent executions, newest first.
    pub async fn list_executions(
        &self,
        runner: &str,
        limit: u32,
    ) -> Result<Vec<Execution>, ClientError> {
        let request = ListExecutionsRequest {
            runner: runner.to_owned(),
            limit,
        };
        let response = self.exec().list_executions(self.request(request)).await?;
        Ok(response.into_inner().executions)
    }

    /// Has the runner upload what changed in its outputs/ now.
    pub async fn collect_outputs(&self, runner: &str) -> Result<OutputSet, ClientError> {
        let request = CollectOutputsRequest {
            runner: runner.to_owned(),
        };
        Ok(self
            .outputs()
            .collect_outputs(self.request(request))
            .await?
            .into_inner())
    }

    /// A runner's last collected outputs (a deleted runner's too), with
    /// download URLs when asked.
    pub async fn get_outputs(
        &self,
        runner: &str,
        download_urls: bool,
    ) -> Result<OutputSet, ClientError> {
        let request = GetOutputsRequest {
            runner: runner.to_owned(),
            download_urls,
        };
        Ok(self
            .outputs()
            .get_outputs(self.request(request))
            .await?
            .into_inner())
    }

    /// A summary of each runner's collected outputs.
    pub async fn list_outputs(&self, all_users: bool) -> Result<Vec<OutputSet>, ClientError> {
        let request = ListOutputsRequest { all_users };
        let response = self.outputs().list_outputs(self.request(request)).await?;
        Ok(response.into_inner().outputs)
    }

    /// Removes a deleted runner's outputs.
    pub async fn delete_outputs(&self, runner: &str) -> Result<OutputSet, ClientError> {
        let request = DeleteOutputsRequest {
            runner: runner.to_owned(),
        };
        Ok(self
            .outputs()
            .delete_outputs(self.request(request))
            .await?
            .into_inner())
    }

    /// Has grad list a few objects of `dataset` with its credentials.
    pub async fn test_dataset(
        &self,
        dataset: grad_proto::Dataset,
    ) -> Result<TestDatasetResponse, ClientError> {
        let request = TestDatasetRequest {
            dataset: Some(dataset),
        };
        Ok(DatasetsClient::new(self.channel.clone())
            .test_dataset(self.request(request))
            .await?
            .into_inner())
    }

    /// Creates or replaces the caller's secret `name`.
    pub async fn set_secret(&self, name: &str, value: String) -> Result<Secret, ClientError> {
        let request = SetSecretRequest {
            name: name.to_owned(),
            value,
        };
        Ok(self
            .secrets()
            .set_secret(self.request(request))
            .await?
            .into_inner())
    }

    /// The caller's secrets, without values.
    pub async fn list_secrets(&self) -> Result<Vec<Secret>, ClientError> {
        let response = self
            .secrets()
            .list_secrets(self.request(ListSecretsRequest {}))
            .await?;
        Ok(response.into_inner().secrets)
    }

    pub async fn delete_secret(&self, name: &str) -> Result<Secret, ClientError> {
        let request = DeleteSecretRequest {
            name: name.to_owned(),
        };
        Ok(self
            .secrets()
            .delete_secret(self.request(request))
            .await?
            .into_inner())
    }

    /// Where to upload a bundle (None: grad has it already).
    pub async fn create_upload(
        &self,
        sha256: &str,
        size: u64,
    ) -> Result<Option<grad_proto::PresignedRequest>, ClientError> {
        let request = grad_proto::CreateUploadRequest {
            sha256: sha256.to_owned(),
            size,
        };
        Ok(self
            .jobs()
            .create_upload(self.request(request))
            .await?
            .into_inner()
            .upload)
    }

    pub async fn submit_job(
        &self,
        spec: grad_proto::JobSpec,
        bundle_sha256: &str,
    ) -> Result<grad_proto::Job, ClientError> {
        let request = grad_proto::SubmitJobRequest {
            spec: Some(spec),
            bundle_sha256: bundle_sha256.to_owned(),
        };
        Ok(self
            .jobs()
            .submit_job(self.request(request))
            .await?
            .into_inner())
    }

    pub async fn get_job(&self, id: &str) -> Result<grad_proto::Job, ClientError> {
        let request = grad_proto::GetJobRequest { id: id.to_owned() };
        Ok(self
            .jobs()
            .get_job(self.request(request))
            .await?
            .into_inner())
    }

    pub async fn list_jobs(
        &self,
        all_users: bool,
        limit: u32,
    ) -> Result<Vec<grad_proto::Job>, ClientError> {
        let request = grad_proto::ListJobsRequest { all_users, limit };
        Ok(self
            .jobs()
            .list_jobs(self.request(request))
            .await?
            .into_inner()
            .jobs)
    }

    pub async fn cancel_job(&self, id: &str) -> Result<grad_proto::Job, ClientError> {
        let request = grad_proto::CancelJobRequest { id: id.to_owned() };
        Ok(self
            .jobs()
            .cancel_job(self.request(request))
            .await?
            .into_inner())
    }

    /// Waits until the job has ended; past `timeout` grad answers DEADLINE_EXCEEDED.
    pub async fn wait_job(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<grad_proto::Job, ClientError> {
        let request = grad_proto::WaitJobRequest {
            id: id.to_owned(),
            timeout_ms: millis(timeout),
        };
        let mut jobs = self.jobs();
        let call = jobs.wait_job(self.request(request));
        match tokio::time::timeout(timeout.saturating_add(WAIT_GRACE), call).await {
            Ok(response) => Ok(response?.into_inner()),
            Err(_) => Err(ClientError::Status(Status::deadline_exceeded(format!(
                "timed out after {}s waiting for job {id}",
                timeout.as_secs()
            )))),
        }
    }

    /// The job's log from after `after_seq`, following it with `follow`.
    pub async fn stream_logs(
        &self,
        id: &str,
        after_seq: u64,
        follow: bool,
    ) -> Result<Streaming<grad_proto::LogChunk>, ClientError> {
        let request = grad_proto::StreamLogsRequest {
            id: id.to_owned(),
            after_seq,
            follow,
        };
        Ok(self
            .jobs()
            .stream_logs(self.request(request))
            .await?
            .into_inner())
    }

    /// The outputs the job's last attempt collected.
    pub async fn get_job_outputs(
        &self,
        id: &str,
        download_urls: bool,
    ) -> Result<OutputSet, ClientError> {
        let request = grad_proto::GetJobOutputsRequest {
            id: id.to_owned(),
            download_urls,
        };
        Ok(self
            .jobs()
            .get_job_outputs(self.request(request))
            .await?
            .into_inner())
    }

    /// Registers a worker; answers it and its token.
    pub async fn create_worker(
        &self,
        name: &str,
        labels: std::collections::HashMap<String, String>,
        shared: bool,
    ) -> Result<grad_proto::CreateWorkerResponse, ClientError> {
        let request = grad_proto::CreateWorkerRequest {
            name: name.to_owned(),
            labels,
            shared,
        };
        Ok(self
            .workers()
            .create_worker(self.request(request))
            .await?
            .into_inner())
    }

    pub async fn list_workers(&self) -> Result<Vec<grad_proto::Worker>, ClientError> {
        let request = grad_proto::ListWorkersRequest {};
        Ok(self
            .workers()
            .list_workers(self.request(request))
            .await?
            .into_inner()
            .workers)
    }

    pub async fn delete_worker(&self, name: &str) -> Result<grad_proto::Worker, ClientError> {
        let request = grad_proto::DeleteWorkerRequest {
            name: name.to_owned(),
        };
        Ok(self
            .workers()
            .delete_worker(self.request(request))
            .await?
            .into_inner())
    }

    /// Who the token says the caller is.
    pub async fn whoami(&self) -> Result<User, ClientError> {
        Ok(self
            .users()
            .who_am_i(self.request(WhoAmIRequest {}))
            .await?
            .into_inner())
    }

    /// Opens a byte stream to the SSH server of `runner` (NAME, or
    /// OWNER/NAME for admins) through grad. grad answers once the runner has
    /// dialled back, so a runner that is paused, missing or not the caller's
    /// is reported here as a status. Either side ending the stream closes
    /// the tunnel; shutting down the returned writer ends ours.
    pub async fn open_tunnel(&self, runner: &str) -> Result<Tunnel, ClientError> {
        let (frames, outbound) = mpsc::channel::<TunnelFrame>(TUNNEL_FRAMES);
        let first = TunnelFrame {
            runner: runner.to_owned(),
            ..Default::default()
        };
        // Cannot fail: the receiver is alive and the channel is empty.
        let _ = frames.try_send(first);
        let mut tunnels = TunnelsClient::new(self.channel.clone());
        let inbound = tunnels
            .open(self.request(ReceiverStream::new(outbound)))
            .await?
            .into_inner();
        Ok(TunnelIo::new(inbound, frames))
    }

    /// Registers an SSH public key ("ssh-ed25519 AAAA... comment") for the
    /// caller; the same key again returns the existing record.
    pub async fn add_ssh_key(&self, public_key: &str, name: &str) -> Result<SshKey, ClientError> {
        let request = AddSshKeyRequest {
            public_key: public_key.to_owned(),
            name: name.to_owned(),
        };
        Ok(self
            .users()
            .add_ssh_key(self.request(request))
            .await?
            .into_inner())
    }

    /// The caller's registered SSH keys.
    pub async fn list_ssh_keys(&self) -> Result<Vec<SshKey>, ClientError> {
        let response = self
            .users()
            .list_ssh_keys(self.request(ListSshKeysRequest {}))
            .await?;
        Ok(response.into_inner().keys)
    }

    /// Removes the caller's key with this fingerprint ("SHA256:...").
    pub async fn delete_ssh_key(&self, fingerprint: &str) -> Result<SshKey, ClientError> {
        let request = DeleteSshKeyRequest {
            fingerprint: fingerprint.to_owned(),
        };
        Ok(self
            .users()
            .delete_ssh_key(self.request(request))
            .await?
            .into_inner())
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        request
    }

    fn runners(&self) -> RunnersClient<Channel> {
        RunnersClient::new(self.channel.clone())
    }

    fn users(&self) -> UsersClient<Channel> {
        UsersClient::new(self.channel.clone())
    }

    fn jobs(&self) -> grad_proto::jobs_client::JobsClient<Channel> {
        grad_proto::jobs_client::JobsClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn workers(&self) -> grad_proto::workers_client::WorkersClient<Channel> {
        grad_proto::workers_client::WorkersClient::new(self.channel.clone())
    }

    fn secrets(&self) -> SecretsClient<Channel> {
        SecretsClient::new(self.channel.clone())
    }

    fn outputs(&self) -> OutputsClient<Channel> {
        // A set of many files, each with a URL, can exceed 4 MiB.
        OutputsClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn exec(&self) -> ExecClient<Channel> {
        ExecClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Milliseconds for the API's `uint32 timeout_ms`, saturating (about 49 days).
pub fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

fn normalize_url(server: &str) -> Result<String, ClientError> {
    let server = server.trim().trim_end_matches('/');
    let invalid = |reason: &str| ClientError::InvalidUrl {
        url: server.to_owned(),
        reason: reason.to_owned(),
    };
    if server.is_empty() {
        return Err(invalid("it is empty; expected http://HOST:PORT"));
    }
    match server.split_once("://") {
        None => Ok(format!("http://{server}")),
        Some(("http", _)) => Ok(server.to_owned()),
        Some(("https", _)) => Err(invalid(
            "https is not supported by this build of gractl; use http:// (for example behind a TLS-terminating proxy)",
        )),
        Some(_) => Err(invalid("expected http://HOST:PORT")),
    }
}

/// A short, lowercase reason for a failed connect ("connection refused").
fn connect_reason(error: &tonic::transport::Error) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = error.source();
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::ConnectionRefused => "connection refused".into(),
                io::ErrorKind::TimedOut => "timed out".into(),
                io::ErrorKind::ConnectionReset => "connection reset".into(),
                io::ErrorKind::AddrNotAvailable => "address not available".into(),
                _ => strip_os_error(&io.to_string()),
            };
        }
        cause = current.source();
    }
    deepest_message(error)
}

fn deepest_message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = error;
    while let Some(source) = deepest.source() {
        deepest = source;
    }
    strip_os_error(&deepest.to_string())
}

fn strip_os_error(message: &str) -> String {
    let message = match message.find(" (os error") {
        Some(at) => &message[..at],
        None => message,
    };
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_host_and_port_means_http() {
        assert_eq!(
            normalize_url("127.0.0.1:7070").ok(),
            Some("http://127.0.0.1:7070".to_owned())
        );
        assert_eq!(
            normalize_url("http://localhost:7070/").ok(),
            Some("http://localhost:7070".to_owned())
        );
        assert!(normalize_url("ftp://x").is_err());
        assert!(normalize_url("https://x").is_err());
        assert!(normalize_url("").is_err());
    }

    #[test]
    fn os_error_numbers_are_left_out_of_reasons() {
        assert_eq!(
            strip_os_error("Connection refused (os error 111)"),
            "connection refused"
        );
    }

    #[tokio::test]
    async fn connecting_to_a_closed_port_names_the_url_and_says_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let error = Client::connect(&format!("127.0.0.1:{port}"), "t")
            .await
            .expect_err("nothing listens there");
        assert_eq!(
            error.to_string(),
            format!("cannot reach grad at http://127.0.0.1:{port}: connection refused")
        );
    }
}
