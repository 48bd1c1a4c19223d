//! HTTP: one listener per served role, plus the loopback admin listener.
//! Plugin routes are dispatched from the role's current snapshot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use notify::Watcher;
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bindings::wxhost::plugin::types as wit;
use crate::caps::internal_call::InternalClient;
use crate::caps::wechat_pay::WechatPay;
use crate::caps::{ServiceInputs, Services, db::DbCtx};
use crate::config::{self, Config, Role};
use crate::database;
use crate::error::ApiError;
use crate::frontend::Frontend;
use crate::host::{self, Host};
use crate::internal_auth::{INTERNAL_PREFIX, InternalAuth, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::platform_certificates::{self, CertificateKeeper};
use crate::runtime::{self, PluginFailure, RouteMatch};
use crate::settings::Settings;
use crate::wechat::pay::LiveKeys;

/// What `wxhost serve` needs.
pub struct ServeOptions {
    pub config_path: PathBuf,
    pub roles: Vec<Role>,
    pub settings: Settings,
    /// Reload when plugins.toml or a plugin's wasm changes on disk.
    pub watch: bool,
}

/// A started server: its bound addresses and a handle to stop it.
pub struct RunningServer {
    pub role_addrs: BTreeMap<Role, SocketAddr>,
    pub admin_addr: SocketAddr,
    pub host: Arc<Host>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl RunningServer {
    /// Stops accepting; in-flight requests finish before `wait` returns.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts the served roles: loads the config, connects and migrates the database
/// for the app role, loads every plugin (refusing the start if any is refused),
/// then binds the listeners.
pub async fn start(mut options: ServeOptions) -> anyhow::Result<RunningServer> {
    // Before anything registers a metric (plugin loading registers the route
    // histograms): a handle registered without a recorder records nothing.
    crate::metrics::handle();
    let unneeded = options.settings.retain_for(&options.roles);
    if !unneeded.is_empty() {
        let roles: Vec<&str> = options.roles.iter().map(|r| r.name()).collect();
        tracing::warn!(
            "set but not read by the {} role ({}): dropped at start; keep them off this host",
            roles.join("+"),
            unneeded.join(", ")
        );
    }
    options.settings.check_secret_strength()?;
    let config = config::load(&options.config_path)?;
    let engine = crate::engine::new(config.max_instances, config.reset_dirty_pages_only)?;
    let services = Arc::new(open_services(&config, &options.settings, &options.roles).await?);
    let host = Arc::new(Host::start(engine, services, &config, &options.roles).await?);
    let internal_auth = options.settings.internal_secret.clone().map(|s| Arc::new(InternalAuth::new(s)));
    if options.roles.contains(&Role::App) && internal_auth.is_none() {
        tracing::warn!("INTERNAL_SECRET is not set: the app role's internal API answers 503");
    }
    let service_keys = match &options.settings.service_keys {
        Some(text) => Some(Arc::new(crate::service_keys::ServiceKeys::parse(text.expose_secret())?)),
        None => None,
    };
    let has_service_routes =
        config.plugins.iter().any(|p| p.role == Role::App && !p.service_routes.is_empty());
    if options.roles.contains(&Role::App) && has_service_routes && service_keys.is_none() {
        tracing::warn!("WXHOST_SERVICE_KEYS is not set: the business services' routes answer 503");
    }
    let guards = Guards { internal: internal_auth, services: service_keys };
    let shutdown = CancellationToken::new();
    crate::metrics::spawn_upkeep(shutdown.clone());
    let mut tasks = JoinSet::new();

    let mut role_addrs = BTreeMap::new();
    for role in host.roles() {
        let configured = host.runtime(role).config.listen;
        let addr = match role {
            Role::Web => options.settings.web_listen,
            Role::App => options.settings.app_listen,
        }
        .unwrap_or(configured);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the {role} role to {addr}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(role = %role, addr = %bound, "listening");
        role_addrs.insert(role, bound);
        let frontend = match (&config.frontend_root, role) {
            (Some(root), Role::App) => Some(Arc::new(Frontend::new(root.clone(), &options.settings)?)),
            _ => None,
        };
        let app = role_router(host.clone(), role, guards.clone(), frontend);
        tasks.spawn(serve(listener, app, shutdown.clone()));
    }

    let admin = options.settings.admin_listen.unwrap_or(config.admin_listen);
    anyhow::ensure!(
        admin.ip().is_loopback(),
        "the admin listener must be on a loopback address, not {admin}"
    );
    let listener = tokio::net::TcpListener::bind(admin)
        .await
        .with_context(|| format!("binding the admin listener to {admin}"))?;
    let admin_addr = listener.local_addr()?;
    tracing::info!(addr = %admin_addr, "admin listening");
    let control_token = options.settings.control_token.clone();
    tasks.spawn(serve(listener, admin_router(host.clone(), control_token), shutdown.clone()));

    if options.watch {
        tasks.spawn(watch_files(host.clone(), shutdown.clone()));
    }
    let db = host.services.get::<DbCtx>().map(|d| d.db.clone());
    if let Some(db) = &db {
        tasks.spawn(prune_periodically(db.clone(), shutdown.clone()));
    }
    if host.roles().any(|r| r == Role::App) {
        tasks.spawn(run_jobs(host.clone(), shutdown.clone()));
    }
    if let Some(keeper) = host.services.shared::<CertificateKeeper>() {
        let (pay, app) = (host.services.shared::<WechatPay>(), host.services.shared::<InternalClient>());
        platform_certificates::spawn_refresher(keeper, db, pay, app, &mut tasks, shutdown.clone());
    }
    Ok(RunningServer { role_addrs, admin_addr, host, shutdown, tasks })
}

/// The capabilities' shared services for `roles`: the app role's database
/// (connected and migrated), WeChat's and WeChat Pay's clients, the keys.
pub async fn open_services(config: &Config, settings: &Settings, roles: &[Role]) -> anyhow::Result<Services> {
    let url = settings.database_url.as_ref().map(|u| u.expose_secret().to_string());
    let url = url.as_deref().unwrap_or(database::DEFAULT_URL);
    // Only the app role has a database; the web role never opens one.
    let database = if roles.contains(&Role::App) {
        let db = database::connect(url, &config.pool).await?;
        database::migrate(&db).await?;
        Some(db)
    } else {
        None
    };
    let inputs = ServiceInputs {
        settings,
        roles,
        database: database.as_ref(),
        database_url: url,
        pool: &config.pool,
        token_endpoint: config.token_endpoint,
        menu_cache: config.menu_cache,
        session_ttl: std::time::Duration::from_secs(config.session_ttl_secs),
        timestamp_window_secs: config.timestamp_window_secs,
        accept_plaintext_with_aes_key: config.accept_plaintext_with_aes_key,
        // A broken key file is reported by the capabilities that need it, with the rest.
        platform_keys: settings.platform_keys().ok().flatten().map(LiveKeys::new),
    };
    let services = Services::open(&inputs).await?;
    let keeper = match &inputs.platform_keys {
        Some(live) => CertificateKeeper::for_settings(settings, live)?,
        None => None,
    };
    let Some(keeper) = keeper else { return Ok(services) };
    // Trust what other processes downloaded before serving the first request.
    if let Some(db) = services.get::<DbCtx>().map(|d| &d.db) {
        platform_certificates::install_stored(&keeper, db).await;
    }
    Ok(services.with(keeper))
}

async fn serve(listener: tokio::net::TcpListener, app: Router, shutdown: CancellationToken) {
    let result = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!("server stopped: {e}");
    }
}

/// What the host checks before a guarded route's plugin runs.
#[derive(Clone, Default)]
pub struct Guards {
    /// The internal API's HMAC (app role); `None`: INTERNAL_SECRET unset.
    pub internal: Option<Arc<InternalAuth>>,
    /// The business services' keys; `None`: WXHOST_SERVICE_KEYS unset.
    pub services: Option<Arc<crate::service_keys::ServiceKeys>>,
}

#[derive(Clone)]
struct RoleState {
    host: Arc<Host>,
    role: Role,
    guards: Guards,
    /// The member pages (app role, when `[frontend] root` is set).
    frontend: Option<Arc<Frontend>>,
}

/// The router of one role: `/healthz`, the plugins' routes, and (app role)
/// the member pages for what no plugin routes.
pub fn role_router(host: Arc<Host>, role: Role, guards: Guards, frontend: Option<Arc<Frontend>>) -> Router {
    let router = Router::new().route("/healthz", get(healthz));
    // The API's description, beside the API (the app role serves it).
    let router = match role {
        Role::App => router
            .route(crate::openapi::PATH, get(crate::openapi::serve))
            .route(platform_certificates::INTERNAL_PATH, get(hand_on_platform_certificates)),
        Role::Web => router,
    };
    router.fallback(dispatch).with_state(RoleState { host, role, guards, frontend })
}

/// The app role's downloaded platform certificates, sealed, for the web role
/// (internal API); `?refresh=1` first asks WeChat Pay (a notify named a
/// serial the web role lacks).
async fn hand_on_platform_certificates(
    State(state): State<RoleState>,
    request: Request,
) -> Result<axum::Json<platform_certificates::HandedOn>, ApiError> {
    let (parts, _) = request.into_parts();
    authenticate_internal(&state, &parts, &[])?;
    let keeper = state.host.services.get::<CertificateKeeper>().ok_or_else(ApiError::not_found)?;
    if parts.uri.query() == Some("refresh=1") {
        keeper.refresh_now(Duration::from_secs(5)).await;
    }
    Ok(axum::Json(platform_certificates::HandedOn { certificates: keeper.held() }))
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Response headers a plugin may not set.
const HOP_BY_HOP: &[&str] =
    &["content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer"];

/// What a request's metrics are labelled with: the route's handles, or a
/// name for what no plugin route served.
enum Served {
    Route(Arc<runtime::RouteMetrics>),
    Other(&'static str),
}

/// Every request of a role: routed to a plugin (or the member pages), counted,
/// timed, and answered with its request id, errors included.
async fn dispatch(State(state): State<RoleState>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    let mut served = Served::Other("unmatched");
    let mut response = match route_and_run(&state, request, &request_id, &mut served).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let status = response.status().as_u16();
    match &served {
        Served::Route(route) => {
            route.count(status);
            route.duration.record(started.elapsed().as_secs_f64());
        }
        Served::Other(what) => {
            let role = state.role.name();
            metrics::counter!("wxhost_http_requests_total", "role" => role, "plugin" => "", "route" => *what,
                "status" => status.to_string())
            .increment(1);
            metrics::histogram!("wxhost_http_request_duration_seconds", "role" => role, "plugin" => "",
                "route" => *what)
            .record(started.elapsed().as_secs_f64());
        }
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    // A 503 is temporary (database pool exhausted or down, app role unreachable):
    // tell clients and proxies when to come back.
    if response.status() == StatusCode::SERVICE_UNAVAILABLE
        && !response.headers().contains_key(header::RETRY_AFTER)
    {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

async fn route_and_run(
    state: &RoleState,
    request: Request,
    request_id: &str,
    served: &mut Served,
) -> Result<Response, ApiError> {
    let runtime = state.host.runtime(state.role);
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let routed = runtime.route(parts.method.as_str(), path);
    if let (RouteMatch::NotFound, Some(frontend)) = (&routed, &state.frontend)
        && Frontend::wants(&parts.method, path)
    {
        *served = Served::Other("frontend");
        return Ok(frontend.serve(Request::from_parts(parts, body)).await);
    }
    let internal = path.starts_with(INTERNAL_PREFIX)
        || matches!(routed, RouteMatch::Found { guard: crate::runtime::Guard::Internal, .. });
    let service = match &routed {
        RouteMatch::Found { guard: crate::runtime::Guard::Service, .. } => {
            Some(authenticate_service(state, &parts)?)
        }
        _ => None,
    };
    let limit = runtime.config.max_body_bytes;
    let body: Bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if e.into_inner().is::<http_body_util::LengthLimitError>() {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::bad_request("the request body could not be read")
        }
    })?;
    if internal {
        authenticate_internal(state, &parts, &body)?;
    }
    let (plugin, params, route, client) = match routed {
        RouteMatch::Found { plugin, params, route, .. } => {
            let limits = &state.host.client_limits;
            let peer = parts.extensions.get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
            let client = limits.client_of(peer, &parts.headers);
            if !limits.is_empty()
                && let Some(client) = client
                && let Err(wait) = limits.check(parts.method.as_str(), &route.pattern, client)
            {
                *served = Served::Route(route);
                return Err(ApiError::too_many_requests(wait));
            }
            *served = Served::Route(route.clone());
            (plugin.clone(), params, route, client)
        }
        RouteMatch::MethodNotAllowed => return Err(ApiError::method_not_allowed()),
        RouteMatch::NotFound => return Err(ApiError::not_found()),
    };
    let headers = parts
        .headers
        .iter()
        // A service's key is the host's to check, never the plugin's to see.
        .filter(|(k, _)| service.is_none() || *k != header::AUTHORIZATION)
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let wit_request = wit::Request {
        method: parts.method.as_str().to_string(),
        route: route.pattern.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        params,
        headers,
        body: body.to_vec(),
        request_id: request_id.to_string(),
        client_ip: client.map(|ip| ip.to_string()),
        service,
    };
    let started = std::time::Instant::now();
    let outcome = state.host.call(plugin.clone(), wit_request).await;
    let identity = &plugin.identity;
    Ok(match outcome {
        Ok(r) => {
            // What the plugin says it did (applied, duplicate, …): counted, not passed on.
            match r.outcome.as_deref() {
                Some(outcome) if crate::metrics::is_outcome_label(outcome) => {
                    metrics::counter!("wxhost_plugin_outcomes_total", "plugin" => identity.name.clone(),
                        "route" => route.pattern.to_string(), "outcome" => outcome.to_string())
                    .increment(1);
                }
                Some(outcome) => tracing::warn!(
                    plugin = %identity.name, request_id, outcome = %outcome.escape_debug(),
                    "outcome dropped: 1-32 of a-z, 0-9 and _ are counted"
                ),
                None => {}
            }
            let response = to_http(r);
            // Refusals are worth a line (never the query or body: they may carry user data).
            // A 4xx is the caller's doing (info); a 5xx is ours or a dependency's (warn).
            let status = response.status();
            if status.is_server_error() {
                tracing::warn!(
                    plugin = %identity.name, version = %identity.version, request_id, role = %state.role,
                    method = %parts.method, path = parts.uri.path(), status = status.as_u16(),
                    "request failed"
                );
            } else if status.is_client_error() {
                tracing::info!(
                    plugin = %identity.name, version = %identity.version, request_id, role = %state.role,
                    method = %parts.method, path = parts.uri.path(), status = status.as_u16(),
                    "request refused"
                );
            }
            response
        }
        Err(failure) => {
            let kind = match failure {
                PluginFailure::Timeout(_) => "timeout",
                PluginFailure::OutOfMemory => "out_of_memory",
                PluginFailure::Trap(_) => "trap",
                PluginFailure::Busy => "busy",
            };
            metrics::counter!("wxhost_plugin_failures_total", "plugin" => identity.name.clone(), "kind" => kind)
                .increment(1);
            let elapsed_ms = started.elapsed().as_millis() as u64;
            if matches!(failure, PluginFailure::Busy) {
                // Load shedding, not a fault: one line per request at most at warn.
                tracing::warn!(plugin = %identity.name, request_id, role = %state.role, "{failure}");
            } else {
                tracing::error!(
                    plugin = %identity.name, version = %identity.version, request_id, role = %state.role,
                    elapsed_ms, "{failure}"
                );
            }
            failure_response(&failure)
        }
    })
}

/// A service route answers only a business service's key (WXHOST_SERVICE_KEYS),
/// checked before any plugin runs; returns the service's name.
fn authenticate_service(state: &RoleState, parts: &axum::http::request::Parts) -> Result<String, ApiError> {
    let Some(keys) = &state.guards.services else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_configured",
            "no business service keys are configured",
        ));
    };
    let credential = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    keys.authenticate(credential).map(str::to_string).ok_or_else(|| {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a business service's key is required")
    })
}

/// The internal API answers only calls signed with INTERNAL_SECRET, checked
/// before any plugin runs.
fn authenticate_internal(
    state: &RoleState,
    parts: &axum::http::request::Parts,
    body: &[u8],
) -> Result<(), ApiError> {
    if state.role != Role::App {
        return Err(ApiError::not_found());
    }
    let Some(auth) = &state.guards.internal else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_configured",
            "the internal API is not configured",
        ));
    };
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    auth.verify(
        parts.method.as_str(),
        path,
        header(TIMESTAMP_HEADER),
        header(SIGNATURE_HEADER),
        body,
        crate::internal_auth::unix_now(),
    )
    .map_err(|e| {
        tracing::warn!(path, "internal call refused: {e}");
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "internal calls must be signed")
    })
}

