//! The routers called directly with `tower::ServiceExt::oneshot`: route
//! dispatch, JSON errors, request ids, plugin output in the log, and the
//! admin API.

use std::sync::Arc;

use crate::common::*;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use wxhost::caps::Services;
use wxhost::caps::callback_crypto::CallbackCrypto;
use wxhost::config::Role;
use wxhost::host::Host;

async fn web_host(config: &TestConfig) -> Arc<Host> {
    let config = wxhost::config::load(&config.path()).unwrap();
    let engine = wxhost::engine::new(config.max_instances, config.reset_dirty_pages_only).unwrap();
    let crypto = CallbackCrypto::new(Some(TOKEN.to_string().into()), None, None, Some(300)).unwrap();
    let services = Arc::new(Services::default().with(crypto));
    Arc::new(Host::start(engine, services, &config, &[Role::Web]).await.unwrap())
}

fn config() -> TestConfig {
    let toml = base_toml(1000, WEB_GRANTS, r#""log""#)
        + VERIFY_PLUGIN
        + r#"

[[plugins]]
name = "sandbox-probe"
role = "web"
wasm = "sandbox-probe.wasm"
routes = ["GET /probe/print", "GET /probe/ok"]
capabilities = []
"#;
    TestConfig::new(
        &toml,
        &[("verify.wasm", "verify.wasm"), ("sandbox-probe.wasm", "fixtures/sandbox-probe.wasm")],
    )
}

async fn call(router: axum::Router, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let response = router.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes().to_vec())
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_router_dispatches_to_plugins_and_answers_json_errors() {
    init_logging();
    let config = config();
    let host = web_host(&config).await;
    let router = wxhost::server::role_router(host.clone(), Role::Web, Default::default(), None);

    let (status, headers, body) = call(router.clone(), get(&verify_query("hi"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"hi");
    assert_eq!(headers["x-request-id"].len(), 32, "a request id is generated");

    let request =
        Request::get(verify_query("hi")).header("x-request-id", "req-42").body(Body::empty()).unwrap();
    let (_, headers, _) = call(router.clone(), request).await;
    assert_eq!(headers["x-request-id"], "req-42", "an incoming request id is kept");

    let (status, headers, body) = call(router.clone(), get("/api/v1/nothing")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["message"].is_string());

    let (status, _, body) = call(router.clone(), get("/healthz")).await;
    assert_eq!((status, body), (StatusCode::OK, br#"{"status":"ok"}"#.to_vec()));

    // A body over the role's limit is 413; one that breaks off mid-way is 400.
    let post = |body: Body| Request::post("/api/v1/auth/wechat/verify").body(body).unwrap();
    let (status, _, body) = call(router.clone(), post(Body::from(vec![b'x'; 65 * 1024]))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&body));
    let broken = futures::stream::iter([
        Ok(axum::body::Bytes::from_static(b"<xml>")),
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "client went away")),
    ]);
    let (status, _, body) = call(router.clone(), post(Body::from_stream(broken))).await;
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_stdout_and_stderr_reach_the_host_log_tagged_with_the_plugin() {
    let logs_handle = captured_logs();
    let config = config();
    let host = web_host(&config).await;
    let router = wxhost::server::role_router(host.clone(), Role::Web, Default::default(), None);
    let request_id = format!("print-{:016x}", rand::random::<u64>());
    let request =
        Request::get("/probe/print").header("x-request-id", &request_id).body(Body::empty()).unwrap();
    let (status, _, _) = call(router, request).await;
    assert_eq!(status, StatusCode::OK);
    // The streams write from tasks of their own: the lines may land just after the answer.
    let mut logs = String::new();
    for _ in 0..200 {
        logs = String::from_utf8(logs_handle.lock().unwrap().clone()).unwrap();
        if logs.lines().filter(|l| l.contains(&request_id)).count() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for line in ["hello from the probe's stdout", "hello from the probe's stderr"] {
        let logged = logs
            .lines()
            .find(|l| l.contains(line) && l.contains(&request_id))
            .unwrap_or_else(|| panic!("{line:?} not logged with request id {request_id}:\n{logs}"));
        assert!(logged.contains("plugin=sandbox-probe"), "{logged}");
        assert!(logged.contains("version="), "{logged}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lists_plugins_with_versions_routes_and_capabilities() {
    init_logging();
    let config = config();
    let host = web_host(&config).await;
    let admin = wxhost::server::admin_router(host.clone(), Some(CONTROL_TOKEN.to_string().into()));
    let (status, _, body) = call(admin.clone(), admin_get("/admin/plugins")).await;
    assert_eq!(status, StatusCode::OK);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let verify = body["plugins"].as_array().unwrap().iter().find(|p| p["name"] == "verify").unwrap();
    assert_eq!(verify["role"], "web");
    assert_eq!(verify["version"].as_str().unwrap().len(), 16);
    assert_eq!(verify["requests_per_instance"], 1, "a fresh instance per request by default");
    assert_eq!(verify["idle_instances"], 0);
    assert_eq!(
        verify["routes"],
        serde_json::json!(["GET /api/v1/auth/wechat/verify", "POST /api/v1/auth/wechat/verify"])
    );
    assert_eq!(
        verify["capabilities"],
        serde_json::json!(["callback-crypto", "config", "internal-call", "log"])
    );
    assert!(verify["loaded_at_unix"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["last_reload"]["ok"], true);

    let (status, _, body) = call(admin.clone(), reload(Some(CONTROL_TOKEN))).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = call(admin, admin_get("/admin/nothing")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A request to the admin listener as curl on the same machine sends it.
fn admin_get(uri: &str) -> Request<Body> {
    Request::get(uri).header("host", "127.0.0.1:9090").body(Body::empty()).unwrap()
}

fn reload(token: Option<&str>) -> Request<Body> {
    let request = Request::post("/admin/reload").header("host", "localhost:9090");
    let request = match token {
        Some(t) => request.header("authorization", format!("Bearer {t}")),
        None => request,
    };
    request.body(Body::empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_changes_state_only_with_the_control_token_and_only_for_a_loopback_host() {
    init_logging();
    let config = config();
    let host = web_host(&config).await;
    let admin = wxhost::server::admin_router(host.clone(), Some(CONTROL_TOKEN.to_string().into()));
    let reloads = |h: &wxhost::host::Host| h.status().trigger;
    let before = reloads(&host);

    let code =
        |body: &[u8]| serde_json::from_slice::<serde_json::Value>(body).unwrap()["error"]["code"].clone();
    let (status, _, body) = call(admin.clone(), reload(None)).await;
    assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, "unauthorized".into()));
    let (status, _, _) = call(admin.clone(), reload(Some("test-control-token-of-32-bytes-no"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a wrong token of the same length");

    // A page that rebinds its DNS name to 127.0.0.1 still sends its own Host.
    for host_header in ["attacker.example:9090", "127.0.0.1.attacker.example", ""] {
        let request = Request::get("/metrics").header("host", host_header).body(Body::empty()).unwrap();
        let (status, _, body) = call(admin.clone(), request).await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::FORBIDDEN, "forbidden_host".into()),
            "{host_header:?}"
        );
        let mut request = reload(Some(CONTROL_TOKEN));
        request.headers_mut().insert("host", host_header.parse().unwrap());
        let (status, _, _) = call(admin.clone(), request).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{host_header:?}");
    }
    assert_eq!(reloads(&host), before, "nothing was reloaded");

    // Metrics and health stay scrapeable on loopback without a token.
    for uri in ["/metrics", "/healthz"] {
        let (status, _, _) = call(admin.clone(), admin_get(uri)).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
    }

    // Without a control token nothing may change state over HTTP.
    let locked = wxhost::server::admin_router(host.clone(), None);
    let (status, _, body) = call(locked, reload(Some(CONTROL_TOKEN))).await;
    assert_eq!((status, code(&body)), (StatusCode::FORBIDDEN, "control_disabled".into()));
    assert_eq!(reloads(&host), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_route_runs_only_for_a_service_key_and_the_plugin_gets_the_name_never_the_key() {
    init_logging();
    let toml = base_toml(1000, WEB_GRANTS, r#""log""#)
        + r#"
[[plugins]]
name = "sandbox-probe"
role = "app"
wasm = "sandbox-probe.wasm"
routes = ["GET /probe/ok"]
service_routes = ["GET /probe/whoami"]
capabilities = []
"#;
    let config = TestConfig::new(&toml, &[("sandbox-probe.wasm", "fixtures/sandbox-probe.wasm")]);
    let loaded = wxhost::config::load(&config.path()).unwrap();
    let engine = wxhost::engine::new(loaded.max_instances, loaded.reset_dirty_pages_only).unwrap();
    let host =
        Arc::new(Host::start(engine, Arc::new(Services::default()), &loaded, &[Role::App]).await.unwrap());
    const KEY: &str = "svc-billing-0123456789abcdef0123456789abcdef";
    let keys = wxhost::service_keys::ServiceKeys::parse(&format!("billing={KEY}")).unwrap();
    let guards = wxhost::server::Guards { internal: None, services: Some(Arc::new(keys)) };
    let router = wxhost::server::role_router(host.clone(), Role::App, guards, None);
    let with = |credential: &str| {
        Request::get("/probe/whoami")
            .header("authorization", format!("Bearer {credential}"))
            .body(Body::empty())
            .unwrap()
    };

    let (status, _, body) = call(router.clone(), with(KEY)).await;
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, body["service"].as_str()), (StatusCode::OK, Some("billing")), "{body}");
    let headers = body["headers"].as_array().unwrap();
    assert!(!headers.iter().any(|h| h == "authorization"), "the key never reaches the plugin: {body}");
    for refused in [get("/probe/whoami"), with("svc-billing-0123456789abcdef0123456789abcdeX"), with("")] {
        let (status, _, body) = call(router.clone(), refused).await;
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "{body}"
        );
    }
    // Other routes are not guarded, and tell the plugin of no service.
    let (status, _, _) = call(router.clone(), get("/probe/ok")).await;
    assert_eq!(status, StatusCode::OK);
    // No keys configured: the service routes are unavailable, not open.
    let open = wxhost::server::role_router(host, Role::App, Default::default(), None);
    let (status, _, _) = call(open, with(KEY)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}
