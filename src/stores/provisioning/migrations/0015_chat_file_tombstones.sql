-- The sweeper empties an expired file's bytes and keeps its row (swept = 1) while a transcript
-- may still name it: a download answers 410 FILE_EXPIRED from the row, and a retried upload of it
-- is refused, without reading the transcript. Rows go `closed_retention_s` + 30 days after their
-- expiry. The sweep looks only at rows not swept yet (a partial index: tombstones pile up behind
-- it). Same SQL for PostgreSQL and SQLite.

ALTER TABLE chat_files ADD COLUMN swept BIGINT NOT NULL DEFAULT 0;
CREATE INDEX chat_files_unswept ON chat_files (expires_at_ms) WHERE swept = 0;
