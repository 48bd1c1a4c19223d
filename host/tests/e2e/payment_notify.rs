//! End to end on SQLite and MariaDB: WeChat Pay's notify → web role `notify`
//! plugin (host-verified) → app role → the order paid and the quota credited
//! exactly once, whatever WeChat Pay retries; every bad notify refused with
//! nothing changed; the app role down → a failure answer, then the retry credits once.

use crate::common::stack::{APIV2_KEY, APIV3_KEY, MCHID, PUB_KEY_ID as KEY_ID};
use crate::common::*;
use serde_json::json;
use wxhost::config::Role;
use wxhost::server::RunningServer;
use wxhost::settings::Settings;
use wxhost::wechat::pay::V2SignType;
use wxhost::wechat::pay::v2::v2_sign;
use wxhost::wechat::pay::v3::{private_key_from_pem, rsa_sign, v3_encrypt};

fn config() -> TestConfig {
    let toml = base_toml(
        2000,
        WEB_GRANTS,
        r#""log", "config", "db", "session", "wechat-pay", "callback-crypto", "wechat-api""#,
    ) + NOTIFY_PLUGIN
        + r#"
[[plugins]]
name = "payment"
role = "app"
wasm = "payment.wasm"
routes = ["PUT /api/v1/internal/payment/order/update"]
capabilities = ["log", "config", "db", "session", "wechat-pay", "callback-crypto", "wechat-api"]
"#;
    TestConfig::new(&toml, &[("notify.wasm", "notify.wasm"), ("payment.wasm", "payment.wasm")])
}

struct Pay {
    config: TestConfig,
    db_url: String,
    app: Option<RunningServer>,
    app_addr: std::net::SocketAddr,
    web: RunningServer,
    client: reqwest::Client,
}

/// What checking WeChat Pay's notifies takes; both roles hold it (the app
/// role verifies every notify again).
fn with_notify_keys(mut s: Settings) -> Settings {
    s.wechatpay_apiv3_key = Some(APIV3_KEY.to_string().into());
    s.wechatpay_apiv2_key = Some(APIV2_KEY.to_string().into());
    s.wechatpay_platform_public_key = Some(fixture("wechatpay_platform_test_pub.pem"));
    s.wechatpay_public_key_id = Some(KEY_ID.into());
    s
}

impl Pay {
    async fn start(db_url: &str) -> Pay {
        let config = config();
        let app = start_with(&config, &[Role::App], with_notify_keys(settings(Some(db_url))), false).await;
        let app_addr = app.role_addrs[&Role::App];
        let mut s = with_notify_keys(settings(None));
        s.app_internal_url = Some(format!("http://{app_addr}"));
        let web = start_with(&config, &[Role::Web], s, false).await;
        Pay { config, db_url: db_url.into(), app: Some(app), app_addr, web, client: reqwest::Client::new() }
    }

    /// A user with no quota and an order of 990 fen for 10 credits.
    async fn order(&self, out_trade_no: &str, openid: &str) {
        db_exec(
            &self.db_url,
            "INSERT INTO users (openid, subscribed, quota, created_at, updated_at) VALUES (?, 1, 0, 1, 1)",
            &[openid],
        )
        .await;
        db_exec(
            &self.db_url,
            "INSERT INTO orders (out_trade_no, openid, product_id, description, amount_fen, credits, status, \
             time_expire, created_at, updated_at, appid, mchid) VALUES (?, ?, 'p10', '10 次', 990, 10, 'pending', \
             9999999999, 1, 1, ?, ?)",
            &[out_trade_no, openid, APPID, MCHID],
        )
        .await;
    }

    async fn send_v3(&self, n: &V3) -> (u16, String) {
        let (headers, body) = n.build();
        let mut request = self.client.post(url(&self.web, Role::Web, "/api/v1/payment/notify")).body(body);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        let r = request.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn send_v2(&self, xml: String) -> (u16, String) {
        let r = self
            .client
            .post(url(&self.web, Role::Web, "/api/v1/payment/notify"))
            .body(xml)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn state(&self, out_trade_no: &str, openid: &str) -> (String, i64) {
        let status =
            db_text(&self.db_url, "SELECT status FROM orders WHERE out_trade_no = ?", out_trade_no).await;
        let quota =
            db_count(&self.db_url, &format!("SELECT quota FROM users WHERE openid = '{openid}'")).await;
        (status, quota)
    }

    async fn shutdown(mut self) {
        self.web.shutdown();
        if let Some(app) = self.app.take() {
            app.shutdown();
            app.wait().await;
        }
    }
}

async fn db_text(url: &str, sql: &str, arg: &str) -> String {
    let db = wxhost::database::connect(url, &Default::default()).await.unwrap();
    wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar(sql).bind(arg).fetch_one(p).await).unwrap()
}

/// An APIv3 notify as WeChat Pay would send it, with knobs to break it.
#[derive(Clone)]
struct V3 {
    out_trade_no: String,
    amount: i64,
    appid: String,
    mchid: String,
    timestamp: i64,
    signer: &'static str,
    signature_prefix: &'static str,
    serial: String,
}

impl V3 {
    fn paid(out_trade_no: &str) -> V3 {
        V3 {
            out_trade_no: out_trade_no.into(),
            amount: 990,
            appid: APPID.into(),
            mchid: MCHID.into(),
            timestamp: unix_now(),
            signer: "wechatpay_platform_test_key.pem",
            signature_prefix: "",
            serial: KEY_ID.into(),
        }
    }

