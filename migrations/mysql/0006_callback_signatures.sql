-- Plaintext-mode push signatures the app role accepted, each bound to the
-- SHA-256 of its body (the signature does not cover the body): the same
-- signature with another body is refused. A host table; pruned as rows expire.
CREATE TABLE callback_signatures (
    signature    VARCHAR(64) NOT NULL PRIMARY KEY,
    body_sha256  CHAR(64) NOT NULL,
    expires_at   BIGINT NOT NULL,
    KEY callback_signatures_expires_at (expires_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
