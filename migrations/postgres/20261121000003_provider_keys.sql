-- The provider key pool: upstream API keys per provider, tried by priority, then least
-- recently used. Values are AES-256-GCM ciphertexts (enc:v1:). Live state (windows,
-- cooldowns, suspensions, last selection) is in the counter store, not here; totals and
-- last use arrive through the accounting queue.
CREATE TABLE provider_keys (
    id             TEXT PRIMARY KEY,
    provider       TEXT NOT NULL,
    label          TEXT NOT NULL,
    key_encrypted  TEXT NOT NULL,
    priority       BIGINT NOT NULL DEFAULT 0,
    max_rpm        BIGINT,
    max_tpm        BIGINT,
    is_active      BOOLEAN NOT NULL DEFAULT TRUE,
    total_requests BIGINT NOT NULL DEFAULT 0,
    total_tokens   BIGINT NOT NULL DEFAULT 0,
    last_used_at   BIGINT,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

CREATE INDEX provider_keys_by_provider ON provider_keys (provider, priority, created_at);

-- Per-minute usage of a provider key is read from the usage history.
CREATE INDEX usage_records_by_provider_key_time ON usage_records (provider_key_id, created_at);
