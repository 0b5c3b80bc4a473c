//! `gractl workspace init`, `sync` and `unsync`.
//!
//! `sync` starts the background process that keeps the mounts
//! (`gractl workspace sync --foreground --daemon`, output to
//! `.gractl/sync.log`) and waits until it has mounted every ready runner;
//! run again, it asks the running process (SIGHUP) to mount the runners that
//! became ready since. `sync --status` and `unsync` find that process
//! through the state file `.gractl/sync.json` (see [`crate::sync::state`]).

use std::{
    fs,
    io::{self, IsTerminal, Write},
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use grad_proto::RunnerState;
use serde::Serialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::{
    config::{DEFAULT_SERVER, Workspace},
    exit::{Code, Failure},
    output::{self, Format, Table},
    sync::{
        self, Options,
        daemon::{self, Change, Daemon},
        state::{self, State},
    },
};

/// How long `sync` waits for the background process to mount everything.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `unsync` gives the background process to unmount and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Create config.yaml, datasets/ and runners/ in DIR
    Init {
        /// The workspace directory (created if missing)
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Overwrite an existing config.yaml
        #[arg(long)]
        force: bool,
    },
    /// Mount each ready runner's workspace at runners/<name>/ and keep the
    /// mounts in the background; run again to mount runners created since
    Sync(SyncArgs),
    /// Unmount everything `gractl workspace sync` mounted and stop its
    /// background process
    Unsync,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Stay attached: mount, print changes, unmount on Ctrl-C or SIGTERM
    #[arg(long)]
    pub foreground: bool,
    /// Show what is mounted and whether each mount is healthy
    #[arg(long, conflicts_with = "foreground")]
    pub status: bool,
    /// Run as the background process `sync` starts (in its own session)
    #[arg(long, hide = true, requires = "foreground")]
    pub daemon: bool,
}

pub(super) async fn run(context: &Context, command: WorkspaceCommand) -> anyhow::Result<()> {
    match command {
        WorkspaceCommand::Init { dir, force } => init(context, &dir, force),
        WorkspaceCommand::Sync(args) if args.status => status(context),
        WorkspaceCommand::Sync(args) if args.foreground => foreground(context, args.daemon).await,
        WorkspaceCommand::Sync(_) => background(context).await,
        WorkspaceCommand::Unsync => unsync(context).await,
    }
}

fn init(context: &Context, dir: &Path, force: bool) -> anyhow::Result<()> {
    // The server gractl would use right now; a broken config elsewhere must
    // not stop a new workspace from being made.
    let workspace = context.workspace().ok().flatten();
    let credentials = context.credentials().ok().flatten();
    let server = context
        .server(workspace.as_ref(), credentials.as_ref())
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());

    let init = Workspace::init(dir, &server, force)?;
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => {
            writeln!(out, "Initialized workspace in {}", dir.display())?;
            writeln!(out, "  {}  (server: {server})", Workspace::FILE)?;
            for name in Workspace::DIRS {
                writeln!(out, "  {name}/")?;
            }
        }
        Format::Json | Format::Ndjson => output::write_json(
            &mut out,
            &output::WorkspaceInit {
                path: dir.display().to_string(),
                config: init.config.display().to_string(),
                created: init
                    .created_dirs
                    .iter()
                    .map(|path| path.display().to_string())
                    .collect(),
            },
        )?,
    }
    Ok(())
}

/// `-o json` for `gractl workspace sync`.
#[derive(Debug, Serialize)]
struct SyncReport {
    /// The background process.
    pid: u32,
    log: String,
    mounts: Vec<SyncedMount>,
}

