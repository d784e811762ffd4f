-- The delivery log without foreign keys. Each key was checked per inserted row by a trigger
-- that also locked the parent row (a message its subscription, an attempt its message): about
-- a third of the database's CPU under a delivery burst. The code deletes a subscription's log
-- with it, and the hourly prune removes what a concurrent delete left behind (messages whose
-- subscription is gone). An attempt is keyed by (message, attempt number) alone: its separate
-- text id was one more index on every delivery and nothing read it (the column stays, nullable
-- and unindexed, so pods of the previous release can still write attempts during a rolling
-- upgrade). Tables are rebuilt through copies: SQLite cannot drop a constraint. Same SQL for
-- PostgreSQL and SQLite.

CREATE TABLE webhook_messages_copy AS SELECT * FROM webhook_messages;
CREATE TABLE webhook_attempts_copy AS SELECT * FROM webhook_attempts;
DROP TABLE webhook_attempts;
DROP TABLE webhook_messages;

CREATE TABLE webhook_messages (
    -- `msg_` + UUID v5 of (webhook id, event id): stable across retries and redeliveries.
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    -- The subscription (webhooks.id); no foreign key, see above.
    webhook_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    -- STARTED or FINISHED; `seq` orders them within a conversation (0 before 1).
    event TEXT NOT NULL,
    seq BIGINT NOT NULL,
    body TEXT NOT NULL,
    -- pending, delivered, aborted (the receiver said abort-message), dead (schedule exhausted).
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    -- Attempts since the last (re)queue: the index into the retry schedule.
    round_attempts BIGINT NOT NULL,
    next_attempt_at_ms BIGINT,
    -- A sender holds the message until then; a crashed sender's lease lapses.
    lease_until_ms BIGINT,
    last_status_code BIGINT,
    last_error TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
-- The claim reads pending messages in due order; a FINISHED waiting for its STARTED has a
-- NULL due time and is not in the range.
CREATE INDEX webhook_messages_pending ON webhook_messages (next_attempt_at_ms) WHERE status = 'pending';
CREATE INDEX webhook_messages_by_webhook ON webhook_messages (webhook_id, id);
CREATE INDEX webhook_messages_by_conversation ON webhook_messages (tenant_id, conversation_id, seq);

CREATE TABLE webhook_attempts (
    -- The message (webhook_messages.id); no foreign key, see above.
    message_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    -- ok, failed, timeout, aborted, refused (target not allowed)
    outcome TEXT NOT NULL,
    status_code BIGINT,
    latency_ms BIGINT NOT NULL,
    error TEXT,
    next_attempt_at_ms BIGINT,
    -- Unused since this migration (see above); written only by the previous release's pods.
    id TEXT,
    PRIMARY KEY (message_id, attempt)
);

INSERT INTO webhook_messages (id, tenant_id, webhook_id, event_id, conversation_id, event, seq, body, status, attempts, round_attempts, next_attempt_at_ms, lease_until_ms, last_status_code, last_error, created_at_ms, updated_at_ms)
    SELECT id, tenant_id, webhook_id, event_id, conversation_id, event, seq, body, status, attempts, round_attempts, next_attempt_at_ms, lease_until_ms, last_status_code, last_error, created_at_ms, updated_at_ms
    FROM webhook_messages_copy;
INSERT INTO webhook_attempts (id, message_id, attempt, started_at_ms, outcome, status_code, latency_ms, error, next_attempt_at_ms)
    SELECT id, message_id, attempt, started_at_ms, outcome, status_code, latency_ms, error, next_attempt_at_ms
    FROM webhook_attempts_copy;
DROP TABLE webhook_attempts_copy;
DROP TABLE webhook_messages_copy;
