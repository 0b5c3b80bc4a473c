//! Jobs, their attempts and live log lines, and workers. Every state change
//! of a job is one conditional UPDATE (`WHERE state = … AND attempt = …`),
//! so two workers can never both claim, renew or finish the same attempt;
//! on PostgreSQL a claim first takes the row with `FOR UPDATE SKIP LOCKED`,
//! so concurrent claimers pass each other instead of waiting.

use std::collections::BTreeMap;

use sqlx::{Row, any::AnyRow};

use super::{Store, now_ms, parse_column};
use crate::error::{Error, Result};

/// A job as the store keeps it; the spec is the domain's JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub owner_id: String,
    pub owner_name: String,
    pub name: String,
    pub spec: String,
    pub bundle_sha256: String,
    pub bundle_size: u64,
    pub gpus: u32,
    pub needs_docker: bool,
    /// The runner (id) it must run on; "" for any worker.
    pub target_runner: String,
    pub state: JobState,
    pub reason: String,
    pub exit_code: Option<i32>,
    pub attempt: u32,
    pub max_attempts: u32,
    pub worker_id: Option<String>,
    pub worker_name: String,
    pub lease_expires_at: Option<i64>,
    pub cancelled_by: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

text_enum!(JobState {
    Queued => "queued",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Cancelled => "cancelled",
});

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub attempt: u32,
    pub worker_name: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub log_sha256: String,
    pub log_size: u64,
    pub log_lines: u32,
}

/// A live log line (of an attempt not archived yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub attempt: u32,
    pub line: u32,
    pub at: i64,
    /// 1 stdout, 2 stderr (the API's numbers).
    pub stream: i32,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub id: String,
    pub owner_id: String,
    pub owner_name: String,
    pub name: String,
    pub shared: bool,
    pub labels: BTreeMap<String, String>,
    pub token_id: String,
    pub created_at: i64,
    pub last_seen_at: i64,
}

const JOB_COLUMNS: &str = "j.id, j.owner_id, u.name AS owner_name, j.name, j.spec, \
     j.bundle_sha256, j.bundle_size, j.gpus, j.needs_docker, j.target_runner, j.state, j.reason, j.exit_code, j.attempt, j.max_attempts, \
     j.worker_id, j.worker_name, j.lease_expires_at, j.cancelled_by, j.created_at, j.started_at, \
     j.finished_at, j.updated_at";

const WORKER_COLUMNS: &str = "w.id, w.owner_id, u.name AS owner_name, w.name, w.shared, \
     w.labels, w.token_id, w.created_at, w.last_seen_at";

/// Rows per INSERT of log lines (6 parameters each).
const LOG_BATCH: usize = 150;

