-- +goose Up
-- Identifiers compare case-sensitively (utf8mb4_bin): Temporal workflow IDs and VMware
-- morefs are case-sensitive. Times are UTC, written by the application.

CREATE TABLE sites (
    id         VARCHAR(128) NOT NULL,
    created_at DATETIME(6)  NOT NULL,
    PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE hubs (
    id         VARCHAR(128) NOT NULL,
    created_at DATETIME(6)  NOT NULL,
    PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE vms (
    id            BIGINT       NOT NULL AUTO_INCREMENT,
    instance_uuid VARCHAR(64)  NOT NULL,
    moref         VARCHAR(64)  NOT NULL,
    name          VARCHAR(255) NOT NULL,
    created_at    DATETIME(6)  NOT NULL,
    updated_at    DATETIME(6)  NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY vms_vcenter_moref (instance_uuid, moref)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE disks (
    vm_id          BIGINT        NOT NULL,
    disk_key       INT           NOT NULL,
    label          VARCHAR(255)  NOT NULL DEFAULT '',
    capacity_bytes BIGINT        NOT NULL,
    backing_file   VARCHAR(1024) NOT NULL DEFAULT '',
    updated_at     DATETIME(6)   NOT NULL,
    PRIMARY KEY (vm_id, disk_key),
    CONSTRAINT disks_vm FOREIGN KEY (vm_id) REFERENCES vms (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE restore_points (
    id            VARCHAR(64)  NOT NULL,
    vm_id         BIGINT       NOT NULL,
    workflow_id   VARCHAR(255) NOT NULL,
    run_id        VARCHAR(64)  NOT NULL,
    site_id       VARCHAR(128) NOT NULL,
    hub_id        VARCHAR(128) NOT NULL,
    mode          VARCHAR(16)  NOT NULL,
    parent_id     VARCHAR(64)  NULL,
    status        ENUM('running', 'complete', 'failed') NOT NULL,
    error         TEXT         NULL,
    started_at    DATETIME(6)  NOT NULL,
    finished_at   DATETIME(6)  NULL,
    bytes_read    BIGINT       NOT NULL DEFAULT 0,
    bytes_written BIGINT       NOT NULL DEFAULT 0,
    PRIMARY KEY (id),
    UNIQUE KEY restore_points_run (workflow_id, run_id),
    KEY restore_points_vm_status (vm_id, status, started_at),
    CONSTRAINT restore_points_vm FOREIGN KEY (vm_id) REFERENCES vms (id),
    CONSTRAINT restore_points_site FOREIGN KEY (site_id) REFERENCES sites (id),
    CONSTRAINT restore_points_hub FOREIGN KEY (hub_id) REFERENCES hubs (id),
    CONSTRAINT restore_points_parent FOREIGN KEY (parent_id) REFERENCES restore_points (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE point_disks (
    point_id       VARCHAR(64)   NOT NULL,
    disk_key       INT           NOT NULL,
    target_path    VARCHAR(1024) NOT NULL,
    parent_path    VARCHAR(1024) NOT NULL DEFAULT '',
    mode           VARCHAR(16)   NOT NULL,
    change_id      VARCHAR(255)  NOT NULL DEFAULT '',
    capacity_bytes BIGINT        NOT NULL,
    bytes_read     BIGINT        NOT NULL DEFAULT 0,
    bytes_written  BIGINT        NOT NULL DEFAULT 0,
    bytes_zeroed   BIGINT        NOT NULL DEFAULT 0,
    duration_ns    BIGINT        NOT NULL DEFAULT 0,
    digest         VARCHAR(128)  NOT NULL DEFAULT '',
    PRIMARY KEY (point_id, disk_key),
    CONSTRAINT point_disks_point FOREIGN KEY (point_id) REFERENCES restore_points (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE port_leases (
    hub_id      VARCHAR(128) NOT NULL,
    port        INT          NOT NULL,
    workflow_id VARCHAR(255) NOT NULL,
    disk_key    INT          NOT NULL,
    leased_at   DATETIME(6)  NOT NULL,
    PRIMARY KEY (hub_id, port),
    UNIQUE KEY port_leases_owner (hub_id, workflow_id, disk_key),
    CONSTRAINT port_leases_hub FOREIGN KEY (hub_id) REFERENCES hubs (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE exports (
    hub_id      VARCHAR(128)  NOT NULL,
    port        INT           NOT NULL,
    pid         INT           NOT NULL,
    path        VARCHAR(1024) NOT NULL,
    workflow_id VARCHAR(255)  NOT NULL,
    disk_key    INT           NOT NULL,
    started_at  DATETIME(6)   NOT NULL,
    PRIMARY KEY (hub_id, port),
    CONSTRAINT exports_hub FOREIGN KEY (hub_id) REFERENCES hubs (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- +goose Down
DROP TABLE exports;
DROP TABLE port_leases;
DROP TABLE point_disks;
DROP TABLE restore_points;
DROP TABLE disks;
DROP TABLE vms;
DROP TABLE hubs;
DROP TABLE sites;
