-- +goose Up
-- The VM's next backup must be full (its disks were overwritten by an in-place restore, so
-- CBT no longer describes what the points hold), why, and since when: only a full point
-- opened after the mark clears it.
ALTER TABLE vms ADD COLUMN next_full_reason VARCHAR(1024) NULL AFTER name;
ALTER TABLE vms ADD COLUMN next_full_since DATETIME(6) NULL AFTER next_full_reason;

-- +goose Down
ALTER TABLE vms DROP COLUMN next_full_since;
ALTER TABLE vms DROP COLUMN next_full_reason;
