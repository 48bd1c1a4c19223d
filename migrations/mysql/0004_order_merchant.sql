-- The merchant an order was placed with, checked against WeChat Pay's notify.
ALTER TABLE orders ADD COLUMN appid VARCHAR(32) NOT NULL DEFAULT '', ADD COLUMN mchid VARCHAR(32) NOT NULL DEFAULT '';
