-- Firmware builds (ajour_types::build::Build), one row per build, kept beside the registry.
-- `device` is '' for the application's own build (not NULL: NULLs never collide in a unique index,
-- and the index below must see the application's builds as one target). `spec` is the firmware
-- section the build was triggered from (JSON). `state` is queued, running, succeeded or failed.
-- `renewed_at` is the runner's lease: an instance whose runner stopped renewing it (a crash, a
-- restart) lets any instance fail the build; NULL until it starts, when `created_at` counts
-- instead. `log` is the tail of the build's output, at most 64 KiB (ajour_types::build::append_log);
-- `log_start` the offset of its first byte in everything the build wrote. Times are milliseconds
-- since the Unix epoch.
CREATE TABLE builds (
    id BIGINT PRIMARY KEY,
    application TEXT NOT NULL,
    device TEXT NOT NULL,
    runner TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    completed_at BIGINT,
    renewed_at BIGINT,
    image TEXT,
    digest TEXT,
    version TEXT,
    message TEXT,
    reference TEXT,
    log TEXT NOT NULL,
    log_start BIGINT NOT NULL
);
-- At most one open (queued or running) build per target, decided by the database, so that two
-- instances triggering a build at once record one. Also what the sweep for stale builds reads
-- (its condition is the index's).
CREATE UNIQUE INDEX builds_one_open ON builds (application, device) WHERE state IN ('queued', 'running');
-- An application's builds (and a device's), newest first.
CREATE INDEX builds_by_application ON builds (application, id);
