//! Refunds end to end on SQLite and MariaDB with the simulator playing WeChat
//! Pay: full and partial refunds taking the credits back once (APIv3 and
//! APIv2), the idempotency key under concurrency, refusals, WeChat Pay down
//! mid-refund, a refund racing the payment's own notify, and refund notifies
//! forged, repeated or not matching the refund.

use std::time::{Duration, Instant};

use crate::common::stack::*;
use crate::common::*;
use serde_json::{Value, json};
use wxhost::config::Role;
use wxhost::sim::PayRequest;
use wxhost::wechat::pay::RsaSigner;
use wxhost::wechat::pay::v3::{signed_message, v3_encrypt};

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

/// A paid order of p10 (990 fen, 10 credits) for `user`: its out_trade_no and the user's token.
async fn paid_order(stack: &Stack, user: &str) -> (String, String) {
    let token = stack.login(user).await;
    let (status, order) = stack
        .post("/api/v1/payment/create-order", Some(&token), &json!({ "product_id": "p10" }).to_string())
        .await;
    assert_eq!(status, 200, "{order}");
    let no = order["out_trade_no"].as_str().unwrap().to_string();
    let paid =
        stack.sim.pay(&PayRequest { out_trade_no: Some(no.clone()), ..Default::default() }).await.unwrap();
    assert!(paid.acknowledged, "{paid:?}");
    assert_eq!(stack.quota(&token).await, 10);
    (no, token)
}

async fn ask_refund(stack: &Stack, credential: Option<&str>, body: Value) -> (u16, Value) {
    stack.post("/api/v1/admin/refunds", credential, &body.to_string()).await
}

