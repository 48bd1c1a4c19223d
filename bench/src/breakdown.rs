//! Where one request's time goes, in CPU instructions: `bench/breakdown` runs
//! `wxhost-bench breakdown STAGE N` under `valgrind --tool=callgrind` twice
//! (N requests, then 2N) and divides the difference by N, so that start-up
//! (loading the plugin, binding, warming up) cancels out. Instruction counts
//! do not move with the machine's load, unlike timings; they leave out the
//! kernel's work (TCP on loopback, page faults, futex waits), which row 1 of
//! `bench/run` measures as time.
//!
//! Each stage runs a longer or shorter piece of GET verify's path in a loop;
//! the parts of the table are differences of stages (a piece of the path
//! exists on its own only as "this stage minus that one": inlining blurs
//! functions in a release build, stages do not).

use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt as _;

use wxhost::bindings::wxhost::plugin::types::Request;
use wxhost::config::Role;
use wxhost::wechat::{CallbackKeys, sorted_sha1};

/// A piece of the request path, run `N` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Over a loopback connection (keep-alive, one request at a time): hyper,
    /// axum, the host's dispatch, the sandbox.
    Http(Server),
    /// The role's router called in-process (`oneshot`): no sockets, no hyper.
    Router(Server),
    /// The plugin through the host's executor (its own runtime), as dispatch calls it.
    Executor(Sandbox),
    /// `runtime::invoke` on this thread: store, instance, call, drop.
    Invoke(Sandbox),
    /// One instance called again and again (what a reused instance does per
    /// request, without the idle-pool bookkeeping).
    Call,
    /// A fresh store (with its WASI context), instantiated, dropped; no call.
    Instantiate(Sandbox),
    /// A fresh store, dropped.
    Store,
    /// The signature check alone, natively.
    Check,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    Native,
    Plugin(Sandbox),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sandbox {
    Fresh,
    /// Fresh, with only the pages a request wrote reset
    /// (`reset_dirty_pages_only = true`): the cut tried.
    FreshDirtyOnly,
    /// The sandbox probe's `/probe/ok` (does nothing), fresh.
    Floor,
    /// An instance kept for the next request (`requests_per_instance = 1000`).
    Reused,
}

const STAGES: &[(&str, Stage)] = &[
    ("native-http", Stage::Http(Server::Native)),
    ("native-router", Stage::Router(Server::Native)),
    ("check", Stage::Check),
    ("fresh-http", Stage::Http(Server::Plugin(Sandbox::Fresh))),
    ("fresh-router", Stage::Router(Server::Plugin(Sandbox::Fresh))),
    ("reused-http", Stage::Http(Server::Plugin(Sandbox::Reused))),
    ("reused-router", Stage::Router(Server::Plugin(Sandbox::Reused))),
    ("fresh-executor", Stage::Executor(Sandbox::Fresh)),
    ("fresh-invoke", Stage::Invoke(Sandbox::Fresh)),
    ("instantiate", Stage::Instantiate(Sandbox::Fresh)),
    ("store", Stage::Store),
    ("floor-invoke", Stage::Invoke(Sandbox::Floor)),
    ("reused-call", Stage::Call),
    ("dirty-invoke", Stage::Invoke(Sandbox::FreshDirtyOnly)),
    ("dirty-instantiate", Stage::Instantiate(Sandbox::FreshDirtyOnly)),
];

/// The stages' names, for `bench/breakdown`.
pub fn stage_names() -> Vec<&'static str> {
    STAGES.iter().map(|(name, _)| *name).collect()
}

/// Runs before the counted ones, the same in both runs.
const WARM_UP: usize = 100;

