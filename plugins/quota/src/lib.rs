//! App role plugin: quota spent by the business service, and the user's ledger.
//!
//! - `POST /api/v1/quota/consume` (service key) `{openid, units,
//!   idempotency_key, description}` debits `units` once: the consumption row
//!   claims `(service, idempotency_key)` first, then the ledger debits the
//!   balance only if it covers it, all in one transaction. The same key again
//!   (concurrently, after a restart) answers the first answer; with another
//!   openid or units it is a 409. Not enough quota: 402, nothing written.
//! - `POST /api/v1/quota/release` (service key) `{entry_id | idempotency_key,
//!   reason}` gives one consumption's units back, once.
//! - `POST /api/v1/session/introspect` (service key) `{token}`: whose a
//!   browser's bearer token is, `active: false` if it is not a live session.
//! - `GET /api/v1/user/quota/ledger` (session): the caller's ledger, newest
//!   first, `?before=<id>&limit=<n>` to page.
//! - `POST /api/v1/admin/quota/adjust` (admin token) `{openid, delta, reason,
//!   idempotency_key}`: the operator's correction, once per key, never below 0.
//!
//! The host checks the service key before this plugin runs (plugins.toml
//! `service_routes`) and passes only the service's name.

use serde::Deserialize;
use wxhost_ledger::{Cause, Change, Refused};
use wxhost_sdk::db::{DbError, params};
use wxhost_sdk::prelude::*;
use wxhost_sdk::session::{self, SessionError};

fn routes() -> Router {
    Router::new()
        .post("/api/v1/quota/consume", consume)
        .post("/api/v1/quota/release", release)
        .post("/api/v1/session/introspect", introspect)
        .get("/api/v1/user/quota/ledger", ledger)
        .post("/api/v1/admin/quota/adjust", adjust)
}

wxhost_sdk::plugin!(routes);

/// The most one consumption may debit: a larger number is a caller's bug.
const MAX_UNITS: i64 = 1_000_000;
const LEDGER_PAGE: i64 = 20;
const LEDGER_PAGE_MAX: i64 = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Consume {
    openid: String,
    units: i64,
    idempotency_key: String,
    #[serde(default)]
    description: String,
}

fn invalid(message: &str) -> Error {
    Error::bad_request("invalid_body", message)
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("idempotency_key must be 1-128 visible ASCII characters"));
    }
    Ok(())
}

fn consume(req: &Request) -> Result<Response> {
    let service = req.service()?.to_string();
    let ask: Consume = req.json()?;
    if ask.openid.is_empty() || ask.openid.len() > 64 {
        return Err(invalid("openid must be 1-64 characters"));
    }
    if !(1..=MAX_UNITS).contains(&ask.units) {
        return Err(invalid(&format!("units must be 1 to {MAX_UNITS}")));
    }
    check_key(&ask.idempotency_key)?;
    if ask.description.chars().count() > 255 {
        return Err(invalid("description must be at most 255 characters"));
    }
    if let Some(first) = consumed(&service, &ask)? {
        return Ok(first);
    }
    let tx = db::begin()?;
    // The key first: a concurrent request with the same key waits here for
    // this one's commit, then finds the key taken and answers what this did.
    let claimed = tx.execute(
        "INSERT INTO quota_consumptions (service, idempotency_key, openid, units, description, created_at) \
         VALUES (?, ?, ?, ?, ?, ?)",
        params![&service, &ask.idempotency_key, &ask.openid, ask.units, &ask.description, now()],
    );
    match claimed {
        Ok(_) => {}
        Err(DbError::Constraint(_)) => {
            drop(tx);
            return consumed(&service, &ask)?.ok_or_else(|| {
                Error::conflict("idempotency_key_busy", "this idempotency_key is being used; retry")
            });
        }
        Err(e) => return Err(e.into()),
    }
    let change = Change {
        openid: &ask.openid,
        delta: -ask.units,
        cause: Cause::Consume,
        reference: Some(&ask.idempotency_key),
        description: &ask.description,
    };
    let entry = match wxhost_ledger::change(&tx, &change) {
        Ok(entry) => entry,
        Err(Refused::Insufficient { balance }) => {
            drop(tx);
            return Ok(insufficient(balance, ask.units));
        }
        Err(Refused::UnknownUser) => return Err(Error::not_found("no user has this openid")),
        Err(Refused::Db(e)) => return Err(e),
    };
    tx.execute(
        "UPDATE quota_consumptions SET entry_id = ? WHERE service = ? AND idempotency_key = ?",
        params![entry.id, &service, &ask.idempotency_key],
    )?;
    tx.commit()?;
    let answer = json!({ "entry_id": entry.id, "remaining": entry.balance_after, "units": ask.units, "openid": ask.openid });
    Ok(Response::json(200, &answer).outcome("consumed"))
}

