//! The quota ledger: every change of a user's quota (an order credited, a
//! consumption, its release, a refund taken back, an admin adjustment) goes
//! through [`change`], inside the caller's transaction, so `users.quota` and
//! the sum of the user's `quota_ledger` rows can never disagree
//! (`wxhost audit` checks that they do not).

use wxhost_sdk::db::{self, DbError, Transaction, params};
use wxhost_sdk::prelude::*;

/// Why a user's quota changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Order,
    Consume,
    Release,
    Refund,
    Admin,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::Order => "order",
            Cause::Consume => "consume",
            Cause::Release => "release",
            Cause::Refund => "refund",
            Cause::Admin => "admin",
        }
    }
}

/// One change of a user's quota.
pub struct Change<'a> {
    pub openid: &'a str,
    /// Positive credits, negative debits; never 0.
    pub delta: i64,
    pub cause: Cause,
    /// What it was for: an out_trade_no, an out_refund_no, a consumption's key.
    pub reference: Option<&'a str>,
    pub description: &'a str,
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The ledger row.
    pub id: i64,
    pub balance_after: i64,
}

/// Why a change was not made (the transaction is left to the caller to drop).
#[derive(Debug)]
pub enum Refused {
    /// A debit larger than the balance: nothing changed.
    Insufficient {
        balance: i64,
    },
    UnknownUser,
    Db(Error),
}

impl From<DbError> for Refused {
    fn from(e: DbError) -> Self {
        Refused::Db(e.into())
    }
}

impl From<Error> for Refused {
    fn from(e: Error) -> Self {
        Refused::Db(e)
    }
}

/// Applies `c` in `tx`: the balance moves (a debit only if it is covered) and
/// a ledger row records it with the balance after. The conditional UPDATE
/// locks the user's row, so concurrent changes of one user are serialised by
/// the database and a balance never goes below 0.
pub fn change(tx: &Transaction, c: &Change<'_>) -> Result<Entry, Refused> {
    debug_assert!(c.delta != 0, "a ledger row changes the balance");
    let now = now();
    let moved = tx.execute(
        "UPDATE users SET quota = quota + ?, updated_at = ? WHERE openid = ? AND quota + ? >= 0",
        params![c.delta, now, c.openid, c.delta],
    )?;
    let rows = tx
        .query(&format!("SELECT quota FROM users WHERE openid = ?{}", db::for_update()), params![c.openid])?;
    let Some(row) = rows.first() else { return Err(Refused::UnknownUser) };
    let balance: i64 = row.get("quota")?;
    if moved.rows_affected != 1 {
        return Err(Refused::Insufficient { balance });
    }
    let inserted = tx.execute(
        "INSERT INTO quota_ledger (openid, delta, balance_after, cause, reference, description, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
        params![c.openid, c.delta, balance, c.cause.name(), c.reference, c.description, now],
    )?;
    let id = inserted
        .last_insert_id
        .ok_or_else(|| Refused::Db(Error::new(500, "ledger_failed", "the ledger row has no id")))?;
    Ok(Entry { id, balance_after: balance })
}
