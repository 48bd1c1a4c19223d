//! The simulated trade bills: APIv3 `GET /v3/bill/tradebill` (a signed
//! answer naming the file's SHA-1 and where to download it, the file then
//! served to a signed `GET`) and APIv2 `/pay/downloadbill` (the file itself).
//! A day's bill lists the payments that succeeded that day and the refunds
//! asked for that day, each in its state now (China Standard Time). Tests
//! can make the simulator serve files that do not match their hash or name
//! another host to download them from (`/sim/pay/bills/tamper`), and move
//! every trade back in time (`/sim/pay/backdate`: yesterday's bill).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use sha1::Digest as _;

use super::PayData;
use super::v3::{V3Call, v3_error, v3_signed};
use crate::sim::{Sim, random_hex};
use crate::wechat::pay::bill::{self, BillLine, BillRefund};
use crate::wechat::pay::v2;
use crate::wechat::pay::{day_bounds, parse_day};

pub(super) fn routes() -> axum::Router<Sim> {
    axum::Router::new()
        .route("/v3/bill/tradebill", get(tradebill))
        .route("/v3/billdownload/file", get(download))
        .route("/pay/downloadbill", post(downloadbill))
        .route("/sim/pay/bills/tamper", post(tamper_route))
        .route("/sim/pay/backdate", post(backdate_route))
}

impl PayData {
    /// The lines of a day's bill: the payments that succeeded then, and the
    /// refunds asked for then (in their state now, as WeChat Pay writes it).
    fn bill_lines(&self, appid: &str, mchid: &str, (start, end): (i64, i64)) -> Vec<BillLine> {
        let within = |t: Option<i64>| t.is_some_and(|t| (start..end).contains(&t));
        let mut lines = Vec::new();
        for (no, o) in &self.orders {
            if o.state == "SUCCESS" && within(o.success_time) {
                lines.push(BillLine {
                    trade_time: o.success_time.unwrap_or_default(),
                    appid: o.appid.clone(),
                    mchid: o.mchid.clone(),
                    transaction_id: o.transaction_id.clone().unwrap_or_default(),
                    out_trade_no: no.clone(),
                    openid: o.openid.clone().unwrap_or_default(),
                    trade_type: o.trade.name().into(),
                    trade_state: "SUCCESS".into(),
                    amount_fen: o.total,
                    refund: None,
                    description: o.description.clone(),
                });
            }
        }
        for (no, r) in &self.refunds {
            if !within(Some(r.created)) {
                continue;
            }
            let order = self.orders.get(&r.out_trade_no);
            lines.push(BillLine {
                trade_time: r.created,
                appid: order.map_or_else(|| appid.to_string(), |o| o.appid.clone()),
                mchid: mchid.to_string(),
                transaction_id: r.transaction_id.clone(),
                out_trade_no: r.out_trade_no.clone(),
                openid: order.and_then(|o| o.openid.clone()).unwrap_or_default(),
                trade_type: order.map_or("JSAPI", |o| o.trade.name()).into(),
                trade_state: "REFUND".into(),
                amount_fen: 0,
                refund: Some(BillRefund {
                    refund_id: r.refund_id.clone(),
                    out_refund_no: no.clone(),
                    amount_fen: r.amount,
                    status: v2::v2_refund_status_of(r.status).into(),
                }),
                description: order.map(|o| o.description.clone()).unwrap_or_default(),
            });
        }
        lines.sort_by(|a, b| (a.trade_time, &a.out_trade_no).cmp(&(b.trade_time, &b.out_trade_no)));
        lines
    }
}

impl Sim {
    /// The bill file of a day, or `None` for a day without trades (WeChat Pay
    /// then has no bill).
    fn bill_file(&self, date: &str) -> Result<Option<Vec<u8>>, &'static str> {
        let config = super::pay_config(self).ok_or("the simulator has no WeChat Pay merchant")?;
        let bounds = parse_day(date).map(day_bounds).ok_or("bill_date is not a day")?;
        let pay = self.pay.lock().expect("sim pay lock");
        let lines = pay.bill_lines(&config.appid, &config.mchid, bounds);
        Ok((!lines.is_empty()).then(|| bill::write(&lines).into_bytes()))
    }

    /// From now on, bill files do not match the hash the answer names (or,
    /// with `false`, they do again).
    pub fn corrupt_bills(&self, on: bool) {
        self.pay.lock().expect("sim pay lock").corrupt_bills = on;
    }

    /// From now on, bill answers name `host` (`host:port`) as where their file
    /// is downloaded from (`None`: where the merchant reached WeChat Pay).
    pub fn bill_download_host(&self, host: Option<String>) {
        self.pay.lock().expect("sim pay lock").bill_download_host = host;
    }

    /// Moves every payment and refund `seconds` back in time, as if they had
    /// happened then (a test of yesterday's bill).
    pub fn backdate_pay(&self, seconds: i64) {
        let mut pay = self.pay.lock().expect("sim pay lock");
        for o in pay.orders.values_mut() {
            o.success_time = o.success_time.map(|t| t - seconds);
        }
        for r in pay.refunds.values_mut() {
            r.created -= seconds;
            r.success_time = r.success_time.map(|t| t - seconds);
        }
    }
}

