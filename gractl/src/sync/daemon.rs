//! The process behind `gractl workspace sync`: one mount per ready runner
//! at `runners/<name>/`, kept in step with grad (a runner that is paused,
//! deleted or failed is unmounted within a poll), and the state file
//! ([`super::state`]) kept current for the commands that look from outside.
//!
//! How runners are reached is the caller's: [`Daemon`] takes a connector
//! (runner name → [`Connect`]); [`over_ssh`] is the real one, through grad's
//! tunnel and the runner's SSH server.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use grad_proto::{Runner, RunnerState};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::mpsc,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{
    Connect, Mount, Options, connect_with, force_unmount,
    remote::error_chain,
    state::{self, Failed, Mounted, State},
};
use crate::{
    client::{Client, ClientError},
    ssh::{self, Identity},
};

/// How often grad is asked whether the mounted runners are still ready.
pub const POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot list runners")]
    Grad(#[from] ClientError),
    #[error(transparent)]
    State(#[from] state::Error),
}

/// Where a runner is mounted: `runners/<name>`, relative to the workspace.
pub fn mount_path(runner: &str) -> String {
    format!("runners/{runner}")
}

/// Something the daemon did, as `gractl workspace sync` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Mounted { runner: String, path: String },
    Unmounted { runner: String, reason: String },
    Failed { runner: String, error: String },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Mounted { runner, path } => write!(f, "mounted {runner} at {path}"),
            Change::Unmounted { runner, reason } => write!(f, "unmounted {runner} ({reason})"),
            Change::Failed { runner, error } => write!(f, "cannot mount {runner}: {error}"),
        }
    }
}

/// Keeps the mounts of one workspace. See the module docs.
pub struct Daemon<C> {
    workspace: PathBuf,
    connector: C,
    options: Options,
    mounts: BTreeMap<String, Mount>,
    state: State,
}

