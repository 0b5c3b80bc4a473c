-- Batch jobs, their attempts and live log lines, and the workers that run
-- them. Specs are JSON; times are Unix milliseconds.
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES users (id),
    name TEXT NOT NULL,
    -- 1: runs every user's jobs (an admin's worker); 0: only its owner's.
    shared BIGINT NOT NULL,
    labels TEXT NOT NULL,
    -- The id of the worker's current token; a token with another id is refused.
    token_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    UNIQUE (owner_id, name)
);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES users (id),
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    bundle_size BIGINT NOT NULL,
    -- What a worker must have, copied from the spec for the claim's query.
    gpus BIGINT NOT NULL,
    needs_docker BIGINT NOT NULL,
    -- The runner (id) the job must run on; '' for any worker.
    target_runner TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    exit_code BIGINT,
    -- Attempts started so far, and at most.
    attempt BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    worker_id TEXT,
    worker_name TEXT NOT NULL,
    lease_expires_at BIGINT,
    -- Who asked to cancel a running job ('' if nobody).
    cancelled_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    updated_at BIGINT NOT NULL
);

CREATE INDEX jobs_by_state ON jobs (state, created_at);
CREATE INDEX jobs_by_owner ON jobs (owner_id, created_at);

CREATE TABLE job_attempts (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    worker_name TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    finished_at BIGINT,
    -- The attempt's whole log in the blob store, once uploaded ('' before).
    log_sha256 TEXT NOT NULL,
    log_size BIGINT NOT NULL,
    log_lines BIGINT NOT NULL,
    PRIMARY KEY (job_id, attempt)
);

-- Live log lines of attempts whose log is not archived yet.
CREATE TABLE job_logs (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    line BIGINT NOT NULL,
    at BIGINT NOT NULL,
    stream BIGINT NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (job_id, attempt, line)
);
