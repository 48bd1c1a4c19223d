//! Compiles the plugin crates in `plugins/` to wasm32-wasip2 components as part
//! of the host's ordinary build, so a fresh clone needs no extra step.
//!
//! The plugins are built by a nested cargo with its own target directory (a
//! shared one would deadlock on cargo's lock) and copied to `plugins/dist/`,
//! where `plugins.toml` points and where a running server's file watcher
//! picks up a rebuilt plugin.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// Plugin packages built for the default configuration and the tests:
/// (package, extra cargo features, file name in plugins/dist).
const PLUGINS: &[(&str, &str, &str)] = &[
    ("verify", "", "verify.wasm"),
    ("internal", "", "internal.wasm"),
    ("account", "", "account.wasm"),
    ("notify", "", "notify.wasm"),
    ("payment", "", "payment.wasm"),
    ("sandbox-probe", "", "fixtures/sandbox-probe.wasm"),
    ("db-probe", "", "fixtures/db-probe.wasm"),
    // A build of `verify` whose answers carry a marker header: the hot-swap tests
    // swap it in to tell old answers from new ones.
    ("verify", "marked-build", "fixtures/verify-marked.wasm"),
];

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "plugin";

fn main() {
    // Anything written below must look older than this run, or cargo would
    // consider the build script stale on every build.
    let started = SystemTime::now() - Duration::from_secs(5);
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("host/ has a parent").to_path_buf();
    let dist = root.join("plugins/dist");

    for watched in ["plugins", "wit", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-changed={}", dist.display());
    for (_, _, file) in PLUGINS {
        println!("cargo:rerun-if-changed={}", dist.join(file).display());
    }
    println!("cargo:rustc-env=WXHOST_PLUGIN_DIST={}", dist.display());

    ensure_target(&root);
    let target_dir = plugin_target_dir(&root);
    let mut by_features: Vec<(&str, Vec<&str>)> = Vec::new();
    for (package, features, _) in PLUGINS {
        match by_features.iter_mut().find(|(f, _)| f == features) {
            Some((_, packages)) => packages.push(package),
            None => by_features.push((features, vec![package])),
        }
    }
    for (features, packages) in &by_features {
        build(&root, &target_dir, packages, features);
        for (package, f, file) in PLUGINS {
            if f == features {
                let built =
                    target_dir.join(TARGET).join(PROFILE).join(format!("{}.wasm", package.replace('-', "_")));
                copy_if_changed(&built, &dist.join(file), started);
            }
        }
    }
    set_mtime(&dist, started);
    set_mtime(&dist.join("fixtures"), started);
}

/// The plugins need the `wasm32-wasip2` standard library. rustup adds the
/// targets of rust-toolchain.toml only when it installs the toolchain itself,
/// so a toolchain installed before may lack it: add it through rustup (one
/// line says so), or stop with the exact command when rustup is not there.
fn ensure_target(root: &Path) {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if sysroot.is_some_and(|s| s.join("lib/rustlib").join(TARGET).is_dir()) {
        return;
    }
    let mut rustup = Command::new("rustup");
    rustup.current_dir(root).args(["target", "add", TARGET]);
    if let Ok(toolchain) = std::env::var("RUSTUP_TOOLCHAIN") {
        rustup.args(["--toolchain", &toolchain]);
    }
    match rustup.status() {
        Ok(status) if status.success() => {
            println!(
                "cargo:warning=installed the {TARGET} target with rustup (the wasm plugins are built for it)"
            )
        }
        _ => panic!(
            "the wasm plugins need the {TARGET} target, which this Rust toolchain lacks and rustup \
             could not add: install it with `rustup target add {TARGET}` (or your toolchain's equivalent)"
        ),
    }
}

fn build(root: &Path, target_dir: &Path, packages: &[&str], features: &str) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--target", TARGET, "--profile", PROFILE, "--target-dir"])
        .arg(target_dir);
    for package in packages {
        cmd.args(["-p", package]);
    }
    if !features.is_empty() {
        cmd.args(["--features", features]);
    }
    // The outer build's flags are for the host target, not for wasm.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("could not run cargo to build the plugins");
    if !status.success() {
        panic!(
            "building the wasm plugins ({}) failed. If the error above says the \
             `{TARGET}` target is not installed, run `rustup target add {TARGET}` \
             (rust-toolchain.toml asks rustup to install it automatically).",
            packages.join(", ")
        );
    }
}

/// `<target dir>/wasm-plugins`, beside the host's own build output.
fn plugin_target_dir(root: &Path) -> PathBuf {
    // OUT_DIR is <target>/<profile>/build/wxhost-<hash>/out.
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let target = out_dir
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "build"))
        .and_then(|build| build.parent())
        .and_then(|profile| profile.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.join("target"));
    target.join("wasm-plugins")
}

fn copy_if_changed(from: &Path, to: &Path, mtime: SystemTime) {
    let bytes = std::fs::read(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display()));
    if std::fs::read(to).ok().as_deref() != Some(bytes.as_slice()) {
        std::fs::create_dir_all(to.parent().expect("dist file has a parent")).expect("creating plugins/dist");
        // Write beside and rename, so a running server's watcher never reads a half-written file.
        let tmp = to.with_extension("wasm.tmp");
        std::fs::write(&tmp, &bytes).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        std::fs::rename(&tmp, to).unwrap_or_else(|e| panic!("renaming to {}: {e}", to.display()));
    }
    set_mtime(to, mtime);
}

fn set_mtime(path: &Path, mtime: SystemTime) {
    let _ = filetime::set_file_mtime(path, filetime::FileTime::from_system_time(mtime));
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by cargo"))
}
