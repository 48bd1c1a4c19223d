//! `wxhost sim`: a WeChat simulator on loopback, so the whole flow runs on one
//! machine with no WeChat account. It plays api.weixin.qq.com (access tokens,
//! web authorization, QR codes, menus) with WeChat's JSON shapes and error
//! codes, and the platform side: it scans a QR scene as a test user and
//! pushes the signed subscribe/SCAN event at the web role. With a merchant
//! ([`Sim::with_pay`]) it also plays WeChat Pay (see [`pay`]).
//!
//! Control endpoints under `/sim/` drive it from tests and the command line.

pub mod pay;

pub use pay::{PayOutcome, PayRequest, SimPayConfig};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::wechat::{CallbackKeys, sorted_sha1};

/// What the simulated official account is.
#[derive(Clone)]
pub struct SimConfig {
    pub appid: String,
    pub secret: String,
    /// The server configuration's Token, to sign pushes.
    pub token: String,
    /// EncodingAESKey, for safe-mode pushes.
    pub aes_key: Option<String>,
    /// Where pushes go: the web role's base URL.
    pub web_url: Option<String>,
    /// Lifetime of issued access tokens.
    pub token_ttl: Duration,
}

#[derive(Default)]
struct SimData {
    /// Valid access tokens → Unix expiry. `cgi-bin/token` invalidates all others.
    tokens: HashMap<String, i64>,
    /// The token `stable_token` hands out while it is valid.
    stable: Option<String>,
    tokens_issued: u64,
    /// Template messages accepted (`cgi-bin/message/template/send`), and the
    /// users who refuse the account's messages (answered 43101).
    template_messages: Vec<Value>,
    refusing_messages: std::collections::HashSet<String>,
    template_attempts: u64,
    /// The JS-SDK's ticket `cgi-bin/ticket/getticket` hands out, and how often it did.
    jsapi_ticket: Option<(String, i64)>,
    tickets_issued: u64,
    /// OAuth codes → (openid, scope); a code works once.
    codes: HashMap<String, (String, String)>,
    used_codes: Vec<String>,
    /// User OAuth access tokens → openid.
    user_tokens: HashMap<String, String>,
    /// Test users: openid → nickname.
    users: HashMap<String, String>,
    /// QR tickets → (scene, expiry).
    tickets: HashMap<String, (String, i64)>,
    menu: Option<Value>,
    /// The last menu body exactly as received.
    menu_raw: Option<String>,
    /// Where pushes go (overrides the configured web role URL).
    web_url: Option<String>,
    /// Added to every API answer (to simulate a slow WeChat).
    latency: Duration,
    /// While set, API calls answer 503.
    down: bool,
    api_calls: u64,
}

#[derive(Clone)]
pub struct Sim {
    config: Arc<SimConfig>,
    data: Arc<Mutex<SimData>>,
    pay_config: Option<Arc<SimPayConfig>>,
    pay: pay::SharedPay,
    http: reqwest::Client,
}

impl Sim {
    pub fn new(config: SimConfig) -> Sim {
        Sim {
            config: Arc::new(config),
            data: Arc::default(),
            pay_config: None,
            pay: Arc::default(),
            http: reqwest::Client::new(),
        }
    }

