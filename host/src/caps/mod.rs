//! Host capabilities. Each module is a thin adapter over the protocol and
//! host code it lends: it owns its WIT name, the roles that may grant it,
//! how its context is built from the settings, its linker entry and the
//! borrowed view of the per-request state (the pattern of wasmtime's
//! wasi-http and Spin's factors), all in its [`CapabilitySpec`]. Adding a
//! capability is one module and one line in [`REGISTRY`].
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

use std::any::{Any, TypeId};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::database::{Database, PoolSettings};
use crate::role::Role;
use crate::settings::Settings;

/// Every capability the host has: one line each.
pub const REGISTRY: [&CapabilitySpec; 8] = [
    &log::SPEC,
    &config::SPEC,
    &db::SPEC,
    &callback_crypto::SPEC,
    &internal_call::SPEC,
    &wechat_api::SPEC,
    &wechat_pay::SPEC,
    &session::SPEC,
];

/// What a capability module declares about itself.
pub struct CapabilitySpec {
    /// The WIT interface name, which is also its name in plugins.toml.
    pub name: &'static str,
    /// The roles that may grant it: their worlds in `wit/worlds.wit` import
    /// it (a test holds the two to each other).
    pub roles: &'static [Role],
    /// Builds the process's context from the settings (checking them), or
    /// none when this process cannot offer it (calls then answer
    /// not-configured or unavailable).
    pub open: for<'a> fn(&'a ServiceInputs<'a>) -> BoxFuture<'a, anyhow::Result<Option<Context>>>,
    /// Adds its WIT interface to a plugin's linker.
    pub link: fn(&mut Linker<PluginState>) -> wasmtime::Result<()>,
}

/// A capability's owned context, shared by every request of the process.
pub type Context = Box<dyn Any + Send + Sync>;

/// For capabilities that need no context of their own.
pub fn no_context<'a>(_: &'a ServiceInputs<'a>) -> BoxFuture<'a, anyhow::Result<Option<Context>>> {
    Box::pin(async { Ok(None) })
}

/// What the capabilities' contexts are built from, once per process.
pub struct ServiceInputs<'a> {
    pub settings: &'a Settings,
    /// The roles this process serves.
    pub roles: &'a [Role],
    /// The host's own database (app role), migrated; `None` in the web role.
    pub database: Option<&'a Database>,
    /// Its URL, from which the plugins' own connections are derived.
    pub database_url: &'a str,
    pub pool: &'a PoolSettings,
    pub token_endpoint: wechat_api::TokenEndpoint,
    pub menu_cache: Duration,
    pub session_ttl: Duration,
    pub timestamp_window_secs: Option<u64>,
    pub accept_plaintext_with_aes_key: bool,
    /// WeChat Pay's keys (WECHATPAY_PLATFORM_PUBLIC_KEY), one live set per
    /// process shared by every capability that checks WeChat Pay's signatures.
    pub platform_keys: Option<crate::wechat::pay::LiveKeys>,
}

/// A capability a role can grant and a plugin can declare; one WIT interface each.
#[derive(Clone, Copy)]
pub struct Capability(&'static CapabilitySpec);

impl Capability {
    /// Every capability, in registry order.
    pub fn all() -> impl Iterator<Item = Capability> {
        REGISTRY.into_iter().map(Capability)
    }

    /// The name used in plugins.toml, which is also the WIT interface name.
    pub fn name(self) -> &'static str {
        self.0.name
    }

    pub fn spec(self) -> &'static CapabilitySpec {
        self.0
    }

    pub fn parse(s: &str) -> Option<Capability> {
        Capability::all().find(|c| c.name() == s)
    }

    pub fn names() -> String {
        Capability::all().map(Capability::name).collect::<Vec<_>>().join(", ")
    }

    /// The capability a component import (`wxhost:plugin/db@0.1.0`) asks for.
    pub fn of_import(import: &str) -> Option<Capability> {
        let rest = import.strip_prefix(WIT_PACKAGE)?.strip_prefix('/')?;
        let name = rest.split('@').next()?;
        Capability::parse(name)
    }

    /// Whether `role` may grant it.
    pub fn grantable_by(self, role: Role) -> bool {
        self.0.roles.contains(&role)
    }
}

impl From<&'static CapabilitySpec> for Capability {
    fn from(spec: &'static CapabilitySpec) -> Self {
        Capability(spec)
    }
}

impl PartialEq for Capability {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Capability {}

impl PartialOrd for Capability {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Capability {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.name().cmp(other.name())
    }
}

impl std::hash::Hash for Capability {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state)
    }
}

impl std::fmt::Debug for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Capability {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// What `role` may grant at most: its world in `wit/worlds.wit`.
pub fn grantable(role: Role) -> Vec<Capability> {
    Capability::all().filter(|c| c.grantable_by(role)).collect()
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

/// The capabilities' owned contexts of a process, by type. A role that is
/// not granted a capability never has its context consulted.
#[derive(Default)]
pub struct Services {
    contexts: Vec<(TypeId, Arc<dyn Any + Send + Sync>)>,
}

impl Services {
    /// Builds every registered capability's context.
    pub async fn open(inputs: &ServiceInputs<'_>) -> anyhow::Result<Services> {
        let mut services = Services::default();
        for spec in REGISTRY {
            if let Some(context) = (spec.open)(inputs).await? {
                services.insert_boxed(context);
            }
        }
        Ok(services)
    }

    /// Adds (or replaces) a context.
    pub fn with<T: Any + Send + Sync>(mut self, context: T) -> Services {
        self.insert_boxed(Box::new(context));
        self
    }

    fn insert_boxed(&mut self, context: Context) {
        let id = (*context).type_id();
        self.contexts.retain(|(t, _)| *t != id);
        self.contexts.push((id, Arc::from(context)));
    }

    /// The context of type `T`, shared, for a task that outlives a request.
    pub fn shared<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let (_, context) = self.contexts.iter().find(|(t, _)| *t == TypeId::of::<T>())?;
        context.clone().downcast().ok()
    }

    /// The context of type `T`, if this process has one.
    pub fn get<T: Any>(&self) -> Option<&T> {
        // A handful of entries: a scan beats hashing.
        self.contexts.iter().find(|(t, _)| *t == TypeId::of::<T>()).and_then(|(_, c)| c.downcast_ref())
    }
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
        (cap.spec().link)(&mut linker)?;
    }
    Ok(linker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capability_has_one_registry_entry_under_a_unique_name() {
        let names: BTreeSet<&str> = Capability::all().map(Capability::name).collect();
        assert_eq!(names.len(), REGISTRY.len());
        for c in Capability::all() {
            assert_eq!(Capability::parse(c.name()), Some(c));
            assert_eq!(Capability::of_import(&format!("{WIT_PACKAGE}/{}@0.1.0", c.name())), Some(c));
            assert!(!c.spec().roles.is_empty(), "{c} is grantable by no role");
        }
        assert_eq!(Capability::of_import("wasi:http/outgoing-handler@0.2.0"), None);
    }

    #[test]
    fn contexts_are_found_by_their_type_and_replaced_not_duplicated() {
        let services = Services::default().with(7u32).with("a".to_string()).with(8u32);
        assert_eq!(services.get::<u32>(), Some(&8));
        assert_eq!(services.get::<String>().map(String::as_str), Some("a"));
        assert_eq!(services.get::<i64>(), None);
    }
}
