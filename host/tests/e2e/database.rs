//! The db capability on SQLite and on the machine's MariaDB: called directly,
//! and end to end from a real plugin, including a plugin that traps with a
//! transaction open.

use crate::common::*;
use serde_json::{Value as Json, json};
use wasmtime::component::ResourceTable;
use wxhost::bindings::wxhost::plugin::db::{Error, Host, HostTransaction, Value};
use wxhost::caps::db::{DbCtx, DbView};
use wxhost::config::Role;
use wxhost::database;

/// Migrates, creates `tables` as the owner (plugins change no schema), then
/// opens the plugins' confined connections, as the app role does at start.
async fn connect_with(db: &TestDatabase, settings: &database::PoolSettings, tables: &[&str]) -> DbCtx {
    let database = database::connect(&db.url, settings).await.expect("connect");
    database::migrate(&database).await.expect("migrate");
    for sql in tables {
        wxhost::on_pool!(&database.pool, |p| sqlx::query(sql).execute(p).await.map(|_| ())).expect(sql);
    }
    DbCtx::open(&database, &db.url, None, settings).await.expect("opening the plugins' connections")
}

async fn connect(db: &TestDatabase) -> DbCtx {
    connect_with(db, &Default::default(), &[CREATE_KV]).await
}

const CREATE_KV: &str =
    "CREATE TABLE kv (k VARCHAR(64) NOT NULL PRIMARY KEY, v TEXT, n BIGINT, f DOUBLE, b BLOB)";

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

type Tx = wasmtime::component::Resource<wxhost::caps::db::Transaction>;

fn borrow(tx: &Tx) -> Tx {
    Tx::new_borrow(tx.rep())
}

async fn exec(db: &mut DbView<'_>, sql: &str, params: Vec<Value>) -> Result<u64, Error> {
    plain(Host::execute(db, sql.into(), params).await).map(|r| r.rows_affected)
}

async fn query(db: &mut DbView<'_>, sql: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>, Error> {
    plain(Host::query(db, sql.into(), params).await).map(|r| r.rows)
}

