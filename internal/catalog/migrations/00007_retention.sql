-- +goose Up
-- Retention policies: a VM's own, and the default of a backup schedule (by its Temporal
-- schedule ID) for the VMs it backs up that have none. Zero counts are unused.
CREATE TABLE vm_retention (
    vm_id      BIGINT      NOT NULL,
    keep_last  INT         NOT NULL DEFAULT 0,
    daily      INT         NOT NULL DEFAULT 0,
    weekly     INT         NOT NULL DEFAULT 0,
    monthly    INT         NOT NULL DEFAULT 0,
    yearly     INT         NOT NULL DEFAULT 0,
    max_chain  INT         NOT NULL DEFAULT 0,
    updated_at DATETIME(6) NOT NULL,
    PRIMARY KEY (vm_id),
    CONSTRAINT vm_retention_vm FOREIGN KEY (vm_id) REFERENCES vms (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE schedule_retention (
    schedule_id VARCHAR(255) NOT NULL,
    keep_last   INT          NOT NULL DEFAULT 0,
    daily       INT          NOT NULL DEFAULT 0,
    weekly      INT          NOT NULL DEFAULT 0,
    monthly     INT          NOT NULL DEFAULT 0,
    yearly      INT          NOT NULL DEFAULT 0,
    max_chain   INT          NOT NULL DEFAULT 0,
    updated_at  DATETIME(6)  NOT NULL,
    PRIMARY KEY (schedule_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- What each point file takes on the hub's file system, as its verification measured it
-- (qemu-img's actual size); 0 for points committed before it was recorded.
ALTER TABLE point_disks ADD COLUMN allocated_bytes BIGINT NOT NULL DEFAULT 0 AFTER bytes_zeroed;

-- +goose Down
ALTER TABLE point_disks DROP COLUMN allocated_bytes;
DROP TABLE schedule_retention;
DROP TABLE vm_retention;
