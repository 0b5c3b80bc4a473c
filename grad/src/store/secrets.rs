//! Users' secrets, sealed (see `crate::sealed`); the store never sees a value.

use sqlx::{Row, any::AnyRow};

use super::{Store, now_ms};
use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    pub name: String,
    /// The value as `crate::sealed::Sealer` sealed it.
    pub sealed: String,
    pub created_at: i64,
    pub updated_at: i64,
}

fn secret_from_row(row: &AnyRow) -> Result<Secret> {
    Ok(Secret {
        name: row.try_get("name")?,
        sealed: row.try_get("sealed")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Store {
    /// Creates or replaces `owner_id`'s secret `name` (keeping when it was
    /// created).
    pub async fn set_secret(&self, owner_id: &str, name: &str, sealed: &str) -> Result<Secret> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO secrets (owner_id, name, sealed, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (owner_id, name) DO UPDATE SET sealed = excluded.sealed, \
             updated_at = excluded.updated_at",
        )
        .bind(owner_id)
        .bind(name)
        .bind(sealed)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.secret(owner_id, name).await.map(|s| {
            s.unwrap_or(Secret {
                name: name.to_owned(),
                sealed: sealed.to_owned(),
                created_at: now,
                updated_at: now,
            })
        })
    }

    pub async fn secret(&self, owner_id: &str, name: &str) -> Result<Option<Secret>> {
        let row = sqlx::query(
            "SELECT name, sealed, created_at, updated_at FROM secrets \
             WHERE owner_id = $1 AND name = $2",
        )
        .bind(owner_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(secret_from_row).transpose()
    }

    /// `owner_id`'s secrets by name.
    pub async fn secrets(&self, owner_id: &str) -> Result<Vec<Secret>> {
        let rows = sqlx::query(
            "SELECT name, sealed, created_at, updated_at FROM secrets WHERE owner_id = $1 \
             ORDER BY name",
        )
        .bind(owner_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(secret_from_row).collect()
    }

    /// Whether there was such a secret.
    pub async fn delete_secret(&self, owner_id: &str, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM secrets WHERE owner_id = $1 AND name = $2")
            .bind(owner_id)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
