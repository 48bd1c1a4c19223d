//! On MySQL/MariaDB, plugin SQL runs as a database user of its own whose
//! grants cover only the plugin tables: the server's privilege check, not a
//! parser, keeps plugins off the host's tables, whatever comments
//! (`/*! … */`, `#`, `-- `), quoting or schema prefixes the SQL carries.
//!
//! `wxhost migrate` (and the app role at start) creates or updates that user
//! when `PLUGIN_DATABASE_URL` is unset and `DATABASE_URL`'s user may create
//! users; otherwise the operator creates it (docs/deploy.md). Either way the
//! app role checks the plugin user's privileges before it serves and refuses
//! to start if it can read or write a host table.

use std::str::FromStr;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool};
use sqlx::{Connection, MySqlConnection};

use crate::database::{self, Database, HOST_TABLES, Pool, PoolSettings};

/// What plugins may do to a plugin table: data manipulation, never DDL.
pub const PLUGIN_PRIVILEGES: &str = "SELECT, INSERT, UPDATE, DELETE";

/// Where the host keeps the password of the user it created (a host table,
/// so the plugin user itself cannot read it).
const PASSWORD_KEY: &str = "plugin_db_password";

/// The plugin user the host creates for a database: one per database, so
/// several databases on one server (tests, staging) never share a password.
pub fn plugin_user_name(database: &str) -> String {
    let digest = Sha256::digest(database.as_bytes());
    format!("wxp_{}", &hex::encode(digest)[..16])
}

/// The account that ran a statement, as `CURRENT_USER()` names it: `user@host`.
struct Account {
    user: String,
    host: String,
}

impl Account {
    fn parse(current_user: &str) -> Account {
        let (user, host) = current_user.rsplit_once('@').unwrap_or((current_user, "%"));
        Account { user: user.to_string(), host: host.to_string() }
    }

    fn quoted(&self) -> String {
        format!("'{}'@'{}'", self.user.replace('\'', "''"), self.host.replace('\'', "''"))
    }
}

/// The grants the app role needs for its plugin user, as SQL an operator can run.
pub fn grant_statements(database: &str, tables: &[String], grantee: &str) -> Vec<String> {
    tables.iter().map(|t| format!("GRANT {PLUGIN_PRIVILEGES} ON `{database}`.`{t}` TO {grantee}")).collect()
}

/// The plugin tables of `database`: every base table that is not the host's.
async fn plugin_tables(pool: &MySqlPool, database: &str) -> anyhow::Result<Vec<String>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = ? AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
    )
    .bind(database)
    .fetch_all(pool)
    .await?;
    Ok(tables.into_iter().filter(|t| !database::is_host_table(t)).collect())
}

async fn current_database_and_user(pool: &MySqlPool) -> anyhow::Result<(String, Account)> {
    let (database, user): (Option<String>, String) =
        sqlx::query_as("SELECT DATABASE(), CAST(CURRENT_USER() AS CHAR)").fetch_one(pool).await?;
    let database = database.context("DATABASE_URL must name a database (mysql://user:pass@host/db)")?;
    Ok((database, Account::parse(&user)))
}

/// Creates the database's plugin user if it is missing and grants it exactly
/// the plugin tables (after migrations, so new tables are included); takes
/// back any grant it holds on a host table. Returns the options to connect
/// as it. Fails with advice when `DATABASE_URL`'s user may not.
pub async fn provision(db: &Database, owner_url: &str) -> anyhow::Result<MySqlConnectOptions> {
    let Pool::Mysql(pool) = &db.pool else { bail!("the plugin database user exists on MySQL only") };
    let (database, owner) = current_database_and_user(pool).await?;
    let plugin = Account { user: plugin_user_name(&database), host: owner.host.clone() };
    let grantee = plugin.quoted();

    // One password per database, chosen once and shared by every app process.
    let candidate = hex::encode(rand::random::<[u8; 24]>());
    sqlx::query("INSERT IGNORE INTO host_keys (name, value, created_at) VALUES (?, ?, UNIX_TIMESTAMP())")
        .bind(PASSWORD_KEY)
        .bind(&candidate)
        .execute(pool)
        .await?;
    let password: String = sqlx::query_scalar("SELECT value FROM host_keys WHERE name = ?")
        .bind(PASSWORD_KEY)
        .fetch_one(pool)
        .await?;

    let tables = plugin_tables(pool, &database).await?;
    let advice = || {
        format!(
            "the plugin database user {grantee} could not be created or granted by {}: give that user \
             CREATE USER and GRANT OPTION on `{database}`, or create a user with only {PLUGIN_PRIVILEGES} \
             on the plugin tables and set PLUGIN_DATABASE_URL to it (docs/deploy.md, \"Database users\")",
            owner.quoted()
        )
    };
    let mut statements = vec![
        // The password is generated hex, safe to inline; statements are never logged with it.
        format!("CREATE USER IF NOT EXISTS {grantee} IDENTIFIED BY '{password}'"),
        format!("ALTER USER {grantee} IDENTIFIED BY '{password}'"),
    ];
    statements.extend(grant_statements(&database, &tables, &grantee));
    for sql in &statements {
        sqlx::raw_sql(sql).execute(pool).await.map_err(|e| {
            anyhow::anyhow!("{}: {}", advice(), database::redact_db_error(&e).replace(&password, "…"))
        })?;
    }
    // Grants on host tables (given by hand, or by an older layout) are taken back.
    let held: Vec<(String, String)> = sqlx::query_as(
        "SELECT CAST(TABLE_NAME AS CHAR), CAST(PRIVILEGE_TYPE AS CHAR) FROM information_schema.TABLE_PRIVILEGES \
         WHERE GRANTEE = ? AND TABLE_SCHEMA = ?",
    )
    .bind(&grantee)
    .bind(&database)
    .fetch_all(pool)
    .await?;
    for (table, privilege) in held.iter().filter(|(t, _)| database::is_host_table(t)) {
        sqlx::raw_sql(&format!("REVOKE {privilege} ON `{database}`.`{table}` FROM {grantee}"))
            .execute(pool)
            .await
            .with_context(advice)?;
    }
    let options = MySqlConnectOptions::from_str(&owner_url.replacen("mariadb:", "mysql:", 1))
        .map_err(|_| anyhow::anyhow!("DATABASE_URL is not a valid MySQL URL"))?
        .username(&plugin.user)
        .password(&password);
    tracing::info!(user = %grantee, tables = tables.len(), "plugin database user granted the plugin tables");
    Ok(options)
}

