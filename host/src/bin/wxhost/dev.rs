//! `wxhost dev`: both roles and the WeChat simulator in one process, on the
//! SQLite default, with generated development secrets and keys.

/// Where `wxhost dev` keeps the secrets it generates, so restarts keep sessions.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use secrecy::ExposeSecret as _;
use tokio::signal::unix::{SignalKind, signal};
use wxhost::config::{self, Role};
use wxhost::server;
use wxhost::settings::Settings;

const DEV_SECRETS: &str = "data/dev.env";
/// Where `wxhost dev` keeps the merchant and platform key pairs it makes.
const DEV_KEYS: &str = "data/dev-keys";

pub async fn dev(config_path: PathBuf, sim_listen: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
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
    pick(&mut settings.service_keys, "WXHOST_SERVICE_KEYS");
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
    // The first service's key, for the walkthrough's consume.
    let service_key = settings
        .service_keys
        .as_ref()
        .and_then(|s| {
            s.expose_secret()
                .split(',')
                .next()
                .and_then(|p| p.split_once('='))
                .map(|(_, k)| k.trim().to_string())
        })
        .unwrap_or_default();
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
Member pages: http://{app}/   (QR login, quota, buy: a QR code on a PC, H5 on a phone; simulated WeChat Pay)

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

Buy on a PC (with the token from a login): a Native order, paid by scanning its code_url
  curl -s http://{app}/api/v1/payment/products
  curl -s -X POST -H "Authorization: Bearer TOKEN" http://{app}/api/v1/payment/create-order -d '{{"product_id":"p10","trade_type":"native"}}'
  {exe} sim pay --sim-url http://{sim_addr} --code-url 'CODE_URL'    # a phone scans it: WeChat Pay pays and notifies
  curl -s -H "Authorization: Bearer TOKEN" http://{app}/api/v1/user/orders/OUT_TRADE_NO
  ("trade_type":"jsapi" inside WeChat, "h5" from a phone browser: the answer's h5_url is WeChat's cashier)

Refund it (admin credential below): the credits are taken back when WeChat Pay's notify comes
  curl -s -X POST -H "Authorization: Bearer {admin}" http://{app}/api/v1/admin/refunds -d '{{"out_trade_no":"OUT_TRADE_NO","reason":"test","idempotency_key":"k1"}}'
  curl -s -H "Authorization: Bearer {admin}" http://{app}/api/v1/admin/refunds/OUT_REFUND_NO

Spend quota as the business service (its key: WXHOST_SERVICE_KEYS in {DEV_SECRETS}):
  curl -s -X POST -H "Authorization: Bearer {service_key}" http://{app}/api/v1/quota/consume -d '{{"openid":"OPENID","units":1,"idempotency_key":"job-1","description":"one image"}}'
  curl -s -X POST -H "Authorization: Bearer {service_key}" http://{app}/api/v1/session/introspect -d '{{"token":"TOKEN"}}'
  curl -s -H "Authorization: Bearer TOKEN" http://{app}/api/v1/user/quota/ledger

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
    let generators: [Generator; 8] = [
        ("WECHAT_TOKEN", || hex::encode(random(16))),
        ("WECHAT_AES_KEY", || {
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(random(32))[..43].to_string()
        }),
        ("WECHAT_APPSECRET", || hex::encode(random(16))),
        ("INTERNAL_SECRET", || hex::encode(random(32))),
        ("WXHOST_ADMIN_TOKEN", || hex::encode(random(32))),
        ("WXHOST_CONTROL_TOKEN", || hex::encode(random(32))),
        // One business service, `dev`, for trying the consumption API.
        ("WXHOST_SERVICE_KEYS", || format!("dev={}", hex::encode(random(32)))),
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
