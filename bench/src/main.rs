//! wxhost's benchmark: one run, one table, every row measured side by side.
//!
//! 1. `GET /api/v1/auth/wechat/verify` served through the `verify` plugin (fresh
//!    sandbox per request) and by a native axum handler doing the same work (the
//!    same signature check), loaded by the same `wrk`, in alternating rounds so
//!    that machine noise hits both alike.
//! 2. The per-request sandbox cost (instantiate + call + drop), one thread.
//! 3. Message push end to end (web role → HMAC-signed internal call → app role →
//!    database) on SQLite and MariaDB: saturation and latency at a fixed rate.
//! 4. Payment notify end to end (RSA signature + AES-GCM in the web role →
//!    internal call → one transaction in the app role): first deliveries and
//!    duplicates.
//! 5. Hot swap under load: verify.wasm replaced and reloaded twice a second
//!    while verify and push traffic runs; failures, swaps, p99 before/during.
//!
//! Rows 3-5 use the Rust load generator in `load.rs` (wrk cannot hold a fixed
//! rate). Run with `bench/run` (builds in release, installs wrk if missing).

mod breakdown;
mod load;
mod peer;
mod product;
mod push_parts;
mod swap;
mod traffic;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use wxhost::bindings::wxhost::plugin::types::Request;
use wxhost::config::Role;
use wxhost::server::{ServeOptions, start};
use wxhost::settings::Settings;
use wxhost::wechat::{CallbackKeys, sorted_sha1};

use load::{LoadGen, Outcome, Source};
use product::{Kind, Product, TestDatabase};
use traffic::SignedNotify;

const TOKEN: &str = product::TOKEN;

struct Options {
    rounds: usize,
    seconds: u64,
    connections: usize,
    sandbox_iterations: usize,
    /// Closed-loop workers of the saturation phases.
    workers: usize,
    /// Length of each saturation phase.
    e2e_seconds: Duration,
    /// Offered rate and length of the fixed-rate (latency) phases.
    rate: f64,
    rate_seconds: Duration,
    /// Distinct signed notifies available to the notify saturation phase.
    notify_pool: usize,
    /// Length of each duplicate-notify phase (saturation, then fixed rate).
    dup_seconds: Duration,
    /// Length of each phase of row 3d (one push at a time, taken apart).
    parts_seconds: Duration,
    /// Hot swap: length of the run, of its alternating quiet and swapping
    /// windows, swap interval within swapping windows, offered rates.
    swap_seconds: Duration,
    swap_window: Duration,
    swap_interval: Duration,
    swap_verify_rate: f64,
    swap_push_rate: f64,
    /// Every swap a never-seen version (compiled under load).
    swap_fresh: bool,
    databases: Vec<Kind>,
}

fn options() -> anyhow::Result<Options> {
    let env = |name: &str, default: f64| -> f64 {
        std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    let secs = |name: &str, default: f64| Duration::from_secs_f64(env(name, default));
    let databases = std::env::var("BENCH_DATABASES")
        .unwrap_or_else(|_| "sqlite,mariadb".into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| match s.trim() {
            "sqlite" => Ok(Kind::Sqlite),
            "mariadb" | "mysql" => Ok(Kind::Mariadb),
            other => anyhow::bail!("BENCH_DATABASES: unknown database {other:?} (sqlite, mariadb)"),
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Options {
        rounds: env("BENCH_ROUNDS", 3.0) as usize,
        seconds: env("BENCH_SECONDS", 5.0) as u64,
        connections: env("BENCH_CONNECTIONS", 64.0) as usize,
        sandbox_iterations: env("BENCH_SANDBOX_ITERATIONS", 5000.0) as usize,
        workers: env("BENCH_E2E_WORKERS", 32.0) as usize,
        e2e_seconds: secs("BENCH_E2E_SECONDS", 5.0),
        rate: env("BENCH_RATE", 200.0),
        rate_seconds: secs("BENCH_RATE_SECONDS", 10.0),
        notify_pool: env("BENCH_NOTIFY_POOL", 10000.0) as usize,
        dup_seconds: secs("BENCH_DUP_SECONDS", 3.0),
        parts_seconds: secs("BENCH_PARTS_SECONDS", 3.0),
        swap_seconds: secs("BENCH_SWAP_SECONDS", 16.0),
        swap_window: Duration::from_millis(env("BENCH_SWAP_WINDOW_MS", 2000.0) as u64),
        swap_interval: Duration::from_millis(env("BENCH_SWAP_INTERVAL_MS", 400.0) as u64),
        swap_verify_rate: env("BENCH_SWAP_VERIFY_RATE", 500.0),
        swap_push_rate: env("BENCH_SWAP_PUSH_RATE", 100.0),
        swap_fresh: env("BENCH_SWAP_FRESH", 0.0) != 0.0,
        databases,
    })
}

#[derive(serde::Deserialize)]
struct VerifyQuery {
    signature: String,
    timestamp: String,
    nonce: String,
    echostr: String,
}

/// The native baseline: what the plugin does, as a plain axum handler.
async fn native_verify(
    State(crypto): State<Arc<CallbackKeys>>,
    Query(q): Query<VerifyQuery>,
) -> (StatusCode, String) {
    match crypto.verify_server_signature(&q.signature, &q.timestamp, &q.nonce) {
        Ok(()) => (StatusCode::OK, q.echostr),
        Err(_) => (StatusCode::UNAUTHORIZED, String::new()),
    }
}

/// The one table: (row, measurement, value, aim or check).
#[derive(Default)]
struct Table {
    rows: Vec<[String; 4]>,
}

impl Table {
    fn row(&mut self, n: &str, what: impl Into<String>, value: impl Into<String>, check: impl Into<String>) {
        let row = [n.to_string(), what.into(), value.into(), check.into()];
        eprintln!("  {} | {} | {} | {}", row[0], row[1], row[2], row[3]);
        self.rows.push(row);
    }
}

/// Where the servers' warnings and errors go (RUST_LOG overrides the level).
fn log_path() -> std::path::PathBuf {
    std::env::temp_dir().join("wxhost-bench.log")
}

fn main() -> anyhow::Result<()> {
    // `bench/breakdown` runs these (under valgrind, then reads the counts).
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["breakdown", stage, requests] => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            return runtime.block_on(breakdown::run(stage, requests.parse()?));
        }
        ["breakdown-stages"] => {
            println!("{}", breakdown::stage_names().join(" "));
            return Ok(());
        }
        ["breakdown-report", dir] => return breakdown::report(std::path::Path::new(dir)),
        [] => {}
        _ => {
            anyhow::bail!("usage: wxhost-bench [breakdown STAGE N | breakdown-stages | breakdown-report DIR]")
        }
    }
    let opts = options()?;
    let log = std::fs::File::create(log_path()).context("creating the log file")?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log))
        .init();
    // The load generator has a runtime (a thread) of its own, like a client
    // process sharing the machine; the servers run on this one.
    let generator = LoadGen::new()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(opts, &generator))
}

