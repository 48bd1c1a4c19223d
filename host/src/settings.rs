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
    pub wechatpay_apiv3_key: Option<SecretString>,
    pub wechatpay_apiv2_key: Option<SecretString>,
    /// Path of WeChat Pay's public key (PEM) for verifying notifies and responses.
    pub wechatpay_platform_public_key: Option<std::path::PathBuf>,
    /// The id (`PUB_KEY_ID_…`) that key goes by in `Wechatpay-Serial`.
    pub wechatpay_public_key_id: Option<String>,
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
            wechatpay_apiv3_key: secret("WECHATPAY_APIV3_KEY"),
            wechatpay_apiv2_key: secret("WECHATPAY_APIV2_KEY"),
            wechatpay_platform_public_key: var("WECHATPAY_PLATFORM_PUBLIC_KEY").map(Into::into),
            wechatpay_public_key_id: var("WECHATPAY_PUBLIC_KEY_ID"),
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

impl Settings {
    /// WeChat Pay notify verification keys, when the settings name them.
    pub fn pay_notify_keys(&self) -> anyhow::Result<Option<crate::caps::callback_crypto::PayNotifyKeys>> {
        use secrecy::ExposeSecret;
        let (Some(apiv3), Some(path), Some(id)) =
            (&self.wechatpay_apiv3_key, &self.wechatpay_platform_public_key, &self.wechatpay_public_key_id)
        else {
            return Ok(None);
        };
        let apiv3: [u8; 32] = apiv3
            .expose_secret()
            .as_bytes()
            .try_into()
            .map_err(|_| anyhow::anyhow!("WECHATPAY_APIV3_KEY must be the 32-character APIv3 key"))?;
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading WECHATPAY_PLATFORM_PUBLIC_KEY ({})", path.display()))?;
        let key = crate::pay_crypto::public_key_from_pem(&pem).context("WECHATPAY_PLATFORM_PUBLIC_KEY")?;
        let mut platform = crate::pay_crypto::PlatformKeys::default();
        platform.insert(id.clone(), key);
        Ok(Some(crate::caps::callback_crypto::PayNotifyKeys {
            apiv3_key: secrecy::SecretBox::new(Box::new(apiv3)),
            platform,
            apiv2_key: self.wechatpay_apiv2_key.clone(),
        }))
    }
}
