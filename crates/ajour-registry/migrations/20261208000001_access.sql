-- Users' access tokens and applications' owners and members (see src/access.rs). Users exist
-- only through their tokens and memberships: there is no user table to keep in step.
CREATE TABLE access_tokens (
    prefix TEXT NOT NULL PRIMARY KEY,
    username TEXT NOT NULL,
    hash TEXT NOT NULL,
    description TEXT,
    created TEXT NOT NULL
);
CREATE INDEX access_tokens_user ON access_tokens (username);

CREATE TABLE app_access (
    application TEXT NOT NULL PRIMARY KEY,
    owner TEXT,
    transfer_to TEXT,
    revision TEXT NOT NULL
);

CREATE TABLE app_members (
    application TEXT NOT NULL,
    username TEXT NOT NULL,
    role TEXT NOT NULL,
    PRIMARY KEY (application, username)
);
CREATE INDEX app_members_user ON app_members (username);
