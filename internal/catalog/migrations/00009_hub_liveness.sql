-- +goose Up
-- Every hub worker writes its row at start and at each heartbeat: when it was last seen and
-- the space of its repository's file system, so a new VM's chain goes to a live hub with room.
ALTER TABLE hubs ADD COLUMN last_seen DATETIME(6) NULL AFTER created_at;
ALTER TABLE hubs ADD COLUMN free_bytes BIGINT NULL AFTER last_seen;
ALTER TABLE hubs ADD COLUMN used_bytes BIGINT NULL AFTER free_bytes;

-- +goose Down
ALTER TABLE hubs DROP COLUMN used_bytes;
ALTER TABLE hubs DROP COLUMN free_bytes;
ALTER TABLE hubs DROP COLUMN last_seen;
