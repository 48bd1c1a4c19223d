-- The operator's adjustments (POST /api/v1/admin/quota/adjust); the
-- idempotency key makes a repeated request the same adjustment.
CREATE TABLE quota_adjustments (
    id              BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    idempotency_key VARCHAR(128) NOT NULL,
    openid          VARCHAR(64) NOT NULL,
    delta           BIGINT NOT NULL,
    reason          VARCHAR(255) NOT NULL,
    entry_id        BIGINT NULL,
    created_at      BIGINT NOT NULL,
    UNIQUE KEY quota_adjustments_key (idempotency_key),
    UNIQUE KEY quota_adjustments_entry (entry_id),
    CONSTRAINT quota_adjustments_delta CHECK (delta <> 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Messages to users (the template message when an order is credited),
-- written in the transaction that credits, delivered at least once by the
-- payment plugin's scheduled job. (kind, reference): one message per event.
CREATE TABLE message_outbox (
    id              BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    kind            VARCHAR(32) NOT NULL,
    reference       VARCHAR(128) NOT NULL,
    openid          VARCHAR(64) NOT NULL,
    body            TEXT NOT NULL,
    status          VARCHAR(16) NOT NULL DEFAULT 'pending',
    attempts        INT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    -- A delivering process's claim, so two processes do not send it at once.
    claimed_until   BIGINT NOT NULL DEFAULT 0,
    last_error      VARCHAR(255) NULL,
    created_at      BIGINT NOT NULL,
    sent_at         BIGINT NULL,
    UNIQUE KEY message_outbox_event (kind, reference),
    KEY message_outbox_due (status, next_attempt_at),
    CONSTRAINT message_outbox_status CHECK (status IN ('pending', 'sent', 'blocked', 'failed'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Every delivery attempt and what WeChat answered.
CREATE TABLE message_attempts (
    id          BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    message_id  BIGINT NOT NULL,
    outcome     VARCHAR(16) NOT NULL,
    errcode     INT NULL,
    detail      VARCHAR(255) NOT NULL DEFAULT '',
    at          BIGINT NOT NULL,
    KEY message_attempts_message (message_id),
    CONSTRAINT message_attempts_outcome CHECK (outcome IN ('sent', 'blocked', 'retry', 'failed'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
