//! The member pages in a real browser (headless system Chromium driven by
//! playwright-core, see `browser/e2e.mjs`), against the whole product on
//! SQLite and MariaDB: QR login with a decoded QR image, buying with the
//! simulated payment, the phone layout, sign-out and lost sessions, API
//! errors, OAuth login; no console errors, no failed requests.
//!
//! Needs Node.js and Chromium: installed from Debian's packages if missing, and
//! the npm packages from the lock file on first use.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::stack::*;
use crate::common::*;

const CHROMIUM: &str = "/usr/bin/chromium";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Node.js, Chromium with a CJK font, and the npm packages from the lock file.
fn prerequisites() {
    require_programs(&[("node", "nodejs"), ("npm", "npm"), ("chromium", "chromium")]);
    if !Path::new("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc").exists() {
        require_debian_fonts();
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(browser_dir())
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm ci in {} failed", browser_dir().display());
    }
}

fn require_debian_fonts() {
    let status = std::process::Command::new("sh")
        .args(["-c", "dpkg -s fonts-noto-cjk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq fonts-noto-cjk)"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(status, "installing fonts-noto-cjk failed (see .ci/run)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_pages_work_in_a_real_browser_on_both_databases() {
    prerequisites();
    for db in all_databases().await {
        let stack = Stack::start(&db.url).await;
        let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-artifacts").join(db.name);
        std::fs::create_dir_all(&artifacts).unwrap();
        let run = tokio::process::Command::new("node")
            .arg(browser_dir().join("e2e.mjs"))
            .env("APP_URL", stack.app_url(""))
            .env("SIM_URL", stack.sim_url(""))
            .env("ARTIFACT_DIR", &artifacts)
            .env("CHROMIUM", CHROMIUM)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(300), run)
            .await
            .expect("the browser test finishes within 5 minutes")
            .expect("node runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!("{}: {stdout}\n{stderr}\nscreenshots: {}", db.name, artifacts.display());
        assert!(output.status.success(), "{}: the browser test failed:\n{stdout}\n{stderr}", db.name);
        assert!(stdout.contains(", 0 failed"), "{}: {stdout}", db.name);
        for shot in ["member-desktop.png", "member-mobile.png"] {
            assert!(artifacts.join(shot).is_file(), "{}: screenshot {shot} saved", db.name);
        }
        stack.shutdown().await;
    }
}
