-- Keys the host generates once and every process shares (the session signing
-- key when SESSION_SECRET is not set).
CREATE TABLE host_keys (
    name        VARCHAR(64) NOT NULL PRIMARY KEY,
    value       VARCHAR(255) NOT NULL,
    created_at  BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