    fn build(&self) -> (Vec<(&'static str, String)>, String) {
        let resource = json!({
            "mchid": self.mchid, "appid": self.appid, "out_trade_no": self.out_trade_no,
            "transaction_id": format!("4200{}", self.out_trade_no), "trade_type": "JSAPI", "trade_state": "SUCCESS",
            "trade_state_desc": "支付成功", "bank_type": "CMC", "success_time": "2026-11-25T10:00:00+08:00",
            "payer": { "openid": "o1" }, "amount": { "total": self.amount, "payer_total": self.amount, "currency": "CNY" }
        });
        let ciphertext = v3_encrypt(
            APIV3_KEY.as_bytes().try_into().unwrap(),
            "nonce1234567",
            "transaction",
            resource.to_string().as_bytes(),
        )
        .unwrap();
        let body = json!({
            "id": "EV-1", "create_time": "2026-11-25T10:00:01+08:00", "resource_type": "encrypt-resource",
            "event_type": "TRANSACTION.SUCCESS", "summary": "支付成功",
            "resource": { "original_type": "transaction", "algorithm": "AEAD_AES_256_GCM", "ciphertext": ciphertext,
                          "associated_data": "transaction", "nonce": "nonce1234567" }
        })
        .to_string();
        let nonce = "593BEC0C930BF1AFEB40B4A08C8FB242";
        let key = private_key_from_pem(&std::fs::read_to_string(fixture(self.signer)).unwrap()).unwrap();
        let signature = rsa_sign(&key, format!("{}\n{nonce}\n{body}\n", self.timestamp).as_bytes());
        let headers = vec![
            ("wechatpay-timestamp", self.timestamp.to_string()),
            ("wechatpay-nonce", nonce.to_string()),
            ("wechatpay-signature", format!("{}{signature}", self.signature_prefix)),
            ("wechatpay-serial", self.serial.clone()),
            ("content-type", "application/json".to_string()),
        ];
        (headers, body)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_order_is_credited_once_however_often_the_notify_comes_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let pay = Pay::start(&db.url).await;
        pay.order("WX_A1", "oPayer").await;
        let (status, body) = pay.send_v3(&V3::paid("WX_A1")).await;
        assert_eq!(status, 204, "{which}: {body}");
        assert_eq!(pay.state("WX_A1", "oPayer").await, ("paid".to_string(), 10), "{which}");

        // The same notify 10 times at once: every delivery answered success, credited once.
        let n = V3::paid("WX_A1");
        let deliveries = (0..10).map(|_| pay.send_v3(&n));
        for (status, body) in futures::future::join_all(deliveries).await {
            assert_eq!(status, 204, "{which}: {body}");
        }
        assert_eq!(pay.state("WX_A1", "oPayer").await, ("paid".to_string(), 10), "{which}");

        // A fresh order paid by 10 concurrent first deliveries: still once.
        pay.order("WX_A2", "oPayer2").await;
        let n = V3::paid("WX_A2");
        for (status, _) in futures::future::join_all((0..10).map(|_| pay.send_v3(&n))).await {
            assert_eq!(status, 204, "{which}");
        }
        assert_eq!(pay.state("WX_A2", "oPayer2").await, ("paid".to_string(), 10), "{which}");

        // An order placed before migration 0004 recorded its merchant: credited too.
        pay.order("WX_A3", "oPayer3").await;
        db_exec(&pay.db_url, "UPDATE orders SET appid = '', mchid = '' WHERE out_trade_no = ?", &["WX_A3"])
            .await;
        let (status, body) = pay.send_v3(&V3::paid("WX_A3")).await;
        assert_eq!(status, 204, "{which}: {body}");
        assert_eq!(pay.state("WX_A3", "oPayer3").await, ("paid".to_string(), 10), "{which}");
        pay.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_notifies_are_refused_and_change_nothing_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let pay = Pay::start(&db.url).await;
        pay.order("WX_B1", "oVictim").await;
        let good = V3::paid("WX_B1");
        let cases = [
            ("tampered amount", V3 { amount: 1, ..good.clone() }, 409),
            ("wrong appid", V3 { appid: "wx0000000000000000".into(), ..good.clone() }, 409),
            ("wrong mchid", V3 { mchid: "1234567890".into(), ..good.clone() }, 409),
            ("forged signature", V3 { signer: "merchant_test_key.pem", ..good.clone() }, 401),
            ("stale timestamp", V3 { timestamp: unix_now() - 600, ..good.clone() }, 401),
            ("SIGNTEST probe", V3 { signature_prefix: "WECHATPAY/SIGNTEST/", ..good.clone() }, 401),
            ("unknown key", V3 { serial: "PUB_KEY_ID_OTHER".into(), ..good.clone() }, 401),
            ("unknown order", V3::paid("WX_NO_SUCH_ORDER"), 404),
        ];
        for (case, notify, expected) in cases {
            let (status, body) = pay.send_v3(&notify).await;
            assert_eq!(status, expected, "{which}: {case}: {body}");
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["code"], "FAIL", "{which}: {case}");
            assert_eq!(pay.state("WX_B1", "oVictim").await, ("pending".to_string(), 0), "{which}: {case}");
        }
        // Not JSON at all, with WeChat Pay's headers.
        let r = pay
            .client
            .post(url(&pay.web, Role::Web, "/api/v1/payment/notify"))
            .header("wechatpay-signature", "x")
            .header("wechatpay-timestamp", unix_now().to_string())
            .header("wechatpay-serial", KEY_ID)
            .body("not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{which}");
        assert_eq!(pay.state("WX_B1", "oVictim").await, ("pending".to_string(), 0), "{which}");
        pay.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_app_role_down_the_notify_fails_and_its_retry_credits_once_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let mut pay = Pay::start(&db.url).await;
        pay.order("WX_C1", "oPatient").await;
        let app = pay.app.take().unwrap();
        app.shutdown();
        app.wait().await;
        let (status, body) = pay.send_v3(&V3::paid("WX_C1")).await;
        assert!(status >= 500, "{which}: a failure while the app role is down: {status} {body}");
        assert!(body.contains("FAIL"), "{which}");

        let mut s = with_notify_keys(settings(Some(&db.url)));
        s.app_listen = Some(pay.app_addr);
        pay.app = Some(start_with(&pay.config, &[Role::App], s, false).await);
        for _ in 0..3 {
            assert_eq!(pay.send_v3(&V3::paid("WX_C1")).await.0, 204, "{which}");
        }
        assert_eq!(pay.state("WX_C1", "oPatient").await, ("paid".to_string(), 10), "{which}");
        pay.shutdown().await;
    }
}

/// An APIv2 notify signed with `sign_with` as `sign_type` says (MD5 when absent).
fn v2_xml(fields: &[(&str, &str)], sign_with: &str) -> String {
    let owned: Vec<(String, String)> = fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let sign_type =
        V2SignType::parse(fields.iter().find(|(k, _)| *k == "sign_type").map(|(_, v)| *v)).unwrap();
    let sign = v2_sign(&owned, sign_with, sign_type);
    let inner: String = fields.iter().map(|(k, v)| format!("<{k}><![CDATA[{v}]]></{k}>")).collect();
    format!("<xml>{inner}<sign>{sign}</sign></xml>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiv2_notifies_answer_success_or_fail_xml() {
    let db = sqlite_database().await;
    let pay = Pay::start(&db.url).await;
    pay.order("WX_D1", "oOld").await;
    let fields = [
        ("appid", APPID),
        ("mch_id", MCHID),
        ("nonce_str", "5K8264ILTKCH16CQ"),
        ("out_trade_no", "WX_D1"),
        ("result_code", "SUCCESS"),
        ("return_code", "SUCCESS"),
        ("sign_type", "HMAC-SHA256"),
        ("total_fee", "990"),
        ("transaction_id", "4200099"),
    ];
    let (status, body) = pay.send_v2(v2_xml(&fields, "not-the-key")).await;
    assert!(status == 200 && body.contains("<return_code><![CDATA[FAIL]]>"), "{body}");
    assert_eq!(pay.state("WX_D1", "oOld").await, ("pending".to_string(), 0));
    // Signed with the right key but MD5 while HMAC-SHA256 is configured: a downgrade, refused.
    let md5: Vec<(&str, &str)> = fields.iter().copied().filter(|(k, _)| *k != "sign_type").collect();
    let (status, body) = pay.send_v2(v2_xml(&md5, APIV2_KEY)).await;
    assert!(status == 200 && body.contains("<return_code><![CDATA[FAIL]]>"), "{body}");
    assert_eq!(pay.state("WX_D1", "oOld").await, ("pending".to_string(), 0));

    for _ in 0..2 {
        let (status, body) = pay.send_v2(v2_xml(&fields, APIV2_KEY)).await;
        assert!(status == 200 && body.contains("<return_code><![CDATA[SUCCESS]]>"), "{body}");
    }
    assert_eq!(pay.state("WX_D1", "oOld").await, ("paid".to_string(), 10));
    pay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_is_served_from_the_server_side_configuration() {
    let good = r#"
[[plugins]]
name = "payment"
role = "app"
wasm = "payment.wasm"
routes = ["GET /api/v1/payment/products"]
capabilities = ["log", "config", "db", "session", "wechat-pay", "callback-crypto", "wechat-api"]
[[plugins.config.products]]
id = "p10"
name = "10 次"
price_fen = 990
credits = 10
"#;
    let db = sqlite_database().await;
    let config = TestConfig::new(
        &(base_toml(
            2000,
            WEB_GRANTS,
            r#""log", "config", "db", "session", "wechat-pay", "callback-crypto", "wechat-api""#,
        ) + good),
        &[("payment.wasm", "payment.wasm")],
    );
    let app = start(&config, &[Role::App], Some(&db.url), false).await;
    let r = reqwest::get(url(&app, Role::App, "/api/v1/payment/products")).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["products"], json!([{ "id": "p10", "name": "10 次", "price_fen": 990, "credits": 10 }]));

    // A misconfigured catalog is a clear 500, not a guess at prices.
    std::fs::write(
        config.path(),
        base_toml(
            2000,
            WEB_GRANTS,
            r#""log", "config", "db", "session", "wechat-pay", "callback-crypto", "wechat-api""#,
        ) + &good.replace("990", "-1"),
    )
    .unwrap();
    assert!(app.host.reload("test").await.ok);
    let r = reqwest::get(url(&app, Role::App, "/api/v1/payment/products")).await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"]["code"], "catalog_invalid");
    app.shutdown();
    app.wait().await;
}

/// Anyone holding INTERNAL_SECRET (it lives on the public-facing web host)
/// can sign an internal call, but only WeChat Pay can sign a notify: the app
/// role verifies the notify itself before it credits anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hmac_signed_internal_call_carrying_a_forged_notify_credits_nothing_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let pay = Pay::start(&db.url).await;
        pay.order("WX_F1", "oForger").await;
        let path = "/api/v1/internal/payment/order/update";
        let passed_on = |n: &V3| {
            let (headers, body) = n.build();
            let h = |k: &str| headers.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap();
            json!({"v3": {
                "timestamp": h("wechatpay-timestamp"), "nonce": h("wechatpay-nonce"),
                "signature": h("wechatpay-signature"), "serial": h("wechatpay-serial"), "body": body,
            }})
        };
        let code = |body: &serde_json::Value| body["error"]["code"].as_str().unwrap_or_default().to_string();

        // Signed with a key that is not WeChat Pay's.
        let forged = V3 { signer: "merchant_test_key.pem", ..V3::paid("WX_F1") };
        let (status, body) = signed_internal_call(pay.app_addr, "PUT", path, passed_on(&forged)).await;
        assert_eq!((status, code(&body)), (401, "forged_notify".into()), "{which}: {body}");
        // The web role's word alone (the decoded fields) is not accepted at all.
        let word = json!({"out_trade_no": "WX_F1", "transaction_id": "4200X", "amount_fen": 990,
                          "appid": APPID, "mchid": MCHID});
        let (status, body) = signed_internal_call(pay.app_addr, "PUT", path, word).await;
        assert_eq!((status, code(&body)), (400, "invalid_body".into()), "{which}: {body}");
        // An APIv2 notify signed with the wrong key.
        let fields = [
            ("appid", APPID),
            ("mch_id", MCHID),
            ("out_trade_no", "WX_F1"),
            ("result_code", "SUCCESS"),
            ("return_code", "SUCCESS"),
            ("sign_type", "HMAC-SHA256"),
            ("total_fee", "990"),
            ("transaction_id", "4200X"),
        ];
        let (status, body) =
            signed_internal_call(pay.app_addr, "PUT", path, json!({"v2": v2_xml(&fields, "not-the-key")}))
                .await;
        assert_eq!((status, code(&body)), (401, "forged_notify".into()), "{which}: {body}");
        assert_eq!(
            pay.state("WX_F1", "oForger").await,
            ("pending".to_string(), 0),
            "{which}: nothing credited"
        );

        // WeChat Pay's own notify, passed on as it came, credits once.
        let (status, body) =
            signed_internal_call(pay.app_addr, "PUT", path, passed_on(&V3::paid("WX_F1"))).await;
        assert_eq!((status, body["applied"].clone()), (200, json!(true)), "{which}: {body}");
        assert_eq!(pay.state("WX_F1", "oForger").await, ("paid".to_string(), 10), "{which}");
        pay.shutdown().await;
    }
}
