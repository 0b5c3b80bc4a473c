// Tunnel frames are buffers of up to 256 KiB: glibc's malloc hands such
// blocks back to the kernel and faults them in again (a tenth of grad's time
// relaying a tunnel); mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{future::Future, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use grad_runner::{agent, jobs};
use tokio_util::sync::CancellationToken;

/// grad-runner: the executor inside every runner, started by grad's backend;
/// or, as `grad-runner agent`, a standing worker for batch jobs on any
/// machine. Either way it dials out to grad, so it needs no inbound port.
#[derive(Debug, Parser)]
#[command(
    name = "grad-runner",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    runner: RunnerArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run batch jobs for grad as a worker (make one with `gractl worker create`)
    Agent(AgentArgs),
}

/// A runner, as grad's backend starts it.
#[derive(Debug, Args)]
struct RunnerArgs {
    /// grad's URL.
    #[arg(long, env = "GRAD_SERVER", required = true)]
    server: Option<String>,
    /// This runner's id (grad's record of it).
    #[arg(long, env = "GRAD_RUNNER_ID", required = true)]
    runner_id: Option<String>,
    /// This runner's name, for logs.
    #[arg(long, env = "GRAD_RUNNER_NAME", required = true)]
    name: Option<String>,
    /// The workspace: code/, outputs/, data/.
    #[arg(long, env = "GRAD_WORKSPACE", required = true)]
    workspace: Option<PathBuf>,
    /// Where to keep what must survive restarts (the SSH host key)
    /// [default: <workspace>/.grad].
    #[arg(long, env = "GRAD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The Python interpreter for execute-code.
    #[arg(long, env = "GRAD_PYTHON", default_value = "python3")]
    python: String,
    /// File holding the runner token (else GRAD_RUNNER_TOKEN).
    #[arg(long, env = "GRAD_RUNNER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

/// A standing worker.
#[derive(Debug, Args)]
struct AgentArgs {
    /// grad's URL, e.g. https://grad.example
    #[arg(long, env = "GRAD_SERVER")]
    server: String,
    /// File holding the worker's token (else GRAD_WORKER_TOKEN); never a flag value
    #[arg(long, env = "GRAD_WORKER_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Where jobs get their directories and local logs
    /// [default: $XDG_STATE_HOME/grad-agent or ~/.local/state/grad-agent]
    #[arg(long, env = "GRAD_AGENT_DIR", value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// GPUs this worker offers [default: as many as `nvidia-smi -L` lists]
    #[arg(long, value_name = "N")]
    gpus: Option<u32>,
    /// Jobs run at once
    #[arg(long, value_name = "N", default_value_t = 1)]
    max_jobs: usize,
    /// Take no jobs with an image, even with a Docker engine at hand
    /// (DOCKER_HOST, else /var/run/docker.sock)
    #[arg(long)]
    no_docker: bool,
    /// Run only this job, as a process in the image this agent runs in (a
    /// job's own pod, which grad makes), then exit
    #[arg(long, value_name = "JOB_ID")]
    job: Option<String>,
}

/// The token from `file`, else from the environment variable `var`.
fn read_token(file: Option<&PathBuf>, var: &str, what: &str) -> Result<String, String> {
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("reading --token-file {}: {e}", path.display())),
        None => std::env::var(var)
            .map_err(|_| format!("no {what} token: set {var} or pass --token-file FILE")),
    }
}

/// Runs `work` on a one-thread runtime until it ends or SIGTERM/SIGINT.
fn run<F, Fut, E>(work: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    // One thread: a runner's work (relaying SSH, kernel output, SFTP on
    // its own disk) is a chain of short hand-offs, and on a thread of its
    // own each is a function call instead of a wake-up of another thread.
    // Blocking work (slow mounts, child processes) has tokio's blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            signals.cancel();
        });
        work(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(message: String) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Some(Command::Agent(args)) => {
            // The token arrives out of band, never in argv.
            let token = match read_token(args.token_file.as_ref(), "GRAD_WORKER_TOKEN", "worker") {
                Ok(token) => token,
                Err(e) => return usage(e),
            };
            let work_dir = match args.work_dir.or_else(default_agent_dir) {
                // Absolute: Docker mounts need it.
                Some(dir) => std::path::absolute(&dir).unwrap_or(dir),
                None => return usage("no HOME to keep jobs under; pass --work-dir DIR".into()),
            };
            let config = jobs::Config {
                server: args.server,
                token,
                work_dir,
                gpus: args.gpus.unwrap_or_else(jobs::detect_gpus),
                max_jobs: args.max_jobs,
                docker: !args.no_docker && args.job.is_none(),
                only_job: args.job,
            };
            run(|shutdown| jobs::serve(config, shutdown))
        }
        None => {
            let args = cli.runner;
            let token = match read_token(args.token_file.as_ref(), "GRAD_RUNNER_TOKEN", "runner") {
                Ok(token) => token,
                Err(e) => return usage(e),
            };
            // clap requires these without a subcommand.
            let (Some(server), Some(runner_id), Some(name), Some(workspace)) =
                (args.server, args.runner_id, args.name, args.workspace)
            else {
                return usage("--server, --runner-id, --name and --workspace are required".into());
            };
            // A fresh volume (a pod's claim) starts empty: the layout is the
            // runner's to make.
            for sub in ["code", "outputs", "data"] {
                let dir = workspace.join(sub);
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    return usage(format!("--workspace: cannot create {}: {e}", dir.display()));
                }
            }
            let config = agent::Config {
                server,
                runner_id,
                name,
                state_dir: args.state_dir.unwrap_or_else(|| workspace.join(".grad")),
                workspace,
                python: args.python,
                token,
            };
            run(|shutdown| agent::run(config, shutdown))
        }
    }
}

/// `$XDG_STATE_HOME/grad-agent`, else `~/.local/state/grad-agent`.
fn default_agent_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    var("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".local/state")))
        .map(|dir| dir.join("grad-agent"))
}
