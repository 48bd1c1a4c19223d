-- Money given back on paid orders. `idempotency_key` makes the admin's
-- request safe to repeat (also concurrently): the same key is the same refund.
-- `refunded_fen` on the order is what its refunds reserve (processing) or gave
-- back (success), so refunds never exceed what was paid.
CREATE TABLE refunds (
    id                BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    out_refund_no     VARCHAR(64) NOT NULL,
    idempotency_key   VARCHAR(128) NOT NULL,
    out_trade_no      VARCHAR(64) NOT NULL,
    openid            VARCHAR(64) NOT NULL,
    amount_fen        BIGINT NOT NULL,
    reason            VARCHAR(255) NOT NULL DEFAULT '',
    status            VARCHAR(16) NOT NULL DEFAULT 'processing',
    refund_id         VARCHAR(64) NULL,
    credits_taken     BIGINT NOT NULL DEFAULT 0,
    credits_shortfall BIGINT NOT NULL DEFAULT 0,
    failure           VARCHAR(255) NULL,
    succeeded_at      BIGINT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    UNIQUE KEY refunds_out_refund_no (out_refund_no),
    UNIQUE KEY refunds_idempotency_key (idempotency_key),
    KEY refunds_out_trade_no (out_trade_no),
    CONSTRAINT refunds_amount CHECK (amount_fen > 0),
    CONSTRAINT refunds_status CHECK (status IN ('processing', 'success', 'closed', 'abnormal', 'failed'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
ALTER TABLE orders ADD COLUMN refunded_fen BIGINT NOT NULL DEFAULT 0;
