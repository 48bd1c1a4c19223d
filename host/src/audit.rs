//! `wxhost audit`: every user's quota must be the sum of their ledger rows,
//! and the newest row's `balance_after` the quota; a ledger row of no user
//! is a difference too.

use anyhow::Context as _;

use crate::database::{Database, Dialect, on_pool};

/// One user whose balance and ledger disagree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    pub openid: String,
    /// `users.quota`; `None`: the ledger names a user that does not exist.
    pub balance: Option<i64>,
    pub ledger_sum: i64,
    /// The newest ledger row's balance, if the user has rows.
    pub last_balance_after: Option<i64>,
}

/// What an audit found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Audit {
    pub users: i64,
    pub differences: Vec<Difference>,
}

/// Checks every user against the ledger.
pub async fn quota(db: &Database) -> anyhow::Result<Audit> {
    let int = match db.dialect() {
        Dialect::Mysql => "SIGNED",
        Dialect::Sqlite => "INTEGER",
    };
    let per_user = format!(
        "SELECT u.openid, u.quota, \
           CAST(COALESCE((SELECT SUM(l.delta) FROM quota_ledger l WHERE l.openid = u.openid), 0) AS {int}) AS total, \
           (SELECT l.balance_after FROM quota_ledger l WHERE l.openid = u.openid ORDER BY l.id DESC LIMIT 1) AS last_after \
         FROM users u"
    );
    let rows: Vec<(String, i64, i64, Option<i64>)> =
        on_pool!(&db.pool, |p| sqlx::query_as(&per_user).fetch_all(p).await)
            .context("reading users and ledger")?;
    let users = rows.len() as i64;
    let mut differences: Vec<Difference> = rows
        .into_iter()
        .filter(|(_, quota, total, last)| quota != total || last.is_some_and(|l| l != *quota))
        .map(|(openid, quota, total, last)| Difference {
            openid,
            balance: Some(quota),
            ledger_sum: total,
            last_balance_after: last,
        })
        .collect();
    let orphans = format!(
        "SELECT l.openid, CAST(SUM(l.delta) AS {int}) FROM quota_ledger l \
         WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.openid = l.openid) GROUP BY l.openid"
    );
    let orphans: Vec<(String, i64)> =
        on_pool!(&db.pool, |p| sqlx::query_as(&orphans).fetch_all(p).await).context("reading the ledger")?;
    differences.extend(orphans.into_iter().map(|(openid, total)| Difference {
        openid,
        balance: None,
        ledger_sum: total,
        last_balance_after: None,
    }));
    Ok(Audit { users, differences })
}
