//! Connecting to the database named by DATABASE_URL and migrating it.
//! The URL picks the dialect: `sqlite:` (the embedded default) or `mysql:`
//! (MySQL/MariaDB, production).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::ConnectOptions;
use sqlx::mysql::MySqlConnectOptions;
use sqlx::pool::PoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};

/// The embedded default: a SQLite file under ./data, created on first start.
pub const DEFAULT_URL: &str = "sqlite://data/wxhost.db?mode=rwc";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Mysql,
}

/// The pool of the URL's dialect. Native drivers (not sqlx's `Any`) so that
/// column types are reported exactly (MySQL TEXT vs BLOB, unsigned integers).
#[derive(Clone)]
pub enum Pool {
    Sqlite(sqlx::SqlitePool),
    Mysql(sqlx::MySqlPool),
}

#[derive(Clone)]
pub struct Database {
    pub pool: Pool,
    /// SQLite has one writer at a time. Writers queue here, first come first
    /// served, instead of polling SQLite's lock under its busy timeout (which
    /// is unfair: under load a writer could starve past its deadline).
    writer_turn: Arc<tokio::sync::Mutex<()>>,
    /// How long a request waits for a connection, or for its writer turn.
    pub acquire_timeout: Duration,
}

/// The right to write to a SQLite database, held until dropped (nothing for MySQL).
pub struct WriterTurn {
    _guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// No writer turn came within the acquire timeout.
#[derive(Debug, thiserror::Error)]
#[error("the database is busy with other writes")]
pub struct WriterBusy;

/// Runs the same sqlx expression on whichever pool the URL chose.
#[macro_export]
macro_rules! on_pool {
    ($pool:expr, |$p:ident| $e:expr) => {
        match $pool {
            $crate::database::Pool::Sqlite($p) => $e,
            $crate::database::Pool::Mysql($p) => $e,
        }
    };
}
pub use on_pool;

impl Database {
    pub fn new(pool: Pool, acquire_timeout: Duration) -> Database {
        Database { pool, writer_turn: Arc::new(tokio::sync::Mutex::new(())), acquire_timeout }
    }

    /// Waits (in arrival order, at most the acquire timeout) for the turn to
    /// write; take it before a write transaction or a write outside one.
    pub async fn writer_turn(&self) -> Result<WriterTurn, WriterBusy> {
        match self.pool {
            Pool::Mysql(_) => Ok(WriterTurn { _guard: None }),
            Pool::Sqlite(_) => {
                tokio::time::timeout(self.acquire_timeout, self.writer_turn.clone().lock_owned())
                    .await
                    .map(|guard| WriterTurn { _guard: Some(guard) })
                    .map_err(|_| WriterBusy)
            }
        }
    }

    /// Connections open and, of those, idle (for the pool metrics).
    pub fn pool_usage(&self) -> (u32, usize) {
        on_pool!(&self.pool, |p| (p.size(), p.num_idle()))
    }

    pub fn dialect(&self) -> Dialect {
        self.pool.dialect()
    }
}

impl Pool {
    pub fn dialect(&self) -> Dialect {
        match self {
            Pool::Sqlite(_) => Dialect::Sqlite,
            Pool::Mysql(_) => Dialect::Mysql,
        }
    }
}

impl Dialect {
    pub fn of_url(url: &str) -> anyhow::Result<Dialect> {
        match url.split(':').next().unwrap_or_default() {
            "sqlite" => Ok(Dialect::Sqlite),
            "mysql" | "mariadb" => Ok(Dialect::Mysql),
            other => anyhow::bail!("DATABASE_URL scheme `{other}:` is not supported (use sqlite: or mysql:)"),
        }
    }
}

/// Settings of the connection pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings { max_connections: 16, acquire_timeout: Duration::from_secs(3) }
    }
}

/// Connects; for SQLite also creates the file and its folder. The error never
/// holds the URL (it may carry a password).
pub async fn connect(url: &str, settings: &PoolSettings) -> anyhow::Result<Database> {
    let dialect = Dialect::of_url(url)?;
    let connect_error = |e: sqlx::Error| {
        anyhow::anyhow!("cannot connect to the {dialect:?} database: {}", redact_db_error(&e))
    };
    let pool = match dialect {
        Dialect::Sqlite => {
            create_sqlite_folder(url)?;
            Pool::Sqlite(
                pool_options(settings).connect_with(sqlite_options(url)?).await.map_err(connect_error)?,
            )
        }
        Dialect::Mysql => {
            let options = MySqlConnectOptions::from_str(&url.replacen("mariadb:", "mysql:", 1))
                .map_err(|_| anyhow::anyhow!("DATABASE_URL is not a valid MySQL URL"))?;
            Pool::Mysql(
                pool_options(settings).connect_with(mysql_session(options)).await.map_err(connect_error)?,
            )
        }
    };
    Ok(Database::new(pool, settings.acquire_timeout))
}

