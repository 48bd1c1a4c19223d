//! `wxhost:plugin/db`: SQL with bound parameters against the host's pool, and
//! transactions as resources. A transaction the plugin drops, or leaves open
//! when it traps or times out, is rolled back: sqlx rolls back a
//! `Transaction` on drop, and the store (with its resource table) is dropped
//! at the end of every request.

use sqlx::any::{AnyArguments, AnyRow, AnyTypeInfoKind};
use sqlx::{Any, Arguments, Column, Row, ValueRef as _};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::wxhost::plugin::db::{
    self as wit, Error, ExecResult, Rows, SqlDialect, Value,
};
use crate::database::{Database, Dialect};

/// Most rows one query may return to a plugin; more is an error, not a truncation.
const MAX_ROWS: usize = 10_000;

/// The owned context: the process's pool.
#[derive(Clone)]
pub struct DbCtx {
    pub db: Database,
}

/// A transaction lent to a plugin (`wxhost:plugin/db.transaction`).
pub struct Transaction {
    tx: Option<sqlx::Transaction<'static, Any>>,
}

pub struct DbView<'a> {
    pub ctx: Option<&'a DbCtx>,
    pub table: &'a mut ResourceTable,
}

struct HasDb;

impl HasData for HasDb {
    type Data<'a> = DbView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> DbView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasDb>(linker, get)
}

impl DbView<'_> {
    fn pool(&self) -> Result<&sqlx::AnyPool, Error> {
        self.ctx
            .map(|c| &c.db.pool)
            .ok_or_else(|| Error::Unavailable("no database in this role".into()))
    }
}

fn bind(params: Vec<Value>) -> Result<AnyArguments<'static>, Error> {
    let mut args = AnyArguments::default();
    for p in params {
        let added = match p {
            Value::Null => args.add(Option::<i64>::None),
            Value::Int(i) => args.add(i),
            Value::Float(f) => args.add(f),
            Value::Text(s) => args.add(s),
            Value::Blob(b) => args.add(b),
        };
        added.map_err(|e| Error::InvalidQuery(format!("cannot bind parameter: {e}")))?;
    }
    Ok(args)
}

fn rows_of(rows: Vec<AnyRow>) -> Result<Rows, Error> {
    if rows.len() > MAX_ROWS {
        return Err(Error::Other(format!(
            "query returned more than {MAX_ROWS} rows; add a LIMIT"
        )));
    }
    let columns = rows
        .first()
        .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
        .unwrap_or_default();
    let rows = rows.iter().map(row_values).collect::<Result<_, _>>()?;
    Ok(Rows { columns, rows })
}

fn row_values(row: &AnyRow) -> Result<Vec<Value>, Error> {
    (0..row.len())
        .map(|i| {
            let raw = row.try_get_raw(i).map_err(map_err)?;
            if raw.is_null() {
                return Ok(Value::Null);
            }
            let kind = raw.type_info().kind();
            let value = match kind {
                AnyTypeInfoKind::Null => Value::Null,
                AnyTypeInfoKind::Bool => {
                    Value::Int(i64::from(row.try_get::<bool, _>(i).map_err(map_err)?))
                }
                AnyTypeInfoKind::SmallInt => {
                    Value::Int(i64::from(row.try_get::<i16, _>(i).map_err(map_err)?))
                }
                AnyTypeInfoKind::Integer => {
                    Value::Int(i64::from(row.try_get::<i32, _>(i).map_err(map_err)?))
                }
                AnyTypeInfoKind::BigInt => Value::Int(row.try_get::<i64, _>(i).map_err(map_err)?),
                AnyTypeInfoKind::Real => {
                    Value::Float(f64::from(row.try_get::<f32, _>(i).map_err(map_err)?))
                }
                AnyTypeInfoKind::Double => Value::Float(row.try_get::<f64, _>(i).map_err(map_err)?),
                AnyTypeInfoKind::Text => Value::Text(row.try_get::<String, _>(i).map_err(map_err)?),
                AnyTypeInfoKind::Blob => {
                    Value::Blob(row.try_get::<Vec<u8>, _>(i).map_err(map_err)?)
                }
            };
            Ok(value)
        })
        .collect()
}

/// Maps a database error to what the plugin may see and act on.
fn map_err(e: sqlx::Error) -> Error {
    use sqlx::error::ErrorKind;
    match &e {
        sqlx::Error::Database(d) => match d.kind() {
            ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation => Error::Constraint(d.message().to_string()),
            _ if is_query_error(d.code().as_deref(), d.message()) => {
                Error::InvalidQuery(d.message().to_string())
            }
            _ => Error::Other(d.message().to_string()),
        },
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => Error::Unavailable(crate::database::redact_db_error(&e)),
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::TypeNotFound { .. } => Error::InvalidQuery(e.to_string()),
        _ => Error::Other(crate::database::redact_db_error(&e)),
    }
}

