//! The whole product on loopback, wired as host/tests/common/stack.rs wires it
//! (and as production runs it): the WeChat simulator with WeChat Pay, a web
//! role (verify, notify) and an app role (internal, account, payment) as two
//! servers, the web role reaching the app role over HTTP with HMAC-signed
//! internal calls; the app role owning a fresh database (a SQLite file in a
//! temporary folder, or a MariaDB database created for the run and dropped).
//!
//! The configuration is the shipped plugins.toml, with the plugins copied into
//! a temporary folder (so the hot-swap row can replace them) and every
//! listener on an ephemeral loopback port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use wxhost::config::Role;
use wxhost::server::{RunningServer, ServeOptions, start};
use wxhost::settings::Settings;
use wxhost::sim::{Sim, SimConfig, SimPayConfig};

pub const TOKEN: &str = "bench-token";
pub const APPID: &str = "wxb11529c136998cb6";
pub const APPSECRET: &str = "bench-app-secret";
pub const INTERNAL_SECRET: &str = "bench-internal-secret-of-32-bytes";
pub const MCHID: &str = "1900000109";
/// The APIv3 key of WeChat Pay's own SDK tests (as the host's tests use it).
pub const APIV3_KEY: &str = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";
pub const PUB_KEY_ID: &str = "PUB_KEY_ID_0114232134912410000000000000000000";
pub const MERCHANT_SERIAL: &str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A key of the host's test fixtures.
pub fn fixture(file: &str) -> PathBuf {
    root().join("host/tests/fixtures").join(file)
}

/// A compiled plugin in plugins/dist (built by the host's build script).
pub fn dist(file: &str) -> PathBuf {
    root().join("plugins/dist").join(file)
}

/// Which database the app role owns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Sqlite,
    Mariadb,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sqlite => "SQLite",
            Kind::Mariadb => "MariaDB",
        }
    }
}

/// A database for one run: deleted with its folder (SQLite) or dropped (MariaDB).
pub struct BenchDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    mysql_drop: Option<(String, String)>,
}

/// The MariaDB server: BENCH_MYSQL_URL, else WXHOST_TEST_MYSQL_URL, else local root.
pub fn mysql_server_url() -> String {
    std::env::var("BENCH_MYSQL_URL")
        .or_else(|_| std::env::var("WXHOST_TEST_MYSQL_URL"))
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

impl BenchDb {
    pub async fn create(kind: Kind) -> anyhow::Result<BenchDb> {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("wxhost.db").display());
                Ok(BenchDb { url, _dir: Some(dir), mysql_drop: None })
            }
            Kind::Mariadb => {
                use sqlx::Connection;
                let server = mysql_server_url();
                let admin = format!("{server}/mysql");
                let mut conn = sqlx::MySqlConnection::connect(&admin)
                    .await
                    .with_context(|| format!("MariaDB is not reachable at {server} (set BENCH_MYSQL_URL)"))?;
                let name = format!("wxhost_bench_{}", std::process::id());
                sqlx::Executor::execute(&mut conn, format!("DROP DATABASE IF EXISTS `{name}`").as_str())
                    .await?;
                sqlx::Executor::execute(
                    &mut conn,
                    format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
                        .as_str(),
                )
                .await
                .context("creating the bench database")?;
                let _ = conn.close().await;
                Ok(BenchDb { url: format!("{server}/{name}"), _dir: None, mysql_drop: Some((admin, name)) })
            }
        }
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.mysql_drop.take() {
            // On a thread of its own: this may run inside the bench's runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                rt.block_on(async {
                    use sqlx::Connection;
                    let mut c = sqlx::MySqlConnection::connect(&admin).await.ok()?;
                    sqlx::Executor::execute(&mut c, format!("DROP DATABASE IF EXISTS `{name}`").as_str())
                        .await
                        .ok()
                })
            })
            .join();
        }
    }
}

/// The shipped plugins.toml, pointed at copies of the plugins in `dir`.
fn config_text() -> anyhow::Result<String> {
    let shipped = root().join("plugins.toml");
    let text = std::fs::read_to_string(&shipped).with_context(|| format!("reading {}", shipped.display()))?;
    let frontend = root().join("frontend");
    Ok(text
        .replace("wasm = \"plugins/dist/", "wasm = \"")
        .replace("root = \"frontend\"", &format!("root = {:?}", frontend.display().to_string())))
}

/// The plugins plugins.toml names (copied from plugins/dist).
const PLUGINS: &[&str] = &["verify.wasm", "notify.wasm", "internal.wasm", "account.wasm", "payment.wasm"];

pub struct Product {
    pub dir: tempfile::TempDir,
    pub web: RunningServer,
    pub app: RunningServer,
    pub web_url: String,
    stop_sim: tokio_util::sync::CancellationToken,
}

