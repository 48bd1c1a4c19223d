//! A component importing an interface its role does not grant is refused when
//! it is loaded, by `wxhost check` and by `wxhost serve`, naming the interface.

use std::process::Command;

use crate::common::*;

fn db_probe_in(role: &str, capabilities: &str) -> TestConfig {
    let toml = base_toml(2000, WEB_GRANTS, r#""log", "config", "db""#)
        + &format!(
            r#"
[[plugins]]
name = "db-probe"
role = "{role}"
wasm = "db-probe.wasm"
routes = ["POST /probe/db"]
capabilities = [{capabilities}]
"#
        );
    TestConfig::new(&toml, &[("db-probe.wasm", "fixtures/db-probe.wasm")])
}

fn wxhost(args: &[&str], config: &TestConfig) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wxhost"))
        .args(args)
        .arg("--config")
        .arg(config.path())
        .env("DATABASE_URL", format!("sqlite://{}?mode=rwc", config.file("db.sqlite").display()))
        .env("WXHOST_ADMIN_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .output()
        .expect("running wxhost")
}

#[test]
fn check_refuses_a_db_importing_plugin_in_the_web_role_naming_the_interface() {
    let config = db_probe_in("web", r#""log""#);
    let out = wxhost(&["check"], &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("REFUSED  wxhost:plugin/db@0.1.0  (capability `db` is not granted to role web)"),
        "{stdout}"
    );
    assert!(stdout.contains("some plugins were refused"), "{stdout}");
}

#[test]
fn serve_refuses_to_start_with_a_db_importing_plugin_in_the_web_role() {
    let config = db_probe_in("web", r#""log""#);
    let out = wxhost(&["serve", "--role", "web", "--no-watch"], &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("plugin `db-probe` refused: imports `wxhost:plugin/db@0.1.0`"), "{stderr}");
}

#[test]
fn check_accepts_the_same_plugin_in_the_app_role() {
    let config = db_probe_in("app", r#""log", "db""#);
    let out = wxhost(&["check"], &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("granted  wxhost:plugin/db@0.1.0  (capability `db`)"), "{stdout}");
    assert!(stdout.contains("all plugins accepted"), "{stdout}");
}

#[test]
fn an_app_plugin_that_does_not_declare_db_is_refused_too() {
    let config = db_probe_in("app", r#""log""#);
    let out = wxhost(&["check"], &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("capability `db` is not declared by the plugin"), "{stdout}");
}

#[test]
fn a_config_declaring_db_for_the_web_role_is_rejected_with_every_problem() {
    let toml = base_toml(6000, r#""log", "db""#, r#""log""#)
        + r#"
[[plugins]]
name = "db-probe"
role = "web"
wasm = "missing.wasm"
routes = ["POST /probe/db"]
capabilities = ["db"]
"#;
    let config = TestConfig::new(&toml, &[]);
    let out = wxhost(&["check"], &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for problem in [
        "grants `db`, which the web role can never have",
        "must stay under WeChat's 5000 ms",
        "missing.wasm does not exist",
        "declares `db`, which role `web` does not grant",
    ] {
        assert!(stderr.contains(problem), "missing {problem:?} in {stderr}");
    }
}