fn job_from_row(row: &AnyRow) -> Result<Job> {
    Ok(Job {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        owner_name: row.try_get("owner_name")?,
        name: row.try_get("name")?,
        spec: row.try_get("spec")?,
        bundle_sha256: row.try_get("bundle_sha256")?,
        bundle_size: row.try_get::<i64, _>("bundle_size")? as u64,
        gpus: row.try_get::<i64, _>("gpus")? as u32,
        needs_docker: row.try_get::<i64, _>("needs_docker")? != 0,
        target_runner: row.try_get("target_runner")?,
        state: parse_column(row, "state")?,
        reason: row.try_get("reason")?,
        exit_code: row
            .try_get::<Option<i64>, _>("exit_code")?
            .map(|c| c as i32),
        attempt: row.try_get::<i64, _>("attempt")? as u32,
        max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
        worker_id: row.try_get("worker_id")?,
        worker_name: row.try_get("worker_name")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        cancelled_by: row.try_get("cancelled_by")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn worker_from_row(row: &AnyRow) -> Result<Worker> {
    Ok(Worker {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        owner_name: row.try_get("owner_name")?,
        name: row.try_get("name")?,
        shared: row.try_get::<i64, _>("shared")? != 0,
        labels: serde_json::from_str(&row.try_get::<String, _>("labels")?).map_err(|e| {
            Error::FailedPrecondition(format!("a worker's labels in the store: {e}"))
        })?,
        token_id: row.try_get("token_id")?,
        created_at: row.try_get("created_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}

impl Store {
    /// How many jobs are running on the worker (or runner) `worker_id`.
    pub async fn running_jobs_on(&self, worker_id: &str) -> Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM jobs WHERE state = 'running' AND worker_id = $1",
        )
        .bind(worker_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }
    // Jobs.

    pub async fn insert_job(&self, job: &Job) -> Result<()> {
        sqlx::query(
            "INSERT INTO jobs (id, owner_id, name, spec, bundle_sha256, bundle_size, gpus, \
             needs_docker, target_runner, state, reason, exit_code, attempt, max_attempts, \
             worker_id, worker_name, lease_expires_at, cancelled_by, created_at, started_at, \
             finished_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $14, $9, $10, NULL, \
             $11, $12, NULL, '', NULL, '', $13, NULL, NULL, $13)",
        )
        .bind(&job.id)
        .bind(&job.owner_id)
        .bind(&job.name)
        .bind(&job.spec)
        .bind(&job.bundle_sha256)
        .bind(job.bundle_size as i64)
        .bind(i64::from(job.gpus))
        .bind(i64::from(job.needs_docker))
        .bind(job.state.as_str())
        .bind(&job.reason)
        .bind(i64::from(job.attempt))
        .bind(i64::from(job.max_attempts))
        .bind(job.created_at)
        .bind(&job.target_runner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs j JOIN users u ON u.id = j.owner_id WHERE j.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Up to two of `owner_id`'s jobs whose id starts with `prefix` (two
    /// tell that the prefix is ambiguous).
    pub async fn jobs_with_prefix(&self, owner_id: &str, prefix: &str) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs j JOIN users u ON u.id = j.owner_id \
             WHERE j.owner_id = $1 AND j.id LIKE $2 ORDER BY j.id LIMIT 2"
        ))
        .bind(owner_id)
        .bind(format!("{prefix}%"))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The newest `limit` jobs of `owner_id` (everyone's with `None`).
    pub async fn list_jobs(&self, owner_id: Option<&str>, limit: u32) -> Result<Vec<Job>> {
        let base = format!("SELECT {JOB_COLUMNS} FROM jobs j JOIN users u ON u.id = j.owner_id");
        let rows = match owner_id {
            Some(owner) => {
                sqlx::query(&format!(
                    "{base} WHERE j.owner_id = $1 ORDER BY j.created_at DESC, j.id LIMIT $2"
                ))
                .bind(owner)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("{base} ORDER BY j.created_at DESC, j.id LIMIT $1"))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(job_from_row).collect()
    }

    /// Up to `limit` queued jobs a worker with `gpus` (and Docker, with
    /// `docker`) could run, oldest first, after `after` (created_at, id) —
    /// of `owner_id` only unless `None`; with `runner`, also the jobs that
    /// must run on that runner (else only the ones any worker may run).
    #[allow(clippy::too_many_arguments)] // the claim's query, one field each
    pub async fn queued_jobs(
        &self,
        owner_id: Option<&str>,
        gpus: u32,
        docker: bool,
        runner: Option<&str>,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<Job>> {
        let (after_time, after_id) = after.unwrap_or((i64::MIN, ""));
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs j JOIN users u ON u.id = j.owner_id \
             WHERE j.state = 'queued' AND j.gpus <= $1 AND j.needs_docker <= $2 \
             AND ($3 = '' OR j.owner_id = $3) \
             AND (j.created_at > $4 OR (j.created_at = $4 AND j.id > $5)) \
             AND (j.target_runner = '' OR j.target_runner = $7) \
             ORDER BY j.created_at, j.id LIMIT $6"
        );
        let rows = sqlx::query(&sql)
            .bind(i64::from(gpus))
            .bind(i64::from(docker))
            .bind(owner_id.unwrap_or_default())
            .bind(after_time)
            .bind(after_id)
            .bind(i64::from(limit))
            // '' matches only jobs without a target.
            .bind(runner.unwrap_or_default())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Running jobs whose lease ended before `now`.
    pub async fn expired_leases(&self, now: i64) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs j JOIN users u ON u.id = j.owner_id \
             WHERE j.state = 'running' AND j.lease_expires_at < $1"
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Takes queued job `id` for attempt `attempt + 1` on `worker`, if it is
    /// still queued at `attempt`; answers whether this call got it.
    pub async fn claim_job(
        &self,
        id: &str,
        attempt: u32,
        worker: &Worker,
        lease_until: i64,
    ) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        if self.postgres {
            // A row another claimer is taking is skipped, not waited for:
            // many workers claiming at once do not queue behind each other.
            let free = sqlx::query(
                "SELECT id FROM jobs WHERE id = $1 AND state = 'queued' AND attempt = $2 \
                 FOR UPDATE SKIP LOCKED",
            )
            .bind(id)
            .bind(i64::from(attempt))
            .fetch_optional(&mut *tx)
            .await?;
            if free.is_none() {
                return Ok(false);
            }
        }
        let done = sqlx::query(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, worker_id = $1, \
             worker_name = $2, lease_expires_at = $3, exit_code = NULL, \
             started_at = COALESCE(started_at, $4), updated_at = $4 \
             WHERE id = $5 AND state = 'queued' AND attempt = $6",
        )
        .bind(&worker.id)
        .bind(&worker.name)
        .bind(lease_until)
        .bind(now)
        .bind(id)
        .bind(i64::from(attempt))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO job_attempts (job_id, attempt, worker_name, started_at, finished_at, \
             log_sha256, log_size, log_lines) VALUES ($1, $2, $3, $4, NULL, '', 0, 0)",
        )
        .bind(id)
        .bind(i64::from(attempt + 1))
        .bind(&worker.name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Extends the lease of `worker_id`'s attempt; `None` if the attempt is
    /// not that worker's running one any more, else who cancelled it ("").
    pub async fn renew_lease(
        &self,
        id: &str,
        attempt: u32,
        worker_id: &str,
        lease_until: i64,
    ) -> Result<Option<String>> {
        let done = sqlx::query(
            "UPDATE jobs SET lease_expires_at = $1 WHERE id = $2 AND attempt = $3 \
             AND worker_id = $4 AND state = 'running'",
        )
        .bind(lease_until)
        .bind(id)
        .bind(i64::from(attempt))
        .bind(worker_id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(None);
        }
        let row = sqlx::query("SELECT cancelled_by FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(row.try_get("cancelled_by")?))
    }

    /// Ends (or re-queues) running attempt `attempt` of job `id`, if it is
    /// still that attempt and, with `worker_id`, that worker's.
    pub async fn end_attempt(
        &self,
        id: &str,
        attempt: u32,
        worker_id: Option<&str>,
        state: JobState,
        reason: &str,
        exit_code: Option<i32>,
    ) -> Result<bool> {
        let now = now_ms();
        let finished = state.is_terminal().then_some(now);
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE jobs SET state = $1, reason = $2, exit_code = $3, lease_expires_at = NULL, \
             finished_at = $4, updated_at = $5 WHERE id = $6 AND attempt = $7 \
             AND state = 'running' AND ($8 = '' OR worker_id = $8)",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(exit_code.map(i64::from))
        .bind(finished)
        .bind(now)
        .bind(id)
        .bind(i64::from(attempt))
        .bind(worker_id.unwrap_or_default())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query("UPDATE job_attempts SET finished_at = $1 WHERE job_id = $2 AND attempt = $3")
            .bind(now)
            .bind(id)
            .bind(i64::from(attempt))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Fails a queued job that cannot start (its pod could not); answers
    /// whether it was queued.
    pub async fn fail_queued(&self, id: &str, reason: &str) -> Result<bool> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE jobs SET state = 'failed', reason = $1, finished_at = $2, updated_at = $2 \
             WHERE id = $3 AND state = 'queued'",
        )
        .bind(reason)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Cancels a queued job; answers whether it was queued.
    pub async fn cancel_queued(&self, id: &str, reason: &str, by: &str) -> Result<bool> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', reason = $1, cancelled_by = $2, \
             finished_at = $3, updated_at = $3 WHERE id = $4 AND state = 'queued'",
        )
        .bind(reason)
        .bind(by)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Asks a running job's worker to stop it (it hears at its next renewal).
    pub async fn request_cancel(&self, id: &str, by: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE jobs SET cancelled_by = $1, updated_at = $2 WHERE id = $3 \
             AND state = 'running' AND cancelled_by = ''",
        )
        .bind(by)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// After a restart: running attempts get until `until` to be renewed,
    /// so workers can reconnect before their leases count as lost.
    pub async fn extend_leases(&self, until: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE jobs SET lease_expires_at = $1 WHERE state = 'running' \
             AND lease_expires_at < $1",
        )
        .bind(until)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn attempts(&self, job_id: &str) -> Result<Vec<Attempt>> {
        let rows = sqlx::query(
            "SELECT attempt, worker_name, started_at, finished_at, log_sha256, log_size, \
             log_lines FROM job_attempts WHERE job_id = $1 ORDER BY attempt",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Attempt {
                    attempt: row.try_get::<i64, _>("attempt")? as u32,
                    worker_name: row.try_get("worker_name")?,
                    started_at: row.try_get("started_at")?,
                    finished_at: row.try_get("finished_at")?,
                    log_sha256: row.try_get("log_sha256")?,
                    log_size: row.try_get::<i64, _>("log_size")? as u64,
                    log_lines: row.try_get::<i64, _>("log_lines")? as u32,
                })
            })
            .collect()
    }

    /// Records an attempt's archived log and drops its live lines.
    pub async fn archive_log(
        &self,
        job_id: &str,
        attempt: u32,
        sha256: &str,
        size: u64,
        lines: u32,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE job_attempts SET log_sha256 = $1, log_size = $2, log_lines = $3 \
             WHERE job_id = $4 AND attempt = $5",
        )
        .bind(sha256)
        .bind(size as i64)
        .bind(i64::from(lines))
        .bind(job_id)
        .bind(i64::from(attempt))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM job_logs WHERE job_id = $1 AND attempt = $2")
            .bind(job_id)
            .bind(i64::from(attempt))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    // Log lines.

    /// Stores lines (ones already stored are skipped: a worker may send
    /// again after a lost answer); answers the highest line stored.
    pub async fn append_logs(&self, job_id: &str, attempt: u32, lines: &[LogLine]) -> Result<u32> {
        for batch in lines.chunks(LOG_BATCH) {
            let values: Vec<String> = (0..batch.len())
                .map(|i| {
                    let p = i * 6;
                    format!(
                        "(${}, ${}, ${}, ${}, ${}, ${})",
                        p + 1,
                        p + 2,
                        p + 3,
                        p + 4,
                        p + 5,
                        p + 6
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO job_logs (job_id, attempt, line, at, stream, text) VALUES {} \
                 ON CONFLICT (job_id, attempt, line) DO NOTHING",
                values.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for line in batch {
                query = query
                    .bind(job_id)
                    .bind(i64::from(attempt))
                    .bind(i64::from(line.line))
                    .bind(line.at)
                    .bind(i64::from(line.stream))
                    .bind(&line.text);
            }
            query.execute(&self.pool).await?;
        }
        self.last_log_line(job_id, attempt).await
    }

    pub async fn last_log_line(&self, job_id: &str, attempt: u32) -> Result<u32> {
        let row = sqlx::query(
            "SELECT COALESCE(MAX(line), 0) AS last FROM job_logs \
             WHERE job_id = $1 AND attempt = $2",
        )
        .bind(job_id)
        .bind(i64::from(attempt))
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("last")? as u32)
    }

    /// Up to `limit` live lines of an attempt after line `after`.
    pub async fn log_lines(
        &self,
        job_id: &str,
        attempt: u32,
        after: u32,
        limit: u32,
    ) -> Result<Vec<LogLine>> {
        let rows = sqlx::query(
            "SELECT attempt, line, at, stream, text FROM job_logs WHERE job_id = $1 \
             AND attempt = $2 AND line > $3 ORDER BY line LIMIT $4",
        )
        .bind(job_id)
        .bind(i64::from(attempt))
        .bind(i64::from(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(LogLine {
                    attempt: row.try_get::<i64, _>("attempt")? as u32,
                    line: row.try_get::<i64, _>("line")? as u32,
                    at: row.try_get("at")?,
                    stream: row.try_get::<i64, _>("stream")? as i32,
                    text: row.try_get("text")?,
                })
            })
            .collect()
    }

    // Workers.

    pub async fn insert_worker(&self, worker: &Worker) -> Result<()> {
        let labels = serde_json::to_string(&worker.labels)
            .map_err(|e| Error::FailedPrecondition(format!("encoding labels: {e}")))?;
        let inserted = sqlx::query(
            "INSERT INTO workers (id, owner_id, name, shared, labels, token_id, created_at, \
             last_seen_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&worker.id)
        .bind(&worker.owner_id)
        .bind(&worker.name)
        .bind(i64::from(worker.shared))
        .bind(labels)
        .bind(&worker.token_id)
        .bind(worker.created_at)
        .bind(worker.last_seen_at)
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(Error::AlreadyExists(
                format!("worker '{}' already exists", worker.name),
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn worker(&self, id: &str) -> Result<Option<Worker>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers w JOIN users u ON u.id = w.owner_id \
             WHERE w.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(worker_from_row).transpose()
    }

    pub async fn worker_by_name(&self, owner_id: &str, name: &str) -> Result<Option<Worker>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers w JOIN users u ON u.id = w.owner_id \
             WHERE w.owner_id = $1 AND w.name = $2"
        ))
        .bind(owner_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(worker_from_row).transpose()
    }

    pub async fn list_workers(&self, owner_id: Option<&str>) -> Result<Vec<Worker>> {
        let base =
            format!("SELECT {WORKER_COLUMNS} FROM workers w JOIN users u ON u.id = w.owner_id");
        let rows = match owner_id {
            Some(owner) => {
                sqlx::query(&format!("{base} WHERE w.owner_id = $1 ORDER BY w.name"))
                    .bind(owner)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("{base} ORDER BY u.name, w.name"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(worker_from_row).collect()
    }

    pub async fn delete_worker(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM workers WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn worker_seen(&self, id: &str, at: i64) -> Result<()> {
        sqlx::query("UPDATE workers SET last_seen_at = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
