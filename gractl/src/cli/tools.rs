//! The tools AI agents use — the same operations as the commands, with JSON
//! Schemas an agent can act on — served over MCP (`gractl mcp`) and, for
//! agents that prefer commands, as `gractl tools discover` (the
//! declarations) and `gractl tools call NAME` (arguments as JSON on stdin,
//! the result as JSON on stdout).
//!
//! A result is text plus structured content (and PNG images from plots). A
//! user-code exception, or not being logged in, is a result with `isError`
//! so the model can act on it; a bad argument or an infrastructure failure
//! (grad unreachable, a runner that cannot run code) is an error with the
//! reason.

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::Subcommand;
use grad_proto::{ExecStatus, ExecuteCodeRequest, Resources, RunnerState, exec_event::Event};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

use super::Context;
use crate::{
    client::{Client, ClientError},
    exit::{Code, Failure},
    output,
};

#[derive(Debug, Subcommand)]
pub enum ToolsCommand {
    /// Print the tool declarations (a JSON array of name, description, inputSchema)
    Discover,
    /// Call a tool: its arguments as a JSON object on stdin, its result as
    /// JSON on stdout (content, structuredContent, isError)
    Call {
        /// Tool name (see `gractl tools discover`)
        name: String,
    },
}

/// One tool's declaration.
pub struct Declaration {
    pub name: &'static str,
    pub description: &'static str,
    pub input_schema: Value,
}

/// What a call produced.
#[derive(Debug, Default)]
pub struct Answer {
    pub text: String,
    pub structured: Value,
    /// (base64 PNG, MIME type)
    pub images: Vec<(String, String)>,
    /// The model's to fix (user code raised, not logged in), not an outage.
    pub is_error: bool,
}

/// Why a call has no answer.
#[derive(Debug)]
pub enum Refusal {
    /// The arguments do not fit the schema; the message says how.
    BadArguments(String),
    /// No such tool.
    Unknown(String),
    /// A state the model can change (a paused runner, a name in use, a plan
    /// that forbids GPUs): answered as a result with `isError`.
    Refused(String),
    /// grad or a runner failed: the reason.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Refusal {
    fn from(error: anyhow::Error) -> Self {
        Refusal::Failed(error)
    }
}

impl From<ClientError> for Refusal {
    fn from(error: ClientError) -> Self {
        use tonic::Code as C;
        match error.status().map(|s| s.code()) {
            Some(C::InvalidArgument | C::NotFound | C::OutOfRange) => {
                Refusal::BadArguments(error.to_string())
            }
            Some(C::FailedPrecondition | C::AlreadyExists | C::PermissionDenied) => {
                Refusal::Refused(error.to_string())
            }
            _ => Refusal::Failed(error.into()),
        }
    }
}

impl Refusal {
    /// The result a refusal is, if it is one (not a protocol error).
    pub fn answer(self) -> Result<Answer, Refusal> {
        match self {
            Refusal::Refused(message) => Ok(Answer {
                structured: json!({ "error": { "code": "precondition", "message": message } }),
                text: message,
                is_error: true,
                ..Default::default()
            }),
            other => Err(other),
        }
    }
}

const RUNNER: &str = "The runner's name (see list_runners).";

