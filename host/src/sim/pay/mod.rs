//! The simulator's WeChat Pay side (what api.mch.weixin.qq.com does): JSAPI
//! orders, order query and close, in APIv3 (the merchant's request signature
//! checked, answers signed with the platform key) and APIv2 (XML and `sign`).
//! Paying an order sends the signed notify (APIv3: AES-256-GCM resource;
//! APIv2: signed XML) to the order's `notify_url`, repeated on WeChat Pay's
//! retry schedule (compressed by `retry_scale`) until it is acknowledged.
//! Each day's trade bill lists what was paid and refunded ([`bill`]).

mod bill;
pub mod certificates;
mod notify;
mod refund;
mod v2;
mod v3;

pub use certificates::{PlatformIdentities, PlatformIdentity};
pub use notify::{PayOutcome, PayRequest};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rsa::RsaPublicKey;
use serde_json::{Value, json};

use super::{Sim, now, random_hex};
use crate::wechat::pay::{RsaSigner, V2SignType, rfc3339_cst};

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
    /// The keys answers and notifies are signed with (the newest signs),
    /// named in `Wechatpay-Serial`.
    pub platform: PlatformIdentities,
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

/// How the payer pays: in WeChat's browser (JSAPI), by scanning a QR code
/// (Native), or from a phone browser sent to WeChat (H5, `MWEB`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TradeType {
    Jsapi,
    Native,
    H5,
}

impl TradeType {
    /// Its name in transactions (`trade_type`).
    fn name(self) -> &'static str {
        match self {
            TradeType::Jsapi => "JSAPI",
            TradeType::Native => "NATIVE",
            TradeType::H5 => "MWEB",
        }
    }
}

/// The `code_url` of a Native order: the payer's WeChat opens it from the QR code.
fn code_url_of(prepay_id: &str) -> String {
    format!("weixin://wxpay/bizpayurl?pr={prepay_id}")
}

/// The prepay_id a `code_url` stands for.
fn prepay_id_of_code_url(code_url: &str) -> Option<&str> {
    code_url.strip_prefix("weixin://wxpay/bizpayurl?pr=")
}

struct SimOrder {
    api: Api,
    trade: TradeType,
    appid: String,
    mchid: String,
    description: String,
    total: i64,
    /// JSAPI: the payer named when ordering; Native and H5: whoever paid.
    openid: Option<String>,
    notify_url: String,
    time_expire: i64,
    attach: Option<String>,
    /// The payer's address as the merchant gave it (H5's `scene_info`, APIv2's `spbill_create_ip`).
    payer_client_ip: Option<String>,
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
    refunds: HashMap<String, refund::SimRefund>,
    /// Refunds stay PROCESSING until a test settles them.
    hold_refunds: bool,
    notifies_sent: u64,
    certificate_downloads: u64,
    /// `GET /v3/certificates` answers a forgery while set.
    forge_certificates: bool,
    /// Bill files by download token.
    bill_files: HashMap<String, Vec<u8>>,
    /// Bill files served do not match their signed hash while set.
    corrupt_bills: bool,
    /// Where bill answers say their file is, when a test says so.
    bill_download_host: Option<String>,
}

pub(super) type SharedPay = Arc<Mutex<PayData>>;

pub(super) fn routes() -> axum::Router<Sim> {
    axum::Router::new()
        .merge(v3::routes())
        .merge(v2::routes())
        .merge(notify::routes())
        .merge(refund::routes())
        .merge(certificates::routes())
        .merge(bill::routes())
}

fn pay_config(sim: &Sim) -> Option<&SimPayConfig> {
    sim.pay_config.as_deref()
}

/// The transaction as WeChat Pay describes it (query answers and notify resources).
fn transaction_json(no: &str, o: &SimOrder) -> Value {
    let mut t = json!({
        "appid": o.appid,
        "mchid": o.mchid,
        "out_trade_no": no,
        "trade_type": o.trade.name(),
        "trade_state": o.state,
        "trade_state_desc": match o.state { "SUCCESS" => "支付成功", "CLOSED" => "已关闭", _ => "未支付" },
        "amount": { "total": o.total, "currency": "CNY" },
    });
    if let Some(openid) = &o.openid {
        t["payer"] = json!({ "openid": openid });
    }
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

struct NewOrder {
    api: Api,
    trade: TradeType,
    appid: String,
    mchid: String,
    description: String,
    no: String,
    total: i64,
    /// JSAPI only.
    openid: Option<String>,
    notify_url: String,
    time_expire: i64,
    attach: Option<String>,
    payer_client_ip: Option<String>,
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
                _ if existing.total == o.total
                    && existing.openid == o.openid
                    && existing.trade == o.trade =>
                {
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
                trade: o.trade,
                appid: o.appid,
                mchid: o.mchid,
                description: o.description,
                total: o.total,
                openid: o.openid,
                notify_url: o.notify_url,
                time_expire: o.time_expire,
                attach: o.attach,
                payer_client_ip: o.payer_client_ip,
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
}

fn random_digits(n: usize) -> String {
    use rand::Rng as _;
    let mut rng = rand::rng();
    (0..n).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect()
}

impl SimPayConfig {
    /// What WeChat Pay knows of the merchant, from the merchant's own settings
    /// (WECHAT_APPID, WECHATPAY_MCHID, WECHATPAY_SERIAL, WECHATPAY_APIV3_KEY,
    /// WECHATPAY_APIV2_KEY, and the platform key the merchant trusts:
    /// WECHATPAY_PLATFORM_PUBLIC_KEY holding a certificate, or a public key
    /// named by WECHATPAY_PUBLIC_KEY_ID), plus the merchant's public key and
    /// the platform's private key.
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
            merchant_public_key: crate::wechat::pay::v3::public_key_from_pem(&read(merchant_public_key)?)?,
            merchant_serial: need(&s.wechatpay_serial, "WECHATPAY_SERIAL")?,
            platform: PlatformIdentities::new(platform_identity(
                s,
                RsaSigner::from_pem(&read(platform_private_key)?)?,
            )?),
            apiv3_key: *s.apiv3_key()?.context("WECHATPAY_APIV3_KEY is not set")?.expose_secret(),
            apiv2_key: s.wechatpay_apiv2_key.as_ref().map(|k| k.expose_secret().to_string()),
            retry_scale,
        })
    }
}

/// The platform identity the merchant's settings trust: the certificate in
/// WECHATPAY_PLATFORM_PUBLIC_KEY, else the public key WECHATPAY_PUBLIC_KEY_ID names.
fn platform_identity(s: &crate::settings::Settings, signer: RsaSigner) -> anyhow::Result<PlatformIdentity> {
    use anyhow::Context as _;
    let path =
        s.wechatpay_platform_public_key.as_ref().context("WECHATPAY_PLATFORM_PUBLIC_KEY is not set")?;
    let pem = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if pem.contains("-----BEGIN CERTIFICATE-----") {
        return PlatformIdentity::certificate(&pem, signer);
    }
    let id = s.wechatpay_public_key_id.clone().context("WECHATPAY_PUBLIC_KEY_ID is not set")?;
    Ok(PlatformIdentity::public_key(id, signer))
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
