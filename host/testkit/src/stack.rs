//! The whole product on loopback: the WeChat simulator (official account and
//! WeChat Pay), an app role and a web role with every shipped plugin, wired
//! as in production (the web role reaches the app role over HTTP; WeChat Pay
//! notifies the web role).

use std::time::Duration;

use serde_json::Value;
use wxhost::config::Role;
use wxhost::server::RunningServer;
use wxhost::settings::Settings;
use wxhost::sim::{Sim, SimConfig, SimPayConfig};

use super::*;

pub const APPSECRET: &str = "sim-app-secret";
pub const ADMIN: &str = "admin-credential-of-at-least-32-b";
pub const MCHID: &str = "1900000109";
/// The business service the stack's app role knows, with an old and a new key (a rotation).
pub const SERVICE: &str = "classifier";
pub const SERVICE_KEY: &str = "svc-classifier-7c1f0e9a4b2d48e6a3f5c8d1b7e2a9f0";
pub const SERVICE_KEY_NEXT: &str = "svc-classifier-next-3e8b1d6f2a9c47b0e5d3a1f8c6b4e2d7";
/// The APIv3 key of WeChat Pay's own SDK tests.
pub const APIV3_KEY: &str = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";
pub const APIV2_KEY: &str = "192006250b4c09247ec02edce69f6a2d";
pub const PUB_KEY_ID: &str = "PUB_KEY_ID_0114232134912410000000000000000000";
pub const MERCHANT_SERIAL: &str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";

/// Every shipped plugin with the routes of plugins.toml, and a two-product catalog.
pub fn full_config() -> TestConfig {
    let frontend = root().join("frontend");
    let toml = base_toml(
        2000,
        WEB_GRANTS,
        r#""log", "config", "db", "wechat-api", "wechat-pay", "session", "callback-crypto""#,
    ) + &format!("[frontend]\nroot = {:?}\n", frontend.display().to_string())
        + VERIFY_PLUGIN
        + r#"
[plugins.config]
welcome = "欢迎"
"# + NOTIFY_PLUGIN
        + INTERNAL_PLUGIN
        + r#"
[[plugins]]
name = "account"
role = "app"
wasm = "account.wasm"
routes = [
  "GET /api/v1/auth/wechat", "POST /api/v1/auth/wechat/qrcode", "GET /api/v1/auth/wechat/qrcode/{scene}",
  "GET /api/v1/auth/wechat/get-menu", "POST /api/v1/auth/wechat/create-menu", "POST /api/v1/auth/logout",
  "GET /api/v1/user/me", "GET /api/v1/user/orders", "GET /api/v1/wechat/jssdk-config",
]
capabilities = ["log", "config", "db", "wechat-api", "session"]
wechat_api = ["cgi-bin/qrcode/create", "cgi-bin/menu/get", "cgi-bin/menu/create", "cgi-bin/ticket/getticket"]

[[plugins]]
name = "payment"
role = "app"
wasm = "payment.wasm"
routes = [
  "GET /api/v1/payment/products", "POST /api/v1/payment/create-order",
  "GET /api/v1/user/orders/{out_trade_no}", "GET /api/v1/user/orders/{out_trade_no}/qrcode",
  "PUT /api/v1/internal/payment/order/update", "POST /api/v1/admin/refunds",
  "GET /api/v1/admin/refunds/{out_refund_no}", "POST /api/v1/internal/payment/messages/deliver",
  "POST /api/v1/internal/payment/reconcile",
]
capabilities = ["log", "config", "db", "session", "wechat-pay", "callback-crypto", "wechat-api"]
wechat_api = ["cgi-bin/message/template/send"]
jobs = [{ route = "POST /api/v1/internal/payment/messages/deliver", every_secs = 1 }]

[plugins.config]
order_ttl_secs = 600

[plugins.config.paid_message]
template_id = "tmpl-paid-0001"
url = "https://shop.example.com/member.html"
data = { thing1 = "{product}", amount2 = "{amount} 元", number3 = "{credits}", time4 = "{paid_at}", character_string5 = "{out_trade_no}" }

[[plugins.config.products]]
id = "p10"
name = "10 次识别"
price_fen = 990
credits = 10

[[plugins.config.products]]
id = "p50"
name = "50 次识别"
price_fen = 3990
credits = 50

[[plugins]]
name = "quota"
role = "app"
wasm = "quota.wasm"
routes = ["GET /api/v1/user/quota/ledger", "POST /api/v1/admin/quota/adjust"]
service_routes = ["POST /api/v1/quota/consume", "POST /api/v1/quota/release", "POST /api/v1/session/introspect"]
capabilities = ["log", "db", "session"]
"#;
    TestConfig::new(
        &toml,
        &[
            ("verify.wasm", "verify.wasm"),
            ("notify.wasm", "notify.wasm"),
            ("internal.wasm", "internal.wasm"),
            ("account.wasm", "account.wasm"),
            ("payment.wasm", "payment.wasm"),
            ("quota.wasm", "quota.wasm"),
        ],
    )
}

