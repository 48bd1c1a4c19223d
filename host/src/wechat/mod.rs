//! WeChat's and WeChat Pay's wire protocols: the callback signatures and
//! safe-mode message encryption, their XML, and WeChat Pay's APIv2/APIv3
//! signing, encryption and verification.
//!
//! Pure functions and key holders with their own error types: nothing here
//! knows the generated bindings, a plugin or the host's state. The
//! capabilities in `caps/` adapt it to WIT; the simulator plays WeChat's side
//! with the same code.

pub mod callback;
pub mod pay;
pub mod xml;

pub use callback::{CallbackKeys, sorted_sha1};

/// Why something WeChat or WeChat Pay sent (or an answer) was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the signature is missing or wrong")]
    BadSignature,
    #[error("the timestamp is outside the accepted window")]
    StaleTimestamp,
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("the message names another AppID")]
    WrongAppid,
    /// WeChat Pay probes signature checking with deliberately wrong signatures.
    #[error("a WECHATPAY/SIGNTEST/ signature probe")]
    SignatureProbe,
    #[error("no platform key has the id `{0}`")]
    UnknownKey(String),
    /// A setting this check needs is missing (named, never its value).
    #[error("not configured: {0}")]
    NotConfigured(&'static str),
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The known-answer vectors of WeChat's SDKs and the test keys, for the
/// protocol's own tests.
#[cfg(test)]
pub(crate) mod test_support {
    pub fn vectors() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wechat_vectors.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    pub fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
    }
}
