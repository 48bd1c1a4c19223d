//! Money given back: the admin's refunds, and WeChat Pay's word on how they ended.
//!
//! - `POST /api/v1/admin/refunds` (admin token): `{out_trade_no, amount_fen?
//!   (default: what is left of the order), reason, idempotency_key}`. The
//!   refund row and the order's reservation are written in one transaction
//!   with the order locked, so refunds never exceed what was paid, and the
//!   key is unique, so the same request again (also at once) is the same
//!   refund. Then WeChat Pay is asked; if it cannot be reached the refund
//!   stays `processing` and is settled by its notify or a later query.
//! - `GET /api/v1/admin/refunds/{out_refund_no}`: the refund; one still
//!   processing is checked with WeChat Pay (and asked for again if WeChat Pay
//!   never heard of it: the same out_refund_no is never a second refund).
//! - The `REFUND.*` notify, verified here again (see `lib.rs`), and the query
//!   both settle a refund through [`apply`]: once, in one transaction; a
//!   success takes back the order's credits in proportion (rounded up, never
//!   below 0; the shortfall recorded).

use serde::Deserialize;
use wxhost_sdk::db::{self, DbError, params};
use wxhost_sdk::prelude::*;
use wxhost_sdk::session;
use wxhost_sdk::wechat_pay::{self, PayError, RefundRequest, RefundState};

/// Seconds between two checks of one processing refund with WeChat Pay.
const RECHECK_SECS: i64 = 3;

const REFUND_COLUMNS: &str = "out_refund_no, out_trade_no, amount_fen, reason, status, refund_id, credits_taken, \
                              credits_shortfall, failure, succeeded_at, created_at, updated_at";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    out_trade_no: String,
    amount_fen: Option<i64>,
    #[serde(default)]
    reason: String,
    idempotency_key: String,
}

pub fn create(req: &Request) -> Result<Response> {
    session::require_admin(req)?;
    let ask: Ask = req.json()?;
    if ask.idempotency_key.is_empty()
        || ask.idempotency_key.len() > 128
        || !ask.idempotency_key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Error::bad_request(
            "invalid_body",
            "idempotency_key must be 1-128 visible ASCII characters",
        ));
    }
    if ask.reason.chars().count() > 80 {
        return Err(Error::bad_request("invalid_body", "reason must be at most 80 characters"));
    }
    if ask.amount_fen.is_some_and(|a| a <= 0) {
        return Err(Error::bad_request("invalid_body", "amount_fen must be positive"));
    }
    if let Some(existing) = by_key(&ask)? {
        return Ok(Response::json(200, &shown(&existing)?));
    }
    // Paid at WeChat Pay while its notify is still on the way: asked first,
    // applied exactly as the notify would be.
    if let Some(order) = unfinished_order(&ask.out_trade_no)? {
        crate::reconcile(&ask.out_trade_no, &order);
    }
    let out_refund_no = match reserve(&ask) {
        Ok(no) => no,
        // The same key, committed by a concurrent request first: that refund.
        Err(e) if e.code == "refund_key_taken" => {
            let existing = by_key(&ask)?.ok_or(e)?;
            return Ok(Response::json(200, &shown(&existing)?));
        }
        Err(e) => return Err(e),
    };
    ask_wechat_pay(&out_refund_no);
    Ok(Response::json(200, &load(&out_refund_no)?))
}

/// The order, if it is still waiting for its payment here.
fn unfinished_order(out_trade_no: &str) -> Result<Option<Json>> {
    let rows = db::query(
        "SELECT status, time_expire FROM orders WHERE out_trade_no = ? AND status IN ('created', 'pending')",
        params![out_trade_no],
    )?;
    Ok(rows.first().map(|r| r.to_json()))
}

