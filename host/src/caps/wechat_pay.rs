//! `wxhost:plugin/wechat-pay`: WeChat Pay for the app role. The host alone
//! holds the merchant private key and the API keys; plugins ask it to place,
//! query and close orders and to sign the frontend's pay parameters.
//!
//! APIv3 (default): JSON requests signed `WECHATPAY2-SHA256-RSA2048` with the
//! merchant key; every successful answer's `Wechatpay-Signature` is verified
//! against the platform key its `Wechatpay-Serial` names (a platform
//! certificate's serial or a `PUB_KEY_ID_…`). APIv2
//! (`WECHATPAY_API_VERSION=v2`): XML signed with the APIv2 key (HMAC-SHA256 or
//! MD5), and the answers' `sign` checked the same way.

use futures::future::BoxFuture;

use super::{CapabilitySpec, Context, PluginState, ServiceInputs};
use crate::role::Role;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use wasmtime::component::{HasData, Linker};

use crate::bindings::wxhost::plugin::wechat_pay::{
    self as wit, BillEntry, BillRefund, BrowserOrder, JsapiOrder, OrderState, PayError, PayParams,
    RefundRequest, RefundState,
};
use crate::settings::Settings;
use crate::wechat::pay::bill::{self, BillLine};
use crate::wechat::pay::v2::{self, v2_sign};
use crate::wechat::pay::v3::SignedRequest;
use crate::wechat::pay::{
    LiveKeys, RsaSigner, SignatureHeaders, V2SignType, is_merchant_order_no, parse_rfc3339, random_token,
    rfc3339_cst,
};
use crate::wechat::xml::{field, flat_xml, to_xml};

/// The production API; WECHATPAY_API_BASE overrides it (the simulator, a proxy).
pub const DEFAULT_BASE: &str = "https://api.mch.weixin.qq.com";
/// Longest single call to WeChat Pay.
const MAX_CALL: Duration = Duration::from_secs(10);
/// Time kept back from the plugin's deadline so it can still answer its caller.
const ANSWER_MARGIN: Duration = Duration::from_millis(250);

/// How requests are signed and answers checked.
pub enum PayApi {
    V3 {
        merchant_key: Box<RsaSigner>,
        /// The merchant API certificate's serial (`serial_no`).
        serial: String,
        /// Shared with the notify checks; renewed in place in certificate mode.
        platform: LiveKeys,
        /// Public-key mode: the `PUB_KEY_ID_…` every request names in
        /// `Wechatpay-Serial` (WeChat Pay answers signature errors without it
        /// while a merchant moves from platform certificates to a public key).
        public_key_id: Option<String>,
    },
    V2 {
        key: SecretString,
        sign_type: V2SignType,
    },
}

/// The owned context: merchant identity, keys and HTTP client.
pub struct WechatPay {
    base: String,
    appid: String,
    mchid: String,
    notify_url: String,
    api: PayApi,
    http: reqwest::Client,
    /// APIv2's `/secapi/` calls (refunds): the merchant API certificate and
    /// key presented to WeChat Pay (mutual TLS).
    certified_http: Option<reqwest::Client>,
}

impl WechatPay {
    pub fn new(
        base: Option<&str>,
        appid: String,
        mchid: String,
        notify_url: String,
        api: PayApi,
    ) -> anyhow::Result<WechatPay> {
        let base = base.unwrap_or(DEFAULT_BASE).trim_end_matches('/').to_string();
        anyhow::ensure!(
            base.starts_with("https://") || base.starts_with("http://"),
            "WECHATPAY_API_BASE must be an http(s) URL"
        );
        let http = client_builder().build()?;
        Ok(WechatPay { base, appid, mchid, notify_url, api, http, certified_http: None })
    }

