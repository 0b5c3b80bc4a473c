//! `gractl job submit|list|get|cancel|wait|logs`: batch jobs. Submitting
//! bundles the project directory (grad-bundle), asks grad for an upload URL
//! for that digest — none if grad has the bundle already — PUTs it there,
//! and queues the job; logs are read line by line while the job runs and
//! from its archived log once it has ended.

use std::{
    io::{self, BufRead, Write},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use clap::{Args, Subcommand};
use grad_proto::{Job, JobState, LogStream};
use indicatif::HumanBytes;

use super::Context;
use crate::{
    client::{Client, ClientError},
    exit::{Code, Failure},
    job::{self, JobFile},
    output::{self, Format, Table},
    quantity::{QuantityError, parse_duration},
};

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Bundle a project directory (honouring .gitignore and .gradignore),
    /// upload it and queue the job its job.yaml describes
    Submit(SubmitArgs),
    /// Your jobs, newest first
    #[command(visible_alias = "ls")]
    List {
        /// Every user's jobs (admins only); adds an OWNER column
        #[arg(long)]
        all: bool,
        /// Show at most this many
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one job
    Get {
        /// Job id (or a unique start of it)
        id: String,
    },
    /// Cancel a job: a queued one at once, a running one within seconds
    Cancel {
        /// Job id (or a unique start of it)
        id: String,
    },
    /// Wait for a job to end; exits 0 if it succeeded, 9 if it failed or
    /// was cancelled
    Wait {
        /// Job id (or a unique start of it)
        id: String,
        /// Give up after this long (exit 7)
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// Download the outputs the job collected (its last attempt's) to DIR
    Outputs {
        /// Job id (or a unique start of it)
        id: String,
        /// Where the files go [default: outputs/JOB]
        dir: Option<PathBuf>,
    },
    /// Print a job's log; with -f, follow it until the job ends (resuming
    /// where it was after a lost connection)
    Logs {
        /// Job id (or a unique start of it)
        id: String,
        /// Follow the log as the job runs
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The project directory [default: .]
    dir: Option<PathBuf>,
    /// The job file [default: DIR/job.yaml]
    #[arg(short, long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Wait for the job to end (exit 0 if it succeeded, 9 if not)
    #[arg(long)]
    wait: bool,
    /// Print the job's log as it runs, then exit as --wait does
    #[arg(long)]
    follow: bool,
    /// Run it on this runner of yours (instead of job.yaml's `runner`)
    #[arg(long, value_name = "NAME")]
    runner: Option<String>,
}

fn parse_timeout(text: &str) -> Result<Duration, QuantityError> {
    parse_duration(text)
}

/// How long a follower keeps trying to reconnect to grad.
const RECONNECT_FOR: Duration = Duration::from_secs(120);

pub(super) async fn run(context: &Context, command: JobCommand) -> anyhow::Result<()> {
    let workspace = context.workspace()?;
    // A bad job.yaml is reported before anything is sent.
    let submit = match &command {
        JobCommand::Submit(args) => {
            let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from("."));
            if !dir.is_dir() {
                return Err(Failure::new(
                    Code::Usage,
                    format!("{} is not a directory", dir.display()),
                )
                .into());
            }
            let file = job::file_in(&dir, args.file.as_deref());
            let mut spec = JobFile::load(&file)?;
            if args.runner.is_some() {
                spec.runner = args.runner.clone();
            }
            Some((dir, spec))
        }
        _ => None,
    };
    let client = context.connect(workspace.as_ref()).await?;
    let mut out = io::stdout().lock();
    match command {
        JobCommand::Submit(args) => {
            let Some((dir, spec)) = submit else {
                return Ok(());
            };
            let job = submit_job(context, &client, dir, spec, &mut out).await?;
            drop(out);
            if args.follow {
                follow_logs(context, &client, &job.id).await?;
            }
            if args.wait || args.follow {
                let forever = Duration::from_secs(365 * 24 * 3600);
                let job = wait_for_end(&client, &job.id, forever).await?;
                return ended(context, &job, args.follow);
            }
        }
        JobCommand::List { all, limit } => {
            let jobs = client.list_jobs(all, limit).await?;
            match context.format {
                Format::Table => print_jobs(&mut out, &jobs, all)?,
                Format::Json => output::write_json(
                    &mut out,
                    &output::JobList {
                        jobs: jobs.iter().map(output::Job::from).collect(),
                    },
                )?,
                Format::Ndjson => {
                    for job in &jobs {
                        output::write_json(&mut out, &output::Job::from(job))?;
                    }
                }
            }
        }
        JobCommand::Get { id } => {
            let job = client.get_job(&id).await?;
            print_job(context, &mut out, &job)?;
        }
        JobCommand::Cancel { id } => {
            let job = client.cancel_job(&id).await?;
            match context.format {
                Format::Table => {
                    let what = match job.state() {
                        JobState::Running => "cancelling (its worker stops it)".to_owned(),
                        state => output::job_state(state),
                    };
                    writeln!(out, "job/{} {what}", job.id)?;
                }
                Format::Json | Format::Ndjson => {
                    output::write_json(&mut out, &output::Job::from(&job))?
                }
            }
        }
        JobCommand::Wait { id, timeout } => {
            drop(out);
            context.progress(&format!("waiting for job {id}..."));
            let job = wait_for_end(&client, &id, timeout).await?;
            return ended(context, &job, false);
        }
        JobCommand::Outputs { id, dir } => {
            let job = client.get_job(&id).await?;
            let set = client.get_job_outputs(&job.id, true).await?;
            let dir = dir.unwrap_or_else(|| PathBuf::from("outputs").join(&job.id));
            let what = format!("job/{}", job.id);
            super::outputs::download(context, &mut out, &set, &dir, &what, false).await?;
        }
        JobCommand::Logs { id, follow } => {
            drop(out);
            let job = client.get_job(&id).await?;
            print_logs(context, &client, &job.id, follow).await?;
        }
    }
    Ok(())
}

async fn submit_job(
    context: &Context,
    client: &Client,
    dir: PathBuf,
    spec: JobFile,
    out: &mut impl Write,
) -> anyhow::Result<Job> {
    let bundle = tempfile::NamedTempFile::new()?;
    let made = {
        let (dir, file) = (dir.clone(), bundle.reopen()?);
        tokio::task::spawn_blocking(move || grad_bundle::create(&dir, io::BufWriter::new(file)))
            .await??
    };
    let uploaded = match client.create_upload(&made.sha256, made.size).await? {
        Some(upload) => {
            let bar = context.progress_bar(made.size);
            let progress: grad_transfer::Progress = {
                let bar = bar.clone();
                Arc::new(move |n| bar.inc(n))
            };
            let http = grad_transfer::Client::new()?;
            let sent = http
                .put_file(&upload, bundle.path(), 0, made.size, Some(progress))
                .await;
            bar.finish_and_clear();
            sent?;
            made.size
        }
        None => 0,
    };
    let job = client.submit_job(spec.to_proto(), &made.sha256).await?;
    match context.format {
        Format::Table => {
            let sent = if uploaded == 0 {
                "unchanged, nothing uploaded".to_owned()
            } else {
                format!("uploaded {}", HumanBytes(uploaded))
            };
            writeln!(
                out,
                "job/{} queued (bundle: {} files, {}; {sent})",
                job.id,
                made.summary.files,
                HumanBytes(made.summary.bytes)
            )?;
            for skipped in &made.summary.skipped {
                eprintln!("skipped {skipped}");
            }
        }
        Format::Json | Format::Ndjson => output::write_json(
            out,
            &output::Submitted {
                job: output::Job::from(&job),
                bundle_files: made.summary.files,
                bundle_bytes: made.summary.bytes,
                bundle_size: made.size,
                uploaded_bytes: uploaded,
                skipped: made.summary.skipped.clone(),
            },
        )?,
    }
    out.flush()?;
    Ok(job)
}

/// Prints how the job ended; a failed or cancelled job exits 9.
fn ended(context: &Context, job: &Job, quiet_success: bool) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match context.format {
        Format::Table if !quiet_success || job.state() != JobState::Succeeded => writeln!(
            out,
            "job/{} {} ({})",
            job.id,
            output::job_state(job.state()),
            job.reason
        )?,
        Format::Table => {}
        Format::Json | Format::Ndjson => output::write_json(&mut out, &output::Job::from(job))?,
    }
    match job.state() {
        JobState::Succeeded => Ok(()),
        state => {
            let message = format!(
                "job {} {}: {}",
                job.id,
                output::job_state(state),
                job.reason
            );
            Err(Failure {
                code: Code::JobFailed,
                message,
                quiet: context.format != Format::Table,
            }
            .into())
        }
    }
}

async fn follow_logs(context: &Context, client: &Client, id: &str) -> anyhow::Result<()> {
    print_logs(context, client, id, true).await
}

/// Waits for the job to end, across a grad restart (or a dropped
/// connection) within `timeout`.
async fn wait_for_end(client: &Client, id: &str, timeout: Duration) -> anyhow::Result<Job> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.wait_job(id, left).await {
            Ok(job) => return Ok(job),
            Err(error) if transient(&error) && !left.is_zero() => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

fn is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

/// Whether a broken stream is worth opening again (grad restarting, a
/// dropped connection), rather than an answer.
fn transient(error: &ClientError) -> bool {
    error.status().is_none_or(|s| {
        matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
        )
    })
}

/// Where log lines go, in the chosen format.
struct Printer<'a> {
    context: &'a Context,
    /// The last seq printed: a reconnect resumes after it.
    cursor: u64,
    collected: Vec<output::LogLine>,
}

