//! `wxhost:plugin/db`: SQL with bound parameters against the host's pool, and
//! transactions as resources. A transaction the plugin drops, or leaves open
//! when it traps or times out, is rolled back: sqlx rolls back a
//! `Transaction` on drop, and the store (with its resource table) is dropped
//! at the end of every request.

use sqlx::mysql::{MySql, MySqlRow};
use sqlx::sqlite::{Sqlite, SqliteRow};
use sqlx::{Column, Row, TypeInfo, ValueRef};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::wxhost::plugin::db::{self as wit, Error, ExecResult, Rows, SqlDialect, Value};
use crate::database::{Database, Dialect, Pool, WriterTurn};

/// Most rows one query may return to a plugin; more is an error, not a truncation.
const MAX_ROWS: usize = 10_000;

/// The owned context: the process's pool.
#[derive(Clone)]
pub struct DbCtx {
    pub db: Database,
}

/// A transaction lent to a plugin (`wxhost:plugin/db.transaction`); `None`
/// once committed or rolled back.
pub struct Transaction {
    tx: Option<OpenTransaction>,
}

enum OpenTransaction {
    /// With the writer turn, given back when the transaction ends.
    Sqlite(sqlx::Transaction<'static, Sqlite>, WriterTurn),
    Mysql(sqlx::Transaction<'static, MySql>),
}

impl OpenTransaction {
    fn dialect(&self) -> Dialect {
        match self {
            OpenTransaction::Sqlite(..) => Dialect::Sqlite,
            OpenTransaction::Mysql(_) => Dialect::Mysql,
        }
    }
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
    fn db(&self) -> Result<Database, Error> {
        self.ctx.map(|c| c.db.clone()).ok_or_else(|| Error::Unavailable("no database in this role".into()))
    }
}

fn writer_busy(e: crate::database::WriterBusy) -> Error {
    Error::Unavailable(e.to_string())
}

type Query<'q, DB> = sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>;

/// `sql` with `params` bound to its `?` placeholders.
fn bound<'q, DB>(sql: &'q str, params: Vec<Value>) -> Query<'q, DB>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    f64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Vec<u8>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB>,
{
    params.into_iter().fold(sqlx::query::<DB>(sql), |q, p| match p {
        Value::Null => q.bind(Option::<i64>::None),
        Value::Int(i) => q.bind(i),
        Value::Float(f) => q.bind(f),
        Value::Text(s) => q.bind(s),
        Value::Blob(b) => q.bind(b),
    })
}

fn rows_of<R: Row>(rows: Vec<R>, value: fn(&R, usize) -> Result<Value, Error>) -> Result<Rows, Error> {
    if rows.len() > MAX_ROWS {
        return Err(Error::Other(format!("query returned more than {MAX_ROWS} rows; add a LIMIT")));
    }
    let columns =
        rows.first().map(|r| r.columns().iter().map(|c| c.name().to_string()).collect()).unwrap_or_default();
    let rows = rows
        .iter()
        .map(|row| (0..row.len()).map(|i| value(row, i)).collect::<Result<Vec<_>, _>>())
        .collect::<Result<_, _>>()?;
    Ok(Rows { columns, rows })
}

/// SQLite values carry their own storage class, whatever the column declares.
fn sqlite_value(row: &SqliteRow, i: usize) -> Result<Value, Error> {
    let raw = row.try_get_raw(i).map_err(map_err)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let kind = raw.type_info().name().to_string();
    Ok(match kind.as_str() {
        "INTEGER" | "BOOLEAN" | "NUMERIC" => Value::Int(row.try_get_unchecked::<i64, _>(i).map_err(map_err)?),
        "REAL" => Value::Float(row.try_get_unchecked::<f64, _>(i).map_err(map_err)?),
        "BLOB" => Value::Blob(row.try_get_unchecked::<Vec<u8>, _>(i).map_err(map_err)?),
        _ => Value::Text(row.try_get_unchecked::<String, _>(i).map_err(map_err)?),
    })
}

/// MySQL values by column type; date and time types are refused with advice
/// (the schema keeps times as BIGINT Unix seconds).
fn mysql_value(row: &MySqlRow, i: usize) -> Result<Value, Error> {
    let raw = row.try_get_raw(i).map_err(map_err)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let kind = raw.type_info().name().to_string();
    let unsigned = |i| -> Result<Value, Error> {
        let n = row.try_get_unchecked::<u64, _>(i).map_err(map_err)?;
        i64::try_from(n)
            .map(Value::Int)
            .map_err(|_| Error::Other(format!("unsigned value {n} does not fit a signed 64-bit integer")))
    };
    Ok(match kind.as_str() {
        "BOOLEAN" => Value::Int(i64::from(row.try_get_unchecked::<bool, _>(i).map_err(map_err)?)),
        "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" => {
            Value::Int(row.try_get_unchecked::<i64, _>(i).map_err(map_err)?)
        }
        k if k.ends_with("UNSIGNED") => unsigned(i)?,
        "FLOAT" => Value::Float(f64::from(row.try_get_unchecked::<f32, _>(i).map_err(map_err)?)),
        "DOUBLE" => Value::Float(row.try_get_unchecked::<f64, _>(i).map_err(map_err)?),
        "CHAR" | "VARCHAR" | "TEXT" | "TINYTEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM" | "SET" | "JSON"
        | "DECIMAL" => Value::Text(row.try_get_unchecked::<String, _>(i).map_err(map_err)?),
        "BINARY" | "VARBINARY" | "BLOB" | "TINYBLOB" | "MEDIUMBLOB" | "LONGBLOB" | "BIT" => {
            Value::Blob(row.try_get_unchecked::<Vec<u8>, _>(i).map_err(map_err)?)
        }
        other => {
            let name = row.columns()[i].name();
            return Err(Error::InvalidQuery(format!(
                "column `{name}` has type {other}, which plugins cannot receive; \
                 select it as Unix seconds (UNIX_TIMESTAMP) or as text (CAST … AS CHAR)"
            )));
        }
    })
}

/// Tables only the host reads and writes: the shared access token, the session
/// signing key, login sessions and the migration log. A plugin that could read
/// them would hold credentials the capabilities exist to keep from it.
const HOST_TABLES: [&str; 4] = ["token_cache", "host_keys", "sessions", "_sqlx_migrations"];

/// Plugin SQL the host runs: exactly one statement that reads or writes
/// tables, or defines the plugin's own, and never names a host table.
/// Everything else (ATTACH, PRAGMA, VACUUM INTO, transaction control, several
/// statements in one string, SQL the parser cannot read) is refused before it
/// reaches the database: those reach files, connection state or other databases.
fn permitted(sql: &str, dialect: Dialect) -> Result<(), Error> {
    // Plugins send the same few statements again and again (values are bound
    // apart): parsing costs ~25 µs, a lookup well under one. Per dialect.
    type Seen = [std::collections::HashSet<String>; 2];
    static SEEN: std::sync::LazyLock<std::sync::Mutex<Seen>> = std::sync::LazyLock::new(Default::default);
    const SEEN_MAX: usize = 4096;
    let slot = dialect as usize;
    if SEEN.lock().expect("permitted SQL lock")[slot].contains(sql) {
        return Ok(());
    }
    check_statement(sql, dialect)?;
    let seen = &mut SEEN.lock().expect("permitted SQL lock")[slot];
    if seen.len() < SEEN_MAX {
        seen.insert(sql.to_string());
    }
    Ok(())
}

fn check_statement(sql: &str, dialect: Dialect) -> Result<(), Error> {
    use sqlparser::ast::Statement;
    use sqlparser::dialect::{MySqlDialect, SQLiteDialect};
    let refused = |why: String| Err(Error::InvalidQuery(format!("refused by the host: {why}")));
    let parsed = match dialect {
        Dialect::Sqlite => sqlparser::parser::Parser::parse_sql(&SQLiteDialect {}, sql),
        Dialect::Mysql => sqlparser::parser::Parser::parse_sql(&MySqlDialect {}, sql),
    };
    let statements = match parsed {
        Ok(statements) => statements,
        Err(e) => return refused(format!("the SQL could not be read ({e})")),
    };
    let [statement] = statements.as_slice() else {
        return refused("one statement per call".into());
    };
    let mut named = Vec::new();
    match statement {
        Statement::Query(_)
        | Statement::Insert(_)
        | Statement::Update { .. }
        | Statement::Delete(_)
        | Statement::CreateTable(_)
        | Statement::CreateIndex(_)
        | Statement::AlterTable { .. } => {}
        Statement::Drop { names, .. } => named.extend(names.iter().cloned()),
        _ => {
            return refused(
                "only SELECT, INSERT, UPDATE, DELETE and the plugin's own tables' DDL run here".into(),
            );
        }
    }
    let _ = sqlparser::ast::visit_relations(statement, |relation| {
        named.push(relation.clone());
        std::ops::ControlFlow::<()>::Continue(())
    });
    for name in &named {
        let table =
            name.0.last().and_then(|part| part.as_ident()).map(|ident| ident.value.to_ascii_lowercase());
        if let Some(table) = table.filter(|t| HOST_TABLES.contains(&t.as_str())) {
            return refused(format!("`{table}` belongs to the host"));
        }
    }
    Ok(())
}

async fn query(pool: &Pool, sql: &str, params: Vec<Value>) -> Result<Rows, Error> {
    permitted(sql, pool.dialect())?;
    match pool {
        Pool::Sqlite(p) => {
            rows_of(bound::<Sqlite>(sql, params).fetch_all(p).await.map_err(map_err)?, sqlite_value)
        }
        Pool::Mysql(p) => {
            rows_of(bound::<MySql>(sql, params).fetch_all(p).await.map_err(map_err)?, mysql_value)
        }
    }
}

async fn execute(db: &Database, sql: &str, params: Vec<Value>) -> Result<ExecResult, Error> {
    permitted(sql, db.dialect())?;
    match &db.pool {
        Pool::Sqlite(p) => {
            let _turn = db.writer_turn().await.map_err(writer_busy)?;
            let done = bound::<Sqlite>(sql, params).execute(p).await.map_err(map_err)?;
            Ok(exec_result(done.rows_affected(), done.last_insert_rowid()))
        }
        Pool::Mysql(p) => {
            let done = bound::<MySql>(sql, params).execute(p).await.map_err(map_err)?;
            Ok(exec_result(done.rows_affected(), done.last_insert_id() as i64))
        }
    }
}

async fn tx_query(tx: &mut OpenTransaction, sql: &str, params: Vec<Value>) -> Result<Rows, Error> {
    permitted(sql, tx.dialect())?;
    match tx {
        OpenTransaction::Sqlite(t, _) => {
            rows_of(bound::<Sqlite>(sql, params).fetch_all(&mut **t).await.map_err(map_err)?, sqlite_value)
        }
        OpenTransaction::Mysql(t) => {
            rows_of(bound::<MySql>(sql, params).fetch_all(&mut **t).await.map_err(map_err)?, mysql_value)
        }
    }
}

async fn tx_execute(tx: &mut OpenTransaction, sql: &str, params: Vec<Value>) -> Result<ExecResult, Error> {
    permitted(sql, tx.dialect())?;
    match tx {
        OpenTransaction::Sqlite(t, _) => {
            let done = bound::<Sqlite>(sql, params).execute(&mut **t).await.map_err(map_err)?;
            Ok(exec_result(done.rows_affected(), done.last_insert_rowid()))
        }
        OpenTransaction::Mysql(t) => {
            let done = bound::<MySql>(sql, params).execute(&mut **t).await.map_err(map_err)?;
            Ok(exec_result(done.rows_affected(), done.last_insert_id() as i64))
        }
    }
}

fn exec_result(rows_affected: u64, last_insert_id: i64) -> ExecResult {
    ExecResult { rows_affected, last_insert_id: (last_insert_id > 0).then_some(last_insert_id) }
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
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            Error::Unavailable(crate::database::redact_db_error(&e))
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::TypeNotFound { .. } => Error::InvalidQuery(e.to_string()),
        _ => Error::Other(crate::database::redact_db_error(&e)),
    }
}

