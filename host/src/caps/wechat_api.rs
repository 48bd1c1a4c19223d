//! `wxhost:plugin/wechat-api`: the official-account API with the access_token
//! injected by the host, which alone holds WECHAT_APPSECRET.
//!
//! The access_token lives in the database (`token_cache`), shared by every app
//! process: it is refreshed ahead of expiry by one process at a time (a lease
//! in the same row), so processes never invalidate each other's token. On
//! 40001/40014/42001 the host refreshes only if the cached token is still the
//! failing one, then retries the call once. The JS-SDK's `jsapi_ticket` is
//! kept the same way (its own row), and only the host signs with it.

use futures::future::BoxFuture;

use super::{CapabilitySpec, Context, PluginState, ServiceInputs};
use crate::role::Role;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use wasmtime::component::{HasData, Linker};

use crate::bindings::wxhost::plugin::wechat_api::{
    self as wit, ApiError, JssdkConfig, Method, OauthUser, WechatError,
};
use crate::database::{Database, Pool, on_pool};

/// The production API; WECHAT_API_BASE overrides it (the simulator, a proxy).
pub const DEFAULT_BASE: &str = "https://api.weixin.qq.com";

/// Where WeChat shows QR code images; WECHAT_QRCODE_BASE overrides it.
pub const DEFAULT_QRCODE_BASE: &str = "https://mp.weixin.qq.com/cgi-bin/showqrcode";

/// Answers WeChat gives when the access_token is not (or no longer) valid.
const TOKEN_ERRCODES: [i64; 3] = [40001, 40014, 42001];

/// What every app process shares through `token_cache`, one row each,
/// refreshed by one process at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shared {
    AccessToken,
    /// The JS-SDK's ticket (`cgi-bin/ticket/getticket?type=jsapi`).
    JsapiTicket,
}

impl Shared {
    fn row(self) -> &'static str {
        match self {
            Shared::AccessToken => "access_token",
            Shared::JsapiTicket => "jsapi_ticket",
        }
    }
}

/// The shared access_token's row.
struct TokenRow {
    token: String,
    /// When to refresh it (ahead of WeChat's expiry).
    refresh_by: i64,
    /// Until when WeChat still takes it (a little before its expiry).
    valid_until: i64,
}
/// Query keys only the host sets: a plugin's own would travel beside the
/// host's (WeChat might read the plugin's, fail, and get a good token dropped).
const HOST_QUERY_KEYS: [&str; 3] = ["access_token", "appid", "secret"];

/// How long a process may hold the refresh lease.
const LEASE_SECS: i64 = 10;
/// Longest single call to WeChat.
const MAX_CALL: Duration = Duration::from_secs(5);
/// Time kept back from the plugin's deadline so it can still answer its caller.
const ANSWER_MARGIN: Duration = Duration::from_millis(250);

/// Which endpoint issues access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenEndpoint {
    /// `cgi-bin/stable_token`: the same token until it expires; other callers are unaffected.
    Stable,
    /// `cgi-bin/token`: every call invalidates the previous token everywhere.
    Plain,
}

/// The owned context: credentials, HTTP client, and the shared token cache.
pub struct WechatApi {
    base: String,
    qrcode_base: String,
    appid: String,
    secret: SecretString,
    endpoint: TokenEndpoint,
    http: reqwest::Client,
    db: Database,
    /// This process's copy of each shared credential: (value, refresh-by Unix time).
    cached: Mutex<std::collections::HashMap<Shared, (String, i64)>>,
    /// The menu as last read, and when: `get-menu` needs no login, so every
    /// anonymous page view would otherwise spend WeChat's daily API quota.
    menu: Mutex<Option<(std::time::Instant, Value)>>,
    menu_ttl: Duration,
}

/// The menu is read here, and changed (which drops the copy) by these.
const MENU_GET: &str = "cgi-bin/menu/get";
const MENU_CHANGES: [&str; 4] = [
    "cgi-bin/menu/create",
    "cgi-bin/menu/delete",
    "cgi-bin/menu/addconditional",
    "cgi-bin/menu/delconditional",
];