    /// Adds the WeChat Pay side (api.mch.weixin.qq.com) for one merchant.
    pub fn with_pay(mut self, config: SimPayConfig) -> Sim {
        self.pay_config = Some(Arc::new(config));
        self
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/cgi-bin/token", get(token))
            .route("/cgi-bin/stable_token", post(stable_token))
            .route("/sns/oauth2/access_token", get(oauth_access_token))
            .route("/sns/userinfo", get(userinfo))
            .route("/cgi-bin/qrcode/create", post(qrcode_create))
            .route("/cgi-bin/showqrcode", get(showqrcode))
            .route("/cgi-bin/menu/get", get(menu_get))
            .route("/cgi-bin/menu/create", post(menu_create))
            .route("/cgi-bin/ticket/getticket", get(getticket))
            .route("/cgi-bin/message/template/send", post(template_send))
            .route("/sim/stats", get(stats))
            .route("/sim/users", post(create_user))
            .route("/sim/oauth/code", post(issue_code))
            .route("/sim/tokens/invalidate", post(invalidate_tokens))
            .route("/sim/tokens/expire", post(expire_tokens))
            .route("/sim/latency", post(set_latency))
            .route("/sim/down", post(set_down))
            .route("/sim/scan", post(scan))
            .route("/connect/oauth2/authorize", get(oauth_authorize))
            .merge(pay::routes())
            .with_state(self.clone())
            // A development tool on loopback: the member page calls /sim/pay from its own origin.
            .layer(tower_http::cors::CorsLayer::permissive())
    }

    /// Serves on `addr` until `shutdown` resolves; returns the bound address.
    pub async fn serve(
        &self,
        addr: SocketAddr,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let app = self.router();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        });
        Ok((bound, task))
    }

    /// Access tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.data.lock().expect("sim lock").tokens_issued
    }

    /// Calls of the official-account API (QR codes, menus, users) so far.
    pub fn api_calls(&self) -> u64 {
        self.data.lock().expect("sim lock").api_calls
    }

    /// Every access token stops working (as when another server called `cgi-bin/token`).
    pub fn invalidate_tokens(&self) {
        let mut d = self.data.lock().expect("sim lock");
        d.tokens.clear();
        d.stable = None;
    }

    /// Every access token expires now (WeChat then answers 42001).
    pub fn expire_tokens(&self) {
        let mut d = self.data.lock().expect("sim lock");
        let now = now();
        d.tokens.values_mut().for_each(|expiry| *expiry = now);
    }

    pub fn set_latency(&self, latency: Duration) {
        self.data.lock().expect("sim lock").latency = latency;
    }

    pub fn set_down(&self, down: bool) {
        self.data.lock().expect("sim lock").down = down;
    }

    /// A test user (openid derived from the name) and an OAuth code for them.
    pub fn oauth_code(&self, user: &str, scope: &str) -> String {
        let openid = openid_of(user);
        let code = format!("code{}", random_hex(12));
        let mut d = self.data.lock().expect("sim lock");
        d.users.entry(openid.clone()).or_insert_with(|| format!("{user} 🌟"));
        d.codes.insert(code.clone(), (openid, scope.to_string()));
        code
    }

    pub fn menu(&self) -> Option<Value> {
        self.data.lock().expect("sim lock").menu.clone()
    }

    /// The last menu exactly as the host sent it.
    pub fn menu_raw(&self) -> Option<String> {
        self.data.lock().expect("sim lock").menu_raw.clone()
    }

    /// Points pushes at a web role started after the simulator.
    pub fn set_web_url(&self, url: &str) {
        self.data.lock().expect("sim lock").web_url = Some(url.trim_end_matches('/').to_string());
    }

    fn issue_token(&self, d: &mut SimData) -> (String, i64) {
        let token = format!("ACCESS_TOKEN_{}", random_hex(16));
        let ttl = self.config.token_ttl.as_secs() as i64;
        d.tokens.insert(token.clone(), now() + ttl);
        d.tokens_issued += 1;
        (token, ttl)
    }

    /// Common gate of every API call: down, latency, access token.
    async fn gate(&self, access_token: Option<&str>) -> Result<(), Json<Value>> {
        let (latency, down) = {
            let mut d = self.data.lock().expect("sim lock");
            d.api_calls += 1;
            (d.latency, d.down)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if down {
            return Err(Json(json!({ "errcode": -1, "errmsg": "system error" })));
        }
        if let Some(token) = access_token {
            let d = self.data.lock().expect("sim lock");
            match d.tokens.get(token) {
                Some(&expiry) if expiry > now() => {}
                Some(_) => return Err(err(42001, "access_token expired")),
                None => return Err(err(40001, "invalid credential, access_token is invalid or not latest")),
            }
        }
        Ok(())
    }
}