#[derive(Deserialize)]
struct TradeBillQuery {
    bill_date: String,
    bill_type: Option<String>,
}

async fn tradebill(Query(q): Query<TradeBillQuery>, headers: HeaderMap, call: V3Call) -> Response {
    let config = call.config();
    if q.bill_type.as_deref().is_some_and(|t| !["ALL", "SUCCESS", "REFUND"].contains(&t)) {
        return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", "bill_type is not ALL, SUCCESS or REFUND");
    }
    let file = match call.sim.bill_file(&q.bill_date) {
        Ok(Some(file)) => file,
        Ok(None) => return v3_error(StatusCode::BAD_REQUEST, "NO_STATEMENT_EXIST", "账单文件不存在"),
        Err(why) => return v3_error(StatusCode::BAD_REQUEST, "PARAM_ERROR", why),
    };
    let hash = hex::encode(sha1::Sha1::digest(&file));
    let token = random_hex(16);
    let mut pay = call.sim.pay.lock().expect("sim pay lock");
    let served = if pay.corrupt_bills {
        // Changed on the way (a line more): the file no longer matches the signed hash.
        [file.as_slice(), "`2099-01-01 00:00:00".as_bytes()].concat()
    } else {
        file
    };
    pay.bill_files.insert(token.clone(), served);
    let host = pay.bill_download_host.clone().unwrap_or_else(|| {
        // The file is where the merchant reached WeChat Pay.
        headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1").to_string()
    });
    drop(pay);
    let answer = json!({
        "hash_type": "SHA1",
        "hash_value": hash,
        "download_url": format!("http://{host}/v3/billdownload/file?token={token}"),
    });
    v3_signed(config, StatusCode::OK, Some(answer))
}

#[derive(Deserialize)]
struct DownloadQuery {
    token: String,
}

/// The file itself: WeChat Pay checks the merchant's signature on the
/// request but does not sign the file (its hash is in the signed answer).
async fn download(Query(q): Query<DownloadQuery>, call: V3Call) -> Response {
    let file = call.sim.pay.lock().expect("sim pay lock").bill_files.get(&q.token).cloned();
    match file {
        Some(file) => ([("content-type", "application/octet-stream")], file).into_response(),
        None => v3_error(StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "the download token is unknown"),
    }
}

/// APIv2: the bill itself as text, or an XML refusal (`No Bill Exist`).
async fn downloadbill(State(sim): State<Sim>, body: Bytes) -> Response {
    let (f, _, _) = match super::v2::v2_gate(&sim, &body).await {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let date = f.get("bill_date").cloned().unwrap_or_default();
    let (Some(y), Some(m), Some(d)) = (date.get(0..4), date.get(4..6), date.get(6..8)) else {
        return super::v2::v2_fail("bill_date must be yyyyMMdd");
    };
    match sim.bill_file(&format!("{y}-{m}-{d}")) {
        Ok(Some(file)) => ([("content-type", "text/plain; charset=utf-8")], file).into_response(),
        Ok(None) => super::v2::v2_fail_coded("No Bill Exist", "20002"),
        Err(why) => super::v2::v2_fail(why),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TamperBody {
    /// Files that do not match their hash.
    #[serde(default)]
    corrupt: bool,
    /// Another host to download files from.
    download_host: Option<String>,
}

async fn tamper_route(State(sim): State<Sim>, Json(b): Json<TamperBody>) -> Json<serde_json::Value> {
    sim.corrupt_bills(b.corrupt);
    sim.bill_download_host(b.download_host.clone());
    Json(json!({ "corrupt": b.corrupt, "download_host": b.download_host }))
}

#[derive(Deserialize)]
struct BackdateBody {
    seconds: i64,
}

async fn backdate_route(State(sim): State<Sim>, Json(b): Json<BackdateBody>) -> Json<serde_json::Value> {
    sim.backdate_pay(b.seconds);
    Json(json!({ "backdated_seconds": b.seconds }))
}
