-- +goose Up
-- The line of jobs waiting for export ports on a hub, first come first served: free ports go
-- to the oldest waiter that fits before anyone behind it, so a job needing several ports is
-- not passed over forever by jobs needing one. A waiter that stopped asking (seen_at old) is
-- skipped until it asks again; its workflow's release removes its row.
CREATE TABLE port_waits (
    hub_id      VARCHAR(128) NOT NULL,
    workflow_id VARCHAR(255) NOT NULL,
    needed      INT          NOT NULL,
    since       DATETIME(6)  NOT NULL,
    seen_at     DATETIME(6)  NOT NULL,
    PRIMARY KEY (hub_id, workflow_id),
    KEY port_waits_line (hub_id, since),
    CONSTRAINT port_waits_hub FOREIGN KEY (hub_id) REFERENCES hubs (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- +goose Down
DROP TABLE port_waits;
