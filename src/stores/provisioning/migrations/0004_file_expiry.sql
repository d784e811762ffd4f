-- The sweeper deletes chat files past expires_at_ms in batches; this index finds them without
-- a scan of every file's row.
CREATE INDEX chat_files_by_expiry ON chat_files (expires_at_ms);