async fn run(opts: Options, generator: &LoadGen) -> anyhow::Result<()> {
    which_wrk()?;
    let started = Instant::now();
    let mut table = Table::default();
    verify_rows(&opts, &mut table).await?;

    // Notifies are signed before any timed phase, once for every database if
    // the web role's 5-minute window allows.
    let mut notifies: Option<(Instant, Notifies)> = None;
    for (i, &kind) in opts.databases.iter().enumerate() {
        let hot_swap = i + 1 == opts.databases.len();
        eprintln!("[{:>4.0} s] end to end on {}", started.elapsed().as_secs_f64(), kind.name());
        if let Err(e) = e2e_rows(&opts, kind, &mut notifies, generator, &mut table, hot_swap).await {
            table.row("3-5", format!("{} end to end", kind.name()), "not measured", format!("{e:#}"));
        }
    }

    let swaps = if opts.swap_fresh {
        "each time a never-seen version\n  (compiled during the load, off the request path)"
    } else {
        "alternately a variant (one more custom\n  section, so another version hash; compiled once beforehand) and the original"
    };
    println!(
        "
wxhost benchmark: one run ({total:.0} s); every row was measured in this run, in this process, on this machine.
Machine noise: on this shared 2-core machine absolute numbers move by 10-50% between runs (other builds and tests
compete for the cores); compare rows within one table. Every ratio and every quiet/swapping pair below comes
from this same run (native and plugin rounds alternate). Servers' warnings and errors: {log} ({log_lines} lines).

Rows 1-2: GET /api/v1/auth/wechat/verify through the verify plugin vs a native axum handler doing the same
  signature check: {rounds} alternating rounds x {secs} s of wrk -t2 -c{conns}, medians. Two plugin servers: the
  default (a fresh instance per request: nothing survives a request) and requests_per_instance = {reuse} (an
  instance serves up to {reuse} requests of this plugin; memory left by one request is there for the next).
  Beside them the closest peer, `wasmtime serve` at the same wasmtime version (built from crates.io by bench/run),
  running the same check as a plain wasi:http component (plugins/fixtures/peer-verify: SHA-1 in the guest), with
  its defaults (a fresh instance per request) and with --max-instance-reuse-count {reuse}.
  Then, on one thread, each mode's invoke (5 alternating slices, medians) minus the same work natively.
Rows 3-5: the product wired as in production: the shipped plugins.toml, the WeChat simulator with WeChat Pay,
  a web role and an app role as two servers (web -> HMAC-signed internal HTTP call -> app -> database), a fresh
  database each (SQLite file; MariaDB database created and dropped). Servers, simulator and load generator share
  this process and loopback. Load generator: Rust (reqwest) on its own 1-thread runtime.
  saturation = {workers} closed-loop workers for {sat:.0} s, 2xx answers per second;
  p50 / p99  = open loop: requests sent on a fixed timeline at the offered rate whatever the answers do, each
               latency measured from its scheduled send time (no coordinated omission).
  Every answer's status is checked: 'non-2xx' counts refusals, errors and timeouts.
Row 3: subscribe pushes in plaintext mode, each from a new user (one signed query, distinct FromUserName):
  verify plugin -> internal call -> internal plugin -> user row + processed event in one transaction.
Row 3c: MariaDB only: the push saturation again with InnoDB flushing its log once a second instead of at every
  commit (innodb_flush_log_at_trx_commit = 0, set for that phase and put back): how much of a push is the fsync.
Row 3d: one push at a time (no queueing, so the parts add up), means over BENCH_PARTS_SECONDS each: the whole
  push; the app role's internal call alone, signed as the web role signs it; GET /healthz on the app role (the
  client's, loopback's and hyper's own share of a request); the same transaction natively (sqlx,
  the host's connection options); that transaction with its commit not flushed (SQLite synchronous = OFF, InnoDB
  innodb_flush_log_at_trx_commit = 0, put back). Differences: web role and hop, app role, database, fsync.
Row 3b: the business service's POST /api/v1/quota/consume on the app role (service key checked by the host),
  1 unit per job, a new idempotency key each, over 16 users: quota plugin -> one transaction claims the key,
  debits the balance if it covers it, writes the ledger row. Afterwards the ledger is checked against the answers.
Row 4: WeChat Pay APIv3 'paid' notifies for pre-created pending orders, all signed before timing: RSA signature
  check + AES-256-GCM decrypt (host, for the notify plugin) -> internal call -> payment plugin: one transaction
  locks the order, marks it paid and credits the payer. 'duplicate' = one notify again and again after it was
  applied (WeChat Pay's retries): verified, decrypted, found paid, nothing credited.
  Afterwards the database is checked: each push and each notify applied once.
Row 5: verify (GET) and push traffic at a fixed rate (open loop) for {swap_total:.0} s, cut into {window} ms windows;
  in every other window verify.wasm is replaced on disk (written beside it, renamed over it) and the web role
  reloaded every {interval} ms: {swaps}.
  Quiet and swapping windows alternate, so both see the same noise; a request belongs to the window of its
  scheduled send time.
",
        total = started.elapsed().as_secs_f64(),
        log = log_path().display(),
        log_lines = std::fs::read_to_string(log_path()).map(|t| t.lines().count()).unwrap_or(0),
        rounds = opts.rounds,
        secs = opts.seconds,
        conns = opts.connections,
        workers = opts.workers,
        sat = opts.e2e_seconds.as_secs_f64(),
        interval = opts.swap_interval.as_millis(),
        window = opts.swap_window.as_millis(),
        swap_total = opts.swap_seconds.as_secs_f64(),
        reuse = REUSE,
    );
    println!("| # | measurement | value | aim / check |");
    println!("| --- | --- | --- | --- |");
    for [n, what, value, check] in &table.rows {
        println!("| {n} | {what} | {value} | {check} |");
    }
    Ok(())
}

/// A web role serving only the verify plugin, with `requests_per_instance`.
async fn verify_server(
    dir: &std::path::Path,
    requests_per_instance: u32,
) -> anyhow::Result<wxhost::server::RunningServer> {
    web_server(dir, &product::dist("verify.wasm"), "GET /api/v1/auth/wechat/verify", requests_per_instance)
        .await
}

