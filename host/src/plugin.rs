//! Loading a plugin: compile the component, check its imports against what its
//! role grants and it declares, and pre-link it (`InstancePre`) so every
//! request only instantiates.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::bindings::PluginHostPre;
use crate::caps::{self, Capability, PluginState};
use crate::config::{PluginSpec, Role, RoleConfig, RouteSpec};

pub use crate::caps::PluginIdentity;

/// A plugin ready to serve: pre-linked against exactly its granted capabilities.
pub struct LoadedPlugin {
    pub identity: Arc<PluginIdentity>,
    pub role: Role,
    pub wasm: PathBuf,
    pub routes: Vec<RouteSpec>,
    /// Of `routes`, those only business services may call.
    pub service_routes: BTreeSet<RouteSpec>,
    /// Internal routes the host calls on a schedule.
    pub jobs: Vec<crate::config::Job>,
    pub capabilities: BTreeSet<Capability>,
    pub imports: Vec<ImportCheck>,
    pub loaded_at: SystemTime,
    pub deadline: Duration,
    pub memory_limit_bytes: usize,
    pub pre: PluginHostPre<PluginState>,
    /// `wxhost_plugin_instantiate_seconds` of this plugin, registered once:
    /// looking a labelled metric up per request would cost more than instantiating.
    pub instantiate_time: metrics::Histogram,
    /// Requests one instance serves (1: a fresh instance per request).
    pub requests_per_instance: u32,
    /// Instances kept between requests (none unless `requests_per_instance` > 1).
    pub idle: IdleInstances,
}

/// One import of a component and whether the plugin may have it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportCheck {
    pub name: String,
    pub granted: bool,
    pub note: String,
}

/// Why a plugin was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin `{plugin}`: cannot read {path}: {error}")]
    Read { plugin: String, path: String, error: std::io::Error },
    #[error("plugin `{plugin}`: {path} is not a valid wasm component: {error}")]
    Compile { plugin: String, path: String, error: String },
    #[error("plugin `{plugin}` refused: {}", .refused.join("; "))]
    Refused { plugin: String, refused: Vec<String> },
    #[error("plugin `{plugin}`: {error}")]
    Link { plugin: String, error: String },
}

/// Content hash of a wasm file: its version.
pub fn version_of(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

pub fn compile(engine: &Engine, spec: &PluginSpec, bytes: &[u8]) -> Result<Component, LoadError> {
    Component::new(engine, bytes).map_err(|e| LoadError::Compile {
        plugin: spec.name.clone(),
        path: spec.wasm.display().to_string(),
        error: format!("{e:#}"),
    })
}

/// Classifies every import of `component` for `spec` in its role.
pub fn check_imports(
    engine: &Engine,
    component: &Component,
    spec: &PluginSpec,
    role: &RoleConfig,
) -> Vec<ImportCheck> {
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| {
            let (granted, note) = if let Some(cap) = Capability::of_import(name) {
                if !role.grants.contains(&cap) {
                    (false, format!("capability `{cap}` is not granted to role {}", spec.role))
                } else if !spec.capabilities.contains(&cap) {
                    (false, format!("capability `{cap}` is not declared by the plugin in plugins.toml"))
                } else {
                    (true, format!("capability `{cap}`"))
                }
            } else if name == caps::TYPES_INTERFACE {
                (true, "shared types".into())
            } else if caps::wasi::is_linked(name) {
                (true, "WASI (no files, env or sockets)".into())
            } else {
                (false, "not provided by wxhost".into())
            };
            ImportCheck { name: name.to_string(), granted, note }
        })
        .collect()
}

