//! End to end on SQLite and MariaDB, with the simulator playing WeChat Pay:
//! create-order (server-priced, JSAPI order at WeChat Pay, signed pay
//! parameters) → the payer pays → WeChat Pay's notify → web role → app role →
//! order paid and quota credited exactly once; lost notifies caught by the
//! order query; expired orders closed; APIv2 merchants; another user's order
//! neither readable nor payable; WeChat Pay down → the order failed, not half-made;
//! Native (a PC page's QR code) and H5 (a phone browser sent to WeChat) in
//! APIv3 and APIv2.

use std::time::{Duration, Instant};

use crate::common::stack::*;
use crate::common::*;
use serde_json::{Value, json};
use wxhost::sim::{PayRequest, openid_of};
use wxhost::wechat::pay::V2SignType;
use wxhost::wechat::pay::v2::v2_sign;
use wxhost::wechat::pay::v3::{public_key_from_pem, rsa_verify};

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

async fn create_order(stack: &Stack, token: &str, body: Value) -> (u16, Value) {
    stack.post("/api/v1/payment/create-order", Some(token), &body.to_string()).await
}

async fn order_status(stack: &Stack, no: &str) -> String {
    db_text(&stack.db_url, &format!("SELECT status FROM orders WHERE out_trade_no = '{no}'")).await
}

async fn db_text(url: &str, sql: &str) -> String {
    let db = wxhost::database::connect(url, &Default::default()).await.unwrap();
    wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar(sql).fetch_one(p).await).unwrap()
}

fn pay(no: &str) -> PayRequest {
    PayRequest { out_trade_no: Some(no.into()), ..Default::default() }
}