/// Syntax errors, unknown tables or columns: a bug in the plugin's SQL.
fn is_query_error(code: Option<&str>, message: &str) -> bool {
    // MySQL: 1064 syntax, 1146 no such table, 1054 unknown column; SQLite reports code 1 (SQLITE_ERROR).
    matches!(code, Some("1064" | "1146" | "1054" | "42000" | "42S02" | "42S22" | "1"))
        || message.contains("syntax error")
        || message.contains("no such table")
        || message.contains("no such column")
}

impl wit::Host for DbView<'_> {
    async fn dialect(&mut self) -> wasmtime::Result<SqlDialect> {
        Ok(match self.ctx.map(|c| c.db.dialect()) {
            Some(Dialect::Mysql) => SqlDialect::Mysql,
            _ => SqlDialect::Sqlite,
        })
    }

    async fn query(&mut self, sql: String, params: Vec<Value>) -> wasmtime::Result<Result<Rows, Error>> {
        let db = match self.db() {
            Ok(db) => db,
            Err(e) => return Ok(Err(e)),
        };
        Ok(query(&db.pool, &sql, params).await)
    }

    async fn execute(
        &mut self,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<ExecResult, Error>> {
        let db = match self.db() {
            Ok(db) => db,
            Err(e) => return Ok(Err(e)),
        };
        Ok(execute(&db, &sql, params).await)
    }

    async fn begin(&mut self) -> wasmtime::Result<Result<Resource<Transaction>, Error>> {
        let db = match self.db() {
            Ok(db) => db,
            Err(e) => return Ok(Err(e)),
        };
        let tx = match &db.pool {
            // SQLite: the writer turn first (writers queue in arrival order), then
            // IMMEDIATE takes SQLite's write lock up front; a deferred transaction
            // that reads, then writes, fails at once with "database is locked"
            // when another writer got in between.
            Pool::Sqlite(p) => {
                let turn = match db.writer_turn().await {
                    Ok(turn) => turn,
                    Err(e) => return Ok(Err(writer_busy(e))),
                };
                p.begin_with("BEGIN IMMEDIATE").await.map(|t| OpenTransaction::Sqlite(t, turn))
            }
            Pool::Mysql(p) => p.begin().await.map(OpenTransaction::Mysql),
        };
        match tx {
            Ok(tx) => Ok(Ok(self.table.push(Transaction { tx: Some(tx) })?)),
            Err(e) => Ok(Err(map_err(e))),
        }
    }
}

