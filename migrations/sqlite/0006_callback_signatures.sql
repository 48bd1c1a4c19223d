-- Plaintext-mode push signatures the app role accepted, each bound to the
-- SHA-256 of its body (the signature does not cover the body): the same
-- signature with another body is refused. A host table; pruned as rows expire.
CREATE TABLE callback_signatures (
    signature    TEXT PRIMARY KEY,
    body_sha256  TEXT NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX callback_signatures_expires_at ON callback_signatures (expires_at);