fn err(errcode: i64, errmsg: &str) -> Json<Value> {
    Json(json!({ "errcode": errcode, "errmsg": errmsg }))
}

/// A stable fake openid for a test user's name.
pub fn openid_of(user: &str) -> String {
    format!("o{}", &sorted_sha1(&[user])[..27])
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

fn now() -> i64 {
    crate::internal_auth::unix_now() as i64
}

#[derive(Deserialize)]
struct Credentials {
    appid: Option<String>,
    secret: Option<String>,
    grant_type: Option<String>,
    #[serde(default)]
    force_refresh: bool,
}

fn check_credentials(sim: &Sim, c: &Credentials) -> Result<(), Json<Value>> {
    if c.grant_type.as_deref() != Some("client_credential") {
        return Err(err(40002, "invalid grant_type"));
    }
    if c.appid.as_deref() != Some(sim.config.appid.as_str()) {
        return Err(err(40013, "invalid appid"));
    }
    if c.secret.as_deref() != Some(sim.config.secret.as_str()) {
        return Err(err(40125, "invalid appsecret"));
    }
    Ok(())
}

/// `cgi-bin/token`: a new token every call; the previous ones stop working.
async fn token(State(sim): State<Sim>, Query(c): Query<Credentials>) -> Json<Value> {
    if let Err(e) = sim.gate(None).await {
        return e;
    }
    if let Err(e) = check_credentials(&sim, &c) {
        return e;
    }
    let mut d = sim.data.lock().expect("sim lock");
    d.tokens.clear();
    d.stable = None;
    let (token, ttl) = sim.issue_token(&mut d);
    Json(json!({ "access_token": token, "expires_in": ttl }))
}

/// `cgi-bin/stable_token`: the current token while it is valid, unless forced.
async fn stable_token(State(sim): State<Sim>, Json(c): Json<Credentials>) -> Json<Value> {
    if let Err(e) = sim.gate(None).await {
        return e;
    }
    if let Err(e) = check_credentials(&sim, &c) {
        return e;
    }
    let mut d = sim.data.lock().expect("sim lock");
    // Like WeChat: the same token until its last stretch (5 minutes, or a fifth
    // of short test lifetimes), then a new one while the old one stays valid.
    let renew_window = (sim.config.token_ttl.as_secs() as i64 / 5).clamp(1, 300);
    if !c.force_refresh
        && let Some(current) = d.stable.clone()
        && let Some(&expiry) = d.tokens.get(&current)
        && expiry - now() > renew_window
    {
        return Json(json!({ "access_token": current, "expires_in": expiry - now() }));
    }
    if c.force_refresh
        && let Some(old) = d.stable.take()
    {
        d.tokens.remove(&old);
    }
    let (token, ttl) = sim.issue_token(&mut d);
    d.stable = Some(token.clone());
    Json(json!({ "access_token": token, "expires_in": ttl }))
}

#[derive(Deserialize)]
struct OauthQuery {
    appid: Option<String>,
    secret: Option<String>,
    code: Option<String>,
    grant_type: Option<String>,
}

async fn oauth_access_token(State(sim): State<Sim>, Query(q): Query<OauthQuery>) -> Json<Value> {
    if let Err(e) = sim.gate(None).await {
        return e;
    }
    if q.grant_type.as_deref() != Some("authorization_code") {
        return err(40002, "invalid grant_type");
    }
    if q.appid.as_deref() != Some(sim.config.appid.as_str())
        || q.secret.as_deref() != Some(sim.config.secret.as_str())
    {
        return err(40125, "invalid appsecret");
    }
    let code = q.code.unwrap_or_default();
    let mut d = sim.data.lock().expect("sim lock");
    if d.used_codes.contains(&code) {
        return err(40163, "code been used");
    }
    let Some((openid, scope)) = d.codes.remove(&code) else {
        return err(40029, "invalid code");
    };
    d.used_codes.push(code);
    let user_token = format!("USER_TOKEN_{}", random_hex(12));
    d.user_tokens.insert(user_token.clone(), openid.clone());
    Json(json!({
        "access_token": user_token,
        "expires_in": 7200,
        "refresh_token": format!("REFRESH_{}", random_hex(8)),
        "openid": openid,
        "scope": scope,
    }))
}

#[derive(Deserialize)]
struct UserinfoQuery {
    access_token: Option<String>,
    openid: Option<String>,
}

#[derive(Deserialize)]
struct AuthorizeQuery {
    appid: String,
    redirect_uri: String,
    scope: String,
    state: Option<String>,
    /// The test user who consents (default `dev-user`).
    user: Option<String>,
}

/// open.weixin.qq.com's authorize page: the test user consents at once and is
/// sent back to `redirect_uri` with a code, as WeChat's browser does.
async fn oauth_authorize(
    State(sim): State<Sim>,
    Query(q): Query<AuthorizeQuery>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if q.appid != sim.config.appid {
        return (axum::http::StatusCode::BAD_REQUEST, "appid 参数错误 (wrong appid)").into_response();
    }
    if !["snsapi_base", "snsapi_userinfo"].contains(&q.scope.as_str()) {
        return (axum::http::StatusCode::BAD_REQUEST, "scope 参数错误 (wrong scope)").into_response();
    }
    let Ok(mut target) = url::Url::parse(&q.redirect_uri) else {
        return (axum::http::StatusCode::BAD_REQUEST, "redirect_uri 参数错误").into_response();
    };
    let code = sim.oauth_code(q.user.as_deref().unwrap_or("dev-user"), &q.scope);
    target
        .query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", q.state.as_deref().unwrap_or(""));
    axum::response::Redirect::to(target.as_str()).into_response()
}

async fn userinfo(State(sim): State<Sim>, Query(q): Query<UserinfoQuery>) -> Json<Value> {
    if let Err(e) = sim.gate(None).await {
        return e;
    }
    let d = sim.data.lock().expect("sim lock");
    let Some(openid) = q.access_token.as_ref().and_then(|t| d.user_tokens.get(t)) else {
        return err(40001, "invalid credential, access_token is invalid or not latest");
    };
    if q.openid.as_ref() != Some(openid) {
        return err(40003, "invalid openid");
    }
    let nickname = d.users.get(openid).cloned().unwrap_or_default();
    Json(json!({
        "openid": openid,
        "nickname": nickname,
        "sex": 0,
        "province": "",
        "city": "",
        "country": "",
        // http://, as WeChat has served avatars (the host stores https://).
        "headimgurl": format!("http://thirdwx.qlogo.cn/mmopen/{openid}/132"),
        "privilege": [],
    }))
}

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

async fn qrcode_create(
    State(sim): State<Sim>,
    Query(q): Query<TokenQuery>,
    Json(body): Json<Value>,
) -> Json<Value> {
    if let Err(e) = sim.gate(Some(q.access_token.as_deref().unwrap_or_default())).await {
        return e;
    }
    let expire = body["expire_seconds"].as_i64().unwrap_or(60).clamp(60, 2_592_000);
    let scene = match body["action_name"].as_str() {
        Some("QR_STR_SCENE") => body["action_info"]["scene"]["scene_str"].as_str().map(str::to_string),
        Some("QR_SCENE") => body["action_info"]["scene"]["scene_id"].as_i64().map(|i| i.to_string()),
        _ => return err(40001, "invalid action_name"),
    };
    let Some(scene) = scene.filter(|s| !s.is_empty() && s.len() <= 64) else {
        return err(40097, "invalid args: scene");
    };
    let ticket = format!("gQ{}", random_hex(20));
    sim.data.lock().expect("sim lock").tickets.insert(ticket.clone(), (scene, now() + expire));
    Json(
        json!({ "ticket": ticket, "expire_seconds": expire, "url": format!("http://weixin.qq.com/q/{ticket}") }),
    )
}

#[derive(Deserialize)]
struct TicketQuery {
    ticket: Option<String>,
}

/// The QR code image of a ticket: a real, scannable PNG of the ticket's URL.
async fn showqrcode(State(sim): State<Sim>, Query(q): Query<TicketQuery>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let ticket = q.ticket.unwrap_or_default();
    if !sim.data.lock().expect("sim lock").tickets.contains_key(&ticket) {
        return (axum::http::StatusCode::NOT_FOUND, "no such ticket").into_response();
    }
    match qr_png(&format!("http://weixin.qq.com/q/{ticket}")) {
        Ok(png) => ([(axum::http::header::CONTENT_TYPE, "image/png")], png).into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Renders `text` as a QR code PNG: 8 pixels a module, a 4-module quiet zone.
pub fn qr_png(text: &str) -> anyhow::Result<Vec<u8>> {
    const SCALE: usize = 8;
    const QUIET: usize = 4;
    let code = qrcode::QrCode::new(text.as_bytes())?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QUIET) * SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color == qrcode::Color::Dark {
            let (mx, my) = (i % modules + QUIET, i / modules + QUIET);
            for y in my * SCALE..(my + 1) * SCALE {
                pixels[y * side + mx * SCALE..y * side + (mx + 1) * SCALE].fill(0);
            }
        }
    }
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, side as u32, side as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&pixels)?;
    Ok(png)
}

