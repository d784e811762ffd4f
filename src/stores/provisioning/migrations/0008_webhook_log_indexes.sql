-- The delivery log's indexes, fewer and used: every message row is written three times (insert,
-- claim, outcome), each write maintaining every index. `webhook_messages_due` served no query
-- (the claim reads the partial index of pending messages); the conversation index is keyed by
-- tenant, which the FINISHED's look-up of its STARTED and the release after a STARTED use
-- (the order check narrows by tenant too). Same SQL for PostgreSQL and SQLite.

DROP INDEX IF EXISTS webhook_messages_due;
DROP INDEX IF EXISTS webhook_messages_by_conversation;
CREATE INDEX webhook_messages_by_conversation ON webhook_messages (tenant_id, conversation_id, seq);
