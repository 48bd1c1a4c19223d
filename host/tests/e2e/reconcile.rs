//! Reconciliation with WeChat Pay's trade bill, end to end on SQLite and
//! MariaDB with the simulator serving the bills (APIv3 and APIv2): a payment
//! whose notify was lost is credited once, a second run finds the books
//! agreeing, a bill that fails its hash changes nothing, and every other
//! difference is reported by `wxhost reconcile` (a fresh process of the real
//! binary: its summary, its JSON report and its exit status).
//!
//! Bills are for days that are over: each test trades now, then moves its
//! trades a day back, at WeChat Pay (the simulator) and here alike.

use crate::common::stack::*;
use crate::common::*;
use serde_json::{Value, json};
use wxhost::sim::PayRequest;

const DAY: i64 = 86_400;

/// The day (China Standard Time) `secs_ago` seconds ago, as bills name days.
fn day_of(secs_ago: i64) -> String {
    let at = time::OffsetDateTime::now_utc() - time::Duration::seconds(secs_ago);
    wxhost::wechat::pay::day_name(at.to_offset(wxhost::wechat::pay::CST).date())
}

/// Moves every trade made so far a day back, at WeChat Pay and here alike;
/// returns the day they are now on.
async fn trade_yesterday(stack: &Stack) -> String {
    stack.sim.backdate_pay(DAY);
    let back = DAY.to_string();
    for sql in [
        "UPDATE orders SET paid_at = paid_at - ?, created_at = created_at - ? WHERE paid_at IS NOT NULL",
        "UPDATE refunds SET created_at = created_at - ?, succeeded_at = succeeded_at - ?",
    ] {
        db_exec(&stack.db_url, sql, &[&back, &back]).await;
    }
    day_of(DAY)
}

/// An order of `product` for the user of `token`, paid at WeChat Pay; with
/// `lose_notify` its notify never arrives. Returns its out_trade_no.
async fn pay_order(stack: &Stack, token: &str, product: &str, lose_notify: bool) -> String {
    let (status, order) = stack
        .post("/api/v1/payment/create-order", Some(token), &json!({ "product_id": product }).to_string())
        .await;
    assert_eq!(status, 200, "{order}");
    let no = order["out_trade_no"].as_str().unwrap().to_string();
    let paid = stack
        .sim
        .pay(&PayRequest { out_trade_no: Some(no.clone()), lose_notify, ..Default::default() })
        .await;
    assert_eq!(paid.unwrap().acknowledged, !lose_notify);
    no
}

async fn order_status(stack: &Stack, no: &str) -> String {
    let db = wxhost::database::connect(&stack.db_url, &Default::default()).await.unwrap();
    let sql = "SELECT status FROM orders WHERE out_trade_no = ?";
    wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar(sql).bind(no).fetch_one(p).await).unwrap()
}

/// `wxhost reconcile` in this process: the report, or the error as the command prints it.
async fn reconcile(stack: &Stack, date: &str) -> Result<Value, String> {
    wxhost::reconcile::run(&stack.config.path(), stack.app_settings.clone(), date)
        .await
        .map(|r| r.report)
        .map_err(|e| format!("{e:#}"))
}