/// Runs `requests` of `stage` (after a warm-up).
pub async fn run(stage: &str, requests: usize) -> anyhow::Result<()> {
    let stage = STAGES
        .iter()
        .find(|(name, _)| *name == stage)
        .map(|(_, s)| *s)
        .with_context(|| format!("unknown stage {stage:?}: {}", stage_names().join(", ")))?;
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs().to_string();
    let signature = sorted_sha1(&[super::TOKEN, &ts, "bench"]);
    let query = format!("signature={signature}&timestamp={ts}&nonce=bench&echostr=5188563426541789870");
    let crypto = Arc::new(CallbackKeys::new(Some(super::TOKEN.to_string().into()), None, None, Some(300))?);
    let dir = tempfile::tempdir()?;
    let sandbox = match stage {
        Stage::Http(Server::Plugin(s))
        | Stage::Router(Server::Plugin(s))
        | Stage::Executor(s)
        | Stage::Invoke(s)
        | Stage::Instantiate(s) => Some(s),
        Stage::Call | Stage::Store => Some(Sandbox::Fresh),
        _ => None,
    };
    let (path, route) = match sandbox {
        Some(Sandbox::Floor) => ("/probe/ok".to_string(), "/probe/ok"),
        _ => (format!("/api/v1/auth/wechat/verify?{query}"), "/api/v1/auth/wechat/verify"),
    };
    let server = match sandbox {
        Some(s) => {
            let dist = match (s, std::env::var_os("BREAKDOWN_VERIFY")) {
                (Sandbox::Floor, _) => super::product::dist("fixtures/sandbox-probe.wasm"),
                // Another build of verify (a build setting being tried).
                (_, Some(path)) => std::path::PathBuf::from(path),
                (_, None) => super::product::dist("verify.wasm"),
            };
            let host = super::HostSettings {
                // valgrind cannot reserve the address space of more slots.
                max_instances: 4,
                reset_dirty_pages_only: s == Sandbox::FreshDirtyOnly,
            };
            let requests_per_instance = if s == Sandbox::Reused { 1000 } else { 1 };
            Some(
                super::web_server_with(
                    dir.path(),
                    &dist,
                    &format!("GET {route}"),
                    requests_per_instance,
                    host,
                )
                .await?,
            )
        }
        None => None,
    };
    let wit_request = Request {
        method: "GET".into(),
        route: route.into(),
        path: route.into(),
        query: if sandbox == Some(Sandbox::Floor) { String::new() } else { query.clone() },
        params: vec![],
        headers: vec![],
        body: vec![],
        request_id: "breakdown".into(),
        client_ip: None,
        service: None,
    };
    let native = || {
        axum::Router::new()
            .route("/api/v1/auth/wechat/verify", axum::routing::get(super::native_verify))
            .with_state(crypto.clone())
    };
    let router = match &server {
        Some(s) => wxhost::server::role_router(s.host.clone(), Role::Web, Default::default(), None),
        None => native(),
    };
    match stage {
        Stage::Http(_) => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
            tokio::spawn(async move { axum::serve(listener, app).await });
            let mut client = tokio::net::TcpStream::connect(addr).await?;
            client.set_nodelay(true)?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: wxhost-bench\r\n\r\n");
            for _ in 0..WARM_UP + requests {
                exchange(&mut client, request.as_bytes()).await?;
            }
        }
        Stage::Router(_) => {
            for _ in 0..WARM_UP + requests {
                let request = axum::http::Request::get(&path).body(axum::body::Body::empty())?;
                let response = router.clone().oneshot(request).await?;
                anyhow::ensure!(response.status() == 200, "answered {}", response.status());
                axum::body::to_bytes(response.into_body(), 1 << 16).await?;
            }
        }
        Stage::Call => {
            let server = server.as_ref().context("a plugin server")?;
            let (host, plugin) = (&server.host, server.host.runtime(Role::Web).plugins[0].clone());
            let mut store = store_for(host, &plugin, std::time::Duration::from_secs(3600));
            store.set_epoch_deadline(1_000_000);
            let instance = plugin.pre.instantiate_async(&mut store).await?;
            for _ in 0..WARM_UP + requests {
                let r = instance.wxhost_plugin_handler().call_handle(&mut store, &wit_request).await?;
                anyhow::ensure!(r.status == 200, "answered {}", r.status);
            }
        }
        Stage::Executor(_) | Stage::Invoke(_) | Stage::Instantiate(_) | Stage::Store => {
            let server = server.as_ref().context("a plugin server")?;
            let (host, plugin) = (&server.host, server.host.runtime(Role::Web).plugins[0].clone());
            for _ in 0..WARM_UP + requests {
                match stage {
                    Stage::Executor(_) => {
                        let r = host.call(plugin.clone(), wit_request.clone()).await?;
                        anyhow::ensure!(r.status == 200, "answered {}", r.status);
                    }
                    Stage::Invoke(_) => {
                        let r = wxhost::runtime::invoke(
                            &host.engine,
                            &host.services,
                            &plugin,
                            wit_request.clone(),
                        )
                        .await?;
                        anyhow::ensure!(r.status == 200, "answered {}", r.status);
                    }
                    _ => {
                        let mut store = store_for(host, &plugin, plugin.deadline);
                        store.set_epoch_deadline(1);
                        if matches!(stage, Stage::Instantiate(_)) {
                            plugin.pre.instantiate_async(&mut store).await?;
                        }
                        drop(store);
                    }
                }
            }
        }
        Stage::Check => {
            for _ in 0..WARM_UP + requests {
                let ok = crypto.verify_server_signature(&signature, &ts, "bench").is_ok();
                anyhow::ensure!(std::hint::black_box(ok), "the check failed");
            }
        }
    }
    Ok(())
}

