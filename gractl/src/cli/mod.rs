//! The command line: clap definitions, where settings come from (flags, env,
//! workspace config, login credentials), and one module per command group.

mod cp;
mod dataset;
mod execute;
mod execution;
mod job;
mod login;
mod mcp;
mod outputs;
mod runner;
mod secret;
mod ssh;
mod tools;
mod worker;
mod workspace;

use std::{
    io::{self, IsTerminal, Write},
    path::{Path, PathBuf},
};

use clap::{CommandFactory, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{
    client::Client,
    config::{ConfigError, Credentials, Workspace},
    exit::{self, Code, Failure},
    output::Format,
    ssh::{Files, Identity},
};

pub use cp::{Copy, CpArgs};
pub use execute::{ExecuteCodeArgs, parse_param};
pub use execution::ExecutionCommand;
pub use login::LoginArgs;
pub use runner::RunnerCommand;
pub use ssh::{SshArgs, SshConfigArgs, SshKeyCommand};
pub use workspace::WorkspaceCommand;

const GLOBAL: &str = "Global options";

/// gractl: run code and batch jobs on remote runners through grad.
#[derive(Debug, Parser)]
#[command(name = "gractl", version, after_help = exit::HELP, max_term_width = 100)]
pub struct Cli {
    /// grad server URL (default: the workspace's `server`, else the one from `gractl login`)
    #[arg(long, global = true, env = "GRAD_SERVER", value_name = "URL", help_heading = GLOBAL)]
    pub server: Option<String>,

    /// Output format: table for people, json (one document) or ndjson (one event per line)
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table, help_heading = GLOBAL)]
    pub output: Format,

    /// Credentials file written by `gractl login`
    /// [default: $XDG_CONFIG_HOME/gractl/config.yaml or ~/.config/gractl/config.yaml]
    #[arg(long, global = true, env = "GRACTL_CONFIG", value_name = "FILE", help_heading = GLOBAL)]
    pub config: Option<PathBuf>,

    /// Workspace directory (default: the nearest ancestor of the current
    /// directory with a config.yaml next to a runners/ directory)
    #[arg(long, global = true, env = "GRAD_WORKSPACE", value_name = "DIR", help_heading = GLOBAL)]
    pub workspace: Option<PathBuf>,

    /// Never prompt: fail instead of asking (prompts only ever appear on a terminal)
    #[arg(long, global = true, env = "GRACTL_NO_INPUT", help_heading = GLOBAL)]
    pub no_input: bool,

    /// Answer yes to confirmations (deleting a runner or outputs)
    #[arg(short, long, global = true, help_heading = GLOBAL)]
    pub yes: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify a token with grad and store it with the server URL
    Login(LoginArgs),
    /// Show who the token belongs to
    Whoami,
    /// Create, list, inspect, pause, resume and delete runners
    #[command(subcommand)]
    Runner(RunnerCommand),
    /// Run Python code in a runner's persistent interpreter
    #[command(visible_alias = "exec")]
    ExecuteCode(ExecuteCodeArgs),
    /// Past executions of code on a runner
    #[command(subcommand)]
    Execution(ExecutionCommand),
    /// Open a shell or run a command on a runner over SSH (through grad)
    Ssh(SshArgs),
    /// Copy files to or from a runner: `cp ./data.csv r1:code/`, `cp -r r1:outputs .`
    Cp(CpArgs),
    /// Print OpenSSH config for your runners, so ssh, scp, rsync and VS Code reach them
    SshConfig(SshConfigArgs),
    /// List, add and delete the SSH keys your runners accept
    #[command(subcommand)]
    SshKey(SshKeyCommand),
    /// Set up a local workspace directory
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Describe S3 datasets for runners to mount (datasets/*.yaml)
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// Collect, list and pull runners' outputs/ (kept after a runner is deleted)
    #[command(subcommand)]
    Outputs(outputs::OutputsCommand),
    /// Set, list and delete your secrets (values never shown)
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Submit batch jobs and follow them: submit, list, get, cancel, wait, logs
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Register the machines that run your jobs (grad-runner agent)
    #[command(subcommand)]
    Worker(worker::WorkerCommand),
    /// Serve grad's tools to AI agents over the Model Context Protocol (stdio)
    Mcp(mcp::McpArgs),
    /// The same tools as commands: discover their declarations, call one with JSON
    #[command(subcommand)]
    Tools(tools::ToolsCommand),
    /// Print a shell completion script
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// What gractl takes from the process environment besides its flags. The
/// binary fills it in; tests build it by hand.
#[derive(Clone, Default)]
pub struct Environment {
    /// `GRAD_TOKEN`: overrides the stored token.
    pub token: Option<String>,
    /// Where the credentials live unless `--config` says otherwise.
    pub default_credentials: Option<PathBuf>,
    /// Where to start looking for a workspace.
    pub cwd: Option<PathBuf>,
    /// `TERM`, for a remote terminal.
    pub term: Option<String>,
    /// `LANG` and `LC_*`, passed to remote shells (as OpenSSH's SendEnv does).
    pub locale: Vec<(String, String)>,
}

impl std::fmt::Debug for Environment {
    // Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Environment")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("default_credentials", &self.default_credentials)
            .field("cwd", &self.cwd)
            .field("term", &self.term)
            .field("locale", &self.locale)
            .finish()
    }
}

impl Environment {
    pub fn from_process() -> Environment {
        let var = |name| std::env::var_os(name).filter(|value| !value.is_empty());
        Environment {
            token: std::env::var("GRAD_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
            default_credentials: Credentials::default_path(
                var("XDG_CONFIG_HOME").as_deref().map(Path::new),
                var("HOME").as_deref().map(Path::new),
            ),
            cwd: std::env::current_dir().ok(),
            term: std::env::var("TERM").ok().filter(|term| !term.is_empty()),
            locale: std::env::vars()
                .filter(|(name, _)| name == "LANG" || name.starts_with("LC_"))
                .collect(),
        }
    }
}

/// Runs one parsed command line.
pub async fn run(cli: Cli, environment: Environment) -> anyhow::Result<()> {
    let context = Context {
        format: cli.output,
        server: cli.server,
        explicit_config: cli.config.is_some(),
        credentials_path: cli.config.or(environment.default_credentials),
        workspace_dir: cli.workspace,
        token: environment.token,
        cwd: environment.cwd,
        term: environment.term,
        locale: environment.locale,
        no_input: cli.no_input,
        yes: cli.yes,
    };
    match cli.command {
        Command::Login(args) => login::login(&context, args).await,
        Command::Whoami => login::whoami(&context).await,
        Command::Runner(command) => runner::run(&context, command).await,
        Command::ExecuteCode(args) => execute::execute_code(&context, args).await,
        Command::Execution(command) => execution::run(&context, command).await,
        Command::Ssh(args) => ssh::ssh(&context, args).await,
        Command::Cp(args) => cp::cp(&context, args).await,
        Command::SshConfig(args) => ssh::ssh_config(&context, args).await,
        Command::SshKey(command) => ssh::ssh_key(&context, command).await,
        Command::Workspace(command) => workspace::run(&context, command).await,
        Command::Dataset(command) => dataset::run(&context, command).await,
        Command::Outputs(command) => outputs::run(&context, command).await,
        Command::Secret(command) => secret::run(&context, command).await,
        Command::Job(command) => job::run(&context, command).await,
        Command::Worker(command) => worker::run(&context, command).await,
        Command::Mcp(args) => mcp::run(&context, args).await,
        Command::Tools(command) => tools::run(&context, command).await,
        Command::Completion { shell } => {
            let mut out = io::stdout().lock();
            clap_complete::generate(shell, &mut Cli::command(), "gractl", &mut out);
            Ok(())
        }
    }
}

/// Settings for one command, resolved lazily so a command only reads the
/// files it needs.
#[derive(Clone)]
struct Context {
    format: Format,
    /// `--server` or `GRAD_SERVER`.
    server: Option<String>,
    /// `--config` or `GRACTL_CONFIG` was given.
    explicit_config: bool,
    credentials_path: Option<PathBuf>,
    /// `--workspace` or `GRAD_WORKSPACE`.
    workspace_dir: Option<PathBuf>,
    token: Option<String>,
    cwd: Option<PathBuf>,
    term: Option<String>,
    locale: Vec<(String, String)>,
    /// `--no-input`: never prompt.
    no_input: bool,
    /// `--yes`: confirmations are answered yes.
    yes: bool,
}

impl Context {
    /// gractl's SSH files, beside the credentials file.
    fn ssh_files(&self) -> Result<Files, Failure> {
        let dir = self
            .credentials_path
            .as_deref()
            .and_then(Path::parent)
            .ok_or_else(|| {
                Failure::new(
                    Code::Usage,
                    "cannot tell where to keep gractl's SSH key: HOME is not set; pass --config FILE",
                )
            })?;
        // A bare `--config config.yaml` means the current directory.
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        Ok(Files::in_dir(&dir))
    }

    /// gractl's SSH key, made on first use.
    fn identity(&self) -> anyhow::Result<Identity> {
        Ok(Identity::load_or_create(&self.ssh_files()?.identity)?)
    }

    /// The workspace config, if the command runs in (or names) a workspace.
    fn workspace(&self) -> Result<Option<Workspace>, ConfigError> {
        match &self.workspace_dir {
            Some(dir) => Workspace::load(dir).map(Some),
            None => match self.cwd.as_deref().and_then(Workspace::find) {
                Some(root) => Workspace::load(&root).map(Some),
                None => Ok(None),
            },
        }
    }

    fn credentials(&self) -> Result<Option<Credentials>, ConfigError> {
        match &self.credentials_path {
            Some(path) => Credentials::load(path),
            None => Ok(None),
        }
    }

    /// `--server` > `GRAD_SERVER` > workspace `server` > login credentials.
    fn server(
        &self,
        workspace: Option<&Workspace>,
        credentials: Option<&Credentials>,
    ) -> Option<String> {
        self.server
            .clone()
            .or_else(|| workspace.and_then(|w| w.server.clone()))
            .or_else(|| credentials.map(|c| c.server.clone()))
    }

    /// Connects with the resolved server and token.
    async fn connect(&self, workspace: Option<&Workspace>) -> anyhow::Result<Client> {
        let credentials = self.credentials()?;
        let server = self
            .server(workspace, credentials.as_ref())
            .ok_or(match credentials {
                None if self.token.is_none() => ConfigError::NotLoggedIn,
                _ => ConfigError::NoServer,
            })?;
        let token = self
            .token
            .clone()
            .or_else(|| credentials.map(|c| c.token))
            .ok_or(ConfigError::NotLoggedIn)?;
        Ok(Client::connect(&server, &token).await?)
    }

    /// `-r/--runner`, else the workspace's `defaults.runner`.
    fn runner(
        &self,
        flag: Option<String>,
        workspace: Option<&Workspace>,
    ) -> anyhow::Result<String> {
        flag.or_else(|| workspace.and_then(|w| w.defaults.as_ref()?.runner.clone()))
            .ok_or_else(|| ConfigError::NoRunner.into())
    }

    /// A byte progress bar on stderr, for people only.
    fn progress_bar(&self, total: u64) -> ProgressBar {
        if self.format != Format::Table || !io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{bytes:>10}/{total_bytes:<10} [{bar:30}] {bytes_per_sec:>12} {eta:>4}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    }

    /// Whether prompting is allowed: a person at a terminal, without
    /// `--no-input`.
    fn may_prompt(&self) -> bool {
        !self.no_input && io::stdin().is_terminal() && io::stderr().is_terminal()
    }

    /// Asks `question` before something that cannot be undone. Without a
    /// terminal (scripts, agents) or with `--yes`, nothing is asked.
    fn confirm(&self, question: &str) -> anyhow::Result<()> {
        if self.yes || !self.may_prompt() {
            return Ok(());
        }
        eprint!("{question} [y/N] ");
        io::stderr().flush()?;
        let mut answer = String::new();
        io::stdin().read_line(&mut answer)?;
        if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            Ok(())
        } else {
            Err(Failure::new(Code::Interrupted, "not confirmed; nothing was done").into())
        }
    }

    /// Progress for people only: shown when stderr is a terminal.
    fn progress(&self, message: &str) {
        if self.format == Format::Table && io::stderr().is_terminal() {
            eprintln!("{message}");
        }
    }
}
