//! Settings from the environment: secrets and URLs (plugins.toml holds the rest).
//! Secret values are wrapped so that they never print.

use std::net::SocketAddr;

use anyhow::Context;
use secrecy::SecretString;

#[derive(Debug, Default, Clone)]
pub struct Settings {
    pub database_url: Option<SecretString>,
    pub wechat_appid: Option<String>,
    pub wechat_token: Option<SecretString>,
    pub wechat_aes_key: Option<SecretString>,
    pub wechat_appsecret: Option<SecretString>,
    pub wechat_api_base: Option<String>,
    pub wechat_qrcode_base: Option<String>,
    pub internal_secret: Option<SecretString>,
    pub session_secret: Option<SecretString>,
    pub admin_token: Option<SecretString>,
    pub app_internal_url: Option<String>,
    pub web_listen: Option<SocketAddr>,
    pub app_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
}

impl Settings {
    /// Reads the process environment; empty variables count as unset.
    pub fn from_env() -> anyhow::Result<Settings> {
        Ok(Settings {
            database_url: secret("DATABASE_URL"),
            wechat_appid: var("WECHAT_APPID"),
            wechat_token: secret("WECHAT_TOKEN"),
            wechat_aes_key: secret("WECHAT_AES_KEY"),
            wechat_appsecret: secret("WECHAT_APPSECRET"),
            wechat_api_base: var("WECHAT_API_BASE"),
            wechat_qrcode_base: var("WECHAT_QRCODE_BASE"),
            internal_secret: secret("INTERNAL_SECRET"),
            session_secret: secret("SESSION_SECRET"),
            admin_token: secret("WXHOST_ADMIN_TOKEN"),
            app_internal_url: var("APP_INTERNAL_URL"),
            web_listen: addr("WXHOST_WEB_LISTEN")?,
            app_listen: addr("WXHOST_APP_LISTEN")?,
            admin_listen: addr("WXHOST_ADMIN_LISTEN")?,
        })
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn secret(name: &str) -> Option<SecretString> {
    var(name).map(SecretString::from)
}

fn addr(name: &str) -> anyhow::Result<Option<SocketAddr>> {
    var(name)
        .map(|v| v.parse().with_context(|| format!("{name}={v} is not an address like 127.0.0.1:8080")))
        .transpose()
}
