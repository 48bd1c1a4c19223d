//! The simulated APIv3: JSON requests whose merchant signature is checked,
//! answers signed with the platform key.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::certificates::PlatformIdentity;
use super::{Api, NewOrder, SimPayConfig, TradeType, code_url_of, pay_config, transaction_json};
use crate::sim::{Sim, now, random_hex};
use crate::wechat::pay::v3::{Authorization, signed_message};
use crate::wechat::pay::{parse_rfc3339, random_token};

pub(super) fn routes() -> axum::Router<Sim> {
    axum::Router::new()
        .route("/v3/pay/transactions/jsapi", post(jsapi))
        .route("/v3/pay/transactions/native", post(native))
        .route("/v3/pay/transactions/h5", post(h5))
        .route("/v3/pay/transactions/out-trade-no/{no}", get(query))
        .route("/v3/pay/transactions/out-trade-no/{no}/close", post(close))
}

pub(super) fn v3_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "code": code, "message": message }))).into_response()
}

/// An answer signed with the platform key, as WeChat Pay signs its answers.
pub(super) fn v3_signed(config: &SimPayConfig, status: StatusCode, body: Option<Value>) -> Response {
    signed_by(&config.platform.signing(), status, body)
}

/// An answer signed with `identity`'s key, under its id.
pub(super) fn signed_by(identity: &PlatformIdentity, status: StatusCode, body: Option<Value>) -> Response {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let timestamp = now().to_string();
    let nonce = random_token(32);
    let signature = identity.signer.sign(&signed_message(&timestamp, &nonce, body.as_bytes()));
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    let mut set = |k: &'static str, v: &str| {
        h.insert(k, v.parse().expect("header value"));
    };
    set("content-type", "application/json");
    set("wechatpay-timestamp", &timestamp);
    set("wechatpay-nonce", &nonce);
    set("wechatpay-signature", &signature);
    set("wechatpay-serial", &identity.id);
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
    let Some(auth) = Authorization::parse(auth) else {
        return refuse("unknown Authorization scheme");
    };
    if auth.mchid != config.mchid {
        return refuse("mchid does not match");
    }
    if auth.serial_no != config.merchant_serial {
        return refuse("serial_no is not the merchant certificate's");
    }
    let timestamp: i64 = auth.timestamp.parse().unwrap_or(0);
    if now().abs_diff(timestamp) >= 300 {
        return refuse("timestamp is too far from now");
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if !auth.verifies(&config.merchant_public_key, method.as_str(), path, body) {
        return refuse("signature does not verify");
    }
    Ok(())
}

/// A merchant's APIv3 call that passed what WeChat Pay checks first: a
/// merchant is configured, the service is up, and the merchant's signature
/// covers the method, path, query and body.
pub(super) struct V3Call {
    pub(super) sim: Sim,
    pub(super) body: Bytes,
}

impl V3Call {
    pub(super) fn config(&self) -> &SimPayConfig {
        pay_config(&self.sim).expect("the gate found the merchant")
    }
}

impl FromRequest<Sim> for V3Call {
    type Rejection = Response;

    async fn from_request(request: Request, sim: &Sim) -> Result<Self, Response> {
        let Some(config) = pay_config(sim) else {
            return Err(v3_error(
                StatusCode::NOT_FOUND,
                "NOT_ENABLED",
                "the simulator has no WeChat Pay merchant",
            ));
        };
        if sim.gate(None).await.is_err() {
            return Err(v3_error(StatusCode::SERVICE_UNAVAILABLE, "SYSTEM_ERROR", "system error"));
        }
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20)
            .await
            .map_err(|_| v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "the body could not be read"))?;
        check_authorization(config, &parts.method, &parts.uri, &parts.headers, &body).map_err(|r| *r)?;
        // Public-key mode: every request names the platform public key.
        let named = parts.headers.get("wechatpay-serial").and_then(|v| v.to_str().ok());
        let signing = config.platform.signing();
        if !signing.is_certificate() && named != Some(signing.id.as_str()) {
            return Err(v3_error(
                StatusCode::UNAUTHORIZED,
                "SIGN_ERROR",
                "Wechatpay-Serial must name the platform public key (PUB_KEY_ID_…)",
            ));
        }
        Ok(V3Call { sim: sim.clone(), body })
    }
}