#[derive(Debug, Serialize)]
struct SyncedMount {
    runner: String,
    path: String,
    /// `mounted` (now), `already mounted`, or `failed`.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `-o json` for `gractl workspace sync --status`.
#[derive(Debug, Serialize)]
struct StatusReport {
    /// The background process is alive.
    running: bool,
    pid: Option<u32>,
    started: Option<String>,
    log: String,
    mounts: Vec<MountStatus>,
}

#[derive(Debug, Serialize)]
struct MountStatus {
    runner: String,
    path: String,
    /// The kernel has it mounted.
    mounted: bool,
    /// Its SSH connection to the runner is up.
    connected: bool,
    /// Mounted, connected and served by a live process.
    healthy: bool,
}

/// `-o json` for `gractl workspace unsync`.
#[derive(Debug, Serialize)]
struct UnsyncReport {
    unmounted: Vec<UnmountedPath>,
}

#[derive(Debug, Serialize)]
struct UnmountedPath {
    runner: Option<String>,
    path: String,
}

/// The workspace the command is about (absolute), or a message saying how
/// to make one.
fn workspace_root(context: &Context) -> anyhow::Result<PathBuf> {
    let workspace = context.workspace()?.ok_or_else(|| {
        let here = context
            .cwd
            .as_deref()
            .map_or_else(|| ".".into(), |cwd| cwd.display().to_string());
        Failure::new(
            Code::Usage,
            format!(
                "no workspace here: neither {here} nor a parent has a config.yaml next to a \
                 runners/ directory; create one with `gractl workspace init DIR`, or pass \
                 --workspace DIR"
            ),
        )
    })?;
    Ok(std::path::absolute(&workspace.root).unwrap_or(workspace.root))
}

/// A missing /dev/fuse or fusermount3 is a precondition of this machine.
fn prerequisites() -> anyhow::Result<()> {
    sync::check_prerequisites()
        .map_err(|error| Failure::new(Code::Precondition, error.to_string()).into())
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// `gractl workspace sync`: makes sure the background process runs and has
/// mounted every ready runner, then reports.
async fn background(context: &Context) -> anyhow::Result<()> {
    let root = workspace_root(context)?;
    prerequisites()?;
    let workspace = Workspace::load(&root)?;
    let client = context.connect(Some(&workspace)).await?;
    let runners = client.list_runners(false).await?;
    let ready = runners
        .iter()
        .filter(|runner| runner.state() == RunnerState::Ready)
        .count();
    let log = State::log_path(&root);

    let previous = State::load(&root)?;
    let (state, before) = match previous {
        Some(running) if running.is_running() => {
            // It mounts runners that became ready when told to rescan.
            signal_process(running.pid, rustix::process::Signal::HUP)?;
            let scans = running.scans;
            let state = wait_for(&root, None, &log, |state| {
                state.pid == running.pid && state.scans > scans
            })
            .await?;
            let before = running.mounts.into_iter().map(|m| m.runner).collect();
            (state, before)
        }
        stale => {
            if let Some(stale) = stale {
                clean_up(&root, &stale)?;
            }
            if ready == 0 {
                return nothing_ready(context);
            }
            let mut child = spawn_daemon(context, &root, &log)?;
            let pid = child.id();
            let state = wait_for(&root, Some(&mut child), &log, |state| {
                state.pid == pid && state.scans >= 1
            })
            .await?;
            (state, Vec::new())
        }
    };

    let mut mounts: Vec<SyncedMount> = state
        .mounts
        .iter()
        .map(|mounted| SyncedMount {
            runner: mounted.runner.clone(),
            path: mounted.path.clone(),
            status: if before.contains(&mounted.runner) {
                "already mounted"
            } else {
                "mounted"
            },
            error: None,
        })
        .collect();
    mounts.extend(state.failed.iter().map(|failed| SyncedMount {
        runner: failed.runner.clone(),
        path: daemon::mount_path(&failed.runner),
        status: "failed",
        error: Some(failed.error.clone()),
    }));
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => {
            for mount in &mounts {
                match (mount.status, &mount.error) {
                    ("failed", Some(error)) => {
                        writeln!(out, "cannot mount {}: {error}", mount.runner)?;
                    }
                    (status, _) => writeln!(out, "{status} {} at {}", mount.runner, mount.path)?,
                }
            }
        }
        Format::Json | Format::Ndjson => output::write_json(
            &mut out,
            &SyncReport {
                pid: state.pid,
                log: log.display().to_string(),
                mounts,
            },
        )?,
    }
    if let Some(failed) = state.failed.first() {
        let names: Vec<&str> = state.failed.iter().map(|f| f.runner.as_str()).collect();
        return Err(Failure {
            code: Code::Unavailable,
            message: format!(
                "could not mount {} ({}); the others stay mounted. Details in {}",
                names.join(", "),
                failed.error,
                log.display()
            ),
            quiet: context.format == Format::Table,
        }
        .into());
    }
    Ok(())
}

fn nothing_ready(context: &Context) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => writeln!(
            out,
            "no ready runners to mount (create one with `gractl runner create NAME`)"
        )?,
        Format::Json | Format::Ndjson => output::write_json(
            &mut out,
            &SyncReport {
                pid: 0,
                log: String::new(),
                mounts: Vec::new(),
            },
        )?,
    }
    Ok(())
}

