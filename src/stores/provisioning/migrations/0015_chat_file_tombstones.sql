-- The sweeper empties an expired file's bytes and keeps its row (swept = 1) while a transcript
-- may still name it: a download answers 410 FILE_EXPIRED from the row, and a retried upload of it
-- is refused, without reading the transcript. Rows go `closed_retention_s` after their expiry.
-- Same SQL for PostgreSQL and SQLite.

ALTER TABLE chat_files ADD COLUMN swept BIGINT NOT NULL DEFAULT 0;
