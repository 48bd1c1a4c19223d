//! The command line: every subcommand and its options.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use wxhost::config::{self, Role};

/// WeChat backend host running sandboxed wasm handler plugins.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "WXHOST_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Check that every user's quota equals the sum of their ledger; exit 1
    /// listing the differences if not.
    Audit {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hold a day's orders and refunds against WeChat Pay's trade bill: a
    /// payment there that is not paid here is credited (as its notify would
    /// have been), every other difference reported. Prints a summary and
    /// writes a JSON report; exit 1 on any discrepancy, 2 if the day could not
    /// be reconciled (no bill yet, a bill that fails its hash, WeChat Pay down).
    Reconcile {
        /// The day, YYYY-MM-DD in China Standard Time (WeChat Pay writes a
        /// day's bill the next morning). Default: yesterday.
        #[arg(long)]
        date: Option<String>,
        #[arg(long, default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Folder of the JSON reports (reconcile-DATE.json).
        #[arg(long, default_value = "data/reconcile")]
        report_dir: PathBuf,
    },
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
pub enum NewCommand {
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
pub enum PluginRole {
    Web,
    App,
}

#[derive(Subcommand)]
pub enum SimCommand {
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
        #[arg(long, required_unless_present = "code_url", conflicts_with = "code_url")]
        out_trade_no: Option<String>,
        /// A Native order's QR code content (`weixin://wxpay/bizpayurl?pr=…`), as a scan reads it.
        #[arg(long)]
        code_url: Option<String>,
        /// The test user who pays (a JSAPI order's payer; anyone for Native and H5).
        #[arg(long)]
        user: Option<String>,
        /// The money is taken but the notify never arrives (nor its retries):
        /// only a query or `wxhost reconcile` finds the payment.
        #[arg(long)]
        lose_notify: bool,
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
pub enum RoleArg {
    Web,
    App,
    All,
}

impl RoleArg {
    pub fn roles(self) -> Vec<Role> {
        match self {
            RoleArg::Web => vec![Role::Web],
            RoleArg::App => vec![Role::App],
            RoleArg::All => vec![Role::Web, Role::App],
        }
    }
}