/// Which WeChat Pay API the merchant uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PayApi {
    V3,
    /// APIv3 for a merchant still on platform certificates (no public key):
    /// the host keeps them fresh from `GET /v3/certificates`.
    V3Certificates,
    V2,
}

pub struct Stack {
    pub config: TestConfig,
    pub sim: Sim,
    pub sim_addr: std::net::SocketAddr,
    pub app: Option<RunningServer>,
    pub app_addr: std::net::SocketAddr,
    pub app_settings: Settings,
    pub web: RunningServer,
    pub db_url: String,
    pub client: reqwest::Client,
}

/// The merchant's side of WeChat Pay (the SDK test keys), added to `settings`.
pub fn with_merchant(mut settings: Settings) -> Settings {
    settings.wechatpay_mchid = Some(MCHID.into());
    settings.wechatpay_serial = Some(MERCHANT_SERIAL.into());
    settings.wechatpay_private_key = Some(fixture("merchant_test_key.pem"));
    settings.wechatpay_platform_public_key = Some(fixture("wechatpay_platform_test_pub.pem"));
    settings.wechatpay_public_key_id = Some(PUB_KEY_ID.into());
    settings.wechatpay_apiv3_key = Some(APIV3_KEY.to_string().into());
    settings
}

/// The merchant still on platform certificates: it trusts the SDK test
/// certificate (the simulator's first) and no public key.
pub fn on_certificates(mut merchant: Settings) -> Settings {
    merchant.wechatpay_platform_public_key = Some(fixture("wechatpay_platform_test_cert.pem"));
    merchant.wechatpay_public_key_id = None;
    merchant
}

/// The simulator playing WeChat and WeChat Pay for `merchant` (the SDK test
/// keys), served on loopback, WeChat Pay's retry schedule times `retry_scale`;
/// returns it and its address.
pub async fn pay_simulator(merchant: &Settings, retry_scale: f64) -> (Sim, std::net::SocketAddr) {
    let pay = SimPayConfig::from_settings(
        merchant,
        &fixture("merchant_test_pub.pem"),
        &fixture("wechatpay_platform_test_key.pem"),
        retry_scale,
    )
    .unwrap();
    let sim = Sim::new(SimConfig {
        appid: APPID.into(),
        secret: APPSECRET.into(),
        token: TOKEN.into(),
        aes_key: Some(AES_KEY.into()),
        web_url: None,
        token_ttl: Duration::from_secs(7200),
    })
    .with_pay(pay);
    let (addr, _) =
        sim.serve("127.0.0.1:0".parse().unwrap(), tokio_util::sync::CancellationToken::new()).await.unwrap();
    (sim, addr)
}

/// What the web role needs to check WeChat Pay's notifies (and nothing else of the merchant's).
pub fn notify_keys(merchant: &Settings, mut web: Settings) -> Settings {
    web.wechatpay_apiv3_key = merchant.wechatpay_apiv3_key.clone();
    web.wechatpay_apiv2_key = merchant.wechatpay_apiv2_key.clone();
    web.wechatpay_platform_public_key = merchant.wechatpay_platform_public_key.clone();
    web.wechatpay_public_key_id = merchant.wechatpay_public_key_id.clone();
    web
}

/// The app role pointed at the simulator (WeChat and WeChat Pay at `sim`),
/// with WeChat Pay notifying the web role at `web_url`.
pub fn on_simulator(mut app: Settings, sim: std::net::SocketAddr, web_url: &str) -> Settings {
    app.wechat_appsecret = Some(APPSECRET.to_string().into());
    app.wechat_api_base = Some(format!("http://{sim}"));
    app.wechat_qrcode_base = Some(format!("http://{sim}/cgi-bin/showqrcode"));
    app.wechat_oauth_authorize_url = Some(format!("http://{sim}/connect/oauth2/authorize"));
    app.wechatpay_api_base = Some(format!("http://{sim}"));
    app.wechatpay_notify_url = Some(format!("{web_url}/api/v1/payment/notify"));
    app
}

/// `settings` as the environment a `wxhost` process reads them from (the
/// variables of the README), for tests that run the real binary.
pub fn env_of(settings: &Settings) -> Vec<(&'static str, String)> {
    use secrecy::ExposeSecret as _;
    let secret = |v: &Option<secrecy::SecretString>| v.as_ref().map(|s| s.expose_secret().to_string());
    let path = |v: &Option<std::path::PathBuf>| v.as_ref().map(|p| p.display().to_string());
    [
        ("DATABASE_URL", secret(&settings.database_url)),
        ("WECHAT_APPID", settings.wechat_appid.clone()),
        ("WECHAT_APPSECRET", secret(&settings.wechat_appsecret)),
        ("WECHAT_TOKEN", secret(&settings.wechat_token)),
        ("WECHAT_AES_KEY", secret(&settings.wechat_aes_key)),
        ("WECHAT_API_BASE", settings.wechat_api_base.clone()),
        ("INTERNAL_SECRET", secret(&settings.internal_secret)),
        ("WECHATPAY_MCHID", settings.wechatpay_mchid.clone()),
        ("WECHATPAY_SERIAL", settings.wechatpay_serial.clone()),
        ("WECHATPAY_PRIVATE_KEY", path(&settings.wechatpay_private_key)),
        ("WECHATPAY_CLIENT_CERT", path(&settings.wechatpay_client_cert)),
        ("WECHATPAY_PLATFORM_PUBLIC_KEY", path(&settings.wechatpay_platform_public_key)),
        ("WECHATPAY_PUBLIC_KEY_ID", settings.wechatpay_public_key_id.clone()),
        ("WECHATPAY_APIV3_KEY", secret(&settings.wechatpay_apiv3_key)),
        ("WECHATPAY_APIV2_KEY", secret(&settings.wechatpay_apiv2_key)),
        ("WECHATPAY_API_BASE", settings.wechatpay_api_base.clone()),
        ("WECHATPAY_NOTIFY_URL", settings.wechatpay_notify_url.clone()),
        ("WECHATPAY_API_VERSION", settings.wechatpay_api_version.clone()),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.map(|v| (name, v)))
    .collect()
}

