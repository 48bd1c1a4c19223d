//! App role plugin: payments, from the catalog to the credited quota.
//!
//! - `GET /api/v1/payment/products`: the catalog, defined server-side in this
//!   plugin's `[[plugins.config.products]]`. An order's price always comes
//!   from here, never from the client.
//! - `POST /api/v1/payment/create-order`: an order row and the order at WeChat
//!   Pay (signed by the host), paid the way the page can: `jsapi` (WeChat's
//!   browser: the pay parameters for WeixinJSBridge), `native` (a PC: the
//!   `code_url` the page draws as a QR code) or `h5` (a phone browser: the
//!   `h5_url` it goes to).
//! - `GET /api/v1/user/orders/{out_trade_no}/qrcode`: an unpaid Native order's
//!   `code_url` as an SVG QR code, drawn here (no outside service sees it).
//! - `PUT /api/v1/internal/payment/order/update`: the web role's notify plugin
//!   passes on WeChat Pay's notify as it came; it is verified again here
//!   (the web role's word, or its HMAC key, never credits money).
//! - `GET /api/v1/user/orders/{out_trade_no}`: the caller's order; a pending
//!   one is checked with WeChat Pay (a lost notify is caught here) and an
//!   unpaid one past its expiry is closed.
//!
//! - `POST /api/v1/admin/refunds`, `GET /api/v1/admin/refunds/{out_refund_no}`:
//!   refunds (see [`refund`]); their `REFUND.*` notify comes the way of the
//!   payment notify.
//!
//! - `POST /api/v1/internal/payment/reconcile` (`wxhost reconcile`): the
//!   day's books against WeChat Pay's trade bill (see [`bill`]).
//!
//! Notify, query and the bill all mark an order paid through [`apply_paid`]: one
//! transaction, the order locked, checked against what WeChat Pay says, and
//! the quota credited only if the order was not paid already.

use serde::{Deserialize, Serialize};
use wxhost_ledger::{Cause, Change, Refused};
use wxhost_sdk::callback_crypto::{self, CryptoError, PayNotifyHeaders};
use wxhost_sdk::config;
use wxhost_sdk::db::{self, DbError, params};
use wxhost_sdk::prelude::*;
use wxhost_sdk::session;
use wxhost_sdk::wechat_pay::{self, BrowserOrder, JsapiOrder, PayError};

mod bill;
mod message;
mod refund;

fn routes() -> Router {
    Router::new()
        .get("/api/v1/payment/products", products)
        .post("/api/v1/payment/create-order", create_order)
        .get("/api/v1/user/orders/{out_trade_no}", order_status)
        .get("/api/v1/user/orders/{out_trade_no}/qrcode", order_qrcode)
        .put("/api/v1/internal/payment/order/update", notified)
        .post("/api/v1/admin/refunds", refund::create)
        .get("/api/v1/admin/refunds/{out_refund_no}", refund::show)
        .post("/api/v1/internal/payment/messages/deliver", message::deliver)
        .post("/api/v1/internal/payment/reconcile", bill::reconcile_day)
}

wxhost_sdk::plugin!(routes);

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

fn products(_: &Request) -> Result<Response> {
    Ok(Response::json(200, &json!({ "products": catalog()? })))
}

/// The catalog, checked: unique ids, positive prices, non-negative credits.
/// A broken catalog is an error, never a guessed price.
fn catalog() -> Result<Vec<Product>> {
    check_catalog().map_err(|why| {
        log::error(&format!("the product catalog in plugins.toml is invalid: {why}"));
        Error::new(500, "catalog_invalid", "the catalog is not available")
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
    #[serde(default)]
    trade_type: TradeType,
}

/// How the page pays.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum TradeType {
    /// Inside WeChat's browser.
    #[default]
    Jsapi,
    /// A PC browser: a QR code the payer scans with WeChat.
    Native,
    /// A phone browser outside WeChat.
    H5,
}

impl TradeType {
    fn name(self) -> &'static str {
        match self {
            TradeType::Jsapi => "jsapi",
            TradeType::Native => "native",
            TradeType::H5 => "h5",
        }
    }
}

/// What the page pays a placed order with.
enum Prepared {
    Jsapi { prepay_id: String, params: wechat_pay::PayParams },
    Native { code_url: String },
    H5 { h5_url: String },
}

