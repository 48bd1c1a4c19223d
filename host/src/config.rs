//! `plugins.toml`: roles, plugins, routes and capabilities (never secrets).
//!
//! Parsing rejects unknown keys; [`validate`] then checks the whole file in one
//! pass and reports every problem it finds, not just the first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::caps::Capability;

/// Default path of the configuration file.
pub const DEFAULT_CONFIG: &str = "plugins.toml";

/// Paths the host answers itself on every role listener.
const RESERVED_PATHS: &[&str] = &["/healthz"];

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// WeChat gives a callback 5 s; the web role must answer well before.
const WECHAT_CALLBACK_LIMIT_MS: u64 = 5_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    host: RawHost,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    wechat: RawWechat,
    #[serde(default)]
    sessions: RawSessions,
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    frontend: RawFrontend,
    #[serde(default)]
    roles: BTreeMap<String, RawRole>,
    #[serde(default)]
    plugins: Vec<RawPlugin>,
    /// `"METHOD /route" = { per_minute, burst }`: per-client limits.
    #[serde(default)]
    rate_limits: BTreeMap<String, RawRateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_minute: u32,
    burst: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHost {
    max_instances: Option<u32>,
    /// Reset only the memory pages a request wrote (Linux 6.7+, PAGEMAP_SCAN).
    reset_dirty_pages_only: Option<bool>,
    /// Peers whose `X-Forwarded-For` names the client (the nginx in front).
    trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWechat {
    timestamp_window_secs: Option<u64>,
    accept_plaintext_with_aes_key: Option<bool>,
    token_endpoint: Option<String>,
    /// How long the menu (`cgi-bin/menu/get`) is served from this process's copy.
    menu_cache_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSessions {
    ttl_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    /// Connections per app process.
    max_connections: Option<u32>,
    /// How long a request waits for a free connection before it is answered 503.
    acquire_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFrontend {
    /// Folder of the member pages, served by the app role.
    root: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    listen: String,
    #[serde(default)]
    grants: Vec<String>,
    deadline_ms: Option<u64>,
    memory_limit_mib: Option<u64>,
    max_body_kib: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: String,
    role: String,
    wasm: PathBuf,
    #[serde(default)]
    routes: Vec<String>,
    /// Routes only business services may call (WXHOST_SERVICE_KEYS), app role only.
    #[serde(default)]
    service_routes: Vec<String>,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    config: toml::Table,
    /// WeChat API paths the plugin may call through `wechat-api`.
    #[serde(default)]
    wechat_api: Vec<String>,
    /// Requests one instance may serve before it is dropped (1: a fresh
    /// instance per request, the default).
    requests_per_instance: Option<u32>,
    /// Internal routes of this plugin the host calls on a schedule (app role).
    #[serde(default)]
    jobs: Vec<RawJob>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    route: String,
    every_secs: u64,
}

/// An internal route of a plugin that each app process calls every `every`
/// (outbox delivery, say): plugins have no timers of their own.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub route: RouteSpec,
    pub every: std::time::Duration,
}

pub use crate::role::Role;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from; relative wasm paths are resolved against its folder.
    pub path: PathBuf,
    pub max_instances: u32,
    /// After a request, reset only the pages of an instance's memory that it
    /// wrote (found with Linux's PAGEMAP_SCAN, 6.7+; older kernels fall back)
    /// rather than zeroing every kept byte. Off by default: for GET verify it
    /// saves instructions but costs time (the scan is kernel work; bench/run row 1-2).
    pub reset_dirty_pages_only: bool,
    pub admin_listen: SocketAddr,
    /// Accepted distance of a callback's timestamp from now; `None` disables the check.
    pub timestamp_window_secs: Option<u64>,
    /// Plaintext pushes accepted although WECHAT_AES_KEY is set (a switch of mode).
    pub accept_plaintext_with_aes_key: bool,
    pub token_endpoint: crate::caps::wechat_api::TokenEndpoint,
    /// Lifetime of login sessions.
    pub session_ttl_secs: u64,
    /// The database pool of an app process (`[database]`).
    pub pool: crate::database::PoolSettings,
    /// The member pages' folder (app role), if configured.
    pub frontend_root: Option<PathBuf>,
    pub roles: BTreeMap<Role, RoleConfig>,
    pub plugins: Vec<PluginSpec>,
    /// Per-client limits of routes (`[rate_limits]`), checked before the plugin runs.
    pub rate_limits: Vec<(RouteSpec, RateLimit)>,
    /// Peers whose `X-Forwarded-For` is believed (`[host] trusted_proxies`).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// How long the menu is served from a process's copy (0: always asked).
    pub menu_cache: std::time::Duration,
}

/// Requests one client may make to a route: `per_minute` on average, `burst` at once.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub per_minute: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoleConfig {
    pub listen: SocketAddr,
    pub grants: BTreeSet<Capability>,
    pub deadline_ms: u64,
    pub memory_limit_bytes: usize,
    pub max_body_bytes: usize,
}

