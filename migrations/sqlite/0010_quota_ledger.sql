-- Every change of a user's quota, written in the same transaction as the
-- change of users.quota: a user's balance is always the sum of their rows
-- (`wxhost audit` checks it). `cause` says why; `reference` what it was for
-- (an out_trade_no, out_refund_no or consumption key).
CREATE TABLE quota_ledger (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    openid        TEXT NOT NULL,
    delta         INTEGER NOT NULL,
    balance_after INTEGER NOT NULL,
    cause         TEXT NOT NULL
                  CHECK (cause IN ('opening', 'order', 'consume', 'release', 'refund', 'admin')),
    reference     TEXT,
    description   TEXT NOT NULL DEFAULT '',
    created_at    INTEGER NOT NULL
);
CREATE INDEX quota_ledger_openid ON quota_ledger (openid, id);

-- The consumptions business services asked for. (service, idempotency_key)
-- makes a retried consume the same consumption; `released_entry_id` is the
-- ledger row that gave its units back, at most one.
CREATE TABLE quota_consumptions (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    service           TEXT NOT NULL,
    idempotency_key   TEXT NOT NULL,
    openid            TEXT NOT NULL,
    units             INTEGER NOT NULL CHECK (units > 0),
    description       TEXT NOT NULL DEFAULT '',
    entry_id          INTEGER UNIQUE,
    released_entry_id INTEGER UNIQUE,
    release_reason    TEXT,
    created_at        INTEGER NOT NULL,
    UNIQUE (service, idempotency_key)
);

-- Balances from before the ledger, carried in as an opening row each.
INSERT INTO quota_ledger (openid, delta, balance_after, cause, description, created_at)
SELECT openid, quota, quota, 'opening', 'balance before the ledger', CAST(strftime('%s', 'now') AS INTEGER)
FROM users WHERE quota <> 0;
