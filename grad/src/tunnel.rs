//! Tunnels: a client's byte stream spliced to a runner's SSH server. The
//! runner has no inbound port: grad asks its agent to dial back
//! (`RunnerAgent.Tunnel`), matches the two streams by tunnel id, and hands
//! each side's incoming stream to the other as its response stream: frames go
//! from one HTTP/2 connection to the other with no task or queue of ours in
//! between, and HTTP/2 flow control carries the backpressure end to end.
//! Either side ending closes both.

use std::{
    collections::{HashMap, hash_map::Entry},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use grad_proto::{
    AgentCommand, OpenTunnel, TunnelFrame, agent_command::Command, tunnels_client::TunnelsClient,
};
use tokio::sync::oneshot;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Status, Streaming};

use crate::{
    agents::Activity,
    auth::UserCaller,
    error::{Error, Result},
    lock,
    replicas::Origin,
    runners::{Reach, Runners},
};

/// How long the first frame and the runner's dial-back may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

struct Pending {
    runner_id: String,
    /// What the runner's side will send: the client's frames.
    to_runner: Splice,
    /// Where the runner's side hands over its incoming frames.
    runner_end: oneshot::Sender<Streaming<TunnelFrame>>,
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
    /// runner to dial back, and splices the two streams. A runner connected
    /// to another replica is reached through that one.
    pub async fn open(
        self: &Arc<Self>,
        runners: &Arc<Runners>,
        caller: &UserCaller,
        mut client: Streaming<TunnelFrame>,
        origin: &Origin,
    ) -> Result<Splice> {
        let first = first_frame(&mut client).await?;
        if first.runner.is_empty() {
            return Err(Error::InvalidArgument(
                "runner: the first tunnel frame must name the runner".into(),
            ));
        }
        let mut moved = false;
        let (runner, agent) = loop {
            match runners.usable(caller, &first.runner, origin).await? {
                Reach::Here(runner, agent) => break (runner, agent),
                // The client's stream can be handed on only once: the
                // replica is checked first.
                Reach::Replica(_, url) if runners.replicas().reachable(&url).await => {
                    return forward(runners, origin, &url, first, client).await;
                }
                Reach::Replica(runner, url) => {
                    if moved || !runners.wait_moved(&runner.id, &url).await? {
                        return Err(runners.replicas().unreachable_error(
                            &first.runner,
                            &url,
                            "no answer to a health check",
                        ));
                    }
                    moved = true;
                }
            }
        };
        let tunnel_id = uuid::Uuid::new_v4().to_string();
        let activity = Arc::new(agent.activity());
        let (runner_end, dialed) = oneshot::channel();
        let closed = CancellationToken::new();
        let shutdown = runners.shutdown_token();
        lock(&self.pending).insert(
            tunnel_id.clone(),
            Pending {
                runner_id: runner.id.clone(),
                to_runner: Splice::new(client, first.data, &closed, &shutdown).in_use(&activity),
                runner_end,
            },
        );
        let open = AgentCommand {
            command: Some(Command::OpenTunnel(OpenTunnel {
                tunnel_id: tunnel_id.clone(),
            })),
        };
        // Gone when this returns or is dropped (the client left), unless
        // the runner took it.
        let _waiting = Waiting {
            tunnels: self,
            tunnel_id: &tunnel_id,
        };
        // The owner's keys as they are now go first: a key added a moment
        // ago on another replica is there when the SSH client offers it.
        let keys = runners.authorized_keys(&runner.owner_id).await?;
        let dialed = async {
            agent.commands.send(keys).await.ok()?;
            agent.commands.send(open).await.ok()?;
            tokio::time::timeout(HANDSHAKE, dialed).await.ok()?.ok()
        };
        let Some(runner_frames) = dialed.await else {
            return Err(Error::Unavailable(format!(
                "runner {} did not open its side of the tunnel within 10s",
                first.runner
            )));
        };
        tracing::info!(runner = %runner.name, owner = %runner.owner_name, tunnel = %tunnel_id, "tunnel open");
        Ok(Splice::new(runner_frames, Bytes::new(), &closed, &shutdown).in_use(&activity))
    }