/// A web role serving one plugin (copied into `dir`) on one route.
async fn web_server(
    dir: &std::path::Path,
    wasm: &std::path::Path,
    route: &str,
    requests_per_instance: u32,
) -> anyhow::Result<wxhost::server::RunningServer> {
    web_server_with(dir, wasm, route, requests_per_instance, HostSettings::default()).await
}

/// The `[host]` settings of a bench server.
struct HostSettings {
    max_instances: u32,
    reset_dirty_pages_only: bool,
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings { max_instances: 256, reset_dirty_pages_only: false }
    }
}

/// [`web_server`] with other `[host]` settings.
async fn web_server_with(
    dir: &std::path::Path,
    wasm: &std::path::Path,
    route: &str,
    requests_per_instance: u32,
    host: HostSettings,
) -> anyhow::Result<wxhost::server::RunningServer> {
    let HostSettings { max_instances, reset_dirty_pages_only } = host;
    std::fs::copy(wasm, dir.join("plugin.wasm")).with_context(|| format!("copying {}", wasm.display()))?;
    std::fs::write(
        dir.join("plugins.toml"),
        format!(
            r#"
[host]
max_instances = {max_instances}
reset_dirty_pages_only = {reset_dirty_pages_only}
[admin]
listen = "127.0.0.1:0"
[roles.web]
listen = "127.0.0.1:0"
grants = ["log", "config", "callback-crypto", "internal-call"]
deadline_ms = 2000
memory_limit_mib = 16
[[plugins]]
name = "bench"
role = "web"
wasm = "plugin.wasm"
routes = ["{route}"]
capabilities = ["log", "config", "callback-crypto", "internal-call"]
requests_per_instance = {requests_per_instance}
"#
        ),
    )?;
    let settings = Settings { wechat_token: Some(TOKEN.to_string().into()), ..Settings::default() };
    start(ServeOptions {
        config_path: dir.join("plugins.toml"),
        roles: vec![Role::Web],
        settings,
        watch: false,
    })
    .await
}

/// Microseconds per call of `invoke` on one thread, after a warm-up.
async fn invoke_micros(
    server: &wxhost::server::RunningServer,
    request: &Request,
    iterations: usize,
) -> anyhow::Result<f64> {
    let plugin = server.host.runtime(Role::Web).plugins[0].clone();
    for _ in 0..200 {
        wxhost::runtime::invoke(&server.host.engine, &server.host.services, &plugin, request.clone()).await?;
    }
    let started = Instant::now();
    for _ in 0..iterations {
        let r = wxhost::runtime::invoke(&server.host.engine, &server.host.services, &plugin, request.clone())
            .await?;
        anyhow::ensure!(r.status == 200, "the plugin answered {}", r.status);
    }
    Ok(micros(started.elapsed()) / iterations.max(1) as f64)
}

/// Microseconds per request through `router` in this process, one at a time:
/// the HTTP layer's work without sockets or the kernel.
async fn router_micros(router: &axum::Router, path: &str, iterations: usize) -> anyhow::Result<f64> {
    use tower::ServiceExt;
    let call = || async {
        let request = axum::http::Request::get(path).body(axum::body::Body::empty())?;
        let response = router.clone().oneshot(request).await?;
        anyhow::ensure!(response.status() == StatusCode::OK, "answered {}", response.status());
        axum::body::to_bytes(response.into_body(), 1 << 16).await?;
        Ok::<_, anyhow::Error>(())
    };
    for _ in 0..200 {
        call().await?;
    }
    let started = Instant::now();
    for _ in 0..iterations {
        call().await?;
    }
    Ok(micros(started.elapsed()) / iterations.max(1) as f64)
}

/// Where a fresh instance's time goes, in µs per request on one thread: the
/// store and its WASI context, instantiation, the call, and dropping the store
/// (which returns the instance's memory to the pool, reset).
async fn fresh_phases(
    server: &wxhost::server::RunningServer,
    request: &Request,
    iterations: usize,
) -> anyhow::Result<[f64; 4]> {
    let plugin = server.host.runtime(Role::Web).plugins[0].clone();
    let mut spent = [Duration::ZERO; 4];
    for _ in 0..iterations {
        let t0 = Instant::now();
        let mut store = wxhost::runtime::new_store(
            &server.host.engine,
            &server.host.services,
            &plugin,
            "bench".into(),
            Instant::now() + plugin.deadline,
        );
        store.set_epoch_deadline(1);
        let t1 = Instant::now();
        let instance = plugin.pre.instantiate_async(&mut store).await?;
        let t2 = Instant::now();
        let response = instance.wxhost_plugin_handler().call_handle(&mut store, request).await?;
        anyhow::ensure!(response.status == 200, "the plugin answered {}", response.status);
        let t3 = Instant::now();
        drop(store);
        let t4 = Instant::now();
        for (i, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3].into_iter().enumerate() {
            spent[i] += d;
        }
    }
    Ok(spent.map(|d| micros(d) / iterations.max(1) as f64))
}

