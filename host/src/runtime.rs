//! A role's plugins and routes as one immutable snapshot, and running one
//! request in a fresh sandbox. Hot swap replaces the whole snapshot; a request
//! keeps the snapshot (and plugin versions) it started with.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Engine, Store, Trap, UpdateDeadline};

use crate::bindings::wxhost::plugin::types::{Request, Response};
use crate::caps::{MemoryLimitExceeded, PluginState, Services};
use crate::config::{Role, RoleConfig};
use crate::internal_auth::INTERNAL_PREFIX;
use crate::plugin::{KeptInstance, LoadedPlugin};

/// Host-side slack on top of the epoch deadline, covering time spent awaiting host calls.
const AWAIT_GRACE: Duration = Duration::from_millis(250);

pub struct RoleRuntime {
    pub role: Role,
    pub config: RoleConfig,
    pub plugins: Vec<Arc<LoadedPlugin>>,
    /// Per method: path pattern → (plugin index, who may call it, its metrics).
    routes: HashMap<String, matchit::Router<(usize, Guard, Arc<RouteMetrics>)>>,
}

/// Who may call a route, checked by the host before the plugin runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Anyone (the plugin checks sessions or the admin credential itself).
    Public,
    /// Under /api/v1/internal/: the web role, HMAC-signed with INTERNAL_SECRET.
    Internal,
    /// A plugin's `service_routes`: a business service's key (WXHOST_SERVICE_KEYS).
    Service,
}

pub enum RouteMatch<'a> {
    Found {
        plugin: &'a Arc<LoadedPlugin>,
        /// The route's pattern and metric handles.
        route: Arc<RouteMetrics>,
        params: Vec<(String, String)>,
        /// Who may call it, checked by the host before the plugin runs.
        guard: Guard,
    },
    MethodNotAllowed,
    NotFound,
}

impl RoleRuntime {
    /// Builds the route table; plugins.toml validation has already refused conflicts.
    pub fn new(role: Role, config: RoleConfig, plugins: Vec<Arc<LoadedPlugin>>) -> anyhow::Result<Self> {
        let mut routes: HashMap<String, matchit::Router<(usize, Guard, Arc<RouteMetrics>)>> = HashMap::new();
        for (index, plugin) in plugins.iter().enumerate() {
            for route in &plugin.routes {
                routes
                    .entry(route.method.clone())
                    .or_default()
                    .insert(
                        route.path.clone(),
                        (
                            index,
                            if route.path.starts_with(INTERNAL_PREFIX) {
                                Guard::Internal
                            } else if plugin.service_routes.contains(route) {
                                Guard::Service
                            } else {
                                Guard::Public
                            },
                            Arc::new(RouteMetrics::new(role, &plugin.identity.name, &route.path)),
                        ),
                    )
                    .map_err(|e| anyhow::anyhow!("route {route}: {e}"))?;
            }
        }
        Ok(RoleRuntime { role, config, plugins, routes })
    }

    pub fn route(&self, method: &str, path: &str) -> RouteMatch<'_> {
        if let Some(m) = self.routes.get(method).and_then(|r| r.at(path).ok()) {
            let params = m.params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let (index, guard, route) = m.value;
            return RouteMatch::Found {
                plugin: &self.plugins[*index],
                route: route.clone(),
                params,
                guard: *guard,
            };
        }
        if self.routes.values().any(|r| r.at(path).is_ok()) {
            RouteMatch::MethodNotAllowed
        } else {
            RouteMatch::NotFound
        }
    }
}

/// A route's metric handles, registered when the route table is built (a
/// labelled lookup per request costs microseconds; these are atomics).
pub struct RouteMetrics {
    pub pattern: Arc<str>,
    pub plugin: String,
    pub role: Role,
    pub duration: metrics::Histogram,
    /// `wxhost_http_requests_total` by status, registered on first use.
    requests: std::sync::Mutex<HashMap<u16, metrics::Counter>>,
}

