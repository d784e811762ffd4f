-- When the history worker kept each transcript entry, so that the prune can tell an open
-- conversation nobody wrote to for longer than any chat stays open (its close never reached
-- the worker) from a quiet async chat. Entries kept before this migration read 0: unknown, so
-- they never make their conversation look abandoned.
ALTER TABLE history_entries ADD COLUMN stored_at_ms BIGINT NOT NULL DEFAULT 0;
