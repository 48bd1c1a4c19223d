-- WeChat Pay's platform certificates as downloaded (merchants still on
-- certificates), shared by every app process. Kept sealed as WeChat Pay sent
-- them (AES-256-GCM under the APIv3 key): a row written by anything that does
-- not hold that key does not open, so it is never trusted.
CREATE TABLE platform_certificates (
    serial_no       VARCHAR(64) NOT NULL PRIMARY KEY,
    effective_time  VARCHAR(40) NOT NULL,
    expire_time     VARCHAR(40) NOT NULL,
    sealed          TEXT NOT NULL,
    first_seen_at   BIGINT NOT NULL,
    -- The last download that listed it: the newest across rows is when the
    -- processes last asked WeChat Pay.
    fetched_at      BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
