//! App role plugin: payments, from the catalog to the credited quota.
//!
//! - `GET /api/v1/payment/products`: the catalog, defined server-side in this
//!   plugin's `[[plugins.config.products]]`. An order's price always comes
//!   from here, never from the client.
//! - `POST /api/v1/payment/create-order`: an order row, a JSAPI order at WeChat
//!   Pay (signed by the host), and the frontend's pay parameters.
//! - `PUT /api/v1/internal/payment/order/update`: the web role's notify plugin
//!   passes on WeChat Pay's notify as it came; it is verified again here
//!   (the web role's word, or its HMAC key, never credits money).
//! - `GET /api/v1/user/orders/{out_trade_no}`: the caller's order; a pending
//!   one is checked with WeChat Pay (a lost notify is caught here) and an
//!   unpaid one past its expiry is closed.
//!
//! Notify and query both mark an order paid through [`apply_paid`]: one
//! transaction, the order locked, checked against what WeChat Pay says, and
//! the quota credited only if the order was not paid already.

wit_bindgen::generate!({ world: "app-plugin", path: "../../wit" });

use exports::wxhost::plugin::handler::Guest;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use wxhost::plugin::callback_crypto::{self, CryptoError, PayNotifyHeaders};
use wxhost::plugin::config;
use wxhost::plugin::db::{self, SqlDialect, Value};
use wxhost::plugin::log::{self, Level};
use wxhost::plugin::session::{self, SessionError};
use wxhost::plugin::types::{Request, Response};
use wxhost::plugin::wechat_pay::{self, JsapiOrder, PayError};

struct Payment;

impl Guest for Payment {
    fn handle(req: Request) -> Response {
        let result = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/api/v1/payment/products") => products(),
            ("POST", "/api/v1/payment/create-order") => create_order(&req),
            ("PUT", "/api/v1/internal/payment/order/update") => parse(&req.body).and_then(notified),
            ("GET", p) if p.starts_with("/api/v1/user/orders/") => {
                let no = req.params.iter().find(|(k, _)| k == "out_trade_no").map(|(_, v)| v.as_str());
                order_status(&req, no.unwrap_or_default())
            }
            _ => Err(failure(404, "not_found", "no such route")),
        };
        result.unwrap_or_else(|e| e)
    }
}

export!(Payment);

type Answer = Result<Response, Response>;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Product {
    id: String,
    name: String,
    /// Price in fen (1/100 yuan).
    price_fen: i64,
    /// Quota credited when paid.
    credits: i64,
}

fn products() -> Answer {
    Ok(reply(200, json!({ "products": catalog()? })))
}

/// The catalog, checked: unique ids, positive prices, non-negative credits.
/// A broken catalog is an error, never a guessed price.
fn catalog() -> Result<Vec<Product>, Response> {
    check_catalog().map_err(|why| {
        log::log(Level::Error, &format!("the product catalog in plugins.toml is invalid: {why}"));
        failure(500, "catalog_invalid", "the catalog is not available")
    })
}

fn check_catalog() -> Result<Vec<Product>, String> {
    let raw = config::get("products").ok_or("no [[plugins.config.products]]")?;
    let products: Vec<Product> = serde_json::from_str(&raw).map_err(|e| e.to_string())?;
    for (i, p) in products.iter().enumerate() {
        if p.id.is_empty()
            || p.id.len() > 64
            || !p.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("product {i}: id must be 1-64 letters, digits, _ or -"));
        }
        if p.name.is_empty() || p.name.chars().count() > 100 || p.price_fen <= 0 || p.credits < 0 {
            return Err(format!(
                "product {}: needs a name (≤ 100 characters), a positive price_fen and credits >= 0",
                p.id
            ));
        }
        if products[..i].iter().any(|q| q.id == p.id) {
            return Err(format!("product {} is listed twice", p.id));
        }
    }
    Ok(products)
}

/// How long an order can be paid: `order_ttl_secs` in the plugin's config
/// (WeChat Pay needs at least a minute), 30 minutes by default.
fn order_ttl_secs() -> i64 {
    config::get("order_ttl_secs")
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|s| (60..=7 * 86_400).contains(s))
        .unwrap_or(1800)
}

#[derive(Deserialize)]
struct CreateOrder {
    /// Only the product is taken from the client; a price it sends is ignored.
    product_id: String,
}

