//! App role plugin: signing in with WeChat and the signed-in user's data.
//!
//! - `GET /api/v1/auth/wechat?code=…`: web authorization; the user is upserted
//!   and gets a session token.
//! - `POST /api/v1/auth/wechat/qrcode`, `GET /api/v1/auth/wechat/qrcode/{scene}`:
//!   desktop login by scanning a temporary QR code; the poll hands the session
//!   out once, when the web role has bound the scanned scene.
//! - `GET …/get-menu`, `POST …/create-menu` (admin credential).
//! - `POST /api/v1/auth/logout`, `GET /api/v1/user/me`, `GET /api/v1/user/orders[/{no}]`.

use serde_json::Value as Json;
use wxhost_sdk::db::{self, SqlDialect, params};
use wxhost_sdk::prelude::*;
use wxhost_sdk::session;
use wxhost_sdk::wechat_api::{self, ApiError, Method};

fn routes() -> Router {
    Router::new()
        .get("/api/v1/auth/wechat", oauth_login)
        .post("/api/v1/auth/wechat/qrcode", create_qrcode)
        .get("/api/v1/auth/wechat/qrcode/{scene}", poll_qrcode)
        .get("/api/v1/auth/wechat/get-menu", get_menu)
        .post("/api/v1/auth/wechat/create-menu", create_menu)
        .post("/api/v1/auth/logout", logout)
        .get("/api/v1/user/me", me)
        .get("/api/v1/user/orders", orders)
        .get("/api/v1/wechat/jssdk-config", jssdk_config)
}

wxhost_sdk::plugin!(routes);

/// Lifetime of a login QR code.
const QR_LIFETIME_SECS: i64 = 300;

fn oauth_login(req: &Request) -> Result<Response> {
    let code = req.query_param("code").filter(|c| c.len() <= 256);
    let code = code.ok_or_else(|| Error::bad_request("missing_code", "the code parameter is required"))?;
    let user = wechat_api::oauth_login(&code).map_err(|e| match e {
        ApiError::Wechat(w) if [40029, 40163, 41008].contains(&w.errcode) => Error::bad_request(
            "invalid_code",
            "the authorization code is invalid or was already used; sign in again",
        ),
        other => other.into(),
    })?;
    upsert_user(&user.openid, user.unionid.as_deref(), user.nickname.as_deref(), user.avatar_url.as_deref())?;
    let session = session::issue(&user.openid)?;
    let profile = load_user(&user.openid)?;
    Ok(Response::json(
        200,
        &json!({ "openid": user.openid, "token": session.token, "expires_at": session.expires_at, "user": profile }),
    ))
}

fn create_qrcode(_: &Request) -> Result<Response> {
    let scene = format!("login_{}", random_hex(12));
    let body = json!({
        "expire_seconds": QR_LIFETIME_SECS,
        "action_name": "QR_STR_SCENE",
        "action_info": { "scene": { "scene_str": scene } },
    });
    let answer = wechat_api::call(Method::Post, "cgi-bin/qrcode/create", &[], Some(&body.to_string()))?;
    let bad_answer = |why: &str| {
        log::warn(&format!("qrcode/create: {why}"));
        Error::new(502, "wechat_unavailable", "WeChat answered something unexpected; try again")
    };
    let answer: Json = serde_json::from_str(&answer).map_err(|_| bad_answer("not JSON"))?;
    let ticket = answer["ticket"].as_str().ok_or_else(|| bad_answer("no ticket"))?;
    let expires_in = answer["expire_seconds"].as_i64().unwrap_or(QR_LIFETIME_SECS).min(QR_LIFETIME_SECS);
    let now = now();
    // Only once WeChat has made the code does the pending binding exist: nothing half-made.
    db::execute(
        "INSERT INTO bindings (scene, openid, status, ticket, expires_at, created_at, updated_at) \
         VALUES (?, NULL, 'pending', ?, ?, ?, ?)",
        params![&scene, ticket, now + expires_in, now, now],
    )?;
    let image_url = wechat_api::qrcode_image_url(ticket);
    Ok(Response::json(
        201,
        &json!({ "scene": scene, "ticket": ticket, "qrcode_url": image_url, "expires_at": now + expires_in }),
    ))
}