async fn menu_get(State(sim): State<Sim>, Query(q): Query<TokenQuery>) -> Json<Value> {
    if let Err(e) = sim.gate(Some(q.access_token.as_deref().unwrap_or_default())).await {
        return e;
    }
    match sim.data.lock().expect("sim lock").menu.clone() {
        Some(menu) => Json(json!({ "menu": menu })),
        None => err(46003, "menu no exist"),
    }
}

async fn menu_create(State(sim): State<Sim>, Query(q): Query<TokenQuery>, body: String) -> Json<Value> {
    if let Err(e) = sim.gate(Some(q.access_token.as_deref().unwrap_or_default())).await {
        return e;
    }
    let Ok(menu) = serde_json::from_str::<Value>(&body) else {
        return err(40018, "invalid button name size");
    };
    if !menu["button"].as_array().is_some_and(|b| (1..=3).contains(&b.len())) {
        return err(40016, "invalid button size");
    }
    let mut d = sim.data.lock().expect("sim lock");
    d.menu = Some(menu);
    d.menu_raw = Some(body);
    err(0, "ok")
}

async fn stats(State(sim): State<Sim>) -> Json<Value> {
    let d = sim.data.lock().expect("sim lock");
    Json(json!({
        "tokens_issued": d.tokens_issued,
        "tickets_issued": d.tickets_issued,
        "api_calls": d.api_calls,
        "users": d.users.len(),
    }))
}