pub fn pool_options<DB: sqlx::Database>(settings: &PoolSettings) -> PoolOptions<DB> {
    PoolOptions::new().max_connections(settings.max_connections).acquire_timeout(settings.acquire_timeout)
}

/// The options of every SQLite connection, the host's and the plugins'.
pub fn sqlite_options(url: &str) -> anyhow::Result<SqliteConnectOptions> {
    Ok(SqliteConnectOptions::from_str(url)
        .map_err(|_| anyhow::anyhow!("DATABASE_URL is not a valid SQLite URL"))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // Writers wait for each other instead of failing with SQLITE_BUSY.
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true)
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1)))
}

/// The session settings of every MySQL connection, the host's and the plugins'.
pub fn mysql_session(options: MySqlConnectOptions) -> MySqlConnectOptions {
    options
        .charset("utf8mb4")
        .timezone(Some("+00:00".into()))
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1))
}

/// How long an expired QR binding is kept (its poll answers "expired" meanwhile).
pub const EXPIRED_BINDING_KEPT_SECS: i64 = 24 * 3600;

/// How long an applied WeChat event (`processed_events`) is remembered:
/// WeChat retries within seconds; a week also covers replays of captured
/// pushes within their timestamp window.
pub const PROCESSED_EVENT_KEPT_SECS: i64 = 7 * 24 * 3600;

/// What one pruning deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pruned {
    pub bindings: u64,
    pub sessions: u64,
    pub events: u64,
}

/// Deletes QR bindings expired for a day, sessions past their expiry and
/// applied-event records older than a week. Here, in the host's maintenance
/// and never inside a request's transaction: on InnoDB a range delete beside
/// concurrent inserts of the same event deadlocks them.
pub async fn prune_expired(db: &Database, now: i64) -> anyhow::Result<Pruned> {
    let _turn = db.writer_turn().await?;
    let delete = async |sql: &'static str, before: i64| -> anyhow::Result<u64> {
        Ok(on_pool!(&db.pool, |p| sqlx::query(sql).bind(before).execute(p).await.map(|r| r.rows_affected()))?)
    };
    Ok(Pruned {
        bindings: delete("DELETE FROM bindings WHERE expires_at < ?", now - EXPIRED_BINDING_KEPT_SECS)
            .await?,
        sessions: delete("DELETE FROM sessions WHERE expires_at < ?", now).await?,
        events: delete("DELETE FROM processed_events WHERE created_at < ?", now - PROCESSED_EVENT_KEPT_SECS)
            .await?,
    })
}

/// Tables only the host reads and writes: the shared access token, the host's
/// keys (the session signing key, the plugin database user's password), login
/// sessions, the plaintext push signatures seen, WeChat Pay's platform
/// certificates and the migration log. Every other table is a plugin table.
pub const HOST_TABLES: [&str; 6] = [
    "token_cache",
    "host_keys",
    "sessions",
    "callback_signatures",
    "platform_certificates",
    "_sqlx_migrations",
];

/// Whether `table` (any case) is one of [`HOST_TABLES`].
pub fn is_host_table(table: &str) -> bool {
    HOST_TABLES.iter().any(|t| t.eq_ignore_ascii_case(table))
}

/// Applies the embedded migrations of the URL's dialect.
pub async fn migrate(db: &Database) -> anyhow::Result<()> {
    match &db.pool {
        Pool::Sqlite(pool) => sqlx::migrate!("../migrations/sqlite").run(pool).await,
        Pool::Mysql(pool) => sqlx::migrate!("../migrations/mysql").run(pool).await,
    }
    .context("applying database migrations")
}

fn create_sqlite_folder(url: &str) -> anyhow::Result<()> {
    let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Ok(());
    }
    if let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

/// A database error as safe to show: its kind and the server's message, never the URL.
pub fn redact_db_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Configuration(_) => "invalid database configuration".into(),
        sqlx::Error::Database(d) => d.message().to_string(),
        sqlx::Error::Io(io) => format!("I/O error: {}", io.kind()),
        sqlx::Error::PoolTimedOut => "no database connection available in time".into(),
        sqlx::Error::PoolClosed => "the database pool is closed".into(),
        other => other.to_string(),
    }
}