/// Upper bound of `requests_per_instance`: an instance is renewed at least this
/// often, so whatever a plugin leaks or leaves behind has a bounded life.
pub const MAX_REQUESTS_PER_INSTANCE: u32 = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    pub name: String,
    pub role: Role,
    pub wasm: PathBuf,
    /// Every route, `service_routes` included.
    pub routes: Vec<RouteSpec>,
    /// The routes the host answers only for a business service's key.
    pub service_routes: BTreeSet<RouteSpec>,
    /// What the plugin declares; it is linked with these (all granted by its role).
    pub capabilities: BTreeSet<Capability>,
    pub config: toml::Table,
    /// WeChat API paths (`cgi-bin/menu/get`) the plugin may call.
    pub wechat_api: Vec<String>,
    /// How many requests one instance serves. 1 (the default) is a fresh
    /// sandbox per request; more trades isolation between this plugin's
    /// requests for speed (see the README, "Instance reuse").
    pub requests_per_instance: u32,
    /// What the host calls on a schedule.
    pub jobs: Vec<Job>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct RouteSpec {
    pub method: String,
    pub path: String,
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} has {} problem(s):", self.path.display(), self.problems.len())?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let fail = |problem: String| ConfigErrors { path: path.to_path_buf(), problems: vec![problem] };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    parse(&text, path)
}

/// Parses and validates configuration text; `path` names it and anchors relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigErrors {
        path: path.to_path_buf(),
        problems: vec![e.to_string().trim_end().to_string()],
    })?;
    validate(raw, path)
}

fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigErrors> {
    let mut problems = Vec::new();
    let base = path.parent().unwrap_or(Path::new("."));

    let admin_listen =
        parse_addr(raw.admin.listen.as_deref().unwrap_or("127.0.0.1:9090"), "[admin] listen", &mut problems);
    if let Some(addr) = admin_listen
        && !addr.ip().is_loopback()
    {
        problems.push(format!(
            "[admin] listen {addr} must be a loopback address: the admin API is not authenticated"
        ));
    }

    let mut roles = BTreeMap::new();
    for (name, r) in &raw.roles {
        let Some(role) = Role::parse(name) else {
            problems.push(format!("[roles.{name}]: unknown role (expected `web` or `app`)"));
            continue;
        };
        let listen = parse_addr(&r.listen, &format!("[roles.{name}] listen"), &mut problems);
        let mut grants = BTreeSet::new();
        for g in &r.grants {
            match Capability::parse(g) {
                None => problems.push(format!(
                    "[roles.{name}] grants unknown capability `{g}` (known: {})",
                    Capability::names()
                )),
                Some(cap) if !cap.grantable_by(role) => problems
                    .push(format!("[roles.{name}] grants `{g}`, which the {role} role can never have")),
                Some(cap) => {
                    grants.insert(cap);
                }
            }
        }
        let deadline_ms = r.deadline_ms.unwrap_or(role.default_deadline_ms());
        if deadline_ms == 0 || deadline_ms > 60_000 {
            problems.push(format!("[roles.{name}] deadline_ms = {deadline_ms} must be between 1 and 60000"));
        }
        if role == Role::Web && deadline_ms >= WECHAT_CALLBACK_LIMIT_MS {
            problems.push(format!(
                "[roles.web] deadline_ms = {deadline_ms} must stay under WeChat's {WECHAT_CALLBACK_LIMIT_MS} ms callback limit"
            ));
        }
        let memory_mib = r.memory_limit_mib.unwrap_or(64);
        if !(1..=4096).contains(&memory_mib) {
            problems
                .push(format!("[roles.{name}] memory_limit_mib = {memory_mib} must be between 1 and 4096"));
        }
        let body_kib = r.max_body_kib.unwrap_or(1024);
        if !(1..=65536).contains(&body_kib) {
            problems.push(format!("[roles.{name}] max_body_kib = {body_kib} must be between 1 and 65536"));
        }
        if let Some(listen) = listen {
            roles.insert(
                role,
                RoleConfig {
                    listen,
                    grants,
                    deadline_ms,
                    memory_limit_bytes: (memory_mib as usize) << 20,
                    max_body_bytes: (body_kib as usize) << 10,
                },
            );
        }
    }

    let mut plugins = Vec::new();
    let mut names = BTreeSet::new();
    for p in raw.plugins {
        let at = format!("plugin `{}`", p.name);
        if p.name.is_empty() || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            problems.push(format!("{at}: a name is letters, digits, `-` and `_`"));
        }
        if !names.insert(p.name.clone()) {
            problems.push(format!("{at} is defined more than once"));
        }
        let role = Role::parse(&p.role);
        let role_cfg = role.and_then(|r| roles.get(&r));
        match (role, role_cfg) {
            (None, _) => problems.push(format!("{at}: unknown role `{}`", p.role)),
            (Some(r), None) if !raw.roles.contains_key(r.name()) => {
                problems.push(format!("{at}: role `{r}` has no [roles.{r}] section"))
            }
            _ => {}
        }
        let wasm = base.join(&p.wasm);
        if !wasm.is_file() {
            problems.push(format!("{at}: wasm file {} does not exist", wasm.display()));
        }
        let mut capabilities = BTreeSet::new();
        for c in &p.capabilities {
            match Capability::parse(c) {
                None => problems
                    .push(format!("{at} declares unknown capability `{c}` (known: {})", Capability::names())),
                Some(cap) => {
                    if let (Some(r), Some(rc)) = (role, role_cfg)
                        && !rc.grants.contains(&cap)
                    {
                        problems.push(format!("{at} declares `{c}`, which role `{r}` does not grant"));
                    }
                    capabilities.insert(cap);
                }
            }
        }
        let mut routes = Vec::new();
        let mut service_routes = BTreeSet::new();
        for r in &p.service_routes {
            match parse_route(r) {
                Ok(_) if role != Some(Role::App) => {
                    problems.push(format!("{at}: service route `{r}`: business services call the app role"))
                }
                Ok(route) if route.path.starts_with(crate::internal_auth::INTERNAL_PREFIX) => problems.push(
                    format!("{at}: service route `{r}`: the internal API is for the web role, not services"),
                ),
                Ok(route)
                    if p.routes.iter().any(|other| parse_route(other).ok().as_ref() == Some(&route)) =>
                {
                    problems.push(format!("{at}: route `{r}` is in both routes and service_routes"))
                }
                Ok(route) => {
                    service_routes.insert(route);
                }
                Err(e) => problems.push(format!("{at}: service route `{r}`: {e}")),
            }
        }
        for r in &p.routes {
            match parse_route(r) {
                Ok(route)
                    if role != Some(Role::App)
                        && route.path.starts_with(crate::internal_auth::INTERNAL_PREFIX) =>
                {
                    problems.push(format!("{at}: route `{r}`: the internal API belongs to the app role"))
                }
                Ok(route) if ["/healthz", crate::openapi::PATH].contains(&route.path.as_str()) => {
                    problems.push(format!("{at}: route `{r}`: the host answers this path itself"))
                }
                Ok(route) => routes.push(route),
                Err(e) => problems.push(format!("{at}: route `{r}`: {e}")),
            }
        }
        if routes.is_empty() && p.routes.is_empty() && p.service_routes.is_empty() {
            problems.push(format!("{at} has no routes"));
        }
        routes.extend(service_routes.iter().cloned());
        for path in &p.wechat_api {
            let ok = !path.is_empty()
                && !path.starts_with('/')
                && !path.contains("..")
                && path.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-/".contains(&b));
            if !ok {
                problems.push(format!("{at}: wechat_api path `{path}` must look like `cgi-bin/menu/get`"));
            }
        }
        if !p.wechat_api.is_empty()
            && !capabilities.contains(&Capability::from(&crate::caps::wechat_api::SPEC))
        {
            problems.push(format!(
                "{at} lists wechat_api paths but does not declare the `wechat-api` capability"
            ));
        }
        let mut jobs = Vec::new();
        for j in &p.jobs {
            match parse_route(&j.route) {
                Ok(_) if role != Some(Role::App) => {
                    problems.push(format!("{at}: job `{}`: jobs run in the app role", j.route))
                }
                Ok(route) if !route.path.starts_with(crate::internal_auth::INTERNAL_PREFIX) => {
                    problems.push(format!(
                        "{at}: job `{}`: a job's route must be internal (under /api/v1/internal/)",
                        j.route
                    ))
                }
                Ok(route) if !routes.contains(&route) => {
                    problems.push(format!("{at}: job `{}` is not one of the plugin's routes", j.route))
                }
                Ok(_) if !(1..=86_400).contains(&j.every_secs) => {
                    problems.push(format!("{at}: job `{}`: every_secs must be 1 to 86400", j.route))
                }
                Ok(route) => jobs.push(Job { route, every: std::time::Duration::from_secs(j.every_secs) }),
                Err(e) => problems.push(format!("{at}: job `{}`: {e}", j.route)),
            }
        }
        let requests_per_instance = p.requests_per_instance.unwrap_or(1);
        if !(1..=MAX_REQUESTS_PER_INSTANCE).contains(&requests_per_instance) {
            problems.push(format!(
                "{at}: requests_per_instance must be 1 (a fresh instance per request) to {MAX_REQUESTS_PER_INSTANCE}"
            ));
        }
        if let Some(role) = role {
            plugins.push(PluginSpec {
                name: p.name,
                role,
                wasm,
                routes,
                service_routes,
                capabilities,
                config: p.config,
                wechat_api: p.wechat_api,
                requests_per_instance,
                jobs,
            });
        }
    }
    check_routes(&plugins, &mut problems);

    let token_endpoint = match raw.wechat.token_endpoint.as_deref() {
        None | Some("stable") => crate::caps::wechat_api::TokenEndpoint::Stable,
        Some("token") => crate::caps::wechat_api::TokenEndpoint::Plain,
        Some(other) => {
            problems.push(format!("[wechat] token_endpoint = \"{other}\" must be \"stable\" or \"token\""));
            crate::caps::wechat_api::TokenEndpoint::Stable
        }
    };
    let session_ttl_secs = raw.sessions.ttl_secs.unwrap_or(7 * 24 * 3600);
    if !(60..=90 * 24 * 3600).contains(&session_ttl_secs) {
        problems.push(format!("[sessions] ttl_secs = {session_ttl_secs} must be between 60 and 7776000"));
    }
    let max_instances = raw.host.max_instances.unwrap_or(256);
    if !(1..=10_000).contains(&max_instances) {
        problems.push(format!("[host] max_instances = {max_instances} must be between 1 and 10000"));
    }

    let defaults = crate::database::PoolSettings::default();
    let max_connections = raw.database.max_connections.unwrap_or(defaults.max_connections);
    if !(1..=1000).contains(&max_connections) {
        problems.push(format!("[database] max_connections = {max_connections} must be between 1 and 1000"));
    }
    let acquire_timeout_ms =
        raw.database.acquire_timeout_ms.unwrap_or(defaults.acquire_timeout.as_millis() as u64);
    if !(1..=60_000).contains(&acquire_timeout_ms) {
        problems.push(format!(
            "[database] acquire_timeout_ms = {acquire_timeout_ms} must be between 1 and 60000"
        ));
    }
    let pool = crate::database::PoolSettings {
        max_connections,
        acquire_timeout: std::time::Duration::from_millis(acquire_timeout_ms),
    };

    let frontend_root = raw.frontend.root.map(|r| base.join(r));
    if let Some(root) = &frontend_root
        && !root.join("index.html").is_file()
    {
        problems.push(format!("[frontend] root {} has no index.html", root.display()));
    }

    let mut rate_limits = Vec::new();
    for (route, limit) in &raw.rate_limits {
        let at = format!("[rate_limits] \"{route}\"");
        match parse_route(route) {
            Err(e) => problems.push(format!("{at}: {e}")),
            Ok(spec) if !plugins.iter().any(|p: &PluginSpec| p.routes.contains(&spec)) => {
                problems.push(format!("{at}: no plugin serves this route"))
            }
            Ok(spec) => {
                let burst = limit.burst.unwrap_or(limit.per_minute);
                if !(1..=100_000).contains(&limit.per_minute) || !(1..=100_000).contains(&burst) {
                    problems.push(format!("{at}: per_minute and burst must be between 1 and 100000"));
                }
                rate_limits.push((spec, RateLimit { per_minute: limit.per_minute, burst }));
            }
        }
    }
    let mut trusted_proxies = Vec::new();
    for proxy in raw.host.trusted_proxies.iter().flatten() {
        match proxy.parse() {
            Ok(ip) => trusted_proxies.push(ip),
            Err(_) => problems.push(format!("[host] trusted_proxies: `{proxy}` is not an IP address")),
        }
    }
    let menu_cache_secs = raw.wechat.menu_cache_secs.unwrap_or(60);
    if menu_cache_secs > 3600 {
        problems.push(format!("[wechat] menu_cache_secs = {menu_cache_secs} must be at most 3600"));
    }

    if !problems.is_empty() {
        return Err(ConfigErrors { path: path.to_path_buf(), problems });
    }
    Ok(Config {
        rate_limits,
        trusted_proxies,
        menu_cache: std::time::Duration::from_secs(menu_cache_secs),
        path: path.to_path_buf(),
        max_instances,
        reset_dirty_pages_only: raw.host.reset_dirty_pages_only.unwrap_or(false),
        admin_listen: admin_listen.expect("checked above"),
        timestamp_window_secs: match raw.wechat.timestamp_window_secs {
            Some(0) => None,
            Some(s) => Some(s),
            None => Some(300),
        },
        accept_plaintext_with_aes_key: raw.wechat.accept_plaintext_with_aes_key.unwrap_or(false),
        token_endpoint,
        session_ttl_secs,
        pool,
        frontend_root,
        roles,
        plugins,
    })
}