#[derive(Deserialize)]
struct JsapiTicketQuery {
    access_token: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// `cgi-bin/ticket/getticket?type=jsapi`: the same ticket for its 2 hours, as WeChat hands it out.
async fn getticket(State(sim): State<Sim>, Query(q): Query<JsapiTicketQuery>) -> Json<Value> {
    if let Err(e) = sim.gate(Some(q.access_token.as_deref().unwrap_or_default())).await {
        return e;
    }
    if q.kind.as_deref() != Some("jsapi") {
        return err(40097, "invalid args");
    }
    let mut d = sim.data.lock().expect("sim lock");
    let ticket = match &d.jsapi_ticket {
        Some((ticket, expiry)) if *expiry > now() => ticket.clone(),
        _ => {
            let ticket = format!("sim-ticket-{}", random_hex(24));
            d.jsapi_ticket = Some((ticket.clone(), now() + 7200));
            ticket
        }
    };
    d.tickets_issued += 1;
    Json(json!({ "errcode": 0, "errmsg": "ok", "ticket": ticket, "expires_in": 7200 }))
}

/// `cgi-bin/message/template/send`: accepted with a msgid, or 43101 for a user who refuses.
async fn template_send(State(sim): State<Sim>, Query(q): Query<TokenQuery>, body: String) -> Json<Value> {
    sim.data.lock().expect("sim lock").template_attempts += 1;
    if let Err(e) = sim.gate(Some(q.access_token.as_deref().unwrap_or_default())).await {
        return e;
    }
    let Ok(message) = serde_json::from_str::<Value>(&body) else { return err(47001, "data format error") };
    let (Some(touser), Some(_)) = (message["touser"].as_str(), message["template_id"].as_str()) else {
        return err(41028, "invalid form id");
    };
    let mut d = sim.data.lock().expect("sim lock");
    if d.refusing_messages.contains(touser) {
        return err(43101, "user refuse to accept the msg");
    }
    d.template_messages.push(message.clone());
    let msgid = d.template_messages.len() as i64 + 200_228_332;
    Json(json!({ "errcode": 0, "errmsg": "ok", "msgid": msgid }))
}

impl Sim {
    /// The template messages WeChat accepted, in order.
    pub fn template_messages(&self) -> Vec<Value> {
        self.data.lock().expect("sim lock").template_messages.clone()
    }

