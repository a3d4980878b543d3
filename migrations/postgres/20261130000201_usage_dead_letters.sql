-- Usage records the database refused (a constraint, a value it cannot store, a total
-- that would overflow). The accounting writer sets such a record aside here, then goes
-- on with the queue; an operator lists them and replays one after fixing the cause
-- (GET /admin/accounting/dead-letters, POST …/{id}/replay). Only an addition, so the
-- previous release runs against this schema unchanged.
-- `record` is the usage record as JSON text (escaped, so a NUL in it is storable);
-- `record_id` is its id (the lease id), unique so a record is set aside once.
CREATE TABLE usage_dead_letters (
    id            BIGSERIAL PRIMARY KEY,
    record_id     TEXT NOT NULL UNIQUE,
    record        TEXT NOT NULL,
    error         TEXT NOT NULL,
    attempts      BIGINT NOT NULL DEFAULT 1,
    first_seen_at BIGINT NOT NULL,
    last_seen_at  BIGINT NOT NULL
);
