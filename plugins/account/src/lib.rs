//! App role plugin: signing in with WeChat and the signed-in user's data.
//!
//! - `GET /api/v1/auth/wechat?code=…`: web authorization; the user is upserted
//!   and gets a session token.
//! - `POST /api/v1/auth/wechat/qrcode`, `GET /api/v1/auth/wechat/qrcode/{scene}`:
//!   desktop login by scanning a temporary QR code; the poll hands the session
//!   out once, when the web role has bound the scanned scene.
//! - `GET …/get-menu`, `POST …/create-menu` (admin credential).
//! - `POST /api/v1/auth/logout`, `GET /api/v1/user/me`, `GET /api/v1/user/orders[/{no}]`.

wit_bindgen::generate!({ world: "app-plugin", path: "../../wit" });

use exports::wxhost::plugin::handler::Guest;
use serde_json::{Value as Json, json};
use wxhost::plugin::db::{self, SqlDialect, Value};
use wxhost::plugin::log::{self, Level};
use wxhost::plugin::session::{self, SessionError};
use wxhost::plugin::types::{Request, Response};
use wxhost::plugin::wechat_api::{self, ApiError, Method};

struct Account;

impl Guest for Account {
    fn handle(req: Request) -> Response {
        let param =
            |name: &str| req.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or("");
        let result = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/api/v1/auth/wechat") => oauth_login(&req),
            ("POST", "/api/v1/auth/wechat/qrcode") => create_qrcode(),
            ("GET", p) if p.starts_with("/api/v1/auth/wechat/qrcode/") => poll_qrcode(param("scene")),
            ("GET", "/api/v1/auth/wechat/get-menu") => get_menu(),
            ("POST", "/api/v1/auth/wechat/create-menu") => create_menu(&req),
            ("POST", "/api/v1/auth/logout") => logout(&req),
            ("GET", "/api/v1/user/me") => me(&req),
            ("GET", "/api/v1/user/orders") => orders(&req),
            _ => Err(failure(404, "not_found", "no such route")),
        };
        result.unwrap_or_else(|e| e)
    }
}

export!(Account);

type Answer = Result<Response, Response>;

/// Lifetime of a login QR code.
const QR_LIFETIME_SECS: i64 = 300;

fn oauth_login(req: &Request) -> Answer {
    let query = query(&req.query);
    let code = query.get("code").filter(|c| !c.is_empty() && c.len() <= 256);
    let code = code.ok_or_else(|| failure(400, "missing_code", "the code parameter is required"))?;
    let user = wechat_api::oauth_login(code).map_err(|e| match e {
        ApiError::Wechat(w) if [40029, 40163, 41008].contains(&w.errcode) => failure(
            400,
            "invalid_code",
            "the authorization code is invalid or was already used; sign in again",
        ),
        other => wechat_failure(other),
    })?;
    upsert_user(&user.openid, user.unionid.as_deref(), user.nickname.as_deref(), user.avatar_url.as_deref())?;
    let session = session::issue(&user.openid).map_err(session_failure)?;
    let profile = load_user(&user.openid)?;
    Ok(reply(
        200,
        json!({ "openid": user.openid, "token": session.token, "expires_at": session.expires_at, "user": profile }),
    ))
}

fn create_qrcode() -> Answer {
    let scene = format!("login_{}", random_hex(12));
    let body = json!({
        "expire_seconds": QR_LIFETIME_SECS,
        "action_name": "QR_STR_SCENE",
        "action_info": { "scene": { "scene_str": scene } },
    });
    let answer = wechat_api::call(Method::Post, "cgi-bin/qrcode/create", &[], Some(&body.to_string()))
        .map_err(wechat_failure)?;
    let answer: Json =
        serde_json::from_str(&answer).map_err(|_| failure(502, "wechat_unavailable", "bad answer"))?;
    let ticket = answer["ticket"].as_str().ok_or_else(|| failure(502, "wechat_unavailable", "no ticket"))?;
    let expires_in = answer["expire_seconds"].as_i64().unwrap_or(QR_LIFETIME_SECS).min(QR_LIFETIME_SECS);
    let now = now();
    // Only once WeChat has made the code does the pending binding exist: nothing half-made.
    db::execute(
        "INSERT INTO bindings (scene, openid, status, ticket, expires_at, created_at, updated_at) \
         VALUES (?, NULL, 'pending', ?, ?, ?, ?)",
        &[
            Value::Text(scene.clone()),
            Value::Text(ticket.into()),
            Value::Int(now + expires_in),
            Value::Int(now),
            Value::Int(now),
        ],
    )
    .map_err(db_failure)?;
    let image_url = wechat_api::qrcode_image_url(ticket);
    Ok(reply(
        201,
        json!({ "scene": scene, "ticket": ticket, "qrcode_url": image_url, "expires_at": now + expires_in }),
    ))
}

