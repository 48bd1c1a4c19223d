//! Host capabilities. Each module owns its context, borrows a view of the
//! per-request state, and adds its own WIT interface to a linker
//! (`add_to_linker`), the pattern of wasmtime's wasi-http and Spin's factors.
//! A plugin's linker holds only what its role grants and it declares.

pub mod callback_crypto;
pub mod config;
pub mod db;
pub mod internal_call;
pub mod log;
pub mod session;
pub mod wasi;
pub mod wechat_api;
pub mod wechat_pay;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// A capability a role can grant and a plugin can declare; one WIT interface each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    Log,
    Config,
    Db,
    CallbackCrypto,
    InternalCall,
    WechatApi,
    WechatPay,
    Session,
}

impl Capability {
    pub const ALL: [Capability; 8] = [
        Capability::Log,
        Capability::Config,
        Capability::Db,
        Capability::CallbackCrypto,
        Capability::InternalCall,
        Capability::WechatApi,
        Capability::WechatPay,
        Capability::Session,
    ];

    /// The name used in plugins.toml, which is also the WIT interface name.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Config => "config",
            Capability::Db => "db",
            Capability::CallbackCrypto => "callback-crypto",
            Capability::InternalCall => "internal-call",
            Capability::WechatApi => "wechat-api",
            Capability::WechatPay => "wechat-pay",
            Capability::Session => "session",
        }
    }

    pub fn parse(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == s)
    }

    pub fn names() -> String {
        Capability::ALL.map(Capability::name).join(", ")
    }

    /// The capability a component import (`wxhost:plugin/db@0.1.0`) asks for.
    pub fn of_import(import: &str) -> Option<Capability> {
        let rest = import.strip_prefix(WIT_PACKAGE)?.strip_prefix('/')?;
        let name = rest.split('@').next()?;
        Capability::parse(name)
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What `role` may grant at most: its world in `wit/worlds.wit` (a test holds
/// the two to each other).
pub fn grantable(role: crate::role::Role) -> &'static [Capability] {
    use Capability::*;
    match role {
        crate::role::Role::Web => &[Log, Config, CallbackCrypto, InternalCall],
        crate::role::Role::App => &[Log, Config, Db, WechatApi, WechatPay, Session, CallbackCrypto],
    }
}

/// The WIT package every capability interface belongs to.
pub const WIT_PACKAGE: &str = "wxhost:plugin";

/// The types-only interface every plugin imports alongside its handler export.
pub const TYPES_INTERFACE: &str = "wxhost:plugin/types@0.1.0";

/// Who a running instance is, for logs and the config capability.
#[derive(Debug)]
pub struct PluginIdentity {
    pub name: String,
    /// Content hash of the `.wasm` (hex, 16 digits).
    pub version: String,
    /// The plugin's `[plugins.config]` table.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// WeChat API paths the plugin may call.
    pub wechat_api: Vec<String>,
}

/// Resources shared by every request of a process: the capabilities' owned contexts.
/// A role that is not granted a capability never has its context consulted.
#[derive(Default)]
pub struct Services {
    pub db: Option<db::DbCtx>,
    pub callback_crypto: Option<callback_crypto::CallbackCrypto>,
    pub internal_call: Option<internal_call::InternalClient>,
    pub wechat_api: Option<wechat_api::WechatApi>,
    pub wechat_pay: Option<wechat_pay::WechatPay>,
    pub sessions: Option<session::Sessions>,
}

/// The store data of one request's instance.
pub struct PluginState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: MemoryLimiter,
    pub plugin: Arc<PluginIdentity>,
    pub services: Arc<Services>,
    /// The id the request is logged under, passed on to the app role.
    pub request_id: String,
    /// The same, for the plugin's output streams.
    pub current_request: wasi::CurrentRequest,
    /// When the request's deadline passes; outbound calls are bounded by it.
    pub deadline_at: Instant,
}