/// Places the order at WeChat Pay the way `trade_type` pays.
fn place(req: &Request, trade_type: TradeType, order: &OrderToPlace) -> Result<Prepared, PayError> {
    let client_ip = req.client_ip().map(str::to_string);
    match trade_type {
        TradeType::Jsapi => {
            let order = JsapiOrder {
                out_trade_no: order.out_trade_no.clone(),
                description: order.description.clone(),
                amount_fen: order.amount_fen,
                payer_openid: order.openid.clone(),
                time_expire: order.time_expire,
                attach: None,
                payer_client_ip: client_ip,
            };
            let prepay_id = wechat_pay::jsapi_prepay(&order)?;
            let params = wechat_pay::jsapi_pay_params(&prepay_id)?;
            Ok(Prepared::Jsapi { prepay_id, params })
        }
        TradeType::Native | TradeType::H5 => {
            let order = BrowserOrder {
                out_trade_no: order.out_trade_no.clone(),
                description: order.description.clone(),
                amount_fen: order.amount_fen,
                time_expire: order.time_expire,
                attach: None,
                payer_client_ip: client_ip,
            };
            if trade_type == TradeType::Native {
                Ok(Prepared::Native { code_url: wechat_pay::native_prepay(&order)? })
            } else {
                Ok(Prepared::H5 { h5_url: wechat_pay::h5_prepay(&order)? })
            }
        }
    }
}

struct OrderToPlace {
    out_trade_no: String,
    openid: String,
    description: String,
    amount_fen: i64,
    time_expire: i64,
}

fn create_order(req: &Request) -> Result<Response> {
    let openid = session::signed_in(req)?;
    let wanted: CreateOrder = req.json()?;
    let product = catalog()?
        .into_iter()
        .find(|p| p.id == wanted.product_id)
        .ok_or_else(|| Error::bad_request("unknown_product", "no product has this id"))?;
    let (appid, mchid) = wechat_pay::merchant()?;
    let now = now();
    let out_trade_no = format!("{now}{}", random_hex(8));
    let time_expire = now + order_ttl_secs();
    // The row exists before WeChat Pay hears of the order, so a notify can never
    // arrive for an order we do not know.
    db::execute(
        "INSERT INTO orders (out_trade_no, openid, product_id, description, amount_fen, credits, status, \
         time_expire, appid, mchid, trade_type, created_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, 'created', ?, ?, ?, ?, ?, ?)",
        params![
            &out_trade_no,
            &openid,
            &product.id,
            &product.name,
            product.price_fen,
            product.credits,
            time_expire,
            appid,
            mchid,
            wanted.trade_type.name(),
            now,
            now
        ],
    )?;
    let to_place = OrderToPlace {
        out_trade_no: out_trade_no.clone(),
        openid,
        description: product.name.clone(),
        amount_fen: product.price_fen,
        time_expire,
    };
    let prepared = match place(req, wanted.trade_type, &to_place) {
        Ok(p) => p,
        Err(e) => {
            // Never half-made: the order is failed, and says so.
            let _ = db::execute(
                "UPDATE orders SET status = 'failed', updated_at = ? WHERE out_trade_no = ? AND status = 'created'",
                params![now, &out_trade_no],
            )
            .map_err(|e| log::error(&format!("marking order {out_trade_no} failed: {e:?}")));
            return Err(e.into());
        }
    };
    let (prepay_id, pay_url) = match &prepared {
        Prepared::Jsapi { prepay_id, .. } => (Some(prepay_id.as_str()), None),
        Prepared::Native { code_url } => (None, Some(code_url.as_str())),
        Prepared::H5 { h5_url } => (None, Some(h5_url.as_str())),
    };
    db::execute(
        "UPDATE orders SET status = 'pending', prepay_id = ?, pay_url = ?, updated_at = ? \
         WHERE out_trade_no = ? AND status = 'created'",
        params![prepay_id, pay_url, now, &out_trade_no],
    )?;
    log::info(&format!(
        "order {out_trade_no} created for product {} ({})",
        product.id,
        wanted.trade_type.name()
    ));
    let mut answer = json!({
        "out_trade_no": out_trade_no,
        "product_id": product.id,
        "description": product.name,
        "amount_fen": product.price_fen,
        "credits": product.credits,
        "time_expire": time_expire,
        "trade_type": wanted.trade_type.name(),
    });
    match prepared {
        Prepared::Jsapi { params, .. } => {
            answer["pay_params"] = json!({
                "appId": params.app_id,
                "timeStamp": params.time_stamp,
                "nonceStr": params.nonce_str,
                "package": params.package,
                "signType": params.sign_type,
                "paySign": params.pay_sign,
            })
        }
        Prepared::Native { code_url } => answer["code_url"] = json!(code_url),
        Prepared::H5 { h5_url } => answer["h5_url"] = json!(h5_url),
    }
    Ok(Response::json(200, &answer))
}