/// The refund this key already made, if any; another order or amount under the same key is a conflict.
fn by_key(ask: &Ask) -> Result<Option<Json>> {
    let rows = db::query(
        &format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE idempotency_key = ?"),
        params![&ask.idempotency_key],
    )?;
    let Some(row) = rows.first() else { return Ok(None) };
    let existing = row.to_json();
    let same_order = existing["out_trade_no"] == ask.out_trade_no.as_str();
    let same_amount = ask.amount_fen.is_none_or(|a| existing["amount_fen"] == a);
    if !same_order || !same_amount {
        return Err(Error::conflict("idempotency_key_reused", "this idempotency_key made another refund"));
    }
    Ok(Some(existing))
}

/// Writes the refund and reserves its amount on the order, the order locked.
fn reserve(ask: &Ask) -> Result<String> {
    let tx = db::begin()?;
    let rows = tx.query(
        &format!(
            "SELECT openid, amount_fen, refunded_fen, status, appid, mchid FROM orders WHERE out_trade_no = ?{}",
            db::for_update()
        ),
        params![&ask.out_trade_no],
    )?;
    let order =
        rows.first().ok_or_else(|| Error::new(404, "unknown_order", "no order has this out_trade_no"))?;
    let (openid, paid, refunded, status): (String, i64, i64, String) =
        (order.get("openid")?, order.get("amount_fen")?, order.get("refunded_fen")?, order.get("status")?);
    // A concurrent request with the same key got the order first: its refund.
    let taken =
        tx.query("SELECT id FROM refunds WHERE idempotency_key = ?", params![&ask.idempotency_key])?;
    if taken.first().is_some() {
        return Err(Error::conflict("refund_key_taken", "this idempotency_key is being used"));
    }
    if status != "paid" {
        return Err(Error::conflict("order_not_paid", "only a paid order can be refunded"));
    }
    // An order paid to another merchant (an earlier WECHATPAY_MCHID) is not this merchant's to refund.
    let (appid, mchid): (String, String) = (order.get("appid")?, order.get("mchid")?);
    let (our_appid, our_mchid) = wechat_pay::merchant()?;
    if (!appid.is_empty() || !mchid.is_empty()) && (appid != our_appid || mchid != our_mchid) {
        return Err(Error::conflict("merchant_mismatch", "the order was paid to another merchant"));
    }
    let amount = ask.amount_fen.unwrap_or(paid - refunded);
    if amount <= 0 || refunded + amount > paid {
        return Err(Error::conflict("refund_exceeds_paid", "the refunds would exceed what was paid"));
    }
    let now = now();
    let out_refund_no = format!("RF{now}{}", random_hex(8));
    tx.execute(
        "INSERT INTO refunds (out_refund_no, idempotency_key, out_trade_no, openid, amount_fen, reason, status, \
         created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'processing', ?, ?)",
        params![&out_refund_no, &ask.idempotency_key, &ask.out_trade_no, &openid, amount, &ask.reason, now, now],
    )
    .map_err(|e| match e {
        DbError::Constraint(_) => Error::conflict("refund_key_taken", "this idempotency_key is being used"),
        other => other.into(),
    })?;
    tx.execute(
        "UPDATE orders SET refunded_fen = refunded_fen + ?, updated_at = ? WHERE out_trade_no = ?",
        params![amount, now, &ask.out_trade_no],
    )?;
    tx.commit()?;
    log::info(&format!("refund {out_refund_no} of {amount} fen on order {} asked for", ask.out_trade_no));
    Ok(out_refund_no)
}