impl WechatApi {
    pub fn new(
        base: Option<&str>,
        qrcode_base: Option<&str>,
        appid: String,
        secret: SecretString,
        endpoint: TokenEndpoint,
        db: Database,
    ) -> anyhow::Result<Self> {
        let base = base.unwrap_or(DEFAULT_BASE).trim_end_matches('/').to_string();
        anyhow::ensure!(
            base.starts_with("https://") || base.starts_with("http://"),
            "WECHAT_API_BASE must be an http(s) URL"
        );
        let qrcode_base = qrcode_base.unwrap_or(DEFAULT_QRCODE_BASE).to_string();
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build()?;
        Ok(WechatApi {
            base,
            qrcode_base,
            appid,
            secret,
            endpoint,
            http,
            db,
            cached: Mutex::default(),
            menu: Mutex::new(None),
            menu_ttl: Duration::ZERO,
        })
    }

    /// Serves `cgi-bin/menu/get` from this process's copy for `ttl` (a change
    /// through this process drops it; another process's change shows within `ttl`).
    pub fn with_menu_cache(mut self, ttl: Duration) -> Self {
        self.menu_ttl = ttl;
        self
    }

    pub fn appid(&self) -> &str {
        &self.appid
    }

    pub fn qrcode_image_url(&self, ticket: &str) -> String {
        let ticket: String = url::form_urlencoded::byte_serialize(ticket.as_bytes()).collect();
        format!("{}?ticket={ticket}", self.qrcode_base)
    }

