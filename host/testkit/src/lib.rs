//! wxhost's test kit, shared by the host's tests and the benchmark: real
//! compiled plugins, temporary configurations, in-process servers on
//! loopback, the whole product as a [`stack::Stack`], and databases (a
//! SQLite file, or a fresh MariaDB database per test, dropped after it).

pub mod stack;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};

use wxhost::config::Role;
use wxhost::server::{self, RunningServer, ServeOptions};
use wxhost::settings::Settings;

/// The token tests sign WeChat callbacks with.
pub const TOKEN: &str = "test";

/// The workspace's root folder.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A file of the host's test fixtures (keys, vectors, captured pushes).
pub fn fixture(file: &str) -> PathBuf {
    root().join("host/tests/fixtures").join(file)
}

/// A compiled plugin from plugins/dist (built by the host's build script).
pub fn dist(file: &str) -> PathBuf {
    let path = root().join("plugins/dist").join(file);
    assert!(path.is_file(), "{} is missing: the build script builds it", path.display());
    path
}

/// Every log line at info and above of this test process, for tests that
/// check what reaches the log. One subscriber for the whole process (a test
/// installing its own would break every other): it shows `RUST_LOG` (warn by
/// default) and captures the rest. Tests pick their lines by request id.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    init_logging();
    CAPTURED.clone()
}

static CAPTURED: std::sync::LazyLock<Arc<Mutex<Vec<u8>>>> = std::sync::LazyLock::new(Default::default);

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use tracing_subscriber::prelude::*;
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let shown = tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(tracing_subscriber::EnvFilter::new(filter));
        let sink = CAPTURED.clone();
        let captured = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || Capture(sink.clone()))
            .with_filter(tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::registry().with(shown).with(captured).try_init();
    });
}

/// A temporary folder holding a plugins.toml and copies of the plugins it names.
pub struct TestConfig {
    pub dir: tempfile::TempDir,
}

impl TestConfig {
    /// `toml` may name wasm files relative to the folder; `plugins` are copied in
    /// as (file name in the folder, file in plugins/dist).
    pub fn new(toml: &str, plugins: &[(&str, &str)]) -> TestConfig {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, source) in plugins {
            std::fs::copy(dist(source), dir.path().join(name)).expect("copying a plugin");
        }
        std::fs::write(dir.path().join("plugins.toml"), toml).expect("writing plugins.toml");
        TestConfig { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("plugins.toml")
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces a file the way a deploy does: write beside it, then rename over it.
    pub fn replace(&self, name: &str, bytes: &[u8]) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, self.file(name)).unwrap();
    }
}

/// What the web role grants in test configurations.
pub const WEB_GRANTS: &str = r#""log", "config", "callback-crypto", "internal-call""#;

/// The `verify` plugin as plugins.toml declares it (wasm copied as verify.wasm).
pub const VERIFY_PLUGIN: &str = r#"
[[plugins]]
name = "verify"
role = "web"
wasm = "verify.wasm"
routes = ["GET /api/v1/auth/wechat/verify", "POST /api/v1/auth/wechat/verify"]
capabilities = ["log", "config", "callback-crypto", "internal-call"]
"#;

/// The web role's payment notify plugin, as shipped.
pub const NOTIFY_PLUGIN: &str = r#"
[[plugins]]
name = "notify"
role = "web"
wasm = "notify.wasm"
routes = ["POST /api/v1/payment/notify"]
capabilities = ["log", "callback-crypto", "internal-call"]
"#;

/// The test fixture that runs whatever SQL it is sent through the db capability.
pub const DB_PROBE_PLUGIN: &str = r#"
[[plugins]]
name = "db-probe"
role = "app"
wasm = "db-probe.wasm"
routes = ["POST /probe/db"]
capabilities = ["log", "db"]
"#;

/// The app role's internal API for the web role's pushes, as shipped.
pub const INTERNAL_PLUGIN: &str = r#"
[[plugins]]
name = "internal"
role = "app"
wasm = "internal.wasm"
routes = ["POST /api/v1/internal/user/create-or-update", "POST /api/v1/internal/binding/create", "PUT /api/v1/internal/binding/update"]
capabilities = ["log", "db", "callback-crypto"]
"#;