    /// Presents the merchant API certificate (`apiclient_cert.pem`) and its
    /// private key on APIv2's `/secapi/` calls.
    pub fn with_client_certificate(
        mut self,
        certificate_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<WechatPay> {
        anyhow::ensure!(
            crate::wechat::pay::certificates::parse_certificate_pem(certificate_pem).is_some(),
            "not a PEM X.509 certificate with an RSA key"
        );
        let identity = reqwest::Identity::from_pem(format!("{certificate_pem}\n{key_pem}").as_bytes())
            .context("the certificate and the private key do not make a TLS client identity")?;
        self.certified_http = Some(client_builder().identity(identity).build()?);
        Ok(self)
    }

    /// From the settings, or `None` when WECHATPAY_MCHID is not set. Every
    /// missing or broken setting is reported at once, by name, never by value.
    pub fn from_settings(s: &Settings) -> anyhow::Result<Option<WechatPay>> {
        let Some(mchid) = s.wechatpay_mchid.clone() else { return Ok(None) };
        let mut problems = Vec::new();
        let mut need = |value: Option<String>, name: &str| {
            if value.is_none() {
                problems.push(format!("{name} is not set"));
            }
            value.unwrap_or_default()
        };
        let appid = need(s.wechat_appid.clone(), "WECHAT_APPID");
        let notify_url = need(s.wechatpay_notify_url.clone(), "WECHATPAY_NOTIFY_URL");
        let version = s.wechatpay_api_version.as_deref().unwrap_or("v3");
        let api = match version {
            "v3" => {
                let serial = need(s.wechatpay_serial.clone(), "WECHATPAY_SERIAL");
                let key_path = need(
                    s.wechatpay_private_key.as_ref().map(|p| p.display().to_string()),
                    "WECHATPAY_PRIVATE_KEY",
                );
                let merchant_key = if key_path.is_empty() {
                    None
                } else {
                    match std::fs::read_to_string(&key_path)
                        .context("cannot be read")
                        .and_then(|pem| RsaSigner::from_pem(&pem))
                    {
                        Ok(k) => Some(k),
                        Err(e) => {
                            problems.push(format!("WECHATPAY_PRIVATE_KEY ({key_path}): {e:#}"));
                            None
                        }
                    }
                };
                let platform = match s.platform_keys() {
                    Ok(Some(keys)) => Some(keys),
                    Ok(None) => {
                        problems.push(
                            "WECHATPAY_PLATFORM_PUBLIC_KEY is not set (needed to verify WeChat Pay's answers)"
                                .into(),
                        );
                        None
                    }
                    Err(e) => {
                        problems.push(format!("{e:#}"));
                        None
                    }
                };
                if s.wechatpay_apiv3_key.is_none() {
                    problems.push("WECHATPAY_APIV3_KEY is not set".into());
                }
                match (merchant_key, platform) {
                    (Some(merchant_key), Some(platform)) => Some(PayApi::V3 {
                        merchant_key: Box::new(merchant_key),
                        serial,
                        platform: LiveKeys::new(platform),
                        public_key_id: s.wechatpay_public_key_id.clone(),
                    }),
                    _ => None,
                }
            }
            "v2" => {
                let sign_type = s.apiv2_sign_type().map_err(|e| problems.push(e.to_string())).ok();
                match (&s.wechatpay_apiv2_key, sign_type) {
                    (Some(key), Some(sign_type)) => Some(PayApi::V2 { key: key.clone(), sign_type }),
                    (None, _) => {
                        problems.push("WECHATPAY_APIV2_KEY is not set".into());
                        None
                    }
                    _ => None,
                }
            }
            _ => {
                problems.push("WECHATPAY_API_VERSION must be v3 or v2".into());
                None
            }
        };
        // The merchant API certificate, for APIv2's refunds (mutual TLS).
        let client_identity = match (&s.wechatpay_client_cert, &s.wechatpay_private_key) {
            (None, _) => None,
            (Some(_), None) => {
                problems.push("WECHATPAY_CLIENT_CERT needs its private key in WECHATPAY_PRIVATE_KEY".into());
                None
            }
            (Some(cert), Some(key)) => {
                let mut read = |p: &std::path::Path, name: &str| {
                    std::fs::read_to_string(p)
                        .map_err(|e| problems.push(format!("{name} ({}) cannot be read: {e}", p.display())))
                        .ok()
                };
                let pair = (read(cert, "WECHATPAY_CLIENT_CERT"), read(key, "WECHATPAY_PRIVATE_KEY"));
                match pair {
                    (Some(c), Some(k)) => Some((c, k)),
                    _ => None,
                }
            }
        };
        match api {
            Some(api) if problems.is_empty() => {
                let pay = WechatPay::new(s.wechatpay_api_base.as_deref(), appid, mchid, notify_url, api)?;
                Ok(Some(match client_identity {
                    Some((cert, key)) => {
                        pay.with_client_certificate(&cert, &key).context("WECHATPAY_CLIENT_CERT")?
                    }
                    None => pay,
                }))
            }
            _ => anyhow::bail!(
                "WeChat Pay (WECHATPAY_MCHID is set) is misconfigured:\n  {}",
                problems.join("\n  ")
            ),
        }
    }

    /// Checks WeChat Pay's answers with `live`, the process's shared keys.
    pub fn share_platform_keys(mut self, live: Option<LiveKeys>) -> Self {
        if let (PayApi::V3 { platform, .. }, Some(live)) = (&mut self.api, live) {
            *platform = live;
        }
        self
    }

    pub fn merchant(&self) -> (String, String) {
        (self.appid.clone(), self.mchid.clone())
    }

    /// Places a JSAPI order; returns its prepay_id.
    pub async fn jsapi_prepay(&self, order: &JsapiOrder, deadline: Instant) -> Result<String, PayError> {
        if order.payer_openid.is_empty() || order.payer_openid.len() > 128 {
            return Err(PayError::Invalid("payer_openid must be 1-128 characters".into()));
        }
        let common = BrowserOrder {
            out_trade_no: order.out_trade_no.clone(),
            description: order.description.clone(),
            amount_fen: order.amount_fen,
            time_expire: order.time_expire,
            attach: order.attach.clone(),
            payer_client_ip: order.payer_client_ip.clone(),
        };
        self.prepay(Trade::Jsapi { openid: &order.payer_openid }, &common, deadline).await
    }

    /// Places a Native order (a PC page shows the answer as a QR code); returns its `code_url`.
    pub async fn native_prepay(&self, order: &BrowserOrder, deadline: Instant) -> Result<String, PayError> {
        self.prepay(Trade::Native, order, deadline).await
    }

    /// Places an H5 order (a phone browser outside WeChat goes to the answer); returns its `h5_url`.
    pub async fn h5_prepay(&self, order: &BrowserOrder, deadline: Instant) -> Result<String, PayError> {
        self.prepay(Trade::H5, order, deadline).await
    }

    /// Places an order of any trade type; returns what its page pays with
    /// (JSAPI: the prepay_id, Native: the code_url, H5: the h5_url).
    async fn prepay(
        &self,
        trade: Trade<'_>,
        order: &BrowserOrder,
        deadline: Instant,
    ) -> Result<String, PayError> {
        check_order(order, trade)?;
        let missing = |what: &str| PayError::Unavailable(format!("WeChat Pay's answer has no {what}"));
        match &self.api {
            PayApi::V3 { .. } => {
                let mut body = json!({
                    "appid": self.appid,
                    "mchid": self.mchid,
                    "description": order.description,
                    "out_trade_no": order.out_trade_no,
                    "time_expire": rfc3339_cst(order.time_expire),
                    "notify_url": self.notify_url,
                    "amount": { "total": order.amount_fen, "currency": "CNY" },
                });
                if let Some(attach) = &order.attach {
                    body["attach"] = json!(attach);
                }
                let (path, answer_field) = match trade {
                    Trade::Jsapi { openid } => {
                        body["payer"] = json!({ "openid": openid });
                        ("/v3/pay/transactions/jsapi", "prepay_id")
                    }
                    Trade::Native => ("/v3/pay/transactions/native", "code_url"),
                    Trade::H5 => {
                        body["scene_info"] = json!({
                            "payer_client_ip": order.payer_client_ip,
                            "h5_info": { "type": "Wap" },
                        });
                        ("/v3/pay/transactions/h5", "h5_url")
                    }
                };
                let answer = self.v3(reqwest::Method::POST, path, Some(body), deadline).await?;
                answer[answer_field].as_str().map(str::to_string).ok_or_else(|| missing(answer_field))
            }
            PayApi::V2 { .. } => {
                let mut fields = vec![
                    ("body", order.description.clone()),
                    ("out_trade_no", order.out_trade_no.clone()),
                    ("total_fee", order.amount_fen.to_string()),
                    ("spbill_create_ip", order.payer_client_ip.clone().unwrap_or_else(|| "127.0.0.1".into())),
                    ("time_expire", v2::format_time(order.time_expire)),
                    ("notify_url", self.notify_url.clone()),
                ];
                if let Some(attach) = &order.attach {
                    fields.push(("attach", attach.clone()));
                }
                let answer_field = match trade {
                    Trade::Jsapi { openid } => {
                        fields.push(("trade_type", "JSAPI".into()));
                        fields.push(("openid", openid.to_string()));
                        "prepay_id"
                    }
                    Trade::Native => {
                        fields.push(("trade_type", "NATIVE".into()));
                        // APIv2 wants a product id for Native; the order is its own.
                        fields.push(("product_id", order.out_trade_no.clone()));
                        "code_url"
                    }
                    Trade::H5 => {
                        fields.push(("trade_type", "MWEB".into()));
                        let site = url::Url::parse(&self.notify_url)
                            .map(|u| u.origin().ascii_serialization())
                            .unwrap_or_default();
                        let scene = json!({ "h5_info": { "type": "Wap", "wap_url": site, "wap_name": order.description } });
                        fields.push(("scene_info", scene.to_string()));
                        "mweb_url"
                    }
                };
                let answer = self.v2("/pay/unifiedorder", fields, deadline).await?;
                field(&answer, answer_field).ok_or_else(|| missing(answer_field))
            }
        }
    }

    /// Asks WeChat Pay to give money back on a paid order.
    pub async fn refund(&self, r: &RefundRequest, deadline: Instant) -> Result<RefundState, PayError> {
        check_out_trade_no(&r.out_trade_no)?;
        check_out_refund_no(&r.out_refund_no)?;
        if r.amount_fen <= 0 || r.total_fen <= 0 || r.amount_fen > r.total_fen {
            return Err(PayError::Invalid("amount_fen must be positive and at most total_fen".into()));
        }
        if r.reason.as_ref().is_some_and(|why| why.chars().count() > 80) {
            return Err(PayError::Invalid("reason must be at most 80 characters".into()));
        }
        if let PayApi::V2 { .. } = &self.api {
            let http = self.certified_http.as_ref().ok_or_else(|| {
                PayError::NotConfigured(
                    "APIv2 refunds need the merchant API certificate: set WECHATPAY_CLIENT_CERT and WECHATPAY_PRIVATE_KEY"
                        .into(),
                )
            })?;
            let mut fields = vec![
                ("out_trade_no", r.out_trade_no.clone()),
                ("out_refund_no", r.out_refund_no.clone()),
                ("total_fee", r.total_fen.to_string()),
                ("refund_fee", r.amount_fen.to_string()),
                ("notify_url", self.notify_url.clone()),
            ];
            if let Some(reason) = &r.reason {
                fields.push(("refund_desc", reason.clone()));
            }
            let a = self.v2_on(http, "/secapi/pay/refund", fields, deadline).await?;
            // Accepted: the bank settles it later (query or notify).
            return Ok(RefundState {
                out_refund_no: field(&a, "out_refund_no").unwrap_or_else(|| r.out_refund_no.clone()),
                out_trade_no: field(&a, "out_trade_no").unwrap_or_else(|| r.out_trade_no.clone()),
                refund_id: field(&a, "refund_id"),
                status: "PROCESSING".into(),
                amount_fen: field(&a, "refund_fee").and_then(|f| f.parse().ok()).unwrap_or(r.amount_fen),
                success_time: None,
            });
        }
        let mut body = json!({
            "out_trade_no": r.out_trade_no,
            "out_refund_no": r.out_refund_no,
            "notify_url": self.notify_url,
            "amount": { "refund": r.amount_fen, "total": r.total_fen, "currency": "CNY" },
        });
        if let Some(reason) = &r.reason {
            body["reason"] = json!(reason);
        }
        let answer =
            self.v3(reqwest::Method::POST, "/v3/refund/domestic/refunds", Some(body), deadline).await?;
        refund_state(&answer, &r.out_refund_no)
    }

    /// A refund's state at WeChat Pay.
    pub async fn query_refund(
        &self,
        out_refund_no: &str,
        deadline: Instant,
    ) -> Result<RefundState, PayError> {
        check_out_refund_no(out_refund_no)?;
        if let PayApi::V2 { .. } = &self.api {
            let a = self
                .v2("/pay/refundquery", vec![("out_refund_no", out_refund_no.to_string())], deadline)
                .await?;
            // One refund asked for by its number: the answer's entry 0.
            let status = field(&a, "refund_status_0")
                .and_then(|s| v2::v3_refund_status_of(&s))
                .ok_or_else(|| PayError::Unavailable("WeChat Pay's answer has no refund_status_0".into()))?;
            return Ok(RefundState {
                out_refund_no: field(&a, "out_refund_no_0").unwrap_or_else(|| out_refund_no.to_string()),
                out_trade_no: field(&a, "out_trade_no").unwrap_or_default(),
                refund_id: field(&a, "refund_id_0"),
                status: status.into(),
                amount_fen: field(&a, "refund_fee_0").and_then(|f| f.parse().ok()).unwrap_or_default(),
                success_time: field(&a, "refund_success_time_0")
                    .and_then(|t| crate::wechat::pay::parse_cst_datetime(&t)),
            });
        }
        let path = format!("/v3/refund/domestic/refunds/{out_refund_no}");
        let answer = self.v3(reqwest::Method::GET, &path, None, deadline).await?;
        refund_state(&answer, out_refund_no)
    }

    /// The frontend's `getBrandWCPayRequest` parameters for a prepay_id.
    pub fn jsapi_pay_params(&self, prepay_id: &str) -> Result<PayParams, PayError> {
        if prepay_id.is_empty() || prepay_id.len() > 128 || !prepay_id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(PayError::Invalid("prepay_id must be 1-128 visible ASCII characters".into()));
        }
        let time_stamp = unix_now().to_string();
        let nonce_str = random_token(32);
        let package = format!("prepay_id={prepay_id}");
        let (sign_type, pay_sign) = match &self.api {
            PayApi::V3 { merchant_key, .. } => (
                "RSA".to_string(),
                merchant_key
                    .sign(format!("{}\n{time_stamp}\n{nonce_str}\n{package}\n", self.appid).as_bytes()),
            ),
            PayApi::V2 { key, sign_type } => {
                let name = sign_type.name();
                let fields = [
                    ("appId", self.appid.as_str()),
                    ("timeStamp", time_stamp.as_str()),
                    ("nonceStr", nonce_str.as_str()),
                    ("package", package.as_str()),
                    ("signType", name),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string()));
                (name.to_string(), v2_sign(&fields, key.expose_secret(), *sign_type))
            }
        };
        Ok(PayParams { app_id: self.appid.clone(), time_stamp, nonce_str, package, sign_type, pay_sign })
    }

    /// The order's state at WeChat Pay.
    pub async fn query_order(&self, out_trade_no: &str, deadline: Instant) -> Result<OrderState, PayError> {
        check_out_trade_no(out_trade_no)?;
        match &self.api {
            PayApi::V3 { .. } => {
                let path = format!("/v3/pay/transactions/out-trade-no/{out_trade_no}?mchid={}", self.mchid);
                let a = self.v3(reqwest::Method::GET, &path, None, deadline).await?;
                let text = |k: &str| a[k].as_str().map(str::to_string);
                Ok(OrderState {
                    out_trade_no: text("out_trade_no").unwrap_or_else(|| out_trade_no.to_string()),
                    trade_state: text("trade_state").ok_or_else(|| {
                        PayError::Unavailable("WeChat Pay's answer has no trade_state".into())
                    })?,
                    transaction_id: text("transaction_id"),
                    amount_fen: a["amount"]["total"].as_i64(),
                    appid: text("appid").unwrap_or_default(),
                    mchid: text("mchid").unwrap_or_default(),
                    success_time: a["success_time"].as_str().and_then(parse_rfc3339),
                })
            }
            PayApi::V2 { .. } => {
                let a = self
                    .v2("/pay/orderquery", vec![("out_trade_no", out_trade_no.to_string())], deadline)
                    .await?;
                Ok(OrderState {
                    out_trade_no: field(&a, "out_trade_no").unwrap_or_else(|| out_trade_no.to_string()),
                    trade_state: field(&a, "trade_state").ok_or_else(|| {
                        PayError::Unavailable("WeChat Pay's answer has no trade_state".into())
                    })?,
                    transaction_id: field(&a, "transaction_id"),
                    amount_fen: field(&a, "total_fee").and_then(|f| f.parse().ok()),
                    appid: field(&a, "appid").unwrap_or_default(),
                    mchid: field(&a, "mch_id").unwrap_or_default(),
                    success_time: field(&a, "time_end").and_then(|t| v2::parse_time(&t)),
                })
            }
        }
    }

    /// Closes an unpaid order.
    pub async fn close_order(&self, out_trade_no: &str, deadline: Instant) -> Result<(), PayError> {
        check_out_trade_no(out_trade_no)?;
        match &self.api {
            PayApi::V3 { .. } => {
                let path = format!("/v3/pay/transactions/out-trade-no/{out_trade_no}/close");
                self.v3(reqwest::Method::POST, &path, Some(json!({ "mchid": self.mchid })), deadline).await?;
            }
            PayApi::V2 { .. } => {
                self.v2("/pay/closeorder", vec![("out_trade_no", out_trade_no.to_string())], deadline)
                    .await?;
            }
        }
        Ok(())
    }

    /// The trade bill of `bill_date` (`YYYY-MM-DD`, China Standard Time).
    /// APIv3: the signed `tradebill` answer names the file and its SHA-1; the
    /// file (which WeChat Pay does not sign) is used only if it matches.
    /// APIv2: `downloadbill` answers the file itself (over TLS, unsigned).
    pub async fn trade_bill(&self, bill_date: &str, deadline: Instant) -> Result<Vec<BillLine>, PayError> {
        let day = crate::wechat::pay::parse_day(bill_date)
            .ok_or_else(|| PayError::Invalid("bill_date must be YYYY-MM-DD".into()))?;
        let text = match &self.api {
            PayApi::V3 { .. } => {
                let path = format!("/v3/bill/tradebill?bill_date={bill_date}&bill_type=ALL");
                let a = self.v3(reqwest::Method::GET, &path, None, deadline).await?;
                let (Some(hash_type), Some(hash), Some(url)) =
                    (a["hash_type"].as_str(), a["hash_value"].as_str(), a["download_url"].as_str())
                else {
                    return Err(PayError::Unavailable("WeChat Pay's bill answer lacks its file".into()));
                };
                // The request is signed with the merchant key: only WeChat Pay's own address gets it.
                let Some(file_path) = url.strip_prefix(&self.base).filter(|p| p.starts_with('/')) else {
                    tracing::warn!("the bill's download_url is not under WECHATPAY_API_BASE; not fetched");
                    return Err(PayError::BadSignature);
                };
                let started = Instant::now();
                let file = self.v3_exchange(reqwest::Method::GET, file_path, None, deadline).await;
                crate::metrics::outbound("wechatpay", "bill_download", outcome(&file), started.elapsed());
                let (_, body) = file?;
                if !hash_type.eq_ignore_ascii_case("SHA1") || !bill::sha1_matches(&body, hash) {
                    tracing::warn!(bill_date, "the downloaded bill does not match the signed hash; refused");
                    return Err(PayError::BadSignature);
                }
                String::from_utf8(body.to_vec())
                    .map_err(|_| PayError::Unavailable("WeChat Pay's bill is not UTF-8".into()))?
            }
            PayApi::V2 { .. } => {
                let date = format!("{:04}{:02}{:02}", day.year(), u8::from(day.month()), day.day());
                let started = Instant::now();
                let fields = vec![("bill_date", date), ("bill_type", "ALL".to_string())];
                let answer = self.v2_send(&self.http, "/pay/downloadbill", fields, deadline).await;
                crate::metrics::outbound("wechatpay", "trade_bill", outcome(&answer), started.elapsed());
                let text = answer?;
                // A refusal is XML; the bill is not.
                if text.trim_start().starts_with("<xml") {
                    let answer = flat_xml(&text)
                        .map_err(|_| PayError::Unavailable("WeChat Pay's answer is not its XML".into()))?;
                    let message = field(&answer, "return_msg").unwrap_or_else(|| "no bill".into());
                    let code = if message.eq_ignore_ascii_case("No Bill Exist") {
                        "NO_STATEMENT_EXIST".to_string()
                    } else {
                        field(&answer, "error_code").unwrap_or_else(|| "FAIL".into())
                    };
                    return Err(PayError::Refused((code, message)));
                }
                text
            }
        };
        bill::parse(&text).map_err(|e| {
            tracing::warn!(bill_date, "WeChat Pay's bill could not be read: {e}");
            PayError::Unavailable(format!("WeChat Pay's bill could not be read: {e}"))
        })
    }

    /// One signed APIv3 call; a successful answer's signature is verified
    /// before its body is trusted (as WeChat Pay's own SDKs do, refusals are
    /// reported without it: they change nothing).
    async fn v3(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, PayError> {
        let started = Instant::now();
        let result = self.v3_once(method, path_and_query, body, deadline).await;
        crate::metrics::outbound("wechatpay", call_name(path_and_query), outcome(&result), started.elapsed());
        result
    }

    async fn v3_once(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, PayError> {
        let (signed, bytes) = self.v3_exchange(method, path_and_query, body, deadline).await?;
        let PayApi::V3 { platform, .. } = &self.api else {
            return Err(PayError::NotConfigured("not an APIv3 merchant".into()));
        };
        // A new certificate signing is waited for (certificate mode), within the call's time.
        let wait = deadline.saturating_duration_since(Instant::now()).min(RENEWAL_WAIT);
        if let Err(why) = platform.verify_or_await_renewal(&signed, &bytes, wait).await {
            tracing::warn!(path = path_and_query.split('?').next(), %why, "WeChat Pay answer refused");
            return Err(PayError::BadSignature);
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .map_err(|_| PayError::Unavailable("WeChat Pay's answer is not JSON".into()))
    }

    /// `GET /v3/certificates`, its signature not yet checked: that takes the
    /// certificates inside, opened with the APIv3 key
    /// ([`crate::wechat::pay::certificates::accept_answer`]).
    pub async fn certificates_answer(
        &self,
        deadline: Instant,
    ) -> Result<(SignatureHeaders, axum::body::Bytes), PayError> {
        let started = Instant::now();
        let result = self.v3_exchange(reqwest::Method::GET, "/v3/certificates", None, deadline).await;
        crate::metrics::outbound("wechatpay", "certificates", outcome(&result), started.elapsed());
        result
    }

    /// Sends one signed APIv3 request; a successful answer comes back with its
    /// `Wechatpay-*` headers, unchecked.
    async fn v3_exchange(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Value>,
        deadline: Instant,
    ) -> Result<(SignatureHeaders, axum::body::Bytes), PayError> {
        let PayApi::V3 { merchant_key, serial, public_key_id, .. } = &self.api else {
            return Err(PayError::NotConfigured("not an APIv3 merchant".into()));
        };
        let timeout = time_left(deadline)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let timestamp = unix_now().to_string();
        let nonce = random_token(32);
        let authorization = SignedRequest {
            method: method.as_str(),
            path_and_query,
            timestamp: &timestamp,
            nonce: &nonce,
            body: &body,
        }
        .authorization(merchant_key, &self.mchid, serial);
        let mut request = self
            .http
            .request(method, format!("{}{path_and_query}", self.base))
            .header(reqwest::header::AUTHORIZATION, authorization)
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(timeout);
        if let Some(id) = public_key_id {
            request = request.header("Wechatpay-Serial", id);
        }
        if !body.is_empty() {
            request = request.header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        }
        let response = request.send().await.map_err(classify)?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(classify)?;
        if status.is_server_error() {
            return Err(PayError::Unavailable(format!("WeChat Pay answered {}", status.as_u16())));
        }
        if !status.is_success() {
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let code = answer["code"].as_str().unwrap_or("UNKNOWN").to_string();
            let message = answer["message"].as_str().unwrap_or("WeChat Pay refused the request").to_string();
            return Err(PayError::Refused((code, message)));
        }
        let signed = SignatureHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
        Ok((signed, bytes))
    }

    /// One signed APIv2 call; the answer's `sign` is checked, then
    /// `return_code` and `result_code`.
    async fn v2(
        &self,
        path: &str,
        fields: Vec<(&str, String)>,
        deadline: Instant,
    ) -> Result<Vec<(String, String)>, PayError> {
        self.v2_on(&self.http, path, fields, deadline).await
    }

    /// [`Self::v2`] over `http` (the certified client for `/secapi/`).
    async fn v2_on(
        &self,
        http: &reqwest::Client,
        path: &str,
        fields: Vec<(&str, String)>,
        deadline: Instant,
    ) -> Result<Vec<(String, String)>, PayError> {
        let started = Instant::now();
        let result = self.v2_once(http, path, fields, deadline).await;
        crate::metrics::outbound("wechatpay", call_name(path), outcome(&result), started.elapsed());
        result
    }

    async fn v2_once(
        &self,
        http: &reqwest::Client,
        path: &str,
        fields: Vec<(&str, String)>,
        deadline: Instant,
    ) -> Result<Vec<(String, String)>, PayError> {
        let PayApi::V2 { key, sign_type } = &self.api else {
            return Err(PayError::NotConfigured("not an APIv2 merchant".into()));
        };
        let text = self.v2_send(http, path, fields, deadline).await?;
        let answer = flat_xml(&text)
            .map_err(|_| PayError::Unavailable("WeChat Pay's answer is not its XML".into()))?;
        if field(&answer, "return_code").as_deref() != Some("SUCCESS") {
            let message =
                field(&answer, "return_msg").unwrap_or_else(|| "WeChat Pay refused the request".into());
            return Err(PayError::Refused(("FAIL".into(), message)));
        }
        let given = field(&answer, "sign").unwrap_or_default();
        // Answers are signed the way the request was, unless they say otherwise.
        let answer_type =
            field(&answer, "sign_type").and_then(|t| V2SignType::parse(Some(&t))).unwrap_or(*sign_type);
        if !v2::sign_matches(&answer, key.expose_secret(), answer_type, &given) {
            tracing::warn!(path, "WeChat Pay APIv2 answer refused: bad sign");
            return Err(PayError::BadSignature);
        }
        if field(&answer, "result_code").as_deref() != Some("SUCCESS") {
            let code = field(&answer, "err_code").unwrap_or_else(|| "FAIL".into());
            let message = field(&answer, "err_code_des").unwrap_or_else(|| code.clone());
            return Err(PayError::Refused((v2::v3_code_of(&code), message)));
        }
        Ok(answer)
    }

    /// Sends one signed APIv2 request; returns the answer's text, unchecked.
    async fn v2_send(
        &self,
        http: &reqwest::Client,
        path: &str,
        fields: Vec<(&str, String)>,
        deadline: Instant,
    ) -> Result<String, PayError> {
        let PayApi::V2 { key, sign_type } = &self.api else {
            return Err(PayError::NotConfigured("not an APIv2 merchant".into()));
        };
        let timeout = time_left(deadline)?;
        let mut all: Vec<(String, String)> = vec![
            ("appid".into(), self.appid.clone()),
            ("mch_id".into(), self.mchid.clone()),
            ("nonce_str".into(), random_token(32)),
            ("sign_type".into(), sign_type.name().into()),
        ];
        all.extend(fields.into_iter().map(|(k, v)| (k.to_string(), v)));
        let sign = v2_sign(&all, key.expose_secret(), *sign_type);
        all.push(("sign".into(), sign));
        let response = http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .body(to_xml(&all))
            .timeout(timeout)
            .send()
            .await
            .map_err(classify)?;
        if !response.status().is_success() {
            return Err(PayError::Unavailable(format!("WeChat Pay answered {}", response.status().as_u16())));
        }
        response.text().await.map_err(classify)
    }
}

fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .user_agent(concat!("wxhost/", env!("CARGO_PKG_VERSION")))
}

/// A refund as WeChat Pay describes it (the refund and query answers, and the refund notify's resource).
fn refund_state(a: &Value, out_refund_no: &str) -> Result<RefundState, PayError> {
    let text = |k: &str| a[k].as_str().map(str::to_string);
    Ok(RefundState {
        out_refund_no: text("out_refund_no").unwrap_or_else(|| out_refund_no.to_string()),
        out_trade_no: text("out_trade_no").unwrap_or_default(),
        refund_id: text("refund_id"),
        status: text("status")
            .ok_or_else(|| PayError::Unavailable("WeChat Pay's answer has no status".into()))?,
        amount_fen: a["amount"]["refund"].as_i64().unwrap_or_default(),
        success_time: a["success_time"].as_str().and_then(parse_rfc3339),
    })
}

fn check_out_refund_no(no: &str) -> Result<(), PayError> {
    let ok = (6..=64).contains(&no.len())
        && no.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-|*@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(PayError::Invalid("out_refund_no must be 6-64 letters, digits or _-|*@".into()))
    }
}

