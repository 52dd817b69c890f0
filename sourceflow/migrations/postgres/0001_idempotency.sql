-- Idempotency claims (sourceflow::idempotency::PostgresIdempotencyStore).
-- Times are milliseconds since the Unix epoch, from the database server's clock, so that
-- instances on hosts with skewed clocks agree on leases and expiries.
CREATE TABLE IF NOT EXISTS sourceflow_idempotency (
    -- `{service}:{wire name}:{message id}`
    key TEXT NOT NULL PRIMARY KEY,
    -- SHA-256 of the payload, hex
    payload_hash TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
    -- proof of ownership of an in-progress claim; NULL once completed
    token TEXT,
    -- an in-progress claim's lease runs out at this time
    lease_until BIGINT,
    -- a completed record expires at this time
    expires_at BIGINT,
    -- messages the handler produced, not yet dispatched (JSON)
    outbox TEXT,
    created_at BIGINT NOT NULL
);

-- Batched cleanup of expired completed records.
CREATE INDEX IF NOT EXISTS sourceflow_idempotency_expires_at
    ON sourceflow_idempotency (expires_at);
