//! `gractl outputs collect|list|pull|rm`: runners' `outputs/` as collected
//! into grad's blob store.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use clap::Subcommand;
use grad_proto::{OutputSet, RunnerState};
use indicatif::HumanBytes;

use super::Context;
use crate::{
    client::{Client, ClientError},
    output::{self, Format, Table},
    outputs,
};

#[derive(Debug, Subcommand)]
pub enum OutputsCommand {
    /// Upload what changed in a ready runner's outputs/ to the blob store now
    Collect {
        /// Runner name
        runner: String,
    },
    /// Your runners' collected outputs, or the files of one runner's
    #[command(visible_alias = "ls")]
    List {
        /// A runner name (a deleted runner's too), or a runner id from this list
        runner: Option<String>,
        /// Every user's outputs (admins only); adds an OWNER column
        #[arg(long, conflicts_with = "runner")]
        all: bool,
    },
    /// Download a runner's outputs to DIR, only what changed (a ready runner
    /// collects first; a paused or deleted one's are as last collected)
    Pull {
        /// A runner name (a deleted runner's too), or a runner id from `outputs list`
        runner: String,
        /// Where the files go [default: outputs/RUNNER]
        dir: Option<PathBuf>,
        /// Do not ask a ready runner to collect first: pull what was last collected
        #[arg(long)]
        no_collect: bool,
    },
    /// Forget a deleted runner's outputs and free the storage they used
    #[command(visible_alias = "rm")]
    Remove {
        /// A deleted runner's name, or a runner id from `outputs list`
        runner: String,
    },
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub(super) async fn run(context: &Context, command: OutputsCommand) -> anyhow::Result<()> {
    let workspace = context.workspace()?;
    let client = context.connect(workspace.as_ref()).await?;
    let mut out = io::stdout().lock();
    match command {
        OutputsCommand::Collect { runner } => {
            let set = client.collect_outputs(&runner).await?;
            match context.format {
                Format::Table => {
                    writeln!(
                        out,
                        "runner/{} outputs collected: {} file{} ({}), {} uploaded ({})",
                        set.runner,
                        set.file_count,
                        plural(set.file_count as usize),
                        HumanBytes(set.total_bytes),
                        set.uploaded_files,
                        HumanBytes(set.uploaded_bytes)
                    )?;
                    for skipped in &set.skipped {
                        eprintln!("skipped {skipped}");
                    }
                }
                Format::Json | Format::Ndjson => {
                    let mut shown = output::Outputs::new(&set, true);
                    shown.uploaded_files = Some(set.uploaded_files);
                    shown.uploaded_bytes = Some(set.uploaded_bytes);
                    output::write_json(&mut out, &shown)?;
                }
            }
        }
        OutputsCommand::List { runner: None, all } => {
            let sets = client.list_outputs(all).await?;
            match context.format {
                Format::Table => print_sets(&mut out, &sets, all)?,
                Format::Json => output::write_json(
                    &mut out,
                    &output::OutputsList {
                        outputs: sets
                            .iter()
                            .map(|s| output::Outputs::new(s, false))
                            .collect(),
                    },
                )?,
                Format::Ndjson => {
                    for set in &sets {
                        output::write_json(&mut out, &output::Outputs::new(set, false))?;
                    }
                }
            }
        }
        OutputsCommand::List {
            runner: Some(runner),
            ..
        } => {
            let set = client.get_outputs(&runner, false).await?;
            match context.format {
                Format::Table => print_files(&mut out, &set)?,
                Format::Json | Format::Ndjson => {
                    output::write_json(&mut out, &output::Outputs::new(&set, true))?
                }
            }
        }
        OutputsCommand::Pull {
            runner,
            dir,
            no_collect,
        } => {
            let collected_now = !no_collect && collect_if_ready(context, &client, &runner).await?;
            let set = client.get_outputs(&runner, true).await?;
            let dir = dir.unwrap_or_else(|| PathBuf::from("outputs").join(&set.runner));
            let what = format!("runner/{}", set.runner);
            download(context, &mut out, &set, &dir, &what, collected_now).await?;
        }
        OutputsCommand::Remove { runner } => {
            context.confirm(&format!("Remove the outputs of deleted runner {runner}?"))?;
            let set = client.delete_outputs(&runner).await?;
            match context.format {
                Format::Table => writeln!(
                    out,
                    "outputs of deleted runner/{} ({}) removed",
                    set.runner, set.runner_id
                )?,
                Format::Json | Format::Ndjson => {
                    output::write_json(&mut out, &output::Outputs::new(&set, false))?
                }
            }
        }
    }
    Ok(())
}

/// Pulls `set` (with download URLs) into `dir`, with a progress bar, and
/// says what moved; `what` names where it came from (`runner/r1`, `job/ID`).
pub(super) async fn download(
    context: &Context,
    out: &mut impl Write,
    set: &OutputSet,
    dir: &Path,
    what: &str,
    collected_now: bool,
) -> anyhow::Result<()> {
    let bar = context.progress_bar(outputs::total_bytes(set));
    let progress: grad_transfer::Progress = {
        let bar = bar.clone();
        Arc::new(move |n| bar.inc(n))
    };
    let pulled = outputs::pull(set, dir, Some(progress)).await;
    bar.finish_and_clear();
    let pulled = pulled?;
    match context.format {
        Format::Table => {
            let files = pulled.downloaded.len();
            write!(
                out,
                "pulled {files} file{} ({}) from {what} into {}",
                plural(files),
                HumanBytes(pulled.downloaded_bytes),
                dir.display()
            )?;
            if !pulled.unchanged.is_empty() {
                write!(out, "; {} unchanged", pulled.unchanged.len())?;
            }
            writeln!(out)?;
        }
        Format::Json | Format::Ndjson => output::write_json(
            out,
            &output::Pulled {
                runner: set.runner.clone(),
                runner_id: set.runner_id.clone(),
                dir: dir.display().to_string(),
                collected_now,
                collected: set.collect_time.as_ref().map(ToString::to_string),
                downloaded: pulled.downloaded,
                downloaded_bytes: pulled.downloaded_bytes,
                unchanged: pulled.unchanged,
            },
        )?,
    }
    Ok(())
}

/// Collects a ready runner's outputs; answers whether it did. A runner that
/// is not ready, or no longer exists, keeps what it last collected.
async fn collect_if_ready(
    context: &Context,
    client: &Client,
    runner: &str,
) -> anyhow::Result<bool> {
    match client.get_runner(runner).await {
        Ok(r) if r.state() == RunnerState::Ready => {
            client.collect_outputs(runner).await?;
            Ok(true)
        }
        Ok(r) => {
            context.progress(&format!(
                "runner {runner} is {}: pulling its outputs as last collected",
                output::runner_state(r.state())
            ));
            Ok(false)
        }
        Err(ClientError::Status(status)) if status.code() == tonic::Code::NotFound => Ok(false),
        Err(error) => Err(error.into()),
    }
}

fn collected_cell(set: &OutputSet, now: SystemTime) -> String {
    match &set.collect_time {
        Some(t) => format!("{} ago", output::age(Some(t), now)),
        None => "never".into(),
    }
}

fn print_sets(out: &mut impl Write, sets: &[OutputSet], all: bool) -> io::Result<()> {
    let now = SystemTime::now();
    let mut header = vec!["RUNNER", "STATE", "FILES", "SIZE", "COLLECTED", "ID"];
    if all {
        header.insert(0, "OWNER");
    }
    let mut table = Table::new(&header);
    for set in sets {
        let mut row = vec![
            set.runner.clone(),
            if set.runner_deleted {
                "deleted"
            } else {
                "live"
            }
            .into(),
            set.file_count.to_string(),
            HumanBytes(set.total_bytes).to_string(),
            collected_cell(set, now),
            set.runner_id.clone(),
        ];
        if all {
            row.insert(0, set.owner.clone());
        }
        table.row(row);
    }
    table.write(out)
}

fn print_files(out: &mut impl Write, set: &OutputSet) -> io::Result<()> {
    let now = SystemTime::now();
    writeln!(
        out,
        "runner/{}{}: {} file{} ({}), collected {}",
        set.runner,
        if set.runner_deleted { " (deleted)" } else { "" },
        set.file_count,
        plural(set.file_count as usize),
        HumanBytes(set.total_bytes),
        collected_cell(set, now)
    )?;
    if set.files.is_empty() {
        return Ok(());
    }
    let mut table = Table::new(&["PATH", "SIZE", "MODIFIED", "SHA256"]);
    for file in &set.files {
        table.row(vec![
            file.path.clone(),
            HumanBytes(file.size).to_string(),
            format!("{} ago", output::age(file.modify_time.as_ref(), now)),
            file.sha256[..file.sha256.len().min(12)].to_owned(),
        ]);
    }
    table.write(out)?;
    for skipped in &set.skipped {
        writeln!(out, "skipped {skipped}")?;
    }
    Ok(())
}