/// A call's name for metrics: its operation, never the order number in its path.
fn call_name(path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or_default();
    if path.ends_with("/jsapi") {
        "jsapi_prepay"
    } else if path.ends_with("/unifiedorder") {
        // APIv2 places every kind of order here.
        "unified_order"
    } else if path.ends_with("/native") {
        "native_prepay"
    } else if path.ends_with("/h5") {
        "h5_prepay"
    } else if path.ends_with("/close") || path.ends_with("/closeorder") {
        "close_order"
    } else if path.ends_with("/refund/domestic/refunds") || path.ends_with("/secapi/pay/refund") {
        "refund"
    } else if path.contains("/refund/domestic/refunds/") || path.ends_with("/refundquery") {
        "query_refund"
    } else if path.ends_with("/bill/tradebill") || path.ends_with("/downloadbill") {
        "trade_bill"
    } else if path.contains("/out-trade-no/") || path.ends_with("/orderquery") {
        "query_order"
    } else {
        "other"
    }
}

fn outcome<T>(result: &Result<T, PayError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(PayError::Refused(_)) => "refused",
        Err(PayError::BadSignature) => "bad_signature",
        Err(PayError::Timeout) => "timeout",
        Err(PayError::Invalid(_)) => "invalid",
        Err(PayError::Unavailable(_) | PayError::NotConfigured(_)) => "unavailable",
    }
}