    /// Calls `path` with the access_token added; retries once with a fresh
    /// token if WeChat says the token is not valid.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&str>,
        deadline: Instant,
    ) -> Result<Value, ApiError> {
        let menu_read = path == MENU_GET && query.is_empty() && !self.menu_ttl.is_zero();
        if menu_read
            && let Some((at, menu)) = self.menu.lock().expect("menu cache lock").as_ref()
            && at.elapsed() < self.menu_ttl
        {
            return Ok(menu.clone());
        }
        let answer = self.call_with_token(method, path, query, body, deadline).await;
        if menu_read && let Ok(menu) = &answer {
            *self.menu.lock().expect("menu cache lock") = Some((std::time::Instant::now(), menu.clone()));
        } else if MENU_CHANGES.contains(&path) {
            *self.menu.lock().expect("menu cache lock") = None;
        }
        answer
    }

    async fn call_with_token(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&str>,
        deadline: Instant,
    ) -> Result<Value, ApiError> {
        let token = self.access_token(deadline).await?;
        match self.send(method, path, query, Some(&token), body, deadline).await {
            Err(ApiError::Wechat(e)) if TOKEN_ERRCODES.contains(&i64::from(e.errcode)) => {
                tracing::warn!(path, errcode = e.errcode, "access_token refused by WeChat; refreshing once");
                self.invalidate(Shared::AccessToken, &token).await?;
                let fresh = self.shared_other_than(Shared::AccessToken, Some(&token), deadline).await?;
                self.send(method, path, query, Some(&fresh), body, deadline).await
            }
            other => other,
        }
    }

    /// Calls `path` as-is (for endpoints that take no access_token).
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&str>,
        deadline: Instant,
    ) -> Result<Value, ApiError> {
        self.send(method, path, query, None, body, deadline).await
    }

    /// Web authorization: code → openid (and the profile for snsapi_userinfo).
    pub async fn oauth_login(&self, code: &str, deadline: Instant) -> Result<OauthUser, ApiError> {
        let query = [
            ("appid".to_string(), self.appid.clone()),
            ("secret".to_string(), self.secret.expose_secret().to_string()),
            ("code".to_string(), code.to_string()),
            ("grant_type".to_string(), "authorization_code".to_string()),
        ];
        let grant = self.send(Method::Get, "sns/oauth2/access_token", &query, None, None, deadline).await?;
        let text = |v: &Value, k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(str::to_string);
        let openid = text(&grant, "openid").ok_or_else(|| unavailable("the OAuth answer has no openid"))?;
        let scope = text(&grant, "scope").unwrap_or_default();
        let mut user =
            OauthUser { openid, unionid: text(&grant, "unionid"), scope, nickname: None, avatar_url: None };
        if user.scope.split(',').any(|s| s == "snsapi_userinfo") {
            let user_token =
                text(&grant, "access_token").ok_or_else(|| unavailable("no user access_token"))?;
            let query = [
                ("access_token".to_string(), user_token),
                ("openid".to_string(), user.openid.clone()),
                ("lang".to_string(), "zh_CN".to_string()),
            ];
            let info = self.send(Method::Get, "sns/userinfo", &query, None, None, deadline).await?;
            user.nickname = text(&info, "nickname");
            // WeChat has served avatars over http://; the member pages (and
            // their CSP) load them over https://, which the same hosts serve.
            user.avatar_url = text(&info, "headimgurl")
                .map(|url| url.strip_prefix("http://").map(|rest| format!("https://{rest}")).unwrap_or(url));
            user.unionid = user.unionid.or_else(|| text(&info, "unionid"));
        }
        Ok(user)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        access_token: Option<&str>,
        body: Option<&str>,
        deadline: Instant,
    ) -> Result<Value, ApiError> {
        let started = Instant::now();
        let result = self.send_once(method, path, query, access_token, body, deadline).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(ApiError::Wechat(_)) => "refused",
            Err(ApiError::Timeout) => "timeout",
            Err(_) => "unavailable",
        };
        crate::metrics::outbound("wechat", path, outcome, started.elapsed());
        result
    }

    async fn send_once(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        access_token: Option<&str>,
        body: Option<&str>,
        deadline: Instant,
    ) -> Result<Value, ApiError> {
        let left =
            deadline.saturating_duration_since(Instant::now()).saturating_sub(ANSWER_MARGIN).min(MAX_CALL);
        if left.is_zero() {
            return Err(ApiError::Timeout);
        }
        let url = format!("{}/{path}", self.base);
        let mut request = match method {
            Method::Get => self.http.get(url),
            Method::Post => self.http.post(url),
        };
        request = request.query(query);
        if let Some(token) = access_token {
            request = request.query(&[("access_token", token)]);
        }
        if let Some(body) = body {
            request =
                request.header("content-type", "application/json; charset=utf-8").body(body.to_string());
        }
        // reqwest's errors name the URL, which holds the token or the secret: never pass them on.
        let response = request.timeout(left).send().await.map_err(classify)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(classify)?;
        let json: Value = serde_json::from_slice(&bytes).map_err(|_| {
            unavailable(&format!("WeChat answered {} with something that is not JSON", status.as_u16()))
        })?;
        match json.get("errcode").and_then(Value::as_i64) {
            Some(0) | None if status.is_success() => Ok(json),
            Some(0) | None => Err(unavailable(&format!("WeChat answered HTTP {}", status.as_u16()))),
            Some(errcode) => {
                let errmsg = json["errmsg"].as_str().unwrap_or_default().to_string();
                tracing::warn!(path, errcode, errmsg, "WeChat refused a call");
                Err(ApiError::Wechat(WechatError { errcode: errcode as i32, errmsg }))
            }
        }
    }

    /// The shared access_token, refreshing it (one process at a time) when due.
    pub async fn access_token(&self, deadline: Instant) -> Result<String, ApiError> {
        self.shared_other_than(Shared::AccessToken, None, deadline).await
    }

    /// The shared credential `kind`, never `refused` (a token WeChat just
    /// refused): a concurrent request may have put it back in a cache an instant ago.
    async fn shared_other_than(
        &self,
        kind: Shared,
        refused: Option<&str>,
        deadline: Instant,
    ) -> Result<String, ApiError> {
        let usable = |token: &str, refresh_by: i64| refresh_by > unix_now() && Some(token) != refused;
        if let Some((token, refresh_by)) = self.cached.lock().expect("token cache lock").get(&kind).cloned()
            && usable(&token, refresh_by)
        {
            return Ok(token);
        }
        loop {
            let row = self.read_row(kind).await?;
            if let Some(row) = &row
                && usable(&row.token, row.refresh_by)
            {
                self.cached
                    .lock()
                    .expect("token cache lock")
                    .insert(kind, (row.token.clone(), row.refresh_by));
                return Ok(row.token.clone());
            }
            if let Some(lease) = self.take_lease(kind).await? {
                return self.fetch_and_store(kind, &lease, refused, deadline).await;
            }
            // Another process is refreshing. The token it replaces is still good
            // with WeChat until it expires: use it meanwhile rather than wait (the
            // refresher may be slow, or may have died holding the lease).
            if let Some(row) = row
                && row.valid_until > unix_now()
                && Some(row.token.as_str()) != refused
            {
                return Ok(row.token);
            }
            // Another process is refreshing: wait for its token.
            if Instant::now() + ANSWER_MARGIN >= deadline {
                return Err(ApiError::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Marks `failing` stale, unless another process has already replaced it.
    async fn invalidate(&self, kind: Shared, failing: &str) -> Result<(), ApiError> {
        let sql = "UPDATE token_cache SET expires_at = 0, valid_until = 0 WHERE name = ? AND token = ?";
        let _turn = self.writer_turn().await?;
        on_pool!(&self.db.pool, |p| sqlx::query(sql)
            .bind(kind.row())
            .bind(failing)
            .execute(p)
            .await
            .map(|_| ()))
        .map_err(db_error)?;
        let mut cached = self.cached.lock().expect("token cache lock");
        if cached.get(&kind).is_some_and(|(t, _)| t == failing) {
            cached.remove(&kind);
        }
        Ok(())
    }

    /// SQLite's writers queue for their turn (see `Database::writer_turn`).
    async fn writer_turn(&self) -> Result<crate::database::WriterTurn, ApiError> {
        self.db.writer_turn().await.map_err(|e| unavailable(&e.to_string()))
    }

    async fn read_row(&self, kind: Shared) -> Result<Option<TokenRow>, ApiError> {
        let sql = "SELECT token, expires_at, valid_until FROM token_cache WHERE name = ?";
        let row: Option<(Option<String>, i64, i64)> =
            on_pool!(&self.db.pool, |p| sqlx::query_as(sql).bind(kind.row()).fetch_optional(p).await)
                .map_err(db_error)?;
        Ok(row.and_then(|(token, refresh_by, valid_until)| {
            token.map(|token| TokenRow { token, refresh_by, valid_until })
        }))
    }

    /// Takes the refresh lease if nobody holds it; returns its unique owner tag.
    async fn take_lease(&self, kind: Shared) -> Result<Option<String>, ApiError> {
        let now = unix_now();
        let insert = match self.db.pool {
            Pool::Sqlite(_) => {
                "INSERT OR IGNORE INTO token_cache (name, token, expires_at, lease_owner, lease_until, updated_at) VALUES (?, NULL, 0, NULL, 0, ?)"
            }
            Pool::Mysql(_) => {
                "INSERT IGNORE INTO token_cache (name, token, expires_at, lease_owner, lease_until, updated_at) VALUES (?, NULL, 0, NULL, 0, ?)"
            }
        };
        let _turn = self.writer_turn().await?;
        on_pool!(&self.db.pool, |p| sqlx::query(insert)
            .bind(kind.row())
            .bind(now)
            .execute(p)
            .await
            .map(|_| ()))
        .map_err(db_error)?;
        let lease = format!("{:032x}", rand::random::<u128>());
        let take =
            "UPDATE token_cache SET lease_owner = ?, lease_until = ? WHERE name = ? AND lease_until <= ?";
        let taken = on_pool!(&self.db.pool, |p| sqlx::query(take)
            .bind(&lease)
            .bind(now + LEASE_SECS)
            .bind(kind.row())
            .bind(now)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))
        .map_err(db_error)?;
        Ok((taken == 1).then_some(lease))
    }

    /// With the lease held: fetch a token (unless another process just did) and share it.
    async fn fetch_and_store(
        &self,
        kind: Shared,
        lease: &str,
        refused: Option<&str>,
        deadline: Instant,
    ) -> Result<String, ApiError> {
        let previous = self.read_row(kind).await?;
        if let Some(row) = &previous
            && row.refresh_by > unix_now()
            && Some(row.token.as_str()) != refused
        {
            self.release(kind, lease).await?;
            return Ok(row.token.clone());
        }
        let stale = previous.as_ref().map(|row| row.token.as_str());
        let fetched = match kind {
            Shared::AccessToken => self.fetch(stale, deadline).await,
            Shared::JsapiTicket => self.fetch_jsapi_ticket(deadline).await,
        };
        if fetched.is_ok() && kind == Shared::AccessToken {
            metrics::counter!("wxhost_access_token_refreshes_total").increment(1);
        }
        let (token, expires_in) = match fetched {
            Ok(t) => t,
            Err(e) => {
                self.release(kind, lease).await?;
                return Err(e);
            }
        };
        // Refresh ahead of WeChat's expiry: a fifth of the lifetime, at most 5 minutes.
        // (At least a second from now, so a token handed back with little time
        // left is used rather than asked for again on every call.)
        let now = unix_now();
        let refresh_by = (now + expires_in - (expires_in / 5).clamp(1, 300)).max(now + 1);
        // Used by others during the next refresh until shortly before WeChat's expiry.
        let valid_until = now + expires_in - (expires_in / 10).clamp(1, 60);
        let sql = "UPDATE token_cache SET token = ?, expires_at = ?, valid_until = ?, lease_owner = NULL, lease_until = 0, \
                   updated_at = ? WHERE name = ? AND lease_owner = ?";
        let _turn = self.writer_turn().await?;
        on_pool!(&self.db.pool, |p| sqlx::query(sql)
            .bind(&token)
            .bind(refresh_by)
            .bind(valid_until)
            .bind(unix_now())
            .bind(kind.row())
            .bind(lease)
            .execute(p)
            .await
            .map(|_| ()))
        .map_err(db_error)?;
        tracing::info!(endpoint = ?self.endpoint, expires_in, "{} refreshed", kind.row());
        self.cached.lock().expect("token cache lock").insert(kind, (token.clone(), refresh_by));
        Ok(token)
    }

    async fn release(&self, kind: Shared, lease: &str) -> Result<(), ApiError> {
        let sql =
            "UPDATE token_cache SET lease_owner = NULL, lease_until = 0 WHERE name = ? AND lease_owner = ?";
        let _turn = self.writer_turn().await?;
        on_pool!(&self.db.pool, |p| sqlx::query(sql)
            .bind(kind.row())
            .bind(lease)
            .execute(p)
            .await
            .map(|_| ()))
        .map_err(db_error)?;
        Ok(())
    }

    /// Asks WeChat for the JS-SDK's ticket (with the shared access_token).
    /// Boxed, and `Send` by its type: getting the ticket takes the access_token,
    /// which goes through the same shared-credential code.
    fn fetch_jsapi_ticket(&self, deadline: Instant) -> BoxFuture<'_, Result<(String, i64), ApiError>> {
        Box::pin(async move {
            let query = [("type".to_string(), "jsapi".to_string())];
            let answer = self.call_with_token(Method::Get, JSAPI_TICKET_PATH, &query, None, deadline).await?;
            let ticket = answer["ticket"].as_str().filter(|t| !t.is_empty());
            let expires_in = answer["expires_in"].as_i64().filter(|&e| e > 0);
            match (ticket, expires_in) {
                (Some(t), Some(e)) => Ok((t.to_string(), e)),
                _ => Err(unavailable("WeChat's ticket answer has no ticket")),
            }
        })
    }

    /// The JS-SDK's `wx.config` for the page at `url`, exactly as the browser
    /// sent it (WeChat signs the page's own URL, without its `#` part).
    pub async fn jssdk_config(&self, url: &str, deadline: Instant) -> Result<JssdkConfig, ApiError> {
        let url = url.split('#').next().unwrap_or_default();
        let parsed = url::Url::parse(url)
            .map_err(|_| ApiError::NotAllowed("url must be the page's absolute http(s) URL".into()))?;
        if !["http", "https"].contains(&parsed.scheme()) || url.len() > 2048 {
            return Err(ApiError::NotAllowed(
                "url must be the page's absolute http(s) URL, at most 2048 bytes".into(),
            ));
        }
        let ticket = self.shared_other_than(Shared::JsapiTicket, None, deadline).await?;
        let timestamp = unix_now();
        let nonce_str = crate::wechat::pay::random_token(16);
        let signature = jssdk_signature(&ticket, &nonce_str, timestamp, url);
        Ok(JssdkConfig { app_id: self.appid.clone(), timestamp, nonce_str, signature })
    }

    /// Asks WeChat for a token. `stale` is the token being replaced: if
    /// `stable_token` hands it back, it is forced to issue a new one.
    async fn fetch(&self, stale: Option<&str>, deadline: Instant) -> Result<(String, i64), ApiError> {
        let secret = self.secret.expose_secret();
        let answer = match self.endpoint {
            TokenEndpoint::Plain => {
                let query = [
                    ("grant_type".to_string(), "client_credential".to_string()),
                    ("appid".to_string(), self.appid.clone()),
                    ("secret".to_string(), secret.to_string()),
                ];
                self.send(Method::Get, "cgi-bin/token", &query, None, None, deadline).await?
            }
            TokenEndpoint::Stable => {
                let body = |force: bool| {
                    serde_json::json!({ "grant_type": "client_credential", "appid": self.appid, "secret": secret, "force_refresh": force })
                        .to_string()
                };
                let first = self
                    .send(Method::Post, "cgi-bin/stable_token", &[], None, Some(&body(false)), deadline)
                    .await?;
                if stale.is_some() && first["access_token"].as_str() == stale {
                    self.send(Method::Post, "cgi-bin/stable_token", &[], None, Some(&body(true)), deadline)
                        .await?
                } else {
                    first
                }
            }
        };
        let token = answer["access_token"].as_str().filter(|t| !t.is_empty());
        let expires_in = answer["expires_in"].as_i64().filter(|&e| e > 0);
        match (token, expires_in) {
            (Some(t), Some(e)) => Ok((t.to_string(), e)),
            _ => Err(unavailable("WeChat's token answer has no access_token")),
        }
    }
}

/// Where the JS-SDK's ticket comes from; a plugin may have it signed only
/// with this path in its `wechat_api` allow-list.
pub const JSAPI_TICKET_PATH: &str = "cgi-bin/ticket/getticket";

/// The JS-SDK signature: SHA-1 over `jsapi_ticket=…&noncestr=…&timestamp=…&url=…`.
pub fn jssdk_signature(ticket: &str, nonce_str: &str, timestamp: i64, url: &str) -> String {
    use sha1::Digest as _;
    let text = format!("jsapi_ticket={ticket}&noncestr={nonce_str}&timestamp={timestamp}&url={url}");
    hex::encode(sha1::Sha1::digest(text.as_bytes()))
}

fn classify(e: reqwest::Error) -> ApiError {
    if e.is_timeout() {
        ApiError::Timeout
    } else if e.is_connect() {
        unavailable("WeChat could not be reached")
    } else {
        unavailable("WeChat did not answer")
    }
}

fn unavailable(why: &str) -> ApiError {
    ApiError::Unavailable(why.to_string())
}

fn db_error(e: sqlx::Error) -> ApiError {
    tracing::error!("access_token cache: {}", crate::database::redact_db_error(&e));
    unavailable("the access_token cache is unavailable")
}

fn unix_now() -> i64 {
    crate::internal_auth::unix_now() as i64
}

/// The borrowed view: the context plus what this plugin may call, and its deadline.
/// The app role's: the access token is shared through its database.
pub const SPEC: CapabilitySpec = CapabilitySpec { name: "wechat-api", roles: &[Role::App], open, link };

fn open<'a>(inputs: &'a ServiceInputs<'a>) -> BoxFuture<'a, anyhow::Result<Option<Context>>> {
    Box::pin(async move {
        let Some(db) = inputs.database else { return Ok(None) };
        let s = inputs.settings;
        let (Some(appid), Some(secret)) = (&s.wechat_appid, &s.wechat_appsecret) else {
            tracing::warn!("WECHAT_APPID or WECHAT_APPSECRET is not set: calls to the WeChat API will fail");
            return Ok(None);
        };
        let api = WechatApi::new(
            s.wechat_api_base.as_deref(),
            s.wechat_qrcode_base.as_deref(),
            appid.clone(),
            secret.clone(),
            inputs.token_endpoint,
            db.clone(),
        )?
        .with_menu_cache(inputs.menu_cache);
        Ok(Some(Box::new(api) as Context))
    })
}

fn link(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    add_to_linker(linker, |s| WechatApiView {
        ctx: s.services.get(),
        allowed_paths: &s.plugin.wechat_api,
        deadline_at: s.deadline_at,
    })
}

pub struct WechatApiView<'a> {
    pub ctx: Option<&'a WechatApi>,
    pub allowed_paths: &'a [String],
    pub deadline_at: Instant,
}

