-- The transactional outbox (sourceflow::outbox): messages stored in the application's
-- transaction by `outbox::send` / `outbox::raise`, dispatched by the relay after the commit.
-- A row is deleted once the broker accepted it: the delete is its mark as sent.
-- `ordering_key` (the message group of a FIFO destination) orders the rows of one entity:
-- SQLite serializes writers, and AUTOINCREMENT never reuses an id, so `id` order is commit
-- order; the relay sends a key's rows in that order, one relay at a time per key.
-- `leased_until`/`lease_token`: a relay's hold on rows it is sending (epoch milliseconds).
CREATE TABLE IF NOT EXISTS sourceflow_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    wire_name TEXT NOT NULL,
    destination TEXT NOT NULL,
    body TEXT NOT NULL,
    attributes TEXT NOT NULL,
    group_id TEXT,
    dedup_id TEXT,
    delay_ms INTEGER,
    ordering_key TEXT,
    created_at INTEGER NOT NULL,
    leased_until INTEGER,
    lease_token TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);

CREATE INDEX IF NOT EXISTS sourceflow_outbox_ordering
    ON sourceflow_outbox (ordering_key, id) WHERE ordering_key IS NOT NULL;
