//! Output sets and their files: each runner's last collected `outputs/`.

use sqlx::{Row, any::AnyRow};

use super::{Store, now_ms};
use crate::error::{Error, Result};

/// A runner's last collection (one per runner id; kept after a delete),
/// or a job's (one per job id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSet {
    /// The runner's id, or the job's.
    pub runner_id: String,
    pub owner_id: String,
    pub owner_name: String,
    pub runner_name: String,
    pub collected_at: i64,
    pub file_count: u64,
    pub total_bytes: u64,
    /// What the collection left out, each with the reason.
    pub skipped: Vec<String>,
    /// When the runner was deleted; `None` while it exists.
    pub deleted_at: Option<i64>,
    pub source: Source,
}

/// Whose outputs a set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Runner,
    Job,
}

text_enum!(Source { Runner => "runner", Job => "job" });

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub modified_at: i64,
}

const SET_COLUMNS: &str = "s.runner_id, s.owner_id, u.name AS owner_name, s.runner_name, \
     s.collected_at, s.file_count, s.total_bytes, s.skipped, s.deleted_at, s.source";

/// Rows per INSERT when a set's files are written (5 parameters each).
const INSERT_BATCH: usize = 200;

fn set_from_row(row: &AnyRow) -> Result<OutputSet> {
    Ok(OutputSet {
        runner_id: row.try_get("runner_id")?,
        owner_id: row.try_get("owner_id")?,
        owner_name: row.try_get("owner_name")?,
        runner_name: row.try_get("runner_name")?,
        collected_at: row.try_get("collected_at")?,
        file_count: row.try_get::<i64, _>("file_count")? as u64,
        total_bytes: row.try_get::<i64, _>("total_bytes")? as u64,
        skipped: serde_json::from_str(&row.try_get::<String, _>("skipped")?).map_err(|e| {
            Error::FailedPrecondition(format!("an output set's skipped files in the store: {e}"))
        })?,
        deleted_at: row.try_get("deleted_at")?,
        source: super::parse_column(row, "source")?,
    })
}

impl Store {
    pub async fn output_set(&self, runner_id: &str) -> Result<Option<OutputSet>> {
        let row = sqlx::query(&format!(
            "SELECT {SET_COLUMNS} FROM output_sets s JOIN users u ON u.id = s.owner_id \
             WHERE s.runner_id = $1"
        ))
        .bind(runner_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(set_from_row).transpose()
    }

    /// The most recently deleted runner named `runner_name` of `owner_id`
    /// that left outputs.
    pub async fn deleted_output_set(
        &self,
        owner_id: &str,
        runner_name: &str,
    ) -> Result<Option<OutputSet>> {
        let row = sqlx::query(&format!(
            "SELECT {SET_COLUMNS} FROM output_sets s JOIN users u ON u.id = s.owner_id \
             WHERE s.owner_id = $1 AND s.runner_name = $2 AND s.deleted_at IS NOT NULL \
             AND s.source = 'runner' \
             ORDER BY s.deleted_at DESC LIMIT 1"
        ))
        .bind(owner_id)
        .bind(runner_name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(set_from_row).transpose()
    }

    /// Every runner's set of `owner_id` (everyone's with `None`), by runner
    /// name, live runners before deleted ones, newest first.
    pub async fn output_sets(&self, owner_id: Option<&str>) -> Result<Vec<OutputSet>> {
        let base = format!(
            "SELECT {SET_COLUMNS} FROM output_sets s JOIN users u ON u.id = s.owner_id \
             WHERE s.source = 'runner'"
        );
        let order = "ORDER BY u.name, s.runner_name, s.deleted_at IS NOT NULL, s.deleted_at DESC";
        let rows = match owner_id {
            Some(owner) => {
                sqlx::query(&format!("{base} AND s.owner_id = $1 {order}"))
                    .bind(owner)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("{base} {order}"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(set_from_row).collect()
    }

    /// A set's files, by path.
    pub async fn output_files(&self, runner_id: &str) -> Result<Vec<OutputFile>> {
        let rows = sqlx::query(
            "SELECT path, size, sha256, modified_at FROM output_files WHERE runner_id = $1 \
             ORDER BY path",
        )
        .bind(runner_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(OutputFile {
                    path: row.try_get("path")?,
                    size: row.try_get::<i64, _>("size")? as u64,
                    sha256: row.try_get("sha256")?,
                    modified_at: row.try_get("modified_at")?,
                })
            })
            .collect()
    }

    /// Replaces a runner's set and its files in one transaction.
    pub async fn replace_outputs(&self, set: &OutputSet, files: &[OutputFile]) -> Result<()> {
        let skipped = serde_json::to_string(&set.skipped)
            .map_err(|e| Error::FailedPrecondition(format!("encoding skipped files: {e}")))?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM output_files WHERE runner_id = $1")
            .bind(&set.runner_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM output_sets WHERE runner_id = $1")
            .bind(&set.runner_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO output_sets (runner_id, owner_id, runner_name, collected_at, file_count, \
             total_bytes, skipped, deleted_at, source) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&set.runner_id)
        .bind(&set.owner_id)
        .bind(&set.runner_name)
        .bind(set.collected_at)
        .bind(set.file_count as i64)
        .bind(set.total_bytes as i64)
        .bind(skipped)
        .bind(set.deleted_at)
        .bind(set.source.as_str())
        .execute(&mut *tx)
        .await?;
        for batch in files.chunks(INSERT_BATCH) {
            let values: Vec<String> = (0..batch.len())
                .map(|i| {
                    let p = i * 5;
                    format!(
                        "(${}, ${}, ${}, ${}, ${})",
                        p + 1,
                        p + 2,
                        p + 3,
                        p + 4,
                        p + 5
                    )
                })
                .collect();
            let sql = format!(
                "INSERT INTO output_files (runner_id, path, size, sha256, modified_at) VALUES {}",
                values.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for file in batch {
                query = query
                    .bind(&set.runner_id)
                    .bind(&file.path)
                    .bind(file.size as i64)
                    .bind(&file.sha256)
                    .bind(file.modified_at);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes a set and its files.
    pub async fn delete_output_set(&self, runner_id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM output_files WHERE runner_id = $1")
            .bind(runner_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM output_sets WHERE runner_id = $1")
            .bind(runner_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The runner is gone: its set stays (marked deleted) if it has files.
    pub(super) async fn outputs_of_deleted_runner(&self, runner_id: &str) -> Result<()> {
        sqlx::query("UPDATE output_sets SET deleted_at = $1 WHERE runner_id = $2")
            .bind(now_ms())
            .bind(runner_id)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM output_sets WHERE runner_id = $1 AND file_count = 0")
            .bind(runner_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether any output file of `owner_id` has this content.
    pub async fn owner_has_output(&self, owner_id: &str, sha256: &str) -> Result<bool> {
        let row = sqlx::query(
            "SELECT 1 AS found FROM output_files f JOIN output_sets s ON s.runner_id = f.runner_id \
             WHERE s.owner_id = $1 AND f.sha256 = $2 LIMIT 1",
        )
        .bind(owner_id)
        .bind(sha256)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }
}
