//! Web role plugin answering WeChat's calls to the server URL
//! (`/api/v1/auth/wechat/verify`):
//!
//! - `GET`: server verification. The host (which holds WECHAT_TOKEN) checks
//!   the signature; `echostr` is echoed back as the raw body.
//! - `POST`: message and event push, in plaintext, compatible or safe (AES)
//!   mode. Events that change state go to the app role's internal API through
//!   the host; only once the app role has taken them is the push
//!   acknowledged, so WeChat retries whatever was not. Passive replies (a
//!   welcome on subscribe, keyword replies) come from this plugin's config.

mod xml;

wit_bindgen::generate!({ world: "web-plugin", path: "../../wit" });

use exports::wxhost::plugin::handler::Guest;
use serde_json::json;
use wxhost::plugin::callback_crypto::{self, CryptoError, PushProof};
use wxhost::plugin::config;
use wxhost::plugin::internal_call::{self, CallError};
use wxhost::plugin::log::{self, Level};
use wxhost::plugin::types::{Request, Response};

struct Verify;

impl Guest for Verify {
    fn handle(req: Request) -> Response {
        let mut response = match req.method.as_str() {
            "GET" => server_verification(&req),
            "POST" => push(&req).unwrap_or_else(|r| r),
            _ => error(405, "method_not_allowed", "use GET or POST"),
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

/// Early answers (errors, or a reply) travel as `Err` through `?`.
type Step<T> = Result<T, Response>;

fn push(req: &Request) -> Step<Response> {
    let query = Query::parse(&req.query);
    let (Some(timestamp), Some(nonce)) = (query.get("timestamp"), query.get("nonce")) else {
        return Err(error(400, "missing_parameter", "timestamp and nonce are required"));
    };
    let body =
        std::str::from_utf8(&req.body).map_err(|_| error(400, "malformed", "the body is not UTF-8"))?;
    let safe_mode = query.get("encrypt_type") == Some("aes");
    let msg_signature = match safe_mode {
        true => Some(
            query
                .get("msg_signature")
                .ok_or_else(|| error(400, "missing_parameter", "msg_signature is required"))?
                .to_string(),
        ),
        false => None,
    };
    let signature = query.get("signature");
    if !safe_mode && signature.is_none() {
        return Err(error(400, "missing_parameter", "signature is required"));
    }
    // WeChat's own signed word, passed on with every event: the app role checks it again.
    let proof = PushProof {
        signature: signature.unwrap_or_default().to_string(),
        timestamp: timestamp.to_string(),
        nonce: nonce.to_string(),
        msg_signature,
        body: body.to_string(),
    };
    let fields = xml::Fields::from(callback_crypto::verify_push(&proof).map_err(crypto_error)?);
    let pushed = Pushed { proof: &proof, request_id: &req.request_id };
    let message = Message::from_fields(&fields)?;
    let reply = handle_message(&message, &fields, &pushed)?;
    let Some(text) = reply else { return Ok(plain(200, "success")) };
    let reply_xml = xml::build(&[
        ("ToUserName", xml::Value::Text(&message.from)),
        ("FromUserName", xml::Value::Text(&message.to)),
        ("CreateTime", xml::Value::Number(now())),
        ("MsgType", xml::Value::Text("text")),
        ("Content", xml::Value::Text(&text)),
    ]);
    if !safe_mode {
        return Ok(xml_response(reply_xml));
    }
    let sealed = callback_crypto::encrypt_reply(&reply_xml, timestamp, nonce).map_err(crypto_error)?;
    let timestamp: i64 = sealed.timestamp.parse().unwrap_or_else(|_| now());
    Ok(xml_response(xml::build(&[
        ("Encrypt", xml::Value::Text(&sealed.encrypt)),
        ("MsgSignature", xml::Value::Text(&sealed.msg_signature)),
        ("TimeStamp", xml::Value::Number(timestamp)),
        ("Nonce", xml::Value::Text(&sealed.nonce)),
    ])))
}

/// The fields every push carries.
struct Message {
    to: String,
    from: String,
    create_time: i64,
    msg_type: String,
}

impl Message {
    fn from_fields(f: &xml::Fields) -> Step<Message> {
        let need = |name: &str| {
            f.get(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| error(400, "malformed_xml", &format!("{name} is missing")))
        };
        let create_time = need("CreateTime")?
            .parse()
            .map_err(|_| error(400, "malformed_xml", "CreateTime is not a number"))?;
        Ok(Message {
            to: need("ToUserName")?.to_string(),
            from: need("FromUserName")?.to_string(),
            create_time,
            msg_type: need("MsgType")?.to_string(),
        })
    }

    /// WeChat retries a push 3 times; events are told apart by sender and time.
    fn event_id(&self) -> String {
        format!("{}:{}", self.from, self.create_time)
    }
}

/// The push being handled, as the app role needs it to check WeChat's signature.
struct Pushed<'a> {
    proof: &'a PushProof,
    request_id: &'a str,
}

impl Pushed<'_> {
    fn proof_json(&self) -> serde_json::Value {
        let p = self.proof;
        json!({
            "signature": p.signature, "timestamp": p.timestamp, "nonce": p.nonce,
            "msg_signature": p.msg_signature, "body": p.body,
        })
    }
}

/// Applies the push; returns the passive reply text, if any.
fn handle_message(m: &Message, f: &xml::Fields, pushed: &Pushed<'_>) -> Step<Option<String>> {
    if m.msg_type != "event" {
        return Ok(match m.msg_type.as_str() {
            "text" => f
                .get("Content")
                .and_then(|c| keyword_reply(c.trim()))
                .or_else(|| config::get("default_reply")),
            // image, voice, video, shortvideo, location, link, file: accepted, nothing to change.
            _ => None,
        });
    }
    let event = f.get("Event").unwrap_or_default();
    let event_key = f.get("EventKey").unwrap_or_default();
    match event {
        "subscribe" => {
            update_user(m, true, pushed)?;
            if let Some(scene) = event_key.strip_prefix("qrscene_") {
                bind_scene(m, scene, pushed)?;
            }
            Ok(config::get("welcome"))
        }
        "SCAN" => {
            update_user(m, true, pushed)?;
            bind_scene(m, event_key, pushed)?;
            Ok(config::get("scan_reply"))
        }
        "unsubscribe" => {
            update_user(m, false, pushed)?;
            Ok(None)
        }
        "CLICK" => Ok(lookup("click_replies", event_key)),
        // VIEW, LOCATION, TEMPLATESENDJOBFINISH, …: accepted, nothing to change.
        _ => Ok(None),
    }
}

fn update_user(m: &Message, subscribed: bool, pushed: &Pushed<'_>) -> Step<()> {
    let kind = if subscribed { "subscribe" } else { "unsubscribe" };
    let body = json!({
        "openid": m.from, "subscribed": subscribed, "event_id": format!("{kind}:{}", m.event_id()),
        "wechat": pushed.proof_json(),
    });
    let answer = internal("POST", "/api/v1/internal/user/create-or-update", &body, pushed.request_id)?;
    if !(200..300).contains(&answer.status) {
        log::log(
            Level::Error,
            &format!("the app role refused a user update ({}): {}", answer.status, lossy(&answer.body)),
        );
        return Err(error(502, "rejected_by_app", "the app role refused the event"));
    }
    Ok(())
}

/// Binds a QR scene to the user. A scene the app role does not know, or that
/// has expired, binds nothing; the push is still acknowledged (a retry would
/// not change that).
fn bind_scene(m: &Message, scene: &str, pushed: &Pushed<'_>) -> Step<()> {
    if scene.is_empty() {
        return Ok(());
    }
    let body = json!({
        "scene": scene, "openid": m.from, "event_id": format!("bind:{}", m.event_id()),
        "wechat": pushed.proof_json(),
    });
    let answer = internal("PUT", "/api/v1/internal/binding/update", &body, pushed.request_id)?;
    match answer.status {
        200..=299 => Ok(()),
        404 | 409 | 410 => {
            log::log(
                Level::Warn,
                &format!("scene {scene:?} not bound ({}): {}", answer.status, lossy(&answer.body)),
            );
            Ok(())
        }
        status => {
            log::log(
                Level::Error,
                &format!("the app role refused a binding ({status}): {}", lossy(&answer.body)),
            );
            Err(error(502, "rejected_by_app", "the app role refused the event"))
        }
    }
}

/// One internal call; anything but an answer means WeChat must retry.
fn internal(
    method: &str,
    path: &str,
    body: &serde_json::Value,
    request_id: &str,
) -> Step<internal_call::InternalResponse> {
    let answer = internal_call::call(method, path, body.to_string().as_bytes());
    match answer {
        Ok(a) if a.status >= 500 => {
            log::log(
                Level::Error,
                &format!("{path}: the app role failed ({}), request {request_id}", a.status),
            );
            Err(error(503, "app_unavailable", "the event could not be stored; retry later"))
        }
        Ok(a) => Ok(a),
        Err(e) => {
            let why = match e {
                CallError::Timeout => "timed out".to_string(),
                CallError::Unavailable(m) | CallError::NotAllowed(m) | CallError::NotConfigured(m) => m,
            };
            log::log(Level::Error, &format!("{path}: {why}, request {request_id}"));
            Err(error(503, "app_unavailable", "the event could not be stored; retry later"))
        }
    }
}

fn keyword_reply(content: &str) -> Option<String> {
    lookup("keywords", content)
}

/// A reply from a table of the plugin's config (`[plugins.config.keywords]`, …).
fn lookup(table: &str, key: &str) -> Option<String> {
    let table: serde_json::Value = serde_json::from_str(&config::get(table)?).ok()?;
    table.get(key)?.as_str().map(str::to_string)
}

fn crypto_error(e: CryptoError) -> Response {
    match e {
        CryptoError::BadSignature => error(401, "bad_signature", "signature does not verify"),
        CryptoError::StaleTimestamp => {
            error(401, "stale_timestamp", "timestamp is outside the accepted window")
        }
        CryptoError::WrongAppid => error(401, "wrong_appid", "the message is not for this official account"),
        CryptoError::Malformed(what) => error(400, "malformed", &what),
        CryptoError::NotConfigured(what) => {
            log::log(Level::Error, &format!("callback crypto not configured: {what}"));
            error(503, "not_configured", "the WeChat callback is not configured")
        }
        CryptoError::PlaintextRefused => error(
            403,
            "plaintext_refused",
            "this account receives encrypted pushes (encrypt_type=aes); a plaintext push is refused",
        ),
        CryptoError::SignatureReused => {
            error(403, "signature_reused", "this signature was already used with another body")
        }
        CryptoError::Unavailable(what) => {
            log::log(Level::Error, &format!("a push could not be checked: {what}"));
            error(503, "unavailable", "the push could not be checked; retry later")
        }
        other => {
            log::log(Level::Warn, &format!("unexpected crypto error: {other:?}"));
            error(400, "rejected", "request rejected")
        }
    }
}

fn error(status: u16, code: &str, message: &str) -> Response {
    let body = json!({ "error": { "code": code, "message": message } });
    Response {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

fn plain(status: u16, text: &str) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
        body: text.as_bytes().to_vec(),
    }
}

fn xml_response(xml: String) -> Response {
    Response {
        status: 200,
        headers: vec![("content-type".into(), "application/xml; charset=utf-8".into())],
        body: xml.into_bytes(),
    }
}

fn lossy(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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
