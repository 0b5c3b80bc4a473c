// Tunnel frames are buffers of up to 256 KiB: glibc's malloc hands such
// blocks back to the kernel and faults them in again (a tenth of grad's time
// relaying a tunnel); mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use grad_runner::agent;
use tokio_util::sync::CancellationToken;

/// grad-runner: the executor inside every runner. Started by grad's backend;
/// it dials out to grad, so it needs no inbound port.
#[derive(Debug, Parser)]
#[command(name = "grad-runner", version)]
struct Config {
    /// grad's URL.
    #[arg(long, env = "GRAD_SERVER")]
    server: String,
    /// This runner's id (grad's record of it).
    #[arg(long, env = "GRAD_RUNNER_ID")]
    runner_id: String,
    /// This runner's name, for logs.
    #[arg(long, env = "GRAD_RUNNER_NAME")]
    name: String,
    /// The workspace: code/, outputs/, data/.
    #[arg(long, env = "GRAD_WORKSPACE")]
    workspace: PathBuf,
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

fn main() -> ExitCode {
    let config = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    // The token arrives out of band, never in argv.
    let token = match &config.token_file {
        Some(path) => std::fs::read_to_string(path)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("reading --token-file {}: {e}", path.display())),
        None => std::env::var("GRAD_RUNNER_TOKEN")
            .map_err(|_| "no runner token: set GRAD_RUNNER_TOKEN or --token-file".to_string()),
    };
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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
        agent::run(
            agent::Config {
                server: config.server,
                runner_id: config.runner_id,
                name: config.name,
                state_dir: config
                    .state_dir
                    .unwrap_or_else(|| config.workspace.join(".grad")),
                workspace: config.workspace,
                python: config.python,
                token,
            },
            shutdown,
        )
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