impl PluginState {
    pub fn new(
        plugin: Arc<PluginIdentity>,
        services: Arc<Services>,
        memory_limit_bytes: usize,
        request_id: String,
        deadline_at: Instant,
    ) -> Self {
        let current_request = wasi::CurrentRequest::default();
        current_request.set(&request_id);
        PluginState {
            wasi: wasi::plugin_ctx(&plugin, &current_request),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_limit_bytes),
            plugin,
            services,
            request_id,
            current_request,
            deadline_at,
        }
    }
}

impl PluginState {
    /// A kept instance takes on its next request.
    pub fn begin_request(&mut self, request_id: String, deadline_at: Instant) {
        self.current_request.set(&request_id);
        self.request_id = request_id;
        self.deadline_at = deadline_at;
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Caps each instance's linear memory; remembers that the cap was hit so the
/// request can be reported as an out-of-memory kill rather than a plain trap.
pub struct MemoryLimiter {
    max_bytes: usize,
    pub exceeded: bool,
}

impl MemoryLimiter {
    pub fn new(max_bytes: usize) -> Self {
        MemoryLimiter { max_bytes, exceeded: false }
    }
}

/// The error a memory growth past the limit traps with.
#[derive(Debug, thiserror::Error)]
#[error("plugin memory limit of {0} bytes exceeded")]
pub struct MemoryLimitExceeded(pub usize);

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.exceeded = true;
            return Err(wasmtime::Error::new(MemoryLimitExceeded(self.max_bytes)));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A linker holding WASI (restricted) and exactly the given capabilities.
pub fn linker(engine: &Engine, capabilities: &BTreeSet<Capability>) -> wasmtime::Result<Linker<PluginState>> {
    let mut linker = Linker::new(engine);
    wasi::add_to_linker(&mut linker)?;
    // The shared request/response types: no functions, nothing to grant.
    linker.instance(TYPES_INTERFACE)?;
    for cap in capabilities {
        match cap {
            Capability::Log => log::add_to_linker(&mut linker, log_view)?,
            Capability::Config => config::add_to_linker(&mut linker, config_view)?,
            Capability::Db => db::add_to_linker(&mut linker, db_view)?,
            Capability::CallbackCrypto => callback_crypto::add_to_linker(&mut linker, callback_crypto_view)?,
            Capability::InternalCall => internal_call::add_to_linker(&mut linker, internal_call_view)?,
            Capability::WechatApi => wechat_api::add_to_linker(&mut linker, wechat_api_view)?,
            Capability::WechatPay => wechat_pay::add_to_linker(&mut linker, wechat_pay_view)?,
            Capability::Session => session::add_to_linker(&mut linker, session_view)?,
        }
    }
    Ok(linker)
}

fn log_view(s: &mut PluginState) -> log::LogView<'_> {
    log::LogView { plugin: &s.plugin, request_id: &s.request_id }
}

fn config_view(s: &mut PluginState) -> config::ConfigView<'_> {
    config::ConfigView { plugin: &s.plugin }
}

fn db_view(s: &mut PluginState) -> db::DbView<'_> {
    db::DbView { ctx: s.services.db.as_ref(), table: &mut s.table }
}

fn callback_crypto_view(s: &mut PluginState) -> callback_crypto::CallbackCryptoView<'_> {
    callback_crypto::CallbackCryptoView { ctx: s.services.callback_crypto.as_ref() }
}

fn internal_call_view(s: &mut PluginState) -> internal_call::InternalCallView<'_> {
    internal_call::InternalCallView {
        ctx: s.services.internal_call.as_ref(),
        request_id: &s.request_id,
        deadline_at: s.deadline_at,
    }
}

fn wechat_api_view(s: &mut PluginState) -> wechat_api::WechatApiView<'_> {
    wechat_api::WechatApiView {
        ctx: s.services.wechat_api.as_ref(),
        allowed_paths: &s.plugin.wechat_api,
        deadline_at: s.deadline_at,
    }
}

fn wechat_pay_view(s: &mut PluginState) -> wechat_pay::WechatPayView<'_> {
    wechat_pay::WechatPayView { ctx: s.services.wechat_pay.as_ref(), deadline_at: s.deadline_at }
}

fn session_view(s: &mut PluginState) -> session::SessionView<'_> {
    session::SessionView { ctx: s.services.sessions.as_ref() }
}
