-- The transactional outbox (sourceflow::outbox): messages stored in the application's
-- transaction by `outbox::send` / `outbox::raise`, dispatched by the relay after the commit.
-- A row is deleted once the broker accepted it: the delete is its mark as sent.
-- `ordering_key` (the message group of a FIFO destination) orders the rows of one entity:
-- the relay sends them in `id` order and never has two relays send rows of one key at once.
-- `leased_until`/`lease_token`: a relay's hold on rows it is sending (epoch milliseconds).
CREATE TABLE IF NOT EXISTS sourceflow_outbox (
    id BIGSERIAL PRIMARY KEY,
    message_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    wire_name TEXT NOT NULL,
    destination TEXT NOT NULL,
    body TEXT NOT NULL,
    attributes TEXT NOT NULL,
    group_id TEXT,
    dedup_id TEXT,
    delay_ms BIGINT,
    ordering_key TEXT,
    created_at BIGINT NOT NULL,
    leased_until BIGINT,
    lease_token TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);

CREATE INDEX IF NOT EXISTS sourceflow_outbox_ordering
    ON sourceflow_outbox (ordering_key, id) WHERE ordering_key IS NOT NULL;

-- One row per ordering key: `outbox::send` updates it before inserting, so that two
-- transactions storing messages of one key commit one after the other, and the rows' ids
-- follow their commit order.
CREATE TABLE IF NOT EXISTS sourceflow_outbox_keys (
    ordering_key TEXT PRIMARY KEY,
    stored BIGINT NOT NULL
);