/// Connects as the plugin user and checks, as that user, that it can neither
/// read nor write a host table: no global privilege, no privilege on the whole
/// database, none on a host table or its columns, and the server itself
/// refuses to read each host table. Every problem is reported at once.
pub async fn connect_checked(
    owner: &Database,
    options: MySqlConnectOptions,
    settings: &PoolSettings,
) -> anyhow::Result<(MySqlPool, String)> {
    let Pool::Mysql(owner_pool) = &owner.pool else { bail!("not a MySQL database") };
    let (database, _) = current_database_and_user(owner_pool).await?;
    let options = database::mysql_session(options);
    let pool = database::pool_options(settings).connect_with(options).await.map_err(|e| {
        anyhow::anyhow!("cannot connect as the plugin database user: {}", database::redact_db_error(&e))
    })?;
    let (plugin_database, account) = current_database_and_user(&pool).await?;
    let grantee = account.quoted();
    let mut problems = Vec::new();
    if plugin_database != database {
        problems.push(format!("it connects to database `{plugin_database}`, not `{database}`"));
    }
    let global: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(PRIVILEGE_TYPE AS CHAR) FROM information_schema.USER_PRIVILEGES \
         WHERE PRIVILEGE_TYPE <> 'USAGE'",
    )
    .fetch_all(&pool)
    .await?;
    if !global.is_empty() {
        problems.push(format!("it holds global privileges ({})", global.join(", ")));
    }
    let whole: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(PRIVILEGE_TYPE AS CHAR) FROM information_schema.SCHEMA_PRIVILEGES WHERE ? LIKE TABLE_SCHEMA",
    )
    .bind(&database)
    .fetch_all(&pool)
    .await?;
    if !whole.is_empty() {
        problems.push(format!("it holds privileges on the whole database ({})", whole.join(", ")));
    }
    for view in ["TABLE_PRIVILEGES", "COLUMN_PRIVILEGES"] {
        let held: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT CAST(TABLE_NAME AS CHAR), CAST(PRIVILEGE_TYPE AS CHAR) FROM information_schema.{view} \
             WHERE TABLE_SCHEMA = ?"
        ))
        .bind(&database)
        .fetch_all(&pool)
        .await?;
        for (table, privilege) in held.into_iter().filter(|(t, _)| database::is_host_table(t)) {
            problems.push(format!("it holds {privilege} on host table `{table}`"));
        }
    }
    // The server's own answer, which also covers roles and proxies.
    for table in HOST_TABLES {
        if sqlx::raw_sql(&format!("SELECT 1 FROM `{table}` LIMIT 0")).execute(&pool).await.is_ok() {
            problems.push(format!("it can read host table `{table}`"));
        }
    }
    if !problems.is_empty() {
        pool.close().await;
        bail!(
            "plugin SQL would not be confined: the plugin database user {grantee} {}. Grant it only {PLUGIN_PRIVILEGES} \
             on the plugin tables (docs/deploy.md, \"Database users\"), or unset PLUGIN_DATABASE_URL so that the \
             app role creates its own user.",
            problems.join("; ")
        );
    }
    Ok((pool, grantee))
}

/// Drops the plugin user of a database (tests clean up with it).
pub async fn drop_plugin_user(server_url: &str, database: &str) -> anyhow::Result<()> {
    let mut conn = MySqlConnection::connect(server_url).await?;
    let name = plugin_user_name(database);
    let hosts: Vec<String> = sqlx::query_scalar("SELECT CAST(Host AS CHAR) FROM mysql.user WHERE User = ?")
        .bind(&name)
        .fetch_all(&mut conn)
        .await?;
    for host in hosts {
        let account = Account { user: name.clone(), host };
        sqlx::raw_sql(&format!("DROP USER IF EXISTS {}", account.quoted())).execute(&mut conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_database_gets_its_own_short_plugin_user() {
        let a = plugin_user_name("image_classifier");
        assert!(a.starts_with("wxp_") && a.len() <= 32, "{a}");
        assert_ne!(a, plugin_user_name("image_classifier_staging"));
        assert_eq!(a, plugin_user_name("image_classifier"));
    }

    #[test]
    fn accounts_are_quoted_for_grants() {
        let account = Account::parse("app@10.0.%");
        assert_eq!(account.quoted(), "'app'@'10.0.%'");
        assert_eq!(Account::parse("o'x@h").quoted(), "'o''x'@'h'");
    }
}
