-- +goose Up
-- The in-place restore workflow that set the VM's mark: no backup of the VM starts while it
-- is open, and no in-place restore marks the VM while one of its backups runs.
ALTER TABLE vms ADD COLUMN restore_workflow_id VARCHAR(255) NULL AFTER next_full_since;

-- +goose Down
ALTER TABLE vms DROP COLUMN restore_workflow_id;
