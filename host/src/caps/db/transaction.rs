//! The transaction resource lent to plugins (`wxhost:plugin/db.transaction`),
//! apart from the capability so that the bindings can name it without
//! depending on the code that implements the interface.

use sqlx::{MySql, Sqlite};

use crate::database::WriterTurn;

/// A transaction lent to a plugin; `None` once committed or rolled back.
pub struct Transaction {
    pub(super) tx: Option<OpenTransaction>,
}

pub(super) enum OpenTransaction {
    /// With the writer turn, given back when the transaction ends.
    Sqlite(sqlx::Transaction<'static, Sqlite>, WriterTurn),
    Mysql(sqlx::Transaction<'static, MySql>),
}
