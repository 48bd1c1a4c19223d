//! The simulator's WeChat Pay side (what api.mch.weixin.qq.com does): JSAPI
//! orders, order query and close, in APIv3 (the merchant's request signature
//! checked, answers signed with the platform key) and APIv2 (XML and `sign`).
//! Paying an order sends the signed notify (APIv3: AES-256-GCM resource;
//! APIv2: signed XML) to the order's `notify_url`, repeated on WeChat Pay's
//! retry schedule (compressed by `retry_scale`) until it is acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rsa::RsaPublicKey;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Sim, now, openid_of, random_hex};
use crate::caps::callback_crypto::flat_xml;
use crate::caps::wechat_pay::{random_token, to_xml};
use crate::pay_crypto::{RsaSigner, V2SignType, rsa_verify, signed_message, v2_sign, v3_encrypt};

/// WeChat Pay's notify retry schedule (seconds after the previous attempt).
pub const RETRY_SCHEDULE_SECS: [u64; 15] =
    [15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600, 10800, 10800, 10800, 21600, 21600];

/// The merchant the simulated WeChat Pay knows, and its own platform key.
pub struct SimPayConfig {
    pub appid: String,
    pub mchid: String,
    /// Checks the merchant's APIv3 request signatures.
    pub merchant_public_key: RsaPublicKey,
    pub merchant_serial: String,
    /// Signs answers and notifies.
    pub platform_key: RsaSigner,
    /// The id answers and notifies are signed under (`Wechatpay-Serial`).
    pub platform_key_id: String,
    pub apiv3_key: [u8; 32],
    pub apiv2_key: Option<String>,
    /// 1.0 = WeChat Pay's real retry schedule; 0.001 turns 15 s into 15 ms.
    pub retry_scale: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    V3,
    V2(V2SignType),
}

struct SimOrder {
    api: Api,
    appid: String,
    mchid: String,
    description: String,
    total: i64,
    openid: String,
    notify_url: String,
    time_expire: i64,
    attach: Option<String>,
    prepay_id: String,
    /// NOTPAY, SUCCESS, CLOSED.
    state: &'static str,
    transaction_id: Option<String>,
    success_time: Option<i64>,
    /// Status of every notify delivery, in order.
    deliveries: Vec<u16>,
    acknowledged: bool,
}

#[derive(Default)]
pub(super) struct PayData {
    orders: HashMap<String, SimOrder>,
    by_prepay_id: HashMap<String, String>,
    notifies_sent: u64,
}

pub(super) type SharedPay = Arc<Mutex<PayData>>;

pub(super) fn routes() -> axum::Router<Sim> {
    axum::Router::new()
        .route("/v3/pay/transactions/jsapi", post(v3_jsapi))
        .route("/v3/pay/transactions/out-trade-no/{no}", get(v3_query))
        .route("/v3/pay/transactions/out-trade-no/{no}/close", post(v3_close))
        .route("/pay/unifiedorder", post(v2_unifiedorder))
        .route("/pay/orderquery", post(v2_orderquery))
        .route("/pay/closeorder", post(v2_closeorder))
        .route("/sim/pay", post(pay))
        .route("/sim/pay/notify", post(redeliver))
        .route("/sim/pay/notify-request", post(notify_request))
        .route("/sim/pay/orders/{no}", get(inspect))
}

fn pay_config(sim: &Sim) -> Option<&SimPayConfig> {
    sim.pay_config.as_deref()
}

// ---------------------------------------------------------------- APIv3

fn v3_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "code": code, "message": message }))).into_response()
}

/// An answer signed with the platform key, as WeChat Pay signs its answers.
fn v3_signed(config: &SimPayConfig, status: StatusCode, body: Option<Value>) -> Response {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let timestamp = now().to_string();
    let nonce = random_token(32);
    let signature = config.platform_key.sign(&signed_message(&timestamp, &nonce, body.as_bytes()));
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    let mut set = |k: &'static str, v: &str| {
        h.insert(k, v.parse().expect("header value"));
    };
    set("content-type", "application/json");
    set("wechatpay-timestamp", &timestamp);
    set("wechatpay-nonce", &nonce);
    set("wechatpay-signature", &signature);
    set("wechatpay-serial", &config.platform_key_id);
    set("request-id", &random_hex(16));
    response
}