    /// How often a template message was attempted (accepted, refused or failed).
    pub fn template_attempts(&self) -> u64 {
        self.data.lock().expect("sim lock").template_attempts
    }

    /// `openid` refuses the account's messages from now on (WeChat answers 43101).
    pub fn refuse_messages(&self, openid: &str) {
        self.data.lock().expect("sim lock").refusing_messages.insert(openid.to_string());
    }

    /// The JS-SDK ticket handed out now, if any (to check signatures with).
    pub fn jsapi_ticket(&self) -> Option<String> {
        self.data.lock().expect("sim lock").jsapi_ticket.as_ref().map(|(t, _)| t.clone())
    }

    /// How often `cgi-bin/ticket/getticket` handed a ticket out.
    pub fn tickets_issued(&self) -> u64 {
        self.data.lock().expect("sim lock").tickets_issued
    }
}

#[derive(Deserialize)]
struct UserBody {
    name: String,
    #[serde(default = "default_scope")]
    scope: String,
}

fn default_scope() -> String {
    "snsapi_userinfo".into()
}

async fn create_user(State(sim): State<Sim>, Json(u): Json<UserBody>) -> Json<Value> {
    let code = sim.oauth_code(&u.name, &u.scope);
    Json(json!({ "openid": openid_of(&u.name), "code": code }))
}

async fn issue_code(State(sim): State<Sim>, Json(u): Json<UserBody>) -> Json<Value> {
    Json(json!({ "code": sim.oauth_code(&u.name, &u.scope), "openid": openid_of(&u.name) }))
}

async fn invalidate_tokens(State(sim): State<Sim>) -> Json<Value> {
    sim.invalidate_tokens();
    err(0, "ok")
}

async fn expire_tokens(State(sim): State<Sim>) -> Json<Value> {
    sim.expire_tokens();
    err(0, "ok")
}

#[derive(Deserialize)]
struct LatencyBody {
    ms: u64,
}

async fn set_latency(State(sim): State<Sim>, Json(b): Json<LatencyBody>) -> Json<Value> {
    sim.set_latency(Duration::from_millis(b.ms));
    err(0, "ok")
}

#[derive(Deserialize)]
struct DownBody {
    down: bool,
}

async fn set_down(State(sim): State<Sim>, Json(b): Json<DownBody>) -> Json<Value> {
    sim.set_down(b.down);
    err(0, "ok")
}

#[derive(Deserialize)]
pub struct ScanRequest {
    /// The QR code's ticket (from `cgi-bin/qrcode/create`) or its scene.
    pub ticket: Option<String>,
    pub scene: Option<String>,
    /// The test user who scans.
    pub user: String,
    /// Whether the user already follows the account (SCAN) or not (subscribe).
    #[serde(default)]
    pub subscribed: bool,
    /// Push in safe mode (AES). Unset: safe mode when the simulator has an
    /// EncodingAESKey, as WeChat encrypts every push once the account has one.
    #[serde(default)]
    pub safe_mode: Option<bool>,
}

async fn scan(State(sim): State<Sim>, Json(s): Json<ScanRequest>) -> Json<Value> {
    match sim.scan(&s).await {
        Ok((status, body)) => Json(json!({ "status": status, "body": body })),
        Err(e) => Json(json!({ "error": e.to_string() })),
    }
}

impl Sim {
    /// Pushes the event a scan makes at the web role; returns its answer.
    pub async fn scan(&self, s: &ScanRequest) -> anyhow::Result<(u16, String)> {
        let scene = match (&s.ticket, &s.scene) {
            (Some(ticket), _) => {
                let d = self.data.lock().expect("sim lock");
                let (scene, _expiry) =
                    d.tickets.get(ticket).ok_or_else(|| anyhow::anyhow!("unknown ticket"))?;
                scene.clone()
            }
            (None, Some(scene)) => scene.clone(),
            (None, None) => anyhow::bail!("give a ticket or a scene"),
        };
        let openid = openid_of(&s.user);
        self.data.lock().expect("sim lock").users.entry(openid.clone()).or_insert_with(|| s.user.clone());
        let (event, key) =
            if s.subscribed { ("SCAN", scene.clone()) } else { ("subscribe", format!("qrscene_{scene}")) };
        let xml = format!(
            "<xml><ToUserName><![CDATA[gh_sim]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
             <CreateTime>{}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event>\
             <EventKey><![CDATA[{key}]]></EventKey><Ticket><![CDATA[{}]]></Ticket></xml>",
            now(),
            s.ticket.clone().unwrap_or_default()
        );
        self.push(&xml, s.safe_mode.unwrap_or(self.config.aes_key.is_some())).await
    }

