-- Money given back on paid orders. `idempotency_key` makes the admin's
-- request safe to repeat (also concurrently): the same key is the same refund.
-- `refunded_fen` on the order is what its refunds reserve (processing) or gave
-- back (success), so refunds never exceed what was paid.
CREATE TABLE refunds (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    out_refund_no     TEXT NOT NULL UNIQUE,
    idempotency_key   TEXT NOT NULL UNIQUE,
    out_trade_no      TEXT NOT NULL,
    openid            TEXT NOT NULL,
    amount_fen        INTEGER NOT NULL CHECK (amount_fen > 0),
    reason            TEXT NOT NULL DEFAULT '',
    status            TEXT NOT NULL DEFAULT 'processing'
                      CHECK (status IN ('processing', 'success', 'closed', 'abnormal', 'failed')),
    refund_id         TEXT,
    -- Quota taken back on success, and what could not be (already used).
    credits_taken     INTEGER NOT NULL DEFAULT 0,
    credits_shortfall INTEGER NOT NULL DEFAULT 0,
    failure           TEXT,
    succeeded_at      INTEGER,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX refunds_out_trade_no ON refunds (out_trade_no);
ALTER TABLE orders ADD COLUMN refunded_fen INTEGER NOT NULL DEFAULT 0;