/// Starts `gractl workspace sync --foreground --daemon` with the same
/// settings, its output appended to the log.
fn spawn_daemon(context: &Context, root: &Path, log: &Path) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe().context("cannot find the gractl executable")?;
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let output = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut command = std::process::Command::new(exe);
    if let Some(server) = &context.server {
        command.arg("--server").arg(server);
    }
    if context.explicit_config
        && let Some(config) = &context.credentials_path
    {
        command
            .arg("--config")
            .arg(std::path::absolute(config).unwrap_or_else(|_| config.clone()));
    }
    command
        .arg("--workspace")
        .arg(root)
        .args(["workspace", "sync", "--foreground", "--daemon"])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output);
    command
        .spawn()
        .context("cannot start the background sync process")
}

/// Waits until the state file satisfies `done`. Fails if `child` (the
/// process just started) exits first, naming its log.
async fn wait_for(
    root: &Path,
    mut child: Option<&mut std::process::Child>,
    log: &Path,
    done: impl Fn(&State) -> bool,
) -> anyhow::Result<State> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(state) = State::load(root)?
            && done(&state)
        {
            return Ok(state);
        }
        if let Some(child) = child.as_deref_mut()
            && let Some(status) = child.try_wait()?
        {
            return Err(Failure::new(
                Code::Unavailable,
                format!(
                    "the background sync process ended ({status}) before mounting:\n{}",
                    log_tail(log)
                ),
            )
            .into());
        }
        if Instant::now() >= deadline {
            return Err(Failure::new(
                Code::Timeout,
                format!(
                    "the background sync process did not finish mounting within {}s; see {}",
                    READY_TIMEOUT.as_secs(),
                    log.display()
                ),
            )
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The last lines of the log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(10)..].join("\n");
    format!("{tail}\n(log: {})", log.display())
}

fn signal_process(pid: u32, signal: rustix::process::Signal) -> anyhow::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .context("invalid pid in the sync state file")?;
    rustix::process::kill_process(pid, signal)
        .with_context(|| format!("cannot signal the background sync process {pid:?}"))
}

/// Detaches mounts a dead background process left and forgets its state.
fn clean_up(root: &Path, stale: &State) -> anyhow::Result<Vec<UnmountedPath>> {
    let mut unmounted = Vec::new();
    for mounted in &stale.mounts {
        let path = root.join(&mounted.path);
        if state::is_mounted(&path) {
            sync::force_unmount(&path)?;
            unmounted.push(UnmountedPath {
                runner: Some(mounted.runner.clone()),
                path: mounted.path.clone(),
            });
        }
    }
    State::remove(root)?;
    Ok(unmounted)
}

/// `gractl workspace sync --status`.
fn status(context: &Context) -> anyhow::Result<()> {
    let root = workspace_root(context)?;
    let log = State::log_path(&root);
    let state = State::load(&root)?;
    let running = state.as_ref().is_some_and(State::is_running);
    let mounts: Vec<MountStatus> = state
        .iter()
        .flat_map(|state| &state.mounts)
        .map(|mounted| {
            let is_mounted = state::is_mounted(&root.join(&mounted.path));
            MountStatus {
                runner: mounted.runner.clone(),
                path: mounted.path.clone(),
                mounted: is_mounted,
                connected: running && mounted.connected,
                healthy: running && is_mounted && mounted.connected,
            }
        })
        .collect();
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => match &state {
            None => writeln!(out, "not syncing; start with `gractl workspace sync`")?,
            Some(state) => {
                if running {
                    writeln!(out, "syncing (pid {}, since {})", state.pid, state.started)?;
                } else {
                    writeln!(
                        out,
                        "the sync process ({}) is not running; `gractl workspace unsync` cleans up",
                        state.pid
                    )?;
                }
                let mut table = Table::new(&["RUNNER", "PATH", "STATUS"]);
                for mount in &mounts {
                    let status = match (mount.healthy, mount.mounted, running) {
                        (true, _, _) => "mounted",
                        (false, true, true) => "reconnecting",
                        (false, true, false) => "stale (no process serves it)",
                        (false, false, _) => "not mounted",
                    };
                    table.row(vec![
                        mount.runner.clone(),
                        mount.path.clone(),
                        status.to_owned(),
                    ]);
                }
                table.write(&mut out)?;
            }
        },
        Format::Json | Format::Ndjson => output::write_json(
            &mut out,
            &StatusReport {
                running,
                pid: state.as_ref().map(|state| state.pid),
                started: state.as_ref().map(|state| state.started.clone()),
                log: log.display().to_string(),
                mounts,
            },
        )?,
    }
    Ok(())
}

