//! The state store: users, runners, executions, outputs and secrets in SQL through `sqlx::Any`,
//! so the same queries run on SQLite (the embedded default) and PostgreSQL.
//! Everything that must survive a grad restart lives here.

use std::{str::FromStr, time::Duration};

use sqlx::{
    AnyPool, Executor, Row,
    any::{AnyPoolOptions, AnyRow},
};

use crate::error::{Error, Result};

mod replicas;
mod secrets;

pub use replicas::{AgentRoute, ObjectsLock, Replica};
pub use secrets::Secret;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// PostgreSQL (row locks, SKIP LOCKED) rather than SQLite (one writer).
    postgres: bool,
    /// The PostgreSQL URL, for connections outside the pool (LISTEN).
    url: std::sync::Arc<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Free,
    Pro,
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub plan: Plan,
}

/// Runner lifecycle states, as stored and as shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Pending,
    Starting,
    Ready,
    Pausing,
    Paused,
    Resuming,
    Deleting,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub storage_bytes: u64,
    pub gpus: u32,
}

#[derive(Debug, Clone)]
pub struct Runner {
    pub id: String,
    pub owner_id: String,
    pub owner_name: String,
    pub name: String,
    pub state: State,
    pub reason: String,
    pub resources: Resources,
    pub backend: String,
    pub workspace: String,
    pub token_id: String,
    pub pid: Option<u32>,
    pub host_key: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Its datasets and their mount status (no secrets).
    pub datasets: Vec<crate::datasets::Dataset>,
    /// The datasets' credentials, sealed (see `crate::sealed`); "" for none.
    pub dataset_credentials: String,
}

#[derive(Debug, Clone)]
pub struct SshKey {
    pub fingerprint: String,
    pub public_key: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct Execution {
    pub id: String,
    pub runner_id: String,
    pub owner_id: String,
    pub session: String,
    pub code: String,
    pub status: String,
    pub execution_count: u32,
    pub duration_us: u64,
    pub started_at: i64,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

macro_rules! text_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }
        }
        impl ::std::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl ::std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    other => Err(format!(
                        "invalid value '{other}': expected one of {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }
    };
}

// After the macro: the modules below use it.
mod jobs;
mod outputs;

pub use jobs::{Attempt, Job, JobState, LogLine, Worker};
pub use outputs::{OutputFile, OutputSet, Source};

text_enum!(Role { Admin => "admin", User => "user" });
text_enum!(Plan { Free => "free", Pro => "pro" });
text_enum!(State {
    Pending => "pending",
    Starting => "starting",
    Ready => "ready",
    Pausing => "pausing",
    Paused => "paused",
    Resuming => "resuming",
    Deleting => "deleting",
    Failed => "failed",
});

fn parse_column<T: FromStr<Err = String>>(row: &AnyRow, column: &str) -> Result<T> {
    let text: String = row.try_get(column)?;
    text.parse().map_err(|e: String| {
        Error::Store(sqlx::Error::ColumnDecode {
            index: column.to_string(),
            source: e.into(),
        })
    })
}

const RUNNER_COLUMNS: &str = "r.id, r.owner_id, u.name AS owner_name, r.name, r.state, r.reason, \
     r.cpu_millis, r.memory_bytes, r.storage_bytes, r.gpus, r.backend, r.workspace, r.token_id, \
     r.pid, r.host_key, r.created_at, r.updated_at, r.datasets, r.dataset_credentials";

fn runner_from_row(row: &AnyRow) -> Result<Runner> {
    let pid: Option<i64> = row.try_get("pid")?;
    Ok(Runner {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        owner_name: row.try_get("owner_name")?,
        name: row.try_get("name")?,
        state: parse_column(row, "state")?,
        reason: row.try_get("reason")?,
        resources: Resources {
            cpu_millis: row.try_get::<i64, _>("cpu_millis")? as u32,
            memory_bytes: row.try_get::<i64, _>("memory_bytes")? as u64,
            storage_bytes: row.try_get::<i64, _>("storage_bytes")? as u64,
            gpus: row.try_get::<i64, _>("gpus")? as u32,
        },
        backend: row.try_get("backend")?,
        workspace: row.try_get("workspace")?,
        token_id: row.try_get("token_id")?,
        pid: pid.map(|p| p as u32),
        host_key: row.try_get("host_key")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        datasets: serde_json::from_str(&row.try_get::<String, _>("datasets")?).map_err(|e| {
            Error::FailedPrecondition(format!("a runner's datasets in the store: {e}"))
        })?,
        dataset_credentials: row.try_get("dataset_credentials")?,
    })
}

