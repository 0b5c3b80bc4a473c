//! An attempt's log: every line is redacted (secrets' values become `***`),
//! numbered, written to the local log file (the archive's format) and queued
//! for grad. The shipper sends what is queued in batches, and on a failed
//! send keeps the lines and tries again from the last line grad confirmed,
//! so a lost connection or a grad restart loses nothing.

use std::{
    fs,
    io::{self, Write},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::servers::GradChannel;
use grad_proto::{
    AppendLogsRequest, LogLine, LogStream, log_archive, worker_agent_client::WorkerAgentClient,
};
use tokio::sync::Notify;

use super::Auth;

/// Lines per AppendLogs call.
const BATCH: usize = 500;
/// How long a failed send waits before the next try.
const RETRY: Duration = Duration::from_millis(250);

fn now() -> prost_types::Timestamp {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

/// Replaces every secret value in `text` with `***`.
pub struct Redactor {
    values: Vec<String>,
}

impl Redactor {
    pub fn new(values: impl IntoIterator<Item = String>) -> Redactor {
        // Longest first, so a value containing another is masked whole;
        // very short values would mask ordinary text and are still masked:
        // a secret is a secret.
        let mut values: Vec<String> = values.into_iter().filter(|v| !v.is_empty()).collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        Redactor { values }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for value in &self.values {
            if text.contains(value.as_str()) {
                text = text.replace(value.as_str(), "***");
            }
        }
        text
    }
}

struct State {
    /// Lines not yet confirmed by grad.
    pending: Vec<LogLine>,
    next_line: u32,
    closed: bool,
}

/// The log of one attempt.
pub struct Log {
    attempt: u32,
    file: Mutex<io::BufWriter<fs::File>>,
    redactor: Redactor,
    state: Mutex<State>,
    wake: Notify,
}

impl Log {
    pub fn create(path: &Path, attempt: u32, redactor: Redactor) -> io::Result<Arc<Log>> {
        let file = fs::File::create(path)?;
        Ok(Arc::new(Log {
            attempt,
            file: Mutex::new(io::BufWriter::new(file)),
            redactor,
            state: Mutex::new(State {
                pending: Vec::new(),
                next_line: 1,
                closed: false,
            }),
            wake: Notify::new(),
        }))
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one line of the job's output (or a note of the worker's).
    pub fn push(&self, stream: LogStream, text: &str) {
        let text = self.redactor.redact(text);
        let line = {
            let mut state = self.lock_state();
            let line = LogLine {
                seq: (u64::from(self.attempt) << 32) | u64::from(state.next_line),
                time: Some(now()),
                stream: stream as i32,
                text,
            };
            state.next_line += 1;
            state.pending.push(line.clone());
            line
        };
        {
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = file.write_all(log_archive::encode(&line).as_bytes()) {
                tracing::warn!(error = %e, "writing the local job log");
            }
        }
        self.wake.notify_one();
    }

    /// No more lines will come; flushes the local file.
    pub fn close(&self) -> io::Result<u32> {
        let lines = {
            let mut state = self.lock_state();
            state.closed = true;
            state.next_line - 1
        };
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush()?;
        self.wake.notify_one();
        Ok(lines)
    }

    /// Sends lines to grad until the log is closed and everything is
    /// confirmed, or `give_up` ends (the attempt was lost).
    pub async fn ship(
        self: Arc<Self>,
        channel: GradChannel,
        auth: Auth,
        job_id: String,
        give_up: tokio_util::sync::CancellationToken,
    ) {
        let mut client = WorkerAgentClient::new(channel);
        loop {
            let (batch, closed) = {
                let state = self.lock_state();
                let batch: Vec<LogLine> = state.pending.iter().take(BATCH).cloned().collect();
                (batch, state.closed)
            };
            if batch.is_empty() {
                if closed {
                    return;
                }
                tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = give_up.cancelled() => return,
                }
            }
            let request = auth.request(AppendLogsRequest {
                id: job_id.clone(),
                attempt: self.attempt,
                lines: batch,
            });
            match client.append_logs(request).await {
                Ok(response) => {
                    let confirmed = u64::from(response.into_inner().last_line);
                    let mut state = self.lock_state();
                    state
                        .pending
                        .retain(|line| (line.seq & 0xffff_ffff) > confirmed);
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    tracing::warn!(job = %job_id, %status, "grad took the attempt back; logs stop");
                    return;
                }
                Err(status) => {
                    tracing::debug!(job = %job_id, %status, "sending log lines; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = give_up.cancelled() => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn secrets_are_masked_wherever_they_appear() {
        let r = Redactor::new([
            "s3cr3t".to_owned(),
            "s3cr3t-longer".to_owned(),
            String::new(),
        ]);
        assert_eq!(
            r.redact("key=s3cr3t-longer and s3cr3t; again s3cr3ts3cr3t"),
            "key=*** and ***; again ******"
        );
        assert_eq!(r.redact("nothing here"), "nothing here");
    }

    #[test]
    fn lines_are_numbered_redacted_and_written_locally() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.ndjson");
        let log = Log::create(&path, 2, Redactor::new(["hunter2".to_owned()])).unwrap();
        log.push(LogStream::Stdout, "password is hunter2");
        log.push(LogStream::Stderr, "warning");
        assert_eq!(log.close().unwrap(), 2);
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<LogLine> = text
            .lines()
            .map(|l| log_archive::decode(l).unwrap())
            .collect();
        assert_eq!(lines[0].seq, (2 << 32) | 1);
        assert_eq!(lines[0].text, "password is ***");
        assert_eq!(lines[1].stream(), LogStream::Stderr);
        assert!(!text.contains("hunter2"));
    }
}
