//! The day's books held against WeChat Pay's: `POST
//! /api/v1/internal/payment/reconcile` `{"date": "YYYY-MM-DD"}` (what `wxhost
//! reconcile` calls, a day in China Standard Time as WeChat Pay's bills are).
//!
//! The host downloads the day's trade bill (its hash checked) and this
//! compares it with the orders and refunds here:
//! - a payment there whose order is not paid here is asked about again
//!   (`query-order`, WeChat Pay's signed answer) and applied exactly as its
//!   notify would have been ([`crate::apply_paid`]: credited once);
//! - a payment there that is paid here under another transaction or amount,
//!   a payment here absent there, an order unknown here, and refunds whose
//!   amount or state disagree are reported, never changed.
//!
//! Lines of another AppID of the same merchant are counted, not compared. A
//! refund is on the bill of the day it was asked for, in its state when the
//! bill was written: PROCESSING there agrees with any outcome here.
//!
//! The answer is the report: both sides' totals and every discrepancy with
//! what was done about it. Running it again changes nothing more.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use wxhost_sdk::db::{self, params};
use wxhost_sdk::prelude::*;
use wxhost_sdk::wechat_pay::{self, BillEntry, PayError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    /// `YYYY-MM-DD`, China Standard Time.
    date: String,
}

/// One disagreement between the books, and what was done about it.
struct Discrepancy {
    kind: &'static str,
    out_trade_no: String,
    out_refund_no: Option<String>,
    here: Option<Json>,
    wechat: Option<Json>,
    /// `credited` (applied as its notify would have been) or `reported`.
    action: String,
}

impl Discrepancy {
    fn to_json(&self) -> Json {
        json!({
            "kind": self.kind,
            "out_trade_no": self.out_trade_no,
            "out_refund_no": self.out_refund_no,
            "here": self.here,
            "wechat": self.wechat,
            "action": self.action,
        })
    }
}

/// What the bill's day is here: Unix seconds `[start, end)`.
fn day_bounds(date: &str) -> Result<(i64, i64)> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = time::Date::parse(date, format)
        .map_err(|_| Error::bad_request("invalid_date", "date must be a day as YYYY-MM-DD"))?;
    let start = day.midnight().assume_offset(time::macros::offset!(+8)).unix_timestamp();
    Ok((start, start + 86_400))
}

pub fn reconcile_day(req: &Request) -> Result<Response> {
    let ask: Ask = req.json()?;
    let (start, end) = day_bounds(&ask.date)?;
    if end > now() {
        return Err(Error::bad_request(
            "invalid_date",
            "the day is not over: WeChat Pay writes its bill the next morning",
        ));
    }
    let bill = match wechat_pay::trade_bill(&ask.date) {
        Ok(lines) => lines,
        // No trades that day: an empty bill, so payments here are still checked.
        Err(PayError::Refused((code, _))) if code == "NO_STATEMENT_EXIST" => Vec::new(),
        Err(e) => return Err(bill_error(&ask.date, e)),
    };
    let (appid, _) = wechat_pay::merchant()?;
    let (ours, other_apps): (Vec<&BillEntry>, Vec<&BillEntry>) = bill.iter().partition(|l| l.appid == appid);
    let mut found = Vec::new();
    let payments: Vec<&BillEntry> = ours.iter().copied().filter(|l| l.refund.is_none()).collect();
    let refunds: Vec<&BillEntry> = ours.iter().copied().filter(|l| l.refund.is_some()).collect();
    check_payments(&payments, (start, end), &mut found)?;
    check_refunds(&refunds, (start, end), &mut found)?;

    let here = totals_here((start, end))?;
    let sum =
        |lines: &[&BillEntry], amount: fn(&BillEntry) -> i64| lines.iter().map(|l| amount(l)).sum::<i64>();
    let paid_lines: Vec<&BillEntry> =
        payments.iter().copied().filter(|l| l.trade_state == "SUCCESS").collect();
    let report = json!({
        "date": ask.date,
        "bill": {
            "payments": paid_lines.len(),
            "paid_fen": sum(&paid_lines, |l| l.amount_fen),
            "refunds": refunds.len(),
            "refunded_fen": sum(&refunds, |l| l.refund.as_ref().map_or(0, |r| r.amount_fen)),
            "other_lines": payments.len() - paid_lines.len(),
            "other_apps": other_apps.len(),
        },
        "here": here,
        "credited": found.iter().filter(|d| d.action == "credited").count(),
        "discrepancies": found.iter().map(Discrepancy::to_json).collect::<Vec<_>>(),
    });
    let outcome = if found.is_empty() { "reconciled" } else { "discrepancies" };
    log::info(&format!("reconciled {} with WeChat Pay's bill: {} discrepancies", ask.date, found.len()));
    Ok(Response::json(200, &report).outcome(outcome))
}