/// A store for one instance of `plugin`, its deadline `within` from now.
fn store_for(
    host: &wxhost::host::Host,
    plugin: &wxhost::plugin::LoadedPlugin,
    within: std::time::Duration,
) -> wasmtime::Store<wxhost::caps::PluginState> {
    wxhost::runtime::new_store(
        &host.engine,
        &host.services,
        plugin,
        "breakdown".into(),
        std::time::Instant::now() + within,
    )
}

/// One request and its whole response on a keep-alive connection.
async fn exchange(client: &mut tokio::net::TcpStream, request: &[u8]) -> anyhow::Result<()> {
    client.write_all(request).await?;
    let mut answer = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = client.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the server closed the connection");
        answer.extend_from_slice(&buf[..n]);
        let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = std::str::from_utf8(&answer[..end])?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "answered {}", head.lines().next().unwrap_or(""));
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
            })
            .context("no content-length")?
            .parse()?;
        if answer.len() >= end + 4 + length {
            return Ok(());
        }
    }
}

fn describe(stage: Stage) -> &'static str {
    match stage {
        Stage::Http(Server::Native) => "native handler over a loopback connection",
        Stage::Http(Server::Plugin(Sandbox::Reused)) => {
            "verify plugin over a loopback connection, instance reused"
        }
        Stage::Http(_) => "verify plugin over a loopback connection",
        Stage::Router(Server::Native) => "native router in-process (oneshot)",
        Stage::Router(Server::Plugin(Sandbox::Reused)) => "the web role's router in-process, instance reused",
        Stage::Router(_) => "the web role's router in-process (oneshot)",
        Stage::Executor(_) => "the plugin through the host's executor",
        Stage::Invoke(Sandbox::Floor) => "a do-nothing plugin invoked fresh on this thread",
        Stage::Invoke(Sandbox::FreshDirtyOnly) => "invoked fresh, only the pages written reset",
        Stage::Invoke(_) => "invoked fresh on this thread",
        Stage::Call => "one instance called again and again",
        Stage::Instantiate(Sandbox::FreshDirtyOnly) => {
            "store + instantiate + drop, only the pages written reset"
        }
        Stage::Instantiate(_) => "store + instantiate + drop",
        Stage::Store => "store created and dropped",
        Stage::Check => "the signature check, natively",
    }
}

/// Each stage that ran, by part of the code ([`by_part`]).
fn stage_parts(dir: &std::path::Path) -> anyhow::Result<std::collections::BTreeMap<&'static str, Vec<f64>>> {
    let mut parts = std::collections::BTreeMap::new();
    for (name, _) in STAGES {
        if let Some(p) = by_part(dir, name)? {
            parts.insert(*name, p);
        }
    }
    Ok(parts)
}

/// The sum of `parts` without the one that is not per request.
fn per_request(parts: &[f64]) -> f64 {
    let noise = PARTS.iter().position(|(name, _)| *name == NOT_PER_REQUEST);
    parts.iter().enumerate().filter(|(i, _)| Some(*i) != noise).map(|(_, x)| x).sum()
}

