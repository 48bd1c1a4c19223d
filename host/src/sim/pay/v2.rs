//! The simulated APIv2: XML requests and answers signed with the APIv2 key.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use super::refund::NewRefund;
use super::{Api, NewOrder, SimPayConfig, TradeType, code_url_of, pay_config};
use crate::sim::{Sim, now};
use crate::wechat::pay::random_token;
use crate::wechat::pay::v2::{self, V2SignType, v2_code_of, v2_sign};
use crate::wechat::xml::{flat_xml, to_xml};

pub(super) fn routes() -> axum::Router<Sim> {
    axum::Router::new()
        .route("/pay/unifiedorder", post(unifiedorder))
        .route("/pay/orderquery", post(orderquery))
        .route("/pay/closeorder", post(closeorder))
        .route("/secapi/pay/refund", post(refund))
        .route("/pay/refundquery", post(refundquery))
}

pub(super) fn v2_fail(message: &str) -> Response {
    xml_response(format!(
        "<xml><return_code>FAIL</return_code><return_msg>{}</return_msg></xml>",
        quick_xml::escape::escape(message)
    ))
}

/// A refusal with WeChat Pay's `error_code` (e.g. `downloadbill`'s 20002, no bill).
pub(super) fn v2_fail_coded(message: &str, code: &str) -> Response {
    xml_response(format!(
        "<xml><return_code>FAIL</return_code><return_msg>{}</return_msg><error_code>{}</error_code></xml>",
        quick_xml::escape::escape(message),
        quick_xml::escape::escape(code)
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
pub(super) async fn v2_gate(
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
    if !v2::sign_matches(&list, &key, sign_type, fields.get("sign").map(String::as_str).unwrap_or_default()) {
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

async fn unifiedorder(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    let (f, sign_type, key) = match v2_gate(&sim, &body).await {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let config = pay_config(&sim).expect("gated");
    let get = |k: &str| f.get(k).cloned();
    let (Some(description), Some(no), Some(total), Some(notify_url), Some(trade_type)) =
        (get("body"), get("out_trade_no"), get("total_fee"), get("notify_url"), get("trade_type"))
    else {
        return v2_fail("缺少参数");
    };
    let trade = match trade_type.as_str() {
        "JSAPI" if get("openid").is_some() => TradeType::Jsapi,
        "NATIVE" if get("product_id").is_some() => TradeType::Native,
        "MWEB" if get("scene_info").is_some() && get("spbill_create_ip").is_some() => TradeType::H5,
        "JSAPI" | "NATIVE" | "MWEB" => return v2_fail("缺少参数 (openid, product_id or scene_info)"),
        _ => return v2_fail("trade_type is not supported"),
    };
    let Ok(total) = total.parse::<i64>() else { return v2_fail("total_fee must be a number") };
    let time_expire = get("time_expire").and_then(|t| v2::parse_time(&t)).unwrap_or(now() + 7200);
    let order = NewOrder {
        api: Api::V2(sign_type),
        trade,
        appid: config.appid.clone(),
        mchid: config.mchid.clone(),
        description,
        no,
        total,
        openid: get("openid").filter(|_| trade == TradeType::Jsapi),
        notify_url,
        time_expire,
        attach: get("attach"),
        payer_client_ip: get("spbill_create_ip"),
    };
    let prepay_id = match sim.place_order(order) {
        Ok(prepay_id) => prepay_id,
        Err((code, message)) => return v2_result_fail(config, &key, sign_type, &v2_code_of(code), message),
    };
    let mut result =
        vec![("result_code", "SUCCESS".into()), ("trade_type", trade_type), ("prepay_id", prepay_id.clone())];
    match trade {
        TradeType::Jsapi => {}
        TradeType::Native => result.push(("code_url", code_url_of(&prepay_id))),
        TradeType::H5 => {
            let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
            result.push(("mweb_url", format!("http://{host}/sim/pay/h5?prepay_id={prepay_id}")));
        }
    }
    v2_answer(config, &key, sign_type, result)
}

async fn orderquery(State(sim): State<Sim>, body: Bytes) -> Response {
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
        ("openid", o.openid.clone().unwrap_or_default()),
        ("trade_type", o.trade.name().into()),
        ("trade_state", o.state.to_string()),
        ("total_fee", o.total.to_string()),
    ];
    if let Some(id) = &o.transaction_id {
        result.push(("transaction_id", id.clone()));
    }
    if let Some(at) = o.success_time {
        result.push(("time_end", v2::format_time(at)));
    }
    v2_answer(config, &key, sign_type, result)
}

async fn closeorder(State(sim): State<Sim>, body: Bytes) -> Response {
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

/// `/secapi/pay/refund`. WeChat Pay asks for the merchant API certificate
/// here (mutual TLS); the simulator serves plain HTTP on loopback and checks
/// the signed request only.
async fn refund(State(sim): State<Sim>, body: Bytes) -> Response {
    let (f, sign_type, key) = match v2_gate(&sim, &body).await {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let config = pay_config(&sim).expect("gated");
    let get = |k: &str| f.get(k).cloned();
    let (Some(out_trade_no), Some(no), Some(total), Some(amount)) =
        (get("out_trade_no"), get("out_refund_no"), get("total_fee"), get("refund_fee"))
    else {
        return v2_fail("缺少参数");
    };
    let (Ok(total), Ok(amount)) = (total.parse::<i64>(), amount.parse::<i64>()) else {
        return v2_fail("total_fee and refund_fee must be numbers");
    };
    let notify_url = get("notify_url").unwrap_or_default();
    let asked = NewRefund {
        api: Api::V2(sign_type),
        out_trade_no: out_trade_no.clone(),
        no: no.clone(),
        amount,
        total,
        notify_url,
    };
    if let Err((code, message)) = sim.open_refund(asked) {
        let code = if code == "RESOURCE_NOT_EXISTS" { "ORDERNOTEXIST" } else { code };
        return v2_result_fail(config, &key, sign_type, code, message);
    }
    let fields = sim.pay.lock().expect("sim pay lock").v2_refund_query(&no).unwrap_or_default();
    let refund_id =
        fields.iter().find(|(k, _)| *k == "refund_id_0").map(|(_, v)| v.clone()).unwrap_or_default();
    let transaction_id =
        fields.iter().find(|(k, _)| *k == "transaction_id").map(|(_, v)| v.clone()).unwrap_or_default();
    v2_answer(
        config,
        &key,
        sign_type,
        vec![
            ("result_code", "SUCCESS".into()),
            ("transaction_id", transaction_id),
            ("out_trade_no", out_trade_no),
            ("out_refund_no", no),
            ("refund_id", refund_id),
            ("refund_fee", amount.to_string()),
            ("total_fee", total.to_string()),
            ("cash_fee", total.to_string()),
        ],
    )
}

async fn refundquery(State(sim): State<Sim>, body: Bytes) -> Response {
    let (f, sign_type, key) = match v2_gate(&sim, &body).await {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let config = pay_config(&sim).expect("gated");
    let no = f.get("out_refund_no").cloned().unwrap_or_default();
    let found = sim.pay.lock().expect("sim pay lock").v2_refund_query(&no);
    match found {
        Some(fields) => v2_answer(config, &key, sign_type, fields),
        None => v2_result_fail(config, &key, sign_type, "REFUNDNOTEXIST", "退款单不存在"),
    }
}
