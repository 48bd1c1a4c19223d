//! `wxhost:plugin/session`: login sessions for the frontend. A token is
//! `v1.<session id>.<expiry>.<HMAC>`: signed (a forged token is refused
//! without a database read), expiring, and revocable (the `sessions` row).
//! An openid alone is never a credential.
//!
//! The signing key is SESSION_SECRET, or else a random key generated once and
//! kept in the database (`host_keys`), so every app process agrees on it.

use futures::future::BoxFuture;

use super::{CapabilitySpec, Context, PluginState, ServiceInputs};
use crate::role::Role;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use wasmtime::component::{HasData, Linker};

use crate::bindings::wxhost::plugin::session::{self as wit, Issued, SessionError, SessionInfo};
use crate::database::{Database, Pool, on_pool};

pub struct Sessions {
    key: SecretString,
    ttl: Duration,
    db: Database,
    admin_token: Option<SecretString>,
}

impl Sessions {
    /// Uses `secret`, or the key in the database (creating it the first time).
    pub async fn new(
        db: Database,
        secret: Option<SecretString>,
        ttl: Duration,
        admin_token: Option<SecretString>,
    ) -> anyhow::Result<Sessions> {
        let key = match secret {
            Some(s) => s,
            None => shared_key(&db).await?,
        };
        Ok(Sessions { key, ttl, db, admin_token })
    }

    fn sign(&self, payload: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.key.expose_secret().as_bytes()).expect("any key length");
        mac.update(payload.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    pub async fn issue(&self, openid: &str) -> Result<Issued, SessionError> {
        let session_id = format!("{:032x}", rand::random::<u128>());
        let now = unix_now();
        let expires_at = now + self.ttl.as_secs() as i64;
        let sql = "INSERT INTO sessions (session_id, openid, expires_at, revoked_at, created_at) VALUES (?, ?, ?, NULL, ?)";
        let _turn = self.db.writer_turn().await.map_err(writer_busy)?;
        on_pool!(&self.db.pool, |p| sqlx::query(sql)
            .bind(&session_id)
            .bind(openid)
            .bind(expires_at)
            .bind(now)
            .execute(p)
            .await
            .map(|_| ()))
        .map_err(db_error)?;
        let payload = format!("v1.{session_id}.{expires_at}");
        Ok(Issued { token: format!("{payload}.{}", self.sign(&payload)), expires_at })
    }

    /// Checks the signature and expiry, then that the session is not revoked.
    pub async fn verify(&self, token: &str) -> Result<SessionInfo, SessionError> {
        let (session_id, expires_at) = self.check_signature(token)?;
        if expires_at <= unix_now() {
            return Err(SessionError::Expired);
        }
        let sql = "SELECT openid, revoked_at FROM sessions WHERE session_id = ?";
        let row: Option<(String, Option<i64>)> =
            on_pool!(&self.db.pool, |p| sqlx::query_as(sql).bind(&session_id).fetch_optional(p).await)
                .map_err(db_error)?;
        match row {
            None => Err(SessionError::Invalid),
            Some((_, Some(_))) => Err(SessionError::Revoked),
            Some((openid, None)) => Ok(SessionInfo { openid, session_id, expires_at }),
        }
    }

    pub async fn revoke(&self, token: &str) -> Result<(), SessionError> {
        let (session_id, _) = self.check_signature(token)?;
        let sql = "UPDATE sessions SET revoked_at = ? WHERE session_id = ? AND revoked_at IS NULL";
        let _turn = self.db.writer_turn().await.map_err(writer_busy)?;
        on_pool!(&self.db.pool, |p| sqlx::query(sql)
            .bind(unix_now())
            .bind(&session_id)
            .execute(p)
            .await
            .map(|_| ()))
        .map_err(db_error)
    }

    pub fn verify_admin(&self, credential: &str) -> bool {
        match &self.admin_token {
            Some(admin) => {
                let admin = admin.expose_secret().as_bytes();
                !credential.is_empty() && credential.as_bytes().ct_eq(admin).into()
            }
            None => false,
        }
    }

    fn check_signature(&self, token: &str) -> Result<(String, i64), SessionError> {
        let mut parts = token.split('.');
        let (Some("v1"), Some(session_id), Some(expires_at), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionError::Invalid);
        };
        let expected = self.sign(&format!("v1.{session_id}.{expires_at}"));
        if !bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
            return Err(SessionError::Invalid);
        }
        let expires_at = expires_at.parse().map_err(|_| SessionError::Invalid)?;
        Ok((session_id.to_string(), expires_at))
    }
}