/// Asks WeChat Pay for the refund (again: the same out_refund_no is the same
/// refund there) and applies its answer. A refusal fails the refund and
/// frees its amount; no answer leaves it processing.
fn ask_wechat_pay(out_refund_no: &str) {
    let Ok(rows) = db::query(
        "SELECT r.out_trade_no, r.amount_fen, r.reason, o.amount_fen AS total_fen FROM refunds r \
         JOIN orders o ON o.out_trade_no = r.out_trade_no WHERE r.out_refund_no = ?",
        params![out_refund_no],
    ) else {
        return;
    };
    let Some(row) = rows.first() else { return };
    let request = (|| -> Result<RefundRequest> {
        let reason: String = row.get("reason")?;
        Ok(RefundRequest {
            out_trade_no: row.get("out_trade_no")?,
            out_refund_no: out_refund_no.to_string(),
            amount_fen: row.get("amount_fen")?,
            total_fen: row.get("total_fen")?,
            reason: Some(reason).filter(|r| !r.is_empty()),
        })
    })();
    let Ok(request) = request else { return };
    match wechat_pay::refund(&request) {
        Ok(state) => {
            if let Err(e) = apply(&state) {
                log::error(&format!("refund {out_refund_no}: WeChat Pay's answer was not applied: {e}"));
            }
        }
        Err(PayError::Refused((code, _))) if asks_again(&code) => touch(out_refund_no),
        Err(PayError::Refused((code, message))) => fail(out_refund_no, &format!("{code}: {message}")),
        Err(e) => {
            log::warn(&format!(
                "refund {out_refund_no}: WeChat Pay did not answer ({e:?}); it stays processing"
            ));
            touch(out_refund_no);
        }
    }
}

/// WeChat Pay's refusals that ask for the same request again later (the same
/// out_refund_no), so the refund stays processing: APIv3's system error and
/// rate limit, APIv2's `SYSTEMERROR` (mapped to SYSTEM_ERROR) and
/// `BIZERR_NEED_RETRY` ("the merchant must retry").
fn asks_again(code: &str) -> bool {
    ["SYSTEM_ERROR", "FREQUENCY_LIMITED", "BIZERR_NEED_RETRY"].contains(&code)
}

fn touch(out_refund_no: &str) {
    let _ = db::execute(
        "UPDATE refunds SET updated_at = ? WHERE out_refund_no = ? AND status = 'processing'",
        params![now(), out_refund_no],
    );
}

/// WeChat Pay refused the refund: it failed, and its amount is free again.
fn fail(out_refund_no: &str, why: &str) {
    let result = (|| -> Result<()> {
        let tx = db::begin()?;
        let rows = tx.query(
            &format!(
                "SELECT out_trade_no, amount_fen, status FROM refunds WHERE out_refund_no = ?{}",
                db::for_update()
            ),
            params![out_refund_no],
        )?;
        let row = rows.first_or_404("refund")?;
        let (no, amount, status): (String, i64, String) =
            (row.get("out_trade_no")?, row.get("amount_fen")?, row.get("status")?);
        if status != "processing" {
            return Ok(());
        }
        let now = now();
        tx.execute(
            "UPDATE refunds SET status = 'failed', failure = ?, updated_at = ? WHERE out_refund_no = ?",
            params![why, now, out_refund_no],
        )?;
        tx.execute(
            "UPDATE orders SET refunded_fen = refunded_fen - ?, updated_at = ? WHERE out_trade_no = ?",
            params![amount, now, &no],
        )?;
        Ok(tx.commit()?)
    })();
    match result {
        Ok(()) => log::warn(&format!("refund {out_refund_no} refused by WeChat Pay: {why}")),
        Err(e) => log::error(&format!("refund {out_refund_no}: marking it failed: {e}")),
    }
}

pub fn show(req: &Request) -> Result<Response> {
    session::require_admin(req)?;
    let no = req.param("out_refund_no")?;
    let refund = load(no)?;
    Ok(Response::json(200, &shown(&refund)?))
}

fn load(out_refund_no: &str) -> Result<Json> {
    let rows = db::query(
        &format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE out_refund_no = ?"),
        params![out_refund_no],
    )?;
    Ok(rows.first_or_404("refund")?.to_json())
}

