//! The whole product on loopback, wired as the test kit's stack wires it
//! (and as production runs it): the WeChat simulator with WeChat Pay, a web
//! role (verify, notify) and an app role (internal, account, payment, quota) as two
//! servers, the web role reaching the app role over HTTP with HMAC-signed
//! internal calls; the app role owning a fresh database (a SQLite file in a
//! temporary folder, or a MariaDB database created for the run and dropped).
//!
//! The configuration is the shipped plugins.toml, with the plugins copied into
//! a temporary folder (so the hot-swap row can replace them) and every
//! listener on an ephemeral loopback port.

use std::time::Duration;

use anyhow::Context;
use wxhost::config::Role;
use wxhost::server::{RunningServer, ServeOptions, start};
use wxhost::settings::Settings;
use wxhost::sim::{Sim, SimConfig, SimPayConfig};
pub use wxhost_testkit::TestDatabase;

// The test kit's account, merchant and keys (WeChat Pay's own SDK test keys).
pub use wxhost_testkit::stack::{APIV3_KEY, APPSECRET, MCHID, PUB_KEY_ID};
use wxhost_testkit::stack::{notify_keys, on_simulator, with_merchant};
pub use wxhost_testkit::{APPID, INTERNAL_SECRET, TOKEN};
pub use wxhost_testkit::{dist, fixture, root};

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

    /// A fresh database of this kind for one run (the test kit's: removed, or
    /// dropped with its plugin user, afterwards). MariaDB: BENCH_MYSQL_URL, else
    /// the tests' WXHOST_TEST_MYSQL_URL, else local root.
    pub async fn database(self) -> TestDatabase {
        match self {
            Kind::Sqlite => wxhost_testkit::sqlite_database().await,
            Kind::Mariadb => {
                let server =
                    std::env::var("BENCH_MYSQL_URL").unwrap_or_else(|_| wxhost_testkit::mysql_server_url());
                wxhost_testkit::mysql_database_at(&server).await
            }
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

/// The plugins the shipped plugins.toml names, as files of plugins/dist.
fn shipped_plugins() -> anyhow::Result<Vec<String>> {
    let config = wxhost::config::load(&root().join("plugins.toml"))
        .map_err(|e| anyhow::anyhow!("the shipped plugins.toml: {}", e.problems.join("; ")))?;
    Ok(config
        .plugins
        .iter()
        .filter_map(|p| p.wasm.file_name().map(|f| f.to_string_lossy().into_owned()))
        .collect())
}

pub struct Product {
    pub dir: tempfile::TempDir,
    pub web: RunningServer,
    pub app: RunningServer,
    pub web_url: String,
    /// The app role, where the business service consumes quota.
    pub app_url: String,
    stop_sim: tokio_util::sync::CancellationToken,
}

/// The business service the bench plays, and its key (WXHOST_SERVICE_KEYS).
pub const SERVICE_KEY: &str = "bench-service-key-0123456789abcdef0123456789abcdef";

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
        for p in shipped_plugins()? {
            std::fs::copy(dist(&p), dir.path().join(&p)).with_context(|| {
                format!("copying {} (built by the host's build script)", dist(&p).display())
            })?;
        }
        let config_path = dir.path().join("plugins.toml");
        std::fs::write(&config_path, config_text()?)?;

        let mut merchant = with_merchant(base_settings());
        merchant.database_url = Some(database_url.to_string().into());

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
        let mut web_settings = notify_keys(&merchant, base_settings());
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
        let mut app_settings = on_simulator(merchant, sim_addr, &web_url);
        app_settings.app_listen = Some(app_addr);
        app_settings.service_keys = Some(format!("bench={SERVICE_KEY}").into());
        let app =
            start(ServeOptions { config_path, roles: vec![Role::App], settings: app_settings, watch: false })
                .await
                .context("starting the app role")?;
        let app_url = format!("http://{app_addr}");
        Ok(Product { dir, web, app, web_url, app_url, stop_sim })
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