/// A web role serving only the `verify` plugin.
pub fn verify_only_config() -> TestConfig {
    let toml = base_toml(2000, WEB_GRANTS, r#""log""#) + VERIFY_PLUGIN;
    TestConfig::new(&toml, &[("verify.wasm", "verify.wasm")])
}

/// Sections every test configuration starts with: loopback, ephemeral ports.
pub fn base_toml(web_deadline_ms: u64, grants_web: &str, grants_app: &str) -> String {
    format!(
        r#"
[host]
max_instances = 32

[admin]
listen = "127.0.0.1:0"

[wechat]
timestamp_window_secs = 300
# The tests hold the safe-mode vectors' EncodingAESKey and push in both modes;
# push.rs checks the default (plaintext refused while a key is set).
accept_plaintext_with_aes_key = true

[roles.web]
listen = "127.0.0.1:0"
grants = [{grants_web}]
deadline_ms = {web_deadline_ms}
memory_limit_mib = 16
max_body_kib = 64

[roles.app]
listen = "127.0.0.1:0"
grants = [{grants_app}]
deadline_ms = 3000
memory_limit_mib = 32
"#
    )
}

/// The AppID and EncodingAESKey tests use (those of the safe-mode SDK vectors).
pub const APPID: &str = "wxb11529c136998cb6";
pub const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
pub const INTERNAL_SECRET: &str = "test-internal-secret-of-32-bytes!";
/// The admin listener's control token (`POST /admin/reload`).
pub const CONTROL_TOKEN: &str = "test-control-token-of-32-bytes-ok";

pub fn settings(database_url: Option<&str>) -> Settings {
    Settings {
        database_url: database_url.map(|u| u.to_string().into()),
        wechat_token: Some(TOKEN.to_string().into()),
        wechat_appid: Some(APPID.into()),
        wechat_aes_key: Some(AES_KEY.to_string().into()),
        internal_secret: Some(INTERNAL_SECRET.to_string().into()),
        control_token: Some(CONTROL_TOKEN.to_string().into()),
        ..Settings::default()
    }
}

pub async fn start_with(
    config: &TestConfig,
    roles: &[Role],
    settings: Settings,
    watch: bool,
) -> RunningServer {
    init_logging();
    server::start(ServeOptions { config_path: config.path(), roles: roles.to_vec(), settings, watch })
        .await
        .unwrap_or_else(|e| panic!("server did not start: {e:#}"))
}

pub async fn start(
    config: &TestConfig,
    roles: &[Role],
    database_url: Option<&str>,
    watch: bool,
) -> RunningServer {
    init_logging();
    server::start(ServeOptions {
        config_path: config.path(),
        roles: roles.to_vec(),
        settings: settings(database_url),
        watch,
    })
    .await
    .unwrap_or_else(|e| panic!("server did not start: {e:#}"))
}

pub fn url(server: &RunningServer, role: Role, path_and_query: &str) -> String {
    let addrs: &BTreeMap<Role, std::net::SocketAddr> = &server.role_addrs;
    format!("http://{}{path_and_query}", addrs[&role])
}

pub fn admin_url(server: &RunningServer, path: &str) -> String {
    format!("http://{}{path}", server.admin_addr)
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A signed server-verification query, as WeChat sends it.
pub fn verify_query(echostr: &str) -> String {
    let ts = unix_now().to_string();
    let nonce = "1234567";
    let signature = wxhost::wechat::sorted_sha1(&[TOKEN, &ts, nonce]);
    format!("/api/v1/auth/wechat/verify?signature={signature}&timestamp={ts}&nonce={nonce}&echostr={echostr}")
}

/// A call to the app role's internal API signed with the HMAC key, as the web
/// role makes it (or anyone holding INTERNAL_SECRET).
pub async fn signed_internal_call(
    app: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    use wxhost::internal_auth::{InternalAuth, SIGNATURE_HEADER, TIMESTAMP_HEADER};
    let body = body.to_string();
    let ts = unix_now().to_string();
    let sig = InternalAuth::new(INTERNAL_SECRET.to_string().into()).sign(method, path, &ts, body.as_bytes());
    let r = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("http://{app}{path}"))
        .header(TIMESTAMP_HEADER, ts)
        .header(SIGNATURE_HEADER, sig)
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

/// A database for one test, dropped afterwards (MariaDB) or deleted with its folder (SQLite).
pub struct TestDatabase {
    pub url: String,
    pub name: &'static str,
    _dir: Option<tempfile::TempDir>,
    mysql_drop: Option<(String, String)>,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some((server, db)) = self.mysql_drop.take() {
            // Best effort on a fresh runtime: the test's runtime may be gone.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut c) = sqlx::MySqlConnection::connect(&server).await {
                        let _ = sqlx::Executor::execute(
                            &mut c,
                            format!("DROP DATABASE IF EXISTS `{db}`").as_str(),
                        )
                        .await;
                    }
                    // The plugin database user the app role created for it.
                    let _ = wxhost::caps::db::mysql_user::drop_plugin_user(&server, &db).await;
                });
            })
            .join();
        }
    }
}

