-- Client keys and their usage history (SQLite).
-- Time: BIGINT Unix milliseconds (UTC). Money: BIGINT micro-USD. Lists: JSON text.
-- Same shape as migrations/postgres, so one SQL text serves both backends; booleans are
-- INTEGER 0/1 here (sqlx's Any driver cannot decode SQLite's BOOLEAN affinity).

CREATE TABLE client_keys (
    id                    TEXT PRIMARY KEY,
    user_id               TEXT,
    name                  TEXT NOT NULL,
    key_hash              TEXT NOT NULL UNIQUE,
    key_encrypted         TEXT NOT NULL,
    prefix                TEXT NOT NULL,
    allowed_providers     TEXT,
    allowed_api_formats   TEXT,
    allowed_models        TEXT,
    rate_limit            BIGINT,
    tpm_limit             BIGINT,
    concurrent_limit      BIGINT,
    expires_at            BIGINT,
    is_standalone         INTEGER NOT NULL DEFAULT 0,
    balance_micros        BIGINT,
    balance_used_micros   BIGINT NOT NULL DEFAULT 0,
    auto_delete_on_expiry INTEGER,
    is_active             INTEGER NOT NULL DEFAULT 1,
    total_requests        BIGINT NOT NULL DEFAULT 0,
    total_tokens          BIGINT NOT NULL DEFAULT 0,
    total_cost_micros     BIGINT NOT NULL DEFAULT 0,
    created_at            BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL,
    last_used_at          BIGINT
);

CREATE INDEX client_keys_by_user ON client_keys (user_id, created_at);
CREATE INDEX client_keys_by_standalone ON client_keys (is_standalone, created_at);
CREATE INDEX client_keys_expiring ON client_keys (expires_at) WHERE is_active = 1;

-- One row per reported request. `id` is the lease id (or a fresh id for a report
-- without one): the primary key is what makes accounting exactly-once.
-- `key_id` has no foreign key on purpose: history outlives a deleted key.
CREATE TABLE usage_records (
    id                TEXT PRIMARY KEY,
    key_id            TEXT,
    provider          TEXT,
    model             TEXT,
    api_format        TEXT,
    provider_key_id   TEXT,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    total_tokens      BIGINT NOT NULL DEFAULT 0,
    cost_micros       BIGINT NOT NULL DEFAULT 0,
    latency_ms        BIGINT,
    upstream_status   BIGINT,
    created_at        BIGINT NOT NULL
);

CREATE INDEX usage_records_by_key_time ON usage_records (key_id, created_at);
