//! The public HTTP API as an OpenAPI 3 document (`docs/openapi.json`), served
//! by the app role at `GET /api/v1/openapi.json`. A test holds it to the
//! routes of plugins.toml and the host's own; schemathesis holds the running
//! app role to it (host/tests/e2e/lifecycle.rs).

use axum::http::header;
use axum::response::IntoResponse;

/// Where the app role serves the document.
pub const PATH: &str = "/api/v1/openapi.json";

pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

/// Routes the host answers itself (every plugin route comes from plugins.toml),
/// as `(method, path, listener)`.
pub const HOST_ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/healthz", "app"),
    ("GET", PATH, "app"),
    ("GET", "/config.json", "app"),
    ("GET", crate::platform_certificates::INTERNAL_PATH, "app"),
    ("GET", "/admin/plugins", "admin"),
    ("POST", "/admin/reload", "admin"),
    ("GET", "/metrics", "admin"),
];

pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;
    use crate::config::{self, Role};

    /// Which listener the document says a path is on: its `servers` override
    /// names the web role or the admin listener, else it is the app role's.
    fn listener(item: &serde_json::Value) -> &'static str {
        let description = item["servers"][0]["description"].as_str().unwrap_or_default();
        if description.starts_with("web role") {
            "web"
        } else if description.starts_with("admin") {
            "admin"
        } else {
            "app"
        }
    }

    #[test]
    fn the_document_describes_exactly_the_routes_of_plugins_toml_and_the_host() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let config = config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins.toml")).unwrap();
        let mut expected = BTreeSet::new();
        for plugin in &config.plugins {
            let on = match plugin.role {
                Role::Web => "web",
                Role::App => "app",
            };
            for route in &plugin.routes {
                expected.insert((route.method.clone(), route.path.clone(), on));
            }
        }
        for (method, path, on) in HOST_ROUTES {
            expected.insert((method.to_string(), path.to_string(), *on));
        }
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                if method == "servers" || method == "parameters" {
                    continue;
                }
                assert!(
                    operation["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path} documents its answers"
                );
                documented.insert((method.to_uppercase(), path.clone(), listener(item)));
            }
        }
        let undocumented: Vec<_> = expected.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&expected).collect();
        assert!(undocumented.is_empty(), "routes missing from docs/openapi.json: {undocumented:?}");
        assert!(unserved.is_empty(), "documented but not served (or on another listener): {unserved:?}");
    }

    #[test]
    fn every_reference_in_the_document_resolves() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        fn refs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                        out.push(r);
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("{r} is local"));
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }
}
