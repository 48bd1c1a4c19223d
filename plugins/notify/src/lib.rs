//! Web role plugin: `POST /api/v1/payment/notify`, WeChat Pay's payment result.
//!
//! The host verifies the notify (APIv3: SHA256-RSA signature, clock skew,
//! probes, AES-256-GCM resource; APIv2: the `sign`), so nothing forged goes
//! further; this plugin then passes the notify *as it came* to the app role's
//! internal API, which verifies it again (the web role's word never credits
//! money), marks a paid order paid and credits the user exactly once. Only
//! when the app role has taken it is WeChat Pay told "success"; otherwise it
//! is told to retry.

use serde_json::{Value, json};
use wxhost_sdk::callback_crypto::{self, CryptoError, PayNotifyHeaders};
use wxhost_sdk::internal_call;
use wxhost_sdk::{Request, Response, Result, Router, log};

fn routes() -> Router {
    Router::new().post("/api/v1/payment/notify", notify)
}

wxhost_sdk::plugin!(routes);

/// WeChat Pay answers are its own format (APIv3 JSON `code`/`message`, APIv2
/// XML), never the API's error contract: every outcome is an `Ok` answer.
fn notify(req: &Request) -> Result<Response> {
    Ok(if req.header("wechatpay-signature").is_some() { apiv3(req) } else { apiv2(req) })
}

fn apiv3(req: &Request) -> Response {
    let headers = PayNotifyHeaders {
        timestamp: req.header("wechatpay-timestamp").unwrap_or_default().to_string(),
        nonce: req.header("wechatpay-nonce").unwrap_or_default().to_string(),
        signature: req.header("wechatpay-signature").unwrap_or_default().to_string(),
        serial: req.header("wechatpay-serial").unwrap_or_default().to_string(),
    };
    if let Err(e) = callback_crypto::verify_pay_notify_v3(&headers, &req.body) {
        return crypto_failure(e, v3_fail);
    }
    let Ok(body) = std::str::from_utf8(&req.body) else { return v3_fail(400, "the body is not UTF-8") };
    let notified = json!({ "v3": {
        "timestamp": headers.timestamp, "nonce": headers.nonce,
        "signature": headers.signature, "serial": headers.serial, "body": body,
    }});
    match pass_on(&notified, &req.request_id) {
        Ok(()) => Response::empty(204),
        Err((status, message)) => v3_fail(status, &message),
    }
}

fn apiv2(req: &Request) -> Response {
    let Ok(xml) = std::str::from_utf8(&req.body) else { return v2_fail("the body is not UTF-8") };
    // A refund's notify is sealed (`req_info`), not signed.
    let checked = if is_refund_notify(xml) {
        callback_crypto::open_refund_notify_v2(xml)
    } else {
        callback_crypto::verify_pay_notify_v2(xml)
    };
    if let Err(e) = checked {
        return crypto_failure(e, |_, m| v2_fail(m));
    }
    match pass_on(&json!({ "v2": xml }), &req.request_id) {
        Ok(()) => v2_answer("SUCCESS", "OK"),
        Err((_, message)) => v2_fail(&message),
    }
}

/// An APIv2 refund notify carries `req_info` (and no `sign`); the host's
/// check of it decides, this only picks which check.
pub fn is_refund_notify(xml: &str) -> bool {
    xml.contains("<req_info>")
}

/// Hands a verified notify to the app role. `Err` carries the status and message for WeChat Pay.
fn pass_on(notified: &Value, request_id: &str) -> Result<(), (u16, String)> {
    let answer =
        internal_call::call("PUT", "/api/v1/internal/payment/order/update", notified.to_string().as_bytes());
    match answer {
        Ok(a) if (200..300).contains(&a.status) => Ok(()),
        Ok(a) if a.status < 500 => {
            let body = String::from_utf8_lossy(&a.body).into_owned();
            log::warn(&format!(
                "payment refused by the app role ({}): {body}, request {request_id}",
                a.status
            ));
            let code = serde_json::from_str::<Value>(&body).ok();
            let code =
                code.as_ref().and_then(|v| v["error"]["code"].as_str()).unwrap_or("rejected").to_string();
            Err((a.status, code))
        }
        Ok(a) => {
            log::error(&format!("the app role failed ({}) on a payment, request {request_id}", a.status));
            Err((500, "the payment could not be stored; retry later".into()))
        }
        Err(e) => {
            log::error(&format!("the app role is unreachable for a payment: {e:?}, request {request_id}"));
            Err((503, "the payment could not be stored; retry later".into()))
        }
    }
}

fn crypto_failure(e: CryptoError, answer: fn(u16, &str) -> Response) -> Response {
    match e {
        CryptoError::BadSignature => answer(401, "signature does not verify"),
        CryptoError::StaleTimestamp => answer(401, "timestamp too far from now"),
        CryptoError::SignatureProbe => answer(401, "signature probe refused"),
        CryptoError::UnknownKey(serial) => {
            log::warn(&format!("notify signed by an unknown key {serial}"));
            answer(401, "unknown Wechatpay-Serial")
        }
        CryptoError::Malformed(what) => answer(400, &what),
        CryptoError::WrongAppid => answer(400, "wrong appid"),
        CryptoError::NotConfigured(what) => {
            log::error(&format!("payment notify not configured: {what}"));
            answer(503, "payment notify is not configured")
        }
        CryptoError::Unavailable(what) => {
            log::error(&format!("payment notify could not be checked: {what}"));
            answer(503, "the notify could not be checked; retry later")
        }
        // Only pushes to the callback URL get these.
        CryptoError::PlaintextRefused | CryptoError::SignatureReused => answer(400, "request rejected"),
    }
}

fn v3_fail(status: u16, message: &str) -> Response {
    Response::json(status, &json!({ "code": "FAIL", "message": message }))
}

fn v2_answer(code: &str, message: &str) -> Response {
    let body = format!(
        "<xml><return_code><![CDATA[{code}]]></return_code><return_msg><![CDATA[{}]]></return_msg></xml>",
        message.replace("]]>", "]]]]><![CDATA[>")
    );
    Response::xml(200, body)
}

fn v2_fail(message: &str) -> Response {
    v2_answer("FAIL", message)
}