fn parse_addr(s: &str, what: &str, problems: &mut Vec<String>) -> Option<SocketAddr> {
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(format!("{what} = \"{s}\" is not an address like 127.0.0.1:8080"));
            None
        }
    }
}

fn parse_route(s: &str) -> Result<RouteSpec, String> {
    let (method, path) = s.trim().split_once(' ').ok_or("expected `METHOD /path`")?;
    let path = path.trim();
    if !METHODS.contains(&method) {
        return Err(format!("method `{method}` is not one of {}", METHODS.join(", ")));
    }
    if !path.starts_with('/') || path.contains(char::is_whitespace) || path.contains('?') {
        return Err("the path must start with `/` and hold no spaces or query".into());
    }
    if RESERVED_PATHS.contains(&path) {
        return Err(format!("{path} is answered by the host itself"));
    }
    matchit::Router::<()>::new().insert(path, ()).map_err(|e| format!("invalid path pattern: {e}"))?;
    Ok(RouteSpec { method: method.to_string(), path: path.to_string() })
}

/// Duplicate and overlapping routes within a role: a request must have exactly one plugin.
fn check_routes(plugins: &[PluginSpec], problems: &mut Vec<String>) {
    let mut seen: Vec<(Role, &RouteSpec, &str)> = Vec::new();
    for p in plugins {
        for route in &p.routes {
            for (role, other, owner) in &seen {
                if *role != p.role || other.method != route.method {
                    continue;
                }
                if other.path == route.path {
                    problems.push(format!(
                        "route `{route}` of plugin `{}` duplicates the same route of plugin `{owner}` (role {role})",
                        p.name
                    ));
                } else if patterns_overlap(&other.path, &route.path) {
                    problems.push(format!(
                        "route `{route}` of plugin `{}` overlaps route `{other}` of plugin `{owner}` (role {role})",
                        p.name
                    ));
                }
            }
            seen.push((p.role, route, &p.name));
        }
    }
}

