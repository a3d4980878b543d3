-- Spend alerts (src/usage/ledger.rs queues them, src/alerts delivers them). `id` is hex
-- SHA-256 of `counter|period|start_day|pct`, so a threshold alerts once per period.
-- `payload` is the webhook's JSON body, fixed when the alert is made. Times are Unix ms.
-- `next_attempt_at` is when a replica may (re)claim it: a claim pushes it forward first,
-- so two replicas never send one alert at once. Delivered alerts keep their row.
CREATE TABLE alerts (
    id              TEXT PRIMARY KEY,
    payload         TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    delivered_at    BIGINT,
    last_error      TEXT
);
CREATE INDEX alerts_due ON alerts (next_attempt_at) WHERE delivered_at IS NULL;
CREATE INDEX alerts_newest ON alerts (created_at, id);
