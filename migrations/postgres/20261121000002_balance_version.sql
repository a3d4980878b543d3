-- Bumped by every admin balance change. The counter store keeps the live balance ahead
-- of the database and applies each change's delta exactly once by comparing versions.
ALTER TABLE client_keys ADD COLUMN balance_version BIGINT NOT NULL DEFAULT 0;