/// The answer a consumption with this key got, if there is one; the same
/// key for another user or amount is a 409.
fn consumed(service: &str, ask: &Consume) -> Result<Option<Response>> {
    let rows = db::query(
        "SELECT c.openid, c.units, c.entry_id, l.balance_after FROM quota_consumptions c \
         JOIN quota_ledger l ON l.id = c.entry_id WHERE c.service = ? AND c.idempotency_key = ?",
        params![service, &ask.idempotency_key],
    )?;
    let Some(row) = rows.first() else { return Ok(None) };
    let (openid, units): (String, i64) = (row.get("openid")?, row.get("units")?);
    if openid != ask.openid || units != ask.units {
        return Err(Error::conflict(
            "idempotency_key_reused",
            "this idempotency_key was used for another openid or number of units",
        ));
    }
    let (entry_id, remaining): (i64, i64) = (row.get("entry_id")?, row.get("balance_after")?);
    let answer = json!({ "entry_id": entry_id, "remaining": remaining, "units": units, "openid": openid });
    Ok(Some(Response::json(200, &answer).outcome("duplicate")))
}

fn insufficient(remaining: i64, units: i64) -> Response {
    let body = json!({
        "error": { "code": "insufficient_quota", "message": format!("{units} units asked for, {remaining} left") },
        "remaining": remaining,
    });
    Response::json(402, &body).outcome("insufficient")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Release {
    entry_id: Option<i64>,
    idempotency_key: Option<String>,
    #[serde(default)]
    reason: String,
}

fn release(req: &Request) -> Result<Response> {
    let service = req.service()?.to_string();
    let ask: Release = req.json()?;
    if ask.reason.chars().count() > 255 {
        return Err(invalid("reason must be at most 255 characters"));
    }
    // Only the service's own consumptions: by its key, or by the debit's entry id.
    let (filter, value) = match (&ask.entry_id, &ask.idempotency_key) {
        (Some(id), None) => ("entry_id = ?", Value::from(*id)),
        (None, Some(key)) => {
            check_key(key)?;
            ("idempotency_key = ?", Value::from(key.as_str()))
        }
        _ => return Err(invalid("give entry_id or idempotency_key, one of them")),
    };
    let tx = db::begin()?;
    let rows = tx.query(
        &format!(
            "SELECT id, openid, units, idempotency_key, entry_id, released_entry_id FROM quota_consumptions \
             WHERE service = ? AND {filter} AND entry_id IS NOT NULL{}",
            db::for_update()
        ),
        &[Value::from(service.as_str()), value],
    )?;
    let row = rows.first().ok_or_else(|| {
        Error::new(404, "unknown_consumption", "this service has no consumption with that entry_id or key")
    })?;
    let (id, openid, units, key, debit): (i64, String, i64, String, i64) = (
        row.get("id")?,
        row.get("openid")?,
        row.get("units")?,
        row.get("idempotency_key")?,
        row.get("entry_id")?,
    );
    if let Some(released) = row.get::<Option<i64>>("released_entry_id")? {
        drop(tx);
        let rows = db::query("SELECT balance_after FROM quota_ledger WHERE id = ?", params![released])?;
        let remaining: i64 = rows.first_or_404("ledger entry")?.get("balance_after")?;
        let answer = json!({ "entry_id": released, "released_entry_id": debit, "units": units, "remaining": remaining });
        return Ok(Response::json(200, &answer).outcome("duplicate"));
    }
    let change = Change {
        openid: &openid,
        delta: units,
        cause: Cause::Release,
        reference: Some(&key),
        description: &ask.reason,
    };
    let entry = match wxhost_ledger::change(&tx, &change) {
        Ok(entry) => entry,
        Err(Refused::Insufficient { .. } | Refused::UnknownUser) => {
            return Err(Error::conflict("unknown_user", "the consumption's user does not exist any more"));
        }
        Err(Refused::Db(e)) => return Err(e),
    };
    tx.execute(
        "UPDATE quota_consumptions SET released_entry_id = ?, release_reason = ? WHERE id = ?",
        params![entry.id, &ask.reason, id],
    )?;
    tx.commit()?;
    let answer = json!({ "entry_id": entry.id, "released_entry_id": debit, "units": units, "remaining": entry.balance_after });
    Ok(Response::json(200, &answer).outcome("released"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Introspect {
    token: String,
}

fn introspect(req: &Request) -> Result<Response> {
    req.service()?;
    let ask: Introspect = req.json()?;
    let answer = match session::verify(&ask.token) {
        Ok(info) => json!({ "active": true, "openid": info.openid, "expires_at": info.expires_at }),
        Err(SessionError::Unavailable(why)) => {
            return Err(Error::new(503, "unavailable", &format!("sessions cannot be checked now: {why}")));
        }
        Err(SessionError::Invalid | SessionError::Expired | SessionError::Revoked) => {
            json!({ "active": false })
        }
    };
    Ok(Response::json(200, &answer))
}

fn ledger(req: &Request) -> Result<Response> {
    let openid = session::signed_in(req)?;
    let number = |name: &str| -> Result<Option<i64>> {
        req.query_param(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| Error::bad_request("invalid_query", &format!("{name} must be a number")))
            })
            .transpose()
    };
    let limit = number("limit")?.unwrap_or(LEDGER_PAGE);
    if !(1..=LEDGER_PAGE_MAX).contains(&limit) {
        return Err(Error::bad_request("invalid_query", &format!("limit must be 1 to {LEDGER_PAGE_MAX}")));
    }
    let before = number("before")?.unwrap_or(i64::MAX);
    let rows = db::query(
        "SELECT id, delta, balance_after, cause, reference, description, created_at FROM quota_ledger \
         WHERE openid = ? AND id < ? ORDER BY id DESC LIMIT ?",
        params![&openid, before, limit + 1],
    )?;
    let mut entries = rows.to_json();
    let more = entries.len() as i64 > limit;
    entries.truncate(limit as usize);
    let next_before = if more { entries.last().and_then(|e| e["id"].as_i64()) } else { None };
    let balance: i64 = db::query("SELECT quota FROM users WHERE openid = ?", params![&openid])?
        .first()
        .map(|r| r.get("quota"))
        .transpose()?
        .unwrap_or(0);
    Ok(Response::json(200, &json!({ "balance": balance, "entries": entries, "next_before": next_before })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Adjust {
    openid: String,
    delta: i64,
    reason: String,
    idempotency_key: String,
}

/// The operator corrects a balance: claims the key, then moves the balance
/// through the ledger (a debit only if it is covered), in one transaction.
fn adjust(req: &Request) -> Result<Response> {
    session::require_admin(req)?;
    let ask: Adjust = req.json()?;
    if ask.openid.is_empty() || ask.openid.len() > 64 {
        return Err(invalid("openid must be 1-64 characters"));
    }
    if ask.delta == 0 || ask.delta.abs() > MAX_UNITS {
        return Err(invalid(&format!("delta must be non-zero, at most {MAX_UNITS} either way")));
    }
    if ask.reason.trim().is_empty() || ask.reason.chars().count() > 255 {
        return Err(invalid("reason must be 1-255 characters: the ledger says why"));
    }
    check_key(&ask.idempotency_key)?;
    if let Some(first) = adjusted(&ask)? {
        return Ok(first);
    }
    let tx = db::begin()?;
    let claimed = tx.execute(
        "INSERT INTO quota_adjustments (idempotency_key, openid, delta, reason, created_at) VALUES (?, ?, ?, ?, ?)",
        params![&ask.idempotency_key, &ask.openid, ask.delta, &ask.reason, now()],
    );
    match claimed {
        Ok(_) => {}
        Err(DbError::Constraint(_)) => {
            drop(tx);
            return adjusted(&ask)?.ok_or_else(|| {
                Error::conflict("idempotency_key_busy", "this idempotency_key is being used; retry")
            });
        }
        Err(e) => return Err(e.into()),
    }
    let change = Change {
        openid: &ask.openid,
        delta: ask.delta,
        cause: Cause::Admin,
        reference: Some(&ask.idempotency_key),
        description: &ask.reason,
    };
    let entry = match wxhost_ledger::change(&tx, &change) {
        Ok(entry) => entry,
        Err(Refused::Insufficient { balance }) => {
            drop(tx);
            return Ok(insufficient(balance, -ask.delta));
        }
        Err(Refused::UnknownUser) => return Err(Error::not_found("no user has this openid")),
        Err(Refused::Db(e)) => return Err(e),
    };
    tx.execute(
        "UPDATE quota_adjustments SET entry_id = ? WHERE idempotency_key = ?",
        params![entry.id, &ask.idempotency_key],
    )?;
    tx.commit()?;
    log::info(&format!("quota of {} adjusted by {} ({})", ask.openid, ask.delta, ask.reason));
    let answer = json!({ "entry_id": entry.id, "balance": entry.balance_after, "delta": ask.delta, "openid": ask.openid });
    Ok(Response::json(200, &answer).outcome("adjusted"))
}

/// The answer an adjustment with this key got; the same key for another user or delta is a 409.
fn adjusted(ask: &Adjust) -> Result<Option<Response>> {
    let rows = db::query(
        "SELECT a.openid, a.delta, a.entry_id, l.balance_after FROM quota_adjustments a \
         JOIN quota_ledger l ON l.id = a.entry_id WHERE a.idempotency_key = ?",
        params![&ask.idempotency_key],
    )?;
    let Some(row) = rows.first() else { return Ok(None) };
    let (openid, delta): (String, i64) = (row.get("openid")?, row.get("delta")?);
    if openid != ask.openid || delta != ask.delta {
        return Err(Error::conflict(
            "idempotency_key_reused",
            "this idempotency_key was used for another openid or delta",
        ));
    }
    let (entry_id, balance): (i64, i64) = (row.get("entry_id")?, row.get("balance_after")?);
    let answer = json!({ "entry_id": entry_id, "balance": balance, "delta": delta, "openid": openid });
    Ok(Some(Response::json(200, &answer).outcome("duplicate")))
}