/// Whether one request path could match both patterns.
fn patterns_overlap(a: &str, b: &str) -> bool {
    let mut router = matchit::Router::new();
    if router.insert(a, ()).is_err() {
        return false;
    }
    if router.insert(b, ()).is_err() {
        return true; // matchit refuses ambiguous pairs such as /x/{a} and /x/{b}
    }
    // Static and parametric patterns can coexist in a router yet overlap:
    // /x/me and /x/{id} both match /x/me.
    let probe = |pattern: &str| -> String {
        pattern
            .split('/')
            .map(|seg| if seg.starts_with('{') { "wxhost-probe" } else { seg })
            .collect::<Vec<_>>()
            .join("/")
    };
    let single = |pattern: &str, path: &str| {
        let mut r = matchit::Router::new();
        r.insert(pattern, ()).is_ok() && r.at(path).is_ok()
    };
    single(a, &probe(b)) || single(b, &probe(a)) || single(a, b) || single(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_wasm(dir: &Path, name: &str) {
        std::fs::write(dir.join(name), b"\0asm").unwrap();
    }

    #[test]
    fn a_config_with_several_mistakes_reports_every_one() {
        let dir = tempfile::tempdir().unwrap();
        write_wasm(dir.path(), "a.wasm");
        let text = r#"
            [roles.web]
            listen = "127.0.0.1:0"
            grants = ["log", "db", "teleport"]
            deadline_ms = 6000

            [roles.app]
            listen = "nowhere"
            grants = ["log", "db"]

            [[plugins]]
            name = "a"
            role = "web"
            wasm = "a.wasm"
            routes = ["GET /x", "FETCH /y"]
            capabilities = ["db", "internal-call"]

            [[plugins]]
            name = "b"
            role = "web"
            wasm = "missing.wasm"
            routes = ["GET /x", "GET /items/{id}", "GET /items/me"]
            service_routes = ["POST /spend"]
            requests_per_instance = 0
            jobs = [{ route = "POST /api/v1/internal/tick", every_secs = 0 }]

            [rate_limits]
            "POST /nowhere" = { per_minute = 5 }
            "GET /x" = { per_minute = 0 }
        "#;
        let err = parse(text, &dir.path().join("plugins.toml")).unwrap_err();
        let all = err.problems.join("\n");
        for expected in [
            "grants `db`, which the web role can never have",
            "unknown capability `teleport`",
            "must stay under WeChat's 5000 ms",
            "\"nowhere\" is not an address",
            "method `FETCH`",
            "declares `db`, which role `web` does not grant",
            "declares `internal-call`, which role `web` does not grant",
            "missing.wasm does not exist",
            "route `GET /x` of plugin `b` duplicates",
            "overlaps route `GET /items/{id}`",
            "requests_per_instance must be 1 (a fresh instance per request) to 10000",
            "service route `POST /spend`: business services call the app role",
            "job `POST /api/v1/internal/tick`: jobs run in the app role",
            "[rate_limits] \"POST /nowhere\": no plugin serves this route",
            "[rate_limits] \"GET /x\": per_minute and burst must be between 1 and 100000",
        ] {
            assert!(all.contains(expected), "missing problem {expected:?} in:\n{all}");
        }
        assert_eq!(err.problems.len(), 15, "{all}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err =
            parse("[roles.web]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n", Path::new("p.toml")).unwrap_err();
        assert!(err.problems[0].contains("unknown field `lisen`"), "{err}");
    }

    #[test]
    fn the_shipped_plugins_toml_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins.toml");
        let config = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.roles.contains_key(&Role::Web) && config.roles.contains_key(&Role::App));
        assert!(!config.roles[&Role::Web].grants.contains(&Capability::from(&crate::caps::db::SPEC)));
        assert!(
            config.rate_limits.iter().any(|(r, _)| r.to_string() == "POST /api/v1/auth/wechat/qrcode"),
            "QR creation is limited per client"
        );
        assert!(!config.reset_dirty_pages_only, "kept bytes are zeroed unless a plugins.toml asks otherwise");
        let asked = std::fs::read_to_string(&path)
            .unwrap()
            .replace("# reset_dirty_pages_only = false", "reset_dirty_pages_only = true");
        assert!(parse(&asked, &path).unwrap().reset_dirty_pages_only);
    }

    #[test]
    fn what_each_role_may_grant_is_exactly_its_world_in_wit() {
        let worlds = include_str!("../../wit/worlds.wit");
        for role in Role::ALL {
            let world = format!("world {}-plugin {{", role.name());
            let body = worlds.split(&world).nth(1).unwrap_or_else(|| panic!("wit has no {world}"));
            let body = body.split('}').next().unwrap();
            let mut imports: Vec<Capability> = body
                .lines()
                .filter_map(|l| l.trim().strip_prefix("import "))
                .map(|i| {
                    let name = i.trim_end_matches(';').trim();
                    Capability::parse(name).unwrap_or_else(|| panic!("{world} imports unknown `{name}`"))
                })
                .collect();
            let mut grantable = crate::caps::grantable(role);
            imports.sort();
            grantable.sort();
            assert_eq!(imports, grantable, "role {role}: host grants vs {world}");
        }
    }

    #[test]
    fn overlap_detection_tells_disjoint_from_overlapping_patterns() {
        assert!(patterns_overlap("/a/{x}", "/a/b"));
        assert!(patterns_overlap("/a/{x}", "/a/{y}"));
        assert!(!patterns_overlap("/a/{x}", "/b/{x}"));
        assert!(!patterns_overlap("/a/x", "/a/y"));
        assert!(!patterns_overlap("/a/{x}/c", "/a/{x}"));
    }
}
