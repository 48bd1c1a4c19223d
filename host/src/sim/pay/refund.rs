//! The simulated refunds, APIv3 (`/v3/refund/domestic/refunds`) and APIv2
//! (`/secapi/pay/refund`, `/pay/refundquery`): a refund of a paid order is
//! PROCESSING when asked for, then settles (SUCCESS, or CLOSED / ABNORMAL
//! when a test says so) and its notify (APIv3 `REFUND.*`; APIv2 `req_info`
//! sealed under the MD5 of the APIv2 key) goes to the `notify_url` on WeChat
//! Pay's retry schedule until acknowledged. Tests can hold refunds in PROCESSING.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::notify::{Notified, post_notify, signed_v3_notify};
use super::v3::{V3Call, v3_error, v3_signed};
use super::{Api, PayData, SimPayConfig, pay_config, random_digits};
use crate::sim::{Sim, now};
use crate::wechat::pay::v2;
use crate::wechat::pay::{random_token, rfc3339_cst};
use crate::wechat::xml::to_xml;

pub(super) struct SimRefund {
    /// The API it was asked for in, and its notify goes out in.
    api: Api,
    pub(super) out_trade_no: String,
    pub(super) transaction_id: String,
    pub(super) refund_id: String,
    pub(super) amount: i64,
    pub(super) total: i64,
    notify_url: String,
    /// PROCESSING, SUCCESS, CLOSED, ABNORMAL.
    pub(super) status: &'static str,
    pub(super) created: i64,
    pub(super) success_time: Option<i64>,
    deliveries: Vec<u16>,
    acknowledged: bool,
}

pub(super) fn routes() -> axum::Router<Sim> {
    axum::Router::new()
        .route("/v3/refund/domestic/refunds", post(create))
        .route("/v3/refund/domestic/refunds/{no}", get(query))
        .route("/sim/pay/refunds/{no}", get(inspect))
        .route("/sim/pay/refunds/{no}/settle", post(settle_route))
        .route("/sim/pay/refunds/{no}/notify", post(redeliver))
        .route("/sim/pay/refund-hold", post(hold_route))
}

/// The refund as WeChat Pay describes it (answers and notify resources).
fn refund_json(mchid: &str, no: &str, r: &SimRefund) -> Value {
    let mut v = json!({
        "mchid": mchid,
        "refund_id": r.refund_id,
        "out_refund_no": no,
        "transaction_id": r.transaction_id,
        "out_trade_no": r.out_trade_no,
        "channel": "ORIGINAL",
        "status": r.status,
        "refund_status": r.status,
        "create_time": rfc3339_cst(r.created),
        "amount": { "refund": r.amount, "total": r.total, "payer_refund": r.amount, "payer_total": r.total, "currency": "CNY" },
    });
    if let Some(at) = r.success_time {
        v["success_time"] = json!(rfc3339_cst(at));
    }
    v
}

async fn create(call: V3Call) -> Response {
    let config = call.config();
    let Ok(body) = serde_json::from_slice::<Value>(&call.body) else {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "the body is not JSON");
    };
    let text = |k: &str| body[k].as_str().map(str::to_string);
    let (Some(out_trade_no), Some(no), Some(amount), Some(total)) = (
        text("out_trade_no"),
        text("out_refund_no"),
        body["amount"]["refund"].as_i64(),
        body["amount"]["total"].as_i64(),
    ) else {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "a required field is missing");
    };
    let notify_url = text("notify_url").unwrap_or_default();
    let answer = call.sim.open_refund(NewRefund {
        api: Api::V3,
        out_trade_no,
        no: no.clone(),
        amount,
        total,
        notify_url,
    });
    if let Err((code, message)) = answer {
        let status =
            if code == "RESOURCE_NOT_EXISTS" { StatusCode::NOT_FOUND } else { StatusCode::BAD_REQUEST };
        return v3_error(status, code, message);
    }
    let shown = refund_json(&config.mchid, &no, &call.sim.pay.lock().expect("sim pay lock").refunds[&no]);
    v3_signed(config, StatusCode::OK, Some(shown))
}

async fn query(Path(no): Path<String>, call: V3Call) -> Response {
    let config = call.config();
    let pay = call.sim.pay.lock().expect("sim pay lock");
    match pay.refunds.get(&no) {
        Some(r) => v3_signed(config, StatusCode::OK, Some(refund_json(&config.mchid, &no, r))),
        None => v3_error(StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "退款单不存在"),
    }
}

