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
}

const STAGES: &[(&str, Stage)] = &[
    ("native-http", Stage::Http(Server::Native)),
    ("native-router", Stage::Router(Server::Native)),
    ("check", Stage::Check),
    ("fresh-http", Stage::Http(Server::Plugin(Sandbox::Fresh))),
    ("fresh-router", Stage::Router(Server::Plugin(Sandbox::Fresh))),
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
            let wasm = if s == Sandbox::Floor { "fixtures/sandbox-probe.wasm" } else { "verify.wasm" };
            let dist = super::product::dist(wasm);
            let host = super::HostSettings {
                // valgrind cannot reserve the address space of more slots.
                max_instances: 4,
                reset_dirty_pages_only: s == Sandbox::FreshDirtyOnly,
            };
            Some(super::web_server_with(dir.path(), &dist, &format!("GET {route}"), 1, host).await?)
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
        Stage::Http(_) => "verify plugin over a loopback connection",
        Stage::Router(Server::Native) => "native router in-process (oneshot)",
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

/// Instructions of a callgrind run (`summary:` or `totals:` of its output file).
fn total_instructions(callgrind_out: &str) -> Option<u64> {
    callgrind_out
        .lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Instructions per run of each stage, from `DIR/STAGE-N.out` (two N each).
fn per_stage(dir: &std::path::Path) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let mut runs: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("out") {
            continue;
        }
        let Some((stage, n)) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.rsplit_once('-'))
        else {
            continue;
        };
        let total = total_instructions(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("no totals in {}", path.display()))?;
        runs.entry(stage.to_string()).or_default().push((n.parse()?, total as f64));
    }
    let mut per = std::collections::BTreeMap::new();
    for (stage, mut r) in runs {
        r.sort_by(|a, b| a.0.total_cmp(&b.0));
        if let [(n1, t1), (n2, t2)] = r[..] {
            per.insert(stage, (t2 - t1) / (n2 - n1));
        }
    }
    Ok(per)
}

/// The table, from the callgrind files of `bench/breakdown` in `dir`.
pub fn report(dir: &std::path::Path) -> anyhow::Result<()> {
    let per = per_stage(dir)?;
    let get = |s: &str| per.get(s).copied();
    let diff = |a: &str, b: &str| Some(get(a)? - get(b)?);
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let rows: Vec<(&str, [Option<f64>; 3])> = vec![
        (
            "HTTP/1 over the socket: hyper reading, parsing, writing; the connection task; syscall wrappers (http - router)",
            [diff("native-http", "native-router"), diff("fresh-http", "fresh-router"), None],
        ),
        (
            "axum's router and extractors around the check (native: router - check)",
            [diff("native-router", "check"), None, None],
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
        ("**total per request over HTTP**", [get("native-http"), get("fresh-http"), None]),
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
    println!(
        "\nHow far to trust it: the native and HTTP rows repeat within 1% from run to run. The sandbox's rows \
         move by tens of thousands of instructions between stages and runs: under valgrind a request lasts \
         ~50 times longer, so it meets several 1 ms epoch ticks (each a yield and a re-poll), and which pool \
         slot an instance gets changes its memory reset; memset's `rep stosb` counts per iteration and the \
         kernel's work (page faults, the PAGEMAP_SCAN ioctl) not at all. So the host's own dispatch and the \
         hand-off to the plugin runtime (router - executor - invoke), a few thousand instructions, are below \
         its resolution, and a cut of the sandbox is judged by bench/run's timings, never by this table."
    );
    Ok(())
}