/// What a function's own instructions (callgrind's self cost) are counted
/// as: the first part whose name or object matches, in this order.
const PARTS: &[(&str, &[&str])] = &[
    (
        "the signature check (SHA-1 over the sorted token, timestamp, nonce)",
        &["sha1::", "hex::", "subtle::", "wxhost::wechat::", "wxhost_bench::native_verify"],
    ),
    ("hyper: HTTP/1 parsing, writing, the connection's state machine", &["hyper::", "httparse::", "bytes::"]),
    (
        "axum, tower, http: routing, extractors, request and response types",
        &[
            "axum::",
            "tower::",
            "http::",
            "http_body",
            "hyper_util::",
            "matchit::",
            "serde_urlencoded",
            "form_urlencoded",
            "percent_encoding",
            "serde_path_to_error",
        ],
    ),
    ("tokio: tasks, wakers, I/O readiness, timers", &["tokio::", "mio::"]),
    (
        "wxhost's dispatch: request id, route, guards, the WIT request and response, idle pool, executor",
        &[
            "wxhost::server",
            "wxhost::runtime",
            "wxhost::host",
            "wxhost::plugin",
            "wxhost::client_limit",
            "rand::",
            "rand_core::",
            "chacha20::",
            "wxhost_bench::breakdown",
        ],
    ),
    ("metrics (route counter and histogram) and tracing", &["metrics", "quanta::", "tracing"]),
    (
        "the plugin's host call: the check's WIT glue, its strings lifted",
        &["wxhost::caps::callback_crypto", "wxhost::bindings"],
    ),
    (
        "a store: its state and WASI context",
        &["wxhost::caps", "wasmtime_wasi", "cap_rand", "cap_std", "cap_primitives", "async_trait"],
    ),
    (
        "wasmtime: calls into and out of the guest (lowering, lifting, fiber switches, trap handler set-up, epoch)",
        &[
            "wasmtime::runtime::component::func",
            "wasmtime::runtime::func",
            "wasmtime::runtime::fiber",
            "wasmtime_internal_fiber",
            "wasmtime::runtime::vm::traphandlers",
            "wasmtime::runtime::component::resource",
            "wasmtime::runtime::vm::component::libcalls",
            "wasmtime::runtime::vm::libcalls",
            "wasmtime::runtime::store::async_",
            "wasmtime::runtime::vm::vmcontext",
            "wasmtime_internal_unwinder",
        ],
    ),
    (
        "wasmtime: instantiating and tearing down (slots, vmctx, imports, tables, the memory image)",
        &["wasmtime", "cranelift"],
    ),
    ("the guest's own code (compiled wasm, no symbols) and wasmtime's trampolines", &["???:0x"]),
    ("memset (libc): the instance's memory reset for the pool, buffers", &["memset"]),
    ("memcpy (libc): the data image copied back, buffers, strings", &["memcpy", "memmove"]),
    ("malloc and free (libc)", &["malloc", "free", "realloc", "__rdl_", "__rust_", "arena.c", "calloc"]),
    (NOT_PER_REQUEST, &["once_cell::imp", "clock_gettime", "clock_nanosleep", "ld-linux", "_dl_"]),
    ("libc otherwise: syscall wrappers, locks", &["libc.so", "pthread", "libgcc"]),
    (
        "Rust's std inlined everywhere: strings, formatting, hashing, vectors, clocks, locks",
        &["core::", "alloc::", "std::", "hashbrown::", "smallvec::", "parking_lot", "serde"],
    ),
];

/// Work that follows the clock, not the requests (the epoch ticker's sleeps
/// and clock reads, lazy start-up): it differs between the two runs by
/// however much longer one lasted, so it is shown and left out of the total.
const NOT_PER_REQUEST: &str =
    "not per request: start-up and the epoch ticker (clock reads, sleeps); left out of the total";

/// Instructions per request by part of the code ([`PARTS`]), from the two
/// callgrind files of `stage`: each function's self cost in the longer run
/// minus the shorter one, divided by the extra requests.
fn by_part(dir: &std::path::Path, stage: &str) -> anyhow::Result<Option<Vec<f64>>> {
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|s| s.to_str()) else { continue };
        let Some(n) =
            name.strip_prefix(stage).and_then(|r| r.strip_prefix('-')).and_then(|r| r.strip_suffix(".out"))
        else {
            continue;
        };
        let Ok(n) = n.parse::<f64>() else { continue };
        runs.push((n, self_costs(&path)?));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let [(n1, short), (n2, long)] = &runs[..] else { return Ok(None) };
    let mut parts = vec![0.0; PARTS.len() + 1];
    for (function, &count) in long {
        let extra = (count as f64 - short.get(function).copied().unwrap_or(0) as f64) / (n2 - n1);
        let part = PARTS
            .iter()
            .position(|(_, patterns)| patterns.iter().any(|p| function.contains(p)))
            .unwrap_or(PARTS.len());
        parts[part] += extra;
    }
    Ok(Some(parts))
}

/// Each function's self cost in a callgrind file (`callgrind_annotate`).
fn self_costs(path: &std::path::Path) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    let out = std::process::Command::new("callgrind_annotate")
        .args(["--threshold=100", "--inclusive=no"])
        .arg(path)
        .output()
        .context("running callgrind_annotate (valgrind's)")?;
    anyhow::ensure!(out.status.success(), "callgrind_annotate failed on {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut costs = std::collections::HashMap::new();
    for line in text.lines().skip_while(|l| !l.contains("file:function")).skip(2) {
        let line = line.trim_start();
        let Some((count, rest)) = line.split_once(' ') else { continue };
        let Ok(count) = count.replace(',', "").parse::<u64>() else { continue };
        let function = rest.split_once(")  ").map_or(rest, |(_, f)| f).trim();
        *costs.entry(function.to_string()).or_insert(0) += count;
    }
    Ok(costs)
}

