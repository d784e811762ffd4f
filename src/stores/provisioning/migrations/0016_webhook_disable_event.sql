-- A subscription the webhooks worker disabled owes its WebhookEndpointDisabled event until the
-- bus took it: 1 from the disable (same statement) until the publish, so a publish that failed,
-- or a pod that died in between, leaves it for the worker's periodic pass to publish again.
-- Same SQL for PostgreSQL and SQLite.

ALTER TABLE webhooks ADD COLUMN disable_event_pending BIGINT NOT NULL DEFAULT 0;
