//! Paying a simulated order, and the notifies WeChat Pay then sends: signed
//! (APIv3: AES-256-GCM resource; APIv2: signed XML), delivered to the order's
//! `notify_url` and repeated on WeChat Pay's retry schedule until acknowledged.

use std::time::Duration;

use axum::Form;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Api, RETRY_SCHEDULE_SECS, SimOrder, SimPayConfig, pay_config, prepay_id_of_code_url, random_digits,
    transaction_json,
};

/// What a notify is about: a paid order or a settled refund, by its number.
pub(super) enum Notified {
    Order(String),
    Refund(String),
}

/// Who pays a Native or H5 order when no test user is named.
const DEFAULT_PAYER: &str = "payer";
use crate::sim::{Sim, now, openid_of};
use crate::wechat::pay::v2::{self, V2SignType, v2_sign};
use crate::wechat::pay::v3::{signed_message, v3_encrypt};
use crate::wechat::pay::{random_token, rfc3339_cst};
use crate::wechat::xml::{flat_xml, to_xml};

pub(super) fn routes() -> axum::Router<Sim> {
    axum::Router::new()
        .route("/sim/pay", post(pay))
        .route("/sim/pay/notify", post(redeliver))
        .route("/sim/pay/notify-request", post(notify_request))
        .route("/sim/pay/orders/{no}", get(inspect))
        .route("/sim/pay/h5", get(h5_page).post(h5_pay))
}