fn create_order(req: &Request) -> Answer {
    let openid = signed_in(req)?;
    let wanted: CreateOrder = parse(&req.body)?;
    let product = catalog()?
        .into_iter()
        .find(|p| p.id == wanted.product_id)
        .ok_or_else(|| failure(400, "unknown_product", "no product has this id"))?;
    let (appid, mchid) = wechat_pay::merchant().map_err(pay_failure)?;
    let now = now();
    let out_trade_no = format!("{now}{}", random_hex(8));
    let time_expire = now + order_ttl_secs();
    // The row exists before WeChat Pay hears of the order, so a notify can never
    // arrive for an order we do not know.
    db::execute(
        "INSERT INTO orders (out_trade_no, openid, product_id, description, amount_fen, credits, status, \
         time_expire, appid, mchid, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'created', ?, ?, ?, ?, ?)",
        &[
            Value::Text(out_trade_no.clone()),
            Value::Text(openid.clone()),
            Value::Text(product.id.clone()),
            Value::Text(product.name.clone()),
            Value::Int(product.price_fen),
            Value::Int(product.credits),
            Value::Int(time_expire),
            Value::Text(appid),
            Value::Text(mchid),
            Value::Int(now),
            Value::Int(now),
        ],
    )
    .map_err(db_failure)?;
    let order = JsapiOrder {
        out_trade_no: out_trade_no.clone(),
        description: product.name.clone(),
        amount_fen: product.price_fen,
        payer_openid: openid,
        time_expire,
        attach: None,
        payer_client_ip: client_ip(req),
    };
    let prepared = wechat_pay::jsapi_prepay(&order)
        .and_then(|prepay_id| wechat_pay::jsapi_pay_params(&prepay_id).map(|params| (prepay_id, params)));
    let (prepay_id, params) = match prepared {
        Ok(p) => p,
        Err(e) => {
            // Never half-made: the order is failed, and says so.
            let _ = db::execute(
                "UPDATE orders SET status = 'failed', updated_at = ? WHERE out_trade_no = ? AND status = 'created'",
                &[Value::Int(now), Value::Text(out_trade_no.clone())],
            )
            .map_err(|e| log::log(Level::Error, &format!("marking order {out_trade_no} failed: {e:?}")));
            return Err(pay_failure(e));
        }
    };
    db::execute(
        "UPDATE orders SET status = 'pending', prepay_id = ?, updated_at = ? WHERE out_trade_no = ? AND status = 'created'",
        &[Value::Text(prepay_id), Value::Int(now), Value::Text(out_trade_no.clone())],
    )
    .map_err(db_failure)?;
    log::log(Level::Info, &format!("order {out_trade_no} created for product {}", product.id));
    Ok(reply(
        200,
        json!({
            "out_trade_no": out_trade_no,
            "product_id": product.id,
            "description": product.name,
            "amount_fen": product.price_fen,
            "credits": product.credits,
            "time_expire": time_expire,
            "pay_params": {
                "appId": params.app_id,
                "timeStamp": params.time_stamp,
                "nonceStr": params.nonce_str,
                "package": params.package,
                "signType": params.sign_type,
                "paySign": params.pay_sign,
            },
        }),
    ))
}

const ORDER_COLUMNS: &str = "out_trade_no, product_id, description, amount_fen, credits, status, transaction_id, \
                             paid_at, created_at, time_expire, updated_at";

/// Seconds between two checks of one pending order with WeChat Pay (the page polls).
const RECHECK_SECS: i64 = 3;

fn order_status(req: &Request, out_trade_no: &str) -> Answer {
    let openid = signed_in(req)?;
    let mut order = load_order(out_trade_no, &openid)?;
    let status = order["status"].as_str().unwrap_or_default().to_string();
    let stale = now() - order["updated_at"].as_i64().unwrap_or(0) >= RECHECK_SECS;
    if (status == "pending" || status == "created") && stale {
        reconcile(out_trade_no, &order);
        order = load_order(out_trade_no, &openid)?;
    }
    if let Some(o) = order.as_object_mut() {
        o.remove("updated_at");
    }
    Ok(reply(200, order))
}

/// Another user's order is indistinguishable from no order.
fn load_order(out_trade_no: &str, openid: &str) -> Result<Json, Response> {
    let rows = db::query(
        &format!("SELECT {ORDER_COLUMNS} FROM orders WHERE out_trade_no = ? AND openid = ?"),
        &[Value::Text(out_trade_no.into()), Value::Text(openid.into())],
    )
    .map_err(db_failure)?;
    let row = rows.rows.first().ok_or_else(|| failure(404, "not_found", "no such order"))?;
    let mut out = serde_json::Map::new();
    for (c, v) in rows.columns.iter().zip(row) {
        out.insert(c.clone(), to_json(v));
    }
    Ok(Json::Object(out))
}

