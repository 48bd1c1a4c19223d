-- WeChat Pay's platform certificates as downloaded (merchants still on
-- certificates), shared by every app process. Kept sealed as WeChat Pay sent
-- them (AES-256-GCM under the APIv3 key): a row written by anything that does
-- not hold that key does not open, so it is never trusted.
CREATE TABLE platform_certificates (
    serial_no       TEXT PRIMARY KEY,
    effective_time  TEXT NOT NULL,
    expire_time     TEXT NOT NULL,
    sealed          TEXT NOT NULL,
    first_seen_at   INTEGER NOT NULL,
    -- The last download that listed it: the newest across rows is when the
    -- processes last asked WeChat Pay.
    fetched_at      INTEGER NOT NULL
);