struct HasWechatApi;

impl HasData for HasWechatApi {
    type Data<'a> = WechatApiView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> WechatApiView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasWechatApi>(linker, get)
}

impl WechatApiView<'_> {
    fn ctx(&self) -> Result<&WechatApi, ApiError> {
        self.ctx
            .ok_or_else(|| ApiError::NotConfigured("WECHAT_APPID and WECHAT_APPSECRET are not set".into()))
    }

    /// The normalised path, if this plugin's allow-list has it.
    /// The path, if this plugin may call it with this query.
    fn allowed(&self, path: &str, query: &[(String, String)]) -> Result<String, ApiError> {
        if let Some((key, _)) =
            query.iter().find(|(k, _)| HOST_QUERY_KEYS.iter().any(|h| k.eq_ignore_ascii_case(h)))
        {
            return Err(ApiError::NotAllowed(format!("the host sets `{key}` itself")));
        }
        let path = path.trim_start_matches('/');
        if self.allowed_paths.iter().any(|p| p == path) {
            Ok(path.to_string())
        } else {
            Err(ApiError::NotAllowed(format!(
                "{path} is not in this plugin's wechat_api list in plugins.toml"
            )))
        }
    }
}

/// A capability call's error: an [`ApiError`] for the plugin, or a trap.
pub type ApiFailure = crate::bindings::CapabilityError<ApiError>;

