//! `wxhost:plugin/db`: SQL with bound parameters, and transactions as
//! resources. A transaction the plugin drops, or leaves open when it traps or
//! times out, is rolled back: sqlx rolls back a `Transaction` on drop, and the
//! store (with its resource table) is dropped at the end of every request.
//!
//! Plugin statements run on connections of their own that the database
//! engine confines to the plugin tables (data manipulation only): SQLite's
//! authorizer ([`sqlite_guard`]), a MySQL user granted only the plugin tables
//! ([`mysql_user`]). The host's own statements (sessions, keys, the access
//! token, migrations) run on the owner's pool, which plugins never reach.

pub mod mysql_user;
mod sqlite_guard;
pub mod transaction;

use futures::future::BoxFuture;
use secrecy::ExposeSecret as _;

use super::{CapabilitySpec, Context, PluginState, ServiceInputs};
use crate::role::Role;
use transaction::OpenTransaction;
pub use transaction::Transaction;

use std::str::FromStr;

use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlRow};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqlitePool, SqliteRow};
use sqlx::{Column, Row, TypeInfo, ValueRef};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::wxhost::plugin::db::{self as wit, Error, ExecResult, Rows, SqlDialect, Value};
use crate::database::{self, Database, Dialect, Pool, PoolSettings};

/// Most rows one query may return to a plugin; more is an error, not a truncation.
const MAX_ROWS: usize = 10_000;

/// The owned context: the host's database (for SQLite's writer turn) and the
/// confined pool plugin statements run on.
#[derive(Clone)]
pub struct DbCtx {
    pub db: Database,
    plugins: Pool,
    /// How plugin SQL is confined, for operators (`wxhost migrate`, the log).
    pub confinement: String,
}

impl DbCtx {
    /// Opens the plugins' connections to `db` (already migrated). SQLite: the
    /// same file, each connection under the authorizer. MySQL: as
    /// `plugin_url`'s user, or as the user the host creates and grants the
    /// plugin tables when that is unset; refused if it can reach a host table.
    pub async fn open(
        db: &Database,
        owner_url: &str,
        plugin_url: Option<&str>,
        settings: &PoolSettings,
    ) -> anyhow::Result<DbCtx> {
        let (plugins, confinement) = match &db.pool {
            Pool::Sqlite(_) => {
                if plugin_url.is_some() {
                    tracing::warn!(
                        "PLUGIN_DATABASE_URL is for MySQL; on SQLite the engine's authorizer confines plugins"
                    );
                }
                let pool = sqlite_plugin_pool(owner_url, settings).await?;
                (Pool::Sqlite(pool), "by SQLite's authorizer on the plugins' connections".to_string())
            }
            Pool::Mysql(_) => {
                let options = match plugin_url {
                    Some(url) => MySqlConnectOptions::from_str(&url.replacen("mariadb:", "mysql:", 1))
                        .map_err(|_| anyhow::anyhow!("PLUGIN_DATABASE_URL is not a valid MySQL URL"))?,
                    None => mysql_user::provision(db, owner_url).await?,
                };
                let (pool, grantee) = mysql_user::connect_checked(db, options, settings).await?;
                (Pool::Mysql(pool), format!("as the database user {grantee}, granted only the plugin tables"))
            }
        };
        tracing::info!(confinement = %confinement, "plugin SQL confined");
        Ok(DbCtx { db: db.clone(), plugins, confinement })
    }

    /// The confined pool plugin statements run on.
    pub fn plugin_pool(&self) -> &Pool {
        &self.plugins
    }
}

async fn sqlite_plugin_pool(url: &str, settings: &PoolSettings) -> anyhow::Result<SqlitePool> {
    database::pool_options::<Sqlite>(settings)
        .after_connect(|conn, _| {
            Box::pin(async move {
                let mut handle = conn.lock_handle().await?;
                sqlite_guard::confine(&mut handle).map_err(|e| sqlx::Error::Configuration(e.into()))
            })
        })
        .connect_with(database::sqlite_options(url)?)
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot open the plugins' SQLite connections: {}", database::redact_db_error(&e))
        })
}

/// The app role's, and never the web role's.
pub const SPEC: CapabilitySpec = CapabilitySpec { name: "db", roles: &[Role::App], open, link };

