-- +goose Up
-- A read-only export serves a complete point for a restore or a mount; reconcile restarts a
-- dead one read-only again.
ALTER TABLE exports ADD COLUMN read_only BOOLEAN NOT NULL DEFAULT FALSE AFTER disk_key;

-- +goose Down
ALTER TABLE exports DROP COLUMN read_only;