/// The table, from the callgrind files of `bench/breakdown` in `dir`.
pub fn report(dir: &std::path::Path) -> anyhow::Result<()> {
    // A stage's instructions per request: its parts summed, less what follows the clock.
    let parts = stage_parts(dir)?;
    let get = |s: &str| parts.get(s).map(|p| per_request(p));
    let diff = |a: &str, b: &str| Some(get(a)? - get(b)?);
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let rows: Vec<(&str, [Option<f64>; 3])> = vec![
        (
            "HTTP/1 over the socket: hyper reading, parsing, writing; the connection task; syscall wrappers (http - router; the plugin's also lowers the request's two headers into the guest)",
            [
                diff("native-http", "native-router"),
                diff("fresh-http", "fresh-router"),
                diff("reused-http", "reused-router"),
            ],
        ),
        (
            "axum's router and extractors around the check (native: router - check)",
            [diff("native-router", "check"), None, None],
        ),
        (
            "axum and the host's dispatch around the plugin: request id, route, the WIT request and response, metrics (router - executor)",
            [None, diff("fresh-router", "fresh-executor"), None],
        ),
        (
            "the executor: instance slot, the first poll on the caller's task (executor - invoke)",
            [None, diff("fresh-executor", "fresh-invoke"), None],
        ),
        ("a store and its WASI context, created and dropped", [None, get("store"), None]),
        (
            "instantiate, and the instance's teardown: memory reset for the pool (instantiate - store)",
            [None, diff("instantiate", "store"), None],
        ),
        (
            "  the same with only the pages written reset (reset_dirty_pages_only; kernel scan not counted)",
            [None, diff("dirty-instantiate", "store"), None],
        ),
        (
            "the call: the request lowered, the guest, its host call, the response lifted (fresh: invoke - instantiate)",
            [None, diff("fresh-invoke", "instantiate"), get("reused-call")],
        ),
        (
            "  of which the signature check itself (native: the handler's whole work)",
            [get("check"), get("check"), get("check")],
        ),
        (
            "for scale: a do-nothing plugin invoked fresh (the floor: store, instantiate, call, teardown)",
            [None, get("floor-invoke"), None],
        ),
        ("**total per request over HTTP**", [get("native-http"), get("fresh-http"), get("reused-http")]),
    ];
    println!("Instructions per request (callgrind; kernel work not counted), GET verify:");
    println!("| part of the path | native | plugin, fresh instance | plugin, instance reused |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, cells) in rows {
        println!("| {name} | {} | {} | {} |", cell(cells[0]), cell(cells[1]), cell(cells[2]));
    }
    println!("\nEach stage, instructions per request (the differences above are made of these):");
    println!("| stage | what runs N times | instructions |");
    println!("| --- | --- | ---: |");
    for (name, stage) in STAGES {
        println!("| {name} | {} | {} |", describe(*stage), cell(get(name)));
    }
    let columns = ["native-http", "fresh-http", "reused-http"].map(|stage| parts.get(stage).cloned());
    if columns.iter().any(Option::is_some) {
        println!(
            "\nThe same requests over HTTP by the code that runs, instructions per request (each function's own"
        );
        println!("instructions, by its name; inlined code counts where it was inlined):");
        println!("| code | native | plugin, fresh instance | plugin, instance reused |");
        println!("| --- | ---: | ---: | ---: |");
        let cell =
            |c: &Option<Vec<f64>>, i: usize| c.as_ref().map_or("-".to_string(), |v| format!("{:.0}", v[i]));
        let names = PARTS.iter().map(|(name, _)| *name).chain(["everything else"]);
        for (i, name) in names.enumerate() {
            println!(
                "| {name} | {} | {} | {} |",
                cell(&columns[0], i),
                cell(&columns[1], i),
                cell(&columns[2], i)
            );
        }
        let total =
            |c: &Option<Vec<f64>>| c.as_ref().map_or("-".to_string(), |v| format!("{:.0}", per_request(v)));
        println!("| **total** | {} | {} | {} |", total(&columns[0]), total(&columns[1]), total(&columns[2]));
    }
    println!(
        "\nHow far to trust it: the native rows repeat within 1% from run to run, and so does the table by code, \
         which counts each function's own instructions and leaves out what follows the clock. The stage differences \
         of the plugin do not: under valgrind a request lasts ~50 times longer, so it meets several 1 ms epoch ticks \
         (each a yield and a re-poll, and the ticker's own work), by however much longer one run lasted than the \
         other. memset's `rep stosb` counts per byte, and the kernel's work (TCP on loopback, page faults, the \
         PAGEMAP_SCAN ioctl) is not counted at all: a cut is judged by bench/run's timings, never by this table."
    );
    Ok(())
}