/// An APIv2 refund notify: unsigned, the refund in `req_info` sealed under
/// the MD5 of the APIv2 key.
fn sealed_v2_notify(config: &SimPayConfig, no: &str, r: &SimRefund) -> (Vec<(String, String)>, String) {
    let key = config.apiv2_key.as_deref().unwrap_or_default();
    let mut inner: Vec<(String, String)> = [
        ("out_refund_no", no.to_string()),
        ("out_trade_no", r.out_trade_no.clone()),
        ("refund_account", "REFUND_SOURCE_UNSETTLED_FUNDS".into()),
        ("refund_fee", r.amount.to_string()),
        ("refund_id", r.refund_id.clone()),
        ("refund_recv_accout", "支付用户零钱".into()),
        ("refund_request_source", "API".into()),
        ("refund_status", v2::v2_refund_status_of(r.status).into()),
        ("settlement_refund_fee", r.amount.to_string()),
        ("settlement_total_fee", r.total.to_string()),
        ("total_fee", r.total.to_string()),
        ("transaction_id", r.transaction_id.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(at) = r.success_time {
        inner.push(("success_time".into(), crate::wechat::pay::format_cst_datetime(at)));
    }
    let root = to_xml(&inner).replacen("<xml>", "<root>", 1);
    let root = format!("{}</root>", root.strip_suffix("</xml>").unwrap_or(&root));
    let outer: Vec<(String, String)> = [
        ("return_code", "SUCCESS".to_string()),
        ("appid", config.appid.clone()),
        ("mch_id", config.mchid.clone()),
        ("nonce_str", random_token(32)),
        ("req_info", v2::seal_req_info(&root, key)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    (vec![("content-type".into(), "text/xml".into())], to_xml(&outer))
}

impl PayData {
    /// A refund as APIv2's `/pay/refundquery` answers it (one refund, entry 0).
    pub(super) fn v2_refund_query(&self, no: &str) -> Option<Vec<(&'static str, String)>> {
        let r = self.refunds.get(no)?;
        let mut fields = vec![
            ("result_code", "SUCCESS".to_string()),
            ("out_trade_no", r.out_trade_no.clone()),
            ("transaction_id", r.transaction_id.clone()),
            ("total_fee", r.total.to_string()),
            ("refund_count", "1".into()),
            ("out_refund_no_0", no.to_string()),
            ("refund_id_0", r.refund_id.clone()),
            ("refund_fee_0", r.amount.to_string()),
            ("refund_status_0", v2::v2_refund_status_of(r.status).into()),
        ];
        if let Some(at) = r.success_time {
            fields.push(("refund_success_time_0", crate::wechat::pay::format_cst_datetime(at)));
        }
        Some(fields)
    }

    /// Whether the refund's notify was acknowledged (or there is no such refund).
    pub(super) fn refunds_acknowledged(&self, no: &str) -> bool {
        self.refunds.get(no).is_none_or(|r| r.acknowledged)
    }
}

/// A refund as a merchant asks for it.
pub(super) struct NewRefund {
    pub(super) api: Api,
    pub(super) out_trade_no: String,
    pub(super) no: String,
    pub(super) amount: i64,
    pub(super) total: i64,
    pub(super) notify_url: String,
}

impl Sim {
    /// Records a refund as WeChat Pay accepts one (the same out_refund_no
    /// again is the same refund) and settles it a moment later unless refunds
    /// are held. `Err` is WeChat Pay's (code, message).
    pub(super) fn open_refund(&self, r: NewRefund) -> Result<(), (&'static str, &'static str)> {
        let NewRefund { api, out_trade_no, no, amount, total, notify_url } = r;
        let answer = {
            let mut pay = self.pay.lock().expect("sim pay lock");
            let already = pay
                .refunds
                .get(&no)
                .map(|r| (r.out_trade_no == out_trade_no && r.amount == amount, r.status));
            match already {
                // The same out_refund_no again is the same refund.
                Some((true, _)) => Ok(()),
                Some((false, _)) => Err(("INVALID_REQUEST", "out_refund_no was used for another refund")),
                None => {
                    let refunded: i64 = pay
                        .refunds
                        .values()
                        .filter(|r| r.out_trade_no == out_trade_no && r.status != "CLOSED")
                        .map(|r| r.amount)
                        .sum();
                    match pay.orders.get(&out_trade_no) {
                        None => Err(("RESOURCE_NOT_EXISTS", "订单不存在")),
                        Some(o) if o.state != "SUCCESS" => Err(("INVALID_REQUEST", "订单未支付")),
                        Some(o) if o.total != total => Err(("INVALID_REQUEST", "订单金额不一致")),
                        Some(_) if amount <= 0 || refunded + amount > total => {
                            Err(("INVALID_REQUEST", "申请退款金额超过订单可退金额"))
                        }
                        Some(o) => {
                            let transaction_id = o.transaction_id.clone().unwrap_or_default();
                            pay.refunds.insert(
                                no.clone(),
                                SimRefund {
                                    api,
                                    out_trade_no: out_trade_no.clone(),
                                    transaction_id,
                                    refund_id: format!("50000{}", random_digits(24)),
                                    amount,
                                    total,
                                    notify_url,
                                    status: "PROCESSING",
                                    created: now(),
                                    success_time: None,
                                    deliveries: Vec::new(),
                                    acknowledged: false,
                                },
                            );
                            Ok(())
                        }
                    }
                }
            }
        };
        answer?;
        let (held, processing) = {
            let pay = self.pay.lock().expect("sim pay lock");
            (pay.hold_refunds, pay.refunds[&no].status == "PROCESSING")
        };
        if !held && processing {
            // The bank answers a moment later: settled and notified in the background.
            let sim = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                sim.settle_refund(&no, "SUCCESS").await;
            });
        }
        Ok(())
    }

    /// The refund reaches its final state (once) and its notify is delivered,
    /// then repeated on WeChat Pay's schedule until acknowledged.
    pub async fn settle_refund(&self, no: &str, status: &str) -> Option<(u16, bool)> {
        let status: &'static str = match status {
            "SUCCESS" => "SUCCESS",
            "CLOSED" => "CLOSED",
            "ABNORMAL" => "ABNORMAL",
            _ => return None,
        };
        {
            let mut pay = self.pay.lock().expect("sim pay lock");
            let r = pay.refunds.get_mut(no)?;
            if r.status != "PROCESSING" {
                return None;
            }
            r.status = status;
            if status == "SUCCESS" {
                r.success_time = Some(now());
            }
        }
        let first = self.deliver_refund(no).await;
        if !first.1 {
            let sim = self.clone();
            let no = no.to_string();
            tokio::spawn(async move { sim.retry_notify(Notified::Refund(no)).await });
        }
        Some(first)
    }

    /// Delivers a settled refund's notify once; returns (status, acknowledged).
    pub async fn deliver_refund(&self, no: &str) -> (u16, bool) {
        let Some(config) = pay_config(self) else { return (0, false) };
        let built = {
            let mut pay = self.pay.lock().expect("sim pay lock");
            pay.notifies_sent += 1;
            pay.refunds.get(no).filter(|r| r.status != "PROCESSING").map(|r| {
                let notify = match r.api {
                    Api::V3 => {
                        let event = match r.status {
                            "SUCCESS" => ("REFUND.SUCCESS", "退款成功"),
                            "CLOSED" => ("REFUND.CLOSED", "退款关闭"),
                            _ => ("REFUND.ABNORMAL", "退款异常"),
                        };
                        let resource = refund_json(&config.mchid, no, r).to_string();
                        let id = format!("EV-{}-{}", r.refund_id, r.status);
                        signed_v3_notify(config, &id, now(), (event.0, event.1, "refund"), &resource)
                    }
                    Api::V2(_) => sealed_v2_notify(config, no, r),
                };
                (r.api, r.notify_url.clone(), notify)
            })
        };
        let Some((api, url, notify)) = built else { return (0, false) };
        let (status, acknowledged) = post_notify(&self.http, api, &url, notify).await;
        if let Some(r) = self.pay.lock().expect("sim pay lock").refunds.get_mut(no) {
            r.deliveries.push(status);
            r.acknowledged |= acknowledged;
        }
        (status, acknowledged)
    }

    /// Refunds stay PROCESSING until settled by hand (`settle_refund`) while held.
    pub fn hold_refunds(&self, hold: bool) {
        self.pay.lock().expect("sim pay lock").hold_refunds = hold;
    }

    /// The refund as the simulated WeChat Pay holds it (for tests).
    pub fn pay_refund(&self, no: &str) -> Option<Value> {
        let config = pay_config(self)?;
        let pay = self.pay.lock().expect("sim pay lock");
        pay.refunds.get(no).map(|r| {
            let mut v = refund_json(&config.mchid, no, r);
            v["deliveries"] = json!(r.deliveries);
            v["acknowledged"] = json!(r.acknowledged);
            v
        })
    }

    /// Refunds WeChat Pay holds for an order (for tests: never more than one per refund asked for).
    pub fn pay_refunds_of(&self, out_trade_no: &str) -> usize {
        self.pay
            .lock()
            .expect("sim pay lock")
            .refunds
            .values()
            .filter(|r| r.out_trade_no == out_trade_no)
            .count()
    }
}

async fn inspect(State(sim): State<Sim>, Path(no): Path<String>) -> Response {
    match sim.pay_refund(&no) {
        Some(r) => Json(r).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({ "error": "no such refund" }))).into_response(),
    }
}

