//! Compiles the plugin crates in `plugins/` to wasm32-wasip2 components as part
//! of the host's ordinary build, so a fresh clone needs no extra step.
//!
//! The plugins are built by a nested cargo with its own target directory (a
//! shared one would deadlock on cargo's lock) and copied to `plugins/dist/`,
//! where `plugins.toml` points and where a running server's file watcher
//! picks up a rebuilt plugin.
//!
//! Which plugins there are is written once: the workspace members under
//! `plugins/` whose library is a `cdylib` (`wxhost new plugin` adds one). A
//! member's wasm goes to the same place under `plugins/dist/`
//! (`plugins/fixtures/db-probe` → `plugins/dist/fixtures/db-probe.wasm`);
//! `[package.metadata.wxhost] builds` names extra builds with features.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "plugin";

fn main() {
    // Anything written below must look older than this run, or cargo would
    // consider the build script stale on every build.
    let started = SystemTime::now() - Duration::from_secs(5);
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("host/ has a parent").to_path_buf();
    let dist = root.join("plugins/dist");

    // `migrations`: sqlx::migrate! embeds them, and a new file changes no source.
    for watched in ["plugins", "wit", "migrations", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-changed={}", dist.display());
    let plugins = plugin_builds(&root);
    for plugin in &plugins {
        println!("cargo:rerun-if-changed={}", dist.join(&plugin.file).display());
    }
    println!("cargo:rustc-env=WXHOST_PLUGIN_DIST={}", dist.display());

    ensure_target(&root);
    let target_dir = plugin_target_dir(&root);
    println!("cargo:rustc-env=WXHOST_PLUGIN_TARGET_DIR={}", target_dir.display());
    let mut by_features: Vec<(&str, Vec<&str>)> = Vec::new();
    for plugin in &plugins {
        match by_features.iter_mut().find(|(f, _)| *f == plugin.features) {
            Some((_, packages)) => packages.push(&plugin.package),
            None => by_features.push((&plugin.features, vec![&plugin.package])),
        }
    }
    for (features, packages) in &by_features {
        build(&root, &target_dir, packages, features);
        for plugin in plugins.iter().filter(|p| p.features == *features) {
            let built = target_dir
                .join(TARGET)
                .join(PROFILE)
                .join(format!("{}.wasm", plugin.package.replace('-', "_")));
            copy_if_changed(&built, &dist.join(&plugin.file), started);
        }
    }
    set_mtime(&dist, started);
    set_mtime(&dist.join("fixtures"), started);
}

/// One wasm build of a plugin package.
struct PluginBuild {
    package: String,
    /// Cargo features of this build (empty: the default build).
    features: String,
    /// Where it goes, relative to `plugins/dist`.
    file: PathBuf,
}

/// The plugin builds: every workspace member under `plugins/` with a
/// `cdylib` library, and the extra builds its metadata names.
fn plugin_builds(root: &Path) -> Vec<PluginBuild> {
    let read = |path: &Path| -> toml::Table {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        text.parse().unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let workspace = read(&root.join("Cargo.toml"));
    let members = workspace["workspace"]["members"].as_array().expect("[workspace] members is a list");
    let mut builds = Vec::new();
    for member in members.iter().filter_map(|m| m.as_str()) {
        let Some(under_plugins) = member.strip_prefix("plugins/") else { continue };
        let manifest = read(&root.join(member).join("Cargo.toml"));
        let cdylib = manifest
            .get("lib")
            .and_then(|l| l.get("crate-type"))
            .and_then(|t| t.as_array())
            .is_some_and(|t| t.iter().any(|t| t.as_str() == Some("cdylib")));
        if !cdylib {
            continue;
        }
        let package = manifest["package"]["name"].as_str().expect("package.name").to_string();
        builds.push(PluginBuild {
            package: package.clone(),
            features: String::new(),
            file: PathBuf::from(format!("{under_plugins}.wasm")),
        });
        let extra = manifest
            .get("package")
            .and_then(|p| p.get("metadata"))
            .and_then(|m| m.get("wxhost"))
            .and_then(|w| w.get("builds"))
            .and_then(|b| b.as_table());
        for (features, file) in extra.into_iter().flatten() {
            let file = file.as_str().unwrap_or_else(|| panic!("{member}: builds.{features} names a file"));
            builds.push(PluginBuild {
                package: package.clone(),
                features: features.clone(),
                file: file.into(),
            });
        }
    }
    builds
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