const ORDER_COLUMNS: &str = "out_trade_no, product_id, description, amount_fen, credits, status, transaction_id, \
                             paid_at, created_at, time_expire, trade_type, pay_url, refunded_fen, updated_at";

/// Seconds between two checks of one pending order with WeChat Pay (the page polls).
const RECHECK_SECS: i64 = 3;

fn order_status(req: &Request) -> Result<Response> {
    let out_trade_no = req.param("out_trade_no")?;
    let openid = session::signed_in(req)?;
    let mut order = load_order(out_trade_no, &openid)?;
    let status = order["status"].as_str().unwrap_or_default().to_string();
    let stale = now() - order["updated_at"].as_i64().unwrap_or(0) >= RECHECK_SECS;
    if (status == "pending" || status == "created") && stale {
        reconcile(out_trade_no, &order);
        order = load_order(out_trade_no, &openid)?;
    }
    let refunds = db::query(
        "SELECT out_refund_no, amount_fen, status, succeeded_at, created_at FROM refunds \
         WHERE out_trade_no = ? ORDER BY created_at, id",
        params![out_trade_no],
    )?;
    if let Some(o) = order.as_object_mut() {
        o.remove("updated_at");
        o.insert("refunds".into(), Json::Array(refunds.to_json()));
    }
    Ok(Response::json(200, &order))
}

/// The QR code a PC page shows for an unpaid Native order: its `code_url`,
/// which the payer scans with WeChat.
fn order_qrcode(req: &Request) -> Result<Response> {
    let out_trade_no = req.param("out_trade_no")?;
    let openid = session::signed_in(req)?;
    let order = load_order(out_trade_no, &openid)?;
    let code_url = match (order["trade_type"].as_str(), order["status"].as_str(), order["pay_url"].as_str()) {
        (Some("native"), Some("pending"), Some(code_url)) => code_url.to_string(),
        (Some("native"), _, _) => {
            return Err(Error::conflict("order_not_payable", "the order is no longer waiting for payment"));
        }
        _ => return Err(Error::conflict("not_native", "only a Native order has a QR code")),
    };
    let code = qrcode::QrCode::new(code_url.as_bytes()).map_err(|e| {
        log::error(&format!("order {out_trade_no}: its code_url does not fit a QR code: {e}"));
        Error::new(500, "qrcode_failed", "the QR code could not be drawn")
    })?;
    let svg =
        code.render::<qrcode::render::svg::Color<'_>>().min_dimensions(240, 240).quiet_zone(true).build();
    Ok(Response::with_body(200, "image/svg+xml", svg.into_bytes()).header("cache-control", "no-store"))
}

/// Another user's order is indistinguishable from no order.
fn load_order(out_trade_no: &str, openid: &str) -> Result<Json> {
    let rows = db::query(
        &format!("SELECT {ORDER_COLUMNS} FROM orders WHERE out_trade_no = ? AND openid = ?"),
        params![out_trade_no, openid],
    )?;
    Ok(rows.first_or_404("order")?.to_json())
}

