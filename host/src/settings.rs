//! Settings from the environment: secrets and URLs (plugins.toml holds the rest).
//! Secret values are wrapped so that they never print.

use std::net::SocketAddr;

use anyhow::Context;
use secrecy::SecretString;

#[derive(Debug, Default, Clone)]
pub struct Settings {
    pub database_url: Option<SecretString>,
    /// MySQL: the URL plugin SQL connects with, a user granted only the plugin tables.
    pub plugin_database_url: Option<SecretString>,
    pub wechat_appid: Option<String>,
    pub wechat_token: Option<SecretString>,
    pub wechat_aes_key: Option<SecretString>,
    pub wechat_appsecret: Option<SecretString>,
    pub wechat_api_base: Option<String>,
    pub wechat_qrcode_base: Option<String>,
    /// WeChat's web-authorization page (the simulator's in development).
    pub wechat_oauth_authorize_url: Option<String>,
    /// The WeChat simulator, shown to the member pages in development only.
    pub dev_simulator_url: Option<String>,
    pub internal_secret: Option<SecretString>,
    pub wechatpay_apiv3_key: Option<SecretString>,
    pub wechatpay_apiv2_key: Option<SecretString>,
    /// Path of WeChat Pay's public key (PEM) for verifying notifies and responses.
    pub wechatpay_platform_public_key: Option<std::path::PathBuf>,
    /// The id (`PUB_KEY_ID_…`) that key goes by in `Wechatpay-Serial`.
    pub wechatpay_public_key_id: Option<String>,
    /// The merchant id (`mchid`), which selects the WeChat Pay capability.
    pub wechatpay_mchid: Option<String>,
    /// Path of the merchant's API private key (`apiclient_key.pem`).
    pub wechatpay_private_key: Option<std::path::PathBuf>,
    /// Path of the merchant's API certificate (`apiclient_cert.pem`): APIv2's
    /// refund API is called with it and the private key (mutual TLS).
    pub wechatpay_client_cert: Option<std::path::PathBuf>,
    /// Serial of the merchant's API certificate (`serial_no` of APIv3 requests).
    pub wechatpay_serial: Option<String>,
    pub wechatpay_api_base: Option<String>,
    /// Where WeChat Pay sends payment results: the web role's `/api/v1/payment/notify`.
    pub wechatpay_notify_url: Option<String>,
    /// `v3` (default) or `v2` for merchants still on APIv2.
    pub wechatpay_api_version: Option<String>,
    /// APIv2 signing: `HMAC-SHA256` (default) or `MD5`.
    pub wechatpay_apiv2_sign_type: Option<String>,
    pub session_secret: Option<SecretString>,
    pub admin_token: Option<SecretString>,
    /// The business services' keys (`name=key,…`), for plugins' `service_routes`.
    pub service_keys: Option<SecretString>,
    /// The admin listener's credential for what changes state (`POST /admin/reload`).
    pub control_token: Option<SecretString>,
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
            plugin_database_url: secret("PLUGIN_DATABASE_URL"),
            wechat_appid: var("WECHAT_APPID"),
            wechat_token: secret("WECHAT_TOKEN"),
            wechat_aes_key: secret("WECHAT_AES_KEY"),
            wechat_appsecret: secret("WECHAT_APPSECRET"),
            wechat_api_base: var("WECHAT_API_BASE"),
            wechat_qrcode_base: var("WECHAT_QRCODE_BASE"),
            wechat_oauth_authorize_url: var("WECHAT_OAUTH_AUTHORIZE_URL"),
            dev_simulator_url: var("WXHOST_DEV_SIMULATOR_URL"),
            internal_secret: secret("INTERNAL_SECRET"),
            wechatpay_apiv3_key: secret("WECHATPAY_APIV3_KEY"),
            wechatpay_apiv2_key: secret("WECHATPAY_APIV2_KEY"),
            wechatpay_platform_public_key: var("WECHATPAY_PLATFORM_PUBLIC_KEY").map(Into::into),
            wechatpay_public_key_id: var("WECHATPAY_PUBLIC_KEY_ID"),
            wechatpay_mchid: var("WECHATPAY_MCHID"),
            wechatpay_private_key: var("WECHATPAY_PRIVATE_KEY").map(Into::into),
            wechatpay_client_cert: var("WECHATPAY_CLIENT_CERT").map(Into::into),
            wechatpay_serial: var("WECHATPAY_SERIAL"),
            wechatpay_api_base: var("WECHATPAY_API_BASE"),
            wechatpay_notify_url: var("WECHATPAY_NOTIFY_URL"),
            wechatpay_api_version: var("WECHATPAY_API_VERSION"),
            wechatpay_apiv2_sign_type: var("WECHATPAY_APIV2_SIGN_TYPE"),
            session_secret: secret("SESSION_SECRET"),
            admin_token: secret("WXHOST_ADMIN_TOKEN"),
            service_keys: secret("WXHOST_SERVICE_KEYS"),
            control_token: secret("WXHOST_CONTROL_TOKEN"),
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
    /// WeChat Pay's verification keys (certificates and/or the public key) from
    /// WECHATPAY_PLATFORM_PUBLIC_KEY, or `None` if it is not set.
    pub fn platform_keys(&self) -> anyhow::Result<Option<crate::wechat::pay::PlatformKeys>> {
        let Some(path) = &self.wechatpay_platform_public_key else { return Ok(None) };
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading WECHATPAY_PLATFORM_PUBLIC_KEY ({})", path.display()))?;
        crate::wechat::pay::PlatformKeys::from_pem(&pem, self.wechatpay_public_key_id.as_deref())
            .map(Some)
            .with_context(|| format!("WECHATPAY_PLATFORM_PUBLIC_KEY ({})", path.display()))
    }