/// The refund as the admin sees it; one still processing is checked with WeChat Pay first.
fn shown(refund: &Json) -> Result<Json> {
    let no = refund["out_refund_no"].as_str().unwrap_or_default().to_string();
    let stale = now() - refund["updated_at"].as_i64().unwrap_or(0) >= RECHECK_SECS;
    let refund = if refund["status"] == "processing" && stale {
        match wechat_pay::query_refund(&no) {
            Ok(state) => {
                if let Err(e) = apply(&state) {
                    log::error(&format!("refund {no}: WeChat Pay's state was not applied: {e}"));
                }
            }
            // Never reached WeChat Pay (it was down): asked for again, once per check.
            Err(PayError::Refused((code, _))) if code == "RESOURCE_NOT_EXISTS" => ask_wechat_pay(&no),
            Err(e) => log::warn(&format!("refund {no}: WeChat Pay could not be asked: {e:?}")),
        }
        load(&no)?
    } else {
        refund.clone()
    };
    let mut refund = refund;
    if let Some(r) = refund.as_object_mut() {
        r.remove("updated_at");
    }
    Ok(refund)
}

/// What WeChat Pay says of a refund (its answer, a query, or the notify's resource).
pub fn state_of_resource(resource: &Json) -> RefundState {
    let text = |k: &str| resource[k].as_str().map(str::to_string);
    RefundState {
        out_refund_no: text("out_refund_no").unwrap_or_default(),
        out_trade_no: text("out_trade_no").unwrap_or_default(),
        refund_id: text("refund_id"),
        status: text("refund_status").or_else(|| text("status")).unwrap_or_default(),
        amount_fen: resource["amount"]["refund"].as_i64().unwrap_or(-1),
        success_time: resource["success_time"].as_str().and_then(crate::rfc3339_unix),
    }
}

/// What an APIv2 refund notify says (its opened `req_info`), in APIv3's words.
pub fn state_of_v2_fields(fields: &[(String, String)]) -> RefundState {
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
    let status = match get("refund_status").as_deref() {
        Some("SUCCESS") => "SUCCESS",
        Some("REFUNDCLOSE") => "CLOSED",
        Some("CHANGE") => "ABNORMAL",
        Some("PROCESSING") => "PROCESSING",
        _ => "",
    };
    RefundState {
        out_refund_no: get("out_refund_no").unwrap_or_default(),
        out_trade_no: get("out_trade_no").unwrap_or_default(),
        refund_id: get("refund_id"),
        status: status.to_string(),
        amount_fen: get("refund_fee").and_then(|f| f.parse().ok()).unwrap_or(-1),
        success_time: get("success_time").and_then(|t| v2_time_unix(&t)),
    }
}

/// `2017-11-25 15:36:17` (China Standard Time) as Unix seconds.
fn v2_time_unix(t: &str) -> Option<i64> {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let cst = time::UtcOffset::from_hms(8, 0, 0).ok()?;
    time::PrimitiveDateTime::parse(t, format).ok().map(|t| t.assume_offset(cst).unix_timestamp())
}