    /// Signs (and in safe mode encrypts) a push and posts it to the web role.
    pub async fn push(&self, xml: &str, safe_mode: bool) -> anyhow::Result<(u16, String)> {
        let web = self.data.lock().expect("sim lock").web_url.clone().or_else(|| self.config.web_url.clone());
        let web = web.ok_or_else(|| anyhow::anyhow!("the simulator has no web role URL"))?;
        let ts = now().to_string();
        let nonce = random_hex(5);
        let signature = sorted_sha1(&[&self.config.token, &ts, &nonce]);
        let mut url =
            format!("{web}/api/v1/auth/wechat/verify?signature={signature}&timestamp={ts}&nonce={nonce}");
        let body = if safe_mode {
            let key = self
                .config
                .aes_key
                .clone()
                .ok_or_else(|| anyhow::anyhow!("safe mode needs an EncodingAESKey"))?;
            let keys = CallbackKeys::new(
                Some(self.config.token.clone().into()),
                Some(&key.into()),
                Some(self.config.appid.clone()),
                None,
            )?;
            let sealed = keys.encrypt(xml, &ts, &nonce)?;
            url.push_str(&format!("&encrypt_type=aes&msg_signature={}", sealed.msg_signature));
            format!(
                "<xml><ToUserName><![CDATA[gh_sim]]></ToUserName><Encrypt><![CDATA[{}]]></Encrypt></xml>",
                sealed.encrypt
            )
        } else {
            xml.to_string()
        };
        let response = self.http.post(url).body(body).timeout(Duration::from_secs(5)).send().await?;
        Ok((response.status().as_u16(), response.text().await?))
    }
}