/// Rows 1 and 2: the verify route through the plugin (a fresh instance per
/// request, and instances reused) vs natively, and the sandbox cost.
async fn verify_rows(opts: &Options, table: &mut Table) -> anyhow::Result<()> {
    let (fresh_dir, reused_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let fresh = verify_server(fresh_dir.path(), 1).await?;
    let reused = verify_server(reused_dir.path(), REUSE).await?;
    // The cut tried and not kept: only the pages a request wrote reset
    // (`reset_dirty_pages_only`), measured beside the default each run.
    let dirty_dir = tempfile::tempdir()?;
    let dirty = web_server_with(
        dirty_dir.path(),
        &product::dist("verify.wasm"),
        "GET /api/v1/auth/wechat/verify",
        1,
        HostSettings { reset_dirty_pages_only: true, ..HostSettings::default() },
    )
    .await?;
    // The floor: a plugin that answers without doing anything (the sandbox
    // probe's /probe/ok), on a fresh instance.
    let probe_dir = tempfile::tempdir()?;
    let probe =
        web_server(probe_dir.path(), &product::dist("fixtures/sandbox-probe.wasm"), "GET /probe/ok", 1)
            .await?;
    let fresh_addr = fresh.role_addrs[&Role::Web];
    let reused_addr = reused.role_addrs[&Role::Web];

    let crypto = Arc::new(CallbackKeys::new(Some(TOKEN.to_string().into()), None, None, Some(300))?);
    let native = axum::Router::new()
        .route("/api/v1/auth/wechat/verify", get(native_verify))
        .with_state(crypto.clone());
    let native_router = native.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let native_addr = listener.local_addr()?;
    let native_server = tokio::spawn(async move { axum::serve(listener, native).await });

    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs().to_string();
    let query = format!(
        "signature={}&timestamp={ts}&nonce=bench&echostr=5188563426541789870",
        sorted_sha1(&[TOKEN, &ts, "bench"])
    );
    let path = format!("/api/v1/auth/wechat/verify?{query}");

    // The peer, fresh and reused, when bench/run built it.
    let peers = match peer::binary() {
        Some(wasmtime) => {
            let component = product::dist("fixtures/peer-verify.wasm");
            Some((
                peer::start(&wasmtime, &component, None, &path)?,
                peer::start(&wasmtime, &component, Some(REUSE), &path)?,
            ))
        }
        None => {
            eprintln!("no peer: WXHOST_BENCH_PEER is not set (bench/run builds wasmtime serve)");
            None
        }
    };

    // All answer correctly before anything is timed.
    let mut servers = vec![
        ("native", native_addr, None),
        ("fresh", fresh_addr, None),
        ("reused", reused_addr, None),
        ("fresh dirty", dirty.role_addrs[&Role::Web], None),
    ];
    if let Some((peer_fresh, peer_reused)) = &peers {
        servers.push(("peer fresh", peer_fresh.addr, Some(peer_fresh.pid())));
        servers.push(("peer reused", peer_reused.addr, Some(peer_reused.pid())));
    }
    for (_, addr, _) in &servers {
        let out = std::process::Command::new("wrk")
            .args(["-t1", "-c1", "-d1s", &format!("http://{addr}{path}")])
            .output()?;
        anyhow::ensure!(!String::from_utf8_lossy(&out.stdout).contains("Non-2xx"), "{addr} answered errors");
    }

    let mut runs: Vec<Vec<WrkRun>> = servers.iter().map(|_| Vec::new()).collect();
    for round in 1..=opts.rounds {
        for ((label, addr, pid), results) in servers.iter().zip(runs.iter_mut()) {
            let run = wrk(&format!("http://{addr}{path}"), opts.connections, opts.seconds, *pid)?;
            eprintln!(
                "round {round}: {label:11} {:>10.0} req/s, CPU per request: server {:.1} us, wrk {:.1} us",
                run.rps, run.server_cpu_us, run.wrk_cpu_us
            );
            results.push(run);
        }
    }
    let peer_runs = runs.split_off(4);
    let [native_runs, fresh_runs, reused_runs, dirty_runs]: [Vec<WrkRun>; 4] =
        runs.try_into().map_err(|_| anyhow::anyhow!("four servers"))?;

    // Per-request sandbox cost, one thread: the plugin's invoke vs the same work natively.
    let request = Request {
        method: "GET".into(),
        route: "/api/v1/auth/wechat/verify".into(),
        path: "/api/v1/auth/wechat/verify".into(),
        query: query.clone(),
        params: vec![],
        headers: vec![],
        body: vec![],
        request_id: "bench".into(),
        client_ip: Some("127.0.0.1".into()),
        service: None,
    };
    let (mut fresh_us, mut reused_us, mut native_us, mut floor_us, mut dirty_us) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let probe_request = Request {
        route: "/probe/ok".into(),
        path: "/probe/ok".into(),
        query: String::new(),
        ..request.clone()
    };
    // Alternating slices, so that both modes and the native loop see the same noise.
    let slices = 5;
    let per_slice = (opts.sandbox_iterations / slices).max(1);
    for _ in 0..slices {
        fresh_us.push(invoke_micros(&fresh, &request, per_slice).await?);
        dirty_us.push(invoke_micros(&dirty, &request, per_slice).await?);
        floor_us.push(invoke_micros(&probe, &probe_request, per_slice).await?);
        reused_us.push(invoke_micros(&reused, &request, per_slice).await?);
        let started = Instant::now();
        for _ in 0..per_slice {
            let ok =
                crypto.verify_server_signature(&sorted_sha1(&[TOKEN, &ts, "bench"]), &ts, "bench").is_ok();
            assert!(std::hint::black_box(ok));
        }
        native_us.push(micros(started.elapsed()) / per_slice as f64);
    }
    let (fresh_call, reused_call, native_call, floor_call) =
        (median(&mut fresh_us), median(&mut reused_us), median(&mut native_us), median(&mut floor_us));
    let phases = fresh_phases(&fresh, &request, opts.sandbox_iterations.max(1)).await?;
    // The same request through each server's router, without sockets: what the
    // host adds per request in-process, apart from the kernel's TCP work.
    let routers = [
        native_router,
        wxhost::server::role_router(fresh.host.clone(), Role::Web, Default::default(), None),
        wxhost::server::role_router(reused.host.clone(), Role::Web, Default::default(), None),
    ];
    let mut in_process = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..slices {
        for (router, results) in routers.iter().zip(in_process.iter_mut()) {
            results.push(router_micros(router, &path, per_slice).await?);
        }
    }
    let [native_http, fresh_http, reused_http] = in_process.map(|mut v| median(&mut v));

    let what = format!("{} rounds x {}s, wrk -c{}", opts.rounds, opts.seconds, opts.connections);
    if opts.rounds > 0 {
        let rps = |runs: &[WrkRun]| median(&mut runs.iter().map(|r| r.rps).collect::<Vec<_>>());
        let (f, r, n) = (rps(&fresh_runs), rps(&reused_runs), rps(&native_runs));
        table.row(
            "1",
            format!("GET verify, native axum handler, req/s (median, {what})"),
            format!("{n:.0}"),
            "",
        );
        table.row(
            "1",
            "GET verify, plugin, a fresh instance per request (default), req/s",
            format!("{f:.0}"),
            "",
        );
        table.row(
            "1",
            "ratio plugin / native, fresh instance per request",
            format!("{:.2}", f / n),
            "aim >= 0.6",
        );
        table.row(
            "1",
            format!("GET verify, plugin, requests_per_instance = {REUSE}, req/s"),
            format!("{r:.0}"),
            "",
        );
        table.row("1", "ratio plugin / native, instances reused", format!("{:.2}", r / n), "aim >= 0.85");
        table.row(
            "1",
            "cut tried: fresh instance, memory reset of every kept byte (default) / of the pages written (reset_dirty_pages_only), req/s",
            format!("{f:.0} / {:.0} ({:+.0}%)", rps(&dirty_runs), (rps(&dirty_runs) / f - 1.0) * 100.0),
            "kept only if it pays",
        );
        if let [peer_fresh, peer_reused] = &peer_runs[..] {
            let (pf, pr) = (rps(peer_fresh), rps(peer_reused));
            table.row(
                "1",
                "peer: wasmtime serve (same wasmtime), the verify as a plain wasi:http component, fresh / reused (max-instance-reuse-count) / native",
                format!("{:.2} / {:.2}", pf / n, pr / n),
                "",
            );
            table.row(
                "1",
                "wxhost's lead over the peer (req/s wxhost / peer), fresh / reused",
                format!("{:.2}x / {:.2}x", f / pf, r / pr),
                "aim >= 1 in both",
            );
        }
        let cpu = |runs: &[WrkRun]| {
            let server = median(&mut runs.iter().map(|r| r.server_cpu_us).collect::<Vec<_>>());
            let wrk = median(&mut runs.iter().map(|r| r.wrk_cpu_us).collect::<Vec<_>>());
            format!("{server:.1} / {wrk:.1}")
        };
        table.row(
            "1",
            "CPU per request during those rounds, server / wrk: native; fresh; reused",
            format!("{}; {}; {} us", cpu(&native_runs), cpu(&fresh_runs), cpu(&reused_runs)),
            "",
        );
        if let [peer_fresh, peer_reused] = &peer_runs[..] {
            table.row(
                "1",
                "CPU per request, server / wrk: peer fresh; peer reused",
                format!("{}; {} us", cpu(peer_fresh), cpu(peer_reused)),
                "",
            );
        }
    }
    table.row(
        "2",
        "plugin invoke, fresh instance (instantiate + call + drop), one thread",
        format!("{fresh_call:.1} us"),
        "",
    );
    table.row(
        "2",
        "  of which: store + WASI context / instantiate / call / drop (returns memory to the pool)",
        format!("{:.1} / {:.1} / {:.1} / {:.1} us", phases[0], phases[1], phases[2], phases[3]),
        "",
    );
    table.row(
        "2",
        "  floor: a plugin that does nothing (sandbox probe, GET /probe/ok), fresh instance, one thread",
        format!("{floor_call:.1} us"),
        "",
    );
    table.row(
        "2",
        "plugin invoke, fresh instance, only the pages written reset (reset_dirty_pages_only)",
        format!("{:.1} us", median(&mut dirty_us)),
        "",
    );
    table.row("2", "plugin invoke, instance reused (call), one thread", format!("{reused_call:.1} us"), "");
    table.row("2", "same work natively, one thread", format!("{native_call:.1} us"), "");
    table.row(
        "2",
        "one request through the router in-process (no sockets): native / plugin fresh / plugin reused",
        format!("{native_http:.1} / {fresh_http:.1} / {reused_http:.1} us"),
        "",
    );
    table.row(
        "2",
        "per-request sandbox cost, fresh instance per request",
        format!("{:.1} us", (fresh_call - native_call).max(0.0)),
        "aim <= 10 us",
    );
    table.row(
        "2",
        "per-request sandbox cost, instances reused",
        format!("{:.1} us", (reused_call - native_call).max(0.0)),
        "aim <= 10 us",
    );
    table.row(
        "2",
        "fresh instance over the floor (verify's invoke minus a do-nothing plugin's), minus the native work",
        format!("{:.1} us", fresh_call - floor_call - native_call),
        "aim <= 2 us",
    );
    fresh.shutdown();
    reused.shutdown();
    dirty.shutdown();
    probe.shutdown();
    native_server.abort();
    Ok(())
}

/// `requests_per_instance` of the reused-instance rows.
const REUSE: u32 = 1000;

/// The payment notifies of one run, signed ahead: a warm-up set, the saturation
/// pool, the fixed-rate set and the one that is repeated; one pending order each.
struct Notifies {
    warm: Arc<[SignedNotify]>,
    saturation: Arc<[SignedNotify]>,
    fixed: Arc<[SignedNotify]>,
    duplicate: Arc<SignedNotify>,
    orders: std::ops::Range<usize>,
}

const WARM_NOTIFIES: usize = 100;

/// Signed notifies that stay valid through one database's notify phases
/// (the web role accepts a notify for 5 minutes after its timestamp).
async fn signed_notifies<'a>(
    opts: &Options,
    slot: &'a mut Option<(Instant, Notifies)>,
) -> anyhow::Result<&'a Notifies> {
    let needed = opts.e2e_seconds + opts.rate_seconds + opts.dup_seconds * 2 + Duration::from_secs(30);
    if slot.as_ref().is_none_or(|(at, _)| at.elapsed() + needed > Duration::from_secs(280)) {
        let at = Instant::now();
        let (pool, fixed) = (opts.notify_pool, (opts.rate * opts.rate_seconds.as_secs_f64()).ceil() as usize);
        *slot = None;
        let signed = tokio::task::spawn_blocking(move || Notifies::sign(pool, fixed)).await??;
        eprintln!("signed {} payment notifies in {:.1} s", signed.orders.len(), at.elapsed().as_secs_f64());
        *slot = Some((at, signed));
    }
    Ok(&slot.as_ref().expect("signed above").1)
}

