//! Authentication of web role → app role calls to `/api/v1/internal/*`:
//! HMAC-SHA256 under INTERNAL_SECRET over method, path (with query),
//! timestamp and body. The app role checks it before any plugin runs.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

pub const TIMESTAMP_HEADER: &str = "x-wxhost-timestamp";
pub const SIGNATURE_HEADER: &str = "x-wxhost-signature";

/// The path prefix of the internal API.
pub const INTERNAL_PREFIX: &str = "/api/v1/internal/";

/// Accepted distance between the signer's and the checker's clocks.
pub const MAX_SKEW_SECS: u64 = 300;

/// Why an internal call was refused (the answer is 401 whatever the reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the internal call carries no signature")]
    Missing,
    #[error("the internal call's signature does not verify")]
    BadSignature,
    #[error("the internal call's timestamp is more than {MAX_SKEW_SECS} s away")]
    Stale,
}

/// Holds INTERNAL_SECRET; signs and checks internal calls.
pub struct InternalAuth {
    secret: SecretString,
}

impl InternalAuth {
    pub fn new(secret: SecretString) -> Self {
        InternalAuth { secret }
    }

    fn mac(&self, method: &str, path: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.expose_secret().as_bytes())
            .expect("HMAC takes any key length");
        for part in [method.as_bytes(), path.as_bytes(), timestamp.as_bytes()] {
            mac.update(part);
            mac.update(b"\n");
        }
        mac.update(body);
        mac
    }

    /// The signature header value for a call.
    pub fn sign(&self, method: &str, path: &str, timestamp: &str, body: &[u8]) -> String {
        hex::encode(self.mac(method, path, timestamp, body).finalize().into_bytes())
    }

    /// Checks a received call; `now` is Unix seconds.
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: u64,
    ) -> Result<(), AuthError> {
        let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
            return Err(AuthError::Missing);
        };
        let signature = hex::decode(signature).map_err(|_| AuthError::BadSignature)?;
        self.mac(method, path, timestamp, body)
            .verify_slice(&signature)
            .map_err(|_| AuthError::BadSignature)?;
        let ts: u64 = timestamp.parse().map_err(|_| AuthError::BadSignature)?;
        if ts.abs_diff(now) > MAX_SKEW_SECS {
            return Err(AuthError::Stale);
        }
        Ok(())
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(secret: &str) -> InternalAuth {
        InternalAuth::new(secret.to_string().into())
    }

    #[test]
    fn a_signed_call_verifies_and_any_change_breaks_it() {
        let a = auth("s3cret");
        let now = 1_800_000_000;
        let ts = now.to_string();
        let sig = a.sign("POST", "/api/v1/internal/user/create-or-update", &ts, b"{}");
        let check = |m: &str, p: &str, t: &str, s: &str, b: &[u8]| a.verify(m, p, Some(t), Some(s), b, now);
        assert_eq!(check("POST", "/api/v1/internal/user/create-or-update", &ts, &sig, b"{}"), Ok(()));
        assert_eq!(
            check("PUT", "/api/v1/internal/user/create-or-update", &ts, &sig, b"{}"),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            check("POST", "/api/v1/internal/binding/update", &ts, &sig, b"{}"),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            check("POST", "/api/v1/internal/user/create-or-update", "1800000001", &sig, b"{}"),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            check("POST", "/api/v1/internal/user/create-or-update", &ts, &sig, b"{ }"),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            check("POST", "/api/v1/internal/user/create-or-update", &ts, "zz", b"{}"),
            Err(AuthError::BadSignature)
        );
        let other = auth("other").sign("POST", "/api/v1/internal/user/create-or-update", &ts, b"{}");
        assert_eq!(
            check("POST", "/api/v1/internal/user/create-or-update", &ts, &other, b"{}"),
            Err(AuthError::BadSignature)
        );
        assert_eq!(a.verify("POST", "/x", None, Some(&sig), b"", now), Err(AuthError::Missing));
    }

    #[test]
    fn a_correctly_signed_but_old_call_is_stale() {
        let a = auth("s3cret");
        let old = (1_800_000_000 - MAX_SKEW_SECS - 1).to_string();
        let sig = a.sign("POST", "/p", &old, b"");
        assert_eq!(a.verify("POST", "/p", Some(&old), Some(&sig), b"", 1_800_000_000), Err(AuthError::Stale));
    }
}