fn check_out_trade_no(no: &str) -> Result<(), PayError> {
    if is_merchant_order_no(no) {
        Ok(())
    } else {
        Err(PayError::Invalid("out_trade_no must be 6-32 letters, digits or _-|*".into()))
    }
}

/// How the payer pays: in WeChat's browser, by a QR code, or from a phone browser.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trade<'a> {
    Jsapi { openid: &'a str },
    Native,
    H5,
}

fn check_order(o: &BrowserOrder, trade: Trade<'_>) -> Result<(), PayError> {
    check_out_trade_no(&o.out_trade_no)?;
    let invalid = |why: &str| Err(PayError::Invalid(why.into()));
    if o.description.is_empty() || o.description.chars().count() > 127 {
        return invalid("description must be 1-127 characters");
    }
    if o.amount_fen <= 0 {
        return invalid("amount_fen must be positive");
    }
    if o.time_expire <= unix_now() {
        return invalid("time_expire must be in the future");
    }
    if o.attach.as_ref().is_some_and(|a| a.len() > 128) {
        return invalid("attach must be at most 128 bytes");
    }
    match &o.payer_client_ip {
        Some(ip) if ip.parse::<std::net::IpAddr>().is_err() => {
            invalid("payer_client_ip must be an IP address")
        }
        None if trade == Trade::H5 => invalid("H5 pay needs the payer's IP address (payer_client_ip)"),
        _ => Ok(()),
    }
}

