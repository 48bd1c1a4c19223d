//! App role plugin: the internal API that the web role calls when WeChat
//! pushes an event (the host has already checked the caller's HMAC).
//!
//! The HMAC only says the web role sent it. What changes a user or binds a
//! login is WeChat's own signature: every event comes with the push as WeChat
//! sent it (`wechat`: signature parameters and raw body), which is verified
//! again here, and the update must be exactly what that push says.
//!
//! Every state change runs in one transaction together with the record of the
//! event that caused it (`processed_events`), so a push that WeChat retries,
//! or that reaches several web processes, changes the database once.

wit_bindgen::generate!({ world: "app-plugin", path: "../../wit" });

use exports::wxhost::plugin::handler::Guest;
use serde::Deserialize;
use serde_json::json;
use wxhost::plugin::callback_crypto::{self, CryptoError, PushProof};
use wxhost::plugin::db::{self, SqlDialect, Transaction, Value};
use wxhost::plugin::types::{Request, Response};

struct Internal;

impl Guest for Internal {
    fn handle(req: Request) -> Response {
        let result = match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/api/v1/internal/user/create-or-update") => {
                parse(&req.body).and_then(create_or_update_user)
            }
            ("POST", "/api/v1/internal/binding/create") => parse(&req.body).and_then(create_binding),
            ("PUT", "/api/v1/internal/binding/update") => parse(&req.body).and_then(update_binding),
            _ => Err(failure(404, "not_found", "no such internal endpoint")),
        };
        result.unwrap_or_else(|e| e)
    }
}

export!(Internal);

type Answer = Result<Response, Response>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserUpdate {
    openid: String,
    subscribed: Option<bool>,
    unionid: Option<String>,
    nickname: Option<String>,
    avatar_url: Option<String>,
    /// The WeChat event this update comes from, for de-duplication.
    event_id: Option<String>,
    /// The push as WeChat sent it.
    wechat: Option<Proof>,
}

/// A push as WeChat sent it, passed on by the web role.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Proof {
    signature: String,
    timestamp: String,
    nonce: String,
    msg_signature: Option<String>,
    body: String,
}

/// What a verified push says.
struct Push {
    from: String,
    create_time: String,
    event: String,
    event_key: String,
}

/// Checks WeChat's signature on the push again (and decrypts it) in the host.
fn verified(proof: Option<Proof>) -> Result<Push, Response> {
    let Some(p) = proof else {
        return Err(failure(401, "unsigned_event", "an event changes state only with WeChat's signed push"));
    };
    let proof = PushProof {
        signature: p.signature,
        timestamp: p.timestamp,
        nonce: p.nonce,
        msg_signature: p.msg_signature,
        body: p.body,
    };
    let fields = callback_crypto::verify_push(&proof).map_err(|e| {
        let (status, code) = match e {
            CryptoError::Unavailable(_) | CryptoError::NotConfigured(_) => (503, "push_unverifiable"),
            CryptoError::Malformed(_) => (400, "malformed_push"),
            _ => (401, "forged_push"),
        };
        wxhost::plugin::log::log(
            wxhost::plugin::log::Level::Warn,
            &format!("an event passed on by the web role was refused: {e:?}"),
        );
        failure(status, code, "the push does not verify as WeChat's")
    })?;
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone()).unwrap_or_default();
    if get("MsgType") != "event" {
        return Err(mismatch());
    }
    Ok(Push {
        from: get("FromUserName"),
        create_time: get("CreateTime"),
        event: get("Event"),
        event_key: get("EventKey"),
    })
}

fn mismatch() -> Response {
    failure(403, "event_mismatch", "the update is not what WeChat's push says")
}