/// Asks WeChat Pay about an unfinished order and applies what it says: paid →
/// the same exactly-once update as a notify; unpaid past its expiry → closed.
/// If WeChat Pay cannot be asked, the order stays as it is.
pub(crate) fn reconcile(out_trade_no: &str, order: &Json) {
    let now = now();
    let touch = || {
        let _ = db::execute(
            "UPDATE orders SET updated_at = ? WHERE out_trade_no = ? AND status IN ('created', 'pending')",
            params![now, out_trade_no],
        );
    };
    let expired = order["time_expire"].as_i64().is_some_and(|t| t <= now);
    match wechat_pay::query_order(out_trade_no) {
        Ok(state) if state.trade_state == "SUCCESS" => {
            if let Err(e) = apply_paid(&OrderPaid::of_query(out_trade_no, state)) {
                log::error(&format!(
                    "order {out_trade_no}: WeChat Pay says paid but it was not applied: {e}"
                ));
            }
        }
        Ok(state) if ["CLOSED", "REVOKED", "PAYERROR"].contains(&state.trade_state.as_str()) => {
            mark_closed(out_trade_no, now);
        }
        Ok(_) if expired => match wechat_pay::close_order(out_trade_no) {
            Ok(()) => mark_closed(out_trade_no, now),
            Err(e) => {
                log::warn(&format!("closing expired order {out_trade_no}: {e:?}"));
                touch();
            }
        },
        Err(PayError::Refused((code, _))) if code == "ORDER_NOT_EXIST" && expired => {
            mark_closed(out_trade_no, now)
        }
        Ok(_) | Err(PayError::Refused(_)) => touch(),
        Err(e) => log::warn(&format!("order {out_trade_no}: WeChat Pay could not be asked: {e:?}")),
    }
}

