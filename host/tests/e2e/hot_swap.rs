//! End to end: plugins replaced on disk while a client streams requests.
//! Every request succeeds, answered by the old or the new version; a corrupt
//! file leaves the running version serving and the failure visible.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use wxhost::config::Role;

#[derive(Default, Debug)]
struct Seen {
    old: usize,
    new: usize,
}

/// Streams verification requests until stopped; panics on any failure.
fn stream(
    server_url: String,
    stop: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let echostr = format!("echo{n}");
            let r = client
                .get(format!("{server_url}{}", verify_query(&echostr)))
                .send()
                .await
                .expect("request sent");
            assert_eq!(r.status(), 200, "request {n} failed during the swap");
            let marked = r.headers().get("x-verify-build").is_some();
            assert_eq!(r.text().await.unwrap(), echostr);
            let mut seen = seen.lock().unwrap();
            if marked { seen.new += 1 } else { seen.old += 1 }
        }
    })
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_plugin_is_swapped_in_without_failing_a_request_and_a_corrupt_one_is_refused() {
    let config = verify_only_config();
    let server = start(&config, &[Role::Web], None, true).await;
    let base = url(&server, Role::Web, "");
    let version_before = plugin_version(&server).await;

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let clients: Vec<_> = (0..3).map(|_| stream(base.clone(), stop.clone(), seen.clone())).collect();

    wait_for("requests on the old version", || seen.lock().unwrap().old > 20).await;
    config.replace("verify.wasm", &std::fs::read(dist("fixtures/verify-marked.wasm")).unwrap());
    wait_for("requests on the new version", || seen.lock().unwrap().new > 20).await;
    let version_after = plugin_version(&server).await;
    assert_ne!(version_before, version_after);

    // A corrupt file: the new version keeps serving, the failure is reported.
    config.replace("verify.wasm", b"\0asm\x0d\0\x01\0 this is not a component");
    wait_for("the failed reload to be reported", || {
        futures_lite_block(admin_status(&server)).is_some_and(|s| s["ok"] == false)
    })
    .await;
    let at_failure = seen.lock().unwrap().new;
    wait_for("more requests after the failed reload", || seen.lock().unwrap().new > at_failure + 20).await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("no request failed");
    }
    let status = admin_status(&server).await.unwrap();
    let errors = status["errors"].to_string();
    assert!(errors.contains("verify") && errors.contains("not a valid wasm component"), "{errors}");
    assert_eq!(plugin_version(&server).await, version_after, "the last good version keeps serving");

    // The admin endpoint reloads on demand and reports the same refusal.
    let reload =
        || reqwest::Client::new().post(admin_url(&server, "/admin/reload")).bearer_auth(CONTROL_TOKEN).send();
    assert_eq!(reload().await.unwrap().status(), 422);
    config.replace("verify.wasm", &std::fs::read(dist("verify.wasm")).unwrap());
    assert_eq!(reload().await.unwrap().status(), 200);
    assert_eq!(plugin_version(&server).await, version_before);
    server.shutdown();
    server.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_on_the_version_it_started_with() {
    let config = verify_only_config();
    let server = start(&config, &[Role::Web], None, false).await;
    let before = server.host.runtime(Role::Web);
    config.replace("verify.wasm", &std::fs::read(dist("fixtures/verify-marked.wasm")).unwrap());
    assert!(server.host.reload("test").await.ok);
    let after = server.host.runtime(Role::Web);
    assert_ne!(before.plugins[0].identity.version, after.plugins[0].identity.version);
    // The old snapshot is still whole and usable by whoever holds it.
    let request = wxhost::bindings::wxhost::plugin::types::Request {
        method: "GET".into(),
        route: "/api/v1/auth/wechat/verify".into(),
        path: "/api/v1/auth/wechat/verify".into(),
        query: verify_query("old").split_once('?').unwrap().1.to_string(),
        params: vec![],
        headers: vec![],
        body: vec![],
        request_id: "t".into(),
        client_ip: None,
        service: None,
    };
    let old = wxhost::runtime::invoke(
        &server.host.engine,
        &server.host.services,
        &before.plugins[0],
        request.clone(),
    )
    .await
    .unwrap();
    assert!(old.headers.iter().all(|(k, _)| k != "x-verify-build"));
    let new = wxhost::runtime::invoke(&server.host.engine, &server.host.services, &after.plugins[0], request)
        .await
        .unwrap();
    assert!(new.headers.iter().any(|(k, v)| k == "x-verify-build" && v == "marked"));
    server.shutdown();
    server.wait().await;
}

async fn admin_json(server: &wxhost::server::RunningServer) -> serde_json::Value {
    reqwest::get(admin_url(server, "/admin/plugins")).await.unwrap().json().await.unwrap()
}

async fn plugin_version(server: &wxhost::server::RunningServer) -> String {
    admin_json(server).await["plugins"][0]["version"].as_str().unwrap().to_string()
}

async fn admin_status(server: &wxhost::server::RunningServer) -> Option<serde_json::Value> {
    Some(admin_json(server).await["last_reload"].clone())
}

/// Polls a future from a synchronous predicate (used inside `wait_for`).
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
