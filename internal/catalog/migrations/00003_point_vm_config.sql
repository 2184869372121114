-- +goose Up
-- The VM's shape when the point was taken (CPUs, memory, firmware, guest OS, disk layout,
-- NICs), as JSON: a restore into a new VM recreates it. NULL: not captured (older points).
ALTER TABLE restore_points ADD COLUMN vm_config JSON NULL AFTER bytes_written;

-- +goose Down
ALTER TABLE restore_points DROP COLUMN vm_config;
