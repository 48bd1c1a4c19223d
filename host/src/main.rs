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
            let db = database::connect(url.as_deref().unwrap_or(database::DEFAULT_URL), &Default::default())
                .await?;
            database::migrate(&db).await?;
            println!("migrations applied ({:?})", db.dialect());
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,wasmtime=warn,cranelift=warn")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