/// Applies WeChat Pay's state of a refund, once: the refund locked, checked
/// against what WeChat Pay says, moved to its final state; a success takes
/// the credits back. Returns whether anything changed.
pub fn apply(state: &RefundState) -> Result<bool> {
    let tx = db::begin()?;
    let rows = tx.query(
        &format!(
            "SELECT out_trade_no, openid, amount_fen, status FROM refunds WHERE out_refund_no = ?{}",
            db::for_update()
        ),
        params![&state.out_refund_no],
    )?;
    let row =
        rows.first().ok_or_else(|| Error::new(404, "unknown_refund", "no refund has this out_refund_no"))?;
    let (out_trade_no, openid, amount, status): (String, String, i64, String) =
        (row.get("out_trade_no")?, row.get("openid")?, row.get("amount_fen")?, row.get("status")?);
    if (!state.out_trade_no.is_empty() && state.out_trade_no != out_trade_no) || state.amount_fen != amount {
        return Err(Error::conflict("refund_mismatch", "WeChat Pay's refund is not this refund"));
    }
    // success, closed and failed are final; abnormal can still be resolved.
    if !["processing", "abnormal"].contains(&status.as_str()) {
        return Ok(false);
    }
    let now = now();
    match state.status.as_str() {
        "SUCCESS" => {
            let order = tx.query(
                &format!("SELECT amount_fen, credits FROM orders WHERE out_trade_no = ?{}", db::for_update()),
                params![&out_trade_no],
            )?;
            let order = order.first_or_404("order")?;
            let (paid, credits): (i64, i64) = (order.get("amount_fen")?, order.get("credits")?);
            // In proportion to what was given back, rounded up.
            let take = (credits * amount + paid - 1) / paid;
            let user = tx.query(
                &format!("SELECT quota FROM users WHERE openid = ?{}", db::for_update()),
                params![&openid],
            )?;
            let quota: i64 = user.first_or_404("user")?.get("quota")?;
            let taken = take.min(quota.max(0));
            if taken > 0 {
                let back = wxhost_ledger::Change {
                    openid: &openid,
                    delta: -taken,
                    cause: wxhost_ledger::Cause::Refund,
                    reference: Some(&state.out_refund_no),
                    description: "",
                };
                wxhost_ledger::change(&tx, &back).map_err(|e| match e {
                    wxhost_ledger::Refused::Db(e) => e,
                    other => Error::internal(&format!("taking back {taken} credits: {other:?}")),
                })?;
            }
            tx.execute(
                "UPDATE refunds SET status = 'success', refund_id = ?, credits_taken = ?, credits_shortfall = ?, \
                 succeeded_at = ?, updated_at = ? WHERE out_refund_no = ?",
                params![state.refund_id.as_deref(), taken, take - taken, state.success_time.unwrap_or(now), now, &state.out_refund_no],
            )?;
            tx.commit()?;
            log::info(&format!(
                "refund {} succeeded: {taken} credits taken back, {} short",
                state.out_refund_no,
                take - taken
            ));
            Ok(true)
        }
        "CLOSED" => {
            tx.execute(
                "UPDATE refunds SET status = 'closed', refund_id = ?, updated_at = ? WHERE out_refund_no = ?",
                params![state.refund_id.as_deref(), now, &state.out_refund_no],
            )?;
            tx.execute(
                "UPDATE orders SET refunded_fen = refunded_fen - ?, updated_at = ? WHERE out_trade_no = ?",
                params![amount, now, &out_trade_no],
            )?;
            tx.commit()?;
            Ok(true)
        }
        "ABNORMAL" if status != "abnormal" => {
            // The money is stuck (a closed bank card): the merchant resolves it in WeChat Pay's console.
            log::warn(&format!("refund {} is abnormal at WeChat Pay", state.out_refund_no));
            tx.execute(
                "UPDATE refunds SET status = 'abnormal', refund_id = ?, updated_at = ? WHERE out_refund_no = ?",
                params![state.refund_id.as_deref(), now, &state.out_refund_no],
            )?;
            tx.commit()?;
            Ok(true)
        }
        "PROCESSING" | "ABNORMAL" => {
            tx.execute(
                "UPDATE refunds SET refund_id = COALESCE(?, refund_id), updated_at = ? WHERE out_refund_no = ?",
                params![state.refund_id.as_deref(), now, &state.out_refund_no],
            )?;
            tx.commit()?;
            Ok(false)
        }
        other => Err(Error::bad_request("malformed_notify", &format!("unknown refund status {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::asks_again;

    #[test]
    fn refusals_asking_for_a_retry_keep_the_refund_processing_and_others_end_it() {
        for code in ["SYSTEM_ERROR", "FREQUENCY_LIMITED", "BIZERR_NEED_RETRY"] {
            assert!(asks_again(code), "{code}");
        }
        for code in ["NOT_ENOUGH", "INVALID_REQUEST", "USER_ACCOUNT_ABNORMAL", "RESOURCE_NOT_EXISTS"] {
            assert!(!asks_again(code), "{code}");
        }
    }
}