fn datasets_json(datasets: &[crate::datasets::Dataset]) -> Result<String> {
    serde_json::to_string(datasets)
        .map_err(|e| Error::FailedPrecondition(format!("encoding datasets: {e}")))
}

fn ssh_key_from_row(row: &AnyRow) -> Result<SshKey> {
    Ok(SshKey {
        fingerprint: row.try_get("fingerprint")?,
        public_key: row.try_get("public_key")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
    })
}

fn user_from_row(row: &AnyRow) -> Result<User> {
    Ok(User {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: parse_column(row, "role")?,
        plan: parse_column(row, "plan")?,
    })
}

impl Store {
    /// Opens (creating if needed) the database at `url` and applies migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if sqlite {
                        // WAL lets readers run beside the writer; NORMAL is durable
                        // across application crashes, which is what grad needs.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Store {
            pool,
            postgres: !sqlite,
            url: url.into(),
        })
    }

    /// The PostgreSQL server's URL; `None` on SQLite.
    pub fn postgres_url(&self) -> Option<&str> {
        self.postgres.then_some(&*self.url)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // Users.

    pub async fn insert_user(&self, name: &str, role: Role, plan: Plan) -> Result<User> {
        let user = User {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_string(),
            role,
            plan,
        };
        let inserted = sqlx::query(
            "INSERT INTO users (id, name, role, plan, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&user.id)
        .bind(&user.name)
        .bind(role.as_str())
        .bind(plan.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(user),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(Error::AlreadyExists(
                format!("user '{name}' already exists"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>> {
        let row = sqlx::query("SELECT id, name, role, plan FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Whether there was such a user.
    pub async fn set_user_plan(&self, name: &str, plan: Plan) -> Result<bool> {
        let done = sqlx::query("UPDATE users SET plan = $1 WHERE name = $2")
            .bind(plan.as_str())
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        let row = sqlx::query("SELECT id, name, role, plan FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    // Runners.

    pub async fn insert_runner(&self, runner: &Runner) -> Result<()> {
        let inserted = sqlx::query(
            "INSERT INTO runners (id, owner_id, name, state, reason, cpu_millis, memory_bytes, \
             storage_bytes, gpus, backend, workspace, token_id, pid, created_at, updated_at, \
             datasets, dataset_credentials) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(&runner.id)
        .bind(&runner.owner_id)
        .bind(&runner.name)
        .bind(runner.state.as_str())
        .bind(&runner.reason)
        .bind(i64::from(runner.resources.cpu_millis))
        .bind(runner.resources.memory_bytes as i64)
        .bind(runner.resources.storage_bytes as i64)
        .bind(i64::from(runner.resources.gpus))
        .bind(&runner.backend)
        .bind(&runner.workspace)
        .bind(&runner.token_id)
        .bind(runner.pid.map(i64::from))
        .bind(runner.created_at)
        .bind(runner.updated_at)
        .bind(datasets_json(&runner.datasets)?)
        .bind(&runner.dataset_credentials)
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(Error::AlreadyExists(
                format!("runner '{}' already exists", runner.name),
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn runner_by_name(&self, owner_id: &str, name: &str) -> Result<Option<Runner>> {
        let sql = format!(
            "SELECT {RUNNER_COLUMNS} FROM runners r JOIN users u ON u.id = r.owner_id \
             WHERE r.owner_id = $1 AND r.name = $2"
        );
        let row = sqlx::query(&sql)
            .bind(owner_id)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(runner_from_row).transpose()
    }

    pub async fn runner_by_id(&self, id: &str) -> Result<Option<Runner>> {
        let sql = format!(
            "SELECT {RUNNER_COLUMNS} FROM runners r JOIN users u ON u.id = r.owner_id \
             WHERE r.id = $1"
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(runner_from_row).transpose()
    }

    /// Runners of one owner, or of everyone when `owner_id` is `None`.
    pub async fn list_runners(&self, owner_id: Option<&str>) -> Result<Vec<Runner>> {
        let rows = match owner_id {
            Some(owner) => {
                let sql = format!(
                    "SELECT {RUNNER_COLUMNS} FROM runners r JOIN users u ON u.id = r.owner_id \
                     WHERE r.owner_id = $1 ORDER BY r.name"
                );
                sqlx::query(&sql).bind(owner).fetch_all(&self.pool).await?
            }
            None => {
                let sql = format!(
                    "SELECT {RUNNER_COLUMNS} FROM runners r JOIN users u ON u.id = r.owner_id \
                     ORDER BY u.name, r.name"
                );
                sqlx::query(&sql).fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(runner_from_row).collect()
    }

    pub async fn set_runner_state(&self, id: &str, state: State, reason: &str) -> Result<()> {
        sqlx::query("UPDATE runners SET state = $1, reason = $2, updated_at = $3 WHERE id = $4")
            .bind(state.as_str())
            .bind(reason)
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Says what a starting runner waits for, leaving its state and the
    /// time it entered it (which the start timeout counts from) alone.
    pub async fn set_runner_reason(&self, id: &str, reason: &str) -> Result<()> {
        sqlx::query("UPDATE runners SET reason = $1 WHERE id = $2")
            .bind(reason)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Moves the runner from state `from` to `to`; answers false (changing
    /// nothing) when it was no longer in `from`: another replica moved it.
    pub async fn set_runner_state_from(&self, id: &str, from: State, to: State) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE runners SET state = $1, reason = '', updated_at = $2 WHERE id = $3 AND state = $4",
        )
        .bind(to.as_str())
        .bind(now_ms())
        .bind(id)
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn set_runner_pid(&self, id: &str, pid: Option<u32>) -> Result<()> {
        sqlx::query("UPDATE runners SET pid = $1 WHERE id = $2")
            .bind(pid.map(i64::from))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_runner_token(&self, id: &str, token_id: &str) -> Result<()> {
        sqlx::query("UPDATE runners SET token_id = $1 WHERE id = $2")
            .bind(token_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_runner_host_key(&self, id: &str, host_key: &str) -> Result<()> {
        sqlx::query("UPDATE runners SET host_key = $1 WHERE id = $2")
            .bind(host_key)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records what the runner reported about its datasets.
    pub async fn set_runner_datasets(
        &self,
        id: &str,
        datasets: &[crate::datasets::Dataset],
    ) -> Result<()> {
        sqlx::query("UPDATE runners SET datasets = $1, updated_at = $2 WHERE id = $3")
            .bind(datasets_json(datasets)?)
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_runner(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM executions WHERE runner_id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM runners WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.outputs_of_deleted_runner(id).await
    }

    // SSH keys.

    /// Adds a key; the same key again is not an error and keeps the first record.
    pub async fn insert_ssh_key(&self, owner_id: &str, key: &SshKey) -> Result<SshKey> {
        if let Some(existing) = self.ssh_key(owner_id, &key.fingerprint).await? {
            return Ok(existing);
        }
        sqlx::query(
            "INSERT INTO ssh_keys (owner_id, fingerprint, public_key, name, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(owner_id)
        .bind(&key.fingerprint)
        .bind(&key.public_key)
        .bind(&key.name)
        .bind(key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(key.clone())
    }

    pub async fn ssh_key(&self, owner_id: &str, fingerprint: &str) -> Result<Option<SshKey>> {
        let row = sqlx::query(
            "SELECT fingerprint, public_key, name, created_at FROM ssh_keys \
             WHERE owner_id = $1 AND fingerprint = $2",
        )
        .bind(owner_id)
        .bind(fingerprint)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(ssh_key_from_row).transpose()
    }

    pub async fn ssh_keys(&self, owner_id: &str) -> Result<Vec<SshKey>> {
        let rows = sqlx::query(
            "SELECT fingerprint, public_key, name, created_at FROM ssh_keys \
             WHERE owner_id = $1 ORDER BY created_at, fingerprint",
        )
        .bind(owner_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(ssh_key_from_row).collect()
    }

    pub async fn delete_ssh_key(&self, owner_id: &str, fingerprint: &str) -> Result<()> {
        sqlx::query("DELETE FROM ssh_keys WHERE owner_id = $1 AND fingerprint = $2")
            .bind(owner_id)
            .bind(fingerprint)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // Executions.

    pub async fn insert_execution(&self, e: &Execution) -> Result<()> {
        sqlx::query(
            "INSERT INTO executions (id, runner_id, owner_id, session, code, status, \
             execution_count, duration_us, started_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&e.id)
        .bind(&e.runner_id)
        .bind(&e.owner_id)
        .bind(&e.session)
        .bind(&e.code)
        .bind(&e.status)
        .bind(i64::from(e.execution_count))
        .bind(e.duration_us as i64)
        .bind(e.started_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest `limit` executions of a runner, newest first.
    pub async fn list_executions(&self, runner_id: &str, limit: u32) -> Result<Vec<Execution>> {
        let rows = sqlx::query(
            "SELECT id, runner_id, owner_id, session, code, status, execution_count, duration_us, \
             started_at FROM executions WHERE runner_id = $1 ORDER BY started_at DESC, id LIMIT $2",
        )
        .bind(runner_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Execution {
                    id: row.try_get("id")?,
                    runner_id: row.try_get("runner_id")?,
                    owner_id: row.try_get("owner_id")?,
                    session: row.try_get("session")?,
                    code: row.try_get("code")?,
                    status: row.try_get("status")?,
                    execution_count: row.try_get::<i64, _>("execution_count")? as u32,
                    duration_us: row.try_get::<i64, _>("duration_us")? as u64,
                    started_at: row.try_get("started_at")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("grad.db").display());
        let store = Store::connect(&url).await.unwrap();
        (dir, store)
    }

    fn runner(owner: &User, name: &str) -> Runner {
        Runner {
            id: uuid::Uuid::new_v4().to_string(),
            owner_id: owner.id.clone(),
            owner_name: owner.name.clone(),
            name: name.to_string(),
            state: State::Pending,
            reason: String::new(),
            resources: Resources {
                cpu_millis: 2000,
                memory_bytes: 4 << 30,
                storage_bytes: 10 << 30,
                gpus: 0,
            },
            backend: "local".into(),
            workspace: "/tmp/w".into(),
            token_id: "t".into(),
            pid: None,
            host_key: String::new(),
            created_at: now_ms(),
            updated_at: now_ms(),
            datasets: Vec::new(),
            dataset_credentials: String::new(),
        }
    }

    #[tokio::test]
    async fn runner_names_are_unique_per_owner_not_globally() {
        let (_dir, store) = temp_store().await;
        let alice = store
            .insert_user("alice", Role::User, Plan::Free)
            .await
            .unwrap();
        let bob = store
            .insert_user("bob", Role::User, Plan::Free)
            .await
            .unwrap();
        store.insert_runner(&runner(&alice, "r1")).await.unwrap();
        store.insert_runner(&runner(&bob, "r1")).await.unwrap();
        let again = store.insert_runner(&runner(&alice, "r1")).await;
        assert!(matches!(again, Err(Error::AlreadyExists(_))), "{again:?}");
        assert_eq!(store.list_runners(Some(&alice.id)).await.unwrap().len(), 1);
        assert_eq!(store.list_runners(None).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn runner_state_round_trips_through_the_database() {
        let (_dir, store) = temp_store().await;
        let alice = store
            .insert_user("alice", Role::Admin, Plan::Pro)
            .await
            .unwrap();
        let r = runner(&alice, "r1");
        store.insert_runner(&r).await.unwrap();
        store
            .set_runner_state(&r.id, State::Failed, "process exited")
            .await
            .unwrap();
        store.set_runner_pid(&r.id, Some(42)).await.unwrap();
        let back = store
            .runner_by_name(&alice.id, "r1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.state, State::Failed);
        assert_eq!(back.reason, "process exited");
        assert_eq!(back.pid, Some(42));
        assert_eq!(back.owner_name, "alice");
        assert_eq!(back.resources, r.resources);
        store.delete_runner(&r.id).await.unwrap();
        assert!(store.runner_by_id(&r.id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn duplicate_user_names_are_refused() {
        let (_dir, store) = temp_store().await;
        store
            .insert_user("alice", Role::User, Plan::Free)
            .await
            .unwrap();
        let again = store.insert_user("alice", Role::User, Plan::Pro).await;
        assert!(matches!(again, Err(Error::AlreadyExists(_))));
    }
}