fn object(properties: Value, required: &[&str]) -> Value {
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

/// Every tool, as agents see it.
pub fn declarations() -> Vec<Declaration> {
    let runner_only = || {
        object(
            json!({ "runner": { "type": "string", "description": RUNNER } }),
            &["runner"],
        )
    };
    vec![
        Declaration {
            name: "list_runners",
            description: "List your runners (remote machines with a persistent Python \
                interpreter, pandas and DuckDB) with their state: ready, paused, failed, ... \
                Use a ready one for execute_code, or create one.",
            input_schema: object(json!({}), &[]),
        },
        Declaration {
            name: "create_runner",
            description: "Create a runner and wait until it is ready (a few seconds). Its \
                workspace has code/ (the interpreter's working directory), outputs/ and data/ \
                (datasets, read-only).",
            input_schema: object(
                json!({
                    "name": { "type": "string", "pattern": "^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$",
                              "description": "1-40 lowercase letters, digits and '-'." },
                    "cpu": { "type": "string", "description": "CPU cores: \"2\", \"0.5\" or \"500m\" (default 1)." },
                    "memory": { "type": "string", "description": "Memory: \"4Gi\", \"512Mi\" (default 2Gi)." },
                    "gpus": { "type": "integer", "minimum": 0, "maximum": 8, "description": "GPUs (the pro plan; default 0)." }
                }),
                &["name"],
            ),
        },
        Declaration {
            name: "pause_runner",
            description: "Pause a runner: its processes stop (interpreter state is lost), its \
                files stay, and outputs/ is collected first.",
            input_schema: runner_only(),
        },
        Declaration {
            name: "resume_runner",
            description: "Start a paused (or failed) runner again and wait until it is ready.",
            input_schema: runner_only(),
        },
        Declaration {
            name: "delete_runner",
            description: "Delete a runner and its workspace (outputs/ is collected first and \
                stays downloadable).",
            input_schema: runner_only(),
        },
        Declaration {
            name: "execute_code",
            description: "Run Python in the runner's persistent interpreter (variables survive \
                between calls, like a notebook). The working directory is code/. Returns \
                stdout, stderr, rich results (a DataFrame as HTML, matplotlib figures as PNG \
                images) and, if the code raised, the exception's name, value and traceback \
                (isError: true) so you can fix the code and call again. `params` arrives as \
                the dict `params`.",
            input_schema: object(
                json!({
                    "runner": { "type": "string", "description": RUNNER },
                    "code": { "type": "string", "description": "Python source; the value of the last expression is returned." },
                    "params": { "type": "object", "description": "JSON values, available as the dict `params`." },
                    "session": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$",
                                 "description": "An interpreter of its own (default \"default\")." },
                    "timeout_s": { "type": "number", "exclusiveMinimum": 0,
                                   "description": "Interrupt the code after this many seconds; the interpreter and its variables stay." }
                }),
                &["runner", "code"],
            ),
        },
        Declaration {
            name: "list_files",
            description: "List a directory of the runner's workspace (\"\" or \".\" for its \
                root: code/, outputs/, data/).",
            input_schema: object(
                json!({
                    "runner": { "type": "string", "description": RUNNER },
                    "path": { "type": "string", "description": "Relative to the workspace, e.g. \"outputs\"." }
                }),
                &["runner"],
            ),
        },
        Declaration {
            name: "read_file",
            description: "Read a text file of the runner's workspace (at most 1 MiB; images \
                come back as image content).",
            input_schema: object(
                json!({
                    "runner": { "type": "string", "description": RUNNER },
                    "path": { "type": "string", "description": "Relative to the workspace, e.g. \"outputs/plot.png\"." }
                }),
                &["runner", "path"],
            ),
        },
        Declaration {
            name: "write_file",
            description: "Write a text file in the runner's workspace (its directory is made \
                if missing; an existing file is replaced).",
            input_schema: object(
                json!({
                    "runner": { "type": "string", "description": RUNNER },
                    "path": { "type": "string", "description": "Relative to the workspace, e.g. \"code/analysis.py\"." },
                    "content": { "type": "string", "description": "The file's whole text." }
                }),
                &["runner", "path", "content"],
            ),
        },
        Declaration {
            name: "list_datasets",
            description: "List the datasets of the current workspace (S3 buckets that a runner \
                created with them mounts read-only at data/<name>).",
            input_schema: object(json!({}), &[]),
        },
        Declaration {
            name: "submit_job",
            description: "Submit a batch job: bundle a local project directory that holds a \
                job.yaml and queue it; returns the job id. Follow it with job_status and \
                job_logs.",
            input_schema: object(
                json!({
                    "dir": { "type": "string", "description": "The project directory (local path)." }
                }),
                &["dir"],
            ),
        },
        Declaration {
            name: "job_status",
            description: "A job's state (queued, running, succeeded, failed, cancelled), its \
                reason and exit code.",
            input_schema: object(
                json!({ "id": { "type": "string", "description": "The job id (or a unique start of it)." } }),
                &["id"],
            ),
        },
        Declaration {
            name: "job_logs",
            description: "A job's log so far (stdout and stderr lines, in order).",
            input_schema: object(
                json!({ "id": { "type": "string", "description": "The job id (or a unique start of it)." } }),
                &["id"],
            ),
        },
    ]
}

