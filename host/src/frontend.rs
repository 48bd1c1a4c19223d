//! The member pages (`[frontend] root`, normally `frontend/`), served by the
//! app role for GET/HEAD requests outside `/api/` that no plugin routes, plus
//! `/config.json`: the public settings the pages need (AppID, where WeChat's
//! authorize page is, and in development the simulator).
//!
//! Every answer carries a content security policy that allows only what the
//! pages use: their own scripts and styles, QR images from WeChat (or the
//! simulator), avatars from WeChat's image hosts, API calls to this origin.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt as _;
use tower_http::services::ServeDir;

use crate::settings::Settings;

/// WeChat's authorize page for web authorization (OAuth in WeChat's browser).
pub const DEFAULT_AUTHORIZE_URL: &str = "https://open.weixin.qq.com/connect/oauth2/authorize";
/// Where WeChat serves avatars.
const AVATAR_HOSTS: &str = "https://thirdwx.qlogo.cn https://wx.qlogo.cn";

pub struct Frontend {
    files: ServeDir,
    client_config: String,
    csp: HeaderValue,
}

impl Frontend {
    pub fn new(root: PathBuf, settings: &Settings) -> anyhow::Result<Frontend> {
        let qrcode_base =
            settings.wechat_qrcode_base.as_deref().unwrap_or(crate::caps::wechat_api::DEFAULT_QRCODE_BASE);
        let authorize =
            settings.wechat_oauth_authorize_url.clone().unwrap_or_else(|| DEFAULT_AUTHORIZE_URL.to_string());
        let simulator = settings.dev_simulator_url.as_deref().map(|u| u.trim_end_matches('/').to_string());
        let mut connect = vec!["'self'".to_string()];
        connect.extend(simulator.as_deref().and_then(origin));
        // blob: the Native QR code, fetched with the session token and shown from memory.
        let mut images = vec!["'self'".to_string(), "data:".into(), "blob:".into(), AVATAR_HOSTS.into()];
        images.extend(origin(qrcode_base));
        let csp = format!(
            "default-src 'self'; img-src {}; connect-src {}; style-src 'self'; script-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            images.join(" "),
            connect.join(" ")
        );
        let client_config = serde_json::json!({
            "appid": settings.wechat_appid,
            "oauth_authorize_url": authorize,
            "simulator_url": simulator,
        })
        .to_string();
        Ok(Frontend {
            files: ServeDir::new(root).append_index_html_on_directories(true),
            client_config,
            csp: HeaderValue::from_str(&csp)?,
        })
    }

    /// Whether this request is for the pages rather than the API.
    pub fn wants(method: &Method, path: &str) -> bool {
        (method == Method::GET || method == Method::HEAD) && !path.starts_with("/api/")
    }

    pub async fn serve(&self, request: Request) -> Response {
        let mut response = if request.uri().path() == "/config.json" {
            ([(header::CONTENT_TYPE, "application/json")], self.client_config.clone()).into_response()
        } else {
            match self.files.clone().oneshot(request).await {
                Ok(r) => r.map(Body::new),
                Err(never) => match never {},
            }
        };
        let h = response.headers_mut();
        // The pages are UTF-8 (Chinese first): say so rather than let browsers guess.
        let textual = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|t| (t.starts_with("text/") || t.contains("javascript")) && !t.contains("charset"));
        if let Some(with_charset) =
            textual.and_then(|t| HeaderValue::from_str(&format!("{t}; charset=utf-8")).ok())
        {
            h.insert(header::CONTENT_TYPE, with_charset);
        }
        h.insert(header::CONTENT_SECURITY_POLICY, self.csp.clone());
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        // Not fingerprinted: always revalidate (Last-Modified makes that cheap),
        // so a deployment is seen at once.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

/// `scheme://host[:port]` of a URL, for the policy.
fn origin(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    Some(u.origin().ascii_serialization()).filter(|o| o != "null")
}
