//! The embedded default backend: one `grad-runner` process per runner on this
//! machine, its workspace under `<data-dir>/runners/<owner>/<name>/workspace`.
//!
//! Runner processes get their own process group and outlive grad on purpose:
//! after a grad restart they reconnect and nothing is lost.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Backend, BoxFuture, Error, Event, Spec};
use crate::{lock, store};

const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub runner_bin: PathBuf,
    /// The URL runners dial to reach grad.
    pub server_url: String,
    /// The Python interpreter runners use (None: the runner's default).
    pub python: Option<String>,
}

pub struct Local {
    settings: Settings,
    events: mpsc::Sender<Event>,
    /// Runner id -> pid of the processes this grad spawned (and reaps).
    children: Mutex<HashMap<String, u32>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Local {
    pub fn new(
        settings: Settings,
        events: mpsc::Sender<Event>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Local {
        Local {
            settings,
            events,
            children: Mutex::new(HashMap::new()),
            tracker,
            shutdown,
        }
    }

    fn runner_dir(&self, owner: &str, name: &str) -> PathBuf {
        self.settings
            .data_dir
            .join("runners")
            .join(owner)
            .join(name)
    }

    async fn spawn(&self, spec: &Spec) -> Result<Option<u32>, Error> {
        let r = &spec.runner;
        let dir = self.runner_dir(&r.owner_name, &r.name);
        let workspace = dir.join("workspace");
        for sub in ["code", "outputs", "data"] {
            let path = workspace.join(sub);
            fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        }
        let log_path = dir.join("runner.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io(format!("opening {}", log_path.display())))?;

        let servers = match spec.servers.is_empty() {
            true => self.settings.server_url.clone(),
            false => spec.servers.join(","),
        };
        let mut cmd = tokio::process::Command::new(&self.settings.runner_bin);
        cmd.arg("--server")
            .arg(servers)
            .arg("--runner-id")
            .arg(&r.id)
            .arg("--name")
            .arg(&r.name)
            .arg("--workspace")
            .arg(&workspace)
            // Outside the workspace: the host key is not the user's to edit.
            .arg("--state-dir")
            .arg(&dir)
            .env("GRAD_RUNNER_TOKEN", &spec.token)
            // A runner without GPUs sees none; with N it sees the first N.
            .env(
                "CUDA_VISIBLE_DEVICES",
                (0..r.resources.gpus)
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false);
        if let Some(python) = &self.settings.python {
            cmd.env("GRAD_PYTHON", python);
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            name: r.name.clone(),
            source: std::io::Error::new(
                source.kind(),
                format!("{}: {source}", self.settings.runner_bin.display()),
            ),
        })?;
        let pid = child.id();
        if let Some(pid) = pid {
            lock(&self.children).insert(r.id.clone(), pid);
            let events = self.events.clone();
            let runner_id = r.id.clone();
            let shutdown = self.shutdown.clone();
            self.tracker.spawn(async move {
                tokio::select! {
                    status = child.wait() => {
                        let status = match status {
                            Ok(s) => describe_exit(s),
                            Err(e) => format!("unknown ({e})"),
                        };
                        let _ = events.send(Event::Exited { runner_id, pid, status }).await;
                    }
                    // grad is stopping: leave the runner running; it reconnects
                    // to the next grad.
                    _ = shutdown.cancelled() => {}
                }
            });
        }
        Ok(pid)
    }

    async fn terminate(&self, runner: &store::Runner) -> Result<(), Error> {
        let child = lock(&self.children).remove(&runner.id);
        let Some(pid) = child.or(runner.pid) else {
            return Ok(());
        };
        // A pid from the store may have been reused since: only signal a
        // process that is this runner's grad-runner.
        if child.is_none() && !is_runner_process(pid, &runner.id) {
            return Ok(());
        }
        signal_group(pid, libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while process_exists(pid) {
            if Instant::now() >= deadline {
                signal_group(pid, libc::SIGKILL);
                tokio::time::sleep(Duration::from_millis(50)).await;
                if process_exists(pid) {
                    return Err(Error::StopTimeout {
                        pid,
                        seconds: STOP_GRACE.as_secs(),
                    });
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The interpreters the runner started live in their own groups and
        // exit when the runner's pipes close; nothing else to signal here.
        Ok(())
    }
}

impl Backend for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn workspace(&self, owner: &str, name: &str) -> PathBuf {
        self.runner_dir(owner, name).join("workspace")
    }

    fn start<'a>(&'a self, spec: &'a Spec) -> BoxFuture<'a, Result<Option<u32>, Error>> {
        Box::pin(self.spawn(spec))
    }

    fn stop<'a>(&'a self, runner: &'a store::Runner) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.terminate(runner))
    }

    fn remove<'a>(&'a self, runner: &'a store::Runner) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let dir = self.runner_dir(&runner.owner_name, &runner.name);
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io(format!("removing {}", dir.display()))(e)),
            }
        })
    }

    fn alive(&self, runner: &store::Runner) -> bool {
        runner
            .pid
            .is_some_and(|pid| is_runner_process(pid, &runner.id))
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}{}", signal_name(sig)),
        _ => status.to_string(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGABRT => " (SIGABRT)",
        _ => "",
    }
}

/// Whether `pid` is the grad-runner of runner `runner_id` (its argv names it).
fn is_runner_process(pid: u32, runner_id: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if is_zombie(pid) {
        return false;
    }
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == runner_id.as_bytes())
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

#[allow(unsafe_code)]
fn signal_group(pid: u32, signal: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a
    // stale group id at worst fails with ESRCH.
    unsafe {
        libc::kill(-(pid as i32), signal);
    }
}
