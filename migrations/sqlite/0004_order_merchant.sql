-- The merchant an order was placed with, checked against WeChat Pay's notify.
ALTER TABLE orders ADD COLUMN appid TEXT NOT NULL DEFAULT '';
ALTER TABLE orders ADD COLUMN mchid TEXT NOT NULL DEFAULT '';
