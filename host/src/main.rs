use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use secrecy::ExposeSecret;
use tokio::signal::unix::{SignalKind, signal};

use wxhost::config::{self, Role};
use wxhost::settings::Settings;
use wxhost::{check, database, server};

/// WeChat backend host running sandboxed wasm handler plugins.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "WXHOST_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one role, or both in one process (each on its own listener).
    Serve {
        #[arg(long, value_enum, default_value = "all")]
        role: RoleArg,
        #[arg(long, default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Do not watch plugins.toml and the plugins for changes (SIGHUP and the admin API still reload).
        #[arg(long)]
        no_watch: bool,
    },
    /// Load every plugin against its role's grants and report; exit 1 if any is refused.
    Check {
        #[arg(long, default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Apply the database migrations to DATABASE_URL (default: the SQLite file under ./data).
    Migrate,
    /// Development: the web role, the app role and the WeChat simulator together,
    /// on the SQLite default, with generated secrets kept in data/dev.env.
    Dev {
        #[arg(long, default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, default_value = "127.0.0.1:9300")]
        sim_listen: std::net::SocketAddr,
    },
    /// Start something new in this workspace.
    New {
        #[command(subcommand)]
        what: NewCommand,
    },
    /// WeChat simulator: serve it, or drive a running one.
    Sim {
        #[command(subcommand)]
        command: SimCommand,
    },
}

