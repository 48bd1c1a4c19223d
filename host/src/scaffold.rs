//! `wxhost new plugin NAME --role web|app`: a plugin crate on the guest SDK
//! with one example route and its test, wired into the build (the workspace
//! members, the one list of plugins) and into plugins.toml. The next build
//! compiles it to `plugins/dist/NAME.wasm`, where plugins.toml points.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};

use crate::config::Role;

/// What `new plugin` made, for the message to the user.
#[derive(Debug)]
pub struct NewPlugin {
    pub crate_dir: PathBuf,
    pub route: String,
    pub wasm: String,
}

/// Names a plugin may not take: folders of `plugins/` that are not plugins.
const RESERVED: &[&str] = &["sdk", "dist", "fixtures"];

/// Writes plugin `name` for `role` into the workspace whose plugins.toml is `config`.
pub fn new_plugin(config: &Path, name: &str, role: Role) -> anyhow::Result<NewPlugin> {
    let name_ok = (1..=40).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.ends_with('-');
    ensure!(name_ok, "a plugin name is 1-40 of a-z, 0-9 and -, starting with a letter: {name:?}");
    ensure!(!RESERVED.contains(&name), "`{name}` is a folder of plugins/ that is not a plugin");
    let root = match config.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let manifest_path = root.join("Cargo.toml");
    let manifest_text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {} (run this in the wxhost workspace)", manifest_path.display()))?;
    let mut manifest: toml_edit::DocumentMut =
        manifest_text.parse().with_context(|| format!("parsing {}", manifest_path.display()))?;
    let config_text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    // Read, not validated: a plugin added before its first build has no wasm yet.
    let existing: toml::Table =
        config_text.parse().with_context(|| format!("parsing {}", config.display()))?;
    let taken = existing
        .get("plugins")
        .and_then(|p| p.as_array())
        .is_some_and(|plugins| plugins.iter().any(|p| p.get("name").and_then(|n| n.as_str()) == Some(name)));
    if taken {
        bail!("{} already has a plugin named `{name}`", config.display());
    }
    let crate_dir = root.join("plugins").join(name);
    ensure!(!crate_dir.exists(), "{} already exists", crate_dir.display());

    let members = manifest
        .get_mut("workspace")
        .and_then(|w| w.get_mut("members"))
        .and_then(|m| m.as_array_mut())
        .with_context(|| format!("{} has no [workspace] members list", manifest_path.display()))?;
    let member = format!("plugins/{name}");
    members.push(member.as_str());

    let route = format!("/api/v1/{name}/hello");
    let wasm = format!("plugins/dist/{name}.wasm");
    std::fs::create_dir_all(crate_dir.join("src"))?;
    std::fs::write(crate_dir.join("Cargo.toml"), crate_manifest(name, role))?;
    std::fs::write(crate_dir.join("src/lib.rs"), crate_source(name, role, &route))?;
    std::fs::write(&manifest_path, manifest.to_string())?;
    let section = format!(
        r#"
[[plugins]]
name = "{name}"
role = "{role}"
wasm = "{wasm}"
routes = ["GET {route}"]
# What the plugin imports, each granted to the {role} role: add "config",
# "db", "session", … as the plugin starts to use them.
capabilities = ["log"]
"#,
        role = role.name(),
    );
    let mut config_text = config_text;
    if !config_text.ends_with('\n') {
        config_text.push('\n');
    }
    config_text.push_str(&section);
    std::fs::write(config, config_text)?;
    Ok(NewPlugin { crate_dir, route, wasm })
}

fn crate_manifest(name: &str, role: Role) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
description = "{role} role plugin"
edition.workspace = true
rust-version.workspace = true
license.workspace = true
publish.workspace = true

[lib]
crate-type = ["cdylib"]

[dependencies]
wxhost-sdk = {{ path = "../sdk" }}

[lints]
workspace = true
"#,
        role = role.name(),
    )
}

fn crate_source(name: &str, role: Role, route: &str) -> String {
    format!(
        r#"//! The `{name}` plugin ({role} role). Its routes are written twice, on
//! purpose: in plugins.toml (what the host sends here) and in `routes()`
//! below (which handler answers); the host passes the route it matched.

use wxhost_sdk::prelude::*;

fn routes() -> Router {{
    Router::new().get("{route}", hello)
}}

wxhost_sdk::plugin!(routes);

/// `GET {route}?name=…`: a greeting, with the host's clock.
fn hello(req: &Request) -> Result<Response> {{
    let name = req.query_param("name").unwrap_or_else(|| "world".into());
    if name.chars().count() > 64 {{
        return Err(Error::bad_request("name_too_long", "a name has at most 64 characters"));
    }}
    Ok(Response::json(200, &json!({{ "hello": name, "at": now() }})))
}}

#[cfg(test)]
mod tests {{
    use super::*;

    fn body(response: &Response) -> Json {{
        serde_json::from_slice(&response.body).unwrap()
    }}

    #[test]
    fn hello_greets_the_name_it_is_given() {{
        let response = routes().serve(Request::for_test("GET", "{route}").with_query("name=wxhost"));
        assert_eq!(response.status, 200);
        assert_eq!(body(&response)["hello"], "wxhost");
    }}

    #[test]
    fn a_name_too_long_is_refused_with_the_json_error_contract() {{
        let long = "x".repeat(65);
        let response = routes().serve(Request::for_test("GET", "{route}").with_query(&format!("name={{long}}")));
        assert_eq!(response.status, 400);
        assert_eq!(body(&response)["error"]["code"], "name_too_long");
    }}
}}
"#,
        role = role.name(),
    )
}
