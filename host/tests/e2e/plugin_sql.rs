//! Plugin SQL, tried as an attacker holding the `db` capability would, through
//! a real plugin against the whole product on SQLite and on MariaDB: every
//! attack on the host's tables fails with a clean error, returns no host
//! data, changes nothing, and afterwards the access token still refreshes and
//! sessions still work. The database engine refuses (SQLite's authorizer, the
//! MySQL plugin user's grants), so comments, quoting, case and schema
//! prefixes change nothing.

use crate::common::stack::*;
use crate::common::*;
use proptest::prelude::*;
use serde_json::{Value as Json, json};

/// Every shipped plugin, plus the probe that runs whatever SQL it is sent.
fn config_with_probe() -> TestConfig {
    let config = full_config();
    let toml = std::fs::read_to_string(config.path()).unwrap() + DB_PROBE_PLUGIN;
    std::fs::write(config.path(), toml).unwrap();
    std::fs::copy(dist("fixtures/db-probe.wasm"), config.file("db-probe.wasm")).unwrap();
    config
}

/// The host's rows and the schema, read as the owner: what must not change.
async fn host_state(db_url: &str) -> (Vec<String>, Vec<String>) {
    let db = wxhost::database::connect(db_url, &Default::default()).await.unwrap();
    let rows_sql = [
        "SELECT CONCAT_WS('|', name, COALESCE(token, ''), expires_at, COALESCE(lease_owner, ''), lease_until) FROM token_cache ORDER BY name",
        "SELECT CONCAT_WS('|', name, value) FROM host_keys ORDER BY name",
        "SELECT CONCAT_WS('|', session_id, openid, expires_at, COALESCE(revoked_at, '')) FROM sessions ORDER BY session_id",
        "SELECT CONCAT_WS('|', version, description, success) FROM _sqlx_migrations ORDER BY version",
    ];
    let schema_sql = match db.dialect() {
        wxhost::database::Dialect::Sqlite => {
            "SELECT type || '|' || name || '|' || tbl_name || '|' || COALESCE(sql, '') FROM sqlite_master ORDER BY type, name"
        }
        wxhost::database::Dialect::Mysql => {
            "SELECT CONCAT_WS('|', 'column', TABLE_NAME, COLUMN_NAME, COLUMN_TYPE) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
             UNION ALL SELECT CONCAT_WS('|', 'index', TABLE_NAME, INDEX_NAME, COLUMN_NAME) FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() \
             UNION ALL SELECT CONCAT_WS('|', 'trigger', TRIGGER_NAME) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE() \
             UNION ALL SELECT CONCAT_WS('|', 'view', TABLE_NAME) FROM information_schema.VIEWS WHERE TABLE_SCHEMA = DATABASE() \
             UNION ALL SELECT CONCAT_WS('|', 'fk', TABLE_NAME, CONSTRAINT_NAME) FROM information_schema.REFERENTIAL_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = DATABASE() \
             ORDER BY 1"
        }
    };
    let mut rows = Vec::new();
    for sql in rows_sql {
        // SQLite has CONCAT_WS since 3.44 (the bundled one is newer).
        let mut r: Vec<String> =
            wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar::<_, String>(sql).fetch_all(p).await)
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.append(&mut r);
    }
    let schema =
        wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar::<_, String>(schema_sql).fetch_all(p).await)
            .unwrap();
    (rows, schema)
}

/// Values only the host holds (the access token, its keys, session ids): no
/// answer to a plugin may contain one.
async fn host_secrets(db_url: &str) -> Vec<String> {
    let db = wxhost::database::connect(db_url, &Default::default()).await.unwrap();
    let sql = "SELECT token FROM token_cache WHERE token IS NOT NULL \
               UNION ALL SELECT value FROM host_keys UNION ALL SELECT session_id FROM sessions";
    wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar::<_, String>(sql).fetch_all(p).await).unwrap()
}

struct Attacker<'a> {
    stack: &'a Stack,
    secrets: Vec<String>,
}

impl Attacker<'_> {
    /// Runs `sql` as a query, as a statement, and both inside a committed
    /// transaction; returns each result. Panics if any carries host data.
    async fn run(&self, sql: &str) -> Vec<Json> {
        let statement = |query: bool| json!({"sql": sql, "query": query});
        let mut results = Vec::new();
        for transaction in ["none", "commit"] {
            let body = json!({"transaction": transaction, "statements": [statement(true), statement(false)]});
            let r = self.stack.client.post(self.stack.app_url("/probe/db")).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            for secret in &self.secrets {
                assert!(!text.contains(secret.as_str()), "{sql}: host data came back: {text}");
            }
            assert_eq!(status, 200, "{sql}: {text}");
            let answer: Json = serde_json::from_str(&text).unwrap();
            results.extend(answer["results"].as_array().unwrap().iter().cloned());
        }
        results
    }

    /// Every way of running `sql` fails with the plugin-facing `invalid-query`.
    async fn refused(&self, which: &str, sql: &str) {
        for result in self.run(sql).await {
            let error = result["error"].as_str().unwrap_or_default();
            assert!(error.contains("InvalidQuery("), "{which}: {sql:?} was not refused: {result}");
        }
    }
}

