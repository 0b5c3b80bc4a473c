-- SSH: each runner's host key (as the runner reports it) and users' public keys.
ALTER TABLE runners ADD COLUMN host_key TEXT NOT NULL DEFAULT '';

CREATE TABLE ssh_keys (
    owner_id TEXT NOT NULL REFERENCES users (id),
    fingerprint TEXT NOT NULL,
    public_key TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (owner_id, fingerprint)
);