fn time_left(deadline: Instant) -> Result<Duration, PayError> {
    let left = deadline.saturating_duration_since(Instant::now()).saturating_sub(ANSWER_MARGIN);
    if left.is_zero() { Err(PayError::Timeout) } else { Ok(left.min(MAX_CALL)) }
}

fn classify(e: reqwest::Error) -> PayError {
    if e.is_timeout() {
        PayError::Timeout
    } else if e.is_connect() {
        PayError::Unavailable("WeChat Pay could not be reached".into())
    } else {
        PayError::Unavailable("WeChat Pay did not answer".into())
    }
}

fn unix_now() -> i64 {
    crate::wechat::unix_now()
}

/// The longest an answer signed under a certificate the host lacks waits for
/// the certificates to be renewed.
const RENEWAL_WAIT: Duration = Duration::from_secs(5);

/// The app role's: it holds the merchant's keys.
pub const SPEC: CapabilitySpec = CapabilitySpec { name: "wechat-pay", roles: &[Role::App], open, link };

fn open<'a>(inputs: &'a ServiceInputs<'a>) -> BoxFuture<'a, anyhow::Result<Option<Context>>> {
    Box::pin(async move {
        if !inputs.roles.contains(&Role::App) {
            return Ok(None);
        }
        let pay = WechatPay::from_settings(inputs.settings)?
            .map(|p| p.share_platform_keys(inputs.platform_keys.clone()));
        if pay.is_none() {
            tracing::info!("WECHATPAY_MCHID is not set: WeChat Pay calls will answer not-configured");
        }
        Ok(pay.map(|p| Box::new(p) as Context))
    })
}