#[derive(Deserialize)]
struct Settle {
    status: String,
}

async fn settle_route(State(sim): State<Sim>, Path(no): Path<String>, Json(s): Json<Settle>) -> Response {
    match sim.settle_refund(&no, &s.status).await {
        Some((status, acknowledged)) => {
            Json(json!({ "notify_status": status, "acknowledged": acknowledged })).into_response()
        }
        None => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "no processing refund has this number, or an unknown status" })),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct Redeliver {
    #[serde(default = "one")]
    times: usize,
}

fn one() -> usize {
    1
}

/// Sends a settled refund's notify again, `times` copies at once (duplicates).
async fn redeliver(State(sim): State<Sim>, Path(no): Path<String>, Json(r): Json<Redeliver>) -> Response {
    let mut deliveries = tokio::task::JoinSet::new();
    for _ in 0..r.times.min(100) {
        let sim = sim.clone();
        let no = no.clone();
        deliveries.spawn(async move { sim.deliver_refund(&no).await.0 });
    }
    Json(json!({ "statuses": deliveries.join_all().await })).into_response()
}

#[derive(Deserialize)]
struct Hold {
    hold: bool,
}

async fn hold_route(State(sim): State<Sim>, Json(h): Json<Hold>) -> Response {
    sim.hold_refunds(h.hold);
    StatusCode::NO_CONTENT.into_response()
}
