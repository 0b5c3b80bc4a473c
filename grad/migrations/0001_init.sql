-- Portable SQL: runs on SQLite (the embedded default) and PostgreSQL.
-- Times are Unix milliseconds; ids are UUID text.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    plan TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE runners (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES users (id),
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    cpu_millis BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    storage_bytes BIGINT NOT NULL,
    gpus BIGINT NOT NULL,
    backend TEXT NOT NULL,
    workspace TEXT NOT NULL,
    -- The id of the runner's current agent token; a token with another id is refused.
    token_id TEXT NOT NULL,
    pid BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (owner_id, name)
);

CREATE TABLE executions (
    id TEXT PRIMARY KEY,
    runner_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    session TEXT NOT NULL,
    code TEXT NOT NULL,
    status TEXT NOT NULL,
    execution_count BIGINT NOT NULL,
    duration_us BIGINT NOT NULL,
    started_at BIGINT NOT NULL
);

CREATE INDEX executions_by_runner ON executions (runner_id, started_at);
