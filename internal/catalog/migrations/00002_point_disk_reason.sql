-- +goose Up
-- Why a disk was copied in full when an incremental was possible or asked for (CBT off, no
-- previous point, vCenter refused the previous changeId…), as the plan or the run decided.
ALTER TABLE point_disks ADD COLUMN reason VARCHAR(1024) NOT NULL DEFAULT '' AFTER mode;

-- +goose Down
ALTER TABLE point_disks DROP COLUMN reason;