    /// The 32-byte APIv3 key, checked.
    pub fn apiv3_key(&self) -> anyhow::Result<Option<secrecy::SecretBox<[u8; 32]>>> {
        use secrecy::ExposeSecret;
        let Some(key) = &self.wechatpay_apiv3_key else { return Ok(None) };
        let bytes: [u8; 32] = key
            .expose_secret()
            .as_bytes()
            .try_into()
            .map_err(|_| anyhow::anyhow!("WECHATPAY_APIV3_KEY must be the 32-character APIv3 key"))?;
        Ok(Some(secrecy::SecretBox::new(Box::new(bytes))))
    }

    /// WeChat Pay notify verification keys (APIv3: APIv3 key + platform keys;
    /// APIv2: the APIv2 key), when the settings name any. `shared`: the
    /// process's live platform keys, which certificate renewal replaces.
    pub fn pay_notify_keys(
        &self,
        shared: Option<&crate::wechat::pay::LiveKeys>,
    ) -> anyhow::Result<Option<crate::wechat::pay::PayNotifyKeys>> {
        let (apiv3_key, platform) = (self.apiv3_key()?, self.platform_keys()?);
        if apiv3_key.is_some() != platform.is_some() {
            anyhow::bail!("APIv3 notifies need both WECHATPAY_APIV3_KEY and WECHATPAY_PLATFORM_PUBLIC_KEY");
        }
        if apiv3_key.is_none() && self.wechatpay_apiv2_key.is_none() {
            return Ok(None);
        }
        Ok(Some(crate::wechat::pay::PayNotifyKeys {
            apiv3_key,
            platform: match shared {
                Some(live) => live.clone(),
                None => crate::wechat::pay::LiveKeys::new(platform.unwrap_or_default()),
            },
            apiv2_key: self.wechatpay_apiv2_key.clone(),
            apiv2_sign_type: self.apiv2_sign_type()?,
        }))
    }

    /// `WECHATPAY_APIV2_SIGN_TYPE`: HMAC-SHA256 (the default) or MD5.
    pub fn apiv2_sign_type(&self) -> anyhow::Result<crate::wechat::pay::V2SignType> {
        use crate::wechat::pay::V2SignType;
        match self.wechatpay_apiv2_sign_type.as_deref() {
            None | Some("HMAC-SHA256") => Ok(V2SignType::HmacSha256),
            Some("MD5") => Ok(V2SignType::Md5),
            Some(_) => anyhow::bail!("WECHATPAY_APIV2_SIGN_TYPE must be HMAC-SHA256 or MD5"),
        }
    }
}

/// The settings each role reads. A web process holds only what checking
/// WeChat's callbacks and reaching the app role takes: no database, no
/// AppSecret, no merchant key. What a process's roles do not read is dropped
/// at start (with a warning if it was set), so it never sits in its memory.
pub fn secrets_read_by(role: crate::role::Role) -> &'static [&'static str] {
    match role {
        crate::role::Role::Web => &[
            "WECHAT_TOKEN",
            "WECHAT_AES_KEY",
            "WECHAT_APPID",
            "WECHATPAY_PLATFORM_PUBLIC_KEY",
            "WECHATPAY_PUBLIC_KEY_ID",
            "WECHATPAY_APIV3_KEY",
            "WECHATPAY_APIV2_KEY",
            "INTERNAL_SECRET",
            "APP_INTERNAL_URL",
            "WXHOST_CONTROL_TOKEN",
        ],
        crate::role::Role::App => &[
            "DATABASE_URL",
            "PLUGIN_DATABASE_URL",
            // The app role checks WeChat's signatures on pushes again itself.
            "WECHAT_TOKEN",
            "WECHAT_AES_KEY",
            "WECHAT_APPID",
            "WECHAT_APPSECRET",
            "WECHATPAY_MCHID",
            "WECHATPAY_PRIVATE_KEY",
            "WECHATPAY_CLIENT_CERT",
            "WECHATPAY_SERIAL",
            "WECHATPAY_PLATFORM_PUBLIC_KEY",
            "WECHATPAY_PUBLIC_KEY_ID",
            "WECHATPAY_APIV3_KEY",
            "WECHATPAY_APIV2_KEY",
            "INTERNAL_SECRET",
            "SESSION_SECRET",
            "WXHOST_ADMIN_TOKEN",
            "WXHOST_SERVICE_KEYS",
            "WXHOST_CONTROL_TOKEN",
        ],
    }
}