/// Asks WeChat Pay about an unfinished order and applies what it says: paid →
/// the same exactly-once update as a notify; unpaid past its expiry → closed.
/// If WeChat Pay cannot be asked, the order stays as it is.
fn reconcile(out_trade_no: &str, order: &Json) {
    let now = now();
    let touch = || {
        let _ = db::execute(
            "UPDATE orders SET updated_at = ? WHERE out_trade_no = ? AND status IN ('created', 'pending')",
            &[Value::Int(now), Value::Text(out_trade_no.into())],
        );
    };
    let expired = order["time_expire"].as_i64().is_some_and(|t| t <= now);
    match wechat_pay::query_order(out_trade_no) {
        Ok(state) if state.trade_state == "SUCCESS" => {
            let paid = OrderPaid {
                out_trade_no: out_trade_no.into(),
                transaction_id: state.transaction_id.unwrap_or_default(),
                amount_fen: state.amount_fen.unwrap_or(-1),
                appid: state.appid,
                mchid: state.mchid,
                paid_at: state.success_time,
            };
            if let Err(e) = apply_paid(&paid) {
                log::log(
                    Level::Error,
                    &format!(
                        "order {out_trade_no}: WeChat Pay says paid but it was not applied: {}",
                        body_text(&e)
                    ),
                );
            }
        }
        Ok(state) if ["CLOSED", "REVOKED", "PAYERROR"].contains(&state.trade_state.as_str()) => {
            mark_closed(out_trade_no, now);
        }
        Ok(_) if expired => match wechat_pay::close_order(out_trade_no) {
            Ok(()) => mark_closed(out_trade_no, now),
            Err(e) => {
                log::log(Level::Warn, &format!("closing expired order {out_trade_no}: {e:?}"));
                touch();
            }
        },
        Err(PayError::Refused((code, _))) if code == "ORDER_NOT_EXIST" && expired => {
            mark_closed(out_trade_no, now)
        }
        Ok(_) | Err(PayError::Refused(_)) => touch(),
        Err(e) => {
            log::log(Level::Warn, &format!("order {out_trade_no}: WeChat Pay could not be asked: {e:?}"))
        }
    }
}

fn mark_closed(out_trade_no: &str, now: i64) {
    if let Err(e) = db::execute(
        "UPDATE orders SET status = 'closed', updated_at = ? WHERE out_trade_no = ? AND status IN ('created', 'pending')",
        &[Value::Int(now), Value::Text(out_trade_no.into())],
    ) {
        log::log(Level::Error, &format!("closing order {out_trade_no}: {e:?}"));
    }
}

/// WeChat Pay's notify as the web role received it: APIv3 (the `Wechatpay-*`
/// headers and the raw body) or APIv2 (the raw XML).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum Notified {
    V3 { timestamp: String, nonce: String, signature: String, serial: String, body: String },
    V2(String),
}

