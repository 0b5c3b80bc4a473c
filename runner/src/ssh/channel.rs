//! One task per channel. A session channel collects its `pty-req` and `env`
//! requests, then becomes what its first `exec`, `shell` or `subsystem sftp`
//! asks for. The connection's handler has already answered each request; the
//! task only acts on them, in the same order.

use std::{path::PathBuf, sync::Arc, time::Duration};

use russh::{
    Channel, ChannelMsg, ChannelOpenFailure,
    server::{ChannelOpenHandle, Handle, Msg},
};
use tokio::net::TcpStream;

use super::{
    process::{self, Launch, Program, PtyRequest},
    root::Root,
    sftp,
};

/// What a session channel's task needs from its server and connection.
pub(super) struct Context {
    pub(super) workspace: PathBuf,
    pub(super) root: Arc<Root>,
    pub(super) handle: Handle,
}

/// The environment variables a client may set (`SendEnv`/`SetEnv`): the
/// locale and the terminal, as OpenSSH's default `AcceptEnv` allows.
pub(super) fn env_allowed(name: &str) -> bool {
    matches!(name, "LANG" | "LANGUAGE" | "TERM" | "COLORTERM") || name.starts_with("LC_")
}

pub(super) async fn run(mut channel: Channel<Msg>, context: Context) {
    let mut pty: Option<PtyRequest> = None;
    let mut env = Vec::new();
    let program = loop {
        let Some(message) = channel.wait().await else {
            return;
        };
        match message {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            } => {
                pty = Some(PtyRequest {
                    term,
                    cols: col_width,
                    rows: row_height,
                });
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            } => {
                if let Some(pty) = &mut pty {
                    pty.cols = col_width;
                    pty.rows = row_height;
                }
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } if env_allowed(&variable_name) => env.push((variable_name, variable_value)),
            ChannelMsg::Exec { command, .. } => break Program::Command(command),
            ChannelMsg::RequestShell { .. } => break Program::Shell,
            ChannelMsg::RequestSubsystem { name, .. } if name == "sftp" => {
                sftp::run(channel, context.root).await;
                return;
            }
            ChannelMsg::Close => return,
            _ => {}
        }
    };
    let launch = Launch {
        program,
        pty,
        env,
        workspace: context.workspace,
    };
    process::run(channel, context.handle, launch).await;
}

/// How long a `direct-tcpip` channel (`ssh -L`, `ssh -W`) waits to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A `direct-tcpip` channel: connects from the runner to `target` and copies
/// bytes both ways, so that `ssh -L` (Jupyter, TensorBoard, VS Code's server)
/// reaches ports inside the runner.
pub(super) async fn forward(
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    target: (String, u32),
) {
    let (host, port) = target;
    let Ok(port) = u16::try_from(port) else {
        reply.reject(ChannelOpenFailure::ConnectFailed).await;
        return;
    };
    let connected =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port))).await;
    let mut stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(host, port, error = %e, "ssh forward: connect failed");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
        Err(_) => {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    reply.accept().await;
    let mut channel = channel.into_stream();
    let _ = tokio::io::copy_bidirectional(&mut channel, &mut stream).await;
}