impl Stack {
    pub async fn start(database_url: &str) -> Stack {
        Stack::start_with(database_url, full_config(), PayApi::V3).await
    }

    pub async fn start_with(database_url: &str, config: TestConfig, api: PayApi) -> Stack {
        let mut merchant = with_merchant(settings(Some(database_url)));
        merchant.wechatpay_apiv2_key = Some(APIV2_KEY.to_string().into());
        match api {
            PayApi::V3 => {}
            PayApi::V3Certificates => merchant = on_certificates(merchant),
            PayApi::V2 => {
                merchant.wechatpay_api_version = Some("v2".into());
                // APIv2 refunds present the merchant API certificate.
                merchant.wechatpay_client_cert = Some(fixture("merchant_test_cert.pem"));
            }
        }
        // WeChat Pay's retry schedule, 1000 times faster (15 s → 15 ms).
        let (sim, sim_addr) = pay_simulator(&merchant, 0.001).await;

        // The web role first: WeChat Pay must know where to send notifies.
        let mut web_settings = notify_keys(&merchant, settings(None));
        // The app role is not up yet: reserve its port.
        let app_addr = free_addr();
        web_settings.app_internal_url = Some(format!("http://{app_addr}"));
        let web = start_with(&config, &[Role::Web], web_settings, false).await;
        let web_url = format!("http://{}", web.role_addrs[&Role::Web]);
        sim.set_web_url(&web_url);

        let mut app_settings = on_simulator(merchant, sim_addr, &web_url);
        app_settings.dev_simulator_url = Some(format!("http://{sim_addr}"));
        app_settings.admin_token = Some(ADMIN.to_string().into());
        app_settings.service_keys =
            Some(format!("{SERVICE}={SERVICE_KEY},{SERVICE}={SERVICE_KEY_NEXT}").into());
        app_settings.app_listen = Some(app_addr);
        app_settings.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        let app = start_with(&config, &[Role::App], app_settings.clone(), false).await;
        Stack {
            config,
            sim,
            sim_addr,
            app: Some(app),
            app_addr,
            app_settings,
            web,
            db_url: database_url.to_string(),
            client: reqwest::Client::new(),
        }
    }

    pub fn app_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.app_addr)
    }

    pub fn sim_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sim_addr)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.client.get(self.app_url(path));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let r = request.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let mut request = self.client.post(self.app_url(path)).body(body.to_string());
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let r = request.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// The signed-in user's quota, as `/api/v1/user/me` shows it.
    pub async fn quota(&self, token: &str) -> i64 {
        let (status, me) = self.get("/api/v1/user/me", Some(token)).await;
        assert_eq!(status, 200, "{me}");
        me["quota"].as_i64().unwrap()
    }

    /// Signs `user` in through web authorization; returns the session token.
    pub async fn login(&self, user: &str) -> String {
        let code = self.sim.oauth_code(user, "snsapi_userinfo");
        let (status, body) = self.get(&format!("/api/v1/auth/wechat?code={code}"), None).await;
        assert_eq!(status, 200, "login of {user}: {body}");
        body["token"].as_str().unwrap().to_string()
    }

    /// Stops the app role (it drains first).
    pub async fn stop_app(&mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown();
            app.wait().await;
        }
    }

    /// Starts the app role again on the same address.
    pub async fn restart_app(&mut self) {
        self.stop_app().await;
        self.app = Some(start_with(&self.config, &[Role::App], self.app_settings.clone(), false).await);
    }

    pub async fn shutdown(mut self) {
        self.web.shutdown();
        self.stop_app().await;
    }
}

/// A loopback address nothing listens on (yet), for a server started a little
/// later. Chosen below Linux's ephemeral range (32768+) and the local cluster's
/// ports (20000+), so that no port-0 socket of a parallel test can take it in between.
pub fn free_addr() -> std::net::SocketAddr {
    use rand::Rng as _;
    loop {
        let port = rand::rng().random_range(10_000..20_000);
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().unwrap();
        }
    }
}
