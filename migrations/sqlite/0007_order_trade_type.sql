-- How an order is paid: jsapi (WeChat's browser), native (a QR code on a PC
-- page) or h5 (a phone browser sent to WeChat), and what the page pays with
-- (Native: the code_url it draws again when reloaded).
ALTER TABLE orders ADD COLUMN trade_type TEXT NOT NULL DEFAULT 'jsapi';
ALTER TABLE orders ADD COLUMN pay_url TEXT;
