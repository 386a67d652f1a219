-- Staged rollouts (ajour_types::rollout). `spec` is the rollout as the API took it (JSON);
-- `previous` the application's spec.firmware when it was created (JSON, NULL: none). The columns
-- after it are the rollout's progress, changed only by compare-and-swap of all of them, so that
-- every instance's controller may try each step and one wins. Times are milliseconds since the
-- Unix epoch.
CREATE TABLE rollouts (
    id BIGINT PRIMARY KEY,
    application TEXT NOT NULL,
    spec TEXT NOT NULL,
    previous TEXT,
    state TEXT NOT NULL,
    wave BIGINT NOT NULL,
    wave_since BIGINT NOT NULL,
    wave_succeeded_at BIGINT,
    forgiven BIGINT NOT NULL,
    reason TEXT,
    halted BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- At most one open (active or paused) rollout per application.
CREATE UNIQUE INDEX rollouts_one_open ON rollouts (application) WHERE state IN ('active', 'paused');
CREATE INDEX rollouts_by_application ON rollouts (application, id);

-- The devices of each rollout: the wave each is in and where it is (pending, updating, swapping,
-- succeeded, failed). `target` is the version it was started toward; `previous` its firmware
-- before the rollout when that is not the rollout's `previous` (JSON).
CREATE TABLE rollout_devices (
    rollout_id BIGINT NOT NULL,
    application TEXT NOT NULL,
    device TEXT NOT NULL,
    wave BIGINT NOT NULL,
    phase TEXT NOT NULL,
    target TEXT,
    previous TEXT,
    started_at BIGINT,
    progress_at BIGINT,
    swapped_at BIGINT,
    reason TEXT,
    PRIMARY KEY (rollout_id, device)
);
CREATE INDEX rollout_devices_by_device ON rollout_devices (application, device);