fn poll_qrcode(req: &Request) -> Result<Response> {
    let scene = req.param("scene")?;
    let unknown = || Error::new(404, "unknown_scene", "no such QR code");
    if scene.len() > 64 {
        return Err(unknown());
    }
    let rows = db::query("SELECT openid, status, expires_at FROM bindings WHERE scene = ?", params![scene])?;
    let row = rows.first().ok_or_else(unknown)?;
    let (openid, status, expires_at): (Option<String>, String, i64) =
        (row.get("openid")?, row.get("status")?, row.get("expires_at")?);
    let answer = |body: Json| Ok(Response::json(200, &body));
    match status.as_str() {
        "pending" if expires_at > now() => answer(json!({ "status": "pending", "expires_at": expires_at })),
        // A scan the login page did not collect before the QR code expired
        // stays uncollected: the scene travels in URLs (proxies, logs).
        "scanned" if expires_at > now() => {
            let openid = openid.ok_or_else(|| Error::internal("binding scanned without openid"))?;
            // Hand the session out once, before expiry: only the poll that flips
            // scanned → consumed gets it.
            let now = now();
            let claimed = db::execute(
                "UPDATE bindings SET status = 'consumed', updated_at = ? \
                 WHERE scene = ? AND status = 'scanned' AND expires_at > ?",
                params![now, scene, now],
            )?;
            if claimed.rows_affected != 1 {
                return answer(json!({ "status": "consumed" }));
            }
            let session = session::issue(&openid)?;
            answer(
                json!({ "status": "scanned", "openid": openid, "token": session.token, "expires_at": session.expires_at }),
            )
        }
        "pending" | "expired" | "scanned" => answer(json!({ "status": "expired" })),
        _ => answer(json!({ "status": "consumed" })),
    }
}

fn get_menu(_: &Request) -> Result<Response> {
    match wechat_api::call(Method::Get, "cgi-bin/menu/get", &[], None) {
        Ok(menu) => Ok(Response::raw_json(200, menu)),
        Err(ApiError::Wechat(e)) if e.errcode == 46003 => Ok(Response::json(200, &json!({ "menu": null }))),
        Err(e) => Err(e.into()),
    }
}

/// `wx.config` for a page inside WeChat: `?url=` is the page's URL exactly as
/// the browser has it (`location.href`), never rebuilt here behind a proxy.
fn jssdk_config(req: &Request) -> Result<Response> {
    let url = req
        .query_param("url")
        .filter(|u| (u.starts_with("https://") || u.starts_with("http://")) && u.len() <= 2048)
        .ok_or_else(|| Error::bad_request("invalid_query", "url must be the page's absolute http(s) URL"))?;
    let c = wechat_api::sign_jssdk_url(&url)?;
    let answer = json!({ "appId": c.app_id, "timestamp": c.timestamp, "nonceStr": c.nonce_str, "signature": c.signature });
    Ok(Response::json(200, &answer).header("cache-control", "no-store"))
}

fn create_menu(req: &Request) -> Result<Response> {
    session::require_admin(req)?;
    let menu: Json = serde_json::from_slice(&req.body)
        .map_err(|_| Error::bad_request("invalid_menu", "the menu must be JSON"))?;
    validate_menu(&menu).map_err(|why| Error::bad_request("invalid_menu", &why))?;
    // serde_json writes Chinese as-is (no \u escapes), as WeChat expects.
    wechat_api::call(Method::Post, "cgi-bin/menu/create", &[], Some(&menu.to_string())).map_err(
        |e| match e {
            ApiError::Wechat(w) => Error::bad_request(
                "menu_refused",
                &format!("WeChat refused the menu: {} {}", w.errcode, w.errmsg),
            ),
            other => other.into(),
        },
    )?;
    Ok(Response::json(200, &json!({ "ok": true })))
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

fn logout(req: &Request) -> Result<Response> {
    session::revoke(req)?;
    Ok(Response::json(200, &json!({ "ok": true })))
}

fn me(req: &Request) -> Result<Response> {
    let openid = session::signed_in(req)?;
    Ok(Response::json(200, &load_user(&openid)?))
}

fn orders(req: &Request) -> Result<Response> {
    let openid = session::signed_in(req)?;
    let rows = db::query(
        &format!(
            "SELECT out_trade_no, product_id, description, amount_fen, credits, status, transaction_id, paid_at, \
             created_at, trade_type, {} AS refunded_fen FROM orders WHERE openid = ? \
             ORDER BY created_at DESC, id DESC LIMIT 100",
            db::as_integer(
                "(SELECT COALESCE(SUM(r.amount_fen), 0) FROM refunds r \
                 WHERE r.out_trade_no = orders.out_trade_no AND r.status = 'success')"
            )
        ),
        params![openid],
    )?;
    Ok(Response::json(200, &json!({ "orders": rows.to_json() })))
}

fn upsert_user(
    openid: &str,
    unionid: Option<&str>,
    nickname: Option<&str>,
    avatar: Option<&str>,
) -> Result<()> {
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
    db::execute(sql, params![openid, unionid, nickname, avatar, now, now])?;
    Ok(())
}

fn load_user(openid: &str) -> Result<Json> {
    let rows = db::query(
        "SELECT openid, nickname, avatar_url, subscribed, quota, created_at FROM users WHERE openid = ?",
        params![openid],
    )?;
    let row = rows.first_or_404("user")?;
    let mut user = row.to_json();
    user["subscribed"] = json!(row.get::<bool>("subscribed")?);
    Ok(user)
}