/// `gractl workspace unsync`: stops the background process (which
/// unmounts), then detaches whatever is still mounted under `runners/`.
async fn unsync(context: &Context) -> anyhow::Result<()> {
    let root = workspace_root(context)?;
    let mut unmounted = Vec::new();
    if let Some(state) = State::load(&root)? {
        if state.is_running() {
            signal_process(state.pid, rustix::process::Signal::TERM)?;
            let deadline = Instant::now() + STOP_TIMEOUT;
            while state::is_sync_process(state.pid) && Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
            }
            if state::is_sync_process(state.pid) {
                signal_process(state.pid, rustix::process::Signal::KILL)?;
            }
        }
        for mounted in &state.mounts {
            let path = root.join(&mounted.path);
            if state::is_mounted(&path) {
                sync::force_unmount(&path)?;
            }
            unmounted.push(UnmountedPath {
                runner: Some(mounted.runner.clone()),
                path: mounted.path.clone(),
            });
        }
        State::remove(&root)?;
    }
    // Mounts the state file does not know (a process killed mid-mount).
    for path in state::mounts_below(&root.join("runners")) {
        sync::force_unmount(&path)?;
        unmounted.push(UnmountedPath {
            runner: None,
            path: relative(&root, &path),
        });
    }
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table if unmounted.is_empty() => writeln!(out, "nothing was mounted")?,
        Format::Table => {
            for path in &unmounted {
                match &path.runner {
                    Some(runner) => writeln!(out, "unmounted {runner} ({})", path.path)?,
                    None => writeln!(out, "unmounted {}", path.path)?,
                }
            }
        }
        Format::Json | Format::Ndjson => {
            output::write_json(&mut out, &UnsyncReport { unmounted })?;
        }
    }
    Ok(())
}

/// `gractl workspace sync --foreground`: the process that keeps the mounts.
/// It runs on its own multi-threaded runtime, so the filesystems can use
/// more than one core.
async fn foreground(context: &Context, daemon: bool) -> anyhow::Result<()> {
    let root = workspace_root(context)?;
    prerequisites()?;
    if daemon {
        // Started by `sync`: out of the terminal's session, so closing the
        // terminal or Ctrl-C there leaves the mounts alone.
        let _ = rustix::process::setsid();
    }
    if let Some(state) = State::load(&root)?
        && state.pid != std::process::id()
        && state.is_running()
    {
        return Err(Failure::new(
            Code::Precondition,
            format!(
                "this workspace is already synced by process {}; stop it with `gractl workspace unsync`",
                state.pid
            ),
        )
        .into());
    }
    let context = context.clone();
    tokio::task::spawn_blocking(move || {
        // One thread for all mounts (besides the FUSE threads): each
        // request is a chain of hand-offs (FUSE → SFTP → SSH → gRPC), which
        // on one thread are calls rather than cross-thread wake-ups.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .thread_name("gractl-sync")
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(serve(&context, &root))
    })
    .await
    .context("the sync process failed")?
}

async fn serve(context: &Context, root: &Path) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr)
        .try_init();
    let workspace = Workspace::load(root)?;
    let client = context.connect(Some(&workspace)).await?;
    let identity = Arc::new(context.identity()?);
    let connector = daemon::over_ssh(client.clone(), identity);
    let keeper = Daemon::new(root, connector, Options::default());

    let stop = CancellationToken::new();
    let (rescan, rescans) = mpsc::channel(1);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let stopping = stop.clone();
    let signals = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => {
                    // One pending rescan is enough.
                    let _ = rescan.try_send(());
                }
            }
        }
        stopping.cancel();
    });
    let result = keeper
        .run(&client, rescans, stop, |change: &Change| {
            println!("{change}");
        })
        .await;
    signals.abort();
    let _ = signals.await;
    Ok(result?)
}