/// Checks the merchant's `WECHATPAY2-SHA256-RSA2048` Authorization.
fn check_authorization(
    config: &SimPayConfig,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Box<Response>> {
    let refuse = |why: &str| Err(Box::new(v3_error(StatusCode::UNAUTHORIZED, "SIGN_ERROR", why)));
    let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return refuse("Authorization is missing");
    };
    let Some(params) = auth.strip_prefix("WECHATPAY2-SHA256-RSA2048 ") else {
        return refuse("unknown Authorization scheme");
    };
    let fields: HashMap<&str, &str> = params
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
        .collect();
    let field = |k: &str| fields.get(k).copied().unwrap_or_default();
    if field("mchid") != config.mchid {
        return refuse("mchid does not match");
    }
    if field("serial_no") != config.merchant_serial {
        return refuse("serial_no is not the merchant certificate's");
    }
    let timestamp: i64 = field("timestamp").parse().unwrap_or(0);
    if now().abs_diff(timestamp) >= 300 {
        return refuse("timestamp is too far from now");
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut message = format!("{method}\n{path}\n{timestamp}\n{}\n", field("nonce_str")).into_bytes();
    message.extend_from_slice(body);
    message.push(b'\n');
    if !rsa_verify(&config.merchant_public_key, &message, field("signature")) {
        return refuse("signature does not verify");
    }
    Ok(())
}

/// What every APIv3 handler does first: configured, up, signed by the merchant.
async fn v3_gate(
    sim: &Sim,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Box<Response>> {
    let Some(config) = pay_config(sim) else {
        return Err(Box::new(v3_error(
            StatusCode::NOT_FOUND,
            "NOT_ENABLED",
            "the simulator has no WeChat Pay merchant",
        )));
    };
    if sim.gate(None).await.is_err() {
        return Err(Box::new(v3_error(StatusCode::SERVICE_UNAVAILABLE, "SYSTEM_ERROR", "system error")));
    }
    check_authorization(config, method, uri, headers, body)
}

async fn v3_jsapi(
    State(sim): State<Sim>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = v3_gate(&sim, &method, &uri, &headers, &body).await {
        return *r;
    }
    let config = pay_config(&sim).expect("gated");
    let Ok(o) = serde_json::from_slice::<Value>(&body) else {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "the body is not JSON");
    };
    let text = |k: &str| o[k].as_str().map(str::to_string);
    let (Some(appid), Some(mchid), Some(description), Some(no), Some(expire), Some(notify_url)) = (
        text("appid"),
        text("mchid"),
        text("description"),
        text("out_trade_no"),
        text("time_expire"),
        text("notify_url"),
    ) else {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "a required field is missing");
    };
    let (Some(total), Some(openid)) = (o["amount"]["total"].as_i64(), o["payer"]["openid"].as_str()) else {
        return v3_error(
            StatusCode::BAD_REQUEST,
            "PARAM_ERROR",
            "amount.total and payer.openid are required",
        );
    };
    if appid != config.appid || mchid != config.mchid {
        return v3_error(StatusCode::BAD_REQUEST, "APPID_MCHID_NOT_MATCH", "appid and mchid do not match");
    }
    let Ok(expire) = time::OffsetDateTime::parse(&expire, &time::format_description::well_known::Rfc3339)
    else {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "time_expire is not RFC 3339");
    };
    let order = NewOrder {
        api: Api::V3,
        appid,
        mchid,
        description,
        no,
        total,
        openid: openid.to_string(),
        notify_url,
        time_expire: expire.unix_timestamp(),
        attach: text("attach"),
    };
    match sim.place_order(order) {
        Ok(prepay_id) => v3_signed(config, StatusCode::OK, Some(json!({ "prepay_id": prepay_id }))),
        Err((code, message)) => v3_error(StatusCode::BAD_REQUEST, code, message),
    }
}

#[derive(Deserialize)]
struct MchidQuery {
    mchid: Option<String>,
}

