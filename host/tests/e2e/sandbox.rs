//! End to end: misbehaving plugins end only their own request, with a JSON 5xx,
//! while another route on the same server keeps answering.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::*;
use wxhost::config::Role;

const DEADLINE_MS: u64 = 500;

/// The probe plugin's section, serving `routes`, with `extra` keys.
fn probe_plugin(routes: &str, extra: &str) -> String {
    base_toml(DEADLINE_MS, WEB_GRANTS, r#""log""#)
        + &format!(
            r#"
[[plugins]]
name = "sandbox-probe"
role = "web"
wasm = "sandbox-probe.wasm"
routes = [{routes}]
capabilities = ["log"]
{extra}
"#
        )
}

fn probe_config() -> TestConfig {
    let routes =
        r#""GET /probe/ok", "GET /probe/loop", "GET /probe/trap", "GET /probe/oom", "GET /probe/print""#;
    TestConfig::new(
        &(probe_plugin(routes, "") + VERIFY_PLUGIN),
        &[("sandbox-probe.wasm", "fixtures/sandbox-probe.wasm"), ("verify.wasm", "verify.wasm")],
    )
}

/// The probe alone, with `requests_per_instance` (None: the default).
fn reuse_config(requests_per_instance: Option<u32>) -> TestConfig {
    let reuse = requests_per_instance.map(|n| format!("requests_per_instance = {n}")).unwrap_or_default();
    let routes = r#""GET /probe/count", "GET /probe/loop", "GET /probe/trap""#;
    TestConfig::new(&probe_plugin(routes, &reuse), &[("sandbox-probe.wasm", "fixtures/sandbox-probe.wasm")])
}

async fn count(client: &reqwest::Client, url: &str) -> u32 {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_a_fresh_instance_by_default() {
    let config = reuse_config(None);
    let server = start(&config, &[Role::Web], None, false).await;
    let (client, counter) = (reqwest::Client::new(), url(&server, Role::Web, "/probe/count"));
    for _ in 0..5 {
        assert_eq!(count(&client, &counter).await, 1, "nothing survives a request");
    }
    server.shutdown();
    server.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_allowing_reuse_gets_its_instance_back_at_most_n_times_and_never_after_a_failure() {
    let config = reuse_config(Some(3));
    let server = start(&config, &[Role::Web], None, false).await;
    let (client, counter) = (reqwest::Client::new(), url(&server, Role::Web, "/probe/count"));
    // One request at a time: the one idle instance serves each, and is renewed after 3.
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(count(&client, &counter).await);
    }
    assert_eq!(seen, [1, 2, 3, 1, 2, 3, 1]);
    assert_eq!(server.host.runtime(Role::Web).plugins[0].idle.len(), 1, "one instance kept between requests");
    assert_eq!(count(&client, &counter).await, 2);

    // A trap or a timeout ends the instance: the next request starts afresh.
    let r = client.get(url(&server, Role::Web, "/probe/trap")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(count(&client, &counter).await, 1, "a trapped instance is not reused");
    let r = client.get(url(&server, Role::Web, "/probe/loop")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(count(&client, &counter).await, 1, "an interrupted instance is not reused");
    assert_eq!(count(&client, &counter).await, 2);

    // Concurrent requests each get an instance of their own, never a shared one.
    let answers: Vec<u32> = futures::future::join_all((0..16).map(|_| count(&client, &counter))).await;
    assert!(answers.iter().all(|n| (1..=3).contains(n)), "{answers:?}");
    server.shutdown();
    server.wait().await;
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.expect("a JSON error body");
    (status, body["error"]["code"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_trapping_and_hoarding_plugins_fail_alone_while_other_routes_answer() {
    let config = probe_config();
    let server = start(&config, &[Role::Web], None, false).await;
    let client = reqwest::Client::new();

    // A steady stream of good requests to another route and another plugin.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    for path in ["/probe/ok".to_string(), verify_query("still-here")] {
        let (client, url, stop, answered) =
            (client.clone(), url(&server, Role::Web, &path), stop.clone(), answered.clone());
        streams.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = client.get(&url).send().await.expect("good route answers");
                assert_eq!(r.status(), 200, "{url}");
                let body = r.text().await.unwrap();
                assert!(body == "ok" || body == "still-here", "{body}");
                answered.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let (status, code) =
        error_code(client.get(url(&server, Role::Web, "/probe/loop")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (504, "plugin_timeout"));

    let (status, code) =
        error_code(client.get(url(&server, Role::Web, "/probe/trap")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (500, "plugin_failed"));

    let (status, code) =
        error_code(client.get(url(&server, Role::Web, "/probe/oom")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (500, "plugin_out_of_memory"));

    // Several spinning requests at once still leave the good routes answering:
    // ten good answers come while every spinner still runs.
    let spinning: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (client.clone(), url(&server, Role::Web, "/probe/loop"));
            tokio::spawn(async move { client.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    until_in_flight(&server, 4).await;
    let before = answered.load(Ordering::Relaxed);
    while answered.load(Ordering::Relaxed) < before + 10 && !spinning.iter().any(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        answered.load(Ordering::Relaxed) >= before + 10,
        "the good routes stalled behind the spinners ({} answers while they ran)",
        answered.load(Ordering::Relaxed) - before
    );
    for s in spinning {
        assert_eq!(s.await.unwrap(), 504);
    }

    stop.store(true, Ordering::Relaxed);
    for s in streams {
        s.await.expect("the good stream never failed");
    }
    assert!(answered.load(Ordering::Relaxed) > 10, "the good routes kept answering");

    // The failures did not poison the server.
    let r = client.get(url(&server, Role::Web, "/probe/ok")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    server.shutdown();
    server.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_methods_and_oversized_bodies_get_json_errors() {
    let config = probe_config();
    let server = start(&config, &[Role::Web], None, false).await;
    let client = reqwest::Client::new();

    let (status, code) =
        error_code(client.get(url(&server, Role::Web, "/nowhere")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let (status, code) =
        error_code(client.post(url(&server, Role::Web, "/probe/ok")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
    let big = vec![b'x'; 65 * 1024];
    let (status, code) =
        error_code(client.get(url(&server, Role::Web, "/probe/ok")).body(big).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
    let health = client.get(url(&server, Role::Web, "/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    server.shutdown();
    server.wait().await;
}

/// Waits until `n` plugin calls are running (an outcome, not a time).
async fn until_in_flight(server: &wxhost::server::RunningServer, n: usize) {
    for _ in 0..1000 {
        if server.host.plugins.in_flight() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{n} plugin calls never started (in flight: {})", server.host.plugins.in_flight());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_finding_every_instance_slot_taken_gets_503_with_retry_after_not_a_plugin_failure() {
    // Two slots, both held by spinning requests until their deadline.
    let toml = probe_plugin(r#""GET /probe/loop", "GET /probe/ok""#, "")
        .replace("max_instances = 32", "max_instances = 2");
    let config = TestConfig::new(&toml, &[("sandbox-probe.wasm", "fixtures/sandbox-probe.wasm")]);
    let server = start(&config, &[Role::Web], None, false).await;
    let client = reqwest::Client::new();
    let spinning: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (client.clone(), url(&server, Role::Web, "/probe/loop"));
            tokio::spawn(async move { client.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    until_in_flight(&server, 2).await;

    let r = client.get(url(&server, Role::Web, "/probe/ok")).send().await.unwrap();
    let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    assert_eq!(error_code(r).await, (503, "busy".to_string()));
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(spinning.iter().all(|t| !t.is_finished()), "refused at once, while both spinners still run");

    for task in spinning {
        assert_eq!(task.await.unwrap(), 504, "the spinning requests end at their deadline");
    }
    let r = client.get(url(&server, Role::Web, "/probe/ok")).send().await.unwrap();
    assert_eq!(r.status(), 200, "slots are free again");
    server.shutdown();
    server.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_and_busy_answers_do_not_wait_for_spinning_plugins() {
    // More spinners than the plugin runtime has threads, with a long deadline:
    // the server's own answers must all come while every spinner still runs.
    let spinners = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let toml = base_toml(4500, WEB_GRANTS, r#""log""#)
        .replace("max_instances = 32", &format!("max_instances = {spinners}"))
        + r#"
[[plugins]]
name = "sandbox-probe"
role = "web"
wasm = "sandbox-probe.wasm"
routes = ["GET /probe/loop", "GET /probe/ok"]
capabilities = ["log"]
"#;
    let config = TestConfig::new(&toml, &[("sandbox-probe.wasm", "fixtures/sandbox-probe.wasm")]);
    let server = start(&config, &[Role::Web], None, false).await;
    let client = reqwest::Client::new();
    let spinning: Vec<_> = (0..spinners)
        .map(|_| {
            let (client, url) = (client.clone(), url(&server, Role::Web, "/probe/loop"));
            tokio::spawn(async move { client.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    until_in_flight(&server, spinners).await;

    // Served beside plugins on one runtime, each of these waited for tokio's
    // I/O poll behind the spinners (61 epoch ticks, ~60 ms): 300 of them
    // would outlast the spinners' deadline. On a runtime of their own they
    // take a fraction of a millisecond each.
    for _ in 0..100 {
        let health = client.get(url(&server, Role::Web, "/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        let busy = client.get(url(&server, Role::Web, "/probe/ok")).send().await.unwrap();
        assert_eq!(error_code(busy).await, (503, "busy".to_string()));
        let unknown = client.get(url(&server, Role::Web, "/no/such/route")).send().await.unwrap();
        assert_eq!(unknown.status(), 404);
    }
    assert!(
        spinning.iter().all(|t| !t.is_finished()),
        "the server answered all of that while every spinner still ran"
    );
    for task in spinning {
        assert_eq!(task.await.unwrap(), 504);
    }
    server.shutdown();
    server.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_stack_holds_the_deepest_json_and_running_out_of_it_ends_only_that_request() {
    let routes = r#""POST /probe/json", "GET /probe/recurse", "GET /probe/ok""#;
    let config =
        TestConfig::new(&probe_plugin(routes, ""), &[("sandbox-probe.wasm", "fixtures/sandbox-probe.wasm")]);
    let server = start(&config, &[Role::Web], None, false).await;
    let client = reqwest::Client::new();
    let json = |body: String| client.post(url(&server, Role::Web, "/probe/json")).body(body).send();

    // The deepest body serde_json takes (its limit is 128 levels) parses, is
    // walked and dropped within the 64 KiB stack plugins are linked with
    // (.cargo/config.toml; with 32 KiB it traps).
    let deepest = json("[".repeat(127) + &"]".repeat(127)).await.unwrap();
    assert_eq!(deepest.status(), 200);
    assert_eq!(deepest.text().await.unwrap(), "127");
    // Deeper is the parser's refusal: a clear 400, no trap.
    let (status, code) = error_code(json("[".repeat(5000) + &"]".repeat(5000)).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (400, "invalid_body"));

    // A plugin that runs out of stack traps: its request gets a JSON 500, the next one is served.
    let (status, code) =
        error_code(client.get(url(&server, Role::Web, "/probe/recurse")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (500, "plugin_failed"));
    let ok = client.get(url(&server, Role::Web, "/probe/ok")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    server.shutdown();
    server.wait().await;
}
