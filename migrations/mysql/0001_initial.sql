-- Times are Unix seconds (BIGINT) in both dialects. utf8mb4 keeps emoji nicknames.
CREATE TABLE users (
    id          BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    openid      VARCHAR(64) NOT NULL,
    unionid     VARCHAR(64) NULL,
    nickname    VARCHAR(255) NULL,
    avatar_url  VARCHAR(1024) NULL,
    subscribed  BIGINT NOT NULL DEFAULT 0,
    quota       BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    UNIQUE KEY users_openid (openid)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE bindings (
    scene       VARCHAR(64) NOT NULL PRIMARY KEY,
    openid      VARCHAR(64) NULL,
    status      VARCHAR(16) NOT NULL DEFAULT 'pending',
    ticket      VARCHAR(255) NULL,
    expires_at  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    KEY bindings_expires_at (expires_at),
    CONSTRAINT bindings_status CHECK (status IN ('pending', 'scanned', 'consumed', 'expired'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE orders (
    id              BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    out_trade_no    VARCHAR(64) NOT NULL,
    openid          VARCHAR(64) NOT NULL,
    product_id      VARCHAR(64) NOT NULL,
    description     VARCHAR(255) NOT NULL,
    amount_fen      BIGINT NOT NULL,
    credits         BIGINT NOT NULL,
    status          VARCHAR(16) NOT NULL DEFAULT 'created',
    prepay_id       VARCHAR(128) NULL,
    transaction_id  VARCHAR(64) NULL,
    time_expire     BIGINT NOT NULL,
    paid_at         BIGINT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    UNIQUE KEY orders_out_trade_no (out_trade_no),
    UNIQUE KEY orders_transaction_id (transaction_id),
    KEY orders_openid (openid, created_at),
    CONSTRAINT orders_amount CHECK (amount_fen > 0),
    CONSTRAINT orders_credits CHECK (credits >= 0),
    CONSTRAINT orders_status CHECK (status IN ('created', 'pending', 'paid', 'failed', 'closed'))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE processed_events (
    event_key   VARCHAR(191) NOT NULL PRIMARY KEY,
    kind        VARCHAR(32) NOT NULL,
    created_at  BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE token_cache (
    name            VARCHAR(64) NOT NULL PRIMARY KEY,
    token           VARCHAR(1024) NULL,
    expires_at      BIGINT NOT NULL DEFAULT 0,
    lease_owner     VARCHAR(64) NULL,
    lease_until     BIGINT NOT NULL DEFAULT 0,
    updated_at      BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE sessions (
    session_id  VARCHAR(64) NOT NULL PRIMARY KEY,
    openid      VARCHAR(64) NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT NULL,
    created_at  BIGINT NOT NULL,
    KEY sessions_openid (openid)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