fn failure_response(failure: &PluginFailure) -> Response {
    let (status, code, message) = match failure {
        PluginFailure::Timeout(_) => {
            (StatusCode::GATEWAY_TIMEOUT, "plugin_timeout", "the handler did not finish in time")
        }
        PluginFailure::OutOfMemory => {
            (StatusCode::INTERNAL_SERVER_ERROR, "plugin_out_of_memory", "the handler ran out of memory")
        }
        PluginFailure::Trap(_) => (StatusCode::INTERNAL_SERVER_ERROR, "plugin_failed", "the handler failed"),
        // Dispatch adds Retry-After to every 503.
        PluginFailure::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy", "the server is busy, try again"),
    };
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

/// A plugin's response as HTTP; an impossible status or header is a plugin bug, answered 500.
fn to_http(r: wit::Response) -> Response {
    let Ok(status) = StatusCode::from_u16(r.status) else {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "plugin_failed",
            "the handler answered an invalid status",
        )
        .into_response();
    };
    let mut response = Response::new(Body::from(r.body));
    *response.status_mut() = status;
    for (name, value) in r.headers {
        // Framing is the host's business: a plugin cannot desynchronise the connection.
        if HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            continue;
        }
        match (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str())) {
            (Ok(n), Ok(v)) => {
                response.headers_mut().append(n, v);
            }
            _ => tracing::warn!(header = name, "plugin answered an invalid header; dropped"),
        }
    }
    response
}

