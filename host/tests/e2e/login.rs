//! End to end with the WeChat simulator, on SQLite and MariaDB: QR-code login
//! (app → simulator → scan → web → app → poll), OAuth login, sessions, menus,
//! the user's own data only, and WeChat being down or slow.

use std::time::{Duration, Instant};

use crate::common::stack::*;
use crate::common::*;
use serde_json::{Value, json};
use wxhost::config::Role;
use wxhost::database;
use wxhost::sim::{ScanRequest, Sim, SimConfig, openid_of};

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qr_code_login_runs_end_to_end_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let (status, qr) = stack.post("/api/v1/auth/wechat/qrcode", None, "").await;
        assert_eq!(status, 201, "{which}: {qr}");
        let scene = qr["scene"].as_str().unwrap().to_string();
        let ticket = qr["ticket"].as_str().unwrap().to_string();
        assert!(scene.len() >= 24, "{which}: an unguessable scene: {scene}");
        assert!(qr["qrcode_url"].as_str().unwrap().contains("showqrcode?ticket="), "{which}");
        assert!(qr["expires_at"].as_i64().unwrap() > unix_now());

        // The QR image is a real, decodable QR code of the ticket's URL.
        let image = stack.client.get(qr["qrcode_url"].as_str().unwrap()).send().await.unwrap();
        assert_eq!(image.headers()["content-type"], "image/png", "{which}");
        let decoded = decode_qr(&image.bytes().await.unwrap());
        assert_eq!(decoded, format!("http://weixin.qq.com/q/{ticket}"), "{which}");

        let poll = format!("/api/v1/auth/wechat/qrcode/{scene}");
        assert_eq!(stack.get(&poll, None).await.1["status"], "pending", "{which}");

        // The user scans the code in WeChat: the simulator pushes subscribe+scene to the web role.
        let scan = ScanRequest {
            ticket: Some(ticket),
            scene: None,
            user: "bob".into(),
            subscribed: false,
            safe_mode: Some(true),
        };
        let (status, reply) = stack.sim.scan(&scan).await.unwrap();
        assert_eq!(status, 200, "{which}: {reply}");

        let (status, scanned) = stack.get(&poll, None).await;
        assert_eq!((status, scanned["status"].as_str()), (200, Some("scanned")), "{which}: {scanned}");
        assert_eq!(scanned["openid"], openid_of("bob"), "{which}");
        let token = scanned["token"].as_str().unwrap().to_string();
        // The session is handed out once.
        let (_, again) = stack.get(&poll, None).await;
        assert_eq!((again["status"].as_str(), again.get("token")), (Some("consumed"), None), "{which}");

        let (status, me) = stack.get("/api/v1/user/me", Some(&token)).await;
        assert_eq!(status, 200, "{which}: {me}");
        assert_eq!(
            (me["openid"].as_str(), me["subscribed"].as_bool(), me["quota"].as_i64()),
            (Some(openid_of("bob").as_str()), Some(true), Some(0)),
            "{which}"
        );
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qr_code_expires_whether_nobody_scans_it_or_nobody_collects_the_scan() {
    let db = sqlite_database().await;
    let stack = Stack::start(&db.url).await;
    let (_, qr) = stack.post("/api/v1/auth/wechat/qrcode", None, "").await;
    let scene = qr["scene"].as_str().unwrap();
    db_exec(&db.url, "UPDATE bindings SET expires_at = 1 WHERE scene = ?", &[scene]).await;
    let (_, poll) = stack.get(&format!("/api/v1/auth/wechat/qrcode/{scene}"), None).await;
    assert_eq!(poll["status"], "expired");

    // Scanned, but the login page never collected it before expiry: whoever
    // finds the scene later (it travels in URLs) gets no session.
    let (_, qr) = stack.post("/api/v1/auth/wechat/qrcode", None, "").await;
    let scene = qr["scene"].as_str().unwrap();
    let scan = ScanRequest {
        ticket: qr["ticket"].as_str().map(str::to_string),
        scene: None,
        user: "dave".into(),
        subscribed: false,
        safe_mode: None,
    };
    assert_eq!(stack.sim.scan(&scan).await.unwrap().0, 200);
    db_exec(&db.url, "UPDATE bindings SET expires_at = 1 WHERE scene = ?", &[scene]).await;
    let (_, poll) = stack.get(&format!("/api/v1/auth/wechat/qrcode/{scene}"), None).await;
    assert_eq!(poll["status"], "expired", "{poll}");
    assert!(poll.get("token").is_none(), "{poll}");
    let (status, _) = stack.get("/api/v1/auth/wechat/qrcode/login_nonexistent", None).await;
    assert_eq!(status, 404);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_login_gives_a_session_once_per_code_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let code = stack.sim.oauth_code("carol", "snsapi_userinfo");
        let (status, login) = stack.get(&format!("/api/v1/auth/wechat?code={code}&state=x"), None).await;
        assert_eq!(status, 200, "{which}: {login}");
        assert_eq!(login["openid"], openid_of("carol"));
        assert_eq!(login["user"]["nickname"], "carol 🌟", "{which}: emoji-safe nickname");
        let token = login["token"].as_str().unwrap();
        let (status, me) = stack.get("/api/v1/user/me", Some(token)).await;
        assert_eq!((status, me["nickname"].as_str()), (200, Some("carol 🌟")), "{which}");

        let (status, reused) = stack.get(&format!("/api/v1/auth/wechat?code={code}"), None).await;
        assert_eq!((status, error_code(&reused)), (400, "invalid_code"), "{which}");
        let (status, bad) = stack.get("/api/v1/auth/wechat?code=forged", None).await;
        assert_eq!((status, error_code(&bad)), (400, "invalid_code"), "{which}");
        let (status, missing) = stack.get("/api/v1/auth/wechat", None).await;
        assert_eq!((status, error_code(&missing)), (400, "missing_code"), "{which}");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_valid_session_reads_data_and_only_its_own_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let stack = Stack::start(&db.url).await;
        let login = |name: &'static str| {
            let code = stack.sim.oauth_code(name, "snsapi_base");
            let stack = &stack;
            async move {
                stack.get(&format!("/api/v1/auth/wechat?code={code}"), None).await.1["token"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        };
        let dave = login("dave").await;
        let erin = login("erin").await;
        insert_order(&db.url, "WX_ORDER_DAVE_1", &openid_of("dave")).await;

        let (status, mine) = stack.get("/api/v1/user/orders/WX_ORDER_DAVE_1", Some(&dave)).await;
        assert_eq!((status, mine["amount_fen"].as_i64()), (200, Some(990)), "{which}: {mine}");
        let (status, list) = stack.get("/api/v1/user/orders", Some(&dave)).await;
        assert_eq!((status, list["orders"].as_array().map(Vec::len)), (200, Some(1)), "{which}");
        let (status, theirs) = stack.get("/api/v1/user/orders/WX_ORDER_DAVE_1", Some(&erin)).await;
        assert_eq!((status, error_code(&theirs)), (404, "not_found"), "{which}: another user's order");
        let (_, erins) = stack.get("/api/v1/user/orders", Some(&erin)).await;
        assert_eq!(erins["orders"], json!([]), "{which}");

        // No token, a forged one, an openid in place of a token.
        for token in [None, Some("v1.abc.9999999999.forged"), Some(openid_of("dave").as_str()), Some("")] {
            let (status, body) = stack.get("/api/v1/user/me", token).await;
            assert_eq!(status, 401, "{which}: {token:?} → {body}");
        }
        // A tampered expiry breaks the signature.
        let mut parts: Vec<&str> = dave.split('.').collect();
        parts[2] = "9999999999";
        let (status, _) = stack.get("/api/v1/user/me", Some(&parts.join("."))).await;
        assert_eq!(status, 401, "{which}");

        // Logging out revokes the token.
        assert_eq!(stack.post("/api/v1/auth/logout", Some(&dave), "").await.0, 200, "{which}");
        let (status, body) = stack.get("/api/v1/user/me", Some(&dave)).await;
        assert_eq!((status, error_code(&body)), (401, "session_revoked"), "{which}");
        assert_eq!(stack.get("/api/v1/user/me", Some(&erin)).await.0, 200, "{which}: other sessions live on");
        stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_refused() {
    let db = sqlite_database().await;
    let database = database::connect(&db.url, &Default::default()).await.unwrap();
    database::migrate(&database).await.unwrap();
    let sessions =
        wxhost::caps::session::Sessions::new(database, None, Duration::from_secs(1), None).await.unwrap();
    let issued = sessions.issue("oSomeone").await.unwrap();
    assert_eq!(sessions.verify(&issued.token).await.unwrap().openid, "oSomeone");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(matches!(
        sessions.verify(&issued.token).await,
        Err(wxhost::bindings::wxhost::plugin::session::SessionError::Expired)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn menus_need_the_admin_credential_and_are_validated_before_sending() {
    let db = sqlite_database().await;
    let stack = Stack::start(&db.url).await;
    let (status, menu) = stack.get("/api/v1/auth/wechat/get-menu", None).await;
    assert_eq!((status, &menu["menu"]), (200, &Value::Null));

    let menu = r#"{"button":[{"type":"click","name":"今日歌曲","key":"V1001_TODAY_MUSIC"},{"name":"菜单","sub_button":[{"type":"view","name":"搜索","url":"https://www.soso.com/"}]}]}"#;
    let path = "/api/v1/auth/wechat/create-menu";
    assert_eq!(stack.post(path, None, menu).await.0, 401);
    assert_eq!(stack.post(path, Some("not-the-admin"), menu).await.0, 403);
    // A user's session is no admin credential either.
    let code = stack.sim.oauth_code("frank", "snsapi_base");
    let user = stack.get(&format!("/api/v1/auth/wechat?code={code}"), None).await.1["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(stack.post(path, Some(&user), menu).await.0, 403);
    for bad in [
        r#"{"button":[]}"#,
        r#"{"button":[{"type":"click","name":"x"}]}"#,
        "not json",
        r#"{"button":[{"type":"view","name":"这个名字实在是太长了超过十六个字节","url":"https://a"}]}"#,
    ] {
        let (status, body) = stack.post(path, Some(ADMIN), bad).await;
        assert_eq!((status, error_code(&body)), (400, "invalid_menu"), "{bad}");
    }
    assert!(stack.sim.menu().is_none(), "nothing invalid reached WeChat");

    let (status, body) = stack.post(path, Some(ADMIN), menu).await;
    assert_eq!(status, 200, "{body}");
    let sent = stack.sim.menu_raw().unwrap();
    assert!(sent.contains("今日歌曲") && !sent.contains("\\u"), "Chinese sent unescaped: {sent}");
    let (_, got) = stack.get("/api/v1/auth/wechat/get-menu", None).await;
    assert_eq!(got["menu"]["button"][0]["name"], "今日歌曲");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_down_or_slow_is_a_clear_502_or_504_and_nothing_is_half_made() {
    let db = sqlite_database().await;
    let stack = Stack::start(&db.url).await;
    stack.sim.set_down(true);
    let (status, body) = stack.post("/api/v1/auth/wechat/qrcode", None, "").await;
    assert_eq!((status, error_code(&body)), (502, "wechat_error"), "{body}");
    stack.sim.set_down(false);

    stack.sim.set_latency(Duration::from_secs(30));
    let started = Instant::now();
    let (status, body) = stack.post("/api/v1/auth/wechat/qrcode", None, "").await;
    assert_eq!((status, error_code(&body)), (504, "wechat_timeout"), "{body}");
    // The simulator would answer after 30 s: the 504 came from the app role's 3 s deadline.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "long before WeChat's answer: {:?}",
        started.elapsed()
    );
    let (status, _) = stack
        .get(&format!("/api/v1/auth/wechat?code={}", stack.sim.oauth_code("gina", "snsapi_base")), None)
        .await;
    assert_eq!(status, 504);
    stack.sim.set_latency(Duration::ZERO);

    assert_eq!(
        db_count(&db.url, "SELECT COUNT(*) FROM bindings").await,
        0,
        "no pending binding without a QR code"
    );
    assert_eq!(db_count(&db.url, "SELECT COUNT(*) FROM users").await, 0);
    assert_eq!(db_count(&db.url, "SELECT COUNT(*) FROM sessions").await, 0);
    stack.shutdown().await;
}

async fn insert_order(url: &str, out_trade_no: &str, openid: &str) {
    let sql = "INSERT INTO orders (out_trade_no, openid, product_id, description, amount_fen, credits, status, \
               time_expire, created_at, updated_at) VALUES (?, ?, 'p10', '10 次', 990, 10, 'pending', 9999999999, 1, 1)";
    db_exec(url, sql, &[out_trade_no, openid]).await;
}

/// Reads the text of a QR code PNG, as a phone camera would.
fn decode_qr(png_bytes: &[u8]) -> String {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let (w, h) = (info.width as usize, info.height as usize);
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| pixels[y * w + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the image");
    grids[0].decode().unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_app_processes_on_one_mariadb_share_one_token_per_lifetime() {
    let db = mysql_database().await;
    let sim = Sim::new(SimConfig {
        appid: APPID.into(),
        secret: APPSECRET.into(),
        token: TOKEN.into(),
        aes_key: None,
        web_url: None,
        token_ttl: Duration::from_secs(5),
    });
    let (sim_addr, _) =
        sim.serve("127.0.0.1:0".parse().unwrap(), tokio_util::sync::CancellationToken::new()).await.unwrap();
    let config = full_config();
    let mut apps = Vec::new();
    for _ in 0..2 {
        let mut s = settings(Some(&db.url));
        s.wechat_appsecret = Some(APPSECRET.to_string().into());
        s.wechat_api_base = Some(format!("http://{sim_addr}"));
        apps.push(start_with(&config, &[Role::App], s, false).await);
    }
    let client = reqwest::Client::new();
    let menu = |i: usize| {
        let (client, url) = (client.clone(), url(&apps[i % 2], Role::App, "/api/v1/auth/wechat/get-menu"));
        async move {
            let r = client.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            assert_eq!(status, 200, "{body}");
            status
        }
    };
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(9) {
        for status in futures::future::join_all((0..4).map(menu)).await {
            assert_eq!(status, 200);
            calls += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let issued = sim.tokens_issued();
    assert!((2..=4).contains(&issued), "{issued} tokens for {calls} calls from two app processes");

    // Another server invalidates the token: one refresh, and every call still succeeds.
    sim.invalidate_tokens();
    for status in futures::future::join_all((0..6).map(menu)).await {
        assert_eq!(status, 200);
    }
    assert_eq!(sim.tokens_issued(), issued + 1);
    for app in apps {
        app.shutdown();
        app.wait().await;
    }
}

/// The whole product with a per-client limit on QR codes, behind a "proxy"
/// at 127.0.0.1 whose X-Forwarded-For names the client.
fn limited_config(per_minute: u32) -> TestConfig {
    let config = full_config();
    let toml = std::fs::read_to_string(config.path()).unwrap().replacen(
        "[host]\n",
        "[host]\ntrusted_proxies = [\"127.0.0.1\"]\n",
        1,
    ) + &format!(
        "\n[rate_limits]\n\"POST /api/v1/auth/wechat/qrcode\" = {{ per_minute = {per_minute}, burst = {per_minute} }}\n"
    );
    std::fs::write(config.path(), toml).unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_qr_requests_from_one_address_get_429_past_the_limit_while_another_still_gets_codes() {
    let db = sqlite_database().await;
    let stack = Stack::start_with(&db.url, limited_config(5), PayApi::V3).await;
    let calls_before = stack.sim.api_calls();
    let qr = |client: &'static str| {
        let request =
            stack.client.post(stack.app_url("/api/v1/auth/wechat/qrcode")).header("x-forwarded-for", client);
        async move {
            let r = request.send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()),
            )
        }
    };
    let mut created = 0;
    let mut limited = 0;
    for _ in 0..20 {
        let batch = futures::future::join_all((0..50).map(|_| qr("203.0.113.5"))).await;
        for (status, retry_after) in batch {
            match status {
                201 => created += 1,
                429 => {
                    limited += 1;
                    assert!(
                        retry_after.is_some_and(|s| (1..=60).contains(&s)),
                        "Retry-After: {retry_after:?}"
                    );
                }
                other => panic!("unexpected {other}"),
            }
        }
    }
    // 5 at once, then one every 12 s: the run takes far less than a minute.
    assert!((5..=7).contains(&created), "created {created}");
    assert_eq!(created + limited, 1000);
    let (status, _) = qr("203.0.113.6").await;
    assert_eq!(status, 201, "another address still gets a code");
    let calls = stack.sim.api_calls() - calls_before;
    assert!(
        calls <= created + 1 + 1,
        "WeChat saw {calls} calls for {created} + 1 codes (and at most one token)"
    );
    stack.shutdown().await;
}

/// The menu needs no login: it is served from the process's copy, which a
/// create-menu through the same process drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_menu_is_served_from_a_short_cache_that_create_menu_refreshes() {
    let db = sqlite_database().await;
    let stack = Stack::start(&db.url).await;
    let menu = json!({"button": [{"type": "click", "name": "今日歌曲", "key": "V1001_TODAY_MUSIC"}]});
    let (status, body) = stack.post("/api/v1/auth/wechat/create-menu", Some(ADMIN), &menu.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let calls = stack.sim.api_calls();
    for _ in 0..20 {
        let (status, body) = stack.get("/api/v1/auth/wechat/get-menu", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["menu"]["button"][0]["key"], "V1001_TODAY_MUSIC", "{body}");
    }
    assert!(stack.sim.api_calls() - calls <= 2, "20 reads, at most one asked WeChat (plus a token)");
    let changed = json!({"button": [{"type": "click", "name": "新", "key": "NEW"}]});
    let (status, _) = stack.post("/api/v1/auth/wechat/create-menu", Some(ADMIN), &changed.to_string()).await;
    assert_eq!(status, 200);
    let (_, body) = stack.get("/api/v1/auth/wechat/get-menu", None).await;
    assert_eq!(body["menu"]["button"][0]["key"], "NEW", "the change shows at once: {body}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_inside_wechat_gets_its_jssdk_config_signed_for_its_own_url() {
    use sha1::Digest as _;
    let db = sqlite_database().await;
    let stack = Stack::start(&db.url).await;
    let page = "https://shop.example.com/member.html?from=menu";
    let query: String =
        url::form_urlencoded::Serializer::new(String::new()).append_pair("url", page).finish();
    let (status, config) = stack.get(&format!("/api/v1/wechat/jssdk-config?{query}"), None).await;
    assert_eq!(status, 200, "{config}");
    assert_eq!(config["appId"], APPID);
    let ticket = stack.sim.jsapi_ticket().unwrap();
    let text = format!(
        "jsapi_ticket={ticket}&noncestr={}&timestamp={}&url={page}",
        config["nonceStr"].as_str().unwrap(),
        config["timestamp"].as_i64().unwrap()
    );
    assert_eq!(config["signature"], hex::encode(sha1::Sha1::digest(text.as_bytes())));
    for bad in ["", "url=%2Fmember.html", "url=javascript%3Aalert(1)"] {
        let (status, body) = stack.get(&format!("/api/v1/wechat/jssdk-config?{bad}"), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_query")), "{bad}: {body}");
    }
    stack.shutdown().await;
}