fn poll_qrcode(scene: &str) -> Answer {
    if scene.is_empty() || scene.len() > 64 {
        return Err(failure(404, "unknown_scene", "no such QR code"));
    }
    let rows = db::query(
        "SELECT openid, status, expires_at FROM bindings WHERE scene = ?",
        &[Value::Text(scene.into())],
    )
    .map_err(db_failure)?;
    let Some(row) = rows.rows.first() else { return Err(failure(404, "unknown_scene", "no such QR code")) };
    let (openid, status, expires_at) = match &row[..] {
        [openid, Value::Text(status), Value::Int(expires_at)] => (text(openid), status.clone(), *expires_at),
        _ => return Err(failure(500, "internal_error", "unexpected binding row")),
    };
    match status.as_str() {
        "pending" if expires_at > now() => {
            Ok(reply(200, json!({ "status": "pending", "expires_at": expires_at })))
        }
        // A scan the login page did not collect before the QR code expired
        // stays uncollected: the scene travels in URLs (proxies, logs).
        "scanned" if expires_at > now() => {
            let openid = openid.ok_or_else(|| failure(500, "internal_error", "scanned without openid"))?;
            // Hand the session out once, before expiry: only the poll that flips
            // scanned → consumed gets it.
            let now = now();
            let claimed = db::execute(
                "UPDATE bindings SET status = 'consumed', updated_at = ? \
                 WHERE scene = ? AND status = 'scanned' AND expires_at > ?",
                &[Value::Int(now), Value::Text(scene.into()), Value::Int(now)],
            )
            .map_err(db_failure)?;
            if claimed.rows_affected != 1 {
                return Ok(reply(200, json!({ "status": "consumed" })));
            }
            let session = session::issue(&openid).map_err(session_failure)?;
            Ok(reply(
                200,
                json!({ "status": "scanned", "openid": openid, "token": session.token, "expires_at": session.expires_at }),
            ))
        }
        "pending" | "expired" | "scanned" => Ok(reply(200, json!({ "status": "expired" }))),
        _ => Ok(reply(200, json!({ "status": "consumed" }))),
    }
}

fn get_menu() -> Answer {
    match wechat_api::call(Method::Get, "cgi-bin/menu/get", &[], None) {
        Ok(menu) => Ok(Response { status: 200, headers: json_headers(), body: menu.into_bytes() }),
        Err(ApiError::Wechat(e)) if e.errcode == 46003 => Ok(reply(200, json!({ "menu": null }))),
        Err(e) => Err(wechat_failure(e)),
    }
}

fn create_menu(req: &Request) -> Answer {
    let credential =
        bearer(req).ok_or_else(|| failure(401, "unauthorized", "an admin credential is required"))?;
    if !session::verify_admin(credential) {
        return Err(failure(403, "forbidden", "this credential may not change the menu"));
    }
    let menu: Json = serde_json::from_slice(&req.body)
        .map_err(|_| failure(400, "invalid_menu", "the menu must be JSON"))?;
    validate_menu(&menu).map_err(|why| failure(400, "invalid_menu", &why))?;
    // serde_json writes Chinese as-is (no \u escapes), as WeChat expects.
    wechat_api::call(Method::Post, "cgi-bin/menu/create", &[], Some(&menu.to_string())).map_err(
        |e| match e {
            ApiError::Wechat(w) => {
                failure(400, "menu_refused", &format!("WeChat refused the menu: {} {}", w.errcode, w.errmsg))
            }
            other => wechat_failure(other),
        },
    )?;
    Ok(reply(200, json!({ "ok": true })))
}

