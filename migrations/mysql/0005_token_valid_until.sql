-- WeChat's own expiry of the shared access_token (expires_at is when to refresh,
-- ahead of it): while another process refreshes, callers keep using a token
-- that is still valid instead of waiting for that process.
ALTER TABLE token_cache ADD COLUMN valid_until BIGINT NOT NULL DEFAULT 0;