fn base_settings() -> Settings {
    Settings {
        wechat_token: Some(TOKEN.to_string().into()),
        wechat_appid: Some(APPID.into()),
        internal_secret: Some(INTERNAL_SECRET.to_string().into()),
        admin_listen: Some("127.0.0.1:0".parse().expect("an address")),
        ..Settings::default()
    }
}

impl Product {
    pub async fn start(database_url: &str) -> anyhow::Result<Product> {
        let dir = tempfile::tempdir()?;
        for p in PLUGINS {
            std::fs::copy(dist(p), dir.path().join(p)).with_context(|| {
                format!("copying {} (built by the host's build script)", dist(p).display())
            })?;
        }
        let config_path = dir.path().join("plugins.toml");
        std::fs::write(&config_path, config_text()?)?;

        let mut merchant = base_settings();
        merchant.database_url = Some(database_url.to_string().into());
        merchant.wechatpay_mchid = Some(MCHID.into());
        merchant.wechatpay_serial = Some(MERCHANT_SERIAL.into());
        merchant.wechatpay_private_key = Some(fixture("merchant_test_key.pem"));
        merchant.wechatpay_platform_public_key = Some(fixture("wechatpay_platform_test_pub.pem"));
        merchant.wechatpay_public_key_id = Some(PUB_KEY_ID.into());
        merchant.wechatpay_apiv3_key = Some(APIV3_KEY.to_string().into());

        let pay = SimPayConfig::from_settings(
            &merchant,
            &fixture("merchant_test_pub.pem"),
            &fixture("wechatpay_platform_test_key.pem"),
            1.0,
        )?;
        let sim = Sim::new(SimConfig {
            appid: APPID.into(),
            secret: APPSECRET.into(),
            token: TOKEN.into(),
            // A plaintext-mode account: no EncodingAESKey (row 3 pushes in plaintext).
            aes_key: None,
            web_url: None,
            token_ttl: Duration::from_secs(7200),
        })
        .with_pay(pay);
        let stop_sim = tokio_util::sync::CancellationToken::new();
        let (sim_addr, _) = sim.serve("127.0.0.1:0".parse()?, stop_sim.clone()).await?;

        // The web role first (WeChat Pay must know where to send notifies), told
        // the address the app role is about to take.
        let app_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut web_settings = base_settings();
        web_settings.wechatpay_apiv3_key = merchant.wechatpay_apiv3_key.clone();
        web_settings.wechatpay_platform_public_key = merchant.wechatpay_platform_public_key.clone();
        web_settings.wechatpay_public_key_id = merchant.wechatpay_public_key_id.clone();
        web_settings.app_internal_url = Some(format!("http://{app_addr}"));
        web_settings.web_listen = Some("127.0.0.1:0".parse()?);
        let web = start(ServeOptions {
            config_path: config_path.clone(),
            roles: vec![Role::Web],
            settings: web_settings,
            watch: false,
        })
        .await
        .context("starting the web role")?;
        let web_url = format!("http://{}", web.role_addrs[&Role::Web]);
        sim.set_web_url(&web_url);

        // Each role gets only its own secrets, as in production (the app role
        // holds the token too: it verifies every push again).
        let mut app_settings = merchant;
        app_settings.wechat_appsecret = Some(APPSECRET.to_string().into());
        app_settings.wechat_api_base = Some(format!("http://{sim_addr}"));
        app_settings.wechat_qrcode_base = Some(format!("http://{sim_addr}/cgi-bin/showqrcode"));
        app_settings.wechat_oauth_authorize_url = Some(format!("http://{sim_addr}/connect/oauth2/authorize"));
        app_settings.wechatpay_api_base = Some(format!("http://{sim_addr}"));
        app_settings.wechatpay_notify_url = Some(format!("{web_url}/api/v1/payment/notify"));
        app_settings.app_listen = Some(app_addr);
        let app =
            start(ServeOptions { config_path, roles: vec![Role::App], settings: app_settings, watch: false })
                .await
                .context("starting the app role")?;
        Ok(Product { dir, web, app, web_url, stop_sim })
    }

    /// Stops both roles (draining) and the simulator.
    pub async fn shutdown(self) {
        self.web.shutdown();
        self.app.shutdown();
        self.web.wait().await;
        self.app.wait().await;
        self.stop_sim.cancel();
    }
}

/// A connection of the bench's own to the app role's database (set-up and checks).
pub async fn connect(url: &str) -> anyhow::Result<wxhost::database::Database> {
    wxhost::database::connect(url, &Default::default()).await
}

/// The single integer a query answers.
pub async fn count(db: &wxhost::database::Database, sql: &str) -> anyhow::Result<i64> {
    Ok(wxhost::on_pool!(&db.pool, |p| sqlx::query_scalar::<_, i64>(sql).fetch_one(p).await)?)
}