/// WeChat's limits: 1-3 top-level buttons, up to 5 sub-buttons, names of at
/// most 16 (top) / 60 (sub) bytes, and what each button type needs.
fn validate_menu(menu: &Json) -> Result<(), String> {
    let buttons = menu["button"].as_array().ok_or("the menu needs a `button` list")?;
    if !(1..=3).contains(&buttons.len()) {
        return Err("a menu has 1 to 3 buttons".into());
    }
    for b in buttons {
        check_button(b, 16)?;
        if let Some(subs) = b.get("sub_button").and_then(Json::as_array) {
            if subs.len() > 5 {
                return Err("a button has at most 5 sub-buttons".into());
            }
            for s in subs {
                check_button(s, 60)?;
                if s.get("sub_button").is_some() {
                    return Err("sub-buttons cannot nest".into());
                }
            }
        }
    }
    Ok(())
}

fn check_button(b: &Json, max_name_bytes: usize) -> Result<(), String> {
    let name = b["name"].as_str().ok_or("every button needs a name")?;
    if name.is_empty() || name.len() > max_name_bytes {
        return Err(format!("button name {name:?} must be 1 to {max_name_bytes} bytes"));
    }
    if b.get("sub_button").is_some() {
        return Ok(());
    }
    match b["type"].as_str() {
        Some("click") if b["key"].as_str().is_some_and(|k| !k.is_empty() && k.len() <= 128) => Ok(()),
        Some("view") if b["url"].as_str().is_some_and(|u| u.starts_with("http")) => Ok(()),
        Some("miniprogram") if b["appid"].is_string() && b["pagepath"].is_string() => Ok(()),
        Some(t) => Err(format!(
            "button {name:?} of type {t} lacks what that type needs (key, url, or appid and pagepath)"
        )),
        None => Err(format!("button {name:?} needs a type or sub_button")),
    }
}

fn logout(req: &Request) -> Answer {
    let token = bearer(req).ok_or_else(|| failure(401, "unauthorized", "sign in first"))?;
    session::revoke(token).map_err(session_failure)?;
    Ok(reply(200, json!({ "ok": true })))
}

fn me(req: &Request) -> Answer {
    let openid = signed_in(req)?;
    Ok(reply(200, load_user(&openid)?))
}

const ORDER_COLUMNS: &str =
    "out_trade_no, product_id, description, amount_fen, credits, status, transaction_id, paid_at, created_at";

fn orders(req: &Request) -> Answer {
    let openid = signed_in(req)?;
    let rows = db::query(
        &format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE openid = ? ORDER BY created_at DESC, id DESC LIMIT 100"
        ),
        &[Value::Text(openid)],
    )
    .map_err(db_failure)?;
    let orders: Vec<Json> = rows.rows.iter().map(|r| order_json(&rows.columns, r)).collect();
    Ok(reply(200, json!({ "orders": orders })))
}

fn order_json(columns: &[String], row: &[Value]) -> Json {
    let mut out = serde_json::Map::new();
    for (c, v) in columns.iter().zip(row) {
        out.insert(c.clone(), to_json(v));
    }
    Json::Object(out)
}

