//! `wxhost sim …`: serve the WeChat simulator, or drive a running one.

use std::process::ExitCode;

use anyhow::Context as _;
use secrecy::ExposeSecret as _;
use tokio::signal::unix::{SignalKind, signal};
use wxhost::settings::Settings;

use crate::cli::SimCommand;

pub async fn sim(command: SimCommand) -> anyhow::Result<ExitCode> {
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
        SimCommand::Pay { sim_url, out_trade_no, code_url, user, lose_notify } => {
            let request = serde_json::json!({
                "out_trade_no": out_trade_no, "code_url": code_url, "user": user, "lose_notify": lose_notify,
            });
            control(&sim_url, "/sim/pay", request).await
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
