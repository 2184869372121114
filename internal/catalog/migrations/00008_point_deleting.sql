-- +goose Up
-- A point retention removes is marked deleting before any of its files changes: never
-- restorable again, and its disk rows name the files still to be removed until they are gone.
ALTER TABLE restore_points MODIFY COLUMN status ENUM('running', 'complete', 'failed', 'deleting') NOT NULL;

-- +goose Down
-- Fails (strict mode) while a point is deleting: let retention finish first, its rows are
-- the only record of the files it still has to remove.
ALTER TABLE restore_points MODIFY COLUMN status ENUM('running', 'complete', 'failed') NOT NULL;