/// The session's openid; a missing, forged, expired or revoked token is a 401.
fn signed_in(req: &Request) -> Result<String, Response> {
    let token = bearer(req).ok_or_else(|| failure(401, "unauthorized", "sign in first"))?;
    session::verify(token).map(|s| s.openid).map_err(session_failure)
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .and_then(|(_, v)| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn upsert_user(
    openid: &str,
    unionid: Option<&str>,
    nickname: Option<&str>,
    avatar: Option<&str>,
) -> Result<(), Response> {
    let now = now();
    let sql = match db::dialect() {
        SqlDialect::Sqlite => {
            "INSERT INTO users (openid, unionid, nickname, avatar_url, subscribed, quota, created_at, updated_at) \
             VALUES (?, ?, ?, ?, 0, 0, ?, ?) ON CONFLICT (openid) DO UPDATE SET \
             unionid = COALESCE(excluded.unionid, users.unionid), nickname = COALESCE(excluded.nickname, users.nickname), \
             avatar_url = COALESCE(excluded.avatar_url, users.avatar_url), updated_at = excluded.updated_at"
        }
        SqlDialect::Mysql => {
            "INSERT INTO users (openid, unionid, nickname, avatar_url, subscribed, quota, created_at, updated_at) \
             VALUES (?, ?, ?, ?, 0, 0, ?, ?) ON DUPLICATE KEY UPDATE \
             unionid = COALESCE(VALUES(unionid), unionid), nickname = COALESCE(VALUES(nickname), nickname), \
             avatar_url = COALESCE(VALUES(avatar_url), avatar_url), updated_at = VALUES(updated_at)"
        }
    };
    let opt = |v: Option<&str>| v.map(|s| Value::Text(s.into())).unwrap_or(Value::Null);
    db::execute(
        sql,
        &[
            Value::Text(openid.into()),
            opt(unionid),
            opt(nickname),
            opt(avatar),
            Value::Int(now),
            Value::Int(now),
        ],
    )
    .map_err(db_failure)?;
    Ok(())
}

fn load_user(openid: &str) -> Result<Json, Response> {
    let rows = db::query(
        "SELECT openid, nickname, avatar_url, subscribed, quota, created_at FROM users WHERE openid = ?",
        &[Value::Text(openid.into())],
    )
    .map_err(db_failure)?;
    let row = rows.rows.first().ok_or_else(|| failure(404, "not_found", "no such user"))?;
    let mut user = order_json(&rows.columns, row);
    user["subscribed"] = json!(matches!(row[3], Value::Int(1)));
    Ok(user)
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Text(s) => json!(s),
        Value::Blob(_) => Json::Null,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(s) => Some(s.clone()),
        _ => None,
    }
}

fn query(raw: &str) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(raw.as_bytes()).into_owned().collect()
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("WASI random is available");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn wechat_failure(e: ApiError) -> Response {
    match e {
        ApiError::Timeout => failure(504, "wechat_timeout", "WeChat did not answer in time; try again"),
        ApiError::Wechat(w) => {
            log::log(Level::Warn, &format!("WeChat error {}: {}", w.errcode, w.errmsg));
            failure(502, "wechat_error", "WeChat refused the request; try again later")
        }
        ApiError::NotAllowed(why) | ApiError::NotConfigured(why) => {
            log::log(Level::Error, &why);
            failure(500, "internal_error", "the server is not configured for this")
        }
        ApiError::Unavailable(why) => {
            log::log(Level::Warn, &format!("WeChat unavailable: {why}"));
            failure(502, "wechat_unavailable", "WeChat could not be reached; try again")
        }
    }
}

fn session_failure(e: SessionError) -> Response {
    match e {
        SessionError::Invalid => {
            failure(401, "invalid_session", "the session token is not valid; sign in again")
        }
        SessionError::Expired => failure(401, "session_expired", "the session has expired; sign in again"),
        SessionError::Revoked => failure(401, "session_revoked", "you signed out; sign in again"),
        SessionError::Unavailable(_) => failure(503, "unavailable", "sessions are unavailable; try again"),
    }
}

fn db_failure(e: db::Error) -> Response {
    log::log(Level::Error, &format!("database: {e:?}"));
    match e {
        db::Error::Unavailable(_) => {
            failure(503, "database_unavailable", "the database is unavailable; try again")
        }
        _ => failure(500, "internal_error", "the request could not be completed"),
    }
}

fn failure(status: u16, code: &str, message: &str) -> Response {
    reply(status, json!({ "error": { "code": code, "message": message } }))
}

fn json_headers() -> Vec<(String, String)> {
    vec![("content-type".into(), "application/json; charset=utf-8".into())]
}

fn reply(status: u16, body: Json) -> Response {
    Response { status, headers: json_headers(), body: body.to_string().into_bytes() }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
