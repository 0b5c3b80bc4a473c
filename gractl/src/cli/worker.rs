//! `gractl worker create|list|rm`: the machines that run your jobs. A
//! worker is a `grad-runner agent` started anywhere with the token `create`
//! prints once.

use std::{
    collections::HashMap,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    time::SystemTime,
};

use clap::{Args, Subcommand};

use super::Context;
use crate::{
    exit::{Code, Failure},
    output::{self, Format, Table},
};

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Register a worker and print its token (shown once)
    Create(CreateArgs),
    /// Your workers (admins: everyone's)
    #[command(visible_alias = "ls")]
    List,
    /// Delete a worker; its token stops working at once
    #[command(visible_alias = "rm")]
    Remove {
        /// Worker name
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Worker name: 1-63 lowercase letters, digits and '-'
    name: String,
    /// A label jobs can ask for (`labels:` in job.yaml); repeatable
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Run every user's jobs (admins only)
    #[arg(long)]
    shared: bool,
    /// Write the token to this file (0600) instead of printing it
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("'{text}': expected KEY=VALUE"))
}

pub(super) async fn run(context: &Context, command: WorkerCommand) -> anyhow::Result<()> {
    let workspace = context.workspace()?;
    let client = context.connect(workspace.as_ref()).await?;
    let mut out = io::stdout().lock();
    match command {
        WorkerCommand::Create(args) => {
            let labels: HashMap<String, String> = args.labels.into_iter().collect();
            let created = client
                .create_worker(&args.name, labels, args.shared)
                .await?;
            let worker = created.worker.unwrap_or_default();
            if let Some(path) = &args.token_file {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| {
                        Failure::new(Code::Usage, format!("--token-file {}: {e}", path.display()))
                    })?;
                writeln!(file, "{}", created.token)?;
            }
            match context.format {
                Format::Table => {
                    writeln!(out, "worker/{} created", worker.name)?;
                    match &args.token_file {
                        Some(path) => writeln!(
                            out,
                            "its token is in {}; start it with:\n  grad-runner agent --server {} --token-file {}",
                            path.display(),
                            client.server(),
                            path.display()
                        )?,
                        None => writeln!(
                            out,
                            "its token (shown once; keep it secret):\n{}\nstart it with: \
                             grad-runner agent --server {} --token-file FILE",
                            created.token,
                            client.server()
                        )?,
                    }
                }
                Format::Json | Format::Ndjson => output::write_json(
                    &mut out,
                    &output::WorkerCreated {
                        worker: output::Worker::from(&worker),
                        token: if args.token_file.is_some() {
                            String::new()
                        } else {
                            created.token
                        },
                    },
                )?,
            }
        }
        WorkerCommand::List => {
            let workers = client.list_workers().await?;
            match context.format {
                Format::Table => {
                    let now = SystemTime::now();
                    let mut table = Table::new(&["NAME", "OWNER", "SHARED", "LABELS", "LAST SEEN"]);
                    for w in &workers {
                        let mut labels: Vec<String> =
                            w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        labels.sort();
                        table.row(vec![
                            w.name.clone(),
                            w.owner.clone(),
                            if w.shared { "yes" } else { "no" }.into(),
                            if labels.is_empty() {
                                "-".into()
                            } else {
                                labels.join(",")
                            },
                            match &w.last_seen_time {
                                Some(t) => format!("{} ago", output::age(Some(t), now)),
                                None => "never".into(),
                            },
                        ]);
                    }
                    table.write(&mut out)?;
                }
                Format::Json => output::write_json(
                    &mut out,
                    &output::WorkerList {
                        workers: workers.iter().map(output::Worker::from).collect(),
                    },
                )?,
                Format::Ndjson => {
                    for w in &workers {
                        output::write_json(&mut out, &output::Worker::from(w))?;
                    }
                }
            }
        }
        WorkerCommand::Remove { name } => {
            let worker = client.delete_worker(&name).await?;
            match context.format {
                Format::Table => writeln!(out, "worker/{} deleted", worker.name)?,
                Format::Json | Format::Ndjson => {
                    output::write_json(&mut out, &output::Worker::from(&worker))?
                }
            }
        }
    }
    Ok(())
}