async fn v3_query(
    State(sim): State<Sim>,
    Path(no): Path<String>,
    axum::extract::Query(q): axum::extract::Query<MchidQuery>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = v3_gate(&sim, &method, &uri, &headers, b"").await {
        return *r;
    }
    let config = pay_config(&sim).expect("gated");
    if q.mchid.as_deref() != Some(config.mchid.as_str()) {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "mchid is missing or wrong");
    }
    let pay = sim.pay.lock().expect("sim pay lock");
    let Some(o) = pay.orders.get(&no) else {
        return v3_error(StatusCode::NOT_FOUND, "ORDER_NOT_EXIST", "订单不存在");
    };
    v3_signed(config, StatusCode::OK, Some(transaction_json(&no, o)))
}

/// The transaction as WeChat Pay describes it (query answers and notify resources).
fn transaction_json(no: &str, o: &SimOrder) -> Value {
    let mut t = json!({
        "appid": o.appid,
        "mchid": o.mchid,
        "out_trade_no": no,
        "trade_type": "JSAPI",
        "trade_state": o.state,
        "trade_state_desc": match o.state { "SUCCESS" => "支付成功", "CLOSED" => "已关闭", _ => "未支付" },
        "payer": { "openid": o.openid },
        "amount": { "total": o.total, "currency": "CNY" },
    });
    if let Some(id) = &o.transaction_id {
        t["transaction_id"] = json!(id);
        t["bank_type"] = json!("OTHERS");
        t["amount"]["payer_total"] = json!(o.total);
        t["amount"]["payer_currency"] = json!("CNY");
    }
    if let Some(at) = o.success_time {
        t["success_time"] = json!(rfc3339_cst(at));
    }
    if let Some(a) = &o.attach {
        t["attach"] = json!(a);
    }
    t
}

async fn v3_close(
    State(sim): State<Sim>,
    Path(no): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = v3_gate(&sim, &method, &uri, &headers, &body).await {
        return *r;
    }
    let config = pay_config(&sim).expect("gated");
    match sim.close(&no) {
        Ok(()) => v3_signed(config, StatusCode::NO_CONTENT, None),
        Err((code, message)) => v3_error(StatusCode::BAD_REQUEST, code, message),
    }
}

// ---------------------------------------------------------------- APIv2

fn v2_fail(message: &str) -> Response {
    xml_response(format!(
        "<xml><return_code>FAIL</return_code><return_msg>{}</return_msg></xml>",
        quick_xml::escape::escape(message)
    ))
}

fn xml_response(xml: String) -> Response {
    ([("content-type", "text/xml; charset=utf-8")], xml).into_response()
}

/// A signed APIv2 answer: return SUCCESS, then the result fields.
fn v2_answer(
    config: &SimPayConfig,
    key: &str,
    sign_type: V2SignType,
    result: Vec<(&str, String)>,
) -> Response {
    let mut fields: Vec<(String, String)> = vec![
        ("return_code".into(), "SUCCESS".into()),
        ("return_msg".into(), "OK".into()),
        ("appid".into(), config.appid.clone()),
        ("mch_id".into(), config.mchid.clone()),
        ("nonce_str".into(), random_token(32)),
    ];
    fields.extend(result.into_iter().map(|(k, v)| (k.to_string(), v)));
    let sign = v2_sign(&fields, key, sign_type);
    fields.push(("sign".into(), sign));
    xml_response(to_xml(&fields))
}

