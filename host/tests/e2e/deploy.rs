//! The deployment files with real nginx and real MariaDB: `deploy/test/cluster-test.sh`
//! runs `nginx -t` on the production and cluster configurations, verifies the
//! systemd units, starts `deploy/local-cluster` (2 web + 2 app processes,
//! nginx, the simulator), checks routing (every encoding trick aimed at
//! `/api/v1/internal/` is a 404), QR login and a payment through nginx with
//! duplicate notifies credited once, kills an app process under load, and
//! rolls a restart and a plugin update under load with no failed request.
//!
//! Needs nginx and systemd-analyze: installed from Debian's packages if missing.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use tokio::io::AsyncBufReadExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nginx_cluster_routes_logs_in_pays_and_rolls_updates_without_failing_a_request() {
    require_programs(&[("nginx", "nginx-light"), ("systemd-analyze", "systemd")]);
    let db = mysql_database().await;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = tokio::process::Command::new("bash")
        .arg(repo.join("deploy/test/cluster-test.sh"))
        .current_dir(&repo)
        .env("DATABASE_URL", &db.url)
        .env("WXHOST_BIN", env!("CARGO_BIN_EXE_wxhost"))
        .env_remove("WXHOST_CLUSTER_STATE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the cluster test finishes within 10 minutes")
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(output.status.success(), "deploy/test/cluster-test.sh failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("cluster test passed"), "{stdout}");
}

/// Spawns `wxhost serve --role web`; returns its stderr lines until it answers
/// /healthz, and the child (killed on drop).
async fn start_web(database_url: Option<&str>) -> (Vec<String>, std::net::SocketAddr, tokio::process::Child) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let web = crate::common::stack::free_addr();
    let admin = crate::common::stack::free_addr();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wxhost"));
    command
        .args(["serve", "--role", "web", "--no-watch", "--config"])
        .arg(repo.join("plugins.toml"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .env("WECHAT_TOKEN", TOKEN)
        .env("WECHAT_APPID", APPID)
        .env("INTERNAL_SECRET", INTERNAL_SECRET)
        .env("APP_INTERNAL_URL", "http://127.0.0.1:9")
        .env("WXHOST_WEB_LISTEN", web.to_string())
        .env("WXHOST_ADMIN_LISTEN", admin.to_string())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url).env("WECHAT_APPSECRET", "not-for-the-web-host");
    }
    let mut child = command.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let started = std::time::Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "the web role never listened: {seen:#?}");
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await.unwrap().unwrap();
        let Some(line) = line else { panic!("the web role exited: {seen:#?}") };
        let listening = line.contains("listening") && line.contains("role=web");
        seen.push(line);
        if listening {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (seen, web, child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_process_warns_about_database_and_appsecret_and_serves_without_them() {
    let (lines, _, child) = start_web(Some("mysql://root@127.0.0.1:3306/never_used")).await;
    let warning = lines.iter().find(|l| l.contains("set but not read by the web role"));
    let warning = warning.unwrap_or_else(|| panic!("no warning in {lines:#?}"));
    assert!(warning.contains("DATABASE_URL") && warning.contains("WECHAT_APPSECRET"), "{warning}");
    assert!(!warning.contains("not-for-the-web-host") && !warning.contains("root@"), "no values: {warning}");
    drop(child);

    let (_, web, child) = start_web(None).await;
    let echo =
        reqwest::get(format!("http://{web}{}", verify_query("served-without-a-database"))).await.unwrap();
    assert_eq!(echo.status(), 200);
    assert_eq!(echo.text().await.unwrap(), "served-without-a-database");
    drop(child);
}

/// A fresh `wxhost serve` refuses short shared secrets before it listens,
/// naming each setting and never its value.
#[test]
fn a_process_with_a_short_shared_secret_stops_at_start_naming_the_setting() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wxhost"))
        .args(["serve", "--role", "all", "--no-watch", "--config"])
        .arg(repo.join("plugins.toml"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .env("DATABASE_URL", format!("sqlite://{}?mode=rwc", dir.path().join("w.db").display()))
        .env("INTERNAL_SECRET", "short-internal-value")
        .env("SESSION_SECRET", "short-session-value")
        .env("WXHOST_CONTROL_TOKEN", "a-control-token-that-is-long-enough-000")
        .env("WXHOST_WEB_LISTEN", crate::common::stack::free_addr().to_string())
        .env("WXHOST_APP_LISTEN", crate::common::stack::free_addr().to_string())
        .env("WXHOST_ADMIN_LISTEN", crate::common::stack::free_addr().to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it must not start: {stderr}");
    assert!(stderr.contains("INTERNAL_SECRET, SESSION_SECRET are shorter than 32 bytes"), "{stderr}");
    assert!(!stderr.contains("WXHOST_CONTROL_TOKEN"), "a long enough token is not named: {stderr}");
    for value in ["short-internal-value", "short-session-value"] {
        assert!(!stderr.contains(value), "no value shows: {stderr}");
    }
    assert!(!stderr.contains("listening"), "{stderr}");
}
