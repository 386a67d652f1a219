-- The aliases devices list in `spec.alias` (Drogue's): a device signing in with a client
-- certificate is found by the certificate's subject DN among them, by an index lookup rather than
-- by reading every device's spec. An alias names one device of an application.
CREATE TABLE device_aliases (
    application TEXT NOT NULL,
    alias TEXT NOT NULL,
    device TEXT NOT NULL,
    PRIMARY KEY (application, alias)
);

CREATE INDEX device_aliases_by_device ON device_aliases (application, device);

-- Data to fill in from what is stored, once, after the migrations: devices written before this
-- migration list aliases that are not in the table above. Reading a JSON list is written
-- differently in SQLite and PostgreSQL, so the server does it (src/backfill.rs) and deletes the
-- row here in the same transaction; a start that stops half-way leaves the row for the next.
CREATE TABLE pending_backfills (
    name TEXT PRIMARY KEY
);

INSERT INTO pending_backfills (name) VALUES ('device_aliases');
