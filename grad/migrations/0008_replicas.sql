-- The grad replicas sharing this database, and which one holds each
-- runner's agent connection: a request for a runner that reaches another
-- replica is forwarded to that one. Times are Unix milliseconds.
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    -- Where the other replicas reach this one (its advertised URL).
    url TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

CREATE TABLE agent_routes (
    runner_id TEXT PRIMARY KEY REFERENCES runners (id) ON DELETE CASCADE,
    replica_id TEXT NOT NULL,
    -- The connection's number on that replica: a later connection replaces it.
    conn BIGINT NOT NULL,
    attached_at BIGINT NOT NULL,
    -- When that connection ended (NULL while it is up): how long a runner
    -- has been away, whichever replica looks.
    detached_at BIGINT
);