/// Parses and checks an APIv2 request: configured, up, appid/mch_id, `sign`.
async fn v2_gate(
    sim: &Sim,
    body: &[u8],
) -> Result<(HashMap<String, String>, V2SignType, String), Box<Response>> {
    let Some(config) = pay_config(sim) else {
        return Err(Box::new(v2_fail("the simulator has no WeChat Pay merchant")));
    };
    let Some(key) = config.apiv2_key.clone() else {
        return Err(Box::new(v2_fail("the merchant has no APIv2 key")));
    };
    if sim.gate(None).await.is_err() {
        return Err(Box::new((StatusCode::SERVICE_UNAVAILABLE, "system error").into_response()));
    }
    let xml = std::str::from_utf8(body).map_err(|_| Box::new(v2_fail("the body is not UTF-8")))?;
    let list = flat_xml(xml).map_err(|_| Box::new(v2_fail("XML格式错误")))?;
    let fields: HashMap<String, String> = list.iter().cloned().collect();
    let sign_type = V2SignType::parse(fields.get("sign_type").map(String::as_str))
        .ok_or_else(|| Box::new(v2_fail("sign_type is unknown")))?;
    let expected = v2_sign(&list, &key, sign_type);
    if fields.get("sign").map(|s| s.to_ascii_uppercase()) != Some(expected) {
        return Err(Box::new(v2_fail("签名错误")));
    }
    if fields.get("appid") != Some(&config.appid) || fields.get("mch_id") != Some(&config.mchid) {
        return Err(Box::new(v2_fail("appid和mch_id不匹配")));
    }
    Ok((fields, sign_type, key))
}

fn v2_result_fail(config: &SimPayConfig, key: &str, t: V2SignType, code: &str, message: &str) -> Response {
    v2_answer(
        config,
        key,
        t,
        vec![("result_code", "FAIL".into()), ("err_code", code.into()), ("err_code_des", message.into())],
    )
}