impl<C> Daemon<C>
where
    C: Fn(&str) -> Connect,
{
    /// `options` apply to every mount (`root` and `name` are set per runner).
    pub fn new(workspace: &Path, connector: C, options: Options) -> Daemon<C> {
        Daemon {
            workspace: workspace.to_owned(),
            connector,
            options,
            mounts: BTreeMap::new(),
            state: State {
                pid: std::process::id(),
                started: state::timestamp(SystemTime::now()),
                ..State::default()
            },
        }
    }

    /// Mounts every ready runner that is not mounted yet; counts a scan.
    pub async fn scan(&mut self, runners: &[Runner]) -> Result<Vec<Change>, Error> {
        let mut mounting = JoinSet::new();
        for runner in runners {
            if runner.state() != RunnerState::Ready || self.mounts.contains_key(&runner.name) {
                continue;
            }
            let name = runner.name.clone();
            let path = self.workspace.join(mount_path(&name));
            let connect = (self.connector)(&name);
            let options = Options {
                name: format!("gractl:{name}"),
                ..self.options.clone()
            };
            mounting.spawn(async move {
                let mounted = async {
                    fs::create_dir_all(&path)
                        .map_err(|error| format!("cannot create {}: {error}", path.display()))?;
                    if state::is_mounted(&path) {
                        // Left by a process that died: nobody serves it.
                        force_unmount(&path).map_err(|error| error_chain(&error))?;
                    }
                    super::mount(&path, connect, options)
                        .await
                        .map_err(|error| error_chain(&error))
                };
                (name, mounted.await)
            });
        }
        let mut changes = Vec::new();
        self.state.failed.clear();
        while let Some(joined) = mounting.join_next().await {
            let Ok((runner, result)) = joined else {
                continue;
            };
            match result {
                Ok(mount) => {
                    let path = mount_path(&runner);
                    tracing::info!(runner, path, "mounted");
                    self.state.mounts.push(Mounted {
                        runner: runner.clone(),
                        path: path.clone(),
                        mounted: state::timestamp(SystemTime::now()),
                        connected: true,
                    });
                    self.mounts.insert(runner.clone(), mount);
                    changes.push(Change::Mounted { runner, path });
                }
                Err(error) => {
                    tracing::warn!(runner, error, "cannot mount");
                    self.state.failed.push(Failed {
                        runner: runner.clone(),
                        error: error.clone(),
                    });
                    changes.push(Change::Failed { runner, error });
                }
            }
        }
        self.state.mounts.sort_by(|a, b| a.runner.cmp(&b.runner));
        self.state.scans += 1;
        self.state.save(&self.workspace)?;
        Ok(changes)
    }

    /// Unmounts runners that are no longer ready (and forgets mounts that
    /// were unmounted from outside); refreshes the connection flags.
    pub async fn prune(&mut self, runners: &[Runner]) -> Result<Vec<Change>, Error> {
        let mut changes = Vec::new();
        let names: Vec<String> = self.mounts.keys().cloned().collect();
        for name in names {
            let state = runners
                .iter()
                .find(|runner| runner.name == name)
                .map(Runner::state);
            let reason = match state {
                None | Some(RunnerState::Deleting | RunnerState::Deleted) => Some("deleted"),
                Some(RunnerState::Pausing | RunnerState::Paused) => Some("paused"),
                Some(RunnerState::Failed) => Some("failed"),
                Some(_) => None,
            };
            let outside = self
                .mounts
                .get(&name)
                .is_some_and(|mount| !mount.is_mounted());
            let reason = match (reason, outside) {
                (Some(reason), _) => reason,
                (None, true) => "unmounted from outside",
                (None, false) => continue,
            };
            if let Some(mount) = self.mounts.remove(&name)
                && let Err(error) = mount.unmount().await
            {
                tracing::warn!(runner = name, error = error_chain(&error), "unmount failed");
            }
            tracing::info!(runner = name, reason, "unmounted");
            self.state.mounts.retain(|mounted| mounted.runner != name);
            changes.push(Change::Unmounted {
                runner: name,
                reason: reason.into(),
            });
        }
        let mut flags_changed = false;
        for mounted in &mut self.state.mounts {
            let connected = self
                .mounts
                .get(&mounted.runner)
                .is_some_and(Mount::is_connected);
            flags_changed |= mounted.connected != connected;
            mounted.connected = connected;
        }
        if flags_changed || !changes.is_empty() {
            self.state.save(&self.workspace)?;
        }
        Ok(changes)
    }

    /// Unmounts everything and removes the state file.
    pub async fn stop(mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        for (runner, mount) in std::mem::take(&mut self.mounts) {
            if let Err(error) = mount.unmount().await {
                tracing::warn!(runner, error = error_chain(&error), "unmount failed");
            }
            changes.push(Change::Unmounted {
                runner,
                reason: "stopped".into(),
            });
        }
        if let Err(error) = State::remove(&self.workspace) {
            tracing::warn!(error = error_chain(&error), "cannot remove the state file");
        }
        changes
    }

    /// Mounts the ready runners, then keeps the mounts in step with grad:
    /// a message on `rescan` mounts runners that became ready, `stop` ends
    /// it (everything unmounted, the state file removed). Every change is
    /// passed to `report` as it happens.
    pub async fn run(
        mut self,
        client: &Client,
        mut rescan: mpsc::Receiver<()>,
        stop: CancellationToken,
        mut report: impl FnMut(&Change),
    ) -> Result<(), Error> {
        self.state.save(&self.workspace)?;
        let started = async {
            let runners = client.list_runners(false).await?;
            self.scan(&runners).await
        };
        let changes = match started.await {
            Ok(changes) => changes,
            Err(error) => {
                self.stop().await;
                return Err(error);
            }
        };
        changes.iter().for_each(&mut report);
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let scan = tokio::select! {
                () = stop.cancelled() => break,
                message = rescan.recv() => message.is_some(),
                _ = poll.tick() => false,
            };
            let runners = match client.list_runners(false).await {
                Ok(runners) => runners,
                Err(error) => {
                    // grad may be restarting: keep the mounts, ask again.
                    tracing::warn!(error = error_chain(&error), "cannot list runners");
                    if scan {
                        self.state.scans += 1;
                        self.state.save(&self.workspace)?;
                    }
                    continue;
                }
            };
            let mut changes = self.prune(&runners).await?;
            if scan {
                changes.extend(self.scan(&runners).await?);
            }
            changes.iter().for_each(&mut report);
        }
        self.stop().await.iter().for_each(&mut report);
        Ok(())
    }
}

/// The connector for real runners: SSH through grad's tunnel (checking the
/// runner's host key), then the `sftp` subsystem on a new channel.
pub fn over_ssh(client: Client, identity: Arc<Identity>) -> impl Fn(&str) -> Connect {
    move |runner: &str| {
        let (client, identity, runner) = (client.clone(), Arc::clone(&identity), runner.to_owned());
        connect_with(move || {
            let (client, identity, runner) =
                (client.clone(), Arc::clone(&identity), runner.clone());
            async move {
                let handle = ssh::connect(&client, &identity, &runner).await?;
                sftp_stream(handle).await
            }
        })
    }
}

/// The `sftp` subsystem on a new channel of `handle`, as the byte stream a
/// mount reads and writes; it keeps the SSH connection alive while in use.
pub async fn sftp_stream(handle: ssh::Handle) -> Result<SshStream, ssh::Error> {
    let stream = ssh::sftp_channel(&handle).await?;
    Ok(SshStream {
        stream: Box::pin(stream),
        _handle: handle,
    })
}

/// An SFTP channel together with its SSH connection, which must live as
/// long as the channel is used.
pub struct SshStream {
    stream: Pin<Box<russh::ChannelStream<russh::client::Msg>>>,
    _handle: ssh::Handle,
}

impl AsyncRead for SshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.stream.as_mut().poll_read(context, buf)
    }
}

impl AsyncWrite for SshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.stream.as_mut().poll_write(context, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.stream.as_mut().poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.stream.as_mut().poll_shutdown(context)
    }
}