async fn jsapi(call: V3Call) -> Response {
    place(call, TradeType::Jsapi, "")
}

async fn native(call: V3Call) -> Response {
    place(call, TradeType::Native, "")
}

async fn h5(headers: HeaderMap, call: V3Call) -> Response {
    // The cashier page is the simulator's own, where the merchant reached it.
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    place(call, TradeType::H5, &format!("http://{host}/sim/pay/h5"))
}

/// Places an order of any trade type; the answer carries what that type pays
/// with (`cashier`: where H5 payers are sent).
fn place(call: V3Call, trade: TradeType, cashier: &str) -> Response {
    let config = call.config();
    let Ok(o) = serde_json::from_slice::<Value>(&call.body) else {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "the body is not JSON");
    };
    let text = |k: &str| o[k].as_str().map(str::to_string);
    let (Some(appid), Some(mchid), Some(description), Some(no), Some(expire), Some(notify_url), Some(total)) = (
        text("appid"),
        text("mchid"),
        text("description"),
        text("out_trade_no"),
        text("time_expire"),
        text("notify_url"),
        o["amount"]["total"].as_i64(),
    ) else {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "a required field is missing");
    };
    let openid = o["payer"]["openid"].as_str().map(str::to_string);
    match trade {
        TradeType::Jsapi if openid.is_none() => {
            return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "payer.openid is required");
        }
        TradeType::H5
            if o["scene_info"]["payer_client_ip"]
                .as_str()
                .is_none_or(|ip| ip.parse::<std::net::IpAddr>().is_err())
                || o["scene_info"]["h5_info"]["type"].as_str().is_none() =>
        {
            return v3_error(
                StatusCode::BAD_REQUEST,
                "PARAM_ERROR",
                "scene_info.payer_client_ip and scene_info.h5_info.type are required",
            );
        }
        _ => {}
    }
    if appid != config.appid || mchid != config.mchid {
        return v3_error(StatusCode::BAD_REQUEST, "APPID_MCHID_NOT_MATCH", "appid and mchid do not match");
    }
    let Some(time_expire) = parse_rfc3339(&expire) else {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "time_expire is not RFC 3339");
    };
    let order = NewOrder {
        api: Api::V3,
        trade,
        appid,
        mchid,
        description,
        no,
        total,
        openid: openid.filter(|_| trade == TradeType::Jsapi),
        notify_url,
        time_expire,
        attach: text("attach"),
        payer_client_ip: o["scene_info"]["payer_client_ip"].as_str().map(str::to_string),
    };
    let answer = match call.sim.place_order(order) {
        Ok(prepay_id) => match trade {
            TradeType::Jsapi => json!({ "prepay_id": prepay_id }),
            TradeType::Native => json!({ "code_url": code_url_of(&prepay_id) }),
            TradeType::H5 => json!({ "h5_url": format!("{cashier}?prepay_id={prepay_id}") }),
        },
        Err((code, message)) => return v3_error(StatusCode::BAD_REQUEST, code, message),
    };
    v3_signed(config, StatusCode::OK, Some(answer))
}

#[derive(Deserialize)]
struct MchidQuery {
    mchid: Option<String>,
}

async fn query(Path(no): Path<String>, Query(q): Query<MchidQuery>, call: V3Call) -> Response {
    let config = call.config();
    if q.mchid.as_deref() != Some(config.mchid.as_str()) {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "mchid is missing or wrong");
    }
    let pay = call.sim.pay.lock().expect("sim pay lock");
    let Some(o) = pay.orders.get(&no) else {
        return v3_error(StatusCode::NOT_FOUND, "ORDER_NOT_EXIST", "订单不存在");
    };
    v3_signed(config, StatusCode::OK, Some(transaction_json(&no, o)))
}

async fn close(Path(no): Path<String>, call: V3Call) -> Response {
    let config = call.config();
    match call.sim.close(&no) {
        Ok(()) => v3_signed(config, StatusCode::NO_CONTENT, None),
        Err((code, message)) => v3_error(StatusCode::BAD_REQUEST, code, message),
    }
}