impl wit::HostTransaction for DbView<'_> {
    async fn query(
        &mut self,
        this: Resource<Transaction>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<Rows, Error>> {
        match self.table.get_mut(&this)?.tx.as_mut() {
            Some(tx) => Ok(tx_query(tx, &sql, params).await),
            None => Ok(Err(Error::TransactionClosed)),
        }
    }

    async fn execute(
        &mut self,
        this: Resource<Transaction>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<ExecResult, Error>> {
        match self.table.get_mut(&this)?.tx.as_mut() {
            Some(tx) => Ok(tx_execute(tx, &sql, params).await),
            None => Ok(Err(Error::TransactionClosed)),
        }
    }

    async fn commit(&mut self, this: Resource<Transaction>) -> wasmtime::Result<Result<(), Error>> {
        Ok(match self.table.get_mut(&this)?.tx.take() {
            Some(OpenTransaction::Sqlite(t, _turn)) => t.commit().await.map_err(map_err),
            Some(OpenTransaction::Mysql(t)) => t.commit().await.map_err(map_err),
            None => Err(Error::TransactionClosed),
        })
    }

    async fn rollback(&mut self, this: Resource<Transaction>) -> wasmtime::Result<Result<(), Error>> {
        Ok(match self.table.get_mut(&this)?.tx.take() {
            Some(OpenTransaction::Sqlite(t, _turn)) => t.rollback().await.map_err(map_err),
            Some(OpenTransaction::Mysql(t)) => t.rollback().await.map_err(map_err),
            None => Err(Error::TransactionClosed),
        })
    }

    async fn drop(&mut self, this: Resource<Transaction>) -> wasmtime::Result<()> {
        // Dropping an open sqlx transaction rolls it back.
        self.table.delete(this)?;
        Ok(())
    }
}