impl Printer<'_> {
    fn line(&mut self, line: &grad_proto::LogLine) -> io::Result<()> {
        if line.seq <= self.cursor {
            return Ok(());
        }
        self.cursor = line.seq;
        match self.context.format {
            Format::Table => {
                if line.stream() == LogStream::Stderr {
                    let mut err = io::stderr().lock();
                    writeln!(err, "{}", line.text)?;
                } else {
                    let mut out = io::stdout().lock();
                    writeln!(out, "{}", line.text)?;
                    out.flush()?;
                }
            }
            Format::Ndjson => {
                let mut out = io::stdout().lock();
                output::write_json(&mut out, &output::LogLine::from(line))?;
                out.flush()?;
            }
            Format::Json => self.collected.push(output::LogLine::from(line)),
        }
        Ok(())
    }

    fn notice(&self, text: &str) {
        if self.context.format == Format::Table {
            eprintln!("--- {text} ---");
        }
    }

    /// An archived attempt: downloaded (checked), then printed line by line.
    async fn archive(
        &mut self,
        http: &grad_transfer::Client,
        archive: &grad_proto::LogArchive,
    ) -> anyhow::Result<()> {
        let Some(download) = &archive.download else {
            return Ok(());
        };
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("log.ndjson");
        http.get_file(download, &file, archive.size, &archive.sha256, None, None)
            .await?;
        let reader = io::BufReader::new(std::fs::File::open(&file)?);
        for text in reader.lines() {
            let text = text?;
            if text.is_empty() {
                continue;
            }
            let line = grad_proto::log_archive::decode(&text).map_err(|e| {
                Failure::new(
                    Code::Internal,
                    format!("attempt {}'s log: {e}", archive.attempt),
                )
            })?;
            self.line(&line)?;
        }
        Ok(())
    }
}

