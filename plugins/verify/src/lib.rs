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

use serde_json::json;
use wxhost_sdk::callback_crypto::{self, PushProof};
use wxhost_sdk::config;
use wxhost_sdk::internal_call::{self, InternalResponse};
use wxhost_sdk::{Error, Request, Response, Result, Router, log, now};

const SERVER_URL: &str = "/api/v1/auth/wechat/verify";

fn routes() -> Router {
    let router = Router::new().get(SERVER_URL, server_verification).post(SERVER_URL, push);
    if cfg!(feature = "marked-build") { router.default_header("x-verify-build", "marked") } else { router }
}

wxhost_sdk::plugin!(routes);

/// WeChat's server verification: `signature`, `timestamp`, `nonce`, `echostr`.
fn server_verification(req: &Request) -> Result<Response> {
    let [Some(signature), Some(timestamp), Some(nonce), Some(echostr)] =
        req.query_params(["signature", "timestamp", "nonce", "echostr"])
    else {
        return Err(missing("signature, timestamp, nonce and echostr are required"));
    };
    callback_crypto::verify_server_signature(&signature, &timestamp, &nonce)?;
    Ok(Response::text(200, &echostr))
}

fn missing(what: &str) -> Error {
    Error::bad_request("missing_parameter", what)
}

fn push(req: &Request) -> Result<Response> {
    let [timestamp, nonce, encrypt_type, msg_signature, signature] =
        req.query_params(["timestamp", "nonce", "encrypt_type", "msg_signature", "signature"]);
    let (Some(timestamp), Some(nonce)) = (timestamp, nonce) else {
        return Err(missing("timestamp and nonce are required"));
    };
    let body = req.text()?;
    let safe_mode = encrypt_type.as_deref() == Some("aes");
    let msg_signature = match safe_mode {
        true => Some(msg_signature.ok_or_else(|| missing("msg_signature is required"))?),
        false => None,
    };
    if !safe_mode && signature.is_none() {
        return Err(missing("signature is required"));
    }
    // WeChat's own signed word, passed on with every event: the app role checks it again.
    let proof = PushProof {
        signature: signature.unwrap_or_default(),
        timestamp: timestamp.clone(),
        nonce: nonce.clone(),
        msg_signature,
        body: body.to_string(),
    };
    let fields = xml::Fields::from(callback_crypto::verify_push(&proof)?);
    let pushed = Pushed { proof: &proof, request_id: &req.request_id };
    let message = Message::from_fields(&fields)?;
    let reply = handle_message(&message, &fields, &pushed)?;
    let Some(text) = reply else { return Ok(Response::text(200, "success")) };
    let reply_xml = xml::build(&[
        ("ToUserName", xml::Value::Text(&message.from)),
        ("FromUserName", xml::Value::Text(&message.to)),
        ("CreateTime", xml::Value::Number(now())),
        ("MsgType", xml::Value::Text("text")),
        ("Content", xml::Value::Text(&text)),
    ]);
    if !safe_mode {
        return Ok(Response::xml(200, reply_xml));
    }
    let sealed = callback_crypto::encrypt_reply(&reply_xml, &timestamp, &nonce)?;
    let timestamp: i64 = sealed.timestamp.parse().unwrap_or_else(|_| now());
    Ok(Response::xml(
        200,
        xml::build(&[
            ("Encrypt", xml::Value::Text(&sealed.encrypt)),
            ("MsgSignature", xml::Value::Text(&sealed.msg_signature)),
            ("TimeStamp", xml::Value::Number(timestamp)),
            ("Nonce", xml::Value::Text(&sealed.nonce)),
        ]),
    ))
}

/// The fields every push carries.
struct Message {
    to: String,
    from: String,
    create_time: i64,
    msg_type: String,
}

impl Message {
    fn from_fields(f: &xml::Fields) -> Result<Message> {
        let need = |name: &str| {
            f.get(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| Error::bad_request("malformed_xml", &format!("{name} is missing")))
        };
        let create_time = need("CreateTime")?
            .parse()
            .map_err(|_| Error::bad_request("malformed_xml", "CreateTime is not a number"))?;
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
fn handle_message(m: &Message, f: &xml::Fields, pushed: &Pushed<'_>) -> Result<Option<String>> {
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

fn update_user(m: &Message, subscribed: bool, pushed: &Pushed<'_>) -> Result<()> {
    let kind = if subscribed { "subscribe" } else { "unsubscribe" };
    let body = json!({
        "openid": m.from, "subscribed": subscribed, "event_id": format!("{kind}:{}", m.event_id()),
        "wechat": pushed.proof_json(),
    });
    let answer = internal("POST", "/api/v1/internal/user/create-or-update", &body, pushed.request_id)?;
    if !(200..300).contains(&answer.status) {
        log::error(&format!(
            "the app role refused a user update ({}): {}",
            answer.status,
            lossy(&answer.body)
        ));
        return Err(rejected_by_app());
    }
    Ok(())
}

/// Binds a QR scene to the user. A scene the app role does not know, or that
/// has expired, binds nothing; the push is still acknowledged (a retry would
/// not change that).
fn bind_scene(m: &Message, scene: &str, pushed: &Pushed<'_>) -> Result<()> {
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
            log::warn(&format!("scene {scene:?} not bound ({}): {}", answer.status, lossy(&answer.body)));
            Ok(())
        }
        status => {
            log::error(&format!("the app role refused a binding ({status}): {}", lossy(&answer.body)));
            Err(rejected_by_app())
        }
    }
}

fn rejected_by_app() -> Error {
    Error::new(502, "rejected_by_app", "the app role refused the event")
}

/// One internal call; anything but an answer means WeChat must retry.
fn internal(
    method: &str,
    path: &str,
    body: &serde_json::Value,
    request_id: &str,
) -> Result<InternalResponse> {
    let retry_later = || Error::new(503, "app_unavailable", "the event could not be stored; retry later");
    match internal_call::call(method, path, body.to_string().as_bytes()) {
        Ok(a) if a.status >= 500 => {
            log::error(&format!("{path}: the app role failed ({}), request {request_id}", a.status));
            Err(retry_later())
        }
        Ok(a) => Ok(a),
        Err(e) => {
            log::error(&format!("{path}: {e:?}, request {request_id}"));
            Err(retry_later())
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

fn lossy(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned()
}
