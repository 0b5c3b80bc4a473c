//! Tunnels: a client's byte stream spliced to a runner's SSH server. The
//! runner has no inbound port: grad asks its agent to dial back
//! (`RunnerAgent.Tunnel`), matches the two streams by tunnel id, and pumps
//! bytes both ways through bounded channels (gRPC flow control carries the
//! backpressure end to end). Either side ending closes both.

use std::{collections::HashMap, sync::Arc, time::Duration};

use grad_proto::{AgentCommand, OpenTunnel, TunnelFrame, agent_command::Command};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::{
    auth::UserCaller,
    error::{Error, Result},
    lock,
    runners::Runners,
};

/// How long the first frame and the runner's dial-back may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Frames in flight per direction, on top of HTTP/2's own windows.
const FRAMES: usize = 32;

pub type Frames = ReceiverStream<Result<TunnelFrame, Status>>;

struct Pending {
    runner_id: String,
    runner_end: oneshot::Sender<RunnerEnd>,
}

struct RunnerEnd {
    inbound: Streaming<TunnelFrame>,
    outbound: mpsc::Sender<Result<TunnelFrame, Status>>,
}

#[derive(Default)]
pub struct Tunnels {
    pending: std::sync::Mutex<HashMap<String, Pending>>,
}

async fn first_frame(stream: &mut Streaming<TunnelFrame>) -> Result<TunnelFrame> {
    match tokio::time::timeout(HANDSHAKE, stream.message()).await {
        Ok(Ok(Some(frame))) => Ok(frame),
        Ok(Ok(None)) => Err(Error::InvalidArgument(
            "the tunnel stream ended before its first frame".into(),
        )),
        Ok(Err(status)) => Err(Error::Unavailable(format!(
            "tunnel stream failed: {}",
            status.message()
        ))),
        Err(_) => Err(Error::DeadlineExceeded(
            "no first tunnel frame within 10s".into(),
        )),
    }
}

impl Tunnels {
    /// The client's side: checks the caller may reach the runner, asks the
    /// runner to dial back, and splices the two streams.
    pub async fn open(
        self: &Arc<Self>,
        runners: &Arc<Runners>,
        caller: &UserCaller,
        mut client: Streaming<TunnelFrame>,
    ) -> Result<Frames> {
        let first = first_frame(&mut client).await?;
        if first.runner.is_empty() {
            return Err(Error::InvalidArgument(
                "runner: the first tunnel frame must name the runner".into(),
            ));
        }
        let (runner, agent) = runners.usable(caller, &first.runner).await?;
        let tunnel_id = uuid::Uuid::new_v4().to_string();
        let (runner_end, dialed) = oneshot::channel();
        lock(&self.pending).insert(
            tunnel_id.clone(),
            Pending {
                runner_id: runner.id.clone(),
                runner_end,
            },
        );
        let open = AgentCommand {
            command: Some(Command::OpenTunnel(OpenTunnel {
                tunnel_id: tunnel_id.clone(),
            })),
        };
        let dialed = async {
            agent.commands.send(open).await.ok()?;
            tokio::time::timeout(HANDSHAKE, dialed).await.ok()?.ok()
        };
        let Some(end) = dialed.await else {
            lock(&self.pending).remove(&tunnel_id);
            return Err(Error::Unavailable(format!(
                "runner {} did not open its side of the tunnel within 10s",
                first.runner
            )));
        };
        tracing::info!(runner = %runner.name, owner = %runner.owner_name, tunnel = %tunnel_id, "tunnel open");
        if !first.data.is_empty() {
            let _ = end.outbound.send(Ok(data(first.data))).await;
        }
        let (to_client, frames) = mpsc::channel(FRAMES);
        let closed = CancellationToken::new();
        let shutdown = runners.shutdown_token();
        let tracker = runners.tracker();
        tracker.spawn(pump(client, end.outbound, closed.clone(), shutdown.clone()));
        tracker.spawn(pump(end.inbound, to_client, closed, shutdown));
        Ok(ReceiverStream::new(frames))
    }

    /// The runner's side: the dial-back for a tunnel grad asked it to open.
    pub async fn accept(
        &self,
        runner_id: &str,
        mut inbound: Streaming<TunnelFrame>,
    ) -> Result<Frames> {
        let first = first_frame(&mut inbound).await?;
        let pending = lock(&self.pending)
            .remove(&first.tunnel_id)
            .ok_or_else(|| {
                Error::NotFound(format!("no tunnel '{}' is waiting", first.tunnel_id))
            })?;
        if pending.runner_id != runner_id {
            return Err(Error::PermissionDenied(
                "this tunnel belongs to another runner".into(),
            ));
        }
        let (outbound, frames) = mpsc::channel(FRAMES);
        pending
            .runner_end
            .send(RunnerEnd { inbound, outbound })
            .map_err(|_| Error::Unavailable("the client left before the tunnel opened".into()))?;
        Ok(ReceiverStream::new(frames))
    }
}

fn data(bytes: Vec<u8>) -> TunnelFrame {
    TunnelFrame {
        data: bytes,
        ..Default::default()
    }
}

/// Moves frames from one stream to the other until either side ends.
async fn pump(
    mut from: Streaming<TunnelFrame>,
    to: mpsc::Sender<Result<TunnelFrame, Status>>,
    closed: CancellationToken,
    shutdown: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            frame = from.message() => frame,
            _ = to.closed() => break,
            _ = closed.cancelled() => break,
            _ = shutdown.cancelled() => break,
        };
        match frame {
            Ok(Some(frame)) if frame.data.is_empty() => {}
            Ok(Some(frame)) => {
                if to.send(Ok(data(frame.data))).await.is_err() {
                    break;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    closed.cancel();
}