/// A notify: verified here with WeChat Pay's keys, then applied if it reports
/// a successful payment (anything else is acknowledged and changes nothing).
fn notified(n: Notified) -> Answer {
    let refused = |e: CryptoError| {
        let (status, code) = match e {
            CryptoError::Malformed(_) => (400, "malformed_notify"),
            CryptoError::NotConfigured(_) | CryptoError::Unavailable(_) => (503, "notify_unverifiable"),
            _ => (401, "forged_notify"),
        };
        log::log(Level::Warn, &format!("a payment notify passed on by the web role was refused: {e:?}"));
        failure(status, code, "the notify does not verify as WeChat Pay's")
    };
    let paid = match n {
        Notified::V3 { timestamp, nonce, signature, serial, body } => {
            let headers = PayNotifyHeaders { timestamp, nonce, signature, serial };
            let notify = callback_crypto::verify_pay_notify_v3(&headers, body.as_bytes()).map_err(refused)?;
            let resource: Json = serde_json::from_str(&notify.resource_json)
                .map_err(|_| failure(400, "malformed_notify", "the resource is not JSON"))?;
            if notify.event_type != "TRANSACTION.SUCCESS" || resource["trade_state"] != "SUCCESS" {
                return ignored(&format!("{} / {}", notify.event_type, resource["trade_state"]));
            }
            let text = |v: &Json| v.as_str().unwrap_or_default().to_string();
            OrderPaid {
                out_trade_no: text(&resource["out_trade_no"]),
                transaction_id: text(&resource["transaction_id"]),
                amount_fen: resource["amount"]["total"].as_i64().unwrap_or(-1),
                appid: text(&resource["appid"]),
                mchid: text(&resource["mchid"]),
                paid_at: resource["success_time"].as_str().and_then(rfc3339_unix),
            }
        }
        Notified::V2(xml) => {
            let fields = callback_crypto::verify_pay_notify_v2(&xml).map_err(refused)?;
            let get =
                |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone()).unwrap_or_default();
            if get("return_code") != "SUCCESS" || get("result_code") != "SUCCESS" {
                return ignored(&format!("{} / {}", get("return_code"), get("result_code")));
            }
            let amount_fen = get("total_fee")
                .parse()
                .map_err(|_| failure(400, "malformed_notify", "total_fee is not a number"))?;
            OrderPaid {
                out_trade_no: get("out_trade_no"),
                transaction_id: get("transaction_id"),
                amount_fen,
                appid: get("appid"),
                mchid: get("mch_id"),
                paid_at: None,
            }
        }
    };
    let outcome = apply_paid(&paid)?;
    // Applied vs duplicate, for the host's metrics.
    let what = if outcome["applied"] == true { "applied" } else { "duplicate" };
    let mut response = reply(200, outcome);
    response.headers.push(("x-wxhost-outcome".into(), what.into()));
    Ok(response)
}

fn ignored(what: &str) -> Answer {
    log::log(Level::Info, &format!("payment notify without a successful payment ({what}); acknowledged"));
    Ok(reply(200, json!({ "applied": false, "ignored": what })))
}