impl RouteMetrics {
    pub fn new(role: Role, plugin: &str, pattern: &str) -> RouteMetrics {
        RouteMetrics {
            pattern: Arc::from(pattern),
            plugin: plugin.to_string(),
            role,
            duration: metrics::histogram!("wxhost_http_request_duration_seconds", "role" => role.name(),
                "plugin" => plugin.to_string(), "route" => pattern.to_string()),
            requests: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn count(&self, status: u16) {
        let mut requests = self.requests.lock().expect("route metrics lock");
        requests
            .entry(status)
            .or_insert_with(|| {
                metrics::counter!("wxhost_http_requests_total", "role" => self.role.name(),
                    "plugin" => self.plugin.clone(), "route" => self.pattern.to_string(), "status" => status.to_string())
            })
            .increment(1);
    }
}

/// How a request's sandbox ended when the plugin did not answer.
#[derive(Debug, thiserror::Error)]
pub enum PluginFailure {
    #[error("plugin ran past its {0:?} deadline")]
    Timeout(Duration),
    #[error("plugin exceeded its memory limit")]
    OutOfMemory,
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// Every instance slot of the pool (`[host] max_instances`) is taken:
    /// temporary, the request never started.
    #[error("no free instance slot: [host] max_instances are all in use")]
    Busy,
}

/// Where plugin calls run: a call's first poll on the caller's task, the rest
/// on a tokio runtime of their own, so however many plugins spin (each yields
/// only at epoch ticks), the server's runtime keeps accepting connections,
/// routing, refusing and answering `/healthz` at once.
/// The instance slots are counted here too: a request that finds none taken
/// is refused `Busy` before it ever reaches the plugin runtime.
pub struct PluginExecutor {
    runtime: Option<tokio::runtime::Runtime>,
    slots: Arc<tokio::sync::Semaphore>,
    capacity: usize,
}

impl PluginExecutor {
    /// `threads` workers for plugin calls; `slots` calls at once at most
    /// (the pooling allocator's instance count).
    pub fn new(threads: usize, slots: u32) -> std::io::Result<PluginExecutor> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("wxhost-plugin")
            .enable_all()
            .build()?;
        let capacity = slots as usize;
        Ok(PluginExecutor {
            runtime: Some(runtime),
            slots: Arc::new(tokio::sync::Semaphore::new(capacity)),
            capacity,
        })
    }

    /// Plugin calls running now.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// Runs `request` on `plugin` (see [`invoke`]). A call that needs no I/O
    /// and ends before the next epoch tick (WeChat's callbacks, mostly) is
    /// answered in its first poll, on the caller's task: the hand-off to the
    /// plugin runtime and back is two thread wake-ups, more than such a call
    /// costs. Anything longer goes on on the plugin runtime, so a spinning
    /// plugin holds a server worker for one epoch tick at most. A call the
    /// client gave up on still ends within the plugin's deadline, holding its
    /// slot until then.
    pub async fn run(
        &self,
        engine: &Engine,
        services: &Arc<Services>,
        plugin: Arc<LoadedPlugin>,
        request: Request,
    ) -> Result<Response, PluginFailure> {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return Err(PluginFailure::Busy);
        };
        let (engine, services) = (engine.clone(), services.clone());
        let mut call = Box::pin(async move {
            let outcome = invoke(&engine, &services, &plugin, request).await;
            drop(slot);
            outcome
        });
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                call.as_mut().poll(cx)
            })))
        })
        .await;
        match first {
            Ok(std::task::Poll::Ready(outcome)) => return outcome,
            Ok(std::task::Poll::Pending) => {}
            Err(_) => {
                return Err(PluginFailure::Trap("the host's code serving the plugin panicked".into()));
            }
        }
        let runtime = self.runtime.as_ref().expect("the plugin runtime lives as long as the executor");
        match runtime.spawn(call).await {
            Ok(outcome) => outcome,
            // A panic in the host's own code while serving the plugin.
            Err(e) => Err(PluginFailure::Trap(format!("the host's plugin task failed: {e}"))),
        }
    }
}

impl Drop for PluginExecutor {
    fn drop(&mut self) {
        // Dropped from async code too (tests, shutdown): never block there.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs one request of `plugin` within its deadline and memory limit: on a
/// fresh instance, or on one kept from an earlier request of the same plugin
/// version when the plugin allows it (`requests_per_instance`).
pub async fn invoke(
    engine: &Engine,
    services: &Arc<Services>,
    plugin: &LoadedPlugin,
    request: Request,
) -> Result<Response, PluginFailure> {
    let deadline_at = Instant::now() + plugin.deadline;
    let (mut store, warm) = match plugin.idle.take() {
        Some(kept) => {
            let mut store = kept.store;
            store.data_mut().begin_request(request.request_id.clone(), deadline_at);
            (store, Some((kept.instance, kept.served)))
        }
        None => (new_store(engine, services, plugin, request.request_id.clone(), deadline_at), None),
    };
    // The epoch deadline counts from now, for a kept instance too.
    store.set_epoch_deadline(1);

    // The store moves into the call and comes back with its outcome, so a
    // cancelled (timed out) call takes its instance with it.
    let run = async move {
        let (instance, served) = match warm {
            Some(kept) => kept,
            None => {
                let started = Instant::now();
                match plugin.pre.instantiate_async(&mut store).await {
                    Ok(instance) => {
                        plugin.instantiate_time.record(started.elapsed().as_secs_f64());
                        (instance, 0)
                    }
                    Err(e) => return (store, Err(e)),
                }
            }
        };
        let outcome = instance.wxhost_plugin_handler().call_handle(&mut store, &request).await;
        (store, outcome.map(|response| (response, instance, served + 1)))
    };
    match tokio::time::timeout(plugin.deadline + AWAIT_GRACE, run).await {
        Err(_elapsed) => Err(PluginFailure::Timeout(plugin.deadline)),
        Ok((store, Ok((response, instance, served)))) => {
            // Only an instance that ended its request cleanly, holding no
            // resources, may serve another one.
            if served < plugin.requests_per_instance && store.data().table.is_empty() {
                plugin.idle.put(KeptInstance { store, instance, served });
            }
            Ok(response)
        }
        Ok((store, Err(e))) => {
            if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() {
                Err(PluginFailure::Busy)
            } else if store.data().limiter.exceeded || e.downcast_ref::<MemoryLimitExceeded>().is_some() {
                Err(PluginFailure::OutOfMemory)
            } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                Err(PluginFailure::Timeout(plugin.deadline))
            } else {
                Err(PluginFailure::Trap(format!("{e:#}")))
            }
        }
    }
}

/// A store for one instance of `plugin`: its request state, memory limit and
/// epoch deadline handling (yield every tick, trap past the deadline).
pub fn new_store(
    engine: &Engine,
    services: &Arc<Services>,
    plugin: &LoadedPlugin,
    request_id: String,
    deadline_at: Instant,
) -> Store<PluginState> {
    let state = PluginState::new(
        plugin.identity.clone(),
        services.clone(),
        plugin.memory_limit_bytes,
        request_id,
        deadline_at,
    );
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    // Every epoch tick, a running plugin yields to the executor (so one that
    // spins cannot hold a worker thread) until its request's deadline, then it traps.
    store.epoch_deadline_callback(|store| {
        if Instant::now() >= store.data().deadline_at {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store
}
