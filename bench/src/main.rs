//! Side-by-side benchmark of `GET /api/v1/auth/wechat/verify`: served through
//! the `verify` plugin (fresh sandbox per request) and by a native axum handler
//! doing the same work (the same signature check), loaded by the same `wrk` in
//! the same run, in alternating rounds so that machine noise hits both alike.
//! Also measures the per-request sandbox cost (instantiate + call + drop).
//!
//! Run with `bench/run` (builds in release, installs wrk if missing).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use wxhost::bindings::wxhost::plugin::types::Request;
use wxhost::caps::callback_crypto::{CallbackCrypto, sorted_sha1};
use wxhost::config::Role;
use wxhost::server::{ServeOptions, start};
use wxhost::settings::Settings;

const TOKEN: &str = "bench-token";

struct Options {
    rounds: usize,
    seconds: u64,
    connections: usize,
    sandbox_iterations: usize,
}

fn options() -> Options {
    let env =
        |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    Options {
        rounds: env("BENCH_ROUNDS", 3),
        seconds: env("BENCH_SECONDS", 5) as u64,
        connections: env("BENCH_CONNECTIONS", 64),
        sandbox_iterations: env("BENCH_SANDBOX_ITERATIONS", 5000),
    }
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
    State(crypto): State<Arc<CallbackCrypto>>,
    Query(q): Query<VerifyQuery>,
) -> (StatusCode, String) {
    match crypto.verify_server_signature(&q.signature, &q.timestamp, &q.nonce) {
        Ok(()) => (StatusCode::OK, q.echostr),
        Err(_) => (StatusCode::UNAUTHORIZED, String::new()),
    }
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(options()))
}

async fn run(opts: Options) -> anyhow::Result<()> {
    which_wrk()?;
    let dir = tempfile::tempdir()?;
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/verify.wasm");
    std::fs::copy(&dist, dir.path().join("verify.wasm"))
        .with_context(|| format!("copying {}", dist.display()))?;
    std::fs::write(
        dir.path().join("plugins.toml"),
        r#"
[host]
max_instances = 256
[admin]
listen = "127.0.0.1:0"
[roles.web]
listen = "127.0.0.1:0"
grants = ["log", "config", "callback-crypto", "internal-call"]
deadline_ms = 2000
memory_limit_mib = 16
[[plugins]]
name = "verify"
role = "web"
wasm = "verify.wasm"
routes = ["GET /api/v1/auth/wechat/verify"]
capabilities = ["log", "config", "callback-crypto", "internal-call"]
"#,
    )?;
    let settings = Settings { wechat_token: Some(TOKEN.to_string().into()), ..Settings::default() };
    let server = start(ServeOptions {
        config_path: dir.path().join("plugins.toml"),
        roles: vec![Role::Web],
        settings,
        watch: false,
    })
    .await?;
    let wasm_addr = server.role_addrs[&Role::Web];

    let crypto = Arc::new(CallbackCrypto::new(Some(TOKEN.to_string().into()), None, None, Some(300))?);
    let native = axum::Router::new()
        .route("/api/v1/auth/wechat/verify", get(native_verify))
        .with_state(crypto.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let native_addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, native).await });

    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs().to_string();
    let query = format!(
        "signature={}&timestamp={ts}&nonce=bench&echostr=5188563426541789870",
        sorted_sha1(&[TOKEN, &ts, "bench"])
    );
    let path = format!("/api/v1/auth/wechat/verify?{query}");

    // Both answer correctly before anything is timed.
    for addr in [wasm_addr, native_addr] {
        let out = std::process::Command::new("wrk")
            .args(["-t1", "-c1", "-d1s", &format!("http://{addr}{path}")])
            .output()?;
        anyhow::ensure!(!String::from_utf8_lossy(&out.stdout).contains("Non-2xx"), "{addr} answered errors");
    }

    let mut wasm_rps = Vec::new();
    let mut native_rps = Vec::new();
    for round in 1..=opts.rounds {
        for (label, addr, results) in
            [("native", native_addr, &mut native_rps), ("wasm", wasm_addr, &mut wasm_rps)]
        {
            let rps = wrk(&format!("http://{addr}{path}"), opts.connections, opts.seconds)?;
            eprintln!("round {round}: {label:6} {rps:>10.0} req/s");
            results.push(rps);
        }
    }

    // Per-request sandbox cost, one thread: the plugin's invoke vs the same work natively.
    let plugin = server.host.runtime(Role::Web).plugins[0].clone();
    let request = Request {
        method: "GET".into(),
        path: "/api/v1/auth/wechat/verify".into(),
        query: query.clone(),
        params: vec![],
        headers: vec![],
        body: vec![],
        request_id: "bench".into(),
    };
    for _ in 0..200 {
        wxhost::runtime::invoke(&server.host.engine, &server.host.services, &plugin, request.clone()).await?;
    }
    let started = Instant::now();
    for _ in 0..opts.sandbox_iterations {
        let r = wxhost::runtime::invoke(&server.host.engine, &server.host.services, &plugin, request.clone())
            .await?;
        assert_eq!(r.status, 200);
    }
    let wasm_call = started.elapsed() / opts.sandbox_iterations as u32;
    let started = Instant::now();
    for _ in 0..opts.sandbox_iterations {
        let ok = crypto.verify_server_signature(&sorted_sha1(&[TOKEN, &ts, "bench"]), &ts, "bench").is_ok();
        assert!(std::hint::black_box(ok));
    }
    let native_call = started.elapsed() / opts.sandbox_iterations as u32;

    println!();
    println!(
        "| GET /api/v1/auth/wechat/verify ({} rounds x {}s, wrk -c{}) | value |",
        opts.rounds, opts.seconds, opts.connections
    );
    println!("| --- | --- |");
    if opts.rounds > 0 {
        let (w, n) = (median(&mut wasm_rps), median(&mut native_rps));
        println!("| native axum handler, req/s (median) | {n:.0} |");
        println!("| through the verify plugin, req/s (median) | {w:.0} |");
        println!("| ratio plugin / native (aim >= 0.7) | {:.2} |", w / n);
    }
    println!("| plugin invoke (instantiate + call + drop), one thread | {:.1} us |", micros(wasm_call));
    println!("| same work natively, one thread | {:.1} us |", micros(native_call));
    println!(
        "| per-request sandbox cost (aim <= 10 us) | {:.1} us |",
        micros(wasm_call.saturating_sub(native_call))
    );
    server.shutdown();
    Ok(())
}

fn wrk(url: &str, connections: usize, seconds: u64) -> anyhow::Result<f64> {
    let out = std::process::Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s"), url])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(!text.contains("Non-2xx"), "errors during the run:\n{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))
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