/// The workflow, for the MCP server's `instructions`.
pub const INSTRUCTIONS: &str = "grad runs Python for you on remote runners. Workflow: \
    list_runners (or create_runner) to get a ready runner; execute_code to run Python there — \
    state persists between calls, pandas and DuckDB are installed, figures come back as images; \
    read_file / list_files / write_file for the runner's workspace (code/, outputs/, data/); \
    delete_runner when done. Batch work: submit_job, then job_status and job_logs. If \
    execute_code returns isError, read the traceback, fix the code and call again.";

fn arguments<T: DeserializeOwned>(args: Value) -> Result<T, Refusal> {
    serde_json::from_value(args).map_err(|e| Refusal::BadArguments(format!("arguments: {e}")))
}

fn answer(text: String, structured: Value) -> Answer {
    Answer {
        text,
        structured,
        ..Default::default()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunnerArg {
    runner: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateArgs {
    name: String,
    #[serde(default)]
    cpu: Option<String>,
    #[serde(default)]
    memory: Option<String>,
    #[serde(default)]
    gpus: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteArgs {
    runner: String,
    code: String,
    #[serde(default)]
    params: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    timeout_s: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathArgs {
    runner: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteArgs {
    runner: String,
    path: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirArgs {
    dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobArgs {
    id: String,
}

const READY_WAIT: Duration = Duration::from_secs(120);
const MAX_READ: u64 = 1 << 20;

/// Calls tool `name` with `args`.
pub async fn call(context: &Context, name: &str, args: Value) -> Result<Answer, Refusal> {
    let args = if args.is_null() { json!({}) } else { args };
    if !declarations().iter().any(|d| d.name == name) {
        return Err(Refusal::Unknown(format!(
            "no tool '{name}'; the tools are: {}",
            declarations()
                .iter()
                .map(|d| d.name)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if name == "list_datasets" {
        return list_datasets(context);
    }
    let client = match context
        .connect(context.workspace().ok().flatten().as_ref())
        .await
    {
        Ok(client) => client,
        Err(error) if exit_code(&error) == Code::Auth || is_config(&error) => {
            return Ok(Answer {
                text: format!(
                    "{error:#}. Log in first (`gractl login --server URL --token-file FILE`) or \
                     give gractl GRAD_SERVER and GRAD_TOKEN in its environment."
                ),
                structured: json!({ "error": { "code": "auth", "message": format!("{error:#}") } }),
                is_error: true,
                ..Default::default()
            });
        }
        Err(error) => return Err(Refusal::Failed(error)),
    };
    match name {
        "list_runners" => {
            let runners = client.list_runners(false).await?;
            let shown: Vec<output::Runner> = runners.iter().map(output::Runner::from).collect();
            let text = if shown.is_empty() {
                "no runners; create one with create_runner".to_owned()
            } else {
                shown
                    .iter()
                    .map(|r| format!("{} ({})", r.name, r.state))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            Ok(answer(text, json!({ "runners": shown })))
        }
        "create_runner" => {
            let a: CreateArgs = arguments(args)?;
            let parse = |what: &str, text: Option<String>, default: u64| -> Result<u64, Refusal> {
                match text {
                    None => Ok(default),
                    Some(t) if what == "cpu" => t
                        .parse::<crate::quantity::Cpu>()
                        .map(|c| u64::from(c.millis()))
                        .map_err(|e| Refusal::BadArguments(format!("cpu '{t}': {e}"))),
                    Some(t) => t
                        .parse::<crate::quantity::Size>()
                        .map(|s| s.bytes())
                        .map_err(|e| Refusal::BadArguments(format!("{what} '{t}': {e}"))),
                }
            };
            let resources = Resources {
                cpu_millis: parse("cpu", a.cpu, 0)? as u32,
                memory_bytes: parse("memory", a.memory, 0)?,
                storage_bytes: 0,
                gpus: a.gpus.unwrap_or(0),
            };
            client.create_runner(&a.name, resources, Vec::new()).await?;
            runner_state(&client, &a.name, RunnerState::Ready, "ready").await
        }
        "pause_runner" => {
            let a: RunnerArg = arguments(args)?;
            client.pause_runner(&a.runner, false).await?;
            runner_state(&client, &a.runner, RunnerState::Paused, "paused").await
        }
        "resume_runner" => {
            let a: RunnerArg = arguments(args)?;
            client.resume_runner(&a.runner).await?;
            runner_state(&client, &a.runner, RunnerState::Ready, "ready").await
        }
        "delete_runner" => {
            let a: RunnerArg = arguments(args)?;
            client.delete_runner(&a.runner, false).await?;
            match client
                .wait_runner(&a.runner, &[RunnerState::Deleted], READY_WAIT)
                .await
            {
                Ok(_) => {}
                Err(ClientError::Status(s)) if s.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            Ok(answer(
                format!("runner {} deleted", a.runner),
                json!({ "runner": a.runner, "state": "deleted" }),
            ))
        }
        "execute_code" => execute(&client, arguments(args)?).await,
        "list_files" | "read_file" | "write_file" => files(context, &client, name, args).await,
        "submit_job" => submit_job(&client, arguments(args)?).await,
        "job_status" => {
            let a: JobArgs = arguments(args)?;
            let job = client.get_job(&a.id).await?;
            let shown = output::Job::from(&job);
            Ok(answer(
                format!(
                    "job {} is {}{}",
                    shown.id,
                    shown.state,
                    if shown.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", shown.reason)
                    }
                ),
                serde_json::to_value(&shown).unwrap_or_default(),
            ))
        }
        "job_logs" => {
            let a: JobArgs = arguments(args)?;
            job_logs(&client, &a.id).await
        }
        _ => Err(Refusal::Unknown(format!("no tool '{name}'"))),
    }
}

fn exit_code(error: &anyhow::Error) -> Code {
    Code::of(error)
}

fn is_config(error: &anyhow::Error) -> bool {
    error.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::config::ConfigError>(),
            Some(crate::config::ConfigError::NotLoggedIn | crate::config::ConfigError::NoServer)
        )
    })
}

async fn runner_state(
    client: &Client,
    name: &str,
    want: RunnerState,
    word: &str,
) -> Result<Answer, Refusal> {
    let runner = client.wait_runner(name, &[want], READY_WAIT).await?;
    let shown = output::Runner::from(&runner);
    if runner.state() != want {
        return Err(Refusal::Failed(anyhow::anyhow!(
            "runner {name} is {}, not {word}{}",
            shown.state,
            if runner.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", runner.reason)
            }
        )));
    }
    Ok(answer(
        format!("runner {name} {word}"),
        serde_json::to_value(&shown).unwrap_or_default(),
    ))
}

async fn execute(client: &Client, a: ExecuteArgs) -> Result<Answer, Refusal> {
    let request = ExecuteCodeRequest {
        runner: a.runner.clone(),
        code: a.code,
        session: a.session.unwrap_or_default(),
        params_json: a
            .params
            .map(|p| Value::Object(p).to_string())
            .unwrap_or_default(),
        timeout_ms: a
            .timeout_s
            .map(|s| (s * 1000.0).clamp(1.0, f64::from(u32::MAX)) as u32)
            .unwrap_or(0),
    };
    let mut events = client.execute_code(request).await?;
    let mut result = output::ExecResult::empty(a.runner, String::new(), "failed");
    let mut status = ExecStatus::Unspecified;
    while let Some(event) = events.message().await.map_err(ClientError::from)? {
        match event.event {
            Some(Event::Started(s)) => {
                result.execution_id = s.execution_id;
                result.session = s.session;
            }
            Some(Event::Stream(chunk)) if chunk.name == "stderr" => {
                result.stderr.push_str(&chunk.text)
            }
            Some(Event::Stream(chunk)) => result.stdout.push_str(&chunk.text),
            Some(Event::Display(d)) => result.outputs.push(output::Display::from(&d)),
            Some(Event::Error(e)) => result.error = Some(output::ExecError::from(&e)),
            Some(Event::Finished(f)) => {
                status = f.status();
                result.status = output::exec_status(status);
                result.execution_count = f.execution_count;
                result.duration_ms = output::duration_ms(f.duration_us);
                result.message = Some(f.message).filter(|m| !m.is_empty());
            }
            None => {}
        }
    }
    match status {
        ExecStatus::Ok | ExecStatus::Error | ExecStatus::Timeout => {}
        ExecStatus::Failed | ExecStatus::Cancelled | ExecStatus::Unspecified => {
            return Err(Refusal::Failed(anyhow::anyhow!(
                "the runner could not run the code ({}): {}",
                result.status,
                result.message.clone().unwrap_or_default()
            )));
        }
    }
    let mut text = String::new();
    text.push_str(&result.stdout);
    if !result.stderr.is_empty() {
        text.push_str(&format!("[stderr]\n{}", result.stderr));
    }
    let mut images = Vec::new();
    for display in &result.outputs {
        if let Some(png) = display.data.get("image/png") {
            images.push((png.clone(), "image/png".to_owned()));
        }
        if let Some(plain) = display.data.get("text/plain") {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(plain);
        }
    }
    let is_error = match (&result.error, status) {
        (Some(error), _) => {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!(
                "{}: {}\n{}",
                error.ename,
                error.evalue,
                error.traceback.join("\n")
            ));
            true
        }
        (None, ExecStatus::Timeout) => {
            text.push_str("\n[timed out: the code was interrupted; its variables are kept]");
            true
        }
        _ => false,
    };
    Ok(Answer {
        text,
        structured: serde_json::to_value(&result).unwrap_or_default(),
        images,
        is_error,
    })
}

/// A workspace path as SFTP sees a local runner's workspace ("/" is its root).
fn remote(path: &str) -> Result<String, Refusal> {
    let trimmed = path.trim_start_matches("/workspace").trim_matches('/');
    if trimmed.split('/').any(|p| p == "..") {
        return Err(Refusal::BadArguments(format!(
            "path '{path}': stay inside the workspace (no '..')"
        )));
    }
    Ok(format!("/{trimmed}"))
}

async fn files(
    context: &Context,
    client: &Client,
    name: &str,
    args: Value,
) -> Result<Answer, Refusal> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let identity = context.identity()?;
    let (runner, path, content) = match name {
        "write_file" => {
            let a: WriteArgs = arguments(args)?;
            (a.runner, a.path, Some(a.content))
        }
        _ => {
            let a: PathArgs = arguments(args)?;
            (a.runner, a.path, None)
        }
    };
    let at = remote(&path)?;
    let handle = crate::ssh::connect(client, &identity, &runner)
        .await
        .map_err(|e| Refusal::Failed(e.into()))?;
    let sftp = crate::ssh::sftp(&handle)
        .await
        .map_err(|e| Refusal::Failed(e.into()))?;
    let missing = |e: russh_sftp::client::error::Error| {
        Refusal::BadArguments(format!("{path}: {e} (list_files shows what is there)"))
    };
    let result = match name {
        "list_files" => {
            let entries = sftp.read_dir(&at).await.map_err(missing)?;
            let mut listed: Vec<Value> = entries
                .map(|e| {
                    let meta = e.metadata();
                    json!({
                        "name": e.file_name(),
                        "type": if meta.is_dir() { "directory" } else if meta.is_symlink() { "link" } else { "file" },
                        "size": meta.size.unwrap_or(0),
                    })
                })
                .collect();
            listed.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            let text = listed
                .iter()
                .map(|e| {
                    let suffix = if e["type"] == "directory" { "/" } else { "" };
                    format!("{}{suffix}", e["name"].as_str().unwrap_or_default())
                })
                .collect::<Vec<_>>()
                .join("\n");
            answer(text, json!({ "path": path, "entries": listed }))
        }
        "read_file" => {
            let meta = sftp.metadata(&at).await.map_err(missing)?;
            let size = meta.size.unwrap_or(0);
            if meta.is_dir() {
                return Err(Refusal::BadArguments(format!(
                    "{path} is a directory: use list_files"
                )));
            }
            if size > MAX_READ {
                return Err(Refusal::BadArguments(format!(
                    "{path} is {size} bytes; read_file reads at most {MAX_READ} (summarise it \
                     with execute_code instead)"
                )));
            }
            let mut file = sftp.open(&at).await.map_err(missing)?;
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes)
                .await
                .context("reading the file")?;
            if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
                use base64::Engine;
                let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
                Answer {
                    text: format!("{path}: a PNG image of {} bytes", bytes.len()),
                    structured: json!({ "path": path, "size": bytes.len(), "mime_type": "image/png" }),
                    images: vec![(data, "image/png".into())],
                    is_error: false,
                }
            } else {
                let text = String::from_utf8(bytes).map_err(|_| {
                    Refusal::BadArguments(format!(
                        "{path} is not UTF-8 text; read it with execute_code instead"
                    ))
                })?;
                answer(
                    text.clone(),
                    json!({ "path": path, "size": text.len(), "content": text }),
                )
            }
        }
        _ => {
            let content = content.unwrap_or_default();
            if let Some((parent, _)) = at.rsplit_once('/')
                && !parent.is_empty()
            {
                let mut dir = String::new();
                for part in parent.trim_start_matches('/').split('/') {
                    dir.push('/');
                    dir.push_str(part);
                    if sftp.metadata(&dir).await.is_err() {
                        sftp.create_dir(&dir).await.map_err(missing)?;
                    }
                }
            }
            let mut file = sftp.create(&at).await.map_err(missing)?;
            file.write_all(content.as_bytes())
                .await
                .context("writing the file")?;
            file.shutdown().await.context("writing the file")?;
            answer(
                format!("wrote {} bytes to {path}", content.len()),
                json!({ "path": path, "size": content.len() }),
            )
        }
    };
    let _ = sftp.close().await;
    Ok(result)
}

fn list_datasets(context: &Context) -> Result<Answer, Refusal> {
    let Some(workspace) = context.workspace().map_err(|e| Refusal::Failed(e.into()))? else {
        return Ok(answer(
            "no workspace here (run gractl in a directory made by `gractl workspace init`), \
             so no datasets"
                .into(),
            json!({ "datasets": [] }),
        ));
    };
    let datasets =
        crate::dataset::load_all(&workspace.root).map_err(|e| Refusal::Failed(e.into()))?;
    let shown: Vec<Value> = datasets
        .iter()
        .map(|(_, d)| {
            json!({
                "name": d.name,
                "source": d.source(),
                "credentials": d.credentials_kind(),
                "mounted_at": format!("data/{}", d.name),
            })
        })
        .collect();
    let text = shown
        .iter()
        .map(|d| {
            format!(
                "{} ({})",
                d["name"].as_str().unwrap_or_default(),
                d["source"].as_str().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    Ok(answer(text, json!({ "datasets": shown })))
}

async fn submit_job(client: &Client, a: DirArgs) -> Result<Answer, Refusal> {
    if !a.dir.is_dir() {
        return Err(Refusal::BadArguments(format!(
            "dir '{}' is not a directory",
            a.dir.display()
        )));
    }
    let spec = crate::job::JobFile::load(&crate::job::file_in(&a.dir, None))
        .map_err(|e| Refusal::BadArguments(e.to_string()))?;
    let bundle = tempfile::NamedTempFile::new().context("a temporary file")?;
    let made = {
        let (dir, file) = (a.dir.clone(), bundle.reopen().context("a temporary file")?);
        tokio::task::spawn_blocking(move || grad_bundle::create(&dir, io::BufWriter::new(file)))
            .await
            .context("bundling")?
            .context("bundling")?
    };
    if let Some(upload) = client.create_upload(&made.sha256, made.size).await? {
        grad_transfer::Client::new()
            .context("HTTP client")?
            .put_file(&upload, bundle.path(), 0, made.size, None)
            .await
            .context("uploading the bundle")?;
    }
    let job = client.submit_job(spec.to_proto(), &made.sha256).await?;
    let shown = output::Job::from(&job);
    Ok(answer(
        format!(
            "job {} queued; follow it with job_status and job_logs",
            shown.id
        ),
        serde_json::to_value(&shown).unwrap_or_default(),
    ))
}

async fn job_logs(client: &Client, id: &str) -> Result<Answer, Refusal> {
    let job = client.get_job(id).await?;
    let http = grad_transfer::Client::new().context("HTTP client")?;
    let mut lines: Vec<grad_proto::LogLine> = Vec::new();
    let mut stream = client.stream_logs(&job.id, 0, false).await?;
    while let Some(chunk) = stream.message().await.map_err(ClientError::from)? {
        lines.extend(chunk.lines);
        if let Some(archive) = chunk.archive
            && let Some(download) = &archive.download
        {
            let dir = tempfile::tempdir().context("a temporary directory")?;
            let file = dir.path().join("log");
            http.get_file(download, &file, archive.size, &archive.sha256, None, None)
                .await
                .context("downloading the log")?;
            let text = std::fs::read_to_string(&file).context("reading the log")?;
            for line in text.lines().filter(|l| !l.is_empty()) {
                if let Ok(line) = grad_proto::log_archive::decode(line) {
                    lines.push(line);
                }
            }
        }
    }
    lines.sort_by_key(|l| l.seq);
    lines.dedup_by_key(|l| l.seq);
    let shown: Vec<output::LogLine> = lines.iter().map(output::LogLine::from).collect();
    let text = shown
        .iter()
        .map(|l| l.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    Ok(answer(
        text,
        json!({ "id": job.id, "state": output::job_state(job.state()), "lines": shown }),
    ))
}

/// MCP's `tools/call` result for an answer (what `tools call` prints).
pub fn to_result(answer: Answer) -> rmcp::model::CallToolResult {
    use rmcp::model::{CallToolResult, ContentBlock};
    let mut content = vec![ContentBlock::text(answer.text)];
    for (data, mime) in answer.images {
        content.push(ContentBlock::image(data, mime));
    }
    let mut result = if answer.is_error {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    };
    result.structured_content = Some(answer.structured);
    result
}

pub(super) async fn run(context: &Context, command: ToolsCommand) -> anyhow::Result<()> {
    match command {
        ToolsCommand::Discover => {
            let tools: Vec<Value> = declarations()
                .into_iter()
                .map(|d| json!({ "name": d.name, "description": d.description, "inputSchema": d.input_schema }))
                .collect();
            let mut out = io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &tools)?;
            writeln!(out)?;
            Ok(())
        }
        ToolsCommand::Call { name } => {
            let mut text = String::new();
            io::stdin()
                .read_to_string(&mut text)
                .context("reading the arguments from stdin")?;
            let args: Value = if text.trim().is_empty() {
                json!({})
            } else {
                serde_json::from_str(&text).map_err(|e| {
                    Failure::new(
                        Code::Usage,
                        format!("the arguments on stdin are not JSON: {e}"),
                    )
                })?
            };
            match call(context, &name, args).await.or_else(Refusal::answer) {
                Ok(answer) => {
                    let is_error = answer.is_error;
                    let result = to_result(answer);
                    let mut out = io::stdout().lock();
                    serde_json::to_writer(&mut out, &result)?;
                    writeln!(out)?;
                    if is_error {
                        return Err(Failure::quiet(Code::CodeRaised).into());
                    }
                    Ok(())
                }
                Err(Refusal::BadArguments(message) | Refusal::Unknown(message)) => {
                    Err(Failure::new(Code::Usage, message).into())
                }
                Err(Refusal::Failed(error)) => Err(error),
                Err(Refusal::Refused(message)) => {
                    Err(Failure::new(Code::Precondition, message).into())
                }
            }
        }
    }
}

/// For `gractl mcp --print-config`: the MCP server entry of an agent's settings.
pub fn client_config(server: Option<&str>) -> Value {
    let mut env = HashMap::new();
    env.insert("GRAD_TOKEN", "$GRAD_TOKEN".to_owned());
    if let Some(server) = server {
        env.insert("GRAD_SERVER", server.to_owned());
    }
    json!({ "mcpServers": { "grad": { "command": "gractl", "args": ["mcp"], "env": env } } })
}
