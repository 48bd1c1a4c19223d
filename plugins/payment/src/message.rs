//! The message to the payer when an order is credited: a WeChat template
//! message (`[plugins.config.paid_message]`: `template_id`, `url`, `data`),
//! written to `message_outbox` in the transaction that credits, so a credit
//! and its message are never one without the other. The host calls
//! `POST /api/v1/internal/payment/messages/deliver` on a schedule (plugins.toml
//! `jobs`): each due message is claimed, sent through `wechat-api`, and every
//! attempt recorded; a failure is retried with backoff, a user who refused
//! the account's messages (43101) is recorded and never retried.

use std::collections::BTreeMap;

use serde::Deserialize;
use wxhost_sdk::config;
use wxhost_sdk::db::{Transaction, params};
use wxhost_sdk::prelude::*;
use wxhost_sdk::wechat_api::{self, ApiError, Method};

const SEND_PATH: &str = "cgi-bin/message/template/send";
/// WeChat: the user refused messages from the account.
const REFUSED: i32 = 43101;
/// Seconds to wait before attempt n+1; after the last, the message has failed.
const BACKOFF_SECS: [i64; 7] = [5, 30, 120, 600, 3600, 3600, 3600];
/// How long a delivering process holds a message.
const CLAIM_SECS: i64 = 60;
const BATCH: i64 = 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PaidMessage {
    template_id: String,
    /// Where the message leads (the member page).
    #[serde(default)]
    url: Option<String>,
    /// Template field → text, with `{product}`, `{amount}` (yuan),
    /// `{credits}`, `{out_trade_no}` and `{paid_at}` filled in.
    data: BTreeMap<String, String>,
}

/// The order that was credited, as the message tells it.
pub struct Credited<'a> {
    pub openid: &'a str,
    pub out_trade_no: &'a str,
    pub description: &'a str,
    pub amount_fen: i64,
    pub credits: i64,
    pub paid_at: i64,
}

fn configured() -> Result<Option<PaidMessage>> {
    let Some(raw) = config::get("paid_message") else { return Ok(None) };
    let m: PaidMessage = serde_json::from_str(&raw).map_err(|e| {
        log::error(&format!("[plugins.config.paid_message] is invalid: {e}"));
        Error::new(500, "config_invalid", "the payment message is misconfigured")
    })?;
    if m.template_id.is_empty() || m.data.is_empty() {
        log::error("[plugins.config.paid_message] needs a template_id and data");
        return Err(Error::new(500, "config_invalid", "the payment message is misconfigured"));
    }
    Ok(Some(m))
}

/// Writes the message for a credited order into the outbox, in `tx` (the
/// crediting transaction); nothing when no message is configured.
pub fn enqueue(tx: &Transaction, c: &Credited<'_>) -> Result<()> {
    // A broken message config must never hold back a credit: logged, no message.
    let Ok(Some(m)) = configured() else { return Ok(()) };
    let paid_at = time::OffsetDateTime::from_unix_timestamp(c.paid_at)
        .ok()
        .and_then(|t| {
            t.to_offset(time::macros::offset!(+8))
                .format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]"))
                .ok()
        })
        .unwrap_or_default();
    let fill = |text: &str| {
        text.replace("{product}", c.description)
            .replace("{amount}", &format!("{}.{:02}", c.amount_fen / 100, c.amount_fen % 100))
            .replace("{credits}", &c.credits.to_string())
            .replace("{out_trade_no}", c.out_trade_no)
            .replace("{paid_at}", &paid_at)
    };
    let data: serde_json::Map<String, Json> =
        m.data.iter().map(|(k, v)| (k.clone(), json!({ "value": fill(v) }))).collect();
    let mut body = json!({ "touser": c.openid, "template_id": m.template_id, "data": data });
    if let Some(url) = &m.url {
        body["url"] = json!(url);
    }
    let now = now();
    tx.execute(
        "INSERT INTO message_outbox (kind, reference, openid, body, status, attempts, next_attempt_at, claimed_until, created_at) \
         VALUES ('paid', ?, ?, ?, 'pending', 0, ?, 0, ?)",
        params![c.out_trade_no, c.openid, body.to_string(), now, now],
    )?;
    Ok(())
}

/// The scheduled job: delivers the messages that are due.
pub fn deliver(_: &Request) -> Result<Response> {
    let now = now();
    let due = db::query(
        "SELECT id, body, attempts FROM message_outbox WHERE status = 'pending' AND next_attempt_at <= ? \
         AND claimed_until <= ? ORDER BY id LIMIT ?",
        params![now, now, BATCH],
    )?;
    let (mut sent, mut refused, mut retried, mut failed) = (0, 0, 0, 0);
    for row in due.iter() {
        let (id, body, attempts): (i64, String, i64) =
            (row.get("id")?, row.get("body")?, row.get("attempts")?);
        // Another process may have taken it since: only the one whose claim lands sends it.
        let claimed = db::execute(
            "UPDATE message_outbox SET claimed_until = ? WHERE id = ? AND status = 'pending' AND claimed_until <= ?",
            params![now + CLAIM_SECS, id, now],
        )?;
        if claimed.rows_affected != 1 {
            continue;
        }
        let attempt = attempts + 1;
        let (status, outcome, errcode, detail, next) =
            match wechat_api::call(Method::Post, SEND_PATH, &[], Some(&body)) {
                Ok(answer) => {
                    sent += 1;
                    ("sent", "sent", None, answer, now)
                }
                Err(ApiError::Wechat(e)) if e.errcode == REFUSED => {
                    refused += 1;
                    ("blocked", "blocked", Some(e.errcode), e.errmsg, now)
                }
                Err(e) => {
                    let (errcode, detail) = match e {
                        ApiError::Wechat(w) => (Some(w.errcode), w.errmsg),
                        other => (None, format!("{other:?}")),
                    };
                    match BACKOFF_SECS.get(attempts as usize) {
                        Some(wait) => {
                            retried += 1;
                            ("pending", "retry", errcode, detail, now + wait)
                        }
                        None => {
                            failed += 1;
                            ("failed", "failed", errcode, detail, now)
                        }
                    }
                }
            };
        let detail: String = detail.chars().take(255).collect();
        let tx = db::begin()?;
        tx.execute(
            "INSERT INTO message_attempts (message_id, outcome, errcode, detail, at) VALUES (?, ?, ?, ?, ?)",
            params![id, outcome, errcode.map(i64::from), &detail, now],
        )?;
        tx.execute(
            "UPDATE message_outbox SET status = ?, attempts = ?, next_attempt_at = ?, claimed_until = 0, \
             last_error = ?, sent_at = ? WHERE id = ?",
            params![
                status,
                attempt,
                next,
                (outcome != "sent").then_some(detail.as_str()),
                (outcome == "sent").then_some(now),
                id
            ],
        )?;
        tx.commit()?;
        if outcome == "blocked" {
            log::info(&format!("message {id}: the user refused the account's messages; not sent again"));
        } else if outcome != "sent" {
            log::warn(&format!("message {id}: attempt {attempt} failed ({errcode:?}): {detail}"));
        }
    }
    Ok(Response::json(
        200,
        &json!({ "sent": sent, "refused": refused, "retried": retried, "failed": failed }),
    ))
}
