//! `gractl runner create|list|get|pause|resume|delete`.

use std::{
    io::{self, Write},
    time::{Duration, SystemTime},
};

use clap::{Args, Subcommand};
use grad_proto::{Resources, Runner, RunnerState};

use super::Context;
use crate::{
    client::{Client, ClientError},
    exit::{Code, Failure},
    output::{self, Format, Table},
    quantity::{Cpu, QuantityError, Size, parse_duration},
};

const DEFAULT_CPU: Cpu = Cpu(1000);
const DEFAULT_MEMORY: Size = Size(2 << 30);
const DEFAULT_STORAGE: Size = Size(10 << 30);

#[derive(Debug, Subcommand)]
pub enum RunnerCommand {
    /// Create a runner (resources default to the workspace's `defaults`)
    Create(CreateArgs),
    /// List your runners
    #[command(visible_alias = "ls")]
    List {
        /// Every user's runners (admins only); adds an OWNER column
        #[arg(long)]
        all: bool,
    },
    /// Show one runner
    Get {
        /// Runner name
        name: String,
    },
    /// Stop a runner, keeping its workspace (its outputs/ is collected first)
    Pause(StopArgs),
    /// Start a paused runner again
    Resume(WaitArgs),
    /// Delete a runner and its workspace (its outputs/ is collected first and
    /// stays pullable: `gractl outputs pull NAME`)
    #[command(visible_alias = "rm")]
    Delete(StopArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Runner name, unique among your runners
    name: String,
    /// CPU cores: 2, 0.5 or 500m [default: 1]
    #[arg(long, value_name = "CORES", value_parser = parse_cpu)]
    cpu: Option<Cpu>,
    /// Memory: 512Mi, 4Gi (binary) or 1G (decimal) [default: 2Gi]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<Size>,
    /// Workspace storage, like --memory [default: 10Gi]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    storage: Option<Size>,
    /// GPUs (pro plan) [default: 0]
    #[arg(long, visible_alias = "gpu", value_name = "N")]
    gpus: Option<u32>,
    /// Mount the workspace's dataset NAME (datasets/NAME.yaml) read-only at
    /// data/NAME; repeatable
    #[arg(long = "dataset", value_name = "NAME")]
    datasets: Vec<String>,
    #[command(flatten)]
    wait: Wait,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Runner name
    name: String,
    #[command(flatten)]
    wait: Wait,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Runner name
    name: String,
    /// Do not collect outputs/ into the blob store first (what changed since
    /// the last collection is then not kept)
    #[arg(long)]
    skip_outputs: bool,
    #[command(flatten)]
    wait: Wait,
}

#[derive(Debug, Args)]
struct Wait {
    /// Wait until the runner reaches its new state
    #[arg(long)]
    wait: bool,
    /// How long --wait waits
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    timeout: Duration,
}

fn parse_cpu(text: &str) -> Result<Cpu, QuantityError> {
    text.parse()
}

fn parse_size(text: &str) -> Result<Size, QuantityError> {
    text.parse()
}

fn parse_timeout(text: &str) -> Result<Duration, QuantityError> {
    parse_duration(text)
}

pub(super) async fn run(context: &Context, command: RunnerCommand) -> anyhow::Result<()> {
    let workspace = context.workspace()?;
    // Datasets are read (and their keys resolved) before anything is sent.
    let datasets = match &command {
        RunnerCommand::Create(args) if !args.datasets.is_empty() => {
            let Some(workspace) = &workspace else {
                return Err(Failure::new(
                    Code::Usage,
                    "--dataset: datasets live in a workspace; run this inside one or pass \
                     --workspace DIR",
                )
                .into());
            };
            let mut datasets = Vec::new();
            for name in &args.datasets {
                let (path, dataset) = super::dataset::find(&workspace.root, name)?;
                datasets.push(dataset.to_proto(&path)?);
            }
            datasets
        }
        _ => Vec::new(),
    };
    let client = context.connect(workspace.as_ref()).await?;
    match command {
        RunnerCommand::Create(args) => {
            let defaults = workspace.map(|w| w.defaults()).unwrap_or_default();
            let resources = Resources {
                cpu_millis: args.cpu.or(defaults.cpu).unwrap_or(DEFAULT_CPU).millis(),
                memory_bytes: args
                    .memory
                    .or(defaults.memory)
                    .unwrap_or(DEFAULT_MEMORY)
                    .bytes(),
                storage_bytes: args
                    .storage
                    .or(defaults.storage)
                    .unwrap_or(DEFAULT_STORAGE)
                    .bytes(),
                gpus: args.gpus.or(defaults.gpus).unwrap_or(0),
            };
            let runner = client
                .create_runner(&args.name, resources, datasets)
                .await?;
            if args.wait.wait {
                let runner = wait_ready(context, &client, &args.name, args.wait.timeout).await?;
                print_changed(context, &runner, "ready")
            } else {
                print_changed(context, &runner, "created")
            }
        }
        RunnerCommand::List { all } => {
            let runners = client.list_runners(all).await?;
            print_list(context, &runners, all)
        }
        RunnerCommand::Get { name } => {
            let runner = client.get_runner(&name).await?;
            print_runner(context, &runner)
        }
        RunnerCommand::Pause(StopArgs {
            name,
            skip_outputs,
            wait,
        }) => {
            let runner = client.pause_runner(&name, skip_outputs).await?;
            if wait.wait {
                context.progress(&format!("waiting for runner {name} to pause..."));
                let runner = client
                    .wait_runner(&name, &[RunnerState::Paused], wait.timeout)
                    .await?;
                expect_state(&runner, RunnerState::Paused)?;
                print_changed(context, &runner, "paused")
            } else {
                print_changed(context, &runner, &output::runner_state(runner.state()))
            }
        }
        RunnerCommand::Resume(WaitArgs { name, wait }) => {
            let runner = client.resume_runner(&name).await?;
            if wait.wait {
                let runner = wait_ready(context, &client, &name, wait.timeout).await?;
                print_changed(context, &runner, "ready")
            } else {
                print_changed(context, &runner, &output::runner_state(runner.state()))
            }
        }
        RunnerCommand::Delete(StopArgs {
            name,
            skip_outputs,
            wait,
        }) => {
            context.confirm(&format!("Delete runner {name} and its workspace?"))?;
            let runner = client.delete_runner(&name, skip_outputs).await?;
            if wait.wait {
                context.progress(&format!("waiting for runner {name} to be deleted..."));
                let deleted = match client
                    .wait_runner(&name, &[RunnerState::Deleted], wait.timeout)
                    .await
                {
                    Ok(runner) => {
                        expect_state(&runner, RunnerState::Deleted)?;
                        runner
                    }
                    // Gone before we asked: that is what we waited for.
                    Err(ClientError::Status(status)) if status.code() == tonic::Code::NotFound => {
                        Runner {
                            state: RunnerState::Deleted as i32,
                            ..runner
                        }
                    }
                    Err(error) => return Err(error.into()),
                };
                print_changed(context, &deleted, "deleted")
            } else {
                print_changed(context, &runner, &output::runner_state(runner.state()))
            }
        }
    }
}

async fn wait_ready(
    context: &Context,
    client: &Client,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<Runner> {
    context.progress(&format!("waiting for runner {name} to be ready..."));
    let runner = client
        .wait_runner(name, &[RunnerState::Ready], timeout)
        .await?;
    expect_state(&runner, RunnerState::Ready)?;
    Ok(runner)
}

/// WaitRunner also returns on terminal states; anything but `want` fails
/// with the runner's reason.
fn expect_state(runner: &Runner, want: RunnerState) -> Result<(), Failure> {
    let state = runner.state();
    if state == want {
        return Ok(());
    }
    let mut message = format!(
        "runner {} is {}, not {}",
        runner.name,
        output::runner_state(state),
        output::runner_state(want)
    );
    if !runner.reason.is_empty() {
        message = format!("{message}: {}", runner.reason);
    }
    Err(Failure::new(Code::Precondition, message))
}

/// `runner/NAME VERB` for people; the runner object for programs.
fn print_changed(context: &Context, runner: &Runner, verb: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => writeln!(out, "runner/{} {verb}", runner.name)?,
        Format::Json | Format::Ndjson => {
            output::write_json(&mut out, &output::Runner::from(runner))?
        }
    }
    Ok(())
}

/// The STATE column: upper case, with the reason for a failed runner.
fn state_cell(runner: &Runner) -> String {
    let state = output::runner_state(runner.state()).to_uppercase();
    if runner.state() == RunnerState::Failed && !runner.reason.is_empty() {
        format!("{state} ({})", runner.reason)
    } else {
        state
    }
}

fn print_list(context: &Context, runners: &[Runner], all: bool) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => {
            let now = SystemTime::now();
            let mut header = vec!["NAME"];
            if all {
                header.push("OWNER");
            }
            header.extend(["STATE", "CPU", "MEMORY", "GPUS", "AGE"]);
            let mut table = Table::new(&header);
            for runner in runners {
                let shown = output::Runner::from(runner);
                let mut row = vec![shown.name];
                if all {
                    row.push(shown.owner);
                }
                row.extend([
                    state_cell(runner),
                    shown.cpu,
                    shown.memory,
                    shown.gpus.to_string(),
                    output::age(runner.create_time.as_ref(), now),
                ]);
                table.row(row);
            }
            table.write(&mut out)?;
        }
        Format::Json => output::write_json(
            &mut out,
            &output::RunnerList {
                runners: runners.iter().map(output::Runner::from).collect(),
            },
        )?,
        Format::Ndjson => {
            for runner in runners {
                output::write_json(&mut out, &output::Runner::from(runner))?;
            }
        }
    }
    Ok(())
}

