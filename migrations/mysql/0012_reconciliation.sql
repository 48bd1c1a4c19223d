-- `wxhost reconcile` reads a day's paid orders and succeeded refunds.
CREATE INDEX orders_paid_at ON orders (paid_at);
CREATE INDEX refunds_succeeded_at ON refunds (succeeded_at);

-- Idempotency keys compare byte for byte, as on SQLite: `Job-1` and `job-1`
-- are two requests, never one answered for the other.
ALTER TABLE refunds MODIFY idempotency_key VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE quota_consumptions MODIFY idempotency_key VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE quota_adjustments MODIFY idempotency_key VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
