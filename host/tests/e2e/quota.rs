//! The quota ledger and the business service's consumption API, end to end
//! on SQLite and MariaDB with the simulator: debits once per idempotency key
//! (also concurrently), never below 0 under 200 concurrent consumes, releases
//! once, introspection of session tokens, the user's ledger, and `wxhost
//! audit` (a fresh process of the real binary) agreeing with the balances.

use std::time::Duration;

use crate::common::stack::*;
use crate::common::*;
use serde_json::{Value, json};
use wxhost::sim::PayRequest;

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

/// Buys `product` for the user of `token` and waits until it is credited.
async fn buy(stack: &Stack, token: &str, product: &str) {
    let (status, order) = stack
        .post("/api/v1/payment/create-order", Some(token), &json!({ "product_id": product }).to_string())
        .await;
    assert_eq!(status, 200, "{order}");
    let no = order["out_trade_no"].as_str().unwrap().to_string();
    let paid = stack.sim.pay(&PayRequest { out_trade_no: Some(no), ..Default::default() }).await.unwrap();
    assert!(paid.acknowledged, "{paid:?}");
}

/// A business service's call, retried (same body, same key) while the host
/// sheds load (503 with Retry-After), as a client of it should.
async fn service_call(stack: &Stack, credential: Option<&str>, path: &str, body: &Value) -> (u16, Value) {
    loop {
        let (status, answer) = stack.post(path, credential, &body.to_string()).await;
        if status != 503 || code(&answer) != "busy" {
            return (status, answer);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn consume(stack: &Stack, body: Value) -> (u16, Value) {
    service_call(stack, Some(SERVICE_KEY), "/api/v1/quota/consume", &body).await
}

async fn release(stack: &Stack, by: Value) -> (u16, Value) {
    service_call(stack, Some(SERVICE_KEY), "/api/v1/quota/release", &by).await
}

async fn introspect(stack: &Stack, token: &str) -> (u16, Value) {
    service_call(stack, Some(SERVICE_KEY), "/api/v1/session/introspect", &json!({ "token": token })).await
}

async fn audit(url: &str) -> wxhost::audit::Audit {
    let db = wxhost::database::connect(url, &Default::default()).await.unwrap();
    wxhost::audit::quota(&db).await.unwrap()
}

/// `wxhost audit` in its own process, as an operator runs it: its exit status and output.
fn audit_command(url: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxhost"))
        .arg("audit")
        .env("DATABASE_URL", url)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumption_debits_once_per_key_is_released_once_and_the_ledger_shows_it_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;
        buy(&stack, &alice, "p50").await;
        let openid = wxhost::sim::openid_of("alice");
        let ask = |key: &str, units: i64| json!({ "openid": openid, "units": units, "idempotency_key": key, "description": "识别 1 张图片" });

        // Only a business service's key opens these routes: not nothing, not a browser session.
        for credential in
            [None, Some(alice.as_str()), Some("svc-classifier-7c1f0e9a4b2d48e6a3f5c8d1b7e2a9f1")]
        {
            let (status, body) =
                service_call(&stack, credential, "/api/v1/quota/consume", &ask("k1", 3)).await;
            assert_eq!((status, code(&body)), (401, "unauthorized"), "{which}: {credential:?}: {body}");
        }
        // Bad input: a clear 4xx, nothing written.
        for (bad, expected) in [
            (ask("k1", 0), 400),
            (ask("k1", -5), 400),
            (ask("k1", 10_000_000), 400),
            (ask("", 1), 400),
            (json!({ "openid": "o-nobody-here", "units": 1, "idempotency_key": "k0" }), 404),
            (json!({ "openid": openid, "units": "3", "idempotency_key": "k1" }), 400),
        ] {
            let (status, body) = consume(&stack, bad.clone()).await;
            assert_eq!(status, expected, "{which}: {bad}: {body}");
        }
        assert_eq!(stack.quota(&alice).await, 50, "{which}");

        let (status, first) = consume(&stack, ask("k1", 3)).await;
        assert_eq!((status, first["remaining"].as_i64()), (200, Some(47)), "{which}: {first}");
        // The same key again, also under the service's new key (a rotation): the first answer.
        let (status, again) =
            service_call(&stack, Some(SERVICE_KEY_NEXT), "/api/v1/quota/consume", &ask("k1", 3)).await;
        assert_eq!((status, &again), (200, &first), "{which}");
        let (status, body) = consume(&stack, ask("k1", 4)).await;
        assert_eq!((status, code(&body)), (409, "idempotency_key_reused"), "{which}: {body}");
        // More than is left: 402 with what is left, nothing changed.
        let (status, body) = consume(&stack, ask("k2", 48)).await;
        assert_eq!(
            (status, code(&body), body["remaining"].as_i64()),
            (402, "insufficient_quota", Some(47)),
            "{which}: {body}"
        );
        assert_eq!(stack.quota(&alice).await, 47, "{which}");

        // The job failed: its units come back, once, by entry id or by key.
        let (status, released) =
            release(&stack, json!({ "entry_id": first["entry_id"], "reason": "识别失败" })).await;
        assert_eq!((status, released["remaining"].as_i64()), (200, Some(50)), "{which}: {released}");
        let (status, again) = release(&stack, json!({ "idempotency_key": "k1", "reason": "again" })).await;
        assert_eq!((status, &again), (200, &released), "{which}: released once");
        let (status, body) = release(&stack, json!({ "idempotency_key": "k-never" })).await;
        assert_eq!((status, code(&body)), (404, "unknown_consumption"), "{which}: {body}");
        let (status, body) = release(&stack, json!({ "entry_id": 1, "idempotency_key": "k1" })).await;
        assert_eq!(status, 400, "{which}: one of them: {body}");
        assert_eq!(stack.quota(&alice).await, 50, "{which}");

        // The user's ledger, newest first, paged.
        let (status, page) = stack.get("/api/v1/user/quota/ledger?limit=2", Some(&alice)).await;
        assert_eq!(status, 200, "{which}: {page}");
        let causes: Vec<&str> =
            page["entries"].as_array().unwrap().iter().map(|e| e["cause"].as_str().unwrap()).collect();
        assert_eq!(causes, ["release", "consume"], "{which}: {page}");
        assert_eq!(
            (page["balance"].as_i64(), page["entries"][1]["delta"].as_i64()),
            (Some(50), Some(-3)),
            "{which}"
        );
        let before = page["next_before"].as_i64().unwrap();
        let (_, rest) =
            stack.get(&format!("/api/v1/user/quota/ledger?limit=2&before={before}"), Some(&alice)).await;
        let rest = rest["entries"].as_array().unwrap();
        assert_eq!(
            (rest.len(), rest[0]["cause"].as_str(), rest[0]["delta"].as_i64()),
            (1, Some("order"), Some(50)),
            "{which}"
        );
        let (status, _) = stack.get("/api/v1/user/quota/ledger", None).await;
        assert_eq!(status, 401, "{which}: a session is needed");

        // The books balance, as `wxhost audit` (its own process) says; a balance changed behind the ledger's back is found.
        assert_eq!(audit(&db.url).await.differences, [], "{which}");
        let (ok, out) = audit_command(&db.url);
        assert!(ok && out.contains("every balance equals its ledger"), "{which}: {out}");
        db_exec(&db.url, "UPDATE users SET quota = quota + 1 WHERE openid = ?", &[&openid]).await;
        let found = audit(&db.url).await.differences;
        assert_eq!(
            (found.len(), found[0].balance, found[0].ledger_sum),
            (1, Some(51), 50),
            "{which}: {found:?}"
        );
        let (ok, out) = audit_command(&db.url);
        assert!(!ok && out.contains(&openid), "{which}: {out}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_consumes_spend_exactly_the_hundred_held_and_one_key_debits_once_on_both_databases()
 {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let bob = stack.login("bob").await;
        buy(&stack, &bob, "p50").await;
        buy(&stack, &bob, "p50").await;
        assert_eq!(stack.quota(&bob).await, 100, "{which}");
        let openid = wxhost::sim::openid_of("bob");

        let answers = futures::future::join_all((0..200).map(|i| {
            consume(&stack, json!({ "openid": openid, "units": 1, "idempotency_key": format!("job-{i}") }))
        }))
        .await;
        let count = |status: u16| answers.iter().filter(|(s, _)| *s == status).count();
        assert_eq!(
            (count(200), count(402)),
            (100, 100),
            "{which}: {:?}",
            answers.iter().find(|(s, _)| ![200, 402].contains(s))
        );
        assert_eq!(stack.quota(&bob).await, 0, "{which}");
        let debits = db_count(
            &db.url,
            &format!("SELECT COUNT(*) FROM quota_ledger WHERE openid = '{openid}' AND cause = 'consume'"),
        )
        .await;
        assert_eq!(debits, 100, "{which}");
        let mut remaining: Vec<i64> = answers
            .iter()
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| b["remaining"].as_i64().unwrap())
            .collect();
        remaining.sort();
        assert_eq!(remaining, (0..100).collect::<Vec<i64>>(), "{which}: each debit saw its own balance");

        // The same key from 20 requests at once: one debit, one answer.
        buy(&stack, &bob, "p10").await;
        let same = json!({ "openid": openid, "units": 2, "idempotency_key": "one-job" });
        let answers = futures::future::join_all((0..20).map(|_| consume(&stack, same.clone()))).await;
        assert!(answers.iter().all(|(s, b)| *s == 200 && *b == answers[0].1), "{which}: {answers:?}");
        assert_eq!(stack.quota(&bob).await, 8, "{which}: debited once");
        assert_eq!(audit(&db.url).await.differences, [], "{which}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_learns_whose_a_session_token_is_and_a_dead_one_is_inactive() {
    let db = sqlite_database().await;
    let stack = Stack::start(&db.url).await;
    let carol = stack.login("carol").await;
    let (status, live) = introspect(&stack, &carol).await;
    assert_eq!((status, live["active"].as_bool()), (200, Some(true)), "{live}");
    assert_eq!(live["openid"], wxhost::sim::openid_of("carol").as_str());
    assert!(live["expires_at"].as_i64().unwrap() > wxhost::wechat::unix_now());
    for dead in ["", "garbage", &format!("{carol}x")] {
        let (status, answer) = introspect(&stack, dead).await;
        assert_eq!((status, answer), (200, json!({ "active": false })), "{dead}");
    }
    let (status, _) = stack.post("/api/v1/auth/logout", Some(&carol), "").await;
    assert!(status < 300, "{status}");
    assert_eq!(introspect(&stack, &carol).await.1, json!({ "active": false }), "revoked");
    // A browser cannot introspect, even its own token.
    let (status, _) =
        stack.post("/api/v1/session/introspect", Some(&carol), &json!({ "token": carol }).to_string()).await;
    assert_eq!(status, 401);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_role_stopped_mid_stream_of_consumes_keeps_every_answered_debit_and_the_books_balanced_on_both_databases()
 {
    for db in all_databases().await {
        let which = db.name;
        let mut stack = Stack::start(&db.url).await;
        let dora = stack.login("dora").await;
        buy(&stack, &dora, "p50").await;
        let openid = wxhost::sim::openid_of("dora");
        const JOBS: usize = 40;
        let job =
            |i: usize| json!({ "openid": openid, "units": 1, "idempotency_key": format!("stream-{i}") });

        // The service consumes a stream of jobs while the app role goes down and comes back.
        let client = stack.client.clone();
        let url = stack.app_url("/api/v1/quota/consume");
        let jobs: Vec<Value> = (0..JOBS).map(job).collect();
        let stream = tokio::spawn(async move {
            let mut answers = Vec::new();
            for body in jobs {
                let sent = client.post(&url).bearer_auth(SERVICE_KEY).json(&body).send().await;
                answers.push(match sent {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0, // the connection was refused or cut: no answer
                });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            answers
        });
        tokio::time::sleep(Duration::from_millis(120)).await;
        stack.stop_app().await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        stack.restart_app().await;
        let answers = stream.await.unwrap();
        assert!(
            answers.iter().any(|s| *s != 200),
            "{which}: some consumes met the app role down: {answers:?}"
        );
        assert!(
            answers.iter().all(|s| [0, 200, 503].contains(s)),
            "{which}: a clear answer or none: {answers:?}"
        );

        // Every debit the service saw succeed is in the ledger, once.
        for (i, status) in answers.iter().enumerate() {
            if *status == 200 {
                let rows = db_count(&db.url, &format!("SELECT COUNT(*) FROM quota_ledger WHERE cause = 'consume' AND reference = 'stream-{i}'")).await;
                assert_eq!(rows, 1, "{which}: job {i}");
            }
        }
        // The rest is sent again with the same key: each lands once.
        for (i, status) in answers.iter().enumerate() {
            if *status != 200 {
                assert_eq!(consume(&stack, job(i)).await.0, 200, "{which}: job {i} again");
            }
        }
        let debits = db_count(
            &db.url,
            &format!("SELECT COUNT(*) FROM quota_ledger WHERE openid = '{openid}' AND cause = 'consume'"),
        )
        .await;
        assert_eq!(debits, JOBS as i64, "{which}: one debit per job");
        assert_eq!(stack.quota(&dora).await, 50 - JOBS as i64, "{which}");
        assert_eq!(audit(&db.url).await.differences, [], "{which}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_adjusts_a_balance_once_per_key_through_the_ledger_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let erin = stack.login("erin").await;
        let openid = wxhost::sim::openid_of("erin");
        let adjust = |delta: i64, key: &str| json!({ "openid": openid, "delta": delta, "reason": "客服补偿", "idempotency_key": key });
        let post = |credential: Option<&'static str>, body: Value| {
            let stack = &stack;
            async move { stack.post("/api/v1/admin/quota/adjust", credential, &body.to_string()).await }
        };
        assert_eq!(post(None, adjust(5, "a1")).await.0, 401, "{which}");
        assert_eq!(
            post(Some(SERVICE_KEY), adjust(5, "a1")).await.0,
            403,
            "{which}: a service key is not the admin's"
        );
        for bad in
            [adjust(0, "a1"), json!({ "openid": openid, "delta": 5, "reason": "", "idempotency_key": "a1" })]
        {
            assert_eq!(post(Some(ADMIN), bad.clone()).await.0, 400, "{which}: {bad}");
        }
        let (status, first) = post(Some(ADMIN), adjust(5, "a1")).await;
        assert_eq!((status, first["balance"].as_i64()), (200, Some(5)), "{which}: {first}");
        assert_eq!(post(Some(ADMIN), adjust(5, "a1")).await, (200, first.clone()), "{which}: once per key");
        assert_eq!(post(Some(ADMIN), adjust(6, "a1")).await.0, 409, "{which}");
        let (status, body) = post(Some(ADMIN), adjust(-6, "a2")).await;
        assert_eq!((status, body["remaining"].as_i64()), (402, Some(5)), "{which}: never below 0: {body}");
        assert_eq!(post(Some(ADMIN), adjust(-2, "a3")).await.1["balance"], 3, "{which}");
        assert_eq!(stack.quota(&erin).await, 3, "{which}");
        let (_, page) = stack.get("/api/v1/user/quota/ledger", Some(&erin)).await;
        let entries = page["entries"].as_array().unwrap();
        assert_eq!(
            (entries.len(), entries[0]["cause"].as_str(), entries[0]["description"].as_str()),
            (2, Some("admin"), Some("客服补偿")),
            "{which}"
        );
        assert_eq!(audit(&db.url).await.differences, [], "{which}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_that_differ_only_in_case_are_two_consumptions_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;
        buy(&stack, &alice, "p10").await;
        let openid = wxhost::sim::openid_of("alice");
        let ask =
            |key: &str| json!({ "openid": openid, "units": 1, "idempotency_key": key, "description": "x" });
        let (status, upper) = consume(&stack, ask("Job-1")).await;
        assert_eq!(status, 200, "{which}: {upper}");
        let (status, lower) = consume(&stack, ask("job-1")).await;
        assert_eq!(status, 200, "{which}: {lower}");
        assert_ne!(upper["entry_id"], lower["entry_id"], "{which}: another key is another consumption");
        assert_eq!(stack.quota(&alice).await, 8, "{which}");
        stack.shutdown().await;
    }
}
