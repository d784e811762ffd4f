-- A deleted tenant whose live session data (Redis, or the embedded store of `nexus dev`) is not
-- purged yet: written by the tenant's delete in its transaction, removed once the purge is done,
-- so a DELETE repeated after a purge that failed finds it and purges again instead of answering
-- 404. No foreign key: the tenant is gone. Same SQL for PostgreSQL and SQLite.

CREATE TABLE tenant_purges (
    tenant_id TEXT PRIMARY KEY,
    deleted_at_ms BIGINT NOT NULL
);
