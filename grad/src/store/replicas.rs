//! The grad replicas sharing one database, and where each runner's agent
//! is connected (see `crate::replicas`).

use sqlx::{Row, any::AnyRow};

use super::{Store, now_ms};
use crate::error::Result;

/// Which replica holds (or last held) a runner's agent connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRoute {
    pub runner_id: String,
    pub replica_id: String,
    /// That replica's URL and last heartbeat ('' and 0 once it is gone
    /// from the table).
    pub replica_url: String,
    pub replica_heartbeat_at: i64,
    pub conn: u64,
    pub attached_at: i64,
    pub detached_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub id: String,
    pub url: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
}

const ROUTE_QUERY: &str = "SELECT a.runner_id, a.replica_id, a.conn, a.attached_at, a.detached_at, \
     COALESCE(p.url, '') AS url, COALESCE(p.heartbeat_at, 0) AS heartbeat_at \
     FROM agent_routes a LEFT JOIN replicas p ON p.id = a.replica_id";

fn route_from_row(row: &AnyRow) -> Result<AgentRoute> {
    Ok(AgentRoute {
        runner_id: row.try_get("runner_id")?,
        replica_id: row.try_get("replica_id")?,
        replica_url: row.try_get("url")?,
        replica_heartbeat_at: row.try_get("heartbeat_at")?,
        conn: row.try_get::<i64, _>("conn")? as u64,
        attached_at: row.try_get("attached_at")?,
        detached_at: row.try_get("detached_at")?,
    })
}

impl Store {
    /// Records (or refreshes) this replica's heartbeat.
    pub async fn heartbeat_replica(&self, id: &str, url: &str, started_at: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO replicas (id, url, started_at, heartbeat_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET url = excluded.url, heartbeat_at = excluded.heartbeat_at",
        )
        .bind(id)
        .bind(url)
        .bind(started_at)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replicas that heartbeated at or after `since` (ms), oldest first.
    pub async fn live_replicas(&self, since: i64) -> Result<Vec<Replica>> {
        let rows = sqlx::query(
            "SELECT id, url, started_at, heartbeat_at FROM replicas WHERE heartbeat_at >= $1 \
             ORDER BY started_at, id",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Replica {
                    id: row.try_get("id")?,
                    url: row.try_get("url")?,
                    started_at: row.try_get("started_at")?,
                    heartbeat_at: row.try_get("heartbeat_at")?,
                })
            })
            .collect()
    }

    /// A replica leaving on purpose: the others stop counting on it at once.
    /// Its agents' routes stay, marked detached, so the runners' absence is
    /// timed from now.
    pub async fn remove_replica(&self, id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE agent_routes SET detached_at = $1 WHERE replica_id = $2 AND detached_at IS NULL",
        )
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets replicas silent since before `before` (ms).
    pub async fn prune_replicas(&self, before: i64) -> Result<()> {
        sqlx::query("DELETE FROM replicas WHERE heartbeat_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `runner_id`'s agent is now connected to replica `replica_id` as `conn`.
    pub async fn set_agent_route(
        &self,
        runner_id: &str,
        replica_id: &str,
        conn: u64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO agent_routes (runner_id, replica_id, conn, attached_at, detached_at) \
             VALUES ($1, $2, $3, $4, NULL) \
             ON CONFLICT (runner_id) DO UPDATE SET replica_id = excluded.replica_id, \
             conn = excluded.conn, attached_at = excluded.attached_at, detached_at = NULL",
        )
        .bind(runner_id)
        .bind(replica_id)
        .bind(conn as i64)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Connection `conn` of `runner_id` on `replica_id` ended, unless a newer
    /// connection (here or on another replica) replaced it already.
    pub async fn detach_agent_route(
        &self,
        runner_id: &str,
        replica_id: &str,
        conn: u64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE agent_routes SET detached_at = $1 \
             WHERE runner_id = $2 AND replica_id = $3 AND conn = $4 AND detached_at IS NULL",
        )
        .bind(now_ms())
        .bind(runner_id)
        .bind(replica_id)
        .bind(conn as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The runner was stopped on purpose: no connection is expected back.
    pub async fn delete_agent_route(&self, runner_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM agent_routes WHERE runner_id = $1")
            .bind(runner_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn agent_route(&self, runner_id: &str) -> Result<Option<AgentRoute>> {
        let row = sqlx::query(&format!("{ROUTE_QUERY} WHERE a.runner_id = $1"))
            .bind(runner_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(route_from_row).transpose()
    }

    pub async fn agent_routes(&self) -> Result<Vec<AgentRoute>> {
        let rows = sqlx::query(ROUTE_QUERY).fetch_all(&self.pool).await?;
        rows.iter().map(route_from_row).collect()
    }

    /// `NOTIFY channel, payload` (PostgreSQL only).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// One owner's content objects, locked across replicas while a commit
/// checks and records a set or a removal decides what nobody refers to
/// (outputs GC). On PostgreSQL it is a session advisory lock held on a
/// connection taken from the pool, so a replica that dies mid-way
/// releases it with its connection; on SQLite (one grad) it is nothing
/// beyond the caller's own mutex.
pub struct ObjectsLock {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    key: String,
}

fn objects_key(owner_id: &str) -> String {
    format!("grad-objects:{owner_id}")
}

impl Store {
    /// Waits for the lock on `owner_id`'s content objects.
    pub async fn lock_objects(&self, owner_id: &str) -> Result<ObjectsLock> {
        let key = objects_key(owner_id);
        if !self.postgres {
            return Ok(ObjectsLock { conn: None, key });
        }
        // Built before the wait, so that a call cancelled while waiting
        // closes this connection rather than handing the pool a session
        // that will get the lock later and keep it.
        let mut lock = ObjectsLock {
            conn: Some(self.pool.acquire().await?),
            key,
        };
        if let Some(conn) = lock.conn.as_mut() {
            sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
                .bind(&lock.key)
                .execute(&mut **conn)
                .await?;
        }
        Ok(lock)
    }
}

impl ObjectsLock {
    /// Unlocks and hands the connection back to the pool.
    pub async fn release(mut self) -> Result<()> {
        if let Some(mut conn) = self.conn.take() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
                .bind(&self.key)
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // Closing the session is what releases it then.
                drop(conn.detach());
            }
            unlocked?;
        }
        Ok(())
    }
}

impl Drop for ObjectsLock {
    /// A lock not released (an error or a cancelled call on the way) must
    /// not go back to the pool still held: its connection is closed, which
    /// ends the session and with it the lock.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}
