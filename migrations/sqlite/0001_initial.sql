-- Times are Unix seconds (INTEGER) in both dialects.
CREATE TABLE users (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    openid      TEXT NOT NULL UNIQUE,
    unionid     TEXT,
    nickname    TEXT,
    avatar_url  TEXT,
    subscribed  INTEGER NOT NULL DEFAULT 0,
    quota       INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE bindings (
    scene       TEXT PRIMARY KEY,
    openid      TEXT,
    status      TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'scanned', 'consumed', 'expired')),
    ticket      TEXT,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX bindings_expires_at ON bindings (expires_at);

CREATE TABLE orders (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    out_trade_no    TEXT NOT NULL UNIQUE,
    openid          TEXT NOT NULL,
    product_id      TEXT NOT NULL,
    description     TEXT NOT NULL,
    amount_fen      INTEGER NOT NULL CHECK (amount_fen > 0),
    credits         INTEGER NOT NULL CHECK (credits >= 0),
    status          TEXT NOT NULL DEFAULT 'created' CHECK (status IN ('created', 'pending', 'paid', 'failed', 'closed')),
    prepay_id       TEXT,
    transaction_id  TEXT UNIQUE,
    time_expire     INTEGER NOT NULL,
    paid_at         INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX orders_openid ON orders (openid, created_at);

-- Pushes and notifies already applied (WeChat retries them), shared by every process.
CREATE TABLE processed_events (
    event_key   TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

-- The access_token shared by every app process, and the lease of the one refreshing it.
CREATE TABLE token_cache (
    name            TEXT PRIMARY KEY,
    token           TEXT,
    expires_at      INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until     INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL
);

CREATE TABLE sessions (
    session_id  TEXT PRIMARY KEY,
    openid      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    created_at  INTEGER NOT NULL
);
CREATE INDEX sessions_openid ON sessions (openid);