fn create_or_update_user(u: UserUpdate) -> Answer {
    check_openid(&u.openid)?;
    let push = verified(u.wechat)?;
    let kind = match push.event.as_str() {
        "subscribe" | "SCAN" => "subscribe",
        "unsubscribe" => "unsubscribe",
        _ => return Err(mismatch()),
    };
    let expected_id = format!("{kind}:{}:{}", push.from, push.create_time);
    // Pushes carry no profile: only what the signed event says may change.
    if push.from != u.openid
        || u.subscribed != Some(kind == "subscribe")
        || u.event_id.as_deref() != Some(expected_id.as_str())
        || u.unionid.is_some()
        || u.nickname.is_some()
        || u.avatar_url.is_some()
    {
        return Err(mismatch());
    }
    if let Some(unionid) = &u.unionid {
        check_openid(unionid).map_err(|_| failure(400, "invalid_unionid", "unionid is malformed"))?;
    }
    check_len("nickname", u.nickname.as_deref(), 255)?;
    check_len("avatar_url", u.avatar_url.as_deref(), 1024)?;
    if u.avatar_url.as_deref().is_some_and(|a| !a.starts_with("https://") && !a.starts_with("http://")) {
        return Err(failure(400, "invalid_avatar_url", "avatar_url must be an http(s) URL"));
    }
    let tx = begin()?;
    if !claim_event(&tx, u.event_id.as_deref(), "user")? {
        return duplicate(tx);
    }
    let now = now();
    let text = |v: &Option<String>| v.clone().map(Value::Text).unwrap_or(Value::Null);
    let subscribed = u.subscribed.map(|s| Value::Int(i64::from(s))).unwrap_or(Value::Null);
    let sql = match db::dialect() {
        SqlDialect::Sqlite => {
            "INSERT INTO users (openid, unionid, nickname, avatar_url, subscribed, quota, created_at, updated_at) \
             VALUES (?, ?, ?, ?, COALESCE(?, 0), 0, ?, ?) \
             ON CONFLICT (openid) DO UPDATE SET unionid = COALESCE(excluded.unionid, users.unionid), \
             nickname = COALESCE(excluded.nickname, users.nickname), \
             avatar_url = COALESCE(excluded.avatar_url, users.avatar_url), \
             subscribed = COALESCE(?, users.subscribed), updated_at = excluded.updated_at"
        }
        SqlDialect::Mysql => {
            "INSERT INTO users (openid, unionid, nickname, avatar_url, subscribed, quota, created_at, updated_at) \
             VALUES (?, ?, ?, ?, COALESCE(?, 0), 0, ?, ?) \
             ON DUPLICATE KEY UPDATE unionid = COALESCE(VALUES(unionid), unionid), \
             nickname = COALESCE(VALUES(nickname), nickname), \
             avatar_url = COALESCE(VALUES(avatar_url), avatar_url), \
             subscribed = COALESCE(?, subscribed), updated_at = VALUES(updated_at)"
        }
    };
    let params = vec![
        Value::Text(u.openid.clone()),
        text(&u.unionid),
        text(&u.nickname),
        text(&u.avatar_url),
        subscribed.clone(),
        Value::Int(now),
        Value::Int(now),
        subscribed,
    ];
    tx.execute(sql, &params).map_err(db_failure)?;
    tx.commit().map_err(db_failure)?;
    Ok(reply(200, json!({ "applied": true, "openid": u.openid })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingCreate {
    scene: String,
    /// Seconds until the scene expires.
    expires_in: i64,
    ticket: Option<String>,
}

const MIN_SCENE_LIFETIME: i64 = 60;
/// WeChat's limit for temporary QR codes: 30 days.
const MAX_SCENE_LIFETIME: i64 = 30 * 24 * 3600;

fn create_binding(b: BindingCreate) -> Answer {
    check_scene(&b.scene)?;
    if !(MIN_SCENE_LIFETIME..=MAX_SCENE_LIFETIME).contains(&b.expires_in) {
        return Err(failure(
            400,
            "invalid_expires_in",
            &format!("expires_in must be between {MIN_SCENE_LIFETIME} and {MAX_SCENE_LIFETIME} seconds"),
        ));
    }
    check_len("ticket", b.ticket.as_deref(), 255)?;
    let now = now();
    let result = db::execute(
        "INSERT INTO bindings (scene, openid, status, ticket, expires_at, created_at, updated_at) \
         VALUES (?, NULL, 'pending', ?, ?, ?, ?)",
        &[
            Value::Text(b.scene.clone()),
            b.ticket.map(Value::Text).unwrap_or(Value::Null),
            Value::Int(now + b.expires_in),
            Value::Int(now),
            Value::Int(now),
        ],
    );
    match result {
        Ok(_) => {
            Ok(reply(201, json!({ "scene": b.scene, "status": "pending", "expires_at": now + b.expires_in })))
        }
        Err(db::Error::Constraint(_)) => Err(failure(409, "scene_exists", "this scene already exists")),
        Err(e) => Err(db_failure(e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingUpdate {
    scene: String,
    openid: String,
    event_id: Option<String>,
    /// The push as WeChat sent it.
    wechat: Option<Proof>,
}

fn update_binding(b: BindingUpdate) -> Answer {
    check_scene(&b.scene)?;
    check_openid(&b.openid)?;
    let push = verified(b.wechat)?;
    let scanned = match push.event.as_str() {
        "SCAN" => push.event_key == b.scene,
        "subscribe" => push.event_key.strip_prefix("qrscene_") == Some(b.scene.as_str()),
        _ => false,
    };
    let expected_id = format!("bind:{}:{}", push.from, push.create_time);
    if !scanned || push.from != b.openid || b.event_id.as_deref() != Some(expected_id.as_str()) {
        return Err(mismatch());
    }
    let tx = begin()?;
    if !claim_event(&tx, b.event_id.as_deref(), "binding")? {
        return duplicate(tx);
    }
    let lock = match db::dialect() {
        SqlDialect::Mysql => " FOR UPDATE",
        SqlDialect::Sqlite => "",
    };
    let rows = tx
        .query(
            &format!("SELECT openid, status, expires_at FROM bindings WHERE scene = ?{lock}"),
            &[Value::Text(b.scene.clone())],
        )
        .map_err(db_failure)?;
    // Refusals roll back (dropping `tx`), the event record included.
    let Some(row) = rows.rows.first() else {
        return Err(failure(404, "unknown_scene", "no QR code has this scene"));
    };
    let (bound_to, status, expires_at) = match &row[..] {
        [openid, Value::Text(status), Value::Int(expires_at)] => {
            (text_of(openid), status.as_str(), *expires_at)
        }
        _ => return Err(failure(500, "internal_error", "unexpected binding row")),
    };
    let now = now();
    if status == "expired" || (status == "pending" && expires_at <= now) {
        return Err(failure(410, "scene_expired", "this QR code has expired"));
    }
    if status != "pending" {
        return if bound_to.as_deref() == Some(b.openid.as_str()) {
            drop(tx);
            Ok(reply(200, json!({ "applied": false, "status": status })))
        } else {
            Err(failure(409, "scene_taken", "this QR code was scanned by someone else"))
        };
    }
    tx.execute(
        "UPDATE bindings SET openid = ?, status = 'scanned', updated_at = ? WHERE scene = ? AND status = 'pending'",
        &[Value::Text(b.openid.clone()), Value::Int(now), Value::Text(b.scene.clone())],
    )
    .map_err(db_failure)?;
    tx.commit().map_err(db_failure)?;
    Ok(reply(200, json!({ "applied": true, "status": "scanned", "scene": b.scene })))
}

/// How long an applied event is remembered. WeChat retries within seconds;
/// a week also covers replays of captured pushes within their timestamp window.
const EVENT_MEMORY_SECS: i64 = 7 * 24 * 3600;

/// Records that an event was applied; `false` if it already was.
fn claim_event(tx: &Transaction, event_id: Option<&str>, kind: &str) -> Result<bool, Response> {
    let Some(event_id) = event_id else { return Ok(true) };
    check_len("event_id", Some(event_id), 180)?;
    // Now and then (one call in 64, at random), forget old events so the table stays small.
    if std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8)
        .is_multiple_of(64)
    {
        tx.execute(
            "DELETE FROM processed_events WHERE created_at < ?",
            &[Value::Int(now() - EVENT_MEMORY_SECS)],
        )
        .map_err(db_failure)?;
    }
    let key = format!("{kind}:{event_id}");
    match tx.execute(
        "INSERT INTO processed_events (event_key, kind, created_at) VALUES (?, ?, ?)",
        &[Value::Text(key), Value::Text(kind.into()), Value::Int(now())],
    ) {
        Ok(_) => Ok(true),
        Err(db::Error::Constraint(_)) => Ok(false),
        Err(e) => Err(db_failure(e)),
    }
}

fn duplicate(tx: Transaction) -> Answer {
    drop(tx);
    Ok(reply(200, json!({ "applied": false, "duplicate": true })))
}

fn begin() -> Result<Transaction, Response> {
    db::begin().map_err(db_failure)
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| failure(400, "invalid_body", &format!("invalid JSON body: {e}")))
}

fn check_openid(openid: &str) -> Result<(), Response> {
    let ok = (1..=64).contains(&openid.len())
        && openid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(failure(400, "invalid_openid", "openid must be 1-64 letters, digits, _ or -"))
    }
}

fn check_scene(scene: &str) -> Result<(), Response> {
    let ok = (1..=64).contains(&scene.len())
        && scene.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(failure(400, "invalid_scene", "scene must be 1-64 letters, digits, _ or -")) }
}

fn check_len(field: &str, value: Option<&str>, max_chars: usize) -> Result<(), Response> {
    match value {
        Some(v) if v.chars().count() > max_chars => {
            Err(failure(400, "too_long", &format!("{field} is longer than {max_chars} characters")))
        }
        _ => Ok(()),
    }
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::Text(s) => Some(s.clone()),
        _ => None,
    }
}

fn db_failure(e: db::Error) -> Response {
    let (status, code) = match e {
        db::Error::Unavailable(_) => (503, "database_unavailable"),
        _ => (500, "internal_error"),
    };
    wxhost::plugin::log::log(wxhost::plugin::log::Level::Error, &format!("database: {e:?}"));
    failure(status, code, "the database could not complete the request")
}

fn failure(status: u16, code: &str, message: &str) -> Response {
    reply(status, json!({ "error": { "code": code, "message": message } }))
}

fn reply(status: u16, body: serde_json::Value) -> Response {
    let mut headers = vec![("content-type".into(), "application/json".into())];
    // What the call did, for the host's metrics (applied vs duplicate).
    match (body["applied"].as_bool(), body["duplicate"].as_bool()) {
        (Some(true), _) => headers.push(("x-wxhost-outcome".into(), "applied".into())),
        (Some(false), Some(true)) => headers.push(("x-wxhost-outcome".into(), "duplicate".into())),
        _ => {}
    }
    Response { status, headers, body: body.to_string().into_bytes() }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
