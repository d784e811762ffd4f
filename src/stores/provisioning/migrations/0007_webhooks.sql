-- Webhook subscriptions of a tenant, and the delivery log of the webhooks worker: one message
-- per (subscription, event) with a deterministic id (the Standard Webhooks `webhook-id`), and
-- one row per delivery attempt. Same SQL for PostgreSQL and SQLite.

CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url TEXT NOT NULL,
    -- JSON lists: event filter (STARTED, FINISHED) and media filter (chat, email).
    events TEXT NOT NULL,
    media TEXT NOT NULL,
    -- `genesys` or `standard`.
    format TEXT NOT NULL,
    enabled BIGINT NOT NULL,
    -- base64 of nonce || XChaCha20-Poly1305 ciphertext, bound to tenant and webhook id.
    secret TEXT NOT NULL,
    -- The secret before the last rotation; it keeps signing until previous_until_ms.
    previous_secret TEXT,
    previous_until_ms BIGINT,
    -- Since when every attempt failed (NULL after a success); drives `disable_after`.
    failing_since_ms BIGINT,
    disabled_reason TEXT,
    created_at_ms BIGINT NOT NULL,
    UNIQUE (tenant_id, id)
);
CREATE INDEX webhooks_by_tenant ON webhooks (tenant_id, id);

CREATE TABLE webhook_messages (
    -- `msg_` + UUID v5 of (webhook id, event id): stable across retries and redeliveries.
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
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
CREATE INDEX webhook_messages_due ON webhook_messages (status, next_attempt_at_ms);
-- The claim reads pending messages in due order; a FINISHED waiting for its STARTED has a
-- NULL due time and is not in the range.
CREATE INDEX webhook_messages_pending ON webhook_messages (next_attempt_at_ms) WHERE status = 'pending';
CREATE INDEX webhook_messages_by_webhook ON webhook_messages (webhook_id, id);
CREATE INDEX webhook_messages_by_conversation ON webhook_messages (webhook_id, conversation_id, seq);

CREATE TABLE webhook_attempts (
    id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL REFERENCES webhook_messages (id) ON DELETE CASCADE,
    attempt BIGINT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    -- ok, failed, timeout, aborted, refused (target not allowed)
    outcome TEXT NOT NULL,
    status_code BIGINT,
    latency_ms BIGINT NOT NULL,
    error TEXT,
    next_attempt_at_ms BIGINT,
    UNIQUE (message_id, attempt)
);
