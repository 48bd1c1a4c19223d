-- Keys the host generates once and every process shares (the session signing
-- key when SESSION_SECRET is not set).
CREATE TABLE host_keys (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
