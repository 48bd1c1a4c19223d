mod cli;
mod dev;
mod sim;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser as _;
use secrecy::ExposeSecret;
use tokio::signal::unix::{SignalKind, signal};

use wxhost::config::{self, Role};

use cli::{Cli, Command, LogFormat, NewCommand, PluginRole};
use wxhost::settings::Settings;
use wxhost::{check, database, server};

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
        Command::Audit { json } => {
            let settings = Settings::from_env()?;
            let url = settings.database_url.as_ref().map(|u| u.expose_secret().to_string());
            let db = database::connect(url.as_deref().unwrap_or(database::DEFAULT_URL), &Default::default())
                .await?;
            let audit = wxhost::audit::quota(&db).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&audit)?);
            } else if audit.differences.is_empty() {
                println!("{} users: every balance equals its ledger", audit.users);
            } else {
                println!("{} users, {} differ from their ledger:", audit.users, audit.differences.len());
                for d in &audit.differences {
                    let balance = d.balance.map_or("no such user".to_string(), |b| b.to_string());
                    let last = d.last_balance_after.map_or("-".to_string(), |b| b.to_string());
                    println!(
                        "  {}: balance {balance}, ledger sum {}, last balance_after {last}",
                        d.openid, d.ledger_sum
                    );
                }
            }
            Ok(if audit.differences.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Reconcile { date, config, report_dir } => {
            let date = date.unwrap_or_else(wxhost::reconcile::yesterday);
            // Exit 1 is kept for discrepancies: anything that stops the run is 2.
            Ok(reconcile(&date, &config, &report_dir).await.unwrap_or_else(|e| {
                tracing::error!("reconciling {date}: {e:#}");
                eprintln!("error: reconciling {date}: {e:#}");
                ExitCode::from(2)
            }))
        }
        Command::Sim { command } => sim::sim(command).await,
        Command::Dev { config, sim_listen } => dev::dev(config, sim_listen).await,
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

/// `wxhost reconcile`: the summary printed, the report written; exit 1 on discrepancies.
async fn reconcile(
    date: &str,
    config: &std::path::Path,
    report_dir: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let reconciled = wxhost::reconcile::run(config, Settings::from_env()?, date).await?;
    print!("{}", wxhost::reconcile::summary(&reconciled.report));
    std::fs::create_dir_all(report_dir).with_context(|| format!("creating {}", report_dir.display()))?;
    let path = wxhost::reconcile::report_path(report_dir, date);
    std::fs::write(&path, serde_json::to_string_pretty(&reconciled.report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("report: {}", path.display());
    Ok(if reconciled.discrepancies == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
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