pub async fn sqlite_database() -> TestDatabase {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("wxhost.db").display());
    TestDatabase { url, name: "sqlite", _dir: Some(dir), mysql_drop: None }
}

/// The MariaDB server the tests use: WXHOST_TEST_MYSQL_URL, default the machine's
/// local MariaDB as root. It must be reachable: a missing database fails the test.
pub fn mysql_server_url() -> String {
    std::env::var("WXHOST_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

pub async fn mysql_database() -> TestDatabase {
    mysql_database_at(&mysql_server_url()).await
}

/// A fresh database on the MariaDB server at `server` (dropped with its plugin user).
pub async fn mysql_database_at(server: &str) -> TestDatabase {
    use sqlx::Connection;
    let server = server.to_string();
    let mut conn = sqlx::MySqlConnection::connect(&format!("{server}/mysql")).await.unwrap_or_else(|e| {
        panic!(
            "MariaDB/MySQL is required for the database tests and is not reachable at {server} ({e}). \
             Start it (bash .ci/run does) or point WXHOST_TEST_MYSQL_URL at one."
        )
    });
    let name = format!("wxhost_test_{:016x}", rand::random::<u64>());
    sqlx::Executor::execute(
        &mut conn,
        format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci").as_str(),
    )
    .await
    .expect("creating a test database");
    TestDatabase {
        url: format!("{server}/{name}"),
        name: "mariadb",
        _dir: None,
        mysql_drop: Some((format!("{server}/mysql"), name)),
    }
}

/// Both databases every database test runs against.
pub async fn all_databases() -> Vec<TestDatabase> {
    vec![sqlite_database().await, mysql_database().await]
}

/// Runs one statement with text arguments against a test database.
pub async fn db_exec(url: &str, sql: &str, args: &[&str]) {
    let db = wxhost::database::connect(url, &Default::default()).await.unwrap();
    wxhost::on_pool!(&db.pool, |p| {
        let mut q = sqlx::query(sql);
        for a in args {
            q = q.bind(*a);
        }
        q.execute(p).await.map(|_| ())
    })
    .unwrap();
}

/// The single integer a query answers (a COUNT, say).
pub async fn db_count(url: &str, sql: &str) -> i64 {
    let db = wxhost::database::connect(url, &Default::default()).await.unwrap();
    wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar(sql).fetch_one(p).await).unwrap()
}

/// Makes sure the programs a test drives are installed: each `(program, Debian
/// package)` missing from PATH and /usr/sbin is installed with apt-get (as
/// `.ci/run` does), so `cargo test` alone sets a Debian machine up. Fails, never
/// skips, when that is not possible.
pub fn require_programs(programs: &[(&str, &str)]) {
    let present = |program: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {program} || test -x /usr/sbin/{program}")])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<&str> = programs.iter().filter(|(p, _)| !present(p)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return;
    }
    let installed = std::process::Command::new("sh")
        .args(["-c", &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {}", missing.join(" "))])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed,
        "this test needs the Debian packages {missing:?}; installing them failed (see .ci/run)"
    );
    for (program, package) in programs {
        assert!(present(program), "{program} is still missing after installing {package}");
    }
}

/// A capability call's result as the plugin sees it, for tests that call a
/// capability directly: its WIT error, or a failed test if the host trapped
/// (a trap is a host bug).
pub fn plain<T, E>(result: Result<T, wxhost::bindings::CapabilityError<E>>) -> Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    result.map_err(|e| e.downcast().expect("a WIT error, not a trap"))
}
