//! What gractl prints: the serde types behind `-o json`/`-o ndjson` (one
//! module, so the machine-readable contract is in one place) and the small
//! helpers for human output (aligned tables, `key: value` lines, ages).

use std::{
    collections::BTreeMap,
    io::{self, Write},
    time::{Duration, SystemTime},
};

use grad_proto as proto;
use serde::Serialize;

use crate::quantity::{Cpu, Size};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    // Aligned text for people.
    #[default]
    Table,
    // One JSON document at the end.
    Json,
    // One JSON object per line, as events happen.
    Ndjson,
}

/// Writes `value` as one line of JSON.
pub fn write_json(out: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

/// `RUNNER_STATE_READY` → `ready`.
pub fn runner_state(state: proto::RunnerState) -> String {
    state
        .as_str_name()
        .trim_start_matches("RUNNER_STATE_")
        .to_lowercase()
}

/// `EXEC_STATUS_OK` → `ok`.
pub fn exec_status(status: proto::ExecStatus) -> String {
    status
        .as_str_name()
        .trim_start_matches("EXEC_STATUS_")
        .to_lowercase()
}

fn rfc3339(timestamp: Option<&prost_types::Timestamp>) -> Option<String> {
    timestamp.map(ToString::to_string)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Runner {
    pub name: String,
    pub owner: String,
    /// Lowercase: `pending`, `ready`, `paused`, `failed`, ...
    pub state: String,
    /// Why the runner is in its state (set for `failed`).
    pub reason: String,
    /// Cores: `2`, `500m`.
    pub cpu: String,
    /// `4Gi`, `512Mi`, `1G`, or bytes.
    pub memory: String,
    pub storage: String,
    pub gpus: u32,
    pub backend: String,
    pub workspace: String,
    pub connected: bool,
    /// RFC 3339.
    pub created: Option<String>,
    pub datasets: Vec<DatasetStatus>,
}

/// A runner's dataset: mounted, or why not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStatus {
    pub name: String,
    pub source: String,
    pub mounted: bool,
    pub error: String,
}

impl From<&proto::Runner> for Runner {
    fn from(runner: &proto::Runner) -> Self {
        let resources = runner.resources.unwrap_or_default();
        Runner {
            name: runner.name.clone(),
            owner: runner.owner.clone(),
            state: runner_state(runner.state()),
            reason: runner.reason.clone(),
            cpu: Cpu(resources.cpu_millis).to_string(),
            memory: Size(resources.memory_bytes).to_string(),
            storage: Size(resources.storage_bytes).to_string(),
            gpus: resources.gpus,
            backend: runner.backend.clone(),
            workspace: runner.workspace.clone(),
            connected: runner.connected,
            created: rfc3339(runner.create_time.as_ref()),
            datasets: runner
                .datasets
                .iter()
                .map(|d| DatasetStatus {
                    name: d.name.clone(),
                    source: d.source.clone(),
                    mounted: d.mounted,
                    error: d.error.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunnerList {
    pub runners: Vec<Runner>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub name: String,
    /// `admin` or `user`.
    pub role: String,
    /// `free` or `pro`.
    pub plan: String,
}

impl From<&proto::User> for User {
    fn from(user: &proto::User) -> Self {
        User {
            name: user.name.clone(),
            role: user.role.clone(),
            plan: user.plan.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Whoami {
    pub server: String,
    #[serde(flatten)]
    pub user: User,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Login {
    pub server: String,
    /// The file the credentials were written to.
    pub config: String,
    pub user: User,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Execution {
    pub id: String,
    pub runner: String,
    pub session: String,
    pub status: String,
    pub execution_count: u32,
    pub duration_ms: f64,
    /// RFC 3339.
    pub started: Option<String>,
    pub code: String,
}

impl From<&proto::Execution> for Execution {
    fn from(execution: &proto::Execution) -> Self {
        Execution {
            id: execution.id.clone(),
            runner: execution.runner.clone(),
            session: execution.session.clone(),
            status: exec_status(execution.status()),
            execution_count: execution.execution_count,
            duration_ms: duration_ms(execution.duration_us),
            started: rfc3339(execution.start_time.as_ref()),
            code: execution.code.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecutionList {
    pub executions: Vec<Execution>,
}

pub fn duration_ms(micros: u64) -> f64 {
    // Exact for any duration below 2^53 µs (285 years).
    micros as f64 / 1000.0
}

/// One rich output (Jupyter display data or the cell's result).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Display {
    /// MIME type → content (`image/png` is base64, `application/json` JSON text).
    pub data: BTreeMap<String, String>,
    pub is_result: bool,
    /// Files the runner wrote for this output, relative to its workspace.
    pub files: Vec<String>,
}

impl From<&proto::DisplayData> for Display {
    fn from(display: &proto::DisplayData) -> Self {
        Display {
            data: display
                .data
                .iter()
                .map(|(mime, content)| (mime.clone(), content.clone()))
                .collect(),
            is_result: display.is_result,
            files: display.files.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecError {
    pub ename: String,
    pub evalue: String,
    pub traceback: Vec<String>,
}

impl From<&proto::ExecError> for ExecError {
    fn from(error: &proto::ExecError) -> Self {
        ExecError {
            ename: error.ename.clone(),
            evalue: error.evalue.clone(),
            traceback: error.traceback.clone(),
        }
    }
}

/// `-o json` for `execute-code`: everything that happened, once it ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecResult {
    pub execution_id: String,
    pub runner: String,
    pub session: String,
    /// `ok`, `error`, `timeout`, `cancelled` or `failed`.
    pub status: String,
    pub execution_count: u32,
    pub duration_ms: f64,
    pub stdout: String,
    pub stderr: String,
    pub outputs: Vec<Display>,
    pub error: Option<ExecError>,
    /// Why, for `timeout`, `cancelled` and `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ExecResult {
    /// Nothing happened yet: the result of an execution of `runner` in
    /// `session` ("" is "default") that ends `status` unless told otherwise.
    pub fn empty(runner: String, session: String, status: &str) -> ExecResult {
        ExecResult {
            execution_id: String::new(),
            runner,
            session: if session.is_empty() {
                "default".into()
            } else {
                session
            },
            status: status.into(),
            execution_count: 0,
            duration_ms: 0.0,
            stdout: String::new(),
            stderr: String::new(),
            outputs: Vec::new(),
            error: None,
            message: None,
        }
    }
}

/// `-o ndjson` for `execute-code`: one line per event, as it arrives.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ExecEvent {
    Started {
        execution_id: String,
        runner: String,
        session: String,
    },
    Stream {
        /// `stdout` or `stderr`.
        name: String,
        text: String,
    },
    Display(Display),
    Error(ExecError),
    Finished {
        status: String,
        execution_count: u32,
        duration_ms: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkspaceInit {
    pub path: String,
    pub config: String,
    /// Directories that did not exist before.
    pub created: Vec<String>,
}

/// `-o json` for `gractl cp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copied {
    /// The files written, as destination paths (`r1:code/a.py` or local paths).
    pub copied: Vec<String>,
    pub bytes: u64,
    /// Special files left out, each with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// One file of a runner's collected outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutputFile {
    /// Relative to the runner's outputs/.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub modified: Option<String>,
}

/// A runner's collected outputs: `outputs collect`, `outputs list RUNNER`
/// (with `files`), `outputs list` (one per runner, without) and `outputs rm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outputs {
    pub runner: String,
    /// Tells a deleted runner from a later one of the same name.
    pub runner_id: String,
    pub owner: String,
    /// The runner was deleted; these are its last outputs.
    pub runner_deleted: bool,
    /// When they were last collected; null if never.
    pub collected: Option<String>,
    pub file_count: u32,
    pub total_bytes: u64,
    /// What the collection left out (symbolic links, special files), with why.
    pub skipped: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<OutputFile>>,
    /// `outputs collect` only: what this collection uploaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded_files: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploaded_bytes: Option<u64>,
}

impl Outputs {
    pub fn new(set: &proto::OutputSet, with_files: bool) -> Outputs {
        Outputs {
            runner: set.runner.clone(),
            runner_id: set.runner_id.clone(),
            owner: set.owner.clone(),
            runner_deleted: set.runner_deleted,
            collected: rfc3339(set.collect_time.as_ref()),
            file_count: set.file_count,
            total_bytes: set.total_bytes,
            skipped: set.skipped.clone(),
            files: with_files.then(|| {
                set.files
                    .iter()
                    .map(|f| OutputFile {
                        path: f.path.clone(),
                        size: f.size,
                        sha256: f.sha256.clone(),
                        modified: rfc3339(f.modify_time.as_ref()),
                    })
                    .collect()
            }),
            uploaded_files: None,
            uploaded_bytes: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutputsList {
    pub outputs: Vec<Outputs>,
}

/// `-o json` for `gractl outputs pull`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pulled {
    pub runner: String,
    pub runner_id: String,
    /// The local directory the files went to.
    pub dir: String,
    /// Whether the runner collected its outputs for this pull (else they
    /// are as last collected: the runner is paused, failed or deleted).
    pub collected_now: bool,
    pub collected: Option<String>,
    pub downloaded: Vec<String>,
    pub downloaded_bytes: u64,
    /// Files whose local copy already had the content.
    pub unchanged: Vec<String>,
}

/// `JOB_STATE_RUNNING` → `running`.
pub fn job_state(state: proto::JobState) -> String {
    state
        .as_str_name()
        .trim_start_matches("JOB_STATE_")
        .to_lowercase()
}

/// A job as `gractl job` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Job {
    pub id: String,
    pub name: String,
    pub owner: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// Why it is in its state ("exit code 1", "cancelled by alice", ...).
    pub reason: String,
    pub exit_code: Option<i32>,
    pub attempt: u32,
    pub max_attempts: u32,
    pub worker: String,
    pub command: String,
    pub image: String,
    pub gpus: u32,
    pub bundle_sha256: String,
    pub created: Option<String>,
    pub started: Option<String>,
    pub finished: Option<String>,
}

impl From<&proto::Job> for Job {
    fn from(job: &proto::Job) -> Self {
        let spec = job.spec.clone().unwrap_or_default();
        Job {
            id: job.id.clone(),
            name: spec.name,
            owner: job.owner.clone(),
            state: job_state(job.state()),
            reason: job.reason.clone(),
            exit_code: job.exit_code,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            worker: job.worker.clone(),
            command: spec.command,
            image: spec.image,
            gpus: spec.gpus,
            bundle_sha256: job.bundle_sha256.clone(),
            created: rfc3339(job.create_time.as_ref()),
            started: rfc3339(job.start_time.as_ref()),
            finished: rfc3339(job.finish_time.as_ref()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

/// `-o json` for `gractl job submit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Submitted {
    pub job: Job,
    /// The bundle: files, unpacked bytes, compressed size and digest.
    pub bundle_files: u64,
    pub bundle_bytes: u64,
    pub bundle_size: u64,
    /// 0 when grad already had this bundle.
    pub uploaded_bytes: u64,
    /// Left out of the bundle, with why (symbolic links, special files).
    pub skipped: Vec<String>,
}

/// One log line (`gractl job logs -o ndjson`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub seq: u64,
    pub time: Option<String>,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    pub text: String,
}

impl From<&proto::LogLine> for LogLine {
    fn from(line: &proto::LogLine) -> Self {
        LogLine {
            seq: line.seq,
            time: rfc3339(line.time.as_ref()),
            stream: match line.stream() {
                proto::LogStream::Stderr => "stderr",
                _ => "stdout",
            },
            text: line.text.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLines {
    pub lines: Vec<LogLine>,
}

/// A worker as `gractl worker` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Worker {
    pub name: String,
    pub owner: String,
    pub shared: bool,
    pub labels: BTreeMap<String, String>,
    pub created: Option<String>,
    pub last_seen: Option<String>,
}

impl From<&proto::Worker> for Worker {
    fn from(worker: &proto::Worker) -> Self {
        Worker {
            name: worker.name.clone(),
            owner: worker.owner.clone(),
            shared: worker.shared,
            labels: worker.labels.clone().into_iter().collect(),
            created: rfc3339(worker.create_time.as_ref()),
            last_seen: rfc3339(worker.last_seen_time.as_ref()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerList {
    pub workers: Vec<Worker>,
}

/// `-o json` for `gractl worker create`: the token is shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerCreated {
    pub worker: Worker,
    pub token: String,
}

/// A secret as `gractl secret` shows it: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Secret {
    pub name: String,
    pub created: Option<String>,
    pub updated: Option<String>,
}

impl From<&proto::Secret> for Secret {
    fn from(secret: &proto::Secret) -> Self {
        Secret {
            name: secret.name.clone(),
            created: rfc3339(secret.create_time.as_ref()),
            updated: rfc3339(secret.update_time.as_ref()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretList {
    pub secrets: Vec<Secret>,
}

/// `-o json` for `gractl ssh-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshConfig {
    /// The OpenSSH configuration text, as printed without `-o json`.
    pub config: String,
    /// The runners it has a `Host` block for.
    pub runners: Vec<String>,
    pub identity_file: String,
    pub known_hosts_file: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshKey {
    pub fingerprint: String,
    pub name: String,
    /// OpenSSH format.
    pub public_key: String,
    /// RFC 3339.
    pub created: Option<String>,
    /// Whether this is gractl's own key on this machine.
    pub gractl: bool,
}

impl SshKey {
    pub fn new(key: &proto::SshKey, gractl_fingerprint: Option<&str>) -> SshKey {
        SshKey {
            fingerprint: key.fingerprint.clone(),
            name: key.name.clone(),
            public_key: key.public_key.clone(),
            created: rfc3339(key.create_time.as_ref()),
            gractl: gractl_fingerprint == Some(key.fingerprint.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshKeyList {
    pub keys: Vec<SshKey>,
}

/// Column-aligned rows; the last column is not padded.
#[derive(Debug, Clone, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|cell| (*cell).to_owned()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|column| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(column))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (column, cell) in row.iter().enumerate() {
                if column + 1 < row.len() {
                    let padding = widths[column] - cell.chars().count();
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', padding + 3));
                } else {
                    line.push_str(cell);
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// `key: value` lines with the values aligned.
pub fn write_fields(out: &mut impl Write, fields: &[(&str, String)]) -> io::Result<()> {
    let width = fields.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    for (key, value) in fields {
        writeln!(
            out,
            "{:width$}  {value}",
            format!("{key}:"),
            width = width + 1
        )?;
    }
    Ok(())
}

/// How long ago `timestamp` was, in its largest whole unit: `5s`, `3m`, `2h`, `4d`.
pub fn age(timestamp: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    let Some(then) = timestamp.and_then(|t| SystemTime::try_from(*t).ok()) else {
        return "-".into();
    };
    let seconds = now.duration_since(then).unwrap_or(Duration::ZERO).as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86400 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86400),
    }
}

/// A run time for people: `850µs`, `12.3ms`, `2.5s`, `3m10s`.
pub fn duration(micros: u64) -> String {
    match micros {
        0..1000 => format!("{micros}µs"),
        1000..10_000 => format!("{:.1}ms", micros as f64 / 1000.0),
        10_000..1_000_000 => format!("{}ms", micros / 1000),
        1_000_000..60_000_000 => format!("{:.1}s", micros as f64 / 1e6),
        _ => {
            let seconds = micros / 1_000_000;
            format!("{}m{}s", seconds / 60, seconds % 60)
        }
    }
}

/// The first line of `text`, cut to `max` characters; `…` marks anything left out.
pub fn first_line(text: &str, max: usize) -> String {
    let text = text.trim_start();
    let line = text.lines().next().unwrap_or("");
    let more = line.len() < text.trim_end().len();
    if line.chars().count() > max {
        let cut: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else if more {
        format!("{line} …")
    } else {
        line.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_leave_the_last_unpadded() {
        let mut table = Table::new(&["NAME", "STATE", "AGE"]);
        table.row(vec!["a".into(), "READY".into(), "5s".into()]);
        table.row(vec!["longer-name".into(), "PAUSED".into(), "3m".into()]);
        let mut out = Vec::new();
        table.write(&mut out).expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "NAME          STATE    AGE\n\
             a             READY    5s\n\
             longer-name   PAUSED   3m\n"
        );
    }

    #[test]
    fn fields_align_their_values() {
        let mut out = Vec::new();
        write_fields(&mut out, &[("name", "a".into()), ("state", "READY".into())]).expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "name:   a\nstate:  READY\n"
        );
    }

    #[test]
    fn ages_use_the_largest_whole_unit() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ago = |seconds: i64| {
            let timestamp = prost_types::Timestamp {
                seconds: 1_000_000 - seconds,
                nanos: 0,
            };
            age(Some(&timestamp), now)
        };
        assert_eq!(ago(5), "5s");
        assert_eq!(ago(200), "3m");
        assert_eq!(ago(7300), "2h");
        assert_eq!(ago(4 * 86400 + 5), "4d");
        assert_eq!(ago(-30), "0s");
        assert_eq!(age(None, now), "-");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(850), "850µs");
        assert_eq!(duration(1234), "1.2ms");
        assert_eq!(duration(45_000), "45ms");
        assert_eq!(duration(2_500_000), "2.5s");
        assert_eq!(duration(190_000_000), "3m10s");
    }

    #[test]
    fn code_is_shown_by_its_first_line() {
        assert_eq!(first_line("print(1)", 20), "print(1)");
        assert_eq!(first_line("\nimport os\nprint(1)\n", 20), "import os …");
        assert_eq!(
            first_line("x = 'a very long line of code'", 10),
            "x = 'a ve…"
        );
    }

    #[test]
    fn runner_states_and_statuses_are_lowercase_words() {
        assert_eq!(runner_state(proto::RunnerState::Ready), "ready");
        assert_eq!(exec_status(proto::ExecStatus::Timeout), "timeout");
    }

    #[test]
    fn ndjson_events_are_tagged_by_event() {
        let event = ExecEvent::Finished {
            status: "ok".into(),
            execution_count: 3,
            duration_ms: 1.2,
            message: None,
        };
        assert_eq!(
            serde_json::to_string(&event).expect("json"),
            r#"{"event":"finished","status":"ok","execution_count":3,"duration_ms":1.2}"#
        );
        let event = ExecEvent::Stream {
            name: "stdout".into(),
            text: "hi\n".into(),
        };
        assert_eq!(
            serde_json::to_string(&event).expect("json"),
            r#"{"event":"stream","name":"stdout","text":"hi\n"}"#
        );
    }
}