/// The attacks of the security review, and their relatives.
fn attacks(database: &str) -> Vec<String> {
    let mut list: Vec<String> = [
        // MySQL runs executable comments; `--<TAB>` and `#` are comments there.
        "SELECT 1 AS x /*!, (SELECT value FROM host_keys LIMIT 1) AS k */",
        "SELECT 1 AS x /*!50000 , (SELECT value FROM host_keys LIMIT 1) AS k */",
        "SELECT 1 AS x --\t\n, (SELECT value FROM host_keys LIMIT 1) AS k",
        "SELECT 1 AS x # a comment\n, (SELECT value FROM host_keys LIMIT 1) AS k",
        "SELECT openid FROM users UNION TABLE sessions",
        "SELECT openid FROM users UNION SELECT session_id FROM sessions",
        "WITH s AS (SELECT session_id FROM sessions) SELECT * FROM s",
        "SELECT (SELECT token FROM token_cache LIMIT 1)",
        // Quoted, differently-cased and schema-qualified names.
        "SELECT * FROM `Token_Cache`",
        "SELECT * FROM \"SESSIONS\"",
        "SELECT * FROM [host_keys]",
        "SELECT * FROM 'sessions'",
        "SELECT * FROM main.sessions",
        "SELECT * FROM main . \"Host_Keys\"",
        // Writes and schema changes of host tables.
        "DELETE FROM sessions",
        "UPDATE host_keys SET value = 'forged'",
        "INSERT INTO token_cache (name, token, updated_at) VALUES ('x', 'forged', 0)",
        "REPLACE INTO host_keys (name, value, created_at) VALUES ('session', 'forged', 0)",
        "DROP INDEX PRIMARY ON token_cache",
        "DROP INDEX `PRIMARY` ON token_cache",
        "DROP INDEX sessions_openid",
        "DROP INDEX sessions_openid ON sessions",
        "DROP TABLE sessions",
        "TRUNCATE TABLE sessions",
        "ALTER TABLE token_cache ADD COLUMN x INT",
        "RENAME TABLE sessions TO s2",
        // Objects that would reach a host table later, or another's rights.
        "CREATE TABLE evil (t VARCHAR(64), FOREIGN KEY (t) REFERENCES token_cache(token))",
        "CREATE VIEW leak AS SELECT * FROM sessions",
        "CREATE TRIGGER t AFTER INSERT ON users BEGIN DELETE FROM sessions; END",
        "CREATE TRIGGER t AFTER INSERT ON users FOR EACH ROW DELETE FROM sessions",
        "CREATE TABLE leak AS SELECT * FROM host_keys",
        "CREATE TEMP TABLE sessions (session_id TEXT)",
        "CREATE TEMPORARY TABLE sessions (session_id TEXT)",
        // Files, extensions, other databases, engine state.
        "SELECT load_extension('/tmp/wxhost-no-such-extension')",
        "ATTACH DATABASE '/tmp/wxhost-attack.db' AS other",
        "VACUUM INTO '/tmp/wxhost-attack-copy.db'",
        "PRAGMA writable_schema = 1",
        "PRAGMA foreign_keys = OFF",
        "SELECT 1 INTO OUTFILE '/tmp/wxhost-attack-outfile'",
        "SELECT value FROM host_keys INTO DUMPFILE '/tmp/wxhost-attack-dumpfile'",
        "SET GLOBAL max_connections = 1",
        "GRANT ALL ON *.* TO CURRENT_USER()",
        // Control characters: NUL made sqlx-sqlite loop forever.
        "SELECT 1 -- \0x",
        "SELECT 1\0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    list.push(format!("SELECT * FROM `{database}`.`sessions`"));
    list.push(format!("DELETE FROM `{database}`.host_keys"));
    list
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_on_the_host_tables_is_refused_by_the_engine_and_changes_nothing_on_both_databases() {
    for test_db in all_databases().await {
        let which = test_db.name;
        let stack = Stack::start_with(&test_db.url, config_with_probe(), PayApi::V3).await;
        // A signed-in user, an access token in the cache, the session key in host_keys.
        let session = stack.login("alice").await;
        let (status, qr) = stack.post("/api/v1/auth/wechat/qrcode", None, "").await;
        assert_eq!(status, 201, "{which}: {qr}");
        let before = host_state(&test_db.url).await;
        let attacker = Attacker { stack: &stack, secrets: host_secrets(&test_db.url).await };
        assert!(attacker.secrets.len() >= 3, "{which}: the token, the key and the session: {:?}", before.0);

        let database = test_db.url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
        for sql in attacks(if which == "sqlite" { "main" } else { &database }) {
            // To SQLite, `/*! … */` is a comment: only `SELECT 1 AS x` runs.
            if which == "sqlite" && sql.contains("/*!") {
                for result in attacker.run(&sql).await {
                    assert!(
                        result["rows"] == json!([[1]]) || result["rows_affected"].is_number(),
                        "{sql:?}: {result}"
                    );
                }
                continue;
            }
            attacker.refused(which, &sql).await;
        }
        // LOAD_FILE: SQLite has no such function; MySQL gives NULL without the FILE privilege.
        for result in attacker.run("SELECT LOAD_FILE('/etc/passwd') AS f").await {
            let refused = result["error"].as_str().is_some_and(|e| e.contains("InvalidQuery("));
            let nothing = result["rows"] == json!([[null]]);
            assert!(refused || nothing || result["rows_affected"].is_number(), "{which}: {result}");
        }
        for file in
            ["/tmp/wxhost-attack-outfile", "/tmp/wxhost-attack-dumpfile", "/tmp/wxhost-attack-copy.db"]
        {
            assert!(!std::path::Path::new(file).exists(), "{which}: {file} was written");
        }

        assert_eq!(
            host_state(&test_db.url).await,
            before,
            "{which}: the host's rows and the schema are unchanged"
        );

        // The host's own work goes on: the access token refreshes, sessions hold.
        let issued = stack.sim.tokens_issued();
        stack.sim.invalidate_tokens();
        let (status, qr) = stack.post("/api/v1/auth/wechat/qrcode", None, "").await;
        assert_eq!(status, 201, "{which}: a QR code after the token was invalidated: {qr}");
        assert_eq!(stack.sim.tokens_issued(), issued + 1, "{which}: one refresh");
        let (status, me) = stack.get("/api/v1/user/me", Some(&session)).await;
        assert_eq!(status, 200, "{which}: the earlier session still works: {me}");
        let bob = stack.login("bob").await;
        let (status, me) = stack.get("/api/v1/user/me", Some(&bob)).await;
        assert_eq!(status, 200, "{which}: a new session works: {me}");
        // Plugin tables stay the plugins': the probe reads what the account plugin wrote.
        let mine = attacker.run("SELECT COUNT(*) AS n FROM users").await;
        assert_eq!(mine[0]["rows"], json!([[2]]), "{which}: {mine:?}");
        stack.shutdown().await;
    }
}

/// A host table's name as an attacker might spell it: any case, quoted in
/// any of the engines' ways, prefixed with its schema, with comments and
/// whitespace around it.
fn disguised_host_table(schema: String) -> impl Strategy<Value = String> {
    let table = prop::sample::select(wxhost::database::HOST_TABLES.to_vec()).prop_flat_map(|t| {
        prop::collection::vec(any::<bool>(), t.len()).prop_map(move |upper| {
            t.chars().zip(upper).map(|(c, u)| if u { c.to_ascii_uppercase() } else { c }).collect::<String>()
        })
    });
    let quote = prop::sample::select(vec![("", ""), ("`", "`"), ("\"", "\""), ("[", "]"), ("'", "'")]);
    let gap = prop::sample::select(vec![
        " ",
        "\t",
        "\n",
        " /* x */ ",
        "/**/",
        " -- c\n",
        " # c\n",
        "/*! */",
        "\r\n",
    ]);
    let prefix = prop::sample::select(vec![
        String::new(),
        format!("{schema}."),
        format!("`{schema}` . "),
        "main.".into(),
    ]);
    (table, quote, gap.clone(), gap, prefix).prop_map(|(t, (open, close), before, after, prefix)| {
        format!("{before}{prefix}{open}{t}{close}{after}")
    })
}

fn statement_around(name: String) -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "SELECT * FROM {}",
        "SELECT openid FROM users UNION ALL SELECT * FROM {}",
        "SELECT * FROM users WHERE EXISTS (SELECT 1 FROM {})",
        "DELETE FROM {}",
        "UPDATE {} SET created_at = 0",
    ])
    .prop_map(move |template| template.replace("{}", &name))
}