/// Why the day could not be reconciled, with WeChat Pay's code for the operator.
fn bill_error(date: &str, e: PayError) -> Error {
    log::warn(&format!("the trade bill of {date} could not be had: {e:?}"));
    match e {
        PayError::BadSignature => Error::new(
            502,
            "bill_refused",
            "WeChat Pay's bill does not match its signed hash; nothing was applied",
        ),
        PayError::Refused((code, _)) if code == "STATEMENT_CREATING" => Error::new(
            503,
            "bill_not_ready",
            "WeChat Pay is still writing this bill (STATEMENT_CREATING): try again after 10:00 China Standard Time",
        ),
        PayError::Refused((code, message)) => {
            Error::new(502, "bill_unavailable", &format!("WeChat Pay refused the bill: {code} ({message})"))
        }
        PayError::Unavailable(why) => Error::new(502, "bill_unavailable", &why),
        PayError::Timeout => Error::new(504, "bill_unavailable", "WeChat Pay did not answer in time"),
        PayError::Invalid(why) | PayError::NotConfigured(why) => Error::new(500, "bill_unavailable", &why),
    }
}

/// An order as the comparison needs it.
struct Here {
    status: String,
    transaction_id: Option<String>,
    amount_fen: i64,
    paid_at: Option<i64>,
}

impl Here {
    fn to_json(&self) -> Json {
        json!({
            "status": self.status,
            "transaction_id": self.transaction_id,
            "amount_fen": self.amount_fen,
            "paid_at": self.paid_at,
        })
    }
}

fn here_of(row: &db::Row) -> Result<Here> {
    Ok(Here {
        status: row.get("status")?,
        transaction_id: row.get("transaction_id")?,
        amount_fen: row.get("amount_fen")?,
        paid_at: row.get("paid_at")?,
    })
}

const ORDER_FIELDS: &str = "out_trade_no, status, transaction_id, amount_fen, paid_at";

fn wechat_of(line: &BillEntry) -> Json {
    json!({
        "trade_state": line.trade_state,
        "transaction_id": line.transaction_id,
        "amount_fen": line.amount_fen,
        "trade_time": line.trade_time,
    })
}

