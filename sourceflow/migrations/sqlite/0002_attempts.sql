-- Handler attempts per key (sourceflow::idempotency::SqliteIdempotencyStore).
-- `attempts` counts the handler attempts recorded for the key: a release as failed and the
-- takeover of a claim whose worker died holding it add one; a release as returned (the
-- message went back untouched) and the takeover of a released claim add nothing. A claim is
-- attempt `attempts + 1`. Records written before this migration count from 0.
-- A released claim stays `in_progress` with no token, claimable at once; `lease_until` is
-- then the time of its release.
ALTER TABLE sourceflow_idempotency ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;

-- Batched cleanup of claims abandoned for more than an hour after their lease ran out
-- (small: in-progress records only).
CREATE INDEX IF NOT EXISTS sourceflow_idempotency_abandoned
    ON sourceflow_idempotency (lease_until) WHERE state = 'in_progress';
