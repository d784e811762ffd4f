-- Provisioning schema, the same SQL for PostgreSQL and SQLite (through sqlx's Any driver):
-- ids are UUID v7 text, times are BIGINT milliseconds, flags BIGINT 0/1, lists and maps JSON text.
-- Objects of a tenant reference each other through (tenant_id, id), so a link across tenants
-- cannot be stored even by a buggy caller.

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    -- hex SHA-256 of the raw key; the raw key is never stored.
    key_hash TEXT NOT NULL UNIQUE,
    permissions TEXT NOT NULL,
    enabled BIGINT NOT NULL,
    expires_at_ms BIGINT,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, id);

CREATE TABLE queues (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, id)
);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    skills TEXT NOT NULL,
    capacity TEXT NOT NULL,
    -- hex SHA-256 of the agent token; the raw token is never stored.
    token_hash TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX agents_by_tenant ON agents (tenant_id, id);

CREATE TABLE bots (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    url TEXT NOT NULL,
    -- base64 of nonce || XChaCha20-Poly1305 ciphertext, bound to tenant and bot id.
    credential TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, id)
);

CREATE TABLE routing_rules (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    channel TEXT NOT NULL,
    attributes TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    required_skills TEXT NOT NULL,
    priority BIGINT NOT NULL,
    bot_id TEXT,
    created_at_ms BIGINT NOT NULL,
    FOREIGN KEY (tenant_id, queue_id) REFERENCES queues (tenant_id, id),
    FOREIGN KEY (tenant_id, bot_id) REFERENCES bots (tenant_id, id)
);
CREATE INDEX routing_rules_by_tenant ON routing_rules (tenant_id, id);