fn kinds(report: &Value) -> Vec<(String, String)> {
    let mut kinds: Vec<(String, String)> = report["discrepancies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["kind"].as_str().unwrap().to_string(), d["action"].as_str().unwrap().to_string()))
        .collect();
    kinds.sort();
    kinds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_whose_notify_was_lost_is_credited_once_and_a_second_run_finds_the_books_agree() {
    for api in [PayApi::V3, PayApi::V2] {
        for db in all_databases().await {
            let which = format!("{} {api:?}", db.name);
            let stack = Stack::start_with(&db.url, full_config(), api).await;
            let alice = stack.login("alice").await;
            let notified = pay_order(&stack, &alice, "p10", false).await;
            let lost = pay_order(&stack, &alice, "p50", true).await;
            assert_eq!(order_status(&stack, &lost).await, "pending", "{which}");
            assert_eq!(stack.quota(&alice).await, 10, "{which}");
            let yesterday = trade_yesterday(&stack).await;

            let report = reconcile(&stack, &yesterday).await.unwrap_or_else(|e| panic!("{which}: {e}"));
            assert_eq!(kinds(&report), [("not_paid_here".into(), "credited".into())], "{which}: {report}");
            assert_eq!(report["discrepancies"][0]["out_trade_no"], lost, "{which}");
            assert_eq!(report["credited"], 1, "{which}");
            assert_eq!(
                report["bill"],
                json!({ "payments": 2, "paid_fen": 4980, "refunds": 0, "refunded_fen": 0, "other_lines": 0, "other_apps": 0 }),
                "{which}"
            );
            assert_eq!(
                report["here"],
                json!({ "payments": 2, "paid_fen": 4980, "refunds": 0, "refunded_fen": 0 }),
                "{which}"
            );
            assert_eq!(order_status(&stack, &lost).await, "paid", "{which}");
            assert_eq!(order_status(&stack, &notified).await, "paid", "{which}");
            assert_eq!(stack.quota(&alice).await, 60, "{which}");

            // Again: the books agree, nothing is credited twice.
            let again = reconcile(&stack, &yesterday).await.unwrap();
            assert_eq!(kinds(&again), [], "{which}: {again}");
            assert_eq!(again["credited"], 0, "{which}");
            assert_eq!(stack.quota(&alice).await, 60, "{which}");
            let credits =
                db_count(&db.url, &format!("SELECT COUNT(*) FROM quota_ledger WHERE reference = '{lost}'"))
                    .await;
            assert_eq!(credits, 1, "{which}: one ledger row for the late credit");
            let messages =
                db_count(&db.url, &format!("SELECT COUNT(*) FROM message_outbox WHERE reference = '{lost}'"))
                    .await;
            assert_eq!(messages, 1, "{which}: the payer is told once, as after a notify");
            stack.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bill_that_fails_its_hash_is_refused_and_nothing_is_applied() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;
        let lost = pay_order(&stack, &alice, "p10", true).await;
        let yesterday = trade_yesterday(&stack).await;
        stack.sim.corrupt_bills(true);
        let refused = reconcile(&stack, &yesterday).await.expect_err("a bill not matching its hash");
        assert!(refused.contains("bill_refused"), "{which}: {refused}");
        assert_eq!(order_status(&stack, &lost).await, "pending", "{which}");
        assert_eq!(stack.quota(&alice).await, 0, "{which}");

        // The bill is downloaded whole again next time.
        stack.sim.corrupt_bills(false);
        let report = reconcile(&stack, &yesterday).await.unwrap();
        assert_eq!(kinds(&report), [("not_paid_here".into(), "credited".into())], "{which}");
        assert_eq!(stack.quota(&alice).await, 10, "{which}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_without_a_bill_or_not_over_is_told_apart_from_agreement() {
    let db = sqlite_database().await;
    let stack = Stack::start(&db.url).await;
    // No trades that day: WeChat Pay has no bill, and nothing here was paid either.
    let quiet = reconcile(&stack, "2024-01-02").await.unwrap();
    assert_eq!(kinds(&quiet), []);
    assert_eq!(quiet["bill"]["payments"], 0);
    // Today's bill is written tomorrow morning: today is refused, not compared with nothing.
    for day in [day_of(0), day_of(-2 * DAY)] {
        let refused = reconcile(&stack, &day).await.unwrap_err();
        assert!(refused.contains("invalid_date") && refused.contains("not over"), "{day}: {refused}");
    }
    assert!(reconcile(&stack, "06/12/2026").await.unwrap_err().contains("YYYY-MM-DD"));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wxhost_reconcile_reports_every_difference_writes_its_report_and_exits_1() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;
        // Paid here, unknown to WeChat Pay (an order marked paid behind its back).
        let forged = pay_order(&stack, &alice, "p10", false).await;
        db_exec(
            &db.url,
            "UPDATE orders SET transaction_id = ? WHERE out_trade_no = ?",
            &["4200000000000000000000000001", &forged],
        )
        .await;
        // An amount here that is not what WeChat Pay took.
        let changed = pay_order(&stack, &alice, "p10", false).await;
        db_exec(&db.url, "UPDATE orders SET amount_fen = 1990 WHERE out_trade_no = ?", &[&changed]).await;
        // A refund that succeeded at WeChat Pay but is still processing here.
        let refunded = pay_order(&stack, &alice, "p50", false).await;
        let (status, refund) = stack
            .post(
                "/api/v1/admin/refunds",
                Some(ADMIN),
                &json!({ "out_trade_no": refunded, "amount_fen": 1000, "reason": "test", "idempotency_key": "rc-1" })
                    .to_string(),
            )
            .await;
        assert_eq!(status, 200, "{which}: {refund}");
        let out_refund_no = refund["out_refund_no"].as_str().unwrap().to_string();
        for _ in 0..100 {
            let settled = db_count(
                &db.url,
                &format!("SELECT COUNT(*) FROM refunds WHERE out_refund_no = '{out_refund_no}' AND status = 'success'"),
            )
            .await;
            if settled == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        db_exec(
            &db.url,
            "UPDATE refunds SET status = 'processing' WHERE out_refund_no = ?",
            &[&out_refund_no],
        )
        .await;
        let quota_before = stack.quota(&alice).await;
        let yesterday = trade_yesterday(&stack).await;

        let reports = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxhost"))
            .args(["reconcile", "--date", &yesterday, "--config"])
            .arg(stack.config.path())
            .arg("--report-dir")
            .arg(reports.path())
            .envs(env_of(&stack.app_settings))
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{which}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        for (kind, order) in [
            ("transaction_mismatch", &forged),
            ("amount_mismatch", &changed),
            ("refund_state_mismatch", &refunded),
        ] {
            assert!(
                stdout.contains(kind) && stdout.contains(order.as_str()),
                "{which}: {kind} {order}\n{stdout}"
            );
        }
        assert!(stdout.contains("3 discrepancies"), "{which}: {stdout}");
        let file = reports.path().join(format!("reconcile-{yesterday}.json"));
        let report: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(
            kinds(&report),
            [
                ("amount_mismatch".into(), "reported".into()),
                ("refund_state_mismatch".into(), "reported".into()),
                ("transaction_mismatch".into(), "reported".into()),
            ],
            "{which}: {report}"
        );
        assert_eq!(stack.quota(&alice).await, quota_before, "{which}: reporting changes nothing");

        // A payment here that WeChat Pay's bill lacks altogether.
        db_exec(
            &db.url,
            "UPDATE orders SET out_trade_no = 'GHOST0000001' WHERE out_trade_no = ?",
            &[&forged],
        )
        .await;
        let report = reconcile(&stack, &yesterday).await.unwrap();
        let found = kinds(&report);
        assert!(found.contains(&("missing_at_wechat".into(), "reported".into())), "{which}: {report}");
        assert!(found.contains(&("unknown_order".into(), "reported".into())), "{which}: {report}");
        stack.shutdown().await;
    }
}