fn print_runner(context: &Context, runner: &Runner) -> anyhow::Result<()> {
    let shown = output::Runner::from(runner);
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table => {
            let created = match &shown.created {
                Some(created) => format!(
                    "{created} ({} ago)",
                    output::age(runner.create_time.as_ref(), SystemTime::now())
                ),
                None => "-".into(),
            };
            let mut fields = vec![
                ("name", shown.name),
                ("owner", shown.owner),
                ("state", shown.state.to_uppercase()),
            ];
            if !shown.reason.is_empty() {
                fields.push(("reason", shown.reason));
            }
            fields.extend([
                ("cpu", shown.cpu),
                ("memory", shown.memory),
                ("storage", shown.storage),
                ("gpus", shown.gpus.to_string()),
                ("backend", shown.backend),
                ("workspace", shown.workspace),
                (
                    "connected",
                    if shown.connected { "yes" } else { "no" }.to_owned(),
                ),
                ("created", created),
            ]);
            for dataset in &runner.datasets {
                let state = if dataset.mounted {
                    format!("{} mounted at data/{}", dataset.source, dataset.name)
                } else if dataset.error.is_empty() {
                    format!("{} not mounted yet", dataset.source)
                } else {
                    format!("{} NOT MOUNTED: {}", dataset.source, dataset.error)
                };
                fields.push(("dataset", format!("{}: {state}", dataset.name)));
            }
            output::write_fields(&mut out, &fields)?;
        }
        Format::Json | Format::Ndjson => output::write_json(&mut out, &shown)?,
    }
    Ok(())
}
