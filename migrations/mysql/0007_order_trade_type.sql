-- How an order is paid: jsapi (WeChat's browser), native (a QR code on a PC
-- page) or h5 (a phone browser sent to WeChat), and what the page pays with
-- (Native: the code_url it draws again when reloaded).
ALTER TABLE orders ADD COLUMN trade_type VARCHAR(8) NOT NULL DEFAULT 'jsapi', ADD COLUMN pay_url VARCHAR(512) NULL;