/// The database-kept signing key, created by whichever process comes first.
async fn shared_key(db: &Database) -> anyhow::Result<SecretString> {
    let candidate = hex::encode(rand::random::<[u8; 32]>());
    let insert = match db.pool {
        Pool::Sqlite(_) => {
            "INSERT OR IGNORE INTO host_keys (name, value, created_at) VALUES ('session', ?, ?)"
        }
        Pool::Mysql(_) => "INSERT IGNORE INTO host_keys (name, value, created_at) VALUES ('session', ?, ?)",
    };
    on_pool!(&db.pool, |p| sqlx::query(insert)
        .bind(&candidate)
        .bind(unix_now())
        .execute(p)
        .await
        .map(|_| ()))?;
    let key: String =
        on_pool!(&db.pool, |p| sqlx::query_scalar("SELECT value FROM host_keys WHERE name = 'session'")
            .fetch_one(p)
            .await)?;
    Ok(SecretString::from(key))
}

fn db_error(e: sqlx::Error) -> SessionError {
    tracing::error!("sessions: {}", crate::database::redact_db_error(&e));
    SessionError::Unavailable("the session store is unavailable".into())
}

fn writer_busy(e: crate::database::WriterBusy) -> SessionError {
    SessionError::Unavailable(e.to_string())
}

pub fn unix_now() -> i64 {
    crate::internal_auth::unix_now() as i64
}

/// The app role's: sessions live in its database.
pub const SPEC: CapabilitySpec = CapabilitySpec { name: "session", roles: &[Role::App], open, link };

fn open<'a>(inputs: &'a ServiceInputs<'a>) -> BoxFuture<'a, anyhow::Result<Option<Context>>> {
    Box::pin(async move {
        let Some(db) = inputs.database else { return Ok(None) };
        let s = inputs.settings;
        let sessions =
            Sessions::new(db.clone(), s.session_secret.clone(), inputs.session_ttl, s.admin_token.clone())
                .await?;
        Ok(Some(Box::new(sessions) as Context))
    })
}

fn link(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    add_to_linker(linker, |s| SessionView { ctx: s.services.get() })
}

pub struct SessionView<'a> {
    pub ctx: Option<&'a Sessions>,
}

struct HasSession;

impl HasData for HasSession {
    type Data<'a> = SessionView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> SessionView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSession>(linker, get)
}

impl SessionView<'_> {
    fn ctx(&self) -> Result<&Sessions, SessionError> {
        self.ctx.ok_or_else(|| SessionError::Unavailable("sessions are not available in this role".into()))
    }
}

/// A capability call's error: a [`SessionError`] for the plugin, or a trap.
pub type SessionFailure = crate::bindings::CapabilityError<SessionError>;

impl wit::Host for SessionView<'_> {
    fn convert_session_error(&mut self, err: SessionFailure) -> wasmtime::Result<SessionError> {
        err.downcast()
    }

    async fn issue(&mut self, openid: String) -> Result<Issued, SessionFailure> {
        if openid.is_empty() || openid.len() > 64 {
            return Err(SessionError::Invalid.into());
        }
        Ok(self.ctx()?.issue(&openid).await?)
    }

    async fn verify(&mut self, token: String) -> Result<SessionInfo, SessionFailure> {
        Ok(self.ctx()?.verify(&token).await?)
    }

    async fn revoke(&mut self, token: String) -> Result<(), SessionFailure> {
        Ok(self.ctx()?.revoke(&token).await?)
    }

    async fn verify_admin(&mut self, credential: String) -> wasmtime::Result<bool> {
        Ok(self.ctx.is_some_and(|s| s.verify_admin(&credential)))
    }
}
