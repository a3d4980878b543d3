-- Quotas beyond a key's per-minute windows (src/quota.rs): requests and tokens per UTC
-- day, spend limits per day / week / month / total (JSON, micro-USD exact as decimal
-- text), and limits per model (JSON: model -> limit set). NULL = none.
ALTER TABLE client_keys ADD COLUMN daily_request_limit BIGINT;
ALTER TABLE client_keys ADD COLUMN daily_token_limit BIGINT;
ALTER TABLE client_keys ADD COLUMN spend_limits TEXT;
ALTER TABLE client_keys ADD COLUMN model_limits TEXT;

-- The limits of a user: all client keys with this user_id together. `limits` is a JSON
-- limit set (rate_limit, tpm_limit, daily_request_limit, daily_token_limit,
-- spend_limits); `model_limits` as on client_keys.
CREATE TABLE users (
    user_id      TEXT PRIMARY KEY,
    limits       TEXT NOT NULL,
    model_limits TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);


-- What each scope used per period, as applied by the accounting writer (the database's
-- side of the quotas; the counter store's live counters are seeded from it). `counter`
-- is the scope's counter id (src/quota.rs, Scope::counter_id), `period` day / week /
-- month / total, `start_day` the period's first UTC day since 1970-01-01 (0 for total).
-- Rows exist for the key and user scopes of every applied record, and for a model entry
-- listed (at the time the record was applied) by its key or user.
CREATE TABLE quota_usage (
    counter     TEXT NOT NULL,
    period      TEXT NOT NULL,
    start_day   BIGINT NOT NULL,
    requests    BIGINT NOT NULL DEFAULT 0,
    tokens      BIGINT NOT NULL DEFAULT 0,
    cost_micros BIGINT NOT NULL DEFAULT 0,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (counter, period, start_day)
);