#[derive(Subcommand)]
enum NewCommand {
    /// A plugin crate on the guest SDK with one example route and its test,
    /// added to the workspace (so the build compiles it to plugins/dist/NAME.wasm)
    /// and to plugins.toml.
    Plugin {
        /// Crate and plugin name: a-z, 0-9 and -.
        name: String,
        /// The role that serves it: web (WeChat's callbacks, no database) or app.
        #[arg(long, value_enum)]
        role: PluginRole,
        #[arg(long, default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PluginRole {
    Web,
    App,
}

#[derive(Subcommand)]
enum SimCommand {
    /// Play api.weixin.qq.com on loopback, with WECHAT_APPID, WECHAT_APPSECRET,
    /// WECHAT_TOKEN and WECHAT_AES_KEY as the simulated account's settings.
    Serve {
        #[arg(long, default_value = "127.0.0.1:9300")]
        listen: std::net::SocketAddr,
        /// The web role, where scans are pushed.
        #[arg(long, default_value = "http://127.0.0.1:8081")]
        web_url: String,
        /// Lifetime of issued access tokens, in seconds.
        #[arg(long, default_value_t = 7200)]
        token_ttl: u64,
        /// Play WeChat Pay too: the merchant's public key (PEM). The merchant's
        /// ids and keys come from the WECHATPAY_* settings.
        #[arg(long, requires = "platform_private_key")]
        merchant_public_key: Option<PathBuf>,
        /// The platform private key WeChat Pay signs answers and notifies with
        /// (its public key is the merchant's WECHATPAY_PLATFORM_PUBLIC_KEY).
        #[arg(long, requires = "merchant_public_key")]
        platform_private_key: Option<PathBuf>,
        /// Scale of WeChat Pay's notify retry schedule (1 = real: 15 s, 15 s, 30 s, 3 min, …).
        #[arg(long, default_value_t = 1.0)]
        notify_retry_scale: f64,
    },
    /// WeChat Pay: the payer pays an order, and the simulator sends the signed notify.
    Pay {
        #[arg(long, default_value = "http://127.0.0.1:9300")]
        sim_url: String,
        #[arg(long)]
        out_trade_no: String,
        /// The test user who pays (must be the order's payer); default: the payer.
        #[arg(long)]
        user: Option<String>,
    },
    /// WeChat Pay: send a paid order's notify again, N copies at once (duplicates).
    Notify {
        #[arg(long, default_value = "http://127.0.0.1:9300")]
        sim_url: String,
        #[arg(long)]
        out_trade_no: String,
        #[arg(long, default_value_t = 1)]
        times: usize,
    },
    /// Make development key pairs (merchant_key.pem/_pub.pem, platform_key.pem/_pub.pem) in DIR.
    Keys {
        #[arg(long, default_value = "data/dev-keys")]
        dir: PathBuf,
    },
    /// Scan a QR code as a test user: the simulator pushes the event to the web role.
    Scan {
        #[arg(long, default_value = "http://127.0.0.1:9300")]
        sim_url: String,
        /// The QR code's ticket (or use --scene).
        #[arg(long)]
        ticket: Option<String>,
        #[arg(long)]
        scene: Option<String>,
        #[arg(long, default_value = "alice")]
        user: String,
        /// The user already follows the account (a SCAN event instead of subscribe).
        #[arg(long)]
        subscribed: bool,
        /// Push in plaintext mode even though the simulator has an EncodingAESKey
        /// (with one, it pushes in safe mode, as WeChat does).
        #[arg(long)]
        plaintext: bool,
    },
    /// Issue a web-authorization code for a test user.
    Code {
        #[arg(long, default_value = "http://127.0.0.1:9300")]
        sim_url: String,
        #[arg(long, default_value = "alice")]
        user: String,
        #[arg(long, default_value = "snsapi_userinfo")]
        scope: String,
    },
    /// Make every access token invalid (as another server calling cgi-bin/token would).
    Invalidate {
        #[arg(long, default_value = "http://127.0.0.1:9300")]
        sim_url: String,
    },
    /// Make every access token expire now (WeChat then answers 42001).
    Expire {
        #[arg(long, default_value = "http://127.0.0.1:9300")]
        sim_url: String,
    },
    /// Counters: tokens issued, API calls.
    Stats {
        #[arg(long, default_value = "http://127.0.0.1:9300")]
        sim_url: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Web,
    App,
    All,
}

impl RoleArg {
    fn roles(self) -> Vec<Role> {
        match self {
            RoleArg::Web => vec![Role::Web],
            RoleArg::App => vec![Role::App],
            RoleArg::All => vec![Role::Web, Role::App],
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check { config } => {
            let config = config::load(&config)?;
            let ok = check::run(&config, &mut std::io::stdout().lock())?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Migrate => {
            let settings = Settings::from_env()?;
            let url = settings.database_url.as_ref().map(|u| u.expose_secret().to_string());
            let url = url.as_deref().unwrap_or(database::DEFAULT_URL);
            let db = database::connect(url, &Default::default()).await?;
            database::migrate(&db).await?;
            println!("migrations applied ({:?})", db.dialect());
            // Creates or updates the plugin database user (MySQL) and checks the confinement.
            let plugin_url = settings.plugin_database_url.as_ref().map(|u| u.expose_secret());
            let plugins = wxhost::caps::db::DbCtx::open(&db, url, plugin_url, &Default::default()).await?;
            println!("plugin SQL confined {}", plugins.confinement);
            Ok(ExitCode::SUCCESS)
        }
        Command::Sim { command } => sim(command).await,
        Command::Dev { config, sim_listen } => dev(config, sim_listen).await,
        Command::New { what: NewCommand::Plugin { name, role, config } } => {
            let role = match role {
                PluginRole::Web => Role::Web,
                PluginRole::App => Role::App,
            };
            let made = wxhost::scaffold::new_plugin(&config, &name, role)?;
            println!("plugin `{name}` ({role} role) written to {}", made.crate_dir.display());
            println!("  route: GET {}  (plugins.toml and src/lib.rs)", made.route);
            println!("  the next `cargo build` or `cargo run -- dev` compiles it to {}", made.wasm);
            println!("  a running `wxhost dev` loads it when the build writes it");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { role, config, no_watch } => {
            let options = server::ServeOptions {
                config_path: config,
                roles: role.roles(),
                settings: Settings::from_env()?,
                watch: !no_watch,
            };
            let running = server::start(options).await?;
            let host = running.host.clone();
            let shutdown = running.shutdown_token();
            let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
            let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    host.reload("SIGHUP").await;
                }
            });
            tokio::spawn(async move {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                tracing::info!("shutting down: no new connections, draining in-flight requests");
                shutdown.cancel();
            });
            running.wait().await;
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Where `wxhost dev` keeps the secrets it generates, so restarts keep sessions.
const DEV_SECRETS: &str = "data/dev.env";
/// Where `wxhost dev` keeps the merchant and platform key pairs it makes.
const DEV_KEYS: &str = "data/dev-keys";

async fn dev(config_path: PathBuf, sim_listen: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    let config = config::load(&config_path)?;
    let dev = dev_secrets(std::path::Path::new(DEV_SECRETS))?;
    let mut settings = Settings::from_env()?;
    let pick = |set: &mut Option<secrecy::SecretString>, key: &str| {
        if set.is_none() {
            *set = dev.get(key).map(|v| v.clone().into());
        }
    };
    pick(&mut settings.wechat_token, "WECHAT_TOKEN");
    pick(&mut settings.wechat_aes_key, "WECHAT_AES_KEY");
    pick(&mut settings.wechat_appsecret, "WECHAT_APPSECRET");
    pick(&mut settings.internal_secret, "INTERNAL_SECRET");
    pick(&mut settings.admin_token, "WXHOST_ADMIN_TOKEN");
    pick(&mut settings.control_token, "WXHOST_CONTROL_TOKEN");
    pick(&mut settings.wechatpay_apiv3_key, "WECHATPAY_APIV3_KEY");
    settings.wechat_appid.get_or_insert_with(|| "wxdev00000000000a".into());
    let roles = [Role::Web, Role::App];
    let listen = |role: Role, over: Option<std::net::SocketAddr>| {
        over.or_else(|| config.roles.get(&role).map(|r| r.listen))
            .ok_or_else(|| anyhow::anyhow!("no [roles.{role}]"))
    };
    let (web, app) = (listen(Role::Web, settings.web_listen)?, listen(Role::App, settings.app_listen)?);
    settings.app_internal_url.get_or_insert_with(|| format!("http://{app}"));
    settings.wechat_api_base.get_or_insert_with(|| format!("http://{sim_listen}"));
    settings.wechat_qrcode_base.get_or_insert_with(|| format!("http://{sim_listen}/cgi-bin/showqrcode"));
    settings
        .wechat_oauth_authorize_url
        .get_or_insert_with(|| format!("http://{sim_listen}/connect/oauth2/authorize"));
    settings.dev_simulator_url.get_or_insert_with(|| format!("http://{sim_listen}"));
    // WeChat Pay against the simulator, with key pairs made once under data/dev-keys.
    let keys = std::path::Path::new(DEV_KEYS);
    let (merchant_key, merchant_pub) = wxhost::sim::pay::ensure_key_pair(keys, "merchant")?;
    let (platform_key, platform_pub) = wxhost::sim::pay::ensure_key_pair(keys, "platform")?;
    settings.wechatpay_mchid.get_or_insert_with(|| "1900000109".into());
    settings.wechatpay_serial.get_or_insert_with(|| "5157F09EFDC096DE15EBE81A47057A72DE000001".into());
    settings.wechatpay_private_key.get_or_insert(merchant_key);
    settings.wechatpay_platform_public_key.get_or_insert(platform_pub);
    settings
        .wechatpay_public_key_id
        .get_or_insert_with(|| "PUB_KEY_ID_0119000001092025112500000000000001".into());
    settings.wechatpay_api_base.get_or_insert_with(|| format!("http://{sim_listen}"));
    settings.wechatpay_notify_url.get_or_insert_with(|| format!("http://{web}/api/v1/payment/notify"));

    let sim_config = wxhost::sim::SimConfig {
        appid: settings.wechat_appid.clone().unwrap_or_default(),
        secret: settings.wechat_appsecret.as_ref().map(|s| s.expose_secret().to_string()).unwrap_or_default(),
        token: settings.wechat_token.as_ref().map(|s| s.expose_secret().to_string()).unwrap_or_default(),
        aes_key: settings.wechat_aes_key.as_ref().map(|s| s.expose_secret().to_string()),
        web_url: Some(format!("http://{web}")),
        token_ttl: std::time::Duration::from_secs(7200),
    };
    // Retries 10x faster than WeChat Pay's (15 s becomes 1.5 s).
    let pay = wxhost::sim::SimPayConfig::from_settings(&settings, &merchant_pub, &platform_key, 0.1)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (sim_addr, sim_task) =
        wxhost::sim::Sim::new(sim_config).with_pay(pay).serve(sim_listen, shutdown.clone()).await?;
    let admin = settings.admin_token.as_ref().map(|s| s.expose_secret().to_string()).unwrap_or_default();
    let running = server::start(server::ServeOptions {
        config_path: config_path.clone(),
        roles: roles.to_vec(),
        settings,
        watch: true,
    })
    .await?;
    let app = running.role_addrs[&Role::App];
    let exe = std::env::args().next().unwrap_or_else(|| "wxhost".into());
    println!(
        r#"
Member pages: http://{app}/   (QR login, quota, buy with simulated WeChat Pay)

wxhost dev: web role http://{web}, app role http://{app}, WeChat simulator http://{sim_addr}
secrets: {DEV_SECRETS} and {DEV_KEYS}/ (generated; delete them to make new ones)

QR-code login:
  curl -s -X POST http://{app}/api/v1/auth/wechat/qrcode            # -> scene, ticket, qrcode_url
  {exe} sim scan --sim-url http://{sim_addr} --ticket TICKET --user alice
  curl -s http://{app}/api/v1/auth/wechat/qrcode/SCENE              # -> status scanned, token
  curl -s -H "Authorization: Bearer TOKEN" http://{app}/api/v1/user/me

Web authorization (OAuth):
  {exe} sim code --sim-url http://{sim_addr} --user bob                 # -> code
  curl -s "http://{app}/api/v1/auth/wechat?code=CODE"

Buy (with the token from a login):
  curl -s http://{app}/api/v1/payment/products
  curl -s -X POST -H "Authorization: Bearer TOKEN" http://{app}/api/v1/payment/create-order -d '{{"product_id":"p10"}}'
  {exe} sim pay --sim-url http://{sim_addr} --out-trade-no OUT_TRADE_NO    # WeChat Pay pays and notifies
  curl -s -H "Authorization: Bearer TOKEN" http://{app}/api/v1/user/orders/OUT_TRADE_NO

Menu (admin credential from {DEV_SECRETS}: {admin}):
  curl -s -X POST -H "Authorization: Bearer {admin}" http://{app}/api/v1/auth/wechat/create-menu        -d '{{"button":[{{"type":"click","name":"帮助","key":"MENU_HELP"}}]}}'

Edit a plugin and run `cargo build`: the server swaps it in. Ctrl-C stops everything.
"#
    );
    let stop = running.shutdown_token();
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    stop.cancel();
    shutdown.cancel();
    running.wait().await;
    let _ = sim_task.await;
    Ok(ExitCode::SUCCESS)
}

/// Reads data/dev.env, creating it (or adding what an older one lacks) with
/// fresh random secrets.
fn dev_secrets(path: &std::path::Path) -> anyhow::Result<std::collections::HashMap<String, String>> {
    use base64::Engine as _;
    fn random(n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        rand::fill(&mut b[..]);
        b
    }
    /// A setting's name and how to make a fresh value for it.
    type Generator = (&'static str, fn() -> String);
    let generators: [Generator; 7] = [
        ("WECHAT_TOKEN", || hex::encode(random(16))),
        ("WECHAT_AES_KEY", || {
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(random(32))[..43].to_string()
        }),
        ("WECHAT_APPSECRET", || hex::encode(random(16))),
        ("INTERNAL_SECRET", || hex::encode(random(32))),
        ("WXHOST_ADMIN_TOKEN", || hex::encode(random(32))),
        ("WXHOST_CONTROL_TOKEN", || hex::encode(random(32))),
        // The APIv3 key is 32 characters.
        ("WECHATPAY_APIV3_KEY", || hex::encode(random(16))),
    ];
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = if path.exists() {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    } else {
        "# Generated by `wxhost dev` for local development only.\n".to_string()
    };
    let parse = |text: &str| -> std::collections::HashMap<String, String> {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    };
    let present = parse(&text);
    let missing: Vec<_> = generators.iter().filter(|(k, _)| !present.contains_key(*k)).collect();
    if !missing.is_empty() {
        for (key, generate) in missing {
            text.push_str(&format!("{key}={}\n", generate()));
        }
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    }
    Ok(parse(&text))
}

async fn sim(command: SimCommand) -> anyhow::Result<ExitCode> {
    let control = |sim_url: &str, path: &str, body: serde_json::Value| {
        let url = format!("{}{path}", sim_url.trim_end_matches('/'));
        async move {
            let response = reqwest::Client::new().post(url).json(&body).send().await?;
            let text = response.text().await?;
            println!("{text}");
            Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
        }
    };
    match command {
        SimCommand::Serve {
            listen,
            web_url,
            token_ttl,
            merchant_public_key,
            platform_private_key,
            notify_retry_scale,
        } => {
            let settings = Settings::from_env()?;
            let config = wxhost::sim::SimConfig {
                appid: settings.wechat_appid.clone().unwrap_or_else(|| "wx0000000000000000".into()),
                secret: settings
                    .wechat_appsecret
                    .as_ref()
                    .map(|s| s.expose_secret().to_string())
                    .unwrap_or_default(),
                token: settings
                    .wechat_token
                    .as_ref()
                    .map(|s| s.expose_secret().to_string())
                    .unwrap_or_default(),
                aes_key: settings.wechat_aes_key.as_ref().map(|s| s.expose_secret().to_string()),
                web_url: Some(web_url.trim_end_matches('/').to_string()),
                token_ttl: std::time::Duration::from_secs(token_ttl),
            };
            let mut sim = wxhost::sim::Sim::new(config);
            if let (Some(merchant), Some(platform)) = (merchant_public_key, platform_private_key) {
                sim = sim.with_pay(wxhost::sim::SimPayConfig::from_settings(
                    &settings,
                    &merchant,
                    &platform,
                    notify_retry_scale,
                )?);
            }
            let shutdown = tokio_util::sync::CancellationToken::new();
            let (addr, task) = sim.serve(listen, shutdown.clone()).await?;
            println!("WeChat simulator on http://{addr} (set WECHAT_API_BASE=http://{addr})");
            let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            shutdown.cancel();
            let _ = task.await;
            Ok(ExitCode::SUCCESS)
        }
        SimCommand::Scan { sim_url, ticket, scene, user, subscribed, plaintext } => {
            // Unset: the simulator's own mode (safe with an EncodingAESKey).
            let safe_mode = if plaintext { Some(false) } else { None };
            let body = serde_json::json!({ "ticket": ticket, "scene": scene, "user": user, "subscribed": subscribed, "safe_mode": safe_mode });
            control(&sim_url, "/sim/scan", body).await
        }
        SimCommand::Code { sim_url, user, scope } => {
            control(&sim_url, "/sim/oauth/code", serde_json::json!({ "name": user, "scope": scope })).await
        }
        SimCommand::Pay { sim_url, out_trade_no, user } => {
            control(&sim_url, "/sim/pay", serde_json::json!({ "out_trade_no": out_trade_no, "user": user }))
                .await
        }
        SimCommand::Notify { sim_url, out_trade_no, times } => {
            control(
                &sim_url,
                "/sim/pay/notify",
                serde_json::json!({ "out_trade_no": out_trade_no, "times": times }),
            )
            .await
        }
        SimCommand::Keys { dir } => {
            for name in ["merchant", "platform"] {
                let (private, public) = wxhost::sim::pay::ensure_key_pair(&dir, name)?;
                println!("{}\n{}", private.display(), public.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        SimCommand::Invalidate { sim_url } => {
            control(&sim_url, "/sim/tokens/invalidate", serde_json::json!({})).await
        }
        SimCommand::Expire { sim_url } => {
            control(&sim_url, "/sim/tokens/expire", serde_json::json!({})).await
        }
        SimCommand::Stats { sim_url } => {
            let text =
                reqwest::get(format!("{}/sim/stats", sim_url.trim_end_matches('/'))).await?.text().await?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,wasmtime=warn,cranelift=warn")
    });
    // Colours only for a person at a terminal, never in files or journald.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