/// Checks and pre-links a compiled plugin. Refused imports are named; nothing
/// is left to fail at call time.
pub fn prepare(
    engine: &Engine,
    spec: &PluginSpec,
    role: &RoleConfig,
    component: &Component,
    version: String,
    idle_capacity: usize,
) -> Result<LoadedPlugin, LoadError> {
    let imports = check_imports(engine, component, spec, role);
    let refused: Vec<String> = imports
        .iter()
        .filter(|i| !i.granted)
        .map(|i| format!("imports `{}`, but {}", i.name, i.note))
        .collect();
    if !refused.is_empty() {
        return Err(LoadError::Refused { plugin: spec.name.clone(), refused });
    }
    let linked: BTreeSet<Capability> = spec.capabilities.intersection(&role.grants).copied().collect();
    let link_err =
        |e: wasmtime::Error| LoadError::Link { plugin: spec.name.clone(), error: format!("{e:#}") };
    let linker = caps::linker(engine, &linked).map_err(link_err)?;
    let instance_pre = linker.instantiate_pre(component).map_err(link_err)?;
    let pre = PluginHostPre::new(instance_pre).map_err(|e| LoadError::Link {
        plugin: spec.name.clone(),
        error: format!("does not export the wxhost:plugin/handler interface: {e:#}"),
    })?;
    let config = match serde_json::to_value(&spec.config) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    Ok(LoadedPlugin {
        identity: Arc::new(PluginIdentity {
            name: spec.name.clone(),
            version,
            config,
            wechat_api: spec.wechat_api.clone(),
        }),
        role: spec.role,
        wasm: spec.wasm.clone(),
        routes: spec.routes.clone(),
        service_routes: spec.service_routes.clone(),
        jobs: spec.jobs.clone(),
        capabilities: linked,
        imports,
        loaded_at: SystemTime::now(),
        deadline: Duration::from_millis(role.deadline_ms),
        memory_limit_bytes: role.memory_limit_bytes,
        pre,
        instantiate_time: metrics::histogram!("wxhost_plugin_instantiate_seconds", "plugin" => spec.name.clone()),
        requests_per_instance: spec.requests_per_instance,
        idle: IdleInstances::new(if spec.requests_per_instance > 1 { idle_capacity } else { 0 }),
    })
}

/// Idle instances kept per plugin that allows reuse: enough for every worker
/// thread to find one, few enough (an eighth of the pool at most, but one in
/// a pool of 2 to 15 slots, so that `requests_per_instance` still means
/// something there) that slots stay free for requests of the other plugins.
pub fn idle_capacity(instance_slots: u32) -> usize {
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let at_most = (instance_slots as usize / 8).max(usize::from(instance_slots >= 2));
    (threads * 2).min(32).min(at_most)
}

/// An instance kept between requests of one plugin version, with its store.
pub struct KeptInstance {
    pub(crate) store: wasmtime::Store<PluginState>,
    pub(crate) instance: crate::bindings::PluginHost,
    /// Requests it has served so far.
    pub(crate) served: u32,
}

/// The idle instances of a plugin that allows reuse: a small stack (the most
/// recently used first, its pages still in cache), never more than `capacity`.
/// Dropped with the plugin version, so a hot swap never runs old code.
pub struct IdleInstances {
    kept: std::sync::Mutex<Vec<KeptInstance>>,
    capacity: usize,
}

impl IdleInstances {
    /// `capacity` 0 keeps nothing: a fresh instance per request.
    pub fn new(capacity: usize) -> IdleInstances {
        IdleInstances { kept: std::sync::Mutex::new(Vec::with_capacity(capacity)), capacity }
    }

    pub(crate) fn take(&self) -> Option<KeptInstance> {
        if self.capacity == 0 {
            return None;
        }
        self.kept.lock().expect("idle instances lock").pop()
    }

    pub(crate) fn put(&self, instance: KeptInstance) {
        let mut kept = self.kept.lock().expect("idle instances lock");
        if kept.len() < self.capacity {
            kept.push(instance);
        }
    }

    /// How many are idle now.
    pub fn len(&self) -> usize {
        self.kept.lock().expect("idle instances lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::idle_capacity;

    #[test]
    fn idle_instances_take_an_eighth_of_the_pool_at_most_and_one_of_a_small_pool() {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        assert_eq!(idle_capacity(256), (threads * 2).min(32), "two per thread, 256 / 8 = 32 at most");
        assert_eq!(idle_capacity(16), (threads * 2).min(2));
        assert_eq!(idle_capacity(7), 1, "a small pool keeps one idle, the rest stay free");
        assert_eq!(idle_capacity(2), 1);
        assert_eq!(idle_capacity(1), 0, "a one-slot pool keeps nothing idle: the slot is every request's");
        assert!(idle_capacity(10_000) <= 32);
    }
}
