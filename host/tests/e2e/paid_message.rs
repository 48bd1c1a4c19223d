//! The message to the payer when an order is credited, end to end on SQLite
//! and MariaDB with the simulator: written with the credit, delivered by the
//! host's scheduled job through wechat-api, once per order however often the
//! notify comes, a refusing user (43101) recorded and not retried, WeChat down
//! retried with backoff, every attempt recorded.

use std::time::{Duration, Instant};

use crate::common::stack::*;
use crate::common::*;
use serde_json::{Value, json};
use wxhost::sim::{PayRequest, openid_of};

/// Orders p10 for the user and has it paid; its out_trade_no.
async fn paid(stack: &Stack, token: &str, down_after_ordering: bool) -> String {
    let (status, order) = stack
        .post("/api/v1/payment/create-order", Some(token), &json!({ "product_id": "p10" }).to_string())
        .await;
    assert_eq!(status, 200, "{order}");
    let no = order["out_trade_no"].as_str().unwrap().to_string();
    if down_after_ordering {
        stack.sim.set_down(true);
    }
    let paid =
        stack.sim.pay(&PayRequest { out_trade_no: Some(no.clone()), ..Default::default() }).await.unwrap();
    assert!(paid.acknowledged, "{paid:?}");
    no
}

async fn outbox(url: &str, no: &str) -> (String, i64) {
    let db = wxhost::database::connect(url, &Default::default()).await.unwrap();
    let sql = "SELECT status, attempts FROM message_outbox WHERE kind = 'paid' AND reference = ?";
    wxhost::on_pool!(&db.pool, |p| sqlx::query_as(sql).bind(no).fetch_one(p).await).unwrap()
}

async fn attempts(url: &str, no: &str) -> Vec<String> {
    let db = wxhost::database::connect(url, &Default::default()).await.unwrap();
    let sql = "SELECT a.outcome FROM message_attempts a JOIN message_outbox m ON m.id = a.message_id \
               WHERE m.reference = ? ORDER BY a.id";
    wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar(sql).bind(no).fetch_all(p).await).unwrap()
}

async fn until_status(url: &str, no: &str, status: &str) {
    let started = Instant::now();
    loop {
        let (now, _) = outbox(url, no).await;
        if now == status {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "message for {no} still {now}, not {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn messages_to(stack: &Stack, user: &str) -> Vec<Value> {
    let openid = openid_of(user);
    stack.sim.template_messages().into_iter().filter(|m| m["touser"] == openid.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payer_gets_one_message_per_credited_order_a_refusing_user_is_not_retried_and_a_failure_is_on_both_databases()
 {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;

        // Credited: one message, with the order's own words.
        let alice = stack.login("alice").await;
        let no = paid(&stack, &alice, false).await;
        until_status(&db.url, &no, "sent").await;
        let sent = messages_to(&stack, "alice");
        assert_eq!(sent.len(), 1, "{which}: {sent:?}");
        let m = &sent[0];
        assert_eq!(m["template_id"], "tmpl-paid-0001", "{which}");
        assert_eq!(m["url"], "https://shop.example.com/member.html", "{which}");
        assert_eq!(
            [&m["data"]["thing1"]["value"], &m["data"]["amount2"]["value"], &m["data"]["number3"]["value"]],
            [&json!("10 次识别"), &json!("9.90 元"), &json!("10")],
            "{which}: {m}"
        );
        assert_eq!(m["data"]["character_string5"]["value"], no.as_str(), "{which}");
        assert_eq!(attempts(&db.url, &no).await, ["sent"], "{which}");
        // The notify again, three times: credited once, so one message.
        let r = stack
            .client
            .post(stack.sim_url("/sim/pay/notify"))
            .json(&json!({ "out_trade_no": no, "times": 3 }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{which}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(messages_to(&stack, "alice").len(), 1, "{which}: one message per order");

        // A user who refused the account's messages: recorded, never sent again.
        let bob = stack.login("bob").await;
        stack.sim.refuse_messages(&openid_of("bob"));
        let no = paid(&stack, &bob, false).await;
        until_status(&db.url, &no, "blocked").await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(outbox(&db.url, &no).await, ("blocked".to_string(), 1), "{which}: not retried");
        assert_eq!(attempts(&db.url, &no).await, ["blocked"], "{which}");
        assert_eq!(stack.quota(&bob).await, 10, "{which}: the credit does not wait for the message");

        // WeChat down when it is first sent: retried after the backoff, then sent.
        let carol = stack.login("carol").await;
        let no = paid(&stack, &carol, true).await;
        let started = Instant::now();
        while attempts(&db.url, &no).await.is_empty() {
            assert!(started.elapsed() < Duration::from_secs(20), "{which}: never attempted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stack.sim.set_down(false);
        until_status(&db.url, &no, "sent").await;
        assert_eq!(attempts(&db.url, &no).await, ["retry", "sent"], "{which}");
        assert_eq!(messages_to(&stack, "carol").len(), 1, "{which}");
        stack.shutdown().await;
    }
}