    /// The runner's side: the dial-back for a tunnel grad asked it to open.
    pub async fn accept(
        &self,
        runner_id: &str,
        mut inbound: Streaming<TunnelFrame>,
    ) -> Result<Splice> {
        let first = first_frame(&mut inbound).await?;
        let Pending {
            to_runner,
            runner_end,
            ..
        } = match lock(&self.pending).entry(first.tunnel_id.clone()) {
            Entry::Vacant(_) => {
                return Err(Error::NotFound(format!(
                    "no tunnel '{}' is waiting",
                    first.tunnel_id
                )));
            }
            // Another runner's tunnel stays where it is.
            Entry::Occupied(waiting) if waiting.get().runner_id != runner_id => {
                return Err(Error::PermissionDenied(
                    "this tunnel belongs to another runner".into(),
                ));
            }
            Entry::Occupied(waiting) => waiting.remove(),
        };
        runner_end
            .send(inbound)
            .map_err(|_| Error::Unavailable("the client left before the tunnel opened".into()))?;
        Ok(to_runner)
    }
}

/// Opens the tunnel on the replica at `url` and splices the client to it:
/// frames pass through this replica as they come, with HTTP/2 flow control
/// on both legs.
async fn forward(
    runners: &Runners,
    origin: &Origin,
    url: &str,
    first: TunnelFrame,
    client: Streaming<TunnelFrame>,
) -> Result<Splice> {
    let replicas = runners.replicas();
    let closed = CancellationToken::new();
    let shutdown = runners.shutdown_token();
    let mut to_replica = Splice::new(client, Bytes::new(), &closed, &shutdown);
    to_replica.first = Some(first);
    let outbound = to_replica.filter_map(|frame| frame.ok());
    let from_replica = TunnelsClient::new(replicas.channel(url)?)
        .open(replicas.forward(origin, outbound))
        .await
        .map_err(Error::Forwarded)?
        .into_inner();
    Ok(Splice::new(from_replica, Bytes::new(), &closed, &shutdown))
}

/// A tunnel waiting for its runner; see [`Tunnels::open`].
struct Waiting<'a> {
    tunnels: &'a Tunnels,
    tunnel_id: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.tunnels.pending).remove(self.tunnel_id);
    }
}

fn data(bytes: Bytes) -> TunnelFrame {
    TunnelFrame {
        data: bytes,
        ..Default::default()
    }
}

/// One direction of a tunnel: the frames coming in on one side, as the
/// response stream of the other. Ends when its source ends or fails, when the
/// other direction ends (the two share `closed`) or when grad shuts down;
/// dropped (its side went away), it ends the other direction too.
pub struct Splice {
    /// Sent first: data that came with the client's first frame (or, to
    /// another replica, that whole frame).
    first: Option<TunnelFrame>,
    from: Streaming<TunnelFrame>,
    closed: CancellationToken,
    on_closed: Pin<Box<WaitForCancellationFutureOwned>>,
    on_shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The runner is in use while either direction of its tunnel is.
    _activity: Option<Arc<Activity>>,
}

impl Splice {
    fn new(
        from: Streaming<TunnelFrame>,
        first: Bytes,
        closed: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Splice {
        Splice {
            first: (!first.is_empty()).then(|| data(first)),
            from,
            closed: closed.clone(),
            on_closed: Box::pin(closed.clone().cancelled_owned()),
            on_shutdown: Box::pin(shutdown.clone().cancelled_owned()),
            _activity: None,
        }
    }

    fn in_use(mut self, activity: &Arc<Activity>) -> Splice {
        self._activity = Some(activity.clone());
        self
    }
}

impl Stream for Splice {
    type Item = std::result::Result<TunnelFrame, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.on_closed.as_mut().poll(cx).is_ready()
            || this.on_shutdown.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        loop {
            match ready!(Pin::new(&mut this.from).poll_next(cx)) {
                Some(Ok(frame)) if frame.data.is_empty() => {}
                Some(Ok(frame)) => return Poll::Ready(Some(Ok(data(frame.data)))),
                Some(Err(_)) | None => {
                    this.closed.cancel();
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}
