-- Prices of models, for usage that arrives as tokens (the proxies' reports, /v1/report
-- without cost_usd). Integer micro-USD per million tokens, never floats. A NULL cached
-- input or cache write price means "the input price". The bound (1,000,000 USD per
-- million tokens) is the one the admin API enforces; with token counts bounded too, no
-- cost computed from these columns can overflow (see src/prices/mod.rs).
CREATE TABLE model_prices (
    provider            TEXT NOT NULL,
    model               TEXT NOT NULL,
    input_micros        BIGINT NOT NULL CHECK (input_micros BETWEEN 0 AND 1000000000000),
    output_micros       BIGINT NOT NULL CHECK (output_micros BETWEEN 0 AND 1000000000000),
    cached_input_micros BIGINT CHECK (cached_input_micros BETWEEN 0 AND 1000000000000),
    cache_write_micros  BIGINT CHECK (cache_write_micros BETWEEN 0 AND 1000000000000),
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    PRIMARY KEY (provider, model)
);