fn check_payments(
    lines: &[&BillEntry],
    (start, end): (i64, i64),
    found: &mut Vec<Discrepancy>,
) -> Result<()> {
    // The orders paid here that day, and then any other order the bill names.
    let mut orders: BTreeMap<String, Here> = BTreeMap::new();
    let paid_here = db::query(
        &format!("SELECT {ORDER_FIELDS} FROM orders WHERE status = 'paid' AND paid_at >= ? AND paid_at < ?"),
        params![start, end],
    )?;
    let paid_that_day: BTreeSet<String> =
        paid_here.iter().map(|r| r.get::<String>("out_trade_no")).collect::<Result<_, _>>()?;
    for row in paid_here.iter() {
        orders.insert(row.get("out_trade_no")?, here_of(&row)?);
    }
    let mut in_bill = BTreeSet::new();
    for line in lines {
        in_bill.insert(line.out_trade_no.clone());
        if !orders.contains_key(&line.out_trade_no) {
            let rows = db::query(
                &format!("SELECT {ORDER_FIELDS} FROM orders WHERE out_trade_no = ?"),
                params![&line.out_trade_no],
            )?;
            if let Some(row) = rows.first() {
                orders.insert(line.out_trade_no.clone(), here_of(&row)?);
            }
        }
        let report = |kind: &'static str, here: Option<&Here>| Discrepancy {
            kind,
            out_trade_no: line.out_trade_no.clone(),
            out_refund_no: None,
            here: here.map(Here::to_json),
            wechat: Some(wechat_of(line)),
            action: "reported".into(),
        };
        let Some(here) = orders.get(&line.out_trade_no) else {
            found.push(report("unknown_order", None));
            continue;
        };
        let paid_there = line.trade_state == "SUCCESS";
        match (paid_there, here.status == "paid") {
            (true, true) if here.transaction_id.as_deref() != Some(line.transaction_id.as_str()) => {
                found.push(report("transaction_mismatch", Some(here)))
            }
            (true, true) if here.amount_fen != line.amount_fen => {
                found.push(report("amount_mismatch", Some(here)))
            }
            (true, true) | (false, false) => {}
            (true, false) if here.amount_fen != line.amount_fen => {
                found.push(report("amount_mismatch", Some(here)))
            }
            (true, false) => {
                let mut d = report("not_paid_here", Some(here));
                d.action = apply_from_query(&line.out_trade_no);
                found.push(d);
            }
            (false, true) => found.push(report("state_mismatch", Some(here))),
        }
    }
    for no in paid_that_day.difference(&in_bill) {
        found.push(Discrepancy {
            kind: "missing_at_wechat",
            out_trade_no: no.clone(),
            out_refund_no: None,
            here: orders.get(no).map(Here::to_json),
            wechat: None,
            action: "reported".into(),
        });
    }
    Ok(())
}

/// A payment the bill has and the books do not: asked about again, and
/// applied exactly as its notify would have been if WeChat Pay's signed
/// answer says it is paid. Returns the action taken.
fn apply_from_query(out_trade_no: &str) -> String {
    let state = match wechat_pay::query_order(out_trade_no) {
        Ok(state) => state,
        Err(e) => {
            log::warn(&format!("order {out_trade_no}: WeChat Pay could not be asked: {e:?}"));
            return "reported: WeChat Pay could not be asked".into();
        }
    };
    if state.trade_state != "SUCCESS" {
        return format!("reported: WeChat Pay now says {}", state.trade_state);
    }
    match crate::apply_paid(&crate::OrderPaid::of_query(out_trade_no, state)) {
        Ok(outcome) if outcome["applied"] == true => {
            log::warn(&format!(
                "order {out_trade_no}: paid at WeChat Pay without a notify here; credited now"
            ));
            "credited".into()
        }
        Ok(_) => "reported: already paid".into(),
        Err(e) => format!("reported: not applied ({})", e.code),
    }
}

struct RefundHere {
    out_trade_no: String,
    status: String,
    amount_fen: i64,
    refund_id: Option<String>,
}

const REFUND_FIELDS: &str = "out_refund_no, out_trade_no, status, amount_fen, refund_id";

fn refund_of(row: &db::Row) -> Result<RefundHere> {
    Ok(RefundHere {
        out_trade_no: row.get("out_trade_no")?,
        status: row.get("status")?,
        amount_fen: row.get("amount_fen")?,
        refund_id: row.get("refund_id")?,
    })
}

