-- The integration workers' backlog (src/workers/backlog/): events whose effect failed with a
-- retryable error (peer 5xx, timeout) and the later events of their conversation, queued
-- behind them in arrival order (`seq`). The event was acked when it went in; a scheduler
-- re-drives the head of each conversation at `due_at_ms`, so one failing conversation never
-- holds a partition. Same SQL for PostgreSQL and SQLite. No foreign key to tenants.

CREATE TABLE effect_backlog (
    -- The worker role (history, gws).
    role TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    -- Arrival order within the conversation; the lowest is the head.
    seq BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    -- Where the record came from, for its dead-letter headers.
    topic TEXT NOT NULL,
    source_partition BIGINT NOT NULL,
    source_offset BIGINT NOT NULL,
    record_key TEXT NOT NULL,
    -- The record as delivered: payload (base64 of the Avro single-object bytes) and headers.
    payload TEXT NOT NULL,
    headers_json TEXT NOT NULL,
    -- When the head may be tried next; while a pod drives it, the end of that pod's lease.
    due_at_ms BIGINT NOT NULL,
    -- Failed tries counted against the limit (not those while the peer was down for everyone).
    attempts BIGINT NOT NULL,
    last_error TEXT,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (role, tenant_id, conversation_id, event_id)
);
CREATE INDEX effect_backlog_due ON effect_backlog (role, due_at_ms);
-- One head per conversation even when two pods queue at once (a rebalance): the insert that
-- loses fails and is retried.
CREATE UNIQUE INDEX effect_backlog_order ON effect_backlog (role, tenant_id, conversation_id, seq);
