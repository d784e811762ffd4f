-- The history worker's effect state (src/workers/history/): per conversation the UCS ids and
-- the last step applied at UCS, and the transcript entries it collected until the close. A
-- redelivered or replayed event finds its step done and is a no-op. No foreign key to tenants:
-- events of a tenant deleted meanwhile must still be acked, not retried forever.

CREATE TABLE history_conversations (
    tenant_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    -- 0 recorded, 1 contact identified, 2 interaction inserted, 3 transcript added,
    -- 4 attachments added, 5 status set (done).
    step BIGINT NOT NULL,
    -- ConversationStarted as JSON (contact, subject, user data, start time).
    started_json TEXT NOT NULL,
    contact_id TEXT,
    interaction_id TEXT,
    -- ConversationClosed as JSON (reason, end time); NULL while open.
    closed_json TEXT,
    -- Attachments added so far while step = 3.
    attachments_done BIGINT NOT NULL DEFAULT 0,
    -- The event that applied the last step.
    last_event_id TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, conversation_id)
);

-- Messages and participant changes by transcript position: a redelivery is the same key.
-- Deleted once the conversation's transcript is written.
CREATE TABLE history_entries (
    tenant_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    position BIGINT NOT NULL,
    entry_json TEXT NOT NULL,
    PRIMARY KEY (tenant_id, conversation_id, position)
);