/// Prints the job's log; with `follow`, until the job ends, reconnecting
/// (from the last line printed) when the stream breaks.
async fn print_logs(
    context: &Context,
    client: &Client,
    id: &str,
    follow: bool,
) -> anyhow::Result<()> {
    let http = grad_transfer::Client::new()?;
    let mut printer = Printer {
        context,
        cursor: 0,
        collected: Vec::new(),
    };
    let mut broken_since: Option<tokio::time::Instant> = None;
    loop {
        let stream = client.stream_logs(id, printer.cursor, follow).await;
        let failure = match stream {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(chunk)) => {
                        broken_since = None;
                        if !chunk.notice.is_empty() {
                            printer.notice(&chunk.notice);
                        }
                        for line in &chunk.lines {
                            printer.line(line)?;
                        }
                        if let Some(archive) = &chunk.archive {
                            printer.archive(&http, archive).await?;
                        }
                    }
                    // A follower stops when the job has ended; a stream
                    // that ends before that is a connection that broke.
                    Ok(None)
                        if follow
                            && client
                                .get_job(id)
                                .await
                                .is_ok_and(|job| !is_terminal(job.state())) =>
                    {
                        break ClientError::Status(tonic::Status::unavailable(
                            "the log stream ended before the job did",
                        ));
                    }
                    Ok(None) => {
                        if context.format == Format::Json {
                            let mut out = io::stdout().lock();
                            output::write_json(
                                &mut out,
                                &output::LogLines {
                                    lines: std::mem::take(&mut printer.collected),
                                },
                            )?;
                        }
                        return Ok(());
                    }
                    Err(status) => break ClientError::Status(status),
                }
            },
            Err(error) => error,
        };
        let since = *broken_since.get_or_insert_with(tokio::time::Instant::now);
        if !follow || !transient(&failure) || since.elapsed() > RECONNECT_FOR {
            return Err(failure.into());
        }
        context.progress("lost the connection to grad; reconnecting...");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_jobs(out: &mut impl Write, jobs: &[Job], all: bool) -> io::Result<()> {
    let now = SystemTime::now();
    let mut header = vec!["ID", "NAME", "STATE", "ATTEMPT", "WORKER", "AGE", "REASON"];
    if all {
        header.insert(2, "OWNER");
    }
    let mut table = Table::new(&header);
    for job in jobs {
        let name = job
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let mut row = vec![
            job.id.clone(),
            name,
            output::job_state(job.state()).to_uppercase(),
            format!("{}/{}", job.attempt, job.max_attempts),
            if job.worker.is_empty() {
                "-".into()
            } else {
                job.worker.clone()
            },
            output::age(job.create_time.as_ref(), now),
            output::first_line(&job.reason, 60),
        ];
        if all {
            row.insert(2, job.owner.clone());
        }
        table.row(row);
    }
    table.write(out)
}

