//! One error type for handlers: every capability's error converts into it
//! with `?`, and it renders the JSON error contract of the whole API,
//! `{"error": {"code": "…", "message": "…"}}`. Details that could describe
//! the deployment (database errors, WeChat's messages) go to the log, never
//! to the client.

use crate::bindings::wxhost::plugin::callback_crypto::CryptoError;
use crate::bindings::wxhost::plugin::db::Error as DbError;
use crate::bindings::wxhost::plugin::internal_call::CallError;
use crate::bindings::wxhost::plugin::session::SessionError;
use crate::bindings::wxhost::plugin::wechat_api::ApiError;
use crate::bindings::wxhost::plugin::wechat_pay::PayError;
use crate::{Response, log};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An answer that is not a success: status, machine-readable code, message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Error {
    pub fn new(status: u16, code: &str, message: &str) -> Error {
        Error { status, code: code.into(), message: message.into() }
    }

    pub fn bad_request(code: &str, message: &str) -> Error {
        Error::new(400, code, message)
    }

    pub fn unauthorized(message: &str) -> Error {
        Error::new(401, "unauthorized", message)
    }

    pub fn forbidden(message: &str) -> Error {
        Error::new(403, "forbidden", message)
    }

    pub fn not_found(message: &str) -> Error {
        Error::new(404, "not_found", message)
    }

    pub fn conflict(code: &str, message: &str) -> Error {
        Error::new(409, code, message)
    }

    /// A fault of this server: logged with `detail`, answered 500 without it.
    pub fn internal(detail: &str) -> Error {
        log::error(detail);
        Error::new(500, "internal_error", "the request could not be completed")
    }

    pub fn to_response(&self) -> Response {
        Response::json(
            self.status,
            &serde_json::json!({ "error": { "code": self.code, "message": self.message } }),
        )
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for Response {
    fn from(e: Error) -> Response {
        e.to_response()
    }
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Error {
        log::error(&format!("database: {e:?}"));
        match e {
            DbError::Unavailable(_) => {
                Error::new(503, "database_unavailable", "the database is unavailable; try again")
            }
            _ => Error::new(500, "internal_error", "the database could not complete the request"),
        }
    }
}

impl From<SessionError> for Error {
    fn from(e: SessionError) -> Error {
        match e {
            SessionError::Invalid => {
                Error::new(401, "invalid_session", "the session token is not valid; sign in again")
            }
            SessionError::Expired => {
                Error::new(401, "session_expired", "the session has expired; sign in again")
            }
            SessionError::Revoked => Error::new(401, "session_revoked", "you signed out; sign in again"),
            SessionError::Unavailable(why) => {
                log::warn(&format!("sessions unavailable: {why}"));
                Error::new(503, "unavailable", "sessions are unavailable; try again")
            }
        }
    }
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Error {
        match e {
            ApiError::Timeout => {
                Error::new(504, "wechat_timeout", "WeChat did not answer in time; try again")
            }
            ApiError::Wechat(w) => {
                log::warn(&format!("WeChat error {}: {}", w.errcode, w.errmsg));
                Error::new(502, "wechat_error", "WeChat refused the request; try again later")
            }
            ApiError::NotAllowed(why) | ApiError::NotConfigured(why) => {
                log::error(&why);
                Error::new(500, "internal_error", "the server is not configured for this")
            }
            ApiError::Unavailable(why) => {
                log::warn(&format!("WeChat unavailable: {why}"));
                Error::new(502, "wechat_unavailable", "WeChat could not be reached; try again")
            }
        }
    }
}

impl From<PayError> for Error {
    fn from(e: PayError) -> Error {
        match e {
            PayError::Refused((code, message)) => {
                // WeChat Pay's message can describe the merchant's set-up: logged, not shown.
                log::warn(&format!("WeChat Pay refused: {code}: {message}"));
                Error::new(502, "payment_refused", "WeChat Pay refused the order; try again later")
            }
            PayError::Invalid(why) => Error::internal(&format!("invalid WeChat Pay request: {why}")),
            PayError::BadSignature => {
                Error::new(502, "payment_unavailable", "WeChat Pay's answer could not be trusted; try again")
            }
            PayError::Timeout => {
                Error::new(504, "payment_timeout", "WeChat Pay did not answer in time; try again")
            }
            PayError::Unavailable(why) => {
                log::warn(&format!("WeChat Pay unavailable: {why}"));
                Error::new(502, "payment_unavailable", "WeChat Pay is not reachable; try again")
            }
            PayError::NotConfigured(why) => {
                log::error(&format!("WeChat Pay is not configured: {why}"));
                Error::new(503, "payment_not_configured", "payments are not available")
            }
        }
    }
}

impl From<CallError> for Error {
    fn from(e: CallError) -> Error {
        let why = match e {
            CallError::Timeout => "timed out".to_string(),
            CallError::Unavailable(m) | CallError::NotAllowed(m) | CallError::NotConfigured(m) => m,
        };
        log::error(&format!("internal call: {why}"));
        Error::new(503, "app_unavailable", "the app role could not be reached; retry later")
    }
}

impl From<CryptoError> for Error {
    fn from(e: CryptoError) -> Error {
        match e {
            CryptoError::BadSignature => Error::new(401, "bad_signature", "signature does not verify"),
            CryptoError::StaleTimestamp => {
                Error::new(401, "stale_timestamp", "timestamp is outside the accepted window")
            }
            CryptoError::WrongAppid => {
                Error::new(401, "wrong_appid", "the message is not for this official account")
            }
            CryptoError::SignatureProbe => Error::new(401, "signature_probe", "signature probe refused"),
            CryptoError::UnknownKey(serial) => {
                log::warn(&format!("signed by an unknown key {serial}"));
                Error::new(401, "unknown_key", "signed by a key this server does not know")
            }
            CryptoError::Malformed(what) => Error::new(400, "malformed", &what),
            CryptoError::NotConfigured(what) => {
                log::error(&format!("callback crypto not configured: {what}"));
                Error::new(503, "not_configured", "the WeChat callback is not configured")
            }
            CryptoError::PlaintextRefused => Error::new(
                403,
                "plaintext_refused",
                "this account receives encrypted pushes (encrypt_type=aes); a plaintext push is refused",
            ),
            CryptoError::SignatureReused => {
                Error::new(403, "signature_reused", "this signature was already used with another body")
            }
            CryptoError::Unavailable(what) => {
                log::error(&format!("a signature could not be checked: {what}"));
                Error::new(503, "unavailable", "the request could not be checked; retry later")
            }
        }
    }
}
