-- Every change of a user's quota, written in the same transaction as the
-- change of users.quota: a user's balance is always the sum of their rows
-- (`wxhost audit` checks it). `cause` says why; `reference` what it was for
-- (an out_trade_no, out_refund_no or consumption key).
CREATE TABLE quota_ledger (
    id            BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    openid        VARCHAR(64) NOT NULL,
    delta         BIGINT NOT NULL,
    balance_after BIGINT NOT NULL,
    cause         VARCHAR(16) NOT NULL,
    reference     VARCHAR(160) NULL,
    description   VARCHAR(255) NOT NULL DEFAULT '',
    created_at    BIGINT NOT NULL,
    KEY quota_ledger_openid (openid, id),
    CONSTRAINT quota_ledger_cause CHECK (cause IN ('opening', 'order', 'consume', 'release', 'refund', 'admin'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The consumptions business services asked for. (service, idempotency_key)
-- makes a retried consume the same consumption; `released_entry_id` is the
-- ledger row that gave its units back, at most one.
CREATE TABLE quota_consumptions (
    id                BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    service           VARCHAR(64) NOT NULL,
    idempotency_key   VARCHAR(128) NOT NULL,
    openid            VARCHAR(64) NOT NULL,
    units             BIGINT NOT NULL,
    description       VARCHAR(255) NOT NULL DEFAULT '',
    entry_id          BIGINT NULL,
    released_entry_id BIGINT NULL,
    release_reason    VARCHAR(255) NULL,
    created_at        BIGINT NOT NULL,
    UNIQUE KEY quota_consumptions_key (service, idempotency_key),
    UNIQUE KEY quota_consumptions_entry (entry_id),
    UNIQUE KEY quota_consumptions_release (released_entry_id),
    CONSTRAINT quota_consumptions_units CHECK (units > 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Balances from before the ledger, carried in as an opening row each.
INSERT INTO quota_ledger (openid, delta, balance_after, cause, description, created_at)
SELECT openid, quota, quota, 'opening', 'balance before the ledger', UNIX_TIMESTAMP()
FROM users WHERE quota <> 0;
