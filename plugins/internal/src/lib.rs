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

use serde::Deserialize;
use wxhost_sdk::callback_crypto::{self, CryptoError, PushProof};
use wxhost_sdk::db::{self, DbError, SqlDialect, Transaction, params};
use wxhost_sdk::prelude::*;

fn routes() -> Router {
    Router::new()
        .post("/api/v1/internal/user/create-or-update", create_or_update_user)
        .post("/api/v1/internal/binding/create", create_binding)
        .put("/api/v1/internal/binding/update", update_binding)
}

wxhost_sdk::plugin!(routes);

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
fn verified(proof: Option<Proof>) -> Result<Push> {
    let Some(p) = proof else {
        return Err(Error::new(
            401,
            "unsigned_event",
            "an event changes state only with WeChat's signed push",
        ));
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
        log::warn(&format!("an event passed on by the web role was refused: {e:?}"));
        Error::new(status, code, "the push does not verify as WeChat's")
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

fn mismatch() -> Error {
    Error::new(403, "event_mismatch", "the update is not what WeChat's push says")
}

fn create_or_update_user(req: &Request) -> Result<Response> {
    let u: UserUpdate = req.json()?;
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
    let tx = db::begin()?;
    if !claim_event(&tx, u.event_id.as_deref(), "user")? {
        return duplicate(tx);
    }
    let now = now();
    let sql = match db::dialect() {
        SqlDialect::Sqlite => {
            "INSERT INTO users (openid, unionid, nickname, avatar_url, subscribed, quota, created_at, updated_at) \
             VALUES (?, NULL, NULL, NULL, COALESCE(?, 0), 0, ?, ?) \
             ON CONFLICT (openid) DO UPDATE SET \
             subscribed = COALESCE(?, users.subscribed), updated_at = excluded.updated_at"
        }
        SqlDialect::Mysql => {
            "INSERT INTO users (openid, unionid, nickname, avatar_url, subscribed, quota, created_at, updated_at) \
             VALUES (?, NULL, NULL, NULL, COALESCE(?, 0), 0, ?, ?) \
             ON DUPLICATE KEY UPDATE subscribed = COALESCE(?, subscribed), updated_at = VALUES(updated_at)"
        }
    };
    tx.execute(sql, params![&u.openid, u.subscribed, now, now, u.subscribed])?;
    tx.commit()?;
    Ok(Response::json(200, &json!({ "applied": true, "openid": u.openid })).outcome("applied"))
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

fn create_binding(req: &Request) -> Result<Response> {
    let b: BindingCreate = req.json()?;
    check_scene(&b.scene)?;
    if !(MIN_SCENE_LIFETIME..=MAX_SCENE_LIFETIME).contains(&b.expires_in) {
        return Err(Error::bad_request(
            "invalid_expires_in",
            &format!("expires_in must be between {MIN_SCENE_LIFETIME} and {MAX_SCENE_LIFETIME} seconds"),
        ));
    }
    check_len("ticket", b.ticket.as_deref(), 255)?;
    let now = now();
    let result = db::execute(
        "INSERT INTO bindings (scene, openid, status, ticket, expires_at, created_at, updated_at) \
         VALUES (?, NULL, 'pending', ?, ?, ?, ?)",
        params![&b.scene, b.ticket, now + b.expires_in, now, now],
    );
    match result {
        Ok(_) => Ok(Response::json(
            201,
            &json!({ "scene": b.scene, "status": "pending", "expires_at": now + b.expires_in }),
        )),
        Err(DbError::Constraint(_)) => Err(Error::conflict("scene_exists", "this scene already exists")),
        Err(e) => Err(e.into()),
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

fn update_binding(req: &Request) -> Result<Response> {
    let b: BindingUpdate = req.json()?;
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
    let tx = db::begin()?;
    if !claim_event(&tx, b.event_id.as_deref(), "binding")? {
        return duplicate(tx);
    }
    let rows = tx.query(
        &format!("SELECT openid, status, expires_at FROM bindings WHERE scene = ?{}", db::for_update()),
        params![&b.scene],
    )?;
    // Refusals roll back (dropping `tx`), the event record included.
    let row = rows.first().ok_or_else(|| Error::new(404, "unknown_scene", "no QR code has this scene"))?;
    let (bound_to, status, expires_at): (Option<String>, String, i64) =
        (row.get("openid")?, row.get("status")?, row.get("expires_at")?);
    let now = now();
    if status == "expired" || (status == "pending" && expires_at <= now) {
        return Err(Error::new(410, "scene_expired", "this QR code has expired"));
    }
    if status != "pending" {
        return if bound_to.as_deref() == Some(b.openid.as_str()) {
            drop(tx);
            Ok(Response::json(200, &json!({ "applied": false, "status": status })))
        } else {
            Err(Error::conflict("scene_taken", "this QR code was scanned by someone else"))
        };
    }
    tx.execute(
        "UPDATE bindings SET openid = ?, status = 'scanned', updated_at = ? WHERE scene = ? AND status = 'pending'",
        params![&b.openid, now, &b.scene],
    )?;
    tx.commit()?;
    Ok(Response::json(200, &json!({ "applied": true, "status": "scanned", "scene": b.scene }))
        .outcome("applied"))
}

/// Records that an event was applied; `false` if it already was. The host
/// forgets records older than a week (its periodic pruning, never inside this
/// transaction: a range delete here deadlocked concurrent retries on InnoDB).
fn claim_event(tx: &Transaction, event_id: Option<&str>, kind: &str) -> Result<bool> {
    let Some(event_id) = event_id else { return Ok(true) };
    check_len("event_id", Some(event_id), 180)?;
    let key = format!("{kind}:{event_id}");
    match tx.execute(
        "INSERT INTO processed_events (event_key, kind, created_at) VALUES (?, ?, ?)",
        params![key, kind, now()],
    ) {
        Ok(_) => Ok(true),
        Err(DbError::Constraint(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn duplicate(tx: Transaction) -> Result<Response> {
    drop(tx);
    Ok(Response::json(200, &json!({ "applied": false, "duplicate": true })).outcome("duplicate"))
}

/// An identifier WeChat or this API makes: 1-64 letters, digits, `_` or `-`.
fn plain_id(value: &str) -> bool {
    (1..=64).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_openid(openid: &str) -> Result<()> {
    if plain_id(openid) {
        Ok(())
    } else {
        Err(Error::bad_request("invalid_openid", "openid must be 1-64 letters, digits, _ or -"))
    }
}

fn check_scene(scene: &str) -> Result<()> {
    if plain_id(scene) {
        Ok(())
    } else {
        Err(Error::bad_request("invalid_scene", "scene must be 1-64 letters, digits, _ or -"))
    }
}

fn check_len(field: &str, value: Option<&str>, max_chars: usize) -> Result<()> {
    match value {
        Some(v) if v.chars().count() > max_chars => {
            Err(Error::bad_request("too_long", &format!("{field} is longer than {max_chars} characters")))
        }
        _ => Ok(()),
    }
}