async fn v2_unifiedorder(State(sim): State<Sim>, body: Bytes) -> Response {
    let (f, sign_type, key) = match v2_gate(&sim, &body).await {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let config = pay_config(&sim).expect("gated");
    let get = |k: &str| f.get(k).cloned();
    let (Some(description), Some(no), Some(total), Some(openid), Some(notify_url)) =
        (get("body"), get("out_trade_no"), get("total_fee"), get("openid"), get("notify_url"))
    else {
        return v2_fail("缺少参数");
    };
    let Ok(total) = total.parse::<i64>() else { return v2_fail("total_fee must be a number") };
    let time_expire = get("time_expire").and_then(|t| parse_v2_time(&t)).unwrap_or(now() + 7200);
    let order = NewOrder {
        api: Api::V2(sign_type),
        appid: config.appid.clone(),
        mchid: config.mchid.clone(),
        description,
        no,
        total,
        openid,
        notify_url,
        time_expire,
        attach: get("attach"),
    };
    match sim.place_order(order) {
        Ok(prepay_id) => v2_answer(
            config,
            &key,
            sign_type,
            vec![("result_code", "SUCCESS".into()), ("trade_type", "JSAPI".into()), ("prepay_id", prepay_id)],
        ),
        Err((code, message)) => v2_result_fail(config, &key, sign_type, &v2_code_of(code), message),
    }
}

async fn v2_orderquery(State(sim): State<Sim>, body: Bytes) -> Response {
    let (f, sign_type, key) = match v2_gate(&sim, &body).await {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let config = pay_config(&sim).expect("gated");
    let no = f.get("out_trade_no").cloned().unwrap_or_default();
    let pay = sim.pay.lock().expect("sim pay lock");
    let Some(o) = pay.orders.get(&no) else {
        return v2_result_fail(config, &key, sign_type, "ORDERNOTEXIST", "此交易订单号不存在");
    };
    let mut result = vec![
        ("result_code", "SUCCESS".to_string()),
        ("out_trade_no", no.clone()),
        ("openid", o.openid.clone()),
        ("trade_type", "JSAPI".into()),
        ("trade_state", o.state.to_string()),
        ("total_fee", o.total.to_string()),
    ];
    if let Some(id) = &o.transaction_id {
        result.push(("transaction_id", id.clone()));
    }
    if let Some(at) = o.success_time {
        result.push(("time_end", v2_time(at)));
    }
    v2_answer(config, &key, sign_type, result)
}

async fn v2_closeorder(State(sim): State<Sim>, body: Bytes) -> Response {
    let (f, sign_type, key) = match v2_gate(&sim, &body).await {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let config = pay_config(&sim).expect("gated");
    match sim.close(f.get("out_trade_no").map(String::as_str).unwrap_or_default()) {
        Ok(()) => v2_answer(config, &key, sign_type, vec![("result_code", "SUCCESS".into())]),
        Err((code, message)) => v2_result_fail(config, &key, sign_type, &v2_code_of(code), message),
    }
}

fn v2_code_of(v3_code: &str) -> String {
    match v3_code {
        "ORDER_NOT_EXIST" => "ORDERNOTEXIST",
        "ORDER_CLOSED" => "ORDERCLOSED",
        other => other,
    }
    .to_string()
}

// ---------------------------------------------------------------- orders and notifies

struct NewOrder {
    api: Api,
    appid: String,
    mchid: String,
    description: String,
    no: String,
    total: i64,
    openid: String,
    notify_url: String,
    time_expire: i64,
    attach: Option<String>,
}

/// A request to pay an order (tests, the CLI, and the member page in development).
#[derive(Deserialize, Default)]
pub struct PayRequest {
    pub out_trade_no: Option<String>,
    pub prepay_id: Option<String>,
    /// The test user who pays; must be the order's payer. Absent: the payer.
    pub user: Option<String>,
}

/// What paying did.
#[derive(Debug, serde::Serialize)]
pub struct PayOutcome {
    pub out_trade_no: String,
    pub trade_state: String,
    pub transaction_id: String,
    /// Status of the first notify delivery (0: it did not get an answer).
    pub notify_status: u16,
    pub acknowledged: bool,
}

impl Sim {
    fn place_order(&self, o: NewOrder) -> Result<String, (&'static str, &'static str)> {
        if o.total <= 0 {
            return Err(("PARAM_ERROR", "amount must be positive"));
        }
        if o.time_expire <= now() {
            return Err(("PARAM_ERROR", "time_expire has passed"));
        }
        let mut pay = self.pay.lock().expect("sim pay lock");
        if let Some(existing) = pay.orders.get(&o.no) {
            return match existing.state {
                "SUCCESS" => Err(("ORDERPAID", "该订单已支付")),
                "CLOSED" => Err(("ORDER_CLOSED", "该订单已关闭")),
                _ if existing.total == o.total && existing.openid == o.openid => {
                    Ok(existing.prepay_id.clone())
                }
                _ => Err(("OUT_TRADE_NO_USED", "商户订单号重复")),
            };
        }
        let prepay_id = format!("wx{}", random_hex(15));
        pay.by_prepay_id.insert(prepay_id.clone(), o.no.clone());
        pay.orders.insert(
            o.no,
            SimOrder {
                api: o.api,
                appid: o.appid,
                mchid: o.mchid,
                description: o.description,
                total: o.total,
                openid: o.openid,
                notify_url: o.notify_url,
                time_expire: o.time_expire,
                attach: o.attach,
                prepay_id: prepay_id.clone(),
                state: "NOTPAY",
                transaction_id: None,
                success_time: None,
                deliveries: Vec::new(),
                acknowledged: false,
            },
        );
        Ok(prepay_id)
    }

    fn close(&self, no: &str) -> Result<(), (&'static str, &'static str)> {
        let mut pay = self.pay.lock().expect("sim pay lock");
        let o = pay.orders.get_mut(no).ok_or(("ORDER_NOT_EXIST", "订单不存在"))?;
        match o.state {
            "SUCCESS" => Err(("ORDERPAID", "该订单已支付")),
            _ => {
                o.state = "CLOSED";
                Ok(())
            }
        }
    }

    /// The payer pays: the order becomes SUCCESS and its notify is delivered
    /// (the first attempt awaited, retries in the background until acknowledged).
    pub async fn pay(&self, r: &PayRequest) -> Result<PayOutcome, String> {
        let no = {
            let mut pay = self.pay.lock().expect("sim pay lock");
            let no = match (&r.out_trade_no, &r.prepay_id) {
                (Some(no), _) => no.clone(),
                (None, Some(prepay)) => {
                    pay.by_prepay_id.get(prepay).cloned().ok_or("no order has this prepay_id")?
                }
                (None, None) => return Err("give out_trade_no or prepay_id".into()),
            };
            let o = pay.orders.get_mut(&no).ok_or("WeChat Pay has no order with this out_trade_no")?;
            if let Some(user) = &r.user
                && openid_of(user) != o.openid
            {
                return Err("this order belongs to another payer".into());
            }
            match o.state {
                "NOTPAY" if o.time_expire > now() => {}
                "NOTPAY" => return Err("the order has expired".into()),
                other => return Err(format!("the order is {other}, not payable")),
            }
            o.state = "SUCCESS";
            o.success_time = Some(now());
            o.transaction_id = Some(format!("4200{}", &random_digits(24)));
            no
        };
        let (status, acknowledged) = self.deliver(&no).await;
        if !acknowledged {
            let sim = self.clone();
            let no = no.clone();
            tokio::spawn(async move { sim.retry_notify(&no).await });
        }
        let pay = self.pay.lock().expect("sim pay lock");
        let o = &pay.orders[&no];
        Ok(PayOutcome {
            out_trade_no: no.clone(),
            trade_state: o.state.into(),
            transaction_id: o.transaction_id.clone().unwrap_or_default(),
            notify_status: status,
            acknowledged,
        })
    }

    /// WeChat Pay's retries: on its schedule (scaled), until acknowledged.
    async fn retry_notify(&self, no: &str) {
        let scale = pay_config(self).map(|c| c.retry_scale).unwrap_or(1.0);
        for secs in RETRY_SCHEDULE_SECS {
            tokio::time::sleep(Duration::from_secs_f64(secs as f64 * scale)).await;
            if self.pay.lock().expect("sim pay lock").orders.get(no).is_none_or(|o| o.acknowledged) {
                return;
            }
            if self.deliver(no).await.1 {
                return;
            }
        }
    }

    /// Delivers the paid order's notify once; returns (status, acknowledged).
    pub async fn deliver(&self, no: &str) -> (u16, bool) {
        let Some(config) = pay_config(self) else { return (0, false) };
        let built = {
            let mut pay = self.pay.lock().expect("sim pay lock");
            pay.notifies_sent += 1;
            pay.orders.get(no).map(|o| (o.api, o.notify_url.clone(), build_notify(config, no, o)))
        };
        let Some((api, url, (headers, body))) = built else { return (0, false) };
        let mut request = self.http.post(&url).body(body).timeout(Duration::from_secs(5));
        for (k, v) in headers {
            request = request.header(k, v);
        }
        let (status, acknowledged) = match request.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                let ok = match api {
                    Api::V3 => status == 200 || status == 204,
                    Api::V2(_) => {
                        status == 200
                            && flat_xml(&text)
                                .ok()
                                .and_then(|f| f.into_iter().find(|(k, _)| k == "return_code"))
                                .is_some_and(|(_, v)| v == "SUCCESS")
                    }
                };
                (status, ok)
            }
            Err(_) => (0, false),
        };
        let mut pay = self.pay.lock().expect("sim pay lock");
        if let Some(o) = pay.orders.get_mut(no) {
            o.deliveries.push(status);
            o.acknowledged |= acknowledged;
        }
        (status, acknowledged)
    }

    /// Notifies delivered so far (first attempts, retries and duplicates).
    pub fn notifies_sent(&self) -> u64 {
        self.pay.lock().expect("sim pay lock").notifies_sent
    }

    /// The order as the simulated WeChat Pay holds it (for tests).
    pub fn pay_order(&self, no: &str) -> Option<Value> {
        let pay = self.pay.lock().expect("sim pay lock");
        pay.orders.get(no).map(|o| {
            let mut t = transaction_json(no, o);
            t["deliveries"] = json!(o.deliveries);
            t["acknowledged"] = json!(o.acknowledged);
            t["prepay_id"] = json!(o.prepay_id);
            t["description"] = json!(o.description);
            t
        })
    }
}

/// The notify for a paid order, signed now: (headers, body).
fn build_notify(config: &SimPayConfig, no: &str, o: &SimOrder) -> (Vec<(String, String)>, String) {
    match o.api {
        Api::V3 => {
            let resource = transaction_json(no, o).to_string();
            let nonce = random_token(12);
            let ciphertext = v3_encrypt(&config.apiv3_key, &nonce, "transaction", resource.as_bytes())
                .expect("a 12-character nonce");
            let body = json!({
                // One id per payment: WeChat Pay's retries repeat it.
                "id": format!("EV-{}", o.transaction_id.as_deref().unwrap_or(no)),
                "create_time": rfc3339_cst(o.success_time.unwrap_or_else(now)),
                "resource_type": "encrypt-resource",
                "event_type": "TRANSACTION.SUCCESS",
                "summary": "支付成功",
                "resource": {
                    "original_type": "transaction",
                    "algorithm": "AEAD_AES_256_GCM",
                    "ciphertext": ciphertext,
                    "associated_data": "transaction",
                    "nonce": nonce,
                },
            })
            .to_string();
            let timestamp = now().to_string();
            let sig_nonce = random_token(32);
            let signature =
                config.platform_key.sign(&signed_message(&timestamp, &sig_nonce, body.as_bytes()));
            let headers = vec![
                ("content-type".into(), "application/json".into()),
                ("wechatpay-timestamp".into(), timestamp),
                ("wechatpay-nonce".into(), sig_nonce),
                ("wechatpay-signature".into(), signature),
                ("wechatpay-serial".into(), config.platform_key_id.clone()),
                ("wechatpay-signature-type".into(), "WECHATPAY2-SHA256-RSA2048".into()),
            ];
            (headers, body)
        }
        Api::V2(sign_type) => {
            let mut fields: Vec<(String, String)> = [
                ("appid", o.appid.clone()),
                ("bank_type", "OTHERS".into()),
                ("cash_fee", o.total.to_string()),
                ("fee_type", "CNY".into()),
                ("is_subscribe", "Y".into()),
                ("mch_id", o.mchid.clone()),
                ("nonce_str", random_token(32)),
                ("openid", o.openid.clone()),
                ("out_trade_no", no.to_string()),
                ("result_code", "SUCCESS".into()),
                ("return_code", "SUCCESS".into()),
                ("time_end", v2_time(o.success_time.unwrap_or_else(now))),
                ("total_fee", o.total.to_string()),
                ("trade_type", "JSAPI".into()),
                ("transaction_id", o.transaction_id.clone().unwrap_or_default()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            if let Some(a) = &o.attach {
                fields.push(("attach".into(), a.clone()));
            }
            if sign_type == V2SignType::HmacSha256 {
                fields.push(("sign_type".into(), "HMAC-SHA256".into()));
            }
            let key = config.apiv2_key.as_deref().unwrap_or_default();
            let sign = v2_sign(&fields, key, sign_type);
            fields.push(("sign".into(), sign));
            (vec![("content-type".into(), "text/xml".into())], to_xml(&fields))
        }
    }
}

async fn pay(State(sim): State<Sim>, Json(r): Json<PayRequest>) -> Response {
    match sim.pay(&r).await {
        Ok(outcome) => Json(outcome).into_response(),
        Err(why) => (StatusCode::BAD_REQUEST, Json(json!({ "error": why }))).into_response(),
    }
}

#[derive(Deserialize)]
struct Redeliver {
    out_trade_no: String,
    /// How many copies to send.
    #[serde(default = "one")]
    times: usize,
}

fn one() -> usize {
    1
}

/// Sends a paid order's notify again, `times` copies at once (duplicates).
async fn redeliver(State(sim): State<Sim>, Json(r): Json<Redeliver>) -> Response {
    let paid =
        sim.pay.lock().expect("sim pay lock").orders.get(&r.out_trade_no).map(|o| o.state == "SUCCESS");
    if paid != Some(true) {
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": "no paid order has this out_trade_no" })))
            .into_response();
    }
    let mut deliveries = tokio::task::JoinSet::new();
    for _ in 0..r.times.min(100) {
        let sim = sim.clone();
        let no = r.out_trade_no.clone();
        deliveries.spawn(async move { sim.deliver(&no).await.0 });
    }
    let statuses: Vec<u16> = deliveries.join_all().await;
    Json(json!({ "statuses": statuses })).into_response()
}

#[derive(Deserialize)]
struct NotifyRequestFor {
    out_trade_no: String,
}

/// A paid order's notify, signed now, as data (`{url, headers, body}`): load
/// generators replay it (within WeChat Pay's 5-minute window) without RSA of their own.
async fn notify_request(State(sim): State<Sim>, Json(r): Json<NotifyRequestFor>) -> Response {
    let Some(config) = pay_config(&sim) else {
        return (StatusCode::NOT_FOUND, Json(json!({ "error": "no WeChat Pay merchant" }))).into_response();
    };
    let pay = sim.pay.lock().expect("sim pay lock");
    match pay.orders.get(&r.out_trade_no) {
        Some(o) if o.state == "SUCCESS" => {
            let (headers, body) = build_notify(config, &r.out_trade_no, o);
            let headers: serde_json::Map<String, Value> =
                headers.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            Json(json!({ "url": o.notify_url, "headers": headers, "body": body })).into_response()
        }
        _ => (StatusCode::BAD_REQUEST, Json(json!({ "error": "no paid order has this out_trade_no" })))
            .into_response(),
    }
}

async fn inspect(State(sim): State<Sim>, Path(no): Path<String>) -> Response {
    match sim.pay_order(&no) {
        Some(o) => Json(o).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({ "error": "no such order" }))).into_response(),
    }
}

const CST: time::UtcOffset = time::macros::offset!(+8);

fn rfc3339_cst(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(CST)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn v2_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(CST)
        .format(time::macros::format_description!("[year][month][day][hour][minute][second]"))
        .unwrap_or_default()
}

fn parse_v2_time(t: &str) -> Option<i64> {
    let format = time::macros::format_description!("[year][month][day][hour][minute][second]");
    time::PrimitiveDateTime::parse(t, format).ok().map(|t| t.assume_offset(CST).unix_timestamp())
}

fn random_digits(n: usize) -> String {
    use rand::Rng as _;
    let mut rng = rand::rng();
    (0..n).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect()
}

impl SimPayConfig {
    /// What WeChat Pay knows of the merchant, from the merchant's own settings
    /// (WECHAT_APPID, WECHATPAY_MCHID, WECHATPAY_SERIAL, WECHATPAY_PUBLIC_KEY_ID,
    /// WECHATPAY_APIV3_KEY, WECHATPAY_APIV2_KEY), plus the merchant's public key
    /// and the platform's private key.
    pub fn from_settings(
        s: &crate::settings::Settings,
        merchant_public_key: &std::path::Path,
        platform_private_key: &std::path::Path,
        retry_scale: f64,
    ) -> anyhow::Result<SimPayConfig> {
        use anyhow::Context as _;
        use secrecy::ExposeSecret as _;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let need = |v: &Option<String>, name: &str| v.clone().with_context(|| format!("{name} is not set"));
        Ok(SimPayConfig {
            appid: need(&s.wechat_appid, "WECHAT_APPID")?,
            mchid: need(&s.wechatpay_mchid, "WECHATPAY_MCHID")?,
            merchant_public_key: crate::pay_crypto::public_key_from_pem(&read(merchant_public_key)?)?,
            merchant_serial: need(&s.wechatpay_serial, "WECHATPAY_SERIAL")?,
            platform_key: RsaSigner::from_pem(&read(platform_private_key)?)?,
            platform_key_id: need(&s.wechatpay_public_key_id, "WECHATPAY_PUBLIC_KEY_ID")?,
            apiv3_key: *s.apiv3_key()?.context("WECHATPAY_APIV3_KEY is not set")?.expose_secret(),
            apiv2_key: s.wechatpay_apiv2_key.as_ref().map(|k| k.expose_secret().to_string()),
            retry_scale,
        })
    }
}

/// `{name}_key.pem` (PKCS#8, mode 0600) and `{name}_pub.pem` in `dir`, made
/// once: development and simulator key pairs (never for production).
pub fn ensure_key_pair(
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    use anyhow::Context as _;
    use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
    let (private, public) = (dir.join(format!("{name}_key.pem")), dir.join(format!("{name}_pub.pem")));
    if private.exists() && public.exists() {
        return Ok((private, public));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)?;
    let pem = key.to_pkcs8_pem(LineEnding::LF)?;
    std::fs::write(&private, pem.as_bytes()).with_context(|| format!("writing {}", private.display()))?;
    std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::fs::write(&public, key.to_public_key().to_public_key_pem(LineEnding::LF)?)
        .with_context(|| format!("writing {}", public.display()))?;
    Ok((private, public))
}
