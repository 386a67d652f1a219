-- The user names of devices' `unique` user credentials (Drogue's aliases): a device can log in as
-- `username@app`, found here by an index lookup rather than by reading every device's spec.
CREATE TABLE device_users (
    application TEXT NOT NULL,
    username TEXT NOT NULL,
    device TEXT NOT NULL,
    PRIMARY KEY (application, username)
);

CREATE INDEX device_users_by_device ON device_users (application, device);