async fn tx_exec(db: &mut DbView<'_>, tx: &Tx, sql: &str, params: Vec<Value>) -> Result<u64, Error> {
    plain(HostTransaction::execute(db, borrow(tx), sql.into(), params).await).map(|r| r.rows_affected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capability_queries_executes_commits_and_rolls_back_on_both_databases() {
    for test_db in all_databases().await {
        let ctx = connect(&test_db).await;
        let mut table = ResourceTable::new();
        let mut db = DbView { ctx: Some(&ctx), table: &mut table };
        let db = &mut db;
        let which = test_db.name;

        let params = vec![
            text("a"),
            text("你好 🎉"),
            Value::Int(-42),
            Value::Float(1.5),
            Value::Blob(vec![0, 255, 7]),
        ];
        assert_eq!(
            exec(db, "INSERT INTO kv (k, v, n, f, b) VALUES (?, ?, ?, ?, ?)", params).await.unwrap(),
            1,
            "{which}"
        );
        exec(db, "INSERT INTO kv (k, v) VALUES (?, ?)", vec![text("null"), Value::Null]).await.unwrap();

        let rows =
            plain(Host::query(db, "SELECT k, v, n, f, b FROM kv WHERE k = ?".into(), vec![text("a")]).await)
                .unwrap();
        assert_eq!(rows.columns, ["k", "v", "n", "f", "b"], "{which}");
        let row = &rows.rows[0];
        assert!(matches!(&row[1], Value::Text(s) if s == "你好 🎉"), "{which}: emoji survive: {:?}", row[1]);
        assert!(matches!(row[2], Value::Int(-42)), "{which}: {:?}", row[2]);
        assert!(matches!(row[3], Value::Float(f) if f == 1.5), "{which}: {:?}", row[3]);
        assert!(matches!(&row[4], Value::Blob(b) if b == &[0, 255, 7]), "{which}: {:?}", row[4]);
        let rows = query(db, "SELECT v, n FROM kv WHERE k = ?", vec![text("null")]).await.unwrap();
        assert!(matches!(rows[0][..], [Value::Null, Value::Null]), "{which}");

        // Commit makes a write visible; rollback and drop do not.
        let tx = plain(db.begin().await).unwrap();
        tx_exec(db, &tx, "INSERT INTO kv (k) VALUES (?)", vec![text("committed")]).await.unwrap();
        plain(HostTransaction::commit(db, borrow(&tx)).await).unwrap();
        let again = plain(HostTransaction::commit(db, borrow(&tx)).await);
        assert!(matches!(again, Err(Error::TransactionClosed)), "{which}");
        let closed = tx_exec(db, &tx, "INSERT INTO kv (k) VALUES (?)", vec![text("late")]).await;
        assert!(matches!(closed, Err(Error::TransactionClosed)), "{which}");
        HostTransaction::drop(db, tx).await.unwrap();

        let tx = plain(db.begin().await).unwrap();
        tx_exec(db, &tx, "INSERT INTO kv (k) VALUES (?)", vec![text("rolled-back")]).await.unwrap();
        plain(HostTransaction::rollback(db, borrow(&tx)).await).unwrap();
        HostTransaction::drop(db, tx).await.unwrap();

        let tx = plain(db.begin().await).unwrap();
        tx_exec(db, &tx, "INSERT INTO kv (k) VALUES (?)", vec![text("dropped")]).await.unwrap();
        HostTransaction::drop(db, tx).await.unwrap();

        let keys = query(db, "SELECT k FROM kv ORDER BY k", vec![]).await.unwrap();
        let keys: Vec<String> = keys
            .iter()
            .map(|r| match &r[0] {
                Value::Text(s) => s.clone(),
                v => panic!("{v:?}"),
            })
            .collect();
        assert_eq!(keys, ["a", "committed", "null"], "{which}");

        // Errors a plugin can cause are results, not traps.
        let dup = exec(db, "INSERT INTO kv (k) VALUES (?)", vec![text("a")]).await;
        assert!(matches!(dup, Err(Error::Constraint(_))), "{which}: {dup:?}");
        let bad = query(db, "SELEKT nothing", vec![]).await;
        assert!(matches!(bad, Err(Error::InvalidQuery(_))), "{which}: {bad:?}");
        let missing = query(db, "SELECT * FROM no_such_table", vec![]).await;
        assert!(matches!(missing, Err(Error::InvalidQuery(_))), "{which}: {missing:?}");

        // The schema of DESIGN.md is in place for plugins.
        for table in ["users", "bindings", "orders", "processed_events"] {
            let r = query(db, &format!("SELECT COUNT(*) FROM {table}"), vec![]).await;
            assert!(r.is_ok(), "{which}: table {table}: {r:?}");
        }

        // The engine refuses the host's own tables, schema changes, files and
        // other databases, in and out of transactions; control characters and
        // a transaction begun in SQL never reach the pool.
        let refused = [
            "SELECT token FROM token_cache",
            "SELECT * FROM (SELECT value FROM host_keys) AS x",
            "INSERT INTO kv (k, v) SELECT session_id, openid FROM `Sessions`",
            "UPDATE kv SET v = (SELECT MAX(session_id) FROM sessions)",
            "DELETE FROM sessions",
            "DROP TABLE sessions",
            "CREATE TABLE other (x INT)",
            "SELECT 1 -- \0x",
        ];
        // SQLite's own statements; MySQL's parser refuses them as SQL it does not know.
        let sqlite_only =
            ["ATTACH DATABASE 'other.db' AS other", "VACUUM INTO 'copy.db'", "PRAGMA journal_mode"];
        for sql in refused.into_iter().chain(sqlite_only) {
            let r = query(db, sql, vec![]).await;
            let by_engine = which == "sqlite" || !sqlite_only.contains(&sql);
            assert!(
                matches!(&r, Err(Error::InvalidQuery(m)) if m.starts_with("refused by the") || !by_engine),
                "{which}: {sql}: {r:?}"
            );
            let r = exec(db, sql, vec![]).await;
            assert!(matches!(&r, Err(Error::InvalidQuery(_))), "{which}: {sql}: {r:?}");
        }
        let tx = plain(db.begin().await).unwrap();
        let r = tx_exec(db, &tx, "DELETE FROM token_cache", vec![]).await;
        assert!(matches!(&r, Err(Error::InvalidQuery(_))), "{which}: in a transaction: {r:?}");
        HostTransaction::drop(db, tx).await.unwrap();
        assert_eq!(query(db, "SELECT k FROM kv ORDER BY k", vec![]).await.unwrap().len(), 3, "{which}");

        if which == "sqlite" {
            // A BEGIN in SQL is rolled back before its connection goes back to the pool.
            let r = exec(db, "BEGIN IMMEDIATE", vec![]).await;
            assert!(matches!(&r, Err(Error::InvalidQuery(m)) if m.contains("db.begin")), "{which}: {r:?}");
            let tx = plain(db.begin().await);
            assert!(tx.is_ok(), "{which}: the write lock is free: {tx:?}");
        }
    }
}

fn probe_config() -> TestConfig {
    let toml = base_toml(2000, r#""log""#, r#""log", "config", "db""#) + DB_PROBE_PLUGIN;
    TestConfig::new(&toml, &[("db-probe.wasm", "fixtures/db-probe.wasm")])
}

async fn probe(client: &reqwest::Client, url: &str, body: Json) -> (u16, Json) {
    let r = client.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Json::Null))
}

fn insert(k: &str) -> Json {
    json!({"sql": "INSERT INTO kv (k, v) VALUES (?, ?)", "params": [k, "v"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_commits_rolls_back_and_a_trap_mid_transaction_rolls_back_on_both_databases() {
    for test_db in all_databases().await {
        let which = test_db.name;
        db_exec(&test_db.url, CREATE_KV, &[]).await;
        let config = probe_config();
        let server = start(&config, &[Role::App], Some(&test_db.url), false).await;
        let client = reqwest::Client::new();
        let url = url(&server, Role::App, "/probe/db");

        for (mode, key) in [("commit", "c"), ("rollback", "r"), ("drop", "d")] {
            let (status, body) =
                probe(&client, &url, json!({"transaction": mode, "statements": [insert(key)]})).await;
            assert_eq!(status, 200, "{which} {mode}: {body}");
            assert_eq!(body["results"][0]["rows_affected"], 1, "{which} {mode}: {body}");
        }
        // The plugin traps after writing inside a transaction.
        let r = client
            .post(&url)
            .json(&json!({"transaction": "trap", "statements": [insert("t")]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500, "{which}");
        let body: Json = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "plugin_failed", "{which}");

        let (_, body) = probe(
            &client,
            &url,
            json!({"statements": [{"sql": "SELECT k FROM kv ORDER BY k", "query": true}]}),
        )
        .await;
        assert_eq!(body["results"][0]["rows"], json!([["c"]]), "{which}: only the committed row: {body}");

        // The connection the trapped request held went back to the pool rolled
        // back: many more requests still get connections.
        for i in 0..40 {
            let (status, body) = probe(
                &client,
                &url,
                json!({"transaction": "commit", "statements": [insert(&format!("k{i}"))]}),
            )
            .await;
            assert_eq!(status, 200, "{which}: {body}");
        }
        let (_, body) = probe(
            &client,
            &url,
            json!({"statements": [{"sql": "SELECT COUNT(*) AS n FROM kv", "query": true}]}),
        )
        .await;
        assert_eq!(body["results"][0]["rows"], json!([[41]]), "{which}: {body}");
        server.shutdown();
        server.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_take_turns_and_one_kept_waiting_past_the_timeout_gets_unavailable_on_both_databases()
 {
    use std::time::{Duration, Instant};
    for test_db in all_databases().await {
        let which = test_db.name;
        let settings =
            database::PoolSettings { max_connections: 8, acquire_timeout: Duration::from_millis(600) };
        let ctx = connect_with(
            &test_db,
            &settings,
            &["CREATE TABLE counter (id INT PRIMARY KEY, n BIGINT NOT NULL)"],
        )
        .await;
        let ctx = std::sync::Arc::new(ctx);
        {
            let mut table = ResourceTable::new();
            let mut db = DbView { ctx: Some(&ctx), table: &mut table };
            exec(&mut db, "INSERT INTO counter (id, n) VALUES (1, 0)", vec![]).await.unwrap();
        }
        let read = match ctx.db.dialect() {
            database::Dialect::Sqlite => "SELECT n FROM counter WHERE id = 1",
            database::Dialect::Mysql => "SELECT n FROM counter WHERE id = 1 FOR UPDATE",
        };

        // Read-modify-write transactions at once: each waits its turn, none fails, none is lost.
        const WRITERS: i64 = 30;
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let mut table = ResourceTable::new();
                    let mut db = DbView { ctx: Some(&ctx), table: &mut table };
                    let tx = plain(Host::begin(&mut db).await)?;
                    let rows =
                        plain(HostTransaction::query(&mut db, borrow(&tx), read.into(), vec![]).await)?;
                    let Value::Int(n) = rows.rows[0][0] else { panic!("{:?}", rows.rows) };
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    tx_exec(&mut db, &tx, "UPDATE counter SET n = ? WHERE id = 1", vec![Value::Int(n + 1)])
                        .await?;
                    plain(HostTransaction::commit(&mut db, tx).await)
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap().unwrap_or_else(|e| panic!("{which}: a writer failed: {e:?}"));
        }
        let mut table = ResourceTable::new();
        let mut db = DbView { ctx: Some(&ctx), table: &mut table };
        let rows = query(&mut db, "SELECT n FROM counter WHERE id = 1", vec![]).await.unwrap();
        assert!(matches!(rows[0][0], Value::Int(WRITERS)), "{which}: {:?}", rows[0][0]);

        if ctx.db.dialect() == database::Dialect::Sqlite {
            // SQLite has one writer: the next one waits at most the acquire timeout, then is told so.
            let holder = plain(Host::begin(&mut db).await).unwrap();
            let mut other_table = ResourceTable::new();
            let mut other = DbView { ctx: Some(&ctx), table: &mut other_table };
            let started = Instant::now();
            let waited = plain(Host::begin(&mut other).await);
            assert!(matches!(waited, Err(Error::Unavailable(_))), "{which}: {waited:?}");
            assert!(
                // The holder never lets go: only the acquire timeout (0.6 s) ends the wait.
                started.elapsed() < Duration::from_secs(10),
                "{which}: waited {:?}",
                started.elapsed()
            );
            let write = exec(&mut other, "UPDATE counter SET n = 0 WHERE id = 1", vec![]).await;
            assert!(matches!(write, Err(Error::Unavailable(_))), "{which}: {write:?}");
            plain(HostTransaction::commit(&mut db, holder).await).unwrap();
            let next = plain(Host::begin(&mut other).await);
            assert!(next.is_ok(), "{which}: the turn is free again: {next:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_role_refuses_a_plugin_database_user_that_can_reach_a_host_table_and_says_why() {
    let test_db = mysql_database().await;
    let owner = database::connect(&test_db.url, &Default::default()).await.unwrap();
    database::migrate(&owner).await.unwrap();
    let schema = test_db.url.rsplit('/').next().unwrap().to_string();
    let user = format!("loose_{:08x}", rand::random::<u32>());
    let password = format!("pw-{:016x}", rand::random::<u64>());
    let account = format!("'{user}'@'127.0.0.1'");
    let admin = |sql: String| {
        let owner = owner.clone();
        async move { wxhost::on_pool!(&owner.pool, |p| sqlx::raw_sql(&sql).execute(p).await.map(|_| ())).unwrap() }
    };
    admin(format!("CREATE USER {account} IDENTIFIED BY '{password}'")).await;
    // A grant on the whole database covers the host tables too.
    admin(format!("GRANT SELECT, INSERT, UPDATE, DELETE ON `{schema}`.* TO {account}")).await;
    let server = mysql_server_url().replace("root@", &format!("{user}:{password}@"));
    let plugin_url = format!("{server}/{schema}");

    let refused = DbCtx::open(&owner, &test_db.url, Some(&plugin_url), &Default::default()).await;
    let message = format!("{:#}", refused.err().expect("a plugin user that can read host tables is refused"));
    assert!(message.contains("whole database"), "{message}");
    assert!(message.contains("can read host table `host_keys`"), "{message}");
    assert!(message.contains("docs/deploy.md"), "{message}");
    assert!(!message.contains(&password), "the password never shows: {message}");

    // Granted only the plugin tables, the same user is accepted.
    admin(format!("REVOKE ALL PRIVILEGES ON `{schema}`.* FROM {account}")).await;
    for table in ["users", "bindings", "orders", "processed_events"] {
        admin(format!("GRANT SELECT, INSERT, UPDATE, DELETE ON `{schema}`.`{table}` TO {account}")).await;
    }
    let ctx = DbCtx::open(&owner, &test_db.url, Some(&plugin_url), &Default::default()).await;
    assert!(ctx.is_ok(), "{:?}", ctx.err());
    admin(format!("DROP USER {account}")).await;
}

/// `wxhost migrate` in its own process, as an operator runs it: it creates the
/// plugin user, grants it, and checks the confinement; a second run changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wxhost_migrate_creates_the_plugin_database_user_and_is_idempotent() {
    for test_db in all_databases().await {
        for run in 0..2 {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_wxhost"))
                .arg("migrate")
                .env("DATABASE_URL", &test_db.url)
                .env_remove("PLUGIN_DATABASE_URL")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{} run {run}: {stdout}{}",
                test_db.name,
                String::from_utf8_lossy(&out.stderr)
            );
            let expected = if test_db.name == "sqlite" {
                "by SQLite's authorizer"
            } else {
                "as the database user 'wxp_"
            };
            assert!(stdout.contains(expected), "{} run {run}: {stdout}", test_db.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_bindings_sessions_and_week_old_events_are_pruned_and_live_ones_kept_on_both_databases() {
    for test_db in all_databases().await {
        let which = test_db.name;
        let db = database::connect(&test_db.url, &Default::default()).await.unwrap();
        database::migrate(&db).await.unwrap();
        let now = 1_900_000_000_i64;
        let day = database::EXPIRED_BINDING_KEPT_SECS;
        for (scene, expires_at) in [("s-old", now - day - 1), ("s-recent", now - 10), ("s-live", now + 600)] {
            wxhost::on_pool!(&db.pool, |p| sqlx::query(
                "INSERT INTO bindings (scene, status, expires_at, created_at, updated_at) VALUES (?, 'pending', ?, 0, 0)"
            )
            .bind(scene)
            .bind(expires_at)
            .execute(p)
            .await
            .map(|_| ()))
            .unwrap();
        }
        for (id, expires_at) in [("sess-old", now - 1), ("sess-live", now + 600)] {
            wxhost::on_pool!(&db.pool, |p| sqlx::query(
                "INSERT INTO sessions (session_id, openid, expires_at, created_at) VALUES (?, 'o1', ?, 0)"
            )
            .bind(id)
            .bind(expires_at)
            .execute(p)
            .await
            .map(|_| ()))
            .unwrap();
        }
        let week = database::PROCESSED_EVENT_KEPT_SECS;
        for (key, created_at) in [("push:old", now - week - 1), ("push:recent", now - 60)] {
            wxhost::on_pool!(&db.pool, |p| sqlx::query(
                "INSERT INTO processed_events (event_key, kind, created_at) VALUES (?, 'push', ?)"
            )
            .bind(key)
            .bind(created_at)
            .execute(p)
            .await
            .map(|_| ()))
            .unwrap();
        }
        let pruned = database::prune_expired(&db, now).await.unwrap();
        assert_eq!(pruned, database::Pruned { bindings: 1, sessions: 1, events: 1 }, "{which}");
        assert_eq!(
            database::prune_expired(&db, now).await.unwrap(),
            database::Pruned::default(),
            "{which}: idempotent"
        );
        let events: Vec<String> =
            wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar("SELECT event_key FROM processed_events")
                .fetch_all(p)
                .await)
            .unwrap();
        assert_eq!(events, ["push:recent"], "{which}: a week of applied events is remembered");
        let scenes: Vec<String> =
            wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar("SELECT scene FROM bindings ORDER BY scene")
                .fetch_all(p)
                .await)
            .unwrap();
        assert_eq!(
            scenes,
            ["s-live", "s-recent"],
            "{which}: an expired code still polls as expired for a day"
        );
        assert_eq!(
            db_count(&test_db.url, "SELECT COUNT(*) FROM sessions WHERE session_id = 'sess-live'").await,
            1,
            "{which}"
        );
    }
}