fn open<'a>(inputs: &'a ServiceInputs<'a>) -> BoxFuture<'a, anyhow::Result<Option<Context>>> {
    Box::pin(async move {
        let Some(db) = inputs.database else { return Ok(None) };
        let plugin_url = inputs.settings.plugin_database_url.as_ref().map(|u| u.expose_secret());
        let ctx = DbCtx::open(db, inputs.database_url, plugin_url, inputs.pool).await?;
        Ok(Some(Box::new(ctx) as Context))
    })
}

fn link(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    add_to_linker(linker, |s| DbView { ctx: s.services.get(), table: &mut s.table })
}

pub struct DbView<'a> {
    pub ctx: Option<&'a DbCtx>,
    pub table: &'a mut ResourceTable,
}

/// A capability call's error: an [`Error`] for the plugin, or a trap.
pub type DbFailure = crate::bindings::CapabilityError<Error>;

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

impl<'a> DbView<'a> {
    fn ctx(&self) -> Result<&'a DbCtx, Error> {
        self.ctx.ok_or_else(|| Error::Unavailable("no database in this role".into()))
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

/// Control characters (NUL above all) are refused before the driver sees
/// the SQL: sqlx-sqlite loops forever on `SELECT 1 -- <NUL>x`. Values travel
/// as parameters, so SQL text never needs them.
fn no_control_characters(sql: &str) -> Result<(), Error> {
    match sql.char_indices().find(|(_, c)| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        Some((at, c)) => Err(Error::InvalidQuery(format!(
            "refused by the host: control character U+{:04X} at byte {at} (bind values as parameters)",
            c as u32
        ))),
        None => Ok(()),
    }
}

/// A plugin's own `BEGIN` outside `db.begin` must not send its connection back
/// to the pool inside a transaction (holding SQLite's lock for every writer):
/// it is rolled back, the connection closed, and the plugin told.
async fn sqlite_left_open(conn: &mut PoolConnection<Sqlite>) -> Result<(), Error> {
    let open = {
        let mut handle = conn.lock_handle().await.map_err(map_err)?;
        sqlite_guard::in_transaction(&mut handle)
    };
    if !open {
        return Ok(());
    }
    let _ = sqlx::Executor::execute(&mut **conn, "ROLLBACK").await;
    conn.close_on_drop();
    Err(Error::InvalidQuery(
        "refused by the host: transactions are begun with db.begin, not in SQL; the statement was rolled back".into(),
    ))
}

async fn query(pool: &Pool, sql: &str, params: Vec<Value>) -> Result<Rows, Error> {
    no_control_characters(sql)?;
    match pool {
        Pool::Sqlite(p) => {
            let mut conn = p.acquire().await.map_err(map_err)?;
            let rows = bound::<Sqlite>(sql, params).fetch_all(&mut *conn).await.map_err(map_err);
            sqlite_left_open(&mut conn).await?;
            rows_of(rows?, sqlite_value)
        }
        Pool::Mysql(p) => {
            rows_of(bound::<MySql>(sql, params).fetch_all(p).await.map_err(map_err)?, mysql_value)
        }
    }
}

async fn execute(ctx: &DbCtx, sql: &str, params: Vec<Value>) -> Result<ExecResult, Error> {
    no_control_characters(sql)?;
    match &ctx.plugins {
        Pool::Sqlite(p) => {
            let _turn = ctx.db.writer_turn().await.map_err(writer_busy)?;
            let mut conn = p.acquire().await.map_err(map_err)?;
            let done = bound::<Sqlite>(sql, params).execute(&mut *conn).await.map_err(map_err);
            sqlite_left_open(&mut conn).await?;
            let done = done?;
            Ok(exec_result(done.rows_affected(), done.last_insert_rowid()))
        }
        Pool::Mysql(p) => {
            let done = bound::<MySql>(sql, params).execute(p).await.map_err(map_err)?;
            Ok(exec_result(done.rows_affected(), done.last_insert_id() as i64))
        }
    }
}

async fn tx_query(tx: &mut OpenTransaction, sql: &str, params: Vec<Value>) -> Result<Rows, Error> {
    no_control_characters(sql)?;
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
    no_control_characters(sql)?;
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
        sqlx::Error::Database(d) if refused_by_engine(d.as_ref()) => {
            Error::InvalidQuery(format!("refused by the database: {}", refusal_reason(d.message())))
        }
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

/// The engine's own refusal: SQLite's authorizer (SQLITE_AUTH, 23) or a
/// MySQL privilege check (1142 table, 1143 column, 1044 database, 1045 and
/// 1227 a global privilege such as FILE, 1370 a routine).
fn refused_by_engine(e: &dyn sqlx::error::DatabaseError) -> bool {
    match e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        Some(mysql) => matches!(mysql.number(), 1142 | 1143 | 1044 | 1045 | 1227 | 1370),
        None => e.code().as_deref() == Some("23") || e.message() == sqlite_guard::REFUSED_MESSAGE,
    }
}

fn refusal_reason(message: &str) -> String {
    if message == sqlite_guard::REFUSED_MESSAGE {
        "plugin SQL reads and writes only the plugin tables (no host table, schema change, ATTACH, \
         PRAGMA or extension)"
            .into()
    } else {
        message.to_string()
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
    fn convert_error(&mut self, err: DbFailure) -> wasmtime::Result<Error> {
        err.downcast()
    }

    async fn dialect(&mut self) -> wasmtime::Result<SqlDialect> {
        Ok(match self.ctx.map(|c| c.db.dialect()) {
            Some(Dialect::Mysql) => SqlDialect::Mysql,
            _ => SqlDialect::Sqlite,
        })
    }

    async fn query(&mut self, sql: String, params: Vec<Value>) -> Result<Rows, DbFailure> {
        Ok(query(&self.ctx()?.plugins, &sql, params).await?)
    }

    async fn execute(&mut self, sql: String, params: Vec<Value>) -> Result<ExecResult, DbFailure> {
        Ok(execute(self.ctx()?, &sql, params).await?)
    }

    async fn begin(&mut self) -> Result<Resource<Transaction>, DbFailure> {
        let ctx = self.ctx()?;
        let tx = match &ctx.plugins {
            // SQLite: the writer turn first (writers queue in arrival order), then
            // IMMEDIATE takes SQLite's write lock up front; a deferred transaction
            // that reads, then writes, fails at once with "database is locked"
            // when another writer got in between.
            Pool::Sqlite(p) => {
                let turn = ctx.db.writer_turn().await.map_err(writer_busy)?;
                p.begin_with("BEGIN IMMEDIATE").await.map(|t| OpenTransaction::Sqlite(t, turn))
            }
            Pool::Mysql(p) => p.begin().await.map(OpenTransaction::Mysql),
        }
        .map_err(map_err)?;
        self.table.push(Transaction { tx: Some(tx) }).map_err(DbFailure::trap)
    }
}

impl DbView<'_> {
    /// The open transaction behind a handle (`None` once committed or rolled back).
    fn open(&mut self, this: &Resource<Transaction>) -> Result<&mut Option<OpenTransaction>, DbFailure> {
        // The component model checks handles, so a missing entry is a host bug.
        Ok(&mut self.table.get_mut(this).map_err(DbFailure::trap)?.tx)
    }
}

impl wit::HostTransaction for DbView<'_> {
    async fn query(
        &mut self,
        this: Resource<Transaction>,
        sql: String,
        params: Vec<Value>,
    ) -> Result<Rows, DbFailure> {
        let tx = self.open(&this)?.as_mut().ok_or(Error::TransactionClosed)?;
        Ok(tx_query(tx, &sql, params).await?)
    }