fn mark_closed(out_trade_no: &str, now: i64) {
    if let Err(e) = db::execute(
        "UPDATE orders SET status = 'closed', updated_at = ? WHERE out_trade_no = ? AND status IN ('created', 'pending')",
        params![now, out_trade_no],
    ) {
        log::error(&format!("closing order {out_trade_no}: {e:?}"));
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
fn notified(req: &Request) -> Result<Response> {
    let n: Notified = req.json()?;
    let refused = |e: CryptoError| {
        let (status, code) = match e {
            CryptoError::Malformed(_) => (400, "malformed_notify"),
            CryptoError::NotConfigured(_) | CryptoError::Unavailable(_) => (503, "notify_unverifiable"),
            _ => (401, "forged_notify"),
        };
        log::warn(&format!("a payment notify passed on by the web role was refused: {e:?}"));
        Error::new(status, code, "the notify does not verify as WeChat Pay's")
    };
    let paid = match n {
        Notified::V3 { timestamp, nonce, signature, serial, body } => {
            let headers = PayNotifyHeaders { timestamp, nonce, signature, serial };
            let notify = callback_crypto::verify_pay_notify_v3(&headers, body.as_bytes()).map_err(refused)?;
            let resource: Json = serde_json::from_str(&notify.resource_json)
                .map_err(|_| Error::bad_request("malformed_notify", "the resource is not JSON"))?;
            if notify.event_type.starts_with("REFUND.") {
                let applied = refund::apply(&refund::state_of_resource(&resource))?;
                let what = if applied { "refund_applied" } else { "refund_duplicate" };
                return Ok(Response::json(200, &json!({ "applied": applied })).outcome(what));
            }
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
        // A refund's notify is sealed (`req_info`), not signed.
        Notified::V2(xml) if xml.contains("<req_info>") => {
            let fields = callback_crypto::open_refund_notify_v2(&xml).map_err(refused)?;
            let applied = refund::apply(&refund::state_of_v2_fields(&fields))?;
            let what = if applied { "refund_applied" } else { "refund_duplicate" };
            return Ok(Response::json(200, &json!({ "applied": applied })).outcome(what));
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
                .map_err(|_| Error::bad_request("malformed_notify", "total_fee is not a number"))?;
            OrderPaid {
                out_trade_no: get("out_trade_no"),
                transaction_id: get("transaction_id"),
                amount_fen,
                appid: get("appid"),
                mchid: get("mch_id"),
                // `time_end`: when WeChat Pay took the money (its bill's time too).
                paid_at: v2_time_unix(&get("time_end")),
            }
        }
    };
    let outcome = apply_paid(&paid)?;
    // Applied vs duplicate, for the host's metrics.
    let what = if outcome["applied"] == true { "applied" } else { "duplicate" };
    Ok(Response::json(200, &outcome).outcome(what))
}

fn ignored(what: &str) -> Result<Response> {
    log::info(&format!("payment notify without a successful payment ({what}); acknowledged"));
    Ok(Response::json(200, &json!({ "applied": false, "ignored": what })).outcome("ignored"))
}

/// `2018-06-08T10:34:56+08:00` as Unix seconds (WeChat Pay's `success_time`).
pub(crate) fn rfc3339_unix(t: &str) -> Option<i64> {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// APIv2's `yyyyMMddHHmmss` (China Standard Time) as Unix seconds.
fn v2_time_unix(t: &str) -> Option<i64> {
    let format = time::macros::format_description!("[year][month][day][hour][minute][second]");
    time::PrimitiveDateTime::parse(t, format)
        .ok()
        .map(|t| t.assume_offset(time::macros::offset!(+8)).unix_timestamp())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OrderPaid {
    out_trade_no: String,
    transaction_id: String,
    /// What WeChat Pay says was paid, in fen.
    amount_fen: i64,
    appid: String,
    mchid: String,
    /// Unix seconds; now if absent.
    paid_at: Option<i64>,
}

impl OrderPaid {
    /// What WeChat Pay's signed answer to `query-order` says was paid.
    pub(crate) fn of_query(out_trade_no: &str, state: wechat_pay::OrderState) -> OrderPaid {
        OrderPaid {
            out_trade_no: out_trade_no.into(),
            transaction_id: state.transaction_id.unwrap_or_default(),
            amount_fen: state.amount_fen.unwrap_or(-1),
            appid: state.appid,
            mchid: state.mchid,
            paid_at: state.success_time,
        }
    }
}

/// WeChat Pay says an order is paid: in one transaction, lock the order, check
/// it against what WeChat Pay says, and (only if not already paid) mark it paid
/// and credit the user. However often this comes, the credit happens once.
pub(crate) fn apply_paid(p: &OrderPaid) -> Result<Json> {
    let ok_id = |s: &str| {
        (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-|*@".contains(&b))
    };
    if !ok_id(&p.out_trade_no) || !ok_id(&p.transaction_id) {
        return Err(Error::bad_request(
            "invalid_body",
            "out_trade_no and transaction_id must be 1-64 plain characters",
        ));
    }
    let tx = db::begin()?;
    let rows = tx.query(
        &format!(
            "SELECT id, openid, amount_fen, credits, status, transaction_id, appid, mchid, description FROM orders \
             WHERE out_trade_no = ?{}",
            db::for_update()
        ),
        params![&p.out_trade_no],
    )?;
    let row =
        rows.first().ok_or_else(|| Error::new(404, "unknown_order", "no order has this out_trade_no"))?;
    let (id, openid, amount, credits): (i64, String, i64, i64) =
        (row.get("id")?, row.get("openid")?, row.get("amount_fen")?, row.get("credits")?);
    let (status, paid_with, appid, mchid): (String, Option<String>, String, String) =
        (row.get("status")?, row.get("transaction_id")?, row.get("appid")?, row.get("mchid")?);
    if amount != p.amount_fen {
        return Err(Error::conflict("amount_mismatch", "the paid amount is not the order's amount"));
    }
    // Orders placed before the merchant was recorded (migration 0004) have
    // none: WeChat Pay's signature is then the only check, as it was then.
    let recorded = !appid.is_empty() || !mchid.is_empty();
    if recorded && (appid != p.appid || mchid != p.mchid) {
        return Err(Error::conflict("merchant_mismatch", "the payment is for another appid or mchid"));
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
        params![&p.transaction_id, p.paid_at.unwrap_or(now), now, id],
    )
    .map_err(|e| match e {
        DbError::Constraint(_) => Error::conflict("transaction_reused", "this transaction_id paid another order"),
        other => other.into(),
    })?;
    if credits > 0 {
        let credit = Change {
            openid: &openid,
            delta: credits,
            cause: Cause::Order,
            reference: Some(&p.out_trade_no),
            description: "",
        };
        match wxhost_ledger::change(&tx, &credit) {
            Ok(_) => {}
            Err(Refused::UnknownUser | Refused::Insufficient { .. }) => {
                return Err(Error::conflict("unknown_user", "the order's user does not exist"));
            }
            Err(Refused::Db(e)) => return Err(e),
        }
    }
    let description: String = row.get("description")?;
    message::enqueue(
        &tx,
        &message::Credited {
            openid: &openid,
            out_trade_no: &p.out_trade_no,
            description: &description,
            amount_fen: amount,
            credits,
            paid_at: p.paid_at.unwrap_or(now),
        },
    )?;
    tx.commit()?;
    log::info(&format!("order {} paid; {credits} credits", p.out_trade_no));
    Ok(json!({ "applied": true, "status": "paid", "credited": credits }))
}
