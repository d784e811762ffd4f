-- A receiver that answers 429 or 503 with Retry-After holds its whole endpoint, not only the
-- message it answered: no pod claims the endpoint's messages before `paused_until_ms`. NULL (or a
-- time in the past) is not paused. Same SQL for PostgreSQL and SQLite.

ALTER TABLE webhooks ADD COLUMN paused_until_ms BIGINT;
