-- Secrets from rotations before the last one that still sign: a second rotation within the
-- overlap must not cut the first one's promise short. JSON list of {"secret": sealed, "until_ms"}
-- (sealed like `secret`); NULL is none. Same SQL for PostgreSQL and SQLite.

ALTER TABLE webhooks ADD COLUMN older_secrets TEXT;
