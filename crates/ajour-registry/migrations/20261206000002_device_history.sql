-- Each device's update history: what happened, told once by the status write that saw it change
-- (ajour_types::events_between), in the same transaction. `seq` orders a device's entries; `at` is
-- when it was recorded (milliseconds since the Unix epoch); `event` the entry as JSON. Bounded per
-- device by the server's retention (count and age), applied as entries are added.
CREATE TABLE device_history (
    application TEXT NOT NULL,
    device TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (application, device, seq)
);
