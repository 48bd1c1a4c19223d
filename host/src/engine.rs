//! The wasmtime engine: pooling allocator, epoch interruption, one epoch ticker.

use std::time::Duration;

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances: a running plugin yields to the executor at
/// every tick. Tokio polls for I/O only every 61 task polls, so with every
/// worker running a spinning plugin, new requests wait 61 ticks before they are
/// even read; at 1 ms that is ~60 ms (at 10 ms it was most of a deadline).
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Upper bound of any role's memory limit (plugins.toml allows up to 4 GiB).
const MAX_MEMORY_BYTES: usize = 4 << 30;

/// The engine for `max_instances` instances at once; `reset_dirty_pages_only`
/// see [`crate::config::Config::reset_dirty_pages_only`].
pub fn new(max_instances: u32, reset_dirty_pages_only: bool) -> anyhow::Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    // A wit-bindgen component holds a handful of core instances and tables
    // but one memory of its own.
    pool.total_component_instances(max_instances)
        .total_core_instances(max_instances * 8)
        .total_memories(max_instances * 2)
        .total_tables(max_instances * 8)
        .total_stacks(max_instances)
        .max_memory_size(MAX_MEMORY_BYTES)
        // Keep the pages a typical request touches resident instead of
        // decommitting and re-faulting them per request (see the notes on
        // per-request sandbox cost); plugins are linked with a 64 KiB stack.
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(1 << 20)
        .async_stack_keep_resident(256 << 10)
        // Zeroing the kept bytes after a request (rep stosb) is cheaper in time
        // than asking the kernel which pages were written, for plugins that
        // touch little memory (bench/run measures both): opt-in.
        .pagemap_scan(if reset_dirty_pages_only { Enabled::Auto } else { Enabled::No });

    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(512 << 10)
        .async_stack_size(1 << 20)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    // Compiled plugins are kept on disk (keyed by content and engine settings),
    // so restarts and the other processes of a deployment skip Cranelift.
    match wasmtime::Cache::new(wasmtime::CacheConfig::new()) {
        Ok(cache) => {
            config.cache(Some(cache));
        }
        Err(e) => tracing::warn!("no compilation cache, plugins compile at every start: {e:#}"),
    }
    let engine = Engine::new(&config)?;
    start_epoch_ticker(&engine);
    Ok(engine)
}

/// One ticker thread per engine (never per request); it ends with the engine.
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wxhost-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawning the epoch ticker thread");
}
