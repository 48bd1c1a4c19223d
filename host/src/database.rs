//! Connecting to the database named by DATABASE_URL and migrating it.
//! The URL picks the dialect: `sqlite:` (the embedded default) or `mysql:`
//! (MySQL/MariaDB, production).

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions};

/// The embedded default: a SQLite file under ./data, created on first start.
pub const DEFAULT_URL: &str = "sqlite://data/wxhost.db?mode=rwc";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Mysql,
}

#[derive(Clone)]
pub struct Database {
    pub pool: AnyPool,
    pub dialect: Dialect,
}

impl Dialect {
    pub fn of_url(url: &str) -> anyhow::Result<Dialect> {
        match url.split(':').next().unwrap_or_default() {
            "sqlite" => Ok(Dialect::Sqlite),
            "mysql" | "mariadb" => Ok(Dialect::Mysql),
            other => anyhow::bail!(
                "DATABASE_URL scheme `{other}:` is not supported (use sqlite: or mysql:)"
            ),
        }
    }
}

/// Settings of the connection pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// Connects; for SQLite also creates the file's folder. The error never holds the URL
/// (it may carry a password).
pub async fn connect(url: &str, settings: &PoolSettings) -> anyhow::Result<Database> {
    sqlx::any::install_default_drivers();
    let dialect = Dialect::of_url(url)?;
    let url = if dialect == Dialect::Mysql && url.starts_with("mariadb:") {
        url.replacen("mariadb:", "mysql:", 1)
    } else {
        url.to_string()
    };
    if dialect == Dialect::Sqlite {
        create_sqlite_folder(&url)?;
    }
    let options = AnyConnectOptions::from_str(&url)
        .context("DATABASE_URL is not a valid database URL")?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    let pool = AnyPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                use sqlx::Executor;
                match dialect {
                    // Writers wait for each other instead of failing with SQLITE_BUSY.
                    Dialect::Sqlite => {
                        conn.execute("PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;")
                            .await?;
                    }
                    Dialect::Mysql => {
                        conn.execute(
                            "SET NAMES utf8mb4 COLLATE utf8mb4_unicode_ci, time_zone = '+00:00'",
                        )
                        .await?;
                    }
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to the {dialect:?} database: {}",
                redact_db_error(&e)
            )
        })?;
    Ok(Database { pool, dialect })
}

/// Applies the embedded migrations of the URL's dialect.
pub async fn migrate(db: &Database) -> anyhow::Result<()> {
    let migrator = match db.dialect {
        Dialect::Sqlite => sqlx::migrate!("../migrations/sqlite"),
        Dialect::Mysql => sqlx::migrate!("../migrations/mysql"),
    };
    migrator
        .run(&db.pool)
        .await
        .context("applying database migrations")?;
    Ok(())
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
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
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
