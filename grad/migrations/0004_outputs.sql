-- Outputs: each runner's last collected outputs/ (one set per runner id,
-- kept after the runner is deleted until removed), and its files, whose
-- bytes are content-addressed blobs (users/<owner>/sha256/<hex>).
CREATE TABLE output_sets (
    runner_id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES users (id),
    runner_name TEXT NOT NULL,
    collected_at BIGINT NOT NULL,
    file_count BIGINT NOT NULL,
    total_bytes BIGINT NOT NULL,
    -- What the collection left out and why (JSON array of strings).
    skipped TEXT NOT NULL,
    -- When the runner was deleted; NULL while it exists.
    deleted_at BIGINT
);

CREATE INDEX output_sets_by_owner ON output_sets (owner_id, runner_name);

CREATE TABLE output_files (
    runner_id TEXT NOT NULL,
    path TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    modified_at BIGINT NOT NULL,
    PRIMARY KEY (runner_id, path)
);

CREATE INDEX output_files_by_sha256 ON output_files (sha256);
