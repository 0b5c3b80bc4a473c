-- Users' secrets, sealed with grad's secrets key and bound to their owner
-- and name (a sealed value moved to another row does not open).
CREATE TABLE secrets (
    owner_id TEXT NOT NULL REFERENCES users (id),
    name TEXT NOT NULL,
    sealed TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (owner_id, name)
);
