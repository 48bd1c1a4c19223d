//! Faults the host must ride out with a clear answer and no hang: the
//! database pool exhausted, and MariaDB itself gone and back mid-load.

use std::time::{Duration, Instant};

use crate::common::*;
use wxhost::config::Role;

fn one_connection_config() -> TestConfig {
    let toml = base_toml(2000, WEB_GRANTS, r#""log", "config", "db", "wechat-api", "session""#)
        + r#"
[database]
max_connections = 1
acquire_timeout_ms = 300

[[plugins]]
name = "account"
role = "app"
wasm = "account.wasm"
routes = ["GET /api/v1/auth/wechat/qrcode/{scene}"]
capabilities = ["log", "config", "db", "wechat-api", "session"]
"#;
    TestConfig::new(&toml, &[("account.wasm", "account.wasm")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_database_pool_is_a_quick_503_with_retry_after_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let config = one_connection_config();
        let app = start(&config, &[Role::App], Some(&db.url), false).await;
        let poll = url(&app, Role::App, "/api/v1/auth/wechat/qrcode/login_nobody");
        // An unknown scene: the database was asked and said no.
        assert_eq!(reqwest::get(&poll).await.unwrap().status(), 404, "{which}: a free pool answers");

        // Something else holds the only connection plugins may use.
        let pool = app.host.services.get::<wxhost::caps::db::DbCtx>().unwrap().plugin_pool();
        let held =
            wxhost::on_pool!(pool, |p| p.acquire().await.map(|c| Box::new(c) as Box<dyn Send>)).unwrap();
        let started = Instant::now();
        let r = reqwest::get(&poll).await.unwrap();
        let waited = started.elapsed();
        assert_eq!(r.status(), 503, "{which}");
        assert_eq!(r.headers()["retry-after"], "1", "{which}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "database_unavailable", "{which}: {body}");
        // The connection is held for the whole test: only the acquire timeout (0.3 s) ends the wait.
        assert!(waited < Duration::from_secs(10), "{which}: answered in {waited:?}, not a hang");

        drop(held);
        assert_eq!(reqwest::get(&poll).await.unwrap().status(), 404, "{which}: recovered by itself");
        app.shutdown();
        app.wait().await;
    }
}

/// A MariaDB server of the test's own (its own data folder and port), so it can
/// be stopped and started without disturbing the machine's.
struct PrivateMariadb {
    dir: tempfile::TempDir,
    port: u16,
    server: Option<std::process::Child>,
}

impl PrivateMariadb {
    fn install() -> PrivateMariadb {
        require_programs(&[("mariadb-install-db", "mariadb-server"), ("mariadb", "mariadb-client")]);
        let dir = tempfile::tempdir().unwrap();
        let installed = std::process::Command::new("mariadb-install-db")
            .args(["--no-defaults", "--auth-root-authentication-method=normal", "--skip-test-db"])
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg(format!("--user={}", whoami()))
            .output()
            .expect("mariadb-install-db runs");
        assert!(installed.status.success(), "mariadb-install-db failed: {installed:?}");
        let port = crate::common::stack::free_addr().port();
        let mut db = PrivateMariadb { dir, port, server: None };
        db.start();
        let created = std::process::Command::new("mariadb")
            .args(["-h127.0.0.1", "-uroot", &format!("-P{port}"), "-e"])
            .arg("CREATE DATABASE wxhost CHARACTER SET utf8mb4")
            .status()
            .expect("the mariadb client runs");
        assert!(created.success(), "creating the test database");
        db
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/wxhost", self.port)
    }

    fn start(&mut self) {
        let data = self.dir.path().join("data");
        let child = std::process::Command::new("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", self.dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", self.dir.path().join("pid").display()))
            .args(["--bind-address=127.0.0.1", "--skip-name-resolve", "--innodb-buffer-pool-size=16M"])
            .arg(format!("--port={}", self.port))
            .arg(format!("--user={}", whoami()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mariadbd starts");
        self.server = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "the private MariaDB did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops it the way an operator or a crash would: the process is gone.
    fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        self.stop();
    }
}

fn whoami() -> String {
    std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| {
        let out = std::process::Command::new("id").arg("-un").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_stopped_and_started_mid_load_is_a_clear_503_then_recovers_without_a_restart() {
    let mut mariadb = PrivateMariadb::install();
    let config = one_connection_config();
    std::fs::write(
        config.path(),
        std::fs::read_to_string(config.path()).unwrap().replace("max_connections = 1", "max_connections = 4"),
    )
    .unwrap();
    let app = start(&config, &[Role::App], Some(&mariadb.url()), false).await;
    let poll = url(&app, Role::App, "/api/v1/auth/wechat/qrcode/login_nobody");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    // A steady stream of requests that each need the database.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (client, poll, stop) = (client.clone(), poll.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen: Vec<(Instant, u16, bool, Duration)> = Vec::new();
            while !stop.is_cancelled() {
                let started = Instant::now();
                let r = client.get(&poll).send().await.unwrap();
                let retry_after = r.headers().contains_key("retry-after");
                seen.push((started, r.status().as_u16(), retry_after, started.elapsed()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let down_at = Instant::now();
    // Stopping and starting block: other tasks (the load) move off this worker meanwhile.
    tokio::task::block_in_place(|| mariadb.stop());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restart_at = Instant::now();
    // Crash recovery after the kill takes a while on a busy machine: the
    // clock for recovery starts once the server accepts connections again.
    tokio::task::block_in_place(|| mariadb.start());
    let up_at = Instant::now();
    // Keep the load on until the host answers from the database again (or
    // long enough to call it a failure), then a second more.
    while up_at.elapsed() < Duration::from_secs(10) {
        if client.get(&poll).send().await.is_ok_and(|r| r.status() == 404) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let seen = load.await.unwrap();

    // Answered before the server was stopped (one in flight as it stopped may fail).
    let before: Vec<_> = seen.iter().filter(|s| s.0 + s.3 < down_at).collect();
    // Sent and answered while the server was gone (one waiting for a connection
    // as it came back may well succeed).
    let while_down: Vec<_> = seen
        .iter()
        .filter(|s| s.0 > down_at + Duration::from_millis(300) && s.0 + s.3 < restart_at)
        .collect();
    let first_recovered = seen.iter().position(|s| s.0 > up_at && s.1 == 404);
    assert!(before.iter().all(|s| s.1 == 404), "all answered before: {before:?}");
    assert!(
        !while_down.is_empty() && while_down.iter().all(|s| s.1 == 503 && s.2),
        "503 + Retry-After while down: {while_down:?}"
    );
    assert!(
        seen.iter().all(|s| s.3 < Duration::from_secs(4)),
        "never a hang: {:?}",
        seen.iter().filter(|s| s.3 >= Duration::from_secs(4)).collect::<Vec<_>>()
    );
    let first_recovered = first_recovered.expect("answers from the database again without a restart");
    let recovered_after = seen[first_recovered].0 - up_at;
    assert!(recovered_after < Duration::from_secs(3), "recovered {recovered_after:?} after MariaDB was back");
    let after: Vec<_> = seen[first_recovered..].iter().filter(|s| s.1 != 404).collect();
    assert!(after.is_empty(), "every answer once recovered comes from the database: {after:?}");
    app.shutdown();
    app.wait().await;
}

/// A subscribe event of a user of its own, as WeChat pushes it.
fn subscribe(i: usize, create_time: i64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_sim]]></ToUserName><FromUserName><![CDATA[o_fault_{i:04}]]></FromUserName>\
         <CreateTime>{create_time}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe]]></Event></xml>"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_role_killed_mid_stream_loses_no_push_or_payment_and_applies_each_once_on_both_databases() {
    use crate::common::stack::Stack;
    for db in all_databases().await {
        let which = db.name;
        let mut stack = Stack::start(&db.url).await;
        let alice = stack.login("alice").await;
        let mut orders = Vec::new();
        for _ in 0..4 {
            let (status, o) =
                stack.post("/api/v1/payment/create-order", Some(&alice), r#"{"product_id":"p10"}"#).await;
            assert_eq!(status, 200, "{which}: {o}");
            orders.push(o["out_trade_no"].as_str().unwrap().to_string());
        }
        let create_time = unix_now();
        const EVENTS: usize = 60;

        // WeChat pushes a stream of events and WeChat Pay pays the orders while the app role dies and returns.
        let sim = stack.sim.clone();
        let pushes = tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..EVENTS {
                answers.push(sim.push(&subscribe(i, create_time), false).await.map(|a| a.0).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            answers
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
        stack.stop_app().await;
        for no in &orders {
            let paid = stack
                .sim
                .pay(&wxhost::sim::PayRequest { out_trade_no: Some(no.clone()), ..Default::default() })
                .await;
            assert!(!paid.unwrap().acknowledged, "{which}: the app role is down");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        stack.restart_app().await;
        let answers = pushes.await.unwrap();
        assert!(answers.iter().any(|s| *s != 200), "{which}: some pushes met the app role down: {answers:?}");
        assert!(answers.iter().all(|s| *s == 200 || *s == 503), "{which}: a clear answer each: {answers:?}");

        // What WeChat was not told "success" about, it sends again.
        for (i, status) in answers.iter().enumerate() {
            if *status != 200 {
                let (again, _) = stack.sim.push(&subscribe(i, create_time), false).await.unwrap();
                assert_eq!(again, 200, "{which}: retry of event {i}");
            }
        }
        // Pushes acknowledged before the kill are retried too, as WeChat may: still applied once.
        for i in [0, 1, 2] {
            assert_eq!(stack.sim.push(&subscribe(i, create_time), false).await.unwrap().0, 200, "{which}");
        }
        let users =
            db_count(&db.url, "SELECT COUNT(*) FROM users WHERE openid LIKE 'o_fault_%' AND subscribed = 1")
                .await;
        assert_eq!(users, EVENTS as i64, "{which}: every event applied");
        let claims = db_count(
            &db.url,
            &format!("SELECT COUNT(*) FROM processed_events WHERE event_key LIKE '%o_fault_%{create_time}%'"),
        )
        .await;
        assert_eq!(claims, EVENTS as i64, "{which}: each exactly once");

        // WeChat Pay's own retries deliver every payment, each credited once.
        let started = Instant::now();
        for no in &orders {
            while stack.sim.pay_order(no).unwrap()["acknowledged"] != true {
                assert!(started.elapsed() < Duration::from_secs(45), "{which}: {no} never acknowledged");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let (_, me) = stack.get("/api/v1/user/me", Some(&alice)).await;
        assert_eq!(me["quota"], 40, "{which}: 4 orders of 10 credits, each once");
        stack.shutdown().await;
    }
}
