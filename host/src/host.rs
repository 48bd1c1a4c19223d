//! The plugin host of one process: the engine, the shared services, and one
//! swappable snapshot per served role. Reloads compile and check off the
//! request path and swap all roles at once, or nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::caps::Services;
use crate::config::{self, Config, Role};
use crate::plugin::{self, LoadedPlugin};
use crate::runtime::RoleRuntime;

pub struct Host {
    pub engine: Engine,
    pub services: Arc<Services>,
    pub config_path: PathBuf,
    runtimes: BTreeMap<Role, ArcSwap<RoleRuntime>>,
    /// Compiled components by content hash, so a reload recompiles only what changed.
    compiled: Mutex<HashMap<String, Component>>,
    status: Mutex<ReloadStatus>,
    reload_lock: tokio::sync::Mutex<()>,
    /// The engine's pool size (`[host] max_instances` at start).
    instance_slots: u32,
    /// Per-client limits of routes (`[rate_limits]` at start).
    pub client_limits: crate::client_limit::ClientLimits,
    /// The wasm files the last readable plugins.toml names, loaded or not:
    /// a plugin added before its first build is loaded when the build writes it.
    named_wasm: Mutex<Vec<PathBuf>>,
    /// Where plugin calls run (a runtime apart from the server's).
    pub plugins: crate::runtime::PluginExecutor,
}

/// The outcome of the last reload, for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadStatus {
    pub at_unix: u64,
    pub trigger: String,
    pub ok: bool,
    pub errors: Vec<String>,
}

