-- The gws worker's effect log: one row per GWS call (per effect, not per delivery), written
-- `pending` before the call and `done` or `rejected` after it, so a redelivered event never
-- repeats a call that took effect (GWS calls are not idempotent). `attempts` counts the calls
-- made; a `pending` row with attempts > 0 is reconciled against GWS before any new call.
-- Keyed by (tenant_id, conversation_id, effect_key). No foreign key to tenants: a deleted
-- tenant's rows go with the pruning (30 days after their last change, by updated_at_ms).

CREATE TABLE gws_effects (
    tenant_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    -- `accept:<agent>:<offer>`, `send:<message id>`, `transfer:<event id>`, `complete:<agent>`.
    effect_key TEXT NOT NULL,
    -- The first event that asked for the effect (for tracing).
    event_id TEXT NOT NULL,
    operation TEXT NOT NULL,
    -- pending | done | rejected
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    -- When the latest call started (ms); a call younger than the GWS timeout may be in flight.
    attempted_at_ms BIGINT,
    -- How it ended: `called`, `reconciled`, or GWS's refusal.
    detail TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, conversation_id, effect_key)
);
CREATE INDEX gws_effects_by_update ON gws_effects (updated_at_ms);