fn print_job(context: &Context, out: &mut impl Write, job: &Job) -> io::Result<()> {
    match context.format {
        Format::Table => {
            let spec = job.spec.clone().unwrap_or_default();
            let or_dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
            let time = |t: &Option<prost_types::Timestamp>| {
                t.as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_else(|| "-".into())
            };
            output::write_fields(
                out,
                &[
                    ("id", job.id.clone()),
                    ("name", spec.name),
                    ("owner", job.owner.clone()),
                    ("state", output::job_state(job.state())),
                    ("reason", or_dash(job.reason.clone())),
                    (
                        "exit code",
                        job.exit_code.map_or("-".into(), |c| c.to_string()),
                    ),
                    (
                        "attempt",
                        format!("{} of {}", job.attempt, job.max_attempts),
                    ),
                    ("worker", or_dash(job.worker.clone())),
                    ("command", spec.command),
                    ("image", or_dash(spec.image)),
                    ("gpus", spec.gpus.to_string()),
                    (
                        "bundle",
                        format!("{} ({})", job.bundle_sha256, HumanBytes(job.bundle_size)),
                    ),
                    ("created", time(&job.create_time)),
                    ("started", time(&job.start_time)),
                    ("finished", time(&job.finish_time)),
                ],
            )
        }
        Format::Json | Format::Ndjson => output::write_json(out, &output::Job::from(job)),
    }
}