impl Host {
    /// Loads every plugin of the served roles; fails if any is refused.
    pub async fn start(
        engine: Engine,
        services: Arc<Services>,
        config: &Config,
        roles: &[Role],
    ) -> anyhow::Result<Host> {
        let host = Host {
            engine,
            services,
            config_path: config.path.clone(),
            runtimes: BTreeMap::new(),
            compiled: Mutex::new(HashMap::new()),
            status: Mutex::new(ReloadStatus {
                at_unix: unix_now(),
                trigger: "start".into(),
                ok: true,
                errors: vec![],
            }),
            reload_lock: tokio::sync::Mutex::new(()),
            instance_slots: config.max_instances,
            client_limits: crate::client_limit::ClientLimits::new(config),
            named_wasm: Mutex::new(config.plugins.iter().map(|p| p.wasm.clone()).collect()),
            plugins: crate::runtime::PluginExecutor::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
                config.max_instances,
            )?,
        };
        let loaded = host.load(config, roles).await.map_err(|errors| {
            anyhow::anyhow!("plugins could not be loaded:\n  - {}", errors.join("\n  - "))
        })?;
        for (role, rt) in &loaded {
            mark_loaded(*role, rt, 1.0);
        }
        let runtimes = loaded.into_iter().map(|(role, rt)| (role, ArcSwap::from_pointee(rt))).collect();
        Ok(Host { runtimes, ..host })
    }

    pub fn roles(&self) -> impl Iterator<Item = Role> + '_ {
        self.runtimes.keys().copied()
    }

    /// The current snapshot of a role; requests hold it until they finish.
    pub fn runtime(&self, role: Role) -> Arc<RoleRuntime> {
        self.runtimes[&role].load_full()
    }

    /// Runs one request on `plugin` (on the plugin runtime, within the pool's slots).
    pub async fn call(
        &self,
        plugin: Arc<LoadedPlugin>,
        request: crate::bindings::wxhost::plugin::types::Request,
    ) -> Result<crate::bindings::wxhost::plugin::types::Response, crate::runtime::PluginFailure> {
        self.plugins.run(&self.engine, &self.services, plugin, request).await
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().expect("status lock").clone()
    }

    /// Files whose change should trigger a reload: the config and every plugin's wasm.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.config_path.clone()];
        for role in self.roles() {
            files.extend(self.runtime(role).plugins.iter().map(|p| p.wasm.clone()));
        }
        files.extend(self.named_wasm.lock().expect("named wasm lock").iter().cloned());
        files.sort();
        files.dedup();
        files
    }

    /// Re-reads plugins.toml and the plugins; swaps them in if all load, else
    /// keeps the running versions and records why.
    pub async fn reload(&self, trigger: &str) -> ReloadStatus {
        let _one_at_a_time = self.reload_lock.lock().await;
        let roles: Vec<Role> = self.roles().collect();
        let result = match config::load(&self.config_path) {
            Err(e) => Err(e.problems.iter().map(|p| format!("{}: {p}", e.path.display())).collect()),
            Ok(config) => {
                *self.named_wasm.lock().expect("named wasm lock") =
                    config.plugins.iter().map(|p| p.wasm.clone()).collect();
                self.load(&config, &roles).await
            }
        };
        let status = match result {
            Ok(loaded) => {
                for (role, runtime) in loaded {
                    mark_loaded(role, &runtime, 1.0);
                    let old = self.runtimes[&role].swap(Arc::new(runtime));
                    mark_loaded(role, &old, 0.0);
                    mark_loaded(role, &self.runtime(role), 1.0);
                    if old.config.listen != self.runtime(role).config.listen {
                        tracing::warn!(role = %role, "a changed listen address takes effect at the next restart");
                    }
                }
                for role in &roles {
                    for p in &self.runtime(*role).plugins {
                        tracing::info!(plugin = %p.identity.name, version = %p.identity.version, role = %role, trigger, "plugin serving");
                    }
                }
                ReloadStatus { at_unix: unix_now(), trigger: trigger.into(), ok: true, errors: vec![] }
            }
            Err(errors) => {
                for e in &errors {
                    tracing::error!(trigger, "reload refused, the running plugins keep serving: {e}");
                }
                ReloadStatus { at_unix: unix_now(), trigger: trigger.into(), ok: false, errors }
            }
        };
        metrics::counter!("wxhost_plugin_reloads_total", "outcome" => if status.ok { "ok" } else { "refused" })
            .increment(1);
        *self.status.lock().expect("status lock") = status.clone();
        status
    }

    /// Builds new snapshots for `roles` from `config`, reporting every failure.
    async fn load(
        &self,
        config: &Config,
        roles: &[Role],
    ) -> Result<BTreeMap<Role, RoleRuntime>, Vec<String>> {
        let mut errors = Vec::new();
        let mut out = BTreeMap::new();
        for &role in roles {
            let Some(role_config) = config.roles.get(&role) else {
                errors.push(format!("plugins.toml has no [roles.{role}] section"));
                continue;
            };
            let mut plugins = Vec::new();
            for spec in config.plugins.iter().filter(|p| p.role == role) {
                match self.load_plugin(spec, role_config).await {
                    Ok(p) => plugins.push(Arc::new(p)),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            match RoleRuntime::new(role, role_config.clone(), plugins) {
                Ok(rt) => {
                    out.insert(role, rt);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() { Ok(out) } else { Err(errors) }
    }

    async fn load_plugin(
        &self,
        spec: &config::PluginSpec,
        role: &config::RoleConfig,
    ) -> Result<LoadedPlugin, plugin::LoadError> {
        let bytes = tokio::fs::read(&spec.wasm).await.map_err(|error| plugin::LoadError::Read {
            plugin: spec.name.clone(),
            path: spec.wasm.display().to_string(),
            error,
        })?;
        let version = plugin::version_of(&bytes);
        let cached = self.compiled.lock().expect("compile cache lock").get(&version).cloned();
        let (engine, spec, role) = (self.engine.clone(), spec.clone(), role.clone());
        let idle = plugin::idle_capacity(self.instance_slots);
        let (component, loaded) = tokio::task::spawn_blocking(move || {
            let component = match cached {
                Some(c) => c,
                None => plugin::compile(&engine, &spec, &bytes)?,
            };
            let loaded = plugin::prepare(&engine, &spec, &role, &component, version, idle)?;
            Ok::<_, plugin::LoadError>((component, loaded))
        })
        .await
        .expect("plugin loading does not panic")?;
        let mut compiled = self.compiled.lock().expect("compile cache lock");
        // Keep only versions that may come back soon; the cache must not grow without bound.
        if compiled.len() > 64 {
            compiled.clear();
        }
        compiled.insert(loaded.identity.version.clone(), component);
        Ok(loaded)
    }
}

/// Whether `changed` is one of `watched` (compared by canonical folder and file name).
pub fn is_watched(changed: &Path, watched: &[PathBuf]) -> bool {
    let key = |p: &Path| -> Option<(PathBuf, std::ffi::OsString)> {
        let dir = p.parent()?;
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        Some((dir.canonicalize().ok()?, p.file_name()?.to_os_string()))
    };
    let Some(changed) = key(changed) else {
        return false;
    };
    watched.iter().any(|w| key(w).as_ref() == Some(&changed))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// `wxhost_plugin_loaded{role,plugin,version}`: 1 for the versions serving, 0 for replaced ones.
fn mark_loaded(role: Role, runtime: &RoleRuntime, value: f64) {
    for p in &runtime.plugins {
        metrics::gauge!("wxhost_plugin_loaded", "role" => role.name(), "plugin" => p.identity.name.clone(),
            "version" => p.identity.version.clone())
        .set(value);
    }
}
