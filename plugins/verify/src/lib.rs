//! Web role plugin answering WeChat's calls to the server URL.
//!
//! `GET /api/v1/auth/wechat/verify` is WeChat's server verification: the
//! signature is checked by the host (which holds WECHAT_TOKEN) and `echostr`
//! is echoed back as the raw body.

wit_bindgen::generate!({ world: "web-plugin", path: "../../wit" });

use exports::wxhost::plugin::handler::Guest;
use wxhost::plugin::callback_crypto::{self, CryptoError};
use wxhost::plugin::log::{self, Level};
use wxhost::plugin::types::{Request, Response};

struct Verify;

impl Guest for Verify {
    fn handle(req: Request) -> Response {
        let mut response = match req.method.as_str() {
            "GET" => server_verification(&req),
            _ => error(405, "method_not_allowed", "use GET for server verification"),
        };
        if cfg!(feature = "marked-build") {
            response.headers.push(("x-verify-build".into(), "marked".into()));
        }
        response
    }
}

export!(Verify);

/// WeChat's server verification: `signature`, `timestamp`, `nonce`, `echostr`.
fn server_verification(req: &Request) -> Response {
    let query = Query::parse(&req.query);
    let (Some(signature), Some(timestamp), Some(nonce), Some(echostr)) =
        (query.get("signature"), query.get("timestamp"), query.get("nonce"), query.get("echostr"))
    else {
        return error(400, "missing_parameter", "signature, timestamp, nonce and echostr are required");
    };
    match callback_crypto::verify_server_signature(signature, timestamp, nonce) {
        Ok(()) => Response {
            status: 200,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: echostr.as_bytes().to_vec(),
        },
        Err(e) => crypto_error(e),
    }
}

fn crypto_error(e: CryptoError) -> Response {
    match e {
        CryptoError::BadSignature => error(401, "bad_signature", "signature does not verify"),
        CryptoError::StaleTimestamp => {
            error(401, "stale_timestamp", "timestamp is outside the accepted window")
        }
        CryptoError::Malformed(what) => error(400, "malformed", &what),
        CryptoError::NotConfigured(what) => {
            log::log(Level::Error, &format!("callback crypto not configured: {what}"));
            error(503, "not_configured", "server verification is not configured")
        }
        other => {
            log::log(Level::Warn, &format!("unexpected crypto error: {other:?}"));
            error(400, "rejected", "request rejected")
        }
    }
}

fn error(status: u16, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    Response {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

/// Decoded query parameters; the first occurrence of a name wins.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        Query(form_urlencoded::parse(raw.as_bytes()).into_owned().collect())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
    }
}