/// Polls the admin's view of a refund until it has left `processing`.
async fn settled(stack: &Stack, out_refund_no: &str) -> Value {
    let started = Instant::now();
    loop {
        let (status, refund) =
            stack.get(&format!("/api/v1/admin/refunds/{out_refund_no}"), Some(ADMIN)).await;
        assert_eq!(status, 200, "{refund}");
        if refund["status"] != "processing" {
            return refund;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never settled: {refund}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `REFUND.*` notify as WeChat Pay sends it, signed with `signer_pem` now.
fn refund_notify(resource: &Value, signer_pem: &str) -> (Vec<(&'static str, String)>, String) {
    refund_notify_at(resource, signer_pem, wxhost::wechat::unix_now())
}

/// The same, signed at `timestamp`.
fn refund_notify_at(
    resource: &Value,
    signer_pem: &str,
    timestamp: i64,
) -> (Vec<(&'static str, String)>, String) {
    let ciphertext = v3_encrypt(
        APIV3_KEY.as_bytes().try_into().unwrap(),
        "n0nce0n0nce0",
        "refund",
        resource.to_string().as_bytes(),
    )
    .unwrap();
    let body = json!({
        "id": format!("EV-TEST-{}", resource["out_refund_no"].as_str().unwrap_or_default()),
        "create_time": "2026-12-02T10:00:00+08:00", "resource_type": "encrypt-resource",
        "event_type": format!("REFUND.{}", resource["refund_status"].as_str().unwrap_or("SUCCESS")), "summary": "退款成功",
        "resource": { "original_type": "refund", "algorithm": "AEAD_AES_256_GCM", "ciphertext": ciphertext,
                      "associated_data": "refund", "nonce": "n0nce0n0nce0" },
    })
    .to_string();
    let signer = RsaSigner::from_pem(&std::fs::read_to_string(fixture(signer_pem)).unwrap()).unwrap();
    let timestamp = timestamp.to_string();
    let signature = signer.sign(&signed_message(&timestamp, "N", body.as_bytes()));
    let headers = vec![
        ("content-type", "application/json".to_string()),
        ("wechatpay-timestamp", timestamp),
        ("wechatpay-nonce", "N".to_string()),
        ("wechatpay-signature", signature),
        ("wechatpay-serial", PUB_KEY_ID.to_string()),
    ];
    (headers, body)
}

async fn send_notify(stack: &Stack, (headers, body): (Vec<(&'static str, String)>, String)) -> (u16, String) {
    let url = format!("http://{}/api/v1/payment/notify", stack.web.role_addrs[&Role::Web]);
    let mut request = stack.client.post(url).body(body);
    for (k, v) in headers {
        request = request.header(k, v);
    }
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Refunds 300 of the order's 990 fen and waits for it: ceil(10 × 300 / 990) = 4 credits back.
async fn partial_refund_settled(stack: &Stack, which: &str, no: &str, key: &str) -> String {
    let ask = json!({ "out_trade_no": no, "amount_fen": 300, "reason": "部分退款", "idempotency_key": key });
    let (status, refund) = ask_refund(stack, Some(ADMIN), ask).await;
    assert_eq!((status, refund["amount_fen"].as_i64()), (200, Some(300)), "{which}: {refund}");
    let out_refund_no = refund["out_refund_no"].as_str().unwrap().to_string();
    let done = settled(stack, &out_refund_no).await;
    assert_eq!(
        (done["status"].as_str(), done["credits_taken"].as_i64()),
        (Some("success"), Some(4)),
        "{which}: {done}"
    );
    out_refund_no
}

/// Has WeChat Pay deliver a settled refund's notify `times` times at once; the statuses it got.
async fn redelivered(stack: &Stack, out_refund_no: &str, times: usize) -> Value {
    let r = stack
        .client
        .post(stack.sim_url(&format!("/sim/pay/refunds/{out_refund_no}/notify")))
        .json(&json!({ "times": times }))
        .send()
        .await
        .unwrap();
    r.json::<Value>().await.unwrap()["statuses"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_and_partial_refunds_take_the_credits_back_once_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let (no, alice) = paid_order(&stack, "alice").await;

        let first = partial_refund_settled(&stack, which, &no, "r1").await;
        assert_eq!(stack.quota(&alice).await, 6, "{which}");

        // WeChat Pay delivers its notify 10 times at once: acknowledged, applied once.
        assert_eq!(redelivered(&stack, &first, 10).await, json!(vec![204; 10]), "{which}");
        assert_eq!(stack.quota(&alice).await, 6, "{which}: still taken back once");

        // The rest: 690 fen would take back 7, but only 6 are left: the shortfall is recorded.
        let (status, rest) =
            ask_refund(&stack, Some(ADMIN), json!({ "out_trade_no": no, "idempotency_key": "r2" })).await;
        assert_eq!((status, rest["amount_fen"].as_i64()), (200, Some(690)), "{which}: {rest}");
        let done = settled(&stack, rest["out_refund_no"].as_str().unwrap()).await;
        assert_eq!(
            (done["credits_taken"].as_i64(), done["credits_shortfall"].as_i64()),
            (Some(6), Some(1)),
            "{which}: {done}"
        );
        assert_eq!(stack.quota(&alice).await, 0, "{which}: never below 0");

        // Nothing is left to refund.
        let (status, body) = ask_refund(
            &stack,
            Some(ADMIN),
            json!({ "out_trade_no": no, "amount_fen": 1, "idempotency_key": "r3" }),
        )
        .await;
        assert_eq!((status, code(&body)), (409, "refund_exceeds_paid"), "{which}: {body}");

        // The user sees the refunds on the order and in the list.
        let (_, order) = stack.get(&format!("/api/v1/user/orders/{no}"), Some(&alice)).await;
        let refunds = order["refunds"].as_array().unwrap();
        assert_eq!(refunds.len(), 2, "{which}: {order}");
        assert!(refunds.iter().all(|r| r["status"] == "success"), "{which}: {order}");
        let (_, list) = stack.get("/api/v1/user/orders", Some(&alice)).await;
        assert_eq!(list["orders"][0]["refunded_fen"], 990, "{which}: {list}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_is_one_refund_even_sent_ten_times_at_once_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let (no, alice) = paid_order(&stack, "alice").await;
        let ask = json!({ "out_trade_no": no, "reason": "重复提交", "idempotency_key": "same-key" });
        let answers =
            futures::future::join_all((0..10).map(|_| ask_refund(&stack, Some(ADMIN), ask.clone()))).await;
        let numbers: std::collections::BTreeSet<String> = answers
            .iter()
            .map(|(status, body)| {
                assert_eq!(*status, 200, "{which}: {body}");
                body["out_refund_no"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(numbers.len(), 1, "{which}: one refund, not {numbers:?}");
        assert_eq!(stack.sim.pay_refunds_of(&no), 1, "{which}: WeChat Pay was asked for one refund");
        settled(&stack, numbers.first().unwrap()).await;
        assert_eq!(stack.quota(&alice).await, 0, "{which}");
        // Again later: the same refund; the same key for another amount: a conflict.
        let (status, again) = ask_refund(&stack, Some(ADMIN), ask.clone()).await;
        assert_eq!(
            (status, again["out_refund_no"].as_str()),
            (200, numbers.first().map(String::as_str)),
            "{which}"
        );
        let (status, body) = ask_refund(
            &stack,
            Some(ADMIN),
            json!({ "out_trade_no": no, "amount_fen": 5, "idempotency_key": "same-key" }),
        )
        .await;
        assert_eq!((status, code(&body)), (409, "idempotency_key_reused"), "{which}: {body}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_are_refused_without_the_admin_token_or_a_paid_order_and_change_nothing() {
    let db = sqlite_database().await;
    let stack = Stack::start(&db.url).await;
    let (no, alice) = paid_order(&stack, "alice").await;
    let ask = json!({ "out_trade_no": no, "idempotency_key": "k" });
    assert_eq!(ask_refund(&stack, None, ask.clone()).await.0, 401);
    assert_eq!(
        ask_refund(&stack, Some(&alice), ask.clone()).await.0,
        403,
        "a user's session is not the admin"
    );
    let (status, body) = ask_refund(
        &stack,
        Some(ADMIN),
        json!({ "out_trade_no": "NO_SUCH_ORDER_1", "idempotency_key": "k2" }),
    )
    .await;
    assert_eq!((status, code(&body)), (404, "unknown_order"), "{body}");
    let (_, unpaid) = stack
        .post("/api/v1/payment/create-order", Some(&alice), &json!({ "product_id": "p10" }).to_string())
        .await;
    let (status, body) = ask_refund(
        &stack,
        Some(ADMIN),
        json!({ "out_trade_no": unpaid["out_trade_no"], "idempotency_key": "k3" }),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "order_not_paid"), "{body}");
    let (status, body) = ask_refund(
        &stack,
        Some(ADMIN),
        json!({ "out_trade_no": no, "amount_fen": 991, "idempotency_key": "k4" }),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "refund_exceeds_paid"), "{body}");
    for bad in [
        json!({ "out_trade_no": no }),
        json!({ "out_trade_no": no, "idempotency_key": "k5", "amount_fen": -1 }),
        json!({ "out_trade_no": no, "idempotency_key": "k6", "price": 1 }),
    ] {
        let (status, body) = ask_refund(&stack, Some(ADMIN), bad.clone()).await;
        assert_eq!((status, code(&body)), (400, "invalid_body"), "{bad}: {body}");
    }
    // An order paid to another merchant (an earlier merchant id) is not ours to refund.
    db_exec(&db.url, "UPDATE orders SET mchid = '1900000999' WHERE out_trade_no = ?", &[&no]).await;
    let (status, body) =
        ask_refund(&stack, Some(ADMIN), json!({ "out_trade_no": no, "idempotency_key": "k7" })).await;
    assert_eq!((status, code(&body)), (409, "merchant_mismatch"), "{body}");
    db_exec(&db.url, &format!("UPDATE orders SET mchid = '{MCHID}' WHERE out_trade_no = ?"), &[&no]).await;
    assert_eq!(stack.sim.pay_refunds_of(&no), 0, "nothing reached WeChat Pay");
    assert_eq!(stack.quota(&alice).await, 10);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_pay_down_during_a_refund_leaves_it_processing_until_a_check_settles_it_once_on_both_databases()
 {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let (no, alice) = paid_order(&stack, "alice").await;
        stack.sim.set_down(true);
        let (status, refund) =
            ask_refund(&stack, Some(ADMIN), json!({ "out_trade_no": no, "idempotency_key": "down" })).await;
        assert_eq!((status, refund["status"].as_str()), (200, Some("processing")), "{which}: {refund}");
        let out_refund_no = refund["out_refund_no"].as_str().unwrap().to_string();
        // While it is processing, its amount is reserved: no second refund of the same money.
        let (status, body) = ask_refund(
            &stack,
            Some(ADMIN),
            json!({ "out_trade_no": no, "amount_fen": 1, "idempotency_key": "down-2" }),
        )
        .await;
        assert_eq!((status, code(&body)), (409, "refund_exceeds_paid"), "{which}: {body}");
        stack.sim.set_down(false);
        // A later check finds WeChat Pay never heard of it, asks again with the same number, and it settles.
        let done = settled(&stack, &out_refund_no).await;
        assert_eq!(done["status"], "success", "{which}: {done}");
        assert_eq!(stack.sim.pay_refunds_of(&no), 1, "{which}: one refund at WeChat Pay");
        assert_eq!(stack.quota(&alice).await, 0, "{which}: credits taken back once");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_notifies_forged_unknown_or_not_matching_the_refund_change_nothing_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let (no, alice) = paid_order(&stack, "alice").await;
        stack.sim.hold_refunds(true);
        let (_, refund) = ask_refund(
            &stack,
            Some(ADMIN),
            json!({ "out_trade_no": no, "amount_fen": 500, "idempotency_key": "held" }),
        )
        .await;
        let out_refund_no = refund["out_refund_no"].as_str().unwrap().to_string();
        let resource = |amount: i64, trade: &str, refund_no: &str| {
            json!({
                "mchid": MCHID, "out_trade_no": trade, "transaction_id": "4200", "out_refund_no": refund_no,
                "refund_id": "50000", "refund_status": "SUCCESS", "success_time": "2026-12-02T10:00:00+08:00",
                "amount": { "total": 990, "refund": amount, "payer_total": 990, "payer_refund": amount },
            })
        };
        // Signed by another key: refused at the web role.
        let (status, _) =
            send_notify(&stack, refund_notify(&resource(500, &no, &out_refund_no), "merchant_test_key.pem"))
                .await;
        assert_eq!(status, 401, "{which}");
        // Signed by WeChat Pay, but 10 minutes old (a replay), or a signature probe.
        let stale = refund_notify_at(
            &resource(500, &no, &out_refund_no),
            "wechatpay_platform_test_key.pem",
            wxhost::wechat::unix_now() - 600,
        );
        assert_eq!(send_notify(&stack, stale).await.0, 401, "{which}: stale");
        let (mut headers, body) =
            refund_notify(&resource(500, &no, &out_refund_no), "wechatpay_platform_test_key.pem");
        for (name, value) in headers.iter_mut() {
            if *name == "wechatpay-signature" {
                *value = format!("WECHATPAY/SIGNTEST/{value}");
            }
        }
        assert_eq!(send_notify(&stack, (headers, body)).await.0, 401, "{which}: SIGNTEST");
        // Correctly signed, but not this refund's amount or order, or no refund of ours.
        // (The web role passes the app role's refusal on as WeChat Pay's `code`.)
        for (what, bad, status, refusal) in [
            ("another amount", resource(990, &no, &out_refund_no), 409, "refund_mismatch"),
            ("another order", resource(500, "OTHER_ORDER_1", &out_refund_no), 409, "refund_mismatch"),
            ("an unknown refund", resource(500, &no, "RF_NOT_OURS_01"), 404, "unknown_refund"),
        ] {
            let (got, body) =
                send_notify(&stack, refund_notify(&bad, "wechatpay_platform_test_key.pem")).await;
            assert_eq!(got, status, "{which}: {what}: {body}");
            assert!(body.contains(refusal), "{which}: {what}: {body}");
        }
        let (_, seen) = stack.get(&format!("/api/v1/admin/refunds/{out_refund_no}"), Some(ADMIN)).await;
        assert_eq!(seen["status"], "processing", "{which}: {seen}");
        assert_eq!(stack.quota(&alice).await, 10, "{which}: nothing taken back");
        // WeChat Pay's own notify then settles it.
        let settled_now = stack.sim.settle_refund(&out_refund_no, "SUCCESS").await.unwrap();
        assert!(settled_now.1, "{which}: acknowledged: {settled_now:?}");
        assert_eq!(stack.quota(&alice).await, 4, "{which}: ceil(10 × 500 / 990) = 6 taken back");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_app_role_down_the_refund_notify_fails_and_a_retry_settles_it_once_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let mut stack = Stack::start(&db.url).await;
        let (no, alice) = paid_order(&stack, "alice").await;
        stack.sim.hold_refunds(true);
        let (_, refund) =
            ask_refund(&stack, Some(ADMIN), json!({ "out_trade_no": no, "idempotency_key": "app-down" }))
                .await;
        let out_refund_no = refund["out_refund_no"].as_str().unwrap().to_string();

        stack.stop_app().await;
        let (status, acknowledged) = stack.sim.settle_refund(&out_refund_no, "SUCCESS").await.unwrap();
        assert!(!acknowledged && status >= 500, "{which}: WeChat Pay is told to retry: {status}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(stack.sim.pay_refund(&out_refund_no).unwrap()["acknowledged"], false, "{which}");
        stack.restart_app().await;
        let started = Instant::now();
        while stack.sim.pay_refund(&out_refund_no).unwrap()["acknowledged"] != true {
            assert!(started.elapsed() < Duration::from_secs(45), "{which}: never acknowledged");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deliveries =
            stack.sim.pay_refund(&out_refund_no).unwrap()["deliveries"].as_array().unwrap().len();
        assert!(deliveries >= 3, "{which}: retried ({deliveries} deliveries)");
        let (_, seen) = stack.get(&format!("/api/v1/admin/refunds/{out_refund_no}"), Some(ADMIN)).await;
        assert_eq!(seen["status"], "success", "{which}: {seen}");
        assert_eq!(stack.quota(&alice).await, 0, "{which}: taken back once");
        stack.shutdown().await;
    }
}

/// An APIv2 refund notify as WeChat Pay sends it: `req_info` sealed under `key`.
fn v2_refund_notify(fields: &[(&str, String)], key: &str) -> String {
    let inner: Vec<(String, String)> = fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let root = wxhost::wechat::xml::to_xml(&inner).replace("<xml>", "<root>").replace("</xml>", "</root>");
    let outer = [
        ("return_code", "SUCCESS".to_string()),
        ("appid", APPID.to_string()),
        ("mch_id", MCHID.to_string()),
        ("nonce_str", "n0nce".to_string()),
        ("req_info", wxhost::wechat::pay::v2::seal_req_info(&root, key)),
    ]
    .map(|(k, v)| (k.to_string(), v));
    wxhost::wechat::xml::to_xml(&outer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiv2_refunds_settle_by_their_sealed_notify_once_and_a_forged_one_changes_nothing_on_both_databases()
{
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start_with(&db.url, full_config(), PayApi::V2).await;
        let (no, alice) = paid_order(&stack, "alice").await;

        let first = partial_refund_settled(&stack, which, &no, "v2-r1").await;
        assert_eq!(stack.quota(&alice).await, 6, "{which}");
        let at_wechat = stack.sim.pay_refund(&first).unwrap();
        assert_eq!(at_wechat["acknowledged"], true, "{which}: the sealed notify was taken: {at_wechat}");

        // Delivered 10 times at once: each acknowledged with APIv2's SUCCESS, applied once.
        assert_eq!(redelivered(&stack, &first, 10).await, json!(vec![200; 10]), "{which}");
        assert_eq!(stack.quota(&alice).await, 6, "{which}: still taken back once");

        // The rest, held at WeChat Pay; then notifies that must change nothing.
        stack.sim.hold_refunds(true);
        let (status, rest) =
            ask_refund(&stack, Some(ADMIN), json!({ "out_trade_no": no, "idempotency_key": "v2-r2" })).await;
        assert_eq!((status, rest["status"].as_str()), (200, Some("processing")), "{which}: {rest}");
        let second = rest["out_refund_no"].as_str().unwrap().to_string();
        let refund_of = |amount: i64| {
            vec![
                ("out_refund_no", second.clone()),
                ("out_trade_no", no.clone()),
                ("refund_fee", amount.to_string()),
                ("refund_id", "50000000000000000000000000001".to_string()),
                ("refund_status", "SUCCESS".to_string()),
                ("success_time", "2026-12-03 10:00:00".to_string()),
                ("total_fee", "990".to_string()),
            ]
        };
        let cases = [
            (
                "sealed under another key",
                v2_refund_notify(&refund_of(690), "another APIv2 key, not the one!!"),
            ),
            ("another amount", v2_refund_notify(&refund_of(1), APIV2_KEY)),
            (
                "not sealed at all",
                v2_refund_notify(&refund_of(690), APIV2_KEY).replace("<req_info>", "<req_info>x"),
            ),
        ];
        for (case, xml) in cases {
            let (status, body) = send_notify(&stack, (vec![("content-type", "text/xml".into())], xml)).await;
            assert!(
                body.contains("<return_code><![CDATA[FAIL]]></return_code>"),
                "{which}: {case}: {status} {body}"
            );
            let (_, shown) = stack.get(&format!("/api/v1/admin/refunds/{second}"), Some(ADMIN)).await;
            assert_eq!(shown["status"], "processing", "{which}: {case}: {shown}");
        }
        assert_eq!(stack.quota(&alice).await, 6, "{which}: nothing taken back by them");

        // WeChat Pay settles it: its own notify takes back the rest (6 of 7; 1 short).
        stack.sim.settle_refund(&second, "SUCCESS").await.unwrap();
        let done = settled(&stack, &second).await;
        assert_eq!(
            (done["credits_taken"].as_i64(), done["credits_shortfall"].as_i64()),
            (Some(6), Some(1)),
            "{which}: {done}"
        );
        assert_eq!(stack.quota(&alice).await, 0, "{which}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_racing_the_payments_notify_is_refunded_once_and_credited_once_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let mut stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;
        let order = || async {
            let (status, order) = stack
                .post(
                    "/api/v1/payment/create-order",
                    Some(&alice),
                    &json!({ "product_id": "p10" }).to_string(),
                )
                .await;
            assert_eq!(status, 200, "{order}");
            order["out_trade_no"].as_str().unwrap().to_string()
        };

        // The payer pays and the admin refunds at the same moment, five times over.
        let mut refunds = Vec::new();
        for i in 0..5 {
            let no = order().await;
            let pay = PayRequest { out_trade_no: Some(no.clone()), ..Default::default() };
            let key = format!("race-{i}");
            let ask = json!({ "out_trade_no": no, "idempotency_key": key });
            let (paid, (status, refund)) =
                tokio::join!(stack.sim.pay(&pay), ask_refund(&stack, Some(ADMIN), ask.clone()));
            assert!(paid.unwrap().acknowledged, "{which}");
            let refund = match (status, code(&refund)) {
                (200, _) => refund,
                // WeChat Pay had not taken the money yet when asked: refused, nothing reserved; asked again, refunded.
                (409, "order_not_paid") => {
                    let (status, again) = ask_refund(&stack, Some(ADMIN), ask).await;
                    assert_eq!(status, 200, "{which}: {again}");
                    again
                }
                other => panic!("{which}: {other:?}: {refund}"),
            };
            assert_eq!(refund["amount_fen"], 990, "{which}: {refund}");
            refunds.push((no, refund["out_refund_no"].as_str().unwrap().to_string()));
        }
        let mut taken = 0;
        for (no, out_refund_no) in &refunds {
            let done = settled(&stack, out_refund_no).await;
            assert_eq!(done["status"], "success", "{which}: {done}");
            taken += done["credits_taken"].as_i64().unwrap();
            assert_eq!(stack.sim.pay_refunds_of(no), 1, "{which}: one refund at WeChat Pay");
        }
        assert_eq!(taken, 50, "{which}: each order credited once and taken back once");
        assert_eq!(stack.quota(&alice).await, 0, "{which}");

        // The notify never arrives (the web role is down): the refund still finds the payment.
        stack.web.shutdown();
        let no = order().await;
        let paid = stack
            .sim
            .pay(&PayRequest { out_trade_no: Some(no.clone()), ..Default::default() })
            .await
            .unwrap();
        assert!(!paid.acknowledged, "{which}: {paid:?}");
        let (status, refund) =
            ask_refund(&stack, Some(ADMIN), json!({ "out_trade_no": no, "idempotency_key": "lost-notify" }))
                .await;
        assert_eq!(status, 200, "{which}: WeChat Pay was asked about the order first: {refund}");
        let done = settled(&stack, refund["out_refund_no"].as_str().unwrap()).await;
        assert_eq!(
            (done["status"].as_str(), done["credits_taken"].as_i64()),
            (Some("success"), Some(10)),
            "{which}: {done}"
        );
        assert_eq!(stack.quota(&alice).await, 0, "{which}");
        stack.stop_app().await;
    }
}
