-- `wxhost reconcile` reads a day's paid orders and succeeded refunds.
-- (SQLite already compares idempotency keys byte for byte.)
CREATE INDEX orders_paid_at ON orders (paid_at);
CREATE INDEX refunds_succeeded_at ON refunds (succeeded_at);