/// `2018-06-08T10:34:56+08:00` as Unix seconds (WeChat Pay's `success_time`).
fn rfc3339_unix(t: &str) -> Option<i64> {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderPaid {
    out_trade_no: String,
    transaction_id: String,
    /// What WeChat Pay says was paid, in fen.
    amount_fen: i64,
    appid: String,
    mchid: String,
    /// Unix seconds; now if absent.
    paid_at: Option<i64>,
}

/// WeChat Pay says an order is paid: in one transaction, lock the order, check
/// it against what WeChat Pay says, and (only if not already paid) mark it paid
/// and credit the user. However often this comes, the credit happens once.
fn apply_paid(p: &OrderPaid) -> Result<Json, Response> {
    let ok_id = |s: &str| {
        (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-|*@".contains(&b))
    };
    if !ok_id(&p.out_trade_no) || !ok_id(&p.transaction_id) {
        return Err(failure(
            400,
            "invalid_body",
            "out_trade_no and transaction_id must be 1-64 plain characters",
        ));
    }
    let tx = db::begin().map_err(db_failure)?;
    let lock = match db::dialect() {
        SqlDialect::Mysql => " FOR UPDATE",
        SqlDialect::Sqlite => "",
    };
    let rows = tx
        .query(
            &format!(
                "SELECT id, openid, amount_fen, credits, status, transaction_id, appid, mchid FROM orders WHERE out_trade_no = ?{lock}"
            ),
            &[Value::Text(p.out_trade_no.clone())],
        )
        .map_err(db_failure)?;
    let Some(row) = rows.rows.first() else {
        return Err(failure(404, "unknown_order", "no order has this out_trade_no"));
    };
    let (id, openid, amount, credits, status, paid_with, appid, mchid) = match &row[..] {
        [
            Value::Int(id),
            Value::Text(openid),
            Value::Int(amount),
            Value::Int(credits),
            Value::Text(status),
            paid_with,
            Value::Text(appid),
            Value::Text(mchid),
        ] => (*id, openid.clone(), *amount, *credits, status.clone(), text_of(paid_with), appid, mchid),
        _ => return Err(failure(500, "internal_error", "unexpected order row")),
    };
    if amount != p.amount_fen {
        return Err(failure(409, "amount_mismatch", "the paid amount is not the order's amount"));
    }
    // Orders placed before the merchant was recorded (migration 0004) have
    // none: WeChat Pay's signature is then the only check, as it was then.
    let recorded = !appid.is_empty() || !mchid.is_empty();
    if recorded && (*appid != p.appid || *mchid != p.mchid) {
        return Err(failure(409, "merchant_mismatch", "the payment is for another appid or mchid"));
    }
    if status == "paid" {
        drop(tx);
        let same = paid_with.as_deref() == Some(p.transaction_id.as_str());
        return Ok(json!({ "applied": false, "status": "paid", "same_transaction": same }));
    }
    let now = now();
    // A closed or failed order that WeChat Pay did take money for is still
    // credited: the user paid.
    tx.execute(
        "UPDATE orders SET status = 'paid', transaction_id = ?, paid_at = ?, updated_at = ? WHERE id = ? AND status <> 'paid'",
        &[Value::Text(p.transaction_id.clone()), Value::Int(p.paid_at.unwrap_or(now)), Value::Int(now), Value::Int(id)],
    )
    .map_err(|e| match e {
        db::Error::Constraint(_) => failure(409, "transaction_reused", "this transaction_id paid another order"),
        other => db_failure(other),
    })?;
    let credited = tx
        .execute(
            "UPDATE users SET quota = quota + ?, updated_at = ? WHERE openid = ?",
            &[Value::Int(credits), Value::Int(now), Value::Text(openid.clone())],
        )
        .map_err(db_failure)?;
    if credited.rows_affected != 1 {
        return Err(failure(409, "unknown_user", "the order's user does not exist"));
    }
    tx.commit().map_err(db_failure)?;
    log::log(Level::Info, &format!("order {} paid; {credits} credits", p.out_trade_no));
    Ok(json!({ "applied": true, "status": "paid", "credited": credits }))
}

/// The session's openid; a missing, forged, expired or revoked token is a 401.
fn signed_in(req: &Request) -> Result<String, Response> {
    let token = header(req, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| failure(401, "unauthorized", "sign in first"))?;
    session::verify(token).map(|s| s.openid).map_err(|e| match e {
        SessionError::Invalid => {
            failure(401, "invalid_session", "the session token is not valid; sign in again")
        }
        SessionError::Expired => failure(401, "session_expired", "the session has expired; sign in again"),
        SessionError::Revoked => failure(401, "session_revoked", "you signed out; sign in again"),
        SessionError::Unavailable(_) => failure(503, "unavailable", "sessions are unavailable; try again"),
    })
}

/// The payer's address as the reverse proxy saw it (APIv2 wants one).
fn client_ip(req: &Request) -> Option<String> {
    let ip = header(req, "x-real-ip")
        .or_else(|| header(req, "x-forwarded-for").and_then(|v| v.split(',').next()))
        .map(str::trim)?;
    ip.parse::<std::net::IpAddr>().ok().map(|ip| ip.to_string())
}

fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn pay_failure(e: PayError) -> Response {
    match e {
        PayError::Refused((code, message)) => {
            log::log(Level::Warn, &format!("WeChat Pay refused: {code}: {message}"));
            // WeChat Pay's message can describe the merchant's set-up: logged, not shown.
            failure(502, "payment_refused", "WeChat Pay refused the order; try again later")
        }
        PayError::Invalid(why) => {
            log::log(Level::Error, &format!("invalid WeChat Pay request: {why}"));
            failure(500, "internal_error", "the order could not be placed")
        }
        PayError::BadSignature => {
            failure(502, "payment_unavailable", "WeChat Pay's answer could not be trusted; try again")
        }
        PayError::Timeout => failure(504, "payment_timeout", "WeChat Pay did not answer in time; try again"),
        PayError::Unavailable(why) => {
            log::log(Level::Warn, &format!("WeChat Pay unavailable: {why}"));
            failure(502, "payment_unavailable", "WeChat Pay is not reachable; try again")
        }
        PayError::NotConfigured(why) => {
            log::log(Level::Error, &format!("WeChat Pay is not configured: {why}"));
            failure(503, "payment_not_configured", "payments are not available")
        }
    }
}

fn db_failure(e: db::Error) -> Response {
    let (status, code) = match e {
        db::Error::Unavailable(_) => (503, "database_unavailable"),
        _ => (500, "internal_error"),
    };
    log::log(Level::Error, &format!("database: {e:?}"));
    failure(status, code, "the database could not complete the request")
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| failure(400, "invalid_body", &format!("invalid JSON body: {e}")))
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::Null | Value::Blob(_) => Json::Null,
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Text(s) => json!(s),
    }
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::Text(s) => Some(s.clone()),
        _ => None,
    }
}

fn body_text(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("WASI random is available");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn failure(status: u16, code: &str, message: &str) -> Response {
    reply(status, json!({ "error": { "code": code, "message": message } }))
}

fn reply(status: u16, body: Json) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "application/json; charset=utf-8".into())],
        body: body.to_string().into_bytes(),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