    async fn execute(
        &mut self,
        this: Resource<Transaction>,
        sql: String,
        params: Vec<Value>,
    ) -> Result<ExecResult, DbFailure> {
        let tx = self.open(&this)?.as_mut().ok_or(Error::TransactionClosed)?;
        Ok(tx_execute(tx, &sql, params).await?)
    }

    async fn commit(&mut self, this: Resource<Transaction>) -> Result<(), DbFailure> {
        match self.open(&this)?.take().ok_or(Error::TransactionClosed)? {
            OpenTransaction::Sqlite(t, _turn) => t.commit().await,
            OpenTransaction::Mysql(t) => t.commit().await,
        }
        .map_err(|e| map_err(e).into())
    }

    async fn rollback(&mut self, this: Resource<Transaction>) -> Result<(), DbFailure> {
        match self.open(&this)?.take().ok_or(Error::TransactionClosed)? {
            OpenTransaction::Sqlite(t, _turn) => t.rollback().await,
            OpenTransaction::Mysql(t) => t.rollback().await,
        }
        .map_err(|e| map_err(e).into())
    }

    async fn drop(&mut self, this: Resource<Transaction>) -> wasmtime::Result<()> {
        // Dropping an open sqlx transaction rolls it back.
        self.table.delete(this)?;
        Ok(())
    }
}
