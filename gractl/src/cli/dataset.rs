//! `gractl dataset add|list|show|test|remove`: the workspace's `datasets/*.yaml`.

use std::io::{self, Write};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::Context;
use crate::{
    config::{ConfigError, Workspace},
    dataset::{self, Credentials, Dataset, EnvKeys, S3},
    exit::{Code, Failure},
    output::{self, Format, Table},
};

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Describe an S3 bucket (or a prefix in it) as datasets/NAME.yaml
    Add(AddArgs),
    /// List the workspace's datasets
    #[command(visible_alias = "ls")]
    List,
    /// Show one dataset (never its keys)
    Show {
        /// Dataset name
        name: String,
    },
    /// Check that the dataset can be listed with its credentials (grad tries,
    /// from where runners run)
    Test {
        /// Dataset name
        name: String,
    },
    /// Remove datasets/NAME.yaml (runners keep what they mounted)
    #[command(visible_alias = "rm")]
    Remove {
        /// Dataset name
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Dataset name: mounted at data/NAME in runners
    name: String,
    /// The S3 bucket
    #[arg(long)]
    bucket: String,
    /// A "directory" in the bucket, e.g. 2024/
    #[arg(long, default_value = "")]
    prefix: String,
    /// An S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: AWS)
    #[arg(long)]
    endpoint: Option<String>,
    /// The bucket's region
    #[arg(long)]
    region: Option<String>,
    /// Path-style URLs (default: on with --endpoint)
    #[arg(long, overrides_with = "no_path_style")]
    path_style: bool,
    /// Virtual-host-style URLs
    #[arg(long)]
    no_path_style: bool,
    /// Keys from a grad secret of this name
    #[arg(long, group = "keys")]
    secret: Option<String>,
    /// Keys from these environment variables (names, not values), read at `runner create`
    #[arg(
        long,
        value_name = "VAR",
        requires = "env_secret_access_key",
        group = "keys"
    )]
    env_access_key_id: Option<String>,
    #[arg(long, value_name = "VAR", requires = "env_access_key_id")]
    env_secret_access_key: Option<String>,
    /// Keys from this profile of the AWS shared credentials file
    #[arg(long, group = "keys")]
    profile: Option<String>,
    /// Overwrite an existing datasets/NAME.yaml
    #[arg(long)]
    force: bool,
}

/// What `list` and `show` print: the description, never keys.
#[derive(Debug, Serialize)]
struct Shown {
    name: String,
    source: String,
    endpoint: String,
    region: String,
    path_style: bool,
    credentials: &'static str,
    file: String,
}

impl Shown {
    fn new(path: &std::path::Path, dataset: &Dataset) -> Shown {
        Shown {
            name: dataset.name.clone(),
            source: dataset.source(),
            endpoint: dataset.s3.endpoint.clone().unwrap_or_default(),
            region: dataset.s3.region.clone().unwrap_or_default(),
            path_style: dataset.path_style(),
            credentials: dataset.credentials_kind(),
            file: path.display().to_string(),
        }
    }
}

fn workspace(context: &Context) -> anyhow::Result<Workspace> {
    match context.workspace()? {
        Some(workspace) => Ok(workspace),
        None => Err(Failure::new(
            Code::Usage,
            "datasets live in a workspace: run this inside one (see `gractl workspace init`) \
             or pass --workspace DIR",
        )
        .into()),
    }
}