/// The shortest shared secret or credential the host accepts: 32 bytes, as
/// `openssl rand -hex 16` or more gives (HMAC keys and bearer tokens shorter
/// than that can be guessed or brute-forced offline).
pub const MIN_SECRET_BYTES: usize = 32;

impl Settings {
    /// Refuses shared secrets and credentials shorter than
    /// [`MIN_SECRET_BYTES`], naming each setting (never its value).
    pub fn check_secret_strength(&self) -> anyhow::Result<()> {
        use secrecy::ExposeSecret;
        let weak: Vec<&str> = [
            ("INTERNAL_SECRET", &self.internal_secret),
            ("SESSION_SECRET", &self.session_secret),
            ("WXHOST_ADMIN_TOKEN", &self.admin_token),
            ("WXHOST_CONTROL_TOKEN", &self.control_token),
        ]
        .into_iter()
        .filter(|(_, value)| value.as_ref().is_some_and(|v| v.expose_secret().len() < MIN_SECRET_BYTES))
        .map(|(name, _)| name)
        .collect();
        anyhow::ensure!(
            weak.is_empty(),
            "{} shorter than {MIN_SECRET_BYTES} bytes: generate {} with `openssl rand -hex 32`",
            weak.join(", ") + if weak.len() == 1 { " is" } else { " are" },
            if weak.len() == 1 { "one" } else { "each" }
        );
        Ok(())
    }

    /// Drops the secrets none of `roles` reads; returns the names that were set
    /// but not needed (to warn about: they belong on another host).
    pub fn retain_for(&mut self, roles: &[crate::role::Role]) -> Vec<&'static str> {
        let needed = |name: &str| roles.iter().any(|r| secrets_read_by(*r).contains(&name));
        let mut dropped = Vec::new();
        macro_rules! keep_if_needed {
            ($($field:ident => $name:literal),* $(,)?) => {$(
                if !needed($name) && self.$field.take().is_some() {
                    dropped.push($name);
                }
            )*};
        }
        keep_if_needed!(
            database_url => "DATABASE_URL",
            plugin_database_url => "PLUGIN_DATABASE_URL",
            wechat_token => "WECHAT_TOKEN",
            wechat_aes_key => "WECHAT_AES_KEY",
            wechat_appsecret => "WECHAT_APPSECRET",
            internal_secret => "INTERNAL_SECRET",
            wechatpay_apiv3_key => "WECHATPAY_APIV3_KEY",
            wechatpay_apiv2_key => "WECHATPAY_APIV2_KEY",
            wechatpay_mchid => "WECHATPAY_MCHID",
            wechatpay_private_key => "WECHATPAY_PRIVATE_KEY",
            wechatpay_client_cert => "WECHATPAY_CLIENT_CERT",
            wechatpay_serial => "WECHATPAY_SERIAL",
            session_secret => "SESSION_SECRET",
            admin_token => "WXHOST_ADMIN_TOKEN",
            service_keys => "WXHOST_SERVICE_KEYS",
            app_internal_url => "APP_INTERNAL_URL",
        );
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::Role;

    fn everything() -> Settings {
        let s = |v: &str| Some(SecretString::from(v.to_string()));
        Settings {
            database_url: s("mysql://u:p@db/x"),
            wechat_appid: Some("wx1".into()),
            wechat_token: s("t"),
            wechat_aes_key: s("k"),
            wechat_appsecret: s("secret"),
            internal_secret: s("i"),
            wechatpay_apiv3_key: s("v3"),
            wechatpay_private_key: Some("/k.pem".into()),
            wechatpay_mchid: Some("1900".into()),
            session_secret: s("sess"),
            admin_token: s("adm"),
            app_internal_url: Some("http://app".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn a_web_process_keeps_no_database_appsecret_or_merchant_key() {
        let mut web = everything();
        let dropped = web.retain_for(&[Role::Web]);
        assert_eq!(
            dropped,
            [
                "DATABASE_URL",
                "WECHAT_APPSECRET",
                "WECHATPAY_MCHID",
                "WECHATPAY_PRIVATE_KEY",
                "SESSION_SECRET",
                "WXHOST_ADMIN_TOKEN"
            ]
        );
        assert!(web.database_url.is_none() && web.wechat_appsecret.is_none());
        assert!(web.wechatpay_private_key.is_none() && web.session_secret.is_none());
        assert!(
            web.wechat_token.is_some() && web.internal_secret.is_some() && web.wechatpay_apiv3_key.is_some()
        );
    }

    #[test]
    fn an_app_process_keeps_no_callback_secrets_and_both_roles_keep_everything() {
        let mut app = everything();
        assert_eq!(app.retain_for(&[Role::App]), ["APP_INTERNAL_URL"]);
        let mut both = everything();
        assert!(both.retain_for(&[Role::Web, Role::App]).is_empty());
    }
}
