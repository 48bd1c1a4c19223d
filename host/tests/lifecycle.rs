//! The `wxhost` binary's process lifecycle: SIGTERM drains in-flight requests,
//! SIGHUP reloads, `migrate` migrates.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn probe_config() -> TestConfig {
    let toml = base_toml(2000, WEB_GRANTS, r#""log""#)
        + r#"
[[plugins]]
name = "sandbox-probe"
role = "web"
wasm = "sandbox-probe.wasm"
routes = ["GET /probe/ok", "GET /probe/sleep"]
capabilities = []
"#;
    TestConfig::new(&toml, &[("sandbox-probe.wasm", "fixtures/sandbox-probe.wasm")])
}

/// Starts `wxhost serve --role web` and waits for its listeners.
fn serve(config: &TestConfig, extra: &[&str]) -> (Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wxhost"))
        .args(["serve", "--role", "web", "--config"])
        .arg(config.path())
        .args(extra)
        .env("WECHAT_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .env("WXHOST_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut web, mut admin) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while web.is_none() || admin.is_none() {
        let line = rx.recv_timeout(deadline - Instant::now()).expect("wxhost announces its listeners");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let addr = v["fields"]["addr"].as_str().map(str::to_string);
        match v["fields"]["message"].as_str() {
            Some("listening") => web = addr,
            Some("admin listening") => admin = addr,
            _ => {}
        }
    }
    std::thread::spawn(move || for _ in rx {});
    (child, format!("http://{}", web.unwrap()), format!("http://{}", admin.unwrap()))
}

fn signal(child: &Child, name: &str) {
    let ok =
        Command::new("kill").args([format!("-{name}"), child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_in_flight_finish_then_exits_cleanly() {
    let config = probe_config();
    let (mut child, web, _) = serve(&config, &["--no-watch"]);
    let slow = tokio::spawn(reqwest::get(format!("{web}/probe/sleep")));
    // Well inside the probe's 1 s sleep, even on a loaded machine.
    tokio::time::sleep(Duration::from_millis(400)).await;
    signal(&child, "TERM");
    let response = slow.await.unwrap().expect("the in-flight request is answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "slept");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "wxhost did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert!(reqwest::get(format!("{web}/probe/ok")).await.is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_replaced_plugin() {
    let config = verify_only_config();
    let (mut child, web, admin) = serve(&config, &["--no-watch"]);
    let version = || async {
        let v: serde_json::Value =
            reqwest::get(format!("{admin}/admin/plugins")).await.unwrap().json().await.unwrap();
        v["plugins"][0]["version"].as_str().unwrap().to_string()
    };
    let before = version().await;
    config.replace("verify.wasm", &std::fs::read(dist("fixtures/verify-marked.wasm")).unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(version().await, before, "--no-watch: nothing changes by itself");
    signal(&child, "HUP");
    let started = Instant::now();
    while version().await == before {
        assert!(started.elapsed() < Duration::from_secs(10), "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reqwest::get(format!("{web}{}", verify_query("x"))).await.unwrap();
    assert_eq!(r.headers()["x-verify-build"], "marked");
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
}

#[test]
fn migrate_applies_the_schema_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("m.db").display());
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_wxhost"))
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("migrations applied (Sqlite)"));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_wxhost"))
        .arg("migrate")
        .env("DATABASE_URL", "mysql://nobody:secret-password@127.0.0.1:1/db")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot connect") && !stderr.contains("secret-password"), "{stderr}");
}
