-- Applications and devices, stored as Drogue Cloud shapes them. One schema for SQLite and
-- PostgreSQL: only TEXT and BIGINT, JSON kept as TEXT (the server reads and writes whole sections).
CREATE TABLE applications (
    name TEXT NOT NULL PRIMARY KEY,
    uid TEXT NOT NULL,
    creation_timestamp TEXT NOT NULL,
    generation BIGINT NOT NULL,
    resource_version TEXT NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL
);

CREATE TABLE devices (
    application TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    creation_timestamp TEXT NOT NULL,
    generation BIGINT NOT NULL,
    resource_version TEXT NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (application, name)
);