fn link(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    add_to_linker(linker, |s| WechatPayView { ctx: s.services.get(), deadline_at: s.deadline_at })
}

/// The borrowed view: the context and the plugin's deadline.
pub struct WechatPayView<'a> {
    pub ctx: Option<&'a WechatPay>,
    pub deadline_at: Instant,
}

struct HasWechatPay;

impl HasData for HasWechatPay {
    type Data<'a> = WechatPayView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> WechatPayView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasWechatPay>(linker, get)
}

impl WechatPayView<'_> {
    fn ctx(&self) -> Result<&WechatPay, PayError> {
        self.ctx
            .ok_or_else(|| PayError::NotConfigured("WeChat Pay is not configured (WECHATPAY_MCHID)".into()))
    }
}

/// A capability call's error: a [`PayError`] for the plugin, or a trap.
pub type PayFailure = crate::bindings::CapabilityError<PayError>;

impl wit::Host for WechatPayView<'_> {
    fn convert_pay_error(&mut self, err: PayFailure) -> wasmtime::Result<PayError> {
        err.downcast()
    }

    async fn jsapi_prepay(&mut self, order: JsapiOrder) -> Result<String, PayFailure> {
        Ok(self.ctx()?.jsapi_prepay(&order, self.deadline_at).await?)
    }

    async fn native_prepay(&mut self, order: BrowserOrder) -> Result<String, PayFailure> {
        Ok(self.ctx()?.native_prepay(&order, self.deadline_at).await?)
    }

    async fn h5_prepay(&mut self, order: BrowserOrder) -> Result<String, PayFailure> {
        Ok(self.ctx()?.h5_prepay(&order, self.deadline_at).await?)
    }

    async fn refund(&mut self, request: RefundRequest) -> Result<RefundState, PayFailure> {
        Ok(self.ctx()?.refund(&request, self.deadline_at).await?)
    }

    async fn query_refund(&mut self, out_refund_no: String) -> Result<RefundState, PayFailure> {
        Ok(self.ctx()?.query_refund(&out_refund_no, self.deadline_at).await?)
    }

    async fn jsapi_pay_params(&mut self, prepay_id: String) -> Result<PayParams, PayFailure> {
        Ok(self.ctx()?.jsapi_pay_params(&prepay_id)?)
    }

    async fn query_order(&mut self, out_trade_no: String) -> Result<OrderState, PayFailure> {
        Ok(self.ctx()?.query_order(&out_trade_no, self.deadline_at).await?)
    }

    async fn close_order(&mut self, out_trade_no: String) -> Result<(), PayFailure> {
        Ok(self.ctx()?.close_order(&out_trade_no, self.deadline_at).await?)
    }

    async fn merchant(&mut self) -> Result<(String, String), PayFailure> {
        Ok(self.ctx()?.merchant())
    }

    async fn trade_bill(&mut self, bill_date: String) -> Result<Vec<BillEntry>, PayFailure> {
        let lines = self.ctx()?.trade_bill(&bill_date, self.deadline_at).await?;
        Ok(lines
            .into_iter()
            .map(|l| BillEntry {
                trade_time: l.trade_time,
                appid: l.appid,
                mchid: l.mchid,
                transaction_id: l.transaction_id,
                out_trade_no: l.out_trade_no,
                trade_state: l.trade_state,
                amount_fen: l.amount_fen,
                refund: l.refund.map(|r| BillRefund {
                    refund_id: r.refund_id,
                    out_refund_no: r.out_refund_no,
                    amount_fen: r.amount_fen,
                    status: r.status,
                }),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Sim, SimConfig, SimPayConfig};
    use crate::wechat::pay::PlatformKeys;

    const MCHID: &str = "1900000109";
    const SERIAL: &str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";
    const KEY_ID: &str = "PUB_KEY_ID_0114232134912410000000000000000000";
    const APIV3: &str = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";

    fn fixture(f: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(f)
    }

    fn merchant_settings() -> Settings {
        Settings {
            wechat_appid: Some("wxb11529c136998cb6".into()),
            wechatpay_mchid: Some(MCHID.into()),
            wechatpay_serial: Some(SERIAL.into()),
            wechatpay_private_key: Some(fixture("merchant_test_key.pem")),
            wechatpay_platform_public_key: Some(fixture("wechatpay_platform_test_pub.pem")),
            wechatpay_public_key_id: Some(KEY_ID.into()),
            wechatpay_apiv3_key: Some(APIV3.to_string().into()),
            wechatpay_notify_url: Some("http://127.0.0.1:9/api/v1/payment/notify".into()),
            ..Settings::default()
        }
    }

    /// The simulator playing WeChat Pay for the merchant; returns its base URL.
    async fn wechat_pay_sim() -> (Sim, String) {
        wechat_pay_sim_for(&merchant_settings()).await
    }

    async fn wechat_pay_sim_for(merchant: &Settings) -> (Sim, String) {
        let sim = Sim::new(SimConfig {
            appid: "wxb11529c136998cb6".into(),
            secret: "s".into(),
            token: "t".into(),
            aes_key: None,
            web_url: None,
            token_ttl: Duration::from_secs(7200),
        })
        .with_pay(
            SimPayConfig::from_settings(
                merchant,
                &fixture("merchant_test_pub.pem"),
                &fixture("wechatpay_platform_test_key.pem"),
                1.0,
            )
            .unwrap(),
        );
        let (addr, _) = sim
            .serve("127.0.0.1:0".parse().unwrap(), tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
        (sim, format!("http://{addr}"))
    }

    fn order(no: &str) -> JsapiOrder {
        JsapiOrder {
            out_trade_no: no.into(),
            description: "10 次识别".into(),
            amount_fen: 990,
            payer_openid: "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o".into(),
            time_expire: unix_now() + 600,
            attach: None,
            payer_client_ip: None,
        }
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn orders_are_placed_queried_and_closed_with_signed_requests_and_verified_answers() {
        let (sim, base) = wechat_pay_sim().await;
        let mut s = merchant_settings();
        s.wechatpay_api_base = Some(base);
        let pay = WechatPay::from_settings(&s).unwrap().unwrap();
        let prepay_id = pay.jsapi_prepay(&order("WX_CAP_0001"), deadline()).await.unwrap();
        assert_eq!(sim.pay_order("WX_CAP_0001").unwrap()["prepay_id"], prepay_id.as_str());
        let state = pay.query_order("WX_CAP_0001", deadline()).await.unwrap();
        assert_eq!((state.trade_state.as_str(), state.amount_fen), ("NOTPAY", Some(990)));
        assert_eq!((state.appid.as_str(), state.mchid.as_str()), ("wxb11529c136998cb6", MCHID));
        pay.close_order("WX_CAP_0001", deadline()).await.unwrap();
        assert_eq!(pay.query_order("WX_CAP_0001", deadline()).await.unwrap().trade_state, "CLOSED");
        match pay.query_order("WX_CAP_NONE", deadline()).await {
            Err(PayError::Refused((code, _))) => assert_eq!(code, "ORDER_NOT_EXIST"),
            other => panic!("{other:?}"),
        }
        // Bad input never leaves the host.
        let mut bad = order("x");
        assert!(matches!(pay.jsapi_prepay(&bad, deadline()).await, Err(PayError::Invalid(_))));
        bad = order("WX_CAP_0002");
        bad.amount_fen = 0;
        assert!(matches!(pay.jsapi_prepay(&bad, deadline()).await, Err(PayError::Invalid(_))));
        assert!(sim.pay_order("WX_CAP_0002").is_none());
    }

    #[tokio::test]
    async fn answers_not_signed_by_the_platform_key_are_not_trusted() {
        let (_sim, base) = wechat_pay_sim().await;
        // The platform key configured here is not the one WeChat Pay signs with.
        let mut s = merchant_settings();
        s.wechatpay_api_base = Some(base.clone());
        s.wechatpay_platform_public_key = Some(fixture("merchant_test_pub.pem"));
        let pay = WechatPay::from_settings(&s).unwrap().unwrap();
        assert!(matches!(
            pay.jsapi_prepay(&order("WX_CAP_0003"), deadline()).await,
            Err(PayError::BadSignature)
        ));
    }

    #[tokio::test]
    async fn every_apiv3_request_names_the_platform_public_key_in_wechatpay_serial() {
        let (sim, base) = wechat_pay_sim().await;
        let mut s = merchant_settings();
        s.wechatpay_api_base = Some(base.clone());
        let pay = WechatPay::from_settings(&s).unwrap().unwrap();
        let PayApi::V3 { public_key_id, .. } = &pay.api else { panic!("an APIv3 merchant") };
        assert_eq!(public_key_id.as_deref(), Some(KEY_ID), "taken from WECHATPAY_PUBLIC_KEY_ID");
        pay.jsapi_prepay(&order("WX_CAP_0010"), deadline()).await.unwrap();

        // Without it (or naming another key), WeChat Pay answers a signature error.
        for named in [None, Some("PUB_KEY_ID_OTHER".to_string())] {
            let keys = PlatformKeys::from_pem(
                &std::fs::read_to_string(fixture("wechatpay_platform_test_pub.pem")).unwrap(),
                Some(KEY_ID),
            )
            .unwrap();
            let api = PayApi::V3 {
                merchant_key: Box::new(
                    RsaSigner::from_pem(&std::fs::read_to_string(fixture("merchant_test_key.pem")).unwrap())
                        .unwrap(),
                ),
                serial: SERIAL.into(),
                platform: LiveKeys::new(keys),
                public_key_id: named.clone(),
            };
            let pay = WechatPay::new(
                Some(&base),
                "wxb11529c136998cb6".into(),
                MCHID.into(),
                "http://127.0.0.1:9/n".into(),
                api,
            )
            .unwrap();
            match pay.jsapi_prepay(&order("WX_CAP_0011"), deadline()).await {
                Err(PayError::Refused((code, _))) => assert_eq!(code, "SIGN_ERROR", "{named:?}"),
                other => panic!("{named:?}: {other:?}"),
            }
        }
        assert!(sim.pay_order("WX_CAP_0011").is_none());
    }

    #[tokio::test]
    async fn native_and_h5_orders_answer_what_the_page_pays_with_and_h5_needs_the_payers_address() {
        let (sim, base) = wechat_pay_sim().await;
        let mut s = merchant_settings();
        s.wechatpay_api_base = Some(base);
        let pay = WechatPay::from_settings(&s).unwrap().unwrap();
        let browser = |no: &str, ip: Option<&str>| BrowserOrder {
            out_trade_no: no.into(),
            description: "10 次识别".into(),
            amount_fen: 990,
            time_expire: unix_now() + 600,
            attach: None,
            payer_client_ip: ip.map(str::to_string),
        };
        let code_url = pay.native_prepay(&browser("WX_CAP_0020", None), deadline()).await.unwrap();
        assert!(code_url.starts_with("weixin://wxpay/bizpayurl?pr="), "{code_url}");
        assert_eq!(sim.pay_order("WX_CAP_0020").unwrap()["trade_type"], "NATIVE");
        let h5_url = pay.h5_prepay(&browser("WX_CAP_0021", Some("198.51.100.7")), deadline()).await.unwrap();
        assert!(h5_url.contains("/sim/pay/h5?prepay_id="), "{h5_url}");
        assert_eq!(sim.pay_order("WX_CAP_0021").unwrap()["payer_client_ip"], "198.51.100.7");
        for (no, ip) in [("WX_CAP_0022", None), ("WX_CAP_0023", Some("not an address"))] {
            assert!(matches!(pay.h5_prepay(&browser(no, ip), deadline()).await, Err(PayError::Invalid(_))));
            assert!(sim.pay_order(no).is_none(), "nothing was sent");
        }
    }

    #[tokio::test]
    async fn requests_signed_with_another_key_are_refused_by_wechat_pay() {
        let (sim, base) = wechat_pay_sim().await;
        let mut s = merchant_settings();
        s.wechatpay_api_base = Some(base);
        s.wechatpay_private_key = Some(fixture("wechatpay_platform_test_key.pem"));
        let pay = WechatPay::from_settings(&s).unwrap().unwrap();
        match pay.jsapi_prepay(&order("WX_CAP_0004"), deadline()).await {
            Err(PayError::Refused((code, _))) => assert_eq!(code, "SIGN_ERROR"),
            other => panic!("{other:?}"),
        }
        assert!(sim.pay_order("WX_CAP_0004").is_none());
    }

    #[tokio::test]
    async fn wechat_pay_down_or_too_slow_is_a_clean_error() {
        let (sim, base) = wechat_pay_sim().await;
        let mut s = merchant_settings();
        s.wechatpay_api_base = Some(base);
        let pay = WechatPay::from_settings(&s).unwrap().unwrap();
        sim.set_down(true);
        assert!(matches!(
            pay.jsapi_prepay(&order("WX_CAP_0005"), deadline()).await,
            Err(PayError::Unavailable(_))
        ));
        sim.set_down(false);
        sim.set_latency(Duration::from_millis(800));
        let soon = Instant::now() + Duration::from_millis(500);
        assert!(matches!(pay.jsapi_prepay(&order("WX_CAP_0006"), soon).await, Err(PayError::Timeout)));
    }

    #[test]
    fn the_jsapi_pay_sign_verifies_with_the_merchant_public_key() {
        let pay = WechatPay::from_settings(&merchant_settings()).unwrap().unwrap();
        let p = pay.jsapi_pay_params("wx201410272009395522657a690389285100").unwrap();
        assert_eq!((p.app_id.as_str(), p.sign_type.as_str()), ("wxb11529c136998cb6", "RSA"));
        assert_eq!(p.package, "prepay_id=wx201410272009395522657a690389285100");
        let message = format!("{}\n{}\n{}\n{}\n", p.app_id, p.time_stamp, p.nonce_str, p.package);
        let public = crate::wechat::pay::v3::public_key_from_pem(
            &std::fs::read_to_string(fixture("merchant_test_pub.pem")).unwrap(),
        )
        .unwrap();
        assert!(crate::wechat::pay::v3::rsa_verify(&public, message.as_bytes(), &p.pay_sign));
        assert!(matches!(pay.jsapi_pay_params("bad id"), Err(PayError::Invalid(_))));
    }

    #[test]
    fn every_missing_setting_is_named_at_once_and_no_value_is_shown() {
        let s = Settings {
            wechatpay_mchid: Some(MCHID.into()),
            wechatpay_apiv2_key: Some("v2-secret-value".to_string().into()),
            wechatpay_private_key: Some("/nonexistent/apiclient_key.pem".into()),
            ..Settings::default()
        };
        let e = WechatPay::from_settings(&s).err().unwrap().to_string();
        for name in [
            "WECHAT_APPID",
            "WECHATPAY_NOTIFY_URL",
            "WECHATPAY_SERIAL",
            "WECHATPAY_PRIVATE_KEY",
            "WECHATPAY_PLATFORM_PUBLIC_KEY",
            "WECHATPAY_APIV3_KEY",
        ] {
            assert!(e.contains(name), "{name} missing from: {e}");
        }
        assert!(!e.contains("v2-secret-value"), "{e}");
        // No merchant id: no WeChat Pay, and no error.
        assert!(WechatPay::from_settings(&Settings::default()).unwrap().is_none());
        // An APIv2 merchant needs its key.
        let v2 = Settings {
            wechatpay_mchid: Some(MCHID.into()),
            wechat_appid: Some("wx1".into()),
            wechatpay_notify_url: Some("https://example.com/n".into()),
            wechatpay_api_version: Some("v2".into()),
            ..Settings::default()
        };
        assert!(WechatPay::from_settings(&v2).err().unwrap().to_string().contains("WECHATPAY_APIV2_KEY"));
    }

    #[tokio::test]
    async fn apiv2_refunds_present_the_merchant_certificate_and_are_queried_by_their_number() {
        let mut s = merchant_settings();
        s.wechatpay_api_version = Some("v2".into());
        s.wechatpay_apiv2_key = Some("192006250b4c09247ec02edce69f6a2d".to_string().into());
        let (sim, base) = wechat_pay_sim_for(&s).await;
        s.wechatpay_api_base = Some(base);
        let pay = WechatPay::from_settings(&s).unwrap().unwrap();
        let browser = BrowserOrder {
            out_trade_no: "WX_CAP_V2R1".into(),
            description: "10 次识别".into(),
            amount_fen: 990,
            time_expire: unix_now() + 600,
            attach: None,
            payer_client_ip: None,
        };
        pay.native_prepay(&browser, deadline()).await.unwrap();
        sim.pay(&crate::sim::PayRequest { out_trade_no: Some("WX_CAP_V2R1".into()), ..Default::default() })
            .await
            .unwrap();
        let ask = RefundRequest {
            out_trade_no: "WX_CAP_V2R1".into(),
            out_refund_no: "RF_CAP_V2R1".into(),
            amount_fen: 300,
            total_fen: 990,
            reason: Some("部分退款".into()),
        };
        // Without the merchant API certificate APIv2 cannot refund: said by name, nothing sent.
        match pay.refund(&ask, deadline()).await {
            Err(PayError::NotConfigured(why)) => assert!(why.contains("WECHATPAY_CLIENT_CERT"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(sim.pay_refund("RF_CAP_V2R1").is_none());

        s.wechatpay_client_cert = Some(fixture("merchant_test_cert.pem"));
        let pay = WechatPay::from_settings(&s).unwrap().unwrap();
        sim.hold_refunds(true);
        let asked = pay.refund(&ask, deadline()).await.unwrap();
        assert_eq!((asked.status.as_str(), asked.amount_fen), ("PROCESSING", 300));
        assert!(asked.refund_id.is_some());
        let state = pay.query_refund("RF_CAP_V2R1", deadline()).await.unwrap();
        assert_eq!((state.status.as_str(), state.out_trade_no.as_str()), ("PROCESSING", "WX_CAP_V2R1"));
        sim.settle_refund("RF_CAP_V2R1", "SUCCESS").await.unwrap();
        let state = pay.query_refund("RF_CAP_V2R1", deadline()).await.unwrap();
        assert_eq!((state.status.as_str(), state.amount_fen), ("SUCCESS", 300));
        assert!(state.success_time.is_some_and(|t| unix_now() - t < 60));
        // The same number again is the same refund.
        assert_eq!(pay.refund(&ask, deadline()).await.unwrap().refund_id, asked.refund_id);
        assert_eq!(sim.pay_refunds_of("WX_CAP_V2R1"), 1);
        match pay.query_refund("RF_CAP_NONE", deadline()).await {
            Err(PayError::Refused((code, _))) => assert_eq!(code, "RESOURCE_NOT_EXISTS"),
            other => panic!("{other:?}"),
        }
        // A file that is not a certificate is refused at start, by name.
        s.wechatpay_client_cert = Some(fixture("merchant_test_pub.pem"));
        let e = WechatPay::from_settings(&s).err().unwrap();
        assert!(format!("{e:#}").contains("WECHATPAY_CLIENT_CERT"), "{e:#}");
    }

    fn today() -> String {
        crate::wechat::pay::day_name(crate::wechat::pay::today_cst())
    }

    #[tokio::test]
    async fn the_days_bill_is_read_only_when_its_file_matches_the_signed_hash_in_both_apis() {
        for v2 in [false, true] {
            let mut s = merchant_settings();
            if v2 {
                s.wechatpay_api_version = Some("v2".into());
                s.wechatpay_apiv2_key = Some("192006250b4c09247ec02edce69f6a2d".to_string().into());
            }
            let (sim, base) = wechat_pay_sim_for(&s).await;
            s.wechatpay_api_base = Some(base);
            let pay = WechatPay::from_settings(&s).unwrap().unwrap();
            let no = if v2 { "WX_CAP_BILL2" } else { "WX_CAP_BILL3" };
            pay.jsapi_prepay(&order(no), deadline()).await.unwrap();
            sim.pay(&crate::sim::PayRequest { out_trade_no: Some(no.into()), ..Default::default() })
                .await
                .unwrap();
            let paid = pay.query_order(no, deadline()).await.unwrap();

            let bill = pay.trade_bill(&today(), deadline()).await.unwrap();
            assert_eq!(bill.len(), 1, "v2 {v2}: {bill:?}");
            let line = &bill[0];
            assert_eq!(
                (line.out_trade_no.as_str(), line.trade_state.as_str(), line.amount_fen),
                (no, "SUCCESS", 990)
            );
            assert_eq!((line.mchid.as_str(), Some(line.trade_time)), (MCHID, paid.success_time));
            assert_eq!(Some(&line.transaction_id), paid.transaction_id.as_ref());

            match pay.trade_bill("2024-01-02", deadline()).await {
                Err(PayError::Refused((code, _))) => assert_eq!(code, "NO_STATEMENT_EXIST", "v2 {v2}"),
                other => panic!("v2 {v2}: {other:?}"),
            }
            assert!(matches!(pay.trade_bill("20240102", deadline()).await, Err(PayError::Invalid(_))));
            if !v2 {
                // APIv3's file is checked against the SHA-1 its signed answer names.
                sim.corrupt_bills(true);
                assert!(matches!(pay.trade_bill(&today(), deadline()).await, Err(PayError::BadSignature)));
                // A file anywhere but WeChat Pay's own address is not fetched
                // (the request would carry the merchant's signature there).
                sim.corrupt_bills(false);
                sim.bill_download_host(Some("127.0.0.1:1".into()));
                assert!(matches!(pay.trade_bill(&today(), deadline()).await, Err(PayError::BadSignature)));
            }
        }
    }
}
