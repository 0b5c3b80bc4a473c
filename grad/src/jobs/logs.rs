//! Job logs. Workers append lines as they come (numbered per attempt, so a
//! worker that lost its connection sends again from the last line grad has);
//! they live in the store until the attempt's whole log is uploaded to the
//! blob store, and are dropped then. A reader gets each ended attempt as a
//! URL to its archived log and live attempts line by line, with a cursor
//! (`seq = attempt << 32 | line`) to resume from after a disconnect.

use std::{sync::Arc, time::Duration};

use grad_proto as pb;
use tokio::sync::mpsc;

use super::{Jobs, Runs, URL_EXPIRY, log_key};
use crate::{
    blobs::Sha256,
    error::{Error, Result},
    store::{self, now_ms},
};

/// Longer lines are cut (the local log keeps them whole).
pub const MAX_LINE: usize = 64 << 10;
/// Lines per chunk sent to a reader.
const CHUNK_LINES: u32 = 500;
/// A follower looks again at least this often.
const FOLLOW_TICK: Duration = Duration::from_secs(1);

const LINE_MASK: u64 = 0xffff_ffff;

fn attempt_of(seq: u64) -> u32 {
    (seq >> 32) as u32
}

/// The seq just before the first line of `attempt`.
fn start_of(attempt: u32) -> u64 {
    u64::from(attempt) << 32
}

fn to_pb(line: &store::LogLine) -> pb::LogLine {
    pb::LogLine {
        seq: start_of(line.attempt) | u64::from(line.line),
        time: Some(prost_types::Timestamp {
            seconds: line.at.div_euclid(1000),
            nanos: (line.at.rem_euclid(1000) * 1_000_000) as i32,
        }),
        stream: line.stream,
        text: line.text.clone(),
    }
}

fn cut(mut text: String) -> String {
    if text.len() > MAX_LINE {
        let mut end = MAX_LINE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl Jobs {
    /// Stores log lines of the worker's running attempt; answers the last
    /// line grad has.
    pub async fn append_logs(
        &self,
        runs: &Runs,
        id: &str,
        attempt: u32,
        lines: Vec<pb::LogLine>,
    ) -> Result<u32> {
        self.attempt_of(runs, id, attempt).await?;
        let mut stored = Vec::with_capacity(lines.len());
        for line in lines {
            let number = (line.seq & LINE_MASK) as u32;
            if attempt_of(line.seq) != attempt || number == 0 {
                return Err(Error::InvalidArgument(format!(
                    "log line seq {}: not a line of attempt {attempt}",
                    line.seq
                )));
            }
            let at = line
                .time
                .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
                .unwrap_or_else(now_ms);
            let stream = match line.stream() {
                pb::LogStream::Stderr => pb::LogStream::Stderr,
                _ => pb::LogStream::Stdout,
            };
            stored.push(store::LogLine {
                attempt,
                line: number,
                at,
                stream: stream as i32,
                text: cut(line.text),
            });
        }
        let last = self.store.append_logs(id, attempt, &stored).await?;
        if !stored.is_empty() {
            self.bump();
        }
        Ok(last)
    }

    /// Sends the job's log from `after_seq` on to `out`, as it comes with
    /// `follow`, until the job has ended (or the reader goes away).
    pub async fn stream_logs(
        self: Arc<Self>,
        job: store::Job,
        after_seq: u64,
        follow: bool,
        out: mpsc::Sender<Result<pb::LogChunk>>,
    ) {
        if let Err(e) = self.send_logs(&job, after_seq, follow, &out).await {
            let _ = out.send(Err(e)).await;
        }
    }

    async fn send_logs(
        &self,
        job: &store::Job,
        after_seq: u64,
        follow: bool,
        out: &mpsc::Sender<Result<pb::LogChunk>>,
    ) -> Result<()> {
        let mut cursor = after_seq;
        let mut announced = attempt_of(after_seq);
        let mut changed = self.subscribe();
        loop {
            changed.mark_unchanged();
            let Some(now) = self.store.job(&job.id).await? else {
                return Ok(());
            };
            let attempts = self.store.attempts(&job.id).await?;
            let mut sent = false;
            for attempt in &attempts {
                let number = attempt.attempt;
                if attempt_of(cursor) > number {
                    continue;
                }
                let mut chunk = pb::LogChunk::default();
                if number > announced && now.max_attempts > 1 {
                    chunk.notice = format!("attempt {number} on worker {}", attempt.worker_name);
                }
                if !attempt.log_sha256.is_empty() {
                    let sha256 = Sha256::parse(&attempt.log_sha256)?;
                    let download = self
                        .blobs
                        .presign_get(&log_key(&now.owner_id, &sha256)?, URL_EXPIRY)
                        .await?;
                    chunk.archive = Some(pb::LogArchive {
                        attempt: number,
                        download: Some((&download).into()),
                        sha256: attempt.log_sha256.clone(),
                        size: attempt.log_size,
                    });
                    cursor = start_of(number + 1);
                } else {
                    let after = if attempt_of(cursor) == number {
                        (cursor & LINE_MASK) as u32
                    } else {
                        0
                    };
                    let lines = self
                        .store
                        .log_lines(&job.id, number, after, CHUNK_LINES)
                        .await?;
                    match lines.last() {
                        Some(last) => {
                            cursor = start_of(number) | u64::from(last.line);
                            chunk.lines = lines.iter().map(to_pb).collect();
                        }
                        // A lost attempt (never archived) is done once a
                        // later one has begun.
                        None if attempt.finished_at.is_some() && number < now.attempt => {
                            cursor = start_of(number + 1);
                            continue;
                        }
                        None => break,
                    }
                }
                announced = announced.max(number);
                if out.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
                sent = true;
                break;
            }
            if sent {
                continue;
            }
            if !follow || now.state.is_terminal() {
                return Ok(());
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(FOLLOW_TICK) => {}
                _ = out.closed() => return Ok(()),
                // Not the end of the log: the follower must come back.
                _ = self.shutdown.cancelled() => {
                    return Err(Error::Unavailable(
                        "grad is shutting down; follow again from the last line".into(),
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_order_lines_across_attempts() {
        assert_eq!(start_of(2) | 7, (2 << 32) | 7);
        assert_eq!(attempt_of(start_of(3) | 9), 3);
        assert!(start_of(1) | 0xffff_fff0 < start_of(2) | 1);
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary() {
        let text = "é".repeat(MAX_LINE);
        let cut = cut(text);
        assert!(cut.len() <= MAX_LINE && cut.is_char_boundary(cut.len()));
    }
}
