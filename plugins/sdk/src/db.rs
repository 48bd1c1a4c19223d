//! The database (app role): SQL with `?` placeholders and bound values, rows
//! read by column name with typed getters, transactions that roll back unless
//! committed.
//!
//! ```ignore
//! let rows = db::query("SELECT quota FROM users WHERE openid = ?", params![openid])?;
//! let quota: i64 = rows.one()?.get("quota")?;
//! ```

use crate::bindings::wxhost::plugin::db as host;
pub use crate::bindings::wxhost::plugin::db::{Error as DbError, ExecResult, SqlDialect, Value};
use crate::serde_json::{Map, Value as Json, json};
use crate::{Error, Result};

/// Bound values for a statement: `params![openid, now, None::<String>]`.
#[macro_export]
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        &[$($crate::db::Value::from($value)),*][..]
    };
}
pub use crate::params;

/// Which SQL the database speaks (SQLite or MySQL/MariaDB), for the few
/// statements that differ (upserts, `FOR UPDATE`).
pub fn dialect() -> SqlDialect {
    host::dialect()
}

/// `expr` as an integer column on either database: MySQL's `SUM` of integers
/// is a DECIMAL (read back as text), SQLite's is an integer.
pub fn as_integer(expr: &str) -> String {
    match dialect() {
        SqlDialect::Mysql => format!("CAST({expr} AS SIGNED)"),
        SqlDialect::Sqlite => format!("CAST({expr} AS INTEGER)"),
    }
}

/// ` FOR UPDATE` on MySQL, nothing on SQLite (whose transactions lock the database).
pub fn for_update() -> &'static str {
    match dialect() {
        SqlDialect::Mysql => " FOR UPDATE",
        SqlDialect::Sqlite => "",
    }
}

pub fn query(sql: &str, params: &[Value]) -> Result<Rows, DbError> {
    host::query(sql, params).map(Rows::from)
}

pub fn execute(sql: &str, params: &[Value]) -> Result<ExecResult, DbError> {
    host::execute(sql, params)
}

/// A transaction; dropped without [`Transaction::commit`], it rolls back.
pub fn begin() -> Result<Transaction, DbError> {
    host::begin().map(Transaction)
}

pub struct Transaction(host::Transaction);

impl Transaction {
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows, DbError> {
        self.0.query(sql, params).map(Rows::from)
    }

    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<ExecResult, DbError> {
        self.0.execute(sql, params)
    }

    pub fn commit(self) -> Result<(), DbError> {
        self.0.commit()
    }

    pub fn rollback(self) -> Result<(), DbError> {
        self.0.rollback()
    }
}

/// A query's result.
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl From<host::Rows> for Rows {
    fn from(r: host::Rows) -> Rows {
        Rows { columns: r.columns, rows: r.rows }
    }
}

impl Rows {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn first(&self) -> Option<Row<'_>> {
        self.iter().next()
    }

    /// The first row, or 404 `not_found` saying `what` does not exist.
    pub fn first_or_404(&self, what: &str) -> Result<Row<'_>> {
        self.first().ok_or_else(|| Error::not_found(&format!("no such {what}")))
    }

    pub fn iter(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows.iter().map(|values| Row { columns: &self.columns, values })
    }

    /// Every row as a JSON object keyed by column.
    pub fn to_json(&self) -> Vec<Json> {
        self.iter().map(|r| r.to_json()).collect()
    }
}

/// One row, read by column name.
#[derive(Clone, Copy)]
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl Row<'_> {
    pub fn value(&self, column: &str) -> Option<&Value> {
        self.columns.iter().position(|c| c == column).map(|i| &self.values[i])
    }

    /// The column as `T`; a missing column or another type is a fault of the
    /// plugin's SQL (a 500, logged with the column's name).
    pub fn get<T: FromValue>(&self, column: &str) -> Result<T> {
        let value = self
            .value(column)
            .ok_or_else(|| Error::internal(&format!("the row has no column `{column}`")))?;
        T::from_value(value).ok_or_else(|| {
            Error::internal(&format!("column `{column}` holds {value:?}, not {}", std::any::type_name::<T>()))
        })
    }

    /// The row as a JSON object keyed by column (blobs as null).
    pub fn to_json(&self) -> Json {
        let mut out = Map::new();
        for (c, v) in self.columns.iter().zip(self.values) {
            out.insert(c.clone(), to_json(v));
        }
        Json::Object(out)
    }
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::Null | Value::Blob(_) => Json::Null,
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Text(s) => json!(s),
    }
}

/// A Rust value read from a column.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    fn from_value(v: &Value) -> Option<f64> {
        match v {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
}

/// Integers 0 and 1 (both engines store booleans so).
impl FromValue for bool {
    fn from_value(v: &Value) -> Option<bool> {
        match v {
            Value::Int(0) => Some(false),
            Value::Int(1) => Some(true),
            _ => None,
        }
    }
}

/// Text; also a blob holding UTF-8, because MySQL reports a text column
/// with a binary collation (`utf8mb4_bin`, which the schema uses for
/// case-sensitive keys) as VARBINARY.
impl FromValue for String {
    fn from_value(v: &Value) -> Option<String> {
        match v {
            Value::Text(s) => Some(s.clone()),
            Value::Blob(b) => String::from_utf8(b.clone()).ok(),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Vec<u8>> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}

/// NULL is `None`.
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Option<T>> {
        match v {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(i64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.into())
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Value {
        Value::Blob(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map(Into::into).unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_read_from_a_utf8_blob_as_mysql_sends_binary_collated_columns() {
        assert_eq!(String::from_value(&Value::Blob(b"Job-1".to_vec())), Some("Job-1".into()));
        assert_eq!(String::from_value(&Value::Blob(vec![0xff, 0xfe])), None);
        assert_eq!(String::from_value(&Value::Int(1)), None);
        assert_eq!(Option::<String>::from_value(&Value::Null), Some(None));
    }
}