/// Waits until WeChat Pay has had a notify acknowledged for the order.
async fn until_acknowledged(stack: &Stack, no: &str) -> Value {
    let started = Instant::now();
    loop {
        let order = stack.sim.pay_order(no).unwrap();
        if order["acknowledged"] == true {
            return order;
        }
        assert!(started.elapsed() < Duration::from_secs(45), "never acknowledged: {order}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_paid_and_credited_exactly_once_end_to_end_on_both_databases() {
    let merchant_public =
        public_key_from_pem(&std::fs::read_to_string(fixture("merchant_test_pub.pem")).unwrap()).unwrap();
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;

        // The client's price is ignored: the catalog's is charged.
        let (status, order) =
            create_order(&stack, &alice, json!({ "product_id": "p10", "price_fen": 1, "amount_fen": 1 }))
                .await;
        assert_eq!(status, 200, "{which}: {order}");
        assert_eq!(
            (order["amount_fen"].as_i64(), order["credits"].as_i64()),
            (Some(990), Some(10)),
            "{which}"
        );
        let no = order["out_trade_no"].as_str().unwrap().to_string();
        let at_wechat = stack.sim.pay_order(&no).unwrap();
        assert_eq!(at_wechat["amount"]["total"], 990, "{which}: WeChat Pay was asked for the catalog price");
        assert_eq!(at_wechat["payer"]["openid"], openid_of("alice").as_str(), "{which}");

        // The pay parameters verify with the merchant's public key, as WeChat's client checks them.
        let p = &order["pay_params"];
        assert_eq!(p["appId"], APPID, "{which}");
        assert_eq!(
            p["package"],
            format!("prepay_id={}", at_wechat["prepay_id"].as_str().unwrap()),
            "{which}"
        );
        assert_eq!(p["signType"], "RSA", "{which}");
        let message = format!(
            "{}\n{}\n{}\n{}\n",
            p["appId"].as_str().unwrap(),
            p["timeStamp"].as_str().unwrap(),
            p["nonceStr"].as_str().unwrap(),
            p["package"].as_str().unwrap()
        );
        assert!(rsa_verify(&merchant_public, message.as_bytes(), p["paySign"].as_str().unwrap()), "{which}");
        assert!(!rsa_verify(&merchant_public, b"tampered", p["paySign"].as_str().unwrap()), "{which}");
        assert_eq!(order_status(&stack, &no).await, "pending", "{which}");
        assert_eq!(stack.quota(&alice).await, 0, "{which}");

        // The payer pays; WeChat Pay notifies the web role; the order is paid.
        let paid = stack.sim.pay(&pay(&no)).await.unwrap();
        assert_eq!((paid.notify_status, paid.acknowledged), (204, true), "{which}: {paid:?}");
        let (status, seen) = stack.get(&format!("/api/v1/user/orders/{no}"), Some(&alice)).await;
        assert_eq!((status, seen["status"].as_str()), (200, Some("paid")), "{which}: {seen}");
        assert_eq!(seen["transaction_id"], paid.transaction_id.as_str(), "{which}");
        assert_eq!(stack.quota(&alice).await, 10, "{which}: /user/me shows the credit");

        // WeChat Pay delivers the same notify 10 times at once: all answered success, credited once.
        let r = stack
            .client
            .post(stack.sim_url("/sim/pay/notify"))
            .json(&json!({ "out_trade_no": no, "times": 10 }))
            .send()
            .await
            .unwrap();
        let statuses: Value = r.json().await.unwrap();
        assert_eq!(statuses["statuses"], json!(vec![204; 10]), "{which}: {statuses}");
        assert_eq!(stack.quota(&alice).await, 10, "{which}: credited once");
        let (_, list) = stack.get("/api/v1/user/orders", Some(&alice)).await;
        assert_eq!(list["orders"][0]["status"], "paid", "{which}: {list}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_order_can_be_neither_read_nor_paid_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;
        let mallory = stack.login("mallory").await;
        let (_, order) = create_order(&stack, &alice, json!({ "product_id": "p50" })).await;
        let no = order["out_trade_no"].as_str().unwrap();

        let (status, body) = stack.get(&format!("/api/v1/user/orders/{no}"), Some(&mallory)).await;
        assert_eq!((status, error_code(&body)), (404, "not_found"), "{which}: {body}");
        let (status, _) = stack.get(&format!("/api/v1/user/orders/{no}"), None).await;
        assert_eq!(status, 401, "{which}: no session, no order");
        // At WeChat Pay the order is bound to its payer's openid.
        let refused = stack
            .sim
            .pay(&PayRequest {
                out_trade_no: Some(no.into()),
                user: Some("mallory".into()),
                ..Default::default()
            })
            .await;
        assert!(refused.is_err(), "{which}: {refused:?}");
        assert_eq!(order_status(&stack, no).await, "pending", "{which}");
        assert_eq!((stack.quota(&alice).await, stack.quota(&mallory).await), (0, 0), "{which}");

        // Unknown products and missing sessions are refused before anything is made.
        let (status, body) = create_order(&stack, &alice, json!({ "product_id": "p999" })).await;
        assert_eq!((status, error_code(&body)), (400, "unknown_product"), "{which}");
        let (status, _) = stack.post("/api/v1/payment/create-order", None, r#"{"product_id":"p10"}"#).await;
        assert_eq!(status, 401, "{which}");
        let orders = db_count(&db.url, "SELECT COUNT(*) FROM orders").await;
        assert_eq!(orders, 1, "{which}: only alice's order exists");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_pay_down_leaves_the_order_failed_never_half_made_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;
        stack.sim.set_down(true);
        let (status, body) = create_order(&stack, &alice, json!({ "product_id": "p10" })).await;
        assert_eq!((status, error_code(&body)), (502, "payment_unavailable"), "{which}: {body}");
        let failed =
            db_count(&db.url, "SELECT COUNT(*) FROM orders WHERE status = 'failed' AND prepay_id IS NULL")
                .await;
        assert_eq!(failed, 1, "{which}: the order is marked failed");
        stack.sim.set_down(false);
        let (status, body) = create_order(&stack, &alice, json!({ "product_id": "p10" })).await;
        assert_eq!(status, 200, "{which}: {body}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_app_role_down_the_notify_fails_and_a_retry_credits_once_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let mut stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;
        let (_, order) = create_order(&stack, &alice, json!({ "product_id": "p10" })).await;
        let no = order["out_trade_no"].as_str().unwrap().to_string();

        stack.stop_app().await;
        let paid = stack.sim.pay(&pay(&no)).await.unwrap();
        assert!(!paid.acknowledged && paid.notify_status >= 500, "{which}: a failure answer: {paid:?}");
        // WeChat Pay keeps retrying on its (compressed) schedule; nothing is applied meanwhile.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(stack.sim.pay_order(&no).unwrap()["acknowledged"] == false, "{which}");
        stack.restart_app().await;
        let seen = until_acknowledged(&stack, &no).await;
        let deliveries = seen["deliveries"].as_array().unwrap();
        assert!(deliveries.len() >= 3, "{which}: retried: {deliveries:?}");
        assert_eq!(deliveries.last().unwrap(), 204, "{which}");
        assert_eq!(order_status(&stack, &no).await, "paid", "{which}");
        assert_eq!(stack.quota(&alice).await, 10, "{which}: credited once");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_whose_notify_never_arrives_is_found_by_the_order_query_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;
        let (_, order) = create_order(&stack, &alice, json!({ "product_id": "p50" })).await;
        let no = order["out_trade_no"].as_str().unwrap().to_string();
        // No notify can arrive: the web role is gone.
        stack.web.shutdown();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let paid = stack.sim.pay(&pay(&no)).await.unwrap();
        assert!(!paid.acknowledged, "{which}: {paid:?}");
        // The order was touched just now: the page's next poll after the recheck interval asks WeChat Pay.
        db_exec(&db.url, "UPDATE orders SET updated_at = 0 WHERE out_trade_no = ?", &[&no]).await;
        let (status, seen) = stack.get(&format!("/api/v1/user/orders/{no}"), Some(&alice)).await;
        assert_eq!((status, seen["status"].as_str()), (200, Some("paid")), "{which}: {seen}");
        assert_eq!(seen["transaction_id"], paid.transaction_id.as_str(), "{which}");
        assert_eq!(stack.quota(&alice).await, 50, "{which}");
        let (_, again) = stack.get(&format!("/api/v1/user/orders/{no}"), Some(&alice)).await;
        assert_eq!(again["status"], "paid", "{which}");
        assert_eq!(stack.quota(&alice).await, 50, "{which}: credited once");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_order_past_its_expiry_is_closed_here_and_at_wechat_pay() {
    let db = sqlite_database().await;
    let stack = Stack::start(&db.url).await;
    let alice = stack.login("alice").await;
    let (_, order) = create_order(&stack, &alice, json!({ "product_id": "p10" })).await;
    let no = order["out_trade_no"].as_str().unwrap().to_string();
    // Still payable: a poll leaves it pending.
    db_exec(&db.url, "UPDATE orders SET updated_at = 0 WHERE out_trade_no = ?", &[&no]).await;
    let (_, seen) = stack.get(&format!("/api/v1/user/orders/{no}"), Some(&alice)).await;
    assert_eq!(seen["status"], "pending", "{seen}");
    // Its time runs out.
    db_exec(&db.url, "UPDATE orders SET time_expire = 1, updated_at = 0 WHERE out_trade_no = ?", &[&no])
        .await;
    let (_, seen) = stack.get(&format!("/api/v1/user/orders/{no}"), Some(&alice)).await;
    assert_eq!(seen["status"], "closed", "{seen}");
    assert_eq!(stack.sim.pay_order(&no).unwrap()["trade_state"], "CLOSED");
    assert!(stack.sim.pay(&pay(&no)).await.is_err(), "a closed order cannot be paid");
    assert_eq!(stack.quota(&alice).await, 0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiv2_merchants_pay_and_are_credited_once_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start_with(&db.url, full_config(), PayApi::V2).await;
        let alice = stack.login("alice").await;
        let (status, order) = create_order(&stack, &alice, json!({ "product_id": "p10" })).await;
        assert_eq!(status, 200, "{which}: {order}");
        let p = &order["pay_params"];
        assert_eq!(p["signType"], "HMAC-SHA256", "{which}");
        let fields: Vec<(String, String)> = ["appId", "timeStamp", "nonceStr", "package", "signType"]
            .iter()
            .map(|k| (k.to_string(), p[*k].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(p["paySign"], v2_sign(&fields, APIV2_KEY, V2SignType::HmacSha256), "{which}");

        let no = order["out_trade_no"].as_str().unwrap().to_string();
        let paid = stack.sim.pay(&pay(&no)).await.unwrap();
        assert!(paid.acknowledged, "{which}: the XML notify was answered SUCCESS: {paid:?}");
        for _ in 0..3 {
            stack.sim.deliver(&no).await;
        }
        assert_eq!(order_status(&stack, &no).await, "paid", "{which}");
        assert_eq!(stack.quota(&alice).await, 10, "{which}: credited once");

        // The order query speaks APIv2 too.
        let (_, second) = create_order(&stack, &alice, json!({ "product_id": "p10" })).await;
        let second = second["out_trade_no"].as_str().unwrap().to_string();
        db_exec(
            &db.url,
            "UPDATE orders SET time_expire = 1, updated_at = 0 WHERE out_trade_no = ?",
            &[&second],
        )
        .await;
        let (_, seen) = stack.get(&format!("/api/v1/user/orders/{second}"), Some(&alice)).await;
        assert_eq!(seen["status"], "closed", "{which}: {seen}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_requests_notifies_applied_vs_duplicate_and_wechat_pay_calls() {
    let db = sqlite_database().await;
    let stack = Stack::start(&db.url).await;
    let alice = stack.login("alice").await;
    let (_, order) = create_order(&stack, &alice, json!({ "product_id": "p10" })).await;
    let no = order["out_trade_no"].as_str().unwrap().to_string();
    stack.sim.pay(&pay(&no)).await.unwrap();
    for _ in 0..3 {
        stack.sim.deliver(&no).await;
    }
    let scrape = |addr: std::net::SocketAddr| async move {
        let r = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
        r.text().await.unwrap()
    };
    let app = scrape(stack.app.as_ref().unwrap().admin_addr).await;
    let line = |text: &str, parts: &[&str]| -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && parts.iter().all(|p| l.contains(p)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .reduce(f64::max)
    };
    let applied = line(&app, &["wxhost_plugin_outcomes_total{", "plugin=\"payment\"", "outcome=\"applied\""]);
    let duplicates =
        line(&app, &["wxhost_plugin_outcomes_total{", "plugin=\"payment\"", "outcome=\"duplicate\""]);
    assert!(applied >= Some(1.0), "{app}");
    assert!(duplicates >= Some(3.0), "{app}");
    assert!(
        line(
            &app,
            &[
                "wxhost_outbound_calls_total{",
                "service=\"wechatpay\"",
                "call=\"jsapi_prepay\"",
                "outcome=\"ok\""
            ]
        ) >= Some(1.0),
        "{app}"
    );
    assert!(
        line(
            &app,
            &["wxhost_http_requests_total{", "route=\"/api/v1/payment/create-order\"", "status=\"200\""]
        ) >= Some(1.0),
        "{app}"
    );
    assert!(
        line(&app, &["wxhost_http_request_duration_seconds_bucket{", "plugin=\"payment\""]).is_some(),
        "{app}"
    );
    assert!(line(&app, &["wxhost_plugin_loaded{", "plugin=\"payment\""]) == Some(1.0), "{app}");
    assert!(line(&app, &["wxhost_db_pool_connections{", "state=\"idle\""]).is_some(), "{app}");
    assert!(
        line(&app, &["wxhost_plugin_instantiate_seconds_count{", "plugin=\"payment\""]).is_some(),
        "{app}"
    );
    assert!(!app.contains(APIV3_KEY) && !app.contains(&alice), "no secret or token in metrics");
    stack.shutdown().await;
}

/// Reads the text of the SVG QR code the app role draws, as a phone camera
/// would: its dark rectangles (`M{x} {y}h{w}v{h}H{x}V{y}`) onto a grey image.
fn decode_svg_qr(svg: &str) -> String {
    let number = |name: &str| -> usize {
        let at =
            svg.find(&format!(" {name}=\"")).unwrap_or_else(|| panic!("no {name} in {svg}")) + name.len() + 3;
        svg[at..].split('"').next().unwrap().trim_end_matches("px").parse().unwrap()
    };
    let (w, h) = (number("width"), number("height"));
    let mut pixels = vec![255u8; w * h];
    let path = svg.split(" d=\"").nth(1).unwrap().split('"').next().unwrap();
    for rect in path.split('M').filter(|r| !r.is_empty()) {
        let n: Vec<usize> = rect
            .split(|c: char| !c.is_ascii_digit())
            .filter(|t| !t.is_empty())
            .map(|t| t.parse().unwrap())
            .collect();
        let (x, y, rw, rh) = (n[0], n[1], n[2], n[3]);
        for row in y..y + rh {
            pixels[row * w + x..row * w + x + rw].fill(0);
        }
    }
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| pixels[y * w + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the image");
    grids[0].decode().unwrap().1
}

async fn qrcode_of(stack: &Stack, no: &str, token: &str) -> (u16, String) {
    let r = stack
        .client
        .get(stack.app_url(&format!("/api/v1/user/orders/{no}/qrcode")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    if status == 200 {
        assert_eq!(r.headers()["content-type"], "image/svg+xml");
    }
    (status, r.text().await.unwrap())
}

/// A phone browser at an `h5_url`: WeChat's cashier page, paid, and back to the merchant's page.
async fn pay_at_h5_cashier(h5_url: &str, back_to: &str) -> reqwest::Response {
    let no_redirects =
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let page = no_redirects.get(format!("{h5_url}&redirect_url={back_to}")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("确认支付"), "{html}");
    let prepay_id =
        url::Url::parse(h5_url).unwrap().query_pairs().find(|(k, _)| k == "prepay_id").unwrap().1.to_string();
    no_redirects
        .post(h5_url.split('?').next().unwrap())
        .form(&[("prepay_id", prepay_id.as_str()), ("redirect_url", back_to)])
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pc_pays_by_native_qr_code_and_a_phone_by_h5_each_credited_once_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;

        // Native: the page gets a code_url to draw, no JSAPI parameters.
        let (status, order) =
            create_order(&stack, &alice, json!({ "product_id": "p10", "trade_type": "native" })).await;
        assert_eq!(status, 200, "{which}: {order}");
        let code_url = order["code_url"].as_str().unwrap_or_else(|| panic!("{which}: {order}")).to_string();
        assert!(code_url.starts_with("weixin://wxpay/bizpayurl?pr="), "{which}: {code_url}");
        assert!(order["pay_params"].is_null() && order["h5_url"].is_null(), "{which}: {order}");
        assert_eq!((order["trade_type"].as_str(), order["amount_fen"].as_i64()), (Some("native"), Some(990)));
        let no = order["out_trade_no"].as_str().unwrap().to_string();
        let at_wechat = stack.sim.pay_order(&no).unwrap();
        assert_eq!(at_wechat["trade_type"], "NATIVE", "{which}");
        assert!(at_wechat["payer"].is_null(), "{which}: a Native order names no payer: {at_wechat}");
        // Reloading the page shows the same code while it is unpaid.
        let (_, seen) = stack.get(&format!("/api/v1/user/orders/{no}"), Some(&alice)).await;
        assert_eq!(
            (seen["status"].as_str(), seen["pay_url"].as_str()),
            (Some("pending"), Some(code_url.as_str()))
        );
        // The code the page shows, drawn by the app role, reads as the code_url; only to its owner.
        let (status, svg) = qrcode_of(&stack, &no, &alice).await;
        assert_eq!(status, 200, "{which}: {svg}");
        assert_eq!(decode_svg_qr(&svg), code_url, "{which}");
        let bob = stack.login("bob").await;
        assert_eq!(qrcode_of(&stack, &no, &bob).await.0, 404, "{which}: another user's order");

        // Someone scans it with their WeChat and pays: alice, who ordered, is credited.
        let scanned =
            PayRequest { code_url: Some(code_url.clone()), user: Some("dad".into()), ..Default::default() };
        let paid = stack.sim.pay(&scanned).await.unwrap();
        assert!(paid.acknowledged, "{which}: {paid:?}");
        assert_eq!(stack.sim.pay_order(&no).unwrap()["payer"]["openid"], openid_of("dad").as_str());
        assert_eq!(order_status(&stack, &no).await, "paid", "{which}");
        assert_eq!(stack.quota(&alice).await, 10, "{which}");
        let again = stack.sim.pay(&scanned).await;
        assert!(again.is_err(), "{which}: a paid code cannot be paid twice");
        let (status, body) = qrcode_of(&stack, &no, &alice).await;
        assert_eq!(status, 409, "{which}: a paid order shows no code: {body}");
        assert!(body.contains("order_not_payable"), "{which}: {body}");
        let (_, jsapi) = create_order(&stack, &alice, json!({ "product_id": "p10" })).await;
        let (status, body) = qrcode_of(&stack, jsapi["out_trade_no"].as_str().unwrap(), &alice).await;
        assert!(status == 409 && body.contains("not_native"), "{which}: {status} {body}");

        // H5: the page goes to h5_url; WeChat's cashier pays and sends the browser back.
        let response = stack
            .client
            .post(stack.app_url("/api/v1/payment/create-order"))
            .bearer_auth(&alice)
            // A client's own X-Forwarded-For is not its address: the host's peer is.
            .header("x-forwarded-for", "203.0.113.9")
            .body(json!({ "product_id": "p10", "trade_type": "h5" }).to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let order: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{which}: {order}");
        let no = order["out_trade_no"].as_str().unwrap().to_string();
        let h5_url = order["h5_url"].as_str().unwrap().to_string();
        let at_wechat = stack.sim.pay_order(&no).unwrap();
        assert_eq!(
            (at_wechat["trade_type"].as_str(), at_wechat["payer_client_ip"].as_str()),
            (Some("MWEB"), Some("127.0.0.1"))
        );
        let back = format!("{}/member.html?order={no}", stack.app_url(""));
        let answer = pay_at_h5_cashier(&h5_url, &back).await;
        assert_eq!(answer.status(), 303, "{which}");
        assert_eq!(answer.headers()["location"], back.as_str(), "{which}");
        until_acknowledged(&stack, &no).await;
        assert_eq!(order_status(&stack, &no).await, "paid", "{which}");
        assert_eq!(stack.quota(&alice).await, 20, "{which}");

        // A trade type that does not exist is the client's error, and places nothing.
        let (status, body) =
            create_order(&stack, &alice, json!({ "product_id": "p10", "trade_type": "app" })).await;
        assert_eq!((status, error_code(&body)), (400, "invalid_body"), "{which}: {body}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiv2_merchants_take_native_and_h5_payments_credited_once_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start_with(&db.url, full_config(), PayApi::V2).await;
        let alice = stack.login("alice").await;
        let (status, order) =
            create_order(&stack, &alice, json!({ "product_id": "p10", "trade_type": "native" })).await;
        assert_eq!(status, 200, "{which}: {order}");
        let code_url = order["code_url"].as_str().unwrap().to_string();
        let paid =
            stack.sim.pay(&PayRequest { code_url: Some(code_url), ..Default::default() }).await.unwrap();
        assert!(paid.acknowledged, "{which}: {paid:?}");
        let no = order["out_trade_no"].as_str().unwrap().to_string();
        assert_eq!(stack.sim.pay_order(&no).unwrap()["trade_type"], "NATIVE", "{which}");
        assert_eq!(order_status(&stack, &no).await, "paid", "{which}");

        let (status, order) =
            create_order(&stack, &alice, json!({ "product_id": "p10", "trade_type": "h5" })).await;
        assert_eq!(status, 200, "{which}: {order}");
        let no = order["out_trade_no"].as_str().unwrap().to_string();
        assert_eq!(
            stack.sim.pay_order(&no).unwrap()["payer_client_ip"],
            "127.0.0.1",
            "{which}: spbill_create_ip"
        );
        let back = stack.app_url("/member.html");
        let answer = pay_at_h5_cashier(order["h5_url"].as_str().unwrap(), &back).await;
        assert_eq!(answer.status(), 303, "{which}");
        until_acknowledged(&stack, &no).await;
        assert_eq!(stack.quota(&alice).await, 20, "{which}: both credited once");
        stack.shutdown().await;
    }
}