/// Syntax errors, unknown tables or columns: a bug in the plugin's SQL.
fn is_query_error(code: Option<&str>, message: &str) -> bool {
    // MySQL: 1064 syntax, 1146 no such table, 1054 unknown column; SQLite reports code 1 (SQLITE_ERROR).
    matches!(
        code,
        Some("1064" | "1146" | "1054" | "42000" | "42S02" | "42S22" | "1")
    ) || message.contains("syntax error")
        || message.contains("no such table")
        || message.contains("no such column")
}

impl wit::Host for DbView<'_> {
    async fn dialect(&mut self) -> wasmtime::Result<SqlDialect> {
        Ok(match self.ctx.map(|c| c.db.dialect) {
            Some(Dialect::Mysql) => SqlDialect::Mysql,
            _ => SqlDialect::Sqlite,
        })
    }

    async fn query(
        &mut self,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<Rows, Error>> {
        let pool = match self.pool() {
            Ok(p) => p.clone(),
            Err(e) => return Ok(Err(e)),
        };
        let result = async {
            let args = bind(params)?;
            let rows = sqlx::query_with(&sql, args)
                .fetch_all(&pool)
                .await
                .map_err(map_err)?;
            rows_of(rows)
        };
        Ok(result.await)
    }

    async fn execute(
        &mut self,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<ExecResult, Error>> {
        let pool = match self.pool() {
            Ok(p) => p.clone(),
            Err(e) => return Ok(Err(e)),
        };
        let result = async {
            let args = bind(params)?;
            let done = sqlx::query_with(&sql, args)
                .execute(&pool)
                .await
                .map_err(map_err)?;
            Ok(exec_result(&done))
        };
        Ok(result.await)
    }

    async fn begin(&mut self) -> wasmtime::Result<Result<Resource<Transaction>, Error>> {
        let pool = match self.pool() {
            Ok(p) => p.clone(),
            Err(e) => return Ok(Err(e)),
        };
        let tx = pool.begin().await.map_err(map_err);
        match tx {
            Ok(tx) => Ok(Ok(self.table.push(Transaction { tx: Some(tx) })?)),
            Err(e) => Ok(Err(e)),
        }
    }
}

fn exec_result(done: &sqlx::any::AnyQueryResult) -> ExecResult {
    ExecResult {
        rows_affected: done.rows_affected(),
        last_insert_id: done.last_insert_id().filter(|&id| id > 0),
    }
}

impl wit::HostTransaction for DbView<'_> {
    async fn query(
        &mut self,
        this: Resource<Transaction>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<Rows, Error>> {
        let tx = self.table.get_mut(&this)?;
        let Some(tx) = tx.tx.as_mut() else {
            return Ok(Err(Error::TransactionClosed));
        };
        let result = async {
            let args = bind(params)?;
            let rows = sqlx::query_with(&sql, args)
                .fetch_all(&mut **tx)
                .await
                .map_err(map_err)?;
            rows_of(rows)
        };
        Ok(result.await)
    }

    async fn execute(
        &mut self,
        this: Resource<Transaction>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<ExecResult, Error>> {
        let tx = self.table.get_mut(&this)?;
        let Some(tx) = tx.tx.as_mut() else {
            return Ok(Err(Error::TransactionClosed));
        };
        let result = async {
            let args = bind(params)?;
            let done = sqlx::query_with(&sql, args)
                .execute(&mut **tx)
                .await
                .map_err(map_err)?;
            Ok(exec_result(&done))
        };
        Ok(result.await)
    }

    async fn commit(&mut self, this: Resource<Transaction>) -> wasmtime::Result<Result<(), Error>> {
        let Some(tx) = self.table.get_mut(&this)?.tx.take() else {
            return Ok(Err(Error::TransactionClosed));
        };
        Ok(tx.commit().await.map_err(map_err))
    }

    async fn rollback(
        &mut self,
        this: Resource<Transaction>,
    ) -> wasmtime::Result<Result<(), Error>> {
        let Some(tx) = self.table.get_mut(&this)?.tx.take() else {
            return Ok(Err(Error::TransactionClosed));
        };
        Ok(tx.rollback().await.map_err(map_err))
    }

    async fn drop(&mut self, this: Resource<Transaction>) -> wasmtime::Result<()> {
        // Dropping an open sqlx transaction rolls it back.
        self.table.delete(this)?;
        Ok(())
    }
}
