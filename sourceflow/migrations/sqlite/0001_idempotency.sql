-- Idempotency claims (sourceflow::idempotency::SqliteIdempotencyStore).
-- Times are milliseconds since the Unix epoch, from the process clock.
CREATE TABLE IF NOT EXISTS sourceflow_idempotency (
    -- `{service}:{wire name}:{message id}`
    key TEXT NOT NULL PRIMARY KEY,
    -- SHA-256 of the payload, hex
    payload_hash TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
    -- proof of ownership of an in-progress claim; NULL once completed
    token TEXT,
    -- an in-progress claim's lease runs out at this time
    lease_until INTEGER,
    -- a completed record expires at this time
    expires_at INTEGER,
    -- messages the handler produced, not yet dispatched (JSON)
    outbox TEXT,
    created_at INTEGER NOT NULL
);

-- Batched cleanup of expired completed records.
CREATE INDEX IF NOT EXISTS sourceflow_idempotency_expires_at
    ON sourceflow_idempotency (expires_at);
