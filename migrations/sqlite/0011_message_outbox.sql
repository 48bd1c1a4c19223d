-- The operator's adjustments (POST /api/v1/admin/quota/adjust); the
-- idempotency key makes a repeated request the same adjustment.
CREATE TABLE quota_adjustments (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL UNIQUE,
    openid          TEXT NOT NULL,
    delta           INTEGER NOT NULL CHECK (delta <> 0),
    reason          TEXT NOT NULL,
    entry_id        INTEGER UNIQUE,
    created_at      INTEGER NOT NULL
);

-- Messages to users (the template message when an order is credited),
-- written in the transaction that credits, delivered at least once by the
-- payment plugin's scheduled job. (kind, reference): one message per event.
CREATE TABLE message_outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL,
    reference       TEXT NOT NULL,
    openid          TEXT NOT NULL,
    body            TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'sent', 'blocked', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    -- A delivering process's claim, so two processes do not send it at once.
    claimed_until   INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    sent_at         INTEGER,
    UNIQUE (kind, reference)
);
CREATE INDEX message_outbox_due ON message_outbox (status, next_attempt_at);

-- Every delivery attempt and what WeChat answered.
CREATE TABLE message_attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  INTEGER NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('sent', 'blocked', 'retry', 'failed')),
    errcode     INTEGER,
    detail      TEXT NOT NULL DEFAULT '',
    at          INTEGER NOT NULL
);
CREATE INDEX message_attempts_message ON message_attempts (message_id);