fn check_refunds(lines: &[&BillEntry], (start, end): (i64, i64), found: &mut Vec<Discrepancy>) -> Result<()> {
    let mut refunds: BTreeMap<String, RefundHere> = BTreeMap::new();
    // Asked for that day and taken by WeChat Pay, or still on the way.
    let asked_here = db::query(
        &format!(
            "SELECT {REFUND_FIELDS} FROM refunds WHERE status IN ('processing', 'success', 'abnormal') \
             AND created_at >= ? AND created_at < ?"
        ),
        params![start, end],
    )?;
    let asked_that_day: BTreeSet<String> =
        asked_here.iter().map(|r| r.get::<String>("out_refund_no")).collect::<Result<_, _>>()?;
    for row in asked_here.iter() {
        refunds.insert(row.get("out_refund_no")?, refund_of(&row)?);
    }
    let mut in_bill = BTreeSet::new();
    for line in lines {
        let Some(r) = &line.refund else { continue };
        in_bill.insert(r.out_refund_no.clone());
        if !refunds.contains_key(&r.out_refund_no) {
            let rows = db::query(
                &format!("SELECT {REFUND_FIELDS} FROM refunds WHERE out_refund_no = ?"),
                params![&r.out_refund_no],
            )?;
            if let Some(row) = rows.first() {
                refunds.insert(r.out_refund_no.clone(), refund_of(&row)?);
            }
        }
        let here = refunds.get(&r.out_refund_no);
        let kind = match here {
            None => Some("unknown_refund"),
            Some(h) if h.out_trade_no != line.out_trade_no || h.amount_fen != r.amount_fen => {
                Some("refund_amount_mismatch")
            }
            Some(h) if refund_states_disagree(&r.status, &h.status) => Some("refund_state_mismatch"),
            Some(_) => None,
        };
        if let Some(kind) = kind {
            found.push(Discrepancy {
                kind,
                out_trade_no: line.out_trade_no.clone(),
                out_refund_no: Some(r.out_refund_no.clone()),
                here: here.map(|h| {
                    json!({ "out_trade_no": h.out_trade_no, "status": h.status, "amount_fen": h.amount_fen, "refund_id": h.refund_id })
                }),
                wechat: Some(json!({
                    "refund_id": r.refund_id, "status": r.status, "amount_fen": r.amount_fen, "trade_time": line.trade_time,
                })),
                action: "reported".into(),
            });
        }
    }
    for no in asked_that_day.difference(&in_bill) {
        let h = &refunds[no];
        found.push(Discrepancy {
            kind: "refund_missing_at_wechat",
            out_trade_no: h.out_trade_no.clone(),
            out_refund_no: Some(no.clone()),
            here: Some(json!({ "status": h.status, "amount_fen": h.amount_fen, "refund_id": h.refund_id })),
            wechat: None,
            action: "reported".into(),
        });
    }
    Ok(())
}

/// Whether the bill's state of a refund (as of the bill) and the state here disagree.
fn refund_states_disagree(there: &str, here: &str) -> bool {
    match (there, here) {
        // WeChat Pay refused it here, yet it has it.
        (_, "failed") => true,
        ("SUCCESS", here) => here != "success",
        // A snapshot taken before the refund ended.
        ("PROCESSING", _) => false,
        (_, here) => here == "success",
    }
}

/// What the books here say of the day, after the repairs.
fn totals_here((start, end): (i64, i64)) -> Result<Json> {
    let fen = db::as_integer("COALESCE(SUM(amount_fen), 0)");
    let paid = db::query(
        &format!(
            "SELECT COUNT(*) AS n, {fen} AS fen FROM orders WHERE status = 'paid' AND paid_at >= ? AND paid_at < ?"
        ),
        params![start, end],
    )?;
    let refunded = db::query(
        &format!(
            "SELECT COUNT(*) AS n, {fen} AS fen FROM refunds \
             WHERE status IN ('processing', 'success', 'abnormal') AND created_at >= ? AND created_at < ?"
        ),
        params![start, end],
    )?;
    let (paid, refunded) = (paid.first_or_404("total")?, refunded.first_or_404("total")?);
    Ok(json!({
        "payments": paid.get::<i64>("n")?,
        "paid_fen": paid.get::<i64>("fen")?,
        "refunds": refunded.get::<i64>("n")?,
        "refunded_fen": refunded.get::<i64>("fen")?,
    }))
}