/// A request to pay an order (tests, the CLI, and the member page in development).
#[derive(Deserialize, Default)]
pub struct PayRequest {
    pub out_trade_no: Option<String>,
    pub prepay_id: Option<String>,
    /// A Native order's `code_url`, as the payer's WeChat scans it.
    pub code_url: Option<String>,
    /// The test user who pays; must be the order's payer. Absent: the payer.
    pub user: Option<String>,
    /// WeChat Pay takes the money but its notify never reaches the merchant
    /// (nor do its retries): only a query or the day's bill tells of it.
    #[serde(default)]
    pub lose_notify: bool,
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
    /// The payer pays: the order becomes SUCCESS and its notify is delivered
    /// (the first attempt awaited, retries in the background until acknowledged).
    pub async fn pay(&self, r: &PayRequest) -> Result<PayOutcome, String> {
        let no = {
            let mut pay = self.pay.lock().expect("sim pay lock");
            let prepay_id = match (&r.prepay_id, &r.code_url) {
                (Some(prepay), _) => Some(prepay.as_str()),
                (None, Some(code_url)) => {
                    Some(prepay_id_of_code_url(code_url).ok_or("this is not a WeChat Pay code_url")?)
                }
                (None, None) => None,
            };
            let no = match (&r.out_trade_no, prepay_id) {
                (Some(no), _) => no.clone(),
                (None, Some(prepay)) => {
                    pay.by_prepay_id.get(prepay).cloned().ok_or("no order has this prepay_id")?
                }
                (None, None) => return Err("give out_trade_no, prepay_id or code_url".into()),
            };
            let o = pay.orders.get_mut(&no).ok_or("WeChat Pay has no order with this out_trade_no")?;
            match (&o.openid, &r.user) {
                (Some(payer), Some(user)) if openid_of(user) != *payer => {
                    return Err("this order belongs to another payer".into());
                }
                (Some(_), _) => {}
                // Native and H5: whoever pays is the payer.
                (None, user) => o.openid = Some(openid_of(user.as_deref().unwrap_or(DEFAULT_PAYER))),
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
        let (status, acknowledged) = if r.lose_notify { (0, false) } else { self.deliver(&no).await };
        if !acknowledged && !r.lose_notify {
            let sim = self.clone();
            let no = no.clone();
            tokio::spawn(async move { sim.retry_notify(Notified::Order(no)).await });
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

    /// WeChat Pay's retries of one notify: on its schedule (scaled), until acknowledged.
    pub(super) async fn retry_notify(&self, what: Notified) {
        let scale = pay_config(self).map(|c| c.retry_scale).unwrap_or(1.0);
        for secs in RETRY_SCHEDULE_SECS {
            tokio::time::sleep(Duration::from_secs_f64(secs as f64 * scale)).await;
            let acknowledged = {
                let pay = self.pay.lock().expect("sim pay lock");
                match &what {
                    Notified::Order(no) => pay.orders.get(no).is_none_or(|o| o.acknowledged),
                    Notified::Refund(no) => pay.refunds_acknowledged(no),
                }
            };
            if acknowledged {
                return;
            }
            let delivered = match &what {
                Notified::Order(no) => self.deliver(no).await,
                Notified::Refund(no) => self.deliver_refund(no).await,
            };
            if delivered.1 {
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
        let Some((api, url, notify)) = built else { return (0, false) };
        let (status, acknowledged) = post_notify(&self.http, api, &url, notify).await;
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
            t["payer_client_ip"] = json!(o.payer_client_ip);
            t
        })
    }
}

/// An APIv3 notify, signed now: its `resource` encrypted with the APIv3 key,
/// the body signed with the platform key; (headers, body).
/// `event`: (event_type, summary, original_type).
pub(super) fn signed_v3_notify(
    config: &SimPayConfig,
    id: &str,
    created: i64,
    (event_type, summary, original_type): (&str, &str, &str),
    resource: &str,
) -> (Vec<(String, String)>, String) {
    let nonce = random_token(12);
    let ciphertext = v3_encrypt(&config.apiv3_key, &nonce, original_type, resource.as_bytes())
        .expect("a 12-character nonce");
    let body = json!({
        "id": id,
        "create_time": rfc3339_cst(created),
        "resource_type": "encrypt-resource",
        "event_type": event_type,
        "summary": summary,
        "resource": {
            "original_type": original_type,
            "algorithm": "AEAD_AES_256_GCM",
            "ciphertext": ciphertext,
            "associated_data": original_type,
            "nonce": nonce,
        },
    })
    .to_string();
    let timestamp = now().to_string();
    let sig_nonce = random_token(32);
    let signing = config.platform.signing();
    let signature = signing.signer.sign(&signed_message(&timestamp, &sig_nonce, body.as_bytes()));
    let headers = vec![
        ("content-type".into(), "application/json".into()),
        ("wechatpay-timestamp".into(), timestamp),
        ("wechatpay-nonce".into(), sig_nonce),
        ("wechatpay-signature".into(), signature),
        ("wechatpay-serial".into(), signing.id.clone()),
        ("wechatpay-signature-type".into(), "WECHATPAY2-SHA256-RSA2048".into()),
    ];
    (headers, body)
}

/// Posts a notify once; returns (status, acknowledged as that API acknowledges).
pub(super) async fn post_notify(
    http: &reqwest::Client,
    api: Api,
    url: &str,
    (headers, body): (Vec<(String, String)>, String),
) -> (u16, bool) {
    let mut request = http.post(url).body(body).timeout(Duration::from_secs(5));
    for (k, v) in headers {
        request = request.header(k, v);
    }
    match request.send().await {
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
    }
}

/// The notify for a paid order, signed now: (headers, body).
fn build_notify(config: &SimPayConfig, no: &str, o: &SimOrder) -> (Vec<(String, String)>, String) {
    match o.api {
        Api::V3 => signed_v3_notify(
            config,
            // One id per payment: WeChat Pay's retries repeat it.
            &format!("EV-{}", o.transaction_id.as_deref().unwrap_or(no)),
            o.success_time.unwrap_or_else(now),
            ("TRANSACTION.SUCCESS", "支付成功", "transaction"),
            &transaction_json(no, o).to_string(),
        ),
        Api::V2(sign_type) => {
            let mut fields: Vec<(String, String)> = [
                ("appid", o.appid.clone()),
                ("bank_type", "OTHERS".into()),
                ("cash_fee", o.total.to_string()),
                ("fee_type", "CNY".into()),
                ("is_subscribe", "Y".into()),
                ("mch_id", o.mchid.clone()),
                ("nonce_str", random_token(32)),
                ("openid", o.openid.clone().unwrap_or_default()),
                ("out_trade_no", no.to_string()),
                ("result_code", "SUCCESS".into()),
                ("return_code", "SUCCESS".into()),
                ("time_end", v2::format_time(o.success_time.unwrap_or_else(now))),
                ("total_fee", o.total.to_string()),
                ("trade_type", o.trade.name().into()),
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

#[derive(Deserialize)]
struct H5Visit {
    prepay_id: String,
    /// Where WeChat sends the payer back to (the merchant's page), as the
    /// merchant appended it to `h5_url`.
    redirect_url: Option<String>,
}

/// What a phone browser sent to an `h5_url` sees: WeChat's cashier, here one button.
async fn h5_page(State(sim): State<Sim>, Query(v): Query<H5Visit>) -> Response {
    let order = {
        let pay = sim.pay.lock().expect("sim pay lock");
        pay.by_prepay_id
            .get(&v.prepay_id)
            .and_then(|no| pay.orders.get(no).map(|o| (no.clone(), o.description.clone(), o.total)))
    };
    let Some((no, description, total)) = order else {
        return (StatusCode::NOT_FOUND, "no order has this prepay_id").into_response();
    };
    let escape = |t: &str| quick_xml::escape::escape(t).into_owned();
    let page = format!(
        "<!doctype html><meta charset=utf-8><meta name=viewport content=\"width=device-width\"><title>微信支付</title>\
         <h1>微信支付</h1><p>{}</p><p id=amount>¥{}.{:02}</p><p>订单 {}</p>\
         <form method=post><input type=hidden name=prepay_id value=\"{}\"><input type=hidden name=redirect_url value=\"{}\">\
         <button id=pay>确认支付</button></form>",
        escape(&description),
        total / 100,
        total % 100,
        escape(&no),
        escape(&v.prepay_id),
        escape(v.redirect_url.as_deref().unwrap_or_default()),
    );
    axum::response::Html(page).into_response()
}

/// The payer confirms: the order is paid (and notified), and the browser goes back to the merchant.
async fn h5_pay(State(sim): State<Sim>, Form(v): Form<H5Visit>) -> Response {
    let request = PayRequest { prepay_id: Some(v.prepay_id), ..PayRequest::default() };
    match sim.pay(&request).await {
        Ok(_) => match v.redirect_url.filter(|u| u.starts_with("http://") || u.starts_with("https://")) {
            Some(back) => axum::response::Redirect::to(&back).into_response(),
            None => axum::response::Html("<p id=paid>支付成功</p>").into_response(),
        },
        Err(why) => (StatusCode::BAD_REQUEST, why).into_response(),
    }
}