pub(super) async fn run(context: &Context, command: DatasetCommand) -> anyhow::Result<()> {
    let workspace = workspace(context)?;
    let root = workspace.root.clone();
    let mut out = io::stdout().lock();
    match command {
        DatasetCommand::Test { name } => {
            let (path, dataset) = find(&root, &name)?;
            let proto = dataset.to_proto(&path)?;
            let client = context.connect(Some(&workspace)).await?;
            let tested = client.test_dataset(proto).await?;
            if !tested.ok {
                let code = match tested.error_code.as_str() {
                    "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "InvalidToken"
                    | "ExpiredToken" => Code::Auth,
                    "NoSuchBucket" => Code::NotFound,
                    _ => Code::Unavailable,
                };
                return Err(Failure::new(
                    code,
                    format!(
                        "dataset {name}: grad cannot list {}: {} ({})",
                        dataset.source(),
                        tested.error,
                        tested.error_code
                    ),
                )
                .into());
            }
            match context.format {
                Format::Table => {
                    let count = format!(
                        "{}{}",
                        tested.sample.len(),
                        if tested.truncated { "+" } else { "" }
                    );
                    let listed = if tested.sample.is_empty() {
                        "lists no objects: the prefix is empty".to_owned()
                    } else {
                        let noun = if count == "1" { "object" } else { "objects" };
                        format!("lists {count} {noun}: {}", tested.sample.join(", "))
                    };
                    writeln!(out, "dataset/{name} ok: {} {listed}", dataset.source())?;
                }
                Format::Json | Format::Ndjson => output::write_json(
                    &mut out,
                    &serde_json::json!({
                        "name": name,
                        "source": dataset.source(),
                        "ok": true,
                        "sample": tested.sample,
                        "truncated": tested.truncated,
                    }),
                )?,
            }
        }
        DatasetCommand::Add(args) => {
            let credentials = match (&args.secret, &args.env_access_key_id, &args.profile) {
                (None, None, None) => None,
                (secret, env, profile) => Some(Credentials {
                    secret: secret.clone(),
                    env: env.as_ref().map(|id| EnvKeys {
                        access_key_id: id.clone(),
                        secret_access_key: args.env_secret_access_key.clone().unwrap_or_default(),
                    }),
                    profile: profile.clone(),
                }),
            };
            let dataset = Dataset {
                name: args.name.clone(),
                s3: S3 {
                    bucket: args.bucket,
                    prefix: args.prefix,
                    path_style: (args.path_style || args.no_path_style).then_some(args.path_style),
                    endpoint: args.endpoint,
                    region: args.region,
                },
                credentials,
            };
            dataset
                .check()
                .map_err(|message| Failure::new(Code::Usage, message))?;
            let path = dataset::path(&root, &dataset.name);
            if path.exists() && !args.force {
                return Err(ConfigError::Exists { path }.into());
            }
            let text = dataset.to_yaml()?;
            let write = |source| ConfigError::Write {
                path: path.clone(),
                source,
            };
            std::fs::create_dir_all(root.join(dataset::DIR)).map_err(write)?;
            std::fs::write(&path, text).map_err(write)?;
            match context.format {
                Format::Table => writeln!(
                    out,
                    "dataset/{} written to {}",
                    dataset.name,
                    path.display()
                )?,
                Format::Json | Format::Ndjson => {
                    output::write_json(&mut out, &Shown::new(&path, &dataset))?
                }
            }
        }
        DatasetCommand::List => {
            let datasets = dataset::load_all(&root)?;
            match context.format {
                Format::Table => {
                    let mut table = Table::new(&["NAME", "SOURCE", "ENDPOINT", "CREDENTIALS"]);
                    for (path, dataset) in &datasets {
                        let shown = Shown::new(path, dataset);
                        let endpoint = if shown.endpoint.is_empty() {
                            "aws".to_owned()
                        } else {
                            shown.endpoint
                        };
                        table.row(vec![
                            shown.name,
                            shown.source,
                            endpoint,
                            shown.credentials.to_owned(),
                        ]);
                    }
                    table.write(&mut out)?;
                }
                Format::Json => {
                    let shown: Vec<Shown> =
                        datasets.iter().map(|(p, d)| Shown::new(p, d)).collect();
                    output::write_json(&mut out, &serde_json::json!({ "datasets": shown }))?;
                }
                Format::Ndjson => {
                    for (path, dataset) in &datasets {
                        output::write_json(&mut out, &Shown::new(path, dataset))?;
                    }
                }
            }
        }
        DatasetCommand::Show { name } => {
            let (path, dataset) = find(&root, &name)?;
            let shown = Shown::new(&path, &dataset);
            match context.format {
                Format::Table => output::write_fields(
                    &mut out,
                    &[
                        ("name", shown.name),
                        ("source", shown.source),
                        ("endpoint", or_dash(shown.endpoint)),
                        ("region", or_dash(shown.region)),
                        (
                            "path style",
                            if shown.path_style { "yes" } else { "no" }.into(),
                        ),
                        ("credentials", shown.credentials.into()),
                        ("file", shown.file),
                    ],
                )?,
                Format::Json | Format::Ndjson => output::write_json(&mut out, &shown)?,
            }
        }
        DatasetCommand::Remove { name } => {
            let (path, _) = find(&root, &name)?;
            std::fs::remove_file(&path).map_err(|source| ConfigError::Write {
                path: path.clone(),
                source,
            })?;
            match context.format {
                Format::Table => writeln!(out, "dataset/{name} removed")?,
                Format::Json | Format::Ndjson => output::write_json(
                    &mut out,
                    &serde_json::json!({ "name": name, "file": path.display().to_string(), "removed": true }),
                )?,
            }
        }
    }
    Ok(())
}

fn or_dash(text: String) -> String {
    if text.is_empty() { "-".into() } else { text }
}

/// Dataset `name` of the workspace at `root`; an unknown name lists the
/// known ones.
pub(super) fn find(
    root: &std::path::Path,
    name: &str,
) -> anyhow::Result<(std::path::PathBuf, Dataset)> {
    let path = dataset::path(root, name);
    if path.exists() {
        return Ok((path.clone(), dataset::load(&path)?));
    }
    let known: Vec<String> = dataset::load_all(root)?
        .into_iter()
        .map(|(_, d)| d.name)
        .collect();
    Err(Failure::new(
        Code::NotFound,
        format!(
            "no dataset '{name}' in {}; known: {}",
            root.join(dataset::DIR).display(),
            if known.is_empty() {
                "none (add one with `gractl dataset add`)".to_owned()
            } else {
                known.join(", ")
            }
        ),
    )
    .into())
}
