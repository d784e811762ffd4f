-- Files customers upload into a chat conversation. They live here, not on an edge's disk, so
-- every edge pod can serve them. `data` is BYTEA: PostgreSQL's byte string, and a name SQLite
-- accepts for a column that keeps the blob as given. Every read is by (tenant_id,
-- conversation_id, id), so neither another session nor another tenant can reach a file.

CREATE TABLE chat_files (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    conversation_id TEXT NOT NULL,
    name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    data BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    -- NULL: kept until the tenant is deleted.
    expires_at_ms BIGINT
);
CREATE INDEX chat_files_by_conversation ON chat_files (tenant_id, conversation_id);