/// The admin API: plugins and reloads. Bound to loopback only.
/// The admin listener (loopback only): health, plugins, metrics, reload.
/// Anything that changes state takes `Authorization: Bearer` with
/// `WXHOST_CONTROL_TOKEN`; every request must name a loopback `Host`, so a
/// page in a browser on the same machine cannot reach it through a DNS name
/// rebound to 127.0.0.1.
pub fn admin_router(host: Arc<Host>, control_token: Option<SecretString>) -> Router {
    let control = Arc::new(control_token);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/admin/plugins", get(admin_plugins))
        .route("/admin/reload", post(admin_reload))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::not_found() })
        .with_state(host)
        .layer(axum::middleware::from_fn(move |request, next| admin_guard(control.clone(), request, next)))
}

async fn admin_guard(
    control_token: Arc<Option<SecretString>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    if !names_loopback(host) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "the admin API answers only requests for a loopback Host (127.0.0.1, [::1] or localhost)",
        )
        .into_response();
    }
    if !matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD) {
        let Some(expected) = control_token.as_ref() else {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "control_disabled",
                "set WXHOST_CONTROL_TOKEN to change state over the admin API (SIGHUP reloads without it)",
            )
            .into_response();
        };
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        use subtle::ConstantTimeEq;
        if given.is_empty() || !bool::from(given.as_bytes().ct_eq(expected.expose_secret().as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this admin endpoint takes Authorization: Bearer <WXHOST_CONTROL_TOKEN>",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Whether a `Host` header names this machine's loopback: `localhost`, an
/// address in 127.0.0.0/8 or `[::1]`, with or without a port.
fn names_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Prometheus exposition of this process's metrics.
async fn metrics_text(State(host): State<Arc<Host>>) -> impl IntoResponse {
    let db = host.services.get::<DbCtx>().map(|d| &d.db);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::metrics::render(db))
}

async fn admin_plugins(State(host): State<Arc<Host>>) -> impl IntoResponse {
    let mut plugins = Vec::new();
    for role in host.roles() {
        for p in &host.runtime(role).plugins {
            plugins.push(serde_json::json!({
                "name": p.identity.name,
                "role": role,
                "version": p.identity.version,
                "wasm": p.wasm.display().to_string(),
                "routes": p.routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "capabilities": p.capabilities,
                "imports": p.imports,
                // 1: a fresh instance per request; more: instances reused (README, "Instance reuse").
                "requests_per_instance": p.requests_per_instance,
                "idle_instances": p.idle.len(),
                "loaded_at_unix": p.loaded_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default(),
            }));
        }
    }
    axum::Json(serde_json::json!({ "plugins": plugins, "last_reload": host.status() }))
}

async fn admin_reload(State(host): State<Arc<Host>>) -> Response {
    let status = host.reload("admin").await;
    let code = if status.ok { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
    (code, axum::Json(status)).into_response()
}

/// How long the watcher waits for a burst of file events to settle.
const SETTLE: Duration = Duration::from_millis(200);

/// Reloads when plugins.toml or a plugin's wasm changes. Folders are watched,
/// not files, so an editor's or a deploy's rename-over is seen too.
/// Expired QR bindings, sessions and old applied-event records are deleted
/// every few minutes (every app process does it; the deletes are idempotent).
async fn prune_periodically(db: database::Database, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match database::prune_expired(&db, crate::caps::session::unix_now()).await {
            Ok(p) if p != database::Pruned::default() => tracing::info!(
                bindings = p.bindings,
                sessions = p.sessions,
                events = p.events,
                "expired QR bindings, sessions and applied-event records deleted"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("pruning expired rows failed: {e:#}"),
        }
    }
}

/// Calls the app role's scheduled internal routes (plugins.toml `jobs`), each
/// at its own pace, as the plugins loaded now declare them (a reload changes
/// the schedule). One call at a time: a job never overlaps itself here, and
/// the plugin's own claims keep several processes from doing the same work.
async fn run_jobs(host: Arc<Host>, shutdown: CancellationToken) {
    let mut last_run: std::collections::BTreeMap<(String, config::RouteSpec), std::time::Instant> =
        std::collections::BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let runtime = host.runtime(Role::App);
        for plugin in &runtime.plugins {
            for job in &plugin.jobs {
                let key = (plugin.identity.name.clone(), job.route.clone());
                if last_run.get(&key).is_some_and(|at| at.elapsed() < job.every) {
                    continue;
                }
                last_run.insert(key, std::time::Instant::now());
                let request_id = format!("job-{:028x}", rand::random::<u128>() >> 16);
                let request = wit::Request {
                    method: job.route.method.clone(),
                    route: job.route.path.clone(),
                    path: job.route.path.clone(),
                    query: String::new(),
                    params: Vec::new(),
                    headers: Vec::new(),
                    body: Vec::new(),
                    request_id: request_id.clone(),
                    client_ip: None,
                    service: None,
                };
                match host.call(plugin.clone(), request).await {
                    Ok(r) if (200..300).contains(&r.status) => {}
                    Ok(r) => {
                        tracing::warn!(plugin = %plugin.identity.name, route = %job.route, status = r.status, request_id, "scheduled job failed")
                    }
                    Err(failure) => {
                        tracing::warn!(plugin = %plugin.identity.name, route = %job.route, request_id, "scheduled job failed: {failure}")
                    }
                }
            }
        }
    }
}

async fn watch_files(host: Arc<Host>, shutdown: CancellationToken) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let _ = tx.send(event.paths);
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!("file watching is unavailable ({e}); reload with SIGHUP or POST /admin/reload");
            return;
        }
    };
    let mut watched_dirs: Vec<PathBuf> = Vec::new();
    loop {
        let files = host.watched_files();
        let dirs: Vec<PathBuf> = files
            .iter()
            .filter_map(|f| {
                f.parent()
                    .map(|p| if p.as_os_str().is_empty() { PathBuf::from(".") } else { p.to_path_buf() })
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if dirs != watched_dirs {
            for d in &watched_dirs {
                let _ = watcher.unwatch(d);
            }
            for d in &dirs {
                if let Err(e) = watcher.watch(d, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %d.display(), "cannot watch: {e}");
                }
            }
            watched_dirs = dirs;
        }
        // Wait for a change to a watched file, then for the burst to settle.
        loop {
            let paths = tokio::select! {
                _ = shutdown.cancelled() => return,
                paths = rx.recv() => match paths { Some(p) => p, None => return },
            };
            if paths.iter().any(|p| host::is_watched(p, &files)) {
                break;
            }
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SETTLE) => break,
                _ = rx.recv() => {}
            }
        }
        host.reload("file change").await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_cannot_set_framing_headers_or_an_impossible_status() {
        let response = to_http(wit::Response {
            status: 200,
            headers: vec![
                ("Content-Length".into(), "99999".into()),
                ("transfer-encoding".into(), "chunked".into()),
                ("x-kept".into(), "yes".into()),
                ("bad header".into(), "dropped".into()),
            ],
            body: b"ok".to_vec(),
            outcome: None,
        });
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers().get("x-kept").unwrap(), "yes");
        assert!(response.headers().get("content-length").is_none());
        assert!(response.headers().get("transfer-encoding").is_none());
        assert_eq!(response.headers().len(), 1);

        let impossible =
            to_http(wit::Response { status: 1000, headers: vec![], body: vec![], outcome: None });
        assert_eq!(impossible.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn only_loopback_hosts_reach_the_admin_api() {
        for host in [
            "127.0.0.1:9090",
            "127.0.0.1",
            "127.1.2.3:1",
            "localhost:9090",
            "LOCALHOST",
            "[::1]:9090",
            "[::1]",
        ] {
            assert!(names_loopback(host), "{host}");
        }
        for host in [
            "",
            "evil.example:9090",
            "localhost.evil.example",
            "10.0.0.1:9090",
            "[::2]:1",
            "127.0.0.1.nip.io",
        ] {
            assert!(!names_loopback(host), "{host}");
        }
    }
}