impl Notifies {
    fn sign(pool: usize, fixed: usize) -> anyhow::Result<Notifies> {
        let orders = 0..WARM_NOTIFIES + pool + fixed + 1;
        let mut all = traffic::sign_notifies(orders.clone())?;
        let duplicate = Arc::new(all.pop().expect("one at least"));
        let fixed_part = all.split_off(WARM_NOTIFIES + pool);
        let saturation = all.split_off(WARM_NOTIFIES);
        Ok(Notifies {
            warm: all.into(),
            saturation: saturation.into(),
            fixed: fixed_part.into(),
            duplicate,
            orders,
        })
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v < 10.0 { format!("{v:.2}") } else { format!("{v:.0}") }
}

/// A saturation phase's failures and latencies (closed loop: they measure the queue).
fn saturation_check(o: &Outcome) -> String {
    format!("{}; p50 / p99 {} / {} ms", failures(o), ms(o.percentile(0.5)), ms(o.percentile(0.99)))
}

/// "0 non-2xx of N" (and the first failure, if any).
fn failures(o: &Outcome) -> String {
    let mut s = format!("{} non-2xx of {}", o.failed(), o.answered() + o.errors);
    if let Some(f) = &o.first_failure {
        s.push_str(&format!(" (first: {})", f.replace('|', "/")));
    }
    s
}

/// The failures of a fixed-rate phase, and what else its latencies contain:
/// queueing when the offered rate reaches the saturation throughput, and the
/// generator's own lateness (counted in the latencies, from the schedule).
fn latency_check(o: &Outcome, offered: f64, saturation: f64) -> String {
    let mut s = failures(o);
    if offered >= 0.9 * saturation {
        s.push_str(&format!("; offered rate >= 90% of saturation ({saturation:.0}/s): queueing"));
    }
    if o.max_send_lag > Duration::from_millis(5) {
        s.push_str(&format!("; generator up to {} ms late", ms(o.max_send_lag)));
    }
    s
}

fn once(source: Source) -> Source {
    Arc::new(move |client, i| if i == 0 { source(client, i) } else { None })
}

/// Rows 3 and 4 (and 5 when `hot_swap`) against one database.
async fn e2e_rows(
    opts: &Options,
    kind: Kind,
    notifies: &mut Option<(Instant, Notifies)>,
    generator: &LoadGen,
    table: &mut Table,
    hot_swap: bool,
) -> anyhow::Result<()> {
    let db = kind.database().await;
    let product = Product::start(&db.url).await?;
    let result = e2e_measure(opts, kind, notifies, generator, table, hot_swap, &product, &db).await;
    product.shutdown().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn e2e_measure(
    opts: &Options,
    kind: Kind,
    notifies: &mut Option<(Instant, Notifies)>,
    generator: &LoadGen,
    table: &mut Table,
    hot_swap: bool,
    product: &Product,
    db: &TestDatabase,
) -> anyhow::Result<()> {
    let name = kind.name();
    let web = &product.web_url;
    let workers = opts.workers;
    let sat_label = format!("{workers} workers x {:.0} s", opts.e2e_seconds.as_secs_f64());
    let rate_label = format!("{:.0} req/s x {:.0} s open loop", opts.rate, opts.rate_seconds.as_secs_f64());

    // Row 3: pushes.
    let pushes = Arc::new(AtomicU64::new(0));
    let mut push_failed = 0;
    let push = || traffic::push_source(web, pushes.clone());
    let warm = generator.closed(push(), 4, Duration::from_secs(1)).await;
    anyhow::ensure!(warm.failed() == 0, "push warm-up failed: {}", failures(&warm));
    let sat = generator.closed(push(), workers, opts.e2e_seconds).await;
    push_failed += sat.failed();
    table.row(
        "3",
        format!("push end to end, {name}: saturation, 2xx/s ({sat_label})"),
        format!("{:.0}", sat.rps()),
        saturation_check(&sat),
    );
    let fixed = generator.open(push(), opts.rate, opts.rate_seconds).await;
    push_failed += fixed.failed();
    table.row(
        "3",
        format!("push end to end, {name}: latency p50 / p99 ({rate_label})"),
        format!("{} / {} ms", ms(fixed.percentile(0.5)), ms(fixed.percentile(0.99))),
        latency_check(&fixed, opts.rate, sat.rps()),
    );
    if kind == Kind::Mariadb {
        // How much of a push is the commit's fsync: the same saturation with
        // InnoDB flushing its log once a second instead of at every commit
        // (concurrent commits already share one fsync: group commit).
        let server = product::connect(&db.url).await?;
        let flush: i64 = wxhost::on_pool!(&server.pool, |p| sqlx::query_scalar(
            "SELECT CAST(@@GLOBAL.innodb_flush_log_at_trx_commit AS SIGNED)"
        )
        .fetch_one(p)
        .await)?;
        let set = |value: i64| {
            let sql = format!("SET GLOBAL innodb_flush_log_at_trx_commit = {value}");
            let server = &server;
            async move { wxhost::on_pool!(&server.pool, |p| sqlx::query(&sql).execute(p).await.map(drop)) }
        };
        set(0).await?;
        let unflushed = generator.closed(push(), workers, opts.e2e_seconds).await;
        set(flush).await?;
        push_failed += unflushed.failed();
        table.row(
            "3c",
            format!("push end to end, {name}: saturation with the commit's fsync (innodb_flush_log_at_trx_commit = {flush}) / without (= 0), 2xx/s"),
            format!("{:.0} / {:.0}", sat.rps(), unflushed.rps()),
            format!(
                "the fsync is {:.0}% of a push's time at saturation; p50 {} / {} ms",
                (1.0 - sat.rps() / unflushed.rps()).max(0.0) * 100.0,
                ms(sat.percentile(0.5)),
                ms(unflushed.percentile(0.5))
            ),
        );
    }

    // Row 3d: one push at a time, taken apart.
    let parts = push_parts::measure(
        generator,
        kind,
        &db.url,
        web,
        &product.app_url,
        pushes.clone(),
        opts.parts_seconds,
    )
    .await?;
    push_failed += parts.failed;
    table.row(
        "3d",
        format!(
            "one push at a time, {name} (means): whole push / the app role's internal call alone / GET /healthz on the app role / the transaction natively / the same with the commit unflushed"
        ),
        parts.value(),
        parts.parts(),
    );

    // Row 3b: the business service consuming quota (beside the push row: same run, same database).
    let check_db = product::connect(&db.url).await?;
    traffic::insert_consumers(&check_db).await?;
    let jobs = Arc::new(AtomicU64::new(0));
    let consume = || traffic::consume_source(&product.app_url, product::SERVICE_KEY, jobs.clone());
    let warm = generator.closed(consume(), 4, Duration::from_secs(1)).await;
    anyhow::ensure!(warm.failed() == 0, "consume warm-up failed: {}", failures(&warm));
    let consume_sat = generator.closed(consume(), workers, opts.e2e_seconds).await;
    table.row(
        "3b",
        format!("quota consume (service key), {name}: saturation, 2xx/s ({sat_label})"),
        format!("{:.0}", consume_sat.rps()),
        saturation_check(&consume_sat),
    );
    let consume_fixed = generator.open(consume(), opts.rate, opts.rate_seconds).await;
    table.row(
        "3b",
        format!("quota consume, {name}: latency p50 / p99 ({rate_label})"),
        format!("{} / {} ms", ms(consume_fixed.percentile(0.5)), ms(consume_fixed.percentile(0.99))),
        latency_check(&consume_fixed, opts.rate, consume_sat.rps()),
    );
    let consumed_ok = (warm.ok + consume_sat.ok + consume_fixed.ok) as i64;
    let consumed_sent = jobs.load(Ordering::Relaxed) as i64;
    let debits =
        wxhost_testkit::db_count(&db.url, "SELECT COUNT(*) FROM quota_ledger WHERE cause = 'consume'").await;
    let audit = wxhost::audit::quota(&check_db).await?;
    table.row(
        "3b",
        format!("{name} afterwards: ledger debits (expected: consumes answered 2xx); users whose balance is not their ledger"),
        format!("{debits} ({}); {}", if consumed_ok == consumed_sent { consumed_ok.to_string() } else { format!("{consumed_ok}..{consumed_sent}") }, audit.differences.len()),
        if (consumed_ok..=consumed_sent).contains(&debits) && audit.differences.is_empty() {
            "ok: each debit once, the books balance".to_string()
        } else {
            "MISMATCH".to_string()
        },
    );

    // Row 4: payment notifies.
    let notifies = signed_notifies(opts, notifies).await?;
    traffic::insert_orders(&check_db, notifies.orders.clone()).await?;
    let warm = generator
        .closed(traffic::notify_source(web, notifies.warm.clone()), 4, Duration::from_secs(60))
        .await;
    anyhow::ensure!(warm.failed() == 0, "notify warm-up failed: {}", failures(&warm));
    let sat = generator
        .closed(traffic::notify_source(web, notifies.saturation.clone()), workers, opts.e2e_seconds)
        .await;
    let mut check = saturation_check(&sat);
    if sat.exhausted {
        check.push_str(&format!(
            "; all {} pre-signed notifies used in {:.1} s (raise BENCH_NOTIFY_POOL)",
            notifies.saturation.len(),
            sat.elapsed.as_secs_f64()
        ));
    }
    table.row(
        "4",
        format!("payment notify end to end, {name}: saturation, 2xx/s ({sat_label})"),
        format!("{:.0}", sat.rps()),
        check,
    );
    let fixed = generator
        .open(traffic::notify_source(web, notifies.fixed.clone()), opts.rate, opts.rate_seconds)
        .await;
    table.row(
        "4",
        format!("payment notify end to end, {name}: latency p50 / p99 ({rate_label})"),
        format!("{} / {} ms", ms(fixed.percentile(0.5)), ms(fixed.percentile(0.99))),
        latency_check(&fixed, opts.rate, sat.rps()),
    );
    let repeat = || traffic::repeat_source(web, notifies.duplicate.clone());
    let first = generator.closed(once(repeat()), 1, Duration::from_secs(10)).await;
    anyhow::ensure!(first.ok == 1, "the first delivery of the repeated notify failed: {}", failures(&first));
    let dup_sat = generator.closed(repeat(), workers, opts.dup_seconds).await;
    table.row(
        "4",
        format!(
            "duplicate notify (already paid), {name}: saturation, 2xx/s ({workers} workers x {:.0} s)",
            opts.dup_seconds.as_secs_f64()
        ),
        format!("{:.0}", dup_sat.rps()),
        saturation_check(&dup_sat),
    );
    let dup_fixed = generator.open(repeat(), opts.rate, opts.dup_seconds).await;
    table.row(
        "4",
        format!(
            "duplicate notify, {name}: latency p50 / p99 ({:.0} req/s x {:.0} s open loop)",
            opts.rate,
            opts.dup_seconds.as_secs_f64()
        ),
        format!("{} / {} ms", ms(dup_fixed.percentile(0.5)), ms(dup_fixed.percentile(0.99))),
        latency_check(&dup_fixed, opts.rate, dup_sat.rps()),
    );
    // A first delivery answered 2xx was applied; one that failed (a 503 past the
    // deadline, say) may or may not have been, and WeChat Pay would retry it.
    let first_ok = (warm.ok + sat.ok + fixed.ok + 1) as i64;
    let first_sent = first_ok + (sat.failed() + fixed.failed()) as i64;

    // Row 5: hot swap under load.
    if hot_swap && opts.swap_seconds > Duration::ZERO {
        push_failed += hot_swap_rows(opts, name, product, generator, table, &pushes).await?;
    }

    // The database afterwards: every event applied exactly once.
    let push_sent = pushes.load(Ordering::Relaxed) as i64;
    let push_ok = push_sent - push_failed as i64;
    let users = wxhost_testkit::db_count(
        &db.url,
        "SELECT COUNT(*) FROM users WHERE openid LIKE 'oPush%' AND subscribed = 1",
    )
    .await;
    let paid = wxhost_testkit::db_count(&db.url, "SELECT COUNT(*) FROM orders WHERE status = 'paid'").await;
    let credited = wxhost_testkit::db_count(
        &db.url,
        "SELECT COUNT(*) FROM users WHERE openid LIKE 'oPay%' AND quota = 10",
    )
    .await;
    let over = wxhost_testkit::db_count(
        &db.url,
        "SELECT COUNT(*) FROM users WHERE openid LIKE 'oPay%' AND quota > 10",
    )
    .await;
    let pushes_ok = (push_ok..=push_sent).contains(&users);
    let notifies_ok = (first_ok..=first_sent).contains(&paid) && credited == paid && over == 0;
    let check = match (pushes_ok && notifies_ok, push_sent - push_ok + first_sent - first_ok) {
        (true, 0) => "ok: every event applied exactly once".to_string(),
        (true, n) => {
            format!("ok: each applied at most once; {n} failed requests (retried by WeChat in production)")
        }
        (false, _) => "MISMATCH".to_string(),
    };
    let range = |ok: i64, sent: i64| if ok == sent { ok.to_string() } else { format!("{ok}..{sent}") };
    table.row(
        "3-4",
        format!(
            "{name} afterwards: users subscribed by pushes (expected: pushes answered 2xx); orders paid, \
             payers credited 10 (expected: first deliveries answered 2xx); payers credited more"
        ),
        format!(
            "{users} ({}); {paid}, {credited} ({}); {over}",
            range(push_ok, push_sent),
            range(first_ok, first_sent)
        ),
        check,
    );
    Ok(())
}

/// Row 5; the number of pushes that failed.
async fn hot_swap_rows(
    opts: &Options,
    name: &str,
    product: &Product,
    generator: &LoadGen,
    table: &mut Table,
    pushes: &Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let web = &product.web_url;
    let swapper = Arc::new(swap::Swapper::new(
        product.web.host.clone(),
        product.dir.path().join("verify.wasm"),
        opts.swap_fresh,
    )?);
    // The variant's first reload compiles it (no load running).
    let cold_reload = swapper.prepare().await?;
    // One steady load; swaps only in every other window, so that quiet and
    // swapping windows alternate and share the machine's noise.
    let (window, total) = (opts.swap_window, opts.swap_seconds);
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + total;
    let swapping = tokio::spawn({
        let (swapper, interval) = (swapper.clone(), opts.swap_interval);
        async move { swapper.swap_in_windows(start, end, window, interval).await }
    });
    let (verify_run, push_run) = futures_join(
        generator.open_from(traffic::verify_source(web), opts.swap_verify_rate, total, start),
        generator.open_from(traffic::push_source(web, pushes.clone()), opts.swap_push_rate, total, start),
    )
    .await;
    let mut swaps = swapping.await.context("the swapper panicked")?;
    swapper.restore().await;
    swaps.reload_times.sort();
    let in_swapping = |at: Duration| (at.as_nanos() / window.as_nanos().max(1)) % 2 == 1;
    let verify_all = verify_run.outcome(|_| true);
    let push_all = push_run.outcome(|_| true);
    let (verify_before, verify_during) =
        (verify_run.outcome(|at| !in_swapping(at)), verify_run.outcome(in_swapping));
    let (push_before, push_during) = (push_run.outcome(|at| !in_swapping(at)), push_run.outcome(in_swapping));

    let failed = verify_all.failed() + push_all.failed();
    let sent = verify_all.answered() + verify_all.errors + push_all.answered() + push_all.errors;
    let mut check = if failed == 0 { "ok (must be 0)".to_string() } else { "FAILED (must be 0)".into() };
    for o in [&verify_all, &push_all] {
        if let Some(f) = &o.first_failure {
            check.push_str(&format!("; first: {}", f.replace('|', "/")));
        }
    }
    let load_label = format!(
        "verify {:.0} + push {:.0} req/s x {:.0} s, {name}",
        opts.swap_verify_rate,
        opts.swap_push_rate,
        opts.swap_seconds.as_secs_f64()
    );
    table.row(
        "5",
        format!("hot swap under load: failed requests, whole run ({load_label})"),
        format!("{failed} of {sent}"),
        check,
    );
    let per_second = swaps.done as f64 / total.as_secs_f64();
    let median_reload = swaps.reload_times.get(swaps.reload_times.len() / 2).copied().unwrap_or_default();
    let max_reload = swaps.reload_times.last().copied().unwrap_or_default();
    let mut check = format!(
        "{per_second:.2}/s over the run (aim >= 1/s), {:.1}/s within swapping windows; reload median {} ms, max {} ms",
        2.0 * per_second,
        ms(median_reload),
        ms(max_reload)
    );
    if swaps.failed > 0 {
        check.push_str(&format!("; {} refused: {}", swaps.failed, swaps.first_error.unwrap_or_default()));
    }
    let what = if opts.swap_fresh { "each a never-seen version" } else { "variant and original alternately" };
    table.row(
        "5",
        format!(
            "hot swap: verify versions swapped in, one every {} ms in every other {} ms window ({what})",
            opts.swap_interval.as_millis(),
            window.as_millis()
        ),
        swaps.done.to_string(),
        check,
    );
    table.row(
        "5",
        "hot swap: reload of a never-seen verify version (read + compile + link + swap), no load",
        format!("{} ms", ms(cold_reload)),
        "off the request path (compiled on a blocking thread)",
    );
    let before_label = "quiet windows / swapping windows";
    table.row(
        "5",
        format!("hot swap: GET verify p99, {before_label}"),
        format!("{} / {} ms", ms(verify_before.percentile(0.99)), ms(verify_during.percentile(0.99))),
        format!(
            "p50 {} / {} ms; {} / {} requests",
            ms(verify_before.percentile(0.5)),
            ms(verify_during.percentile(0.5)),
            verify_before.answered(),
            verify_during.answered()
        ),
    );
    table.row(
        "5",
        format!("hot swap: push p99, {before_label}"),
        format!("{} / {} ms", ms(push_before.percentile(0.99)), ms(push_during.percentile(0.99))),
        format!(
            "p50 {} / {} ms; {} / {} requests{}",
            ms(push_before.percentile(0.5)),
            ms(push_during.percentile(0.5)),
            push_before.answered(),
            push_during.answered(),
            if push_all.max_send_lag.max(verify_all.max_send_lag) > Duration::from_millis(5) {
                format!(
                    "; generator up to {} ms late",
                    ms(push_all.max_send_lag.max(verify_all.max_send_lag))
                )
            } else {
                String::new()
            }
        ),
    );
    Ok(push_all.failed())
}

/// Both futures at once (tokio::join!, spelled as a function for the closure above).
async fn futures_join<A: std::future::Future, B: std::future::Future>(a: A, b: B) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

/// One wrk run: requests per second, and CPU time per request of this process
/// (the servers) and of wrk, so the ratio can be told apart from scheduling.
struct WrkRun {
    rps: f64,
    server_cpu_us: f64,
    wrk_cpu_us: f64,
}

/// One wrk run against `url`; the server's CPU is this process's, or that of
/// `server_pid` when the server is another process (the peer).
fn wrk(url: &str, connections: usize, seconds: u64, server_pid: Option<u32>) -> anyhow::Result<WrkRun> {
    let server_ticks = || -> anyhow::Result<u64> {
        match server_pid {
            Some(pid) => Ok(cpu_ticks_of(&format!("/proc/{pid}/stat"))?.0),
            None => Ok(cpu_ticks()?.0),
        }
    };
    let (server_before, before) = (server_ticks()?, cpu_ticks()?);
    let out = std::process::Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s"), url])
        .output()
        .context("running wrk")?;
    let (server_after, after) = (server_ticks()?, cpu_ticks()?);
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(!text.contains("Non-2xx"), "errors during the run:\n{text}");
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    // "N requests in 5.00s, …"
    let requests: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").map(|(n, _)| n.trim().to_string()))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
    let per_request = |ticks: u64| ticks as f64 * 1e6 / clock_ticks_per_second() / requests.max(1.0);
    Ok(WrkRun {
        rps,
        server_cpu_us: per_request(server_after - server_before),
        wrk_cpu_us: per_request(after.1 - before.1),
    })
}

/// CPU time (user + system, in clock ticks) of this process and of its
/// waited-for children, from /proc/self/stat.
fn cpu_ticks() -> anyhow::Result<(u64, u64)> {
    cpu_ticks_of("/proc/self/stat")
}

/// (own, waited-for children's) CPU time in clock ticks from a `/proc/…/stat`.
fn cpu_ticks_of(path: &str) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces) start at "state".
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        // `n` is the 1-based field number of proc(5); "state" is field 3.
        fields.get(n - 3).and_then(|v| v.parse().ok()).context("unexpected /proc/self/stat")
    };
    Ok((field(14)? + field(15)?, field(16)? + field(17)?))
}

/// USER_HZ; 100 on every Linux this runs on, but asked rather than assumed.
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn which_wrk() -> anyhow::Result<()> {
    std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .map(|_| ())
        .context("wrk is not installed: run bench/run, or apt-get install wrk")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