impl wit::Host for WechatApiView<'_> {
    fn convert_api_error(&mut self, err: ApiFailure) -> wasmtime::Result<ApiError> {
        err.downcast()
    }

    async fn call(
        &mut self,
        method: Method,
        path: String,
        query: Vec<(String, String)>,
        body: Option<String>,
    ) -> Result<String, ApiFailure> {
        let path = self.allowed(&path, &query)?;
        if path == JSAPI_TICKET_PATH {
            // The ticket signs for the account: it stays in the host.
            return Err(
                ApiError::NotAllowed("the host keeps the jsapi_ticket: use sign-jssdk-url".into()).into()
            );
        }
        let value = self.ctx()?.call(method, &path, &query, body.as_deref(), self.deadline_at).await?;
        Ok(value.to_string())
    }

    async fn call_raw(
        &mut self,
        method: Method,
        path: String,
        query: Vec<(String, String)>,
        body: Option<String>,
    ) -> Result<String, ApiFailure> {
        let path = self.allowed(&path, &query)?;
        let value = self.ctx()?.call_raw(method, &path, &query, body.as_deref(), self.deadline_at).await?;
        Ok(value.to_string())
    }

    async fn oauth_login(&mut self, code: String) -> Result<OauthUser, ApiFailure> {
        if code.is_empty() || code.len() > 256 {
            return Err(
                ApiError::Wechat(WechatError { errcode: 40029, errmsg: "invalid code".into() }).into()
            );
        }
        Ok(self.ctx()?.oauth_login(&code, self.deadline_at).await?)
    }

    async fn sign_jssdk_url(&mut self, url: String) -> Result<JssdkConfig, ApiFailure> {
        self.allowed(JSAPI_TICKET_PATH, &[])?;
        Ok(self.ctx()?.jssdk_config(&url, self.deadline_at).await?)
    }

    async fn appid(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.map(|c| c.appid().to_string()).unwrap_or_default())
    }

    async fn qrcode_image_url(&mut self, ticket: String) -> wasmtime::Result<String> {
        let base = self.ctx.map(|c| c.qrcode_image_url(&ticket));
        Ok(base.unwrap_or_else(|| format!("{DEFAULT_QRCODE_BASE}?ticket={ticket}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wechatpy's `test_jsapi_get_jsapi_signature` (WeChat's JS-SDK docs, appendix 1).
    #[test]
    fn the_jssdk_signature_matches_the_sdk_vector() {
        let ticket = "sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg";
        assert_eq!(
            jssdk_signature(ticket, "Wm3WZYTPz0wzccnW", 1414587457, "http://mp.weixin.qq.com?params=value"),
            "0f9de62fce790f9a083d5c99e95740ceb90c27ed"
        );
    }
    use crate::sim::{Sim, SimConfig};

    /// A request whose token WeChat refused must not get that token back for
    /// its retry, even when a concurrent request has just put it back in the
    /// process cache and the shared row (a race seen under load).
    #[tokio::test]
    async fn a_retry_never_reuses_the_refused_token() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let db = crate::database::connect(&url, &Default::default()).await.unwrap();
        crate::database::migrate(&db).await.unwrap();
        let sim = Sim::new(SimConfig {
            appid: "wx1".into(),
            secret: "s".into(),
            token: "t".into(),
            aes_key: None,
            web_url: None,
            token_ttl: Duration::from_secs(7200),
        });
        let (addr, _task) = sim
            .serve("127.0.0.1:0".parse().unwrap(), tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
        let api = WechatApi::new(
            Some(&format!("http://{addr}")),
            None,
            "wx1".into(),
            "s".to_string().into(),
            TokenEndpoint::Stable,
            db,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let refused = api.access_token(deadline).await.unwrap();
        sim.invalidate_tokens();
        // The refused token still looks valid to this process (cache and row).
        let fresh = api.shared_other_than(Shared::AccessToken, Some(&refused), deadline).await.unwrap();
        assert_ne!(fresh, refused);
        assert_eq!(sim.tokens_issued(), 2);
    }
}
