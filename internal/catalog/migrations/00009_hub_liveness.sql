-- +goose Up
-- Every hub worker writes its row at start and at each heartbeat: when it was last seen and
-- the space of its repository's file system, so a new VM's chain goes to a live hub with room,
-- and its export port range, which every hub worker leases that hub's ports from.
ALTER TABLE hubs ADD COLUMN last_seen DATETIME(6) NULL AFTER created_at;
ALTER TABLE hubs ADD COLUMN free_bytes BIGINT NULL AFTER last_seen;
ALTER TABLE hubs ADD COLUMN used_bytes BIGINT NULL AFTER free_bytes;
ALTER TABLE hubs ADD COLUMN port_first INT NULL AFTER used_bytes;
ALTER TABLE hubs ADD COLUMN port_last INT NULL AFTER port_first;

-- +goose Down
ALTER TABLE hubs DROP COLUMN port_last;
ALTER TABLE hubs DROP COLUMN port_first;
ALTER TABLE hubs DROP COLUMN used_bytes;
ALTER TABLE hubs DROP COLUMN free_bytes;
ALTER TABLE hubs DROP COLUMN last_seen;