#[test]
fn no_disguise_of_a_host_table_name_brings_back_a_host_row_on_both_databases() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let databases = runtime.block_on(all_databases());
    for test_db in &databases {
        let stack = runtime.block_on(Stack::start_with(&test_db.url, config_with_probe(), PayApi::V3));
        runtime.block_on(stack.login("alice"));
        let before = runtime.block_on(host_state(&test_db.url));
        let attacker = Attacker { stack: &stack, secrets: runtime.block_on(host_secrets(&test_db.url)) };
        let schema = if test_db.name == "sqlite" {
            "main".to_string()
        } else {
            test_db.url.rsplit('/').next().unwrap().to_string()
        };
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(96);
        let mut runner =
            proptest::test_runner::TestRunner::new(ProptestConfig { cases, ..ProptestConfig::default() });
        let strategy = disguised_host_table(schema).prop_flat_map(statement_around);
        runner
            .run(&strategy, |sql| {
                // `run` fails the case if any answer carries host data.
                for result in runtime.block_on(attacker.run(&sql)) {
                    prop_assert!(result["error"].is_string(), "{}: {:?} ran: {}", test_db.name, sql, result);
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{}: {e}", test_db.name));
        assert_eq!(runtime.block_on(host_state(&test_db.url)), before, "{}: nothing changed", test_db.name);
        runtime.block_on(stack.shutdown());
    }
    drop(databases);
}
