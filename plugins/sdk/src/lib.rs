//! The guest SDK of wxhost plugins.
//!
//! A plugin is a [`Router`] of handlers, exported with [`plugin!`]:
//!
//! ```ignore
//! use wxhost_sdk::prelude::*;
//!
//! fn routes() -> Router {
//!     Router::new().get("/api/v1/hello/{name}", hello)
//! }
//!
//! fn hello(req: &Request) -> Result<Response> {
//!     let name = req.param("name")?;
//!     Ok(Response::json(200, &json!({ "hello": name })))
//! }
//!
//! wxhost_sdk::plugin!(routes);
//! ```
//!
//! The host routes a request with plugins.toml and passes the route it
//! matched, so a handler is chosen by `(method, route)` and never by matching
//! the path again. Every capability's error converts into [`Error`] with `?`,
//! which renders the project's JSON error contract
//! (`{"error": {"code", "message"}}`).
//!
//! The bindings cover every interface in `wit/`; a component imports only
//! what the plugin calls, and the host refuses to load a plugin importing a
//! capability its role does not grant or plugins.toml does not declare.

/// The generated bindings of `wit/` (every capability, and the handler export).
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin-host",
        path: "../../wit",
        pub_export_macro: true,
        default_bindings_module: "wxhost_sdk::bindings",
        export_macro_name: "export_handler",
    });
}

pub mod db;
mod error;
mod http;
pub mod log;
mod router;
pub mod session;

pub use bindings::wxhost::plugin::{callback_crypto, config, internal_call, wechat_api, wechat_pay};
pub use error::{Error, Result};
pub use http::{Request, Response};
pub use router::{Handler, Router};
/// For the plugins' own JSON (the SDK's helpers take and give `serde_json` values).
pub use serde_json;

/// Everything a handler usually needs.
pub mod prelude {
    pub use crate::db::{self, Row, Rows, Value};
    pub use crate::serde_json::{self, Value as Json, json};
    pub use crate::{Error, Request, Response, Result, Router, log, now, random_hex};
}

/// Unix time in seconds, from the host's clock (WASI).
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `bytes` random bytes from the host's CSPRNG (WASI), as lower-case hex.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    // WASI's random source is always there; a host without it is a host bug.
    getrandom::fill(&mut b).expect("the host provides WASI random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A random number from the host's CSPRNG (WASI).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the host provides WASI random");
    u64::from_le_bytes(b)
}

/// Exports a plugin whose routes `$routes()` (a `fn() -> Router`) builds.
#[macro_export]
macro_rules! plugin {
    ($routes:path) => {
        /// Answers one request: the handler export calls it, and so may the
        /// plugin's own unit tests (it is also what keeps the routes alive in
        /// a native build, which has no export).
        pub fn wxhost_handle(request: $crate::Request) -> $crate::Response {
            $routes().serve(request)
        }

        struct WxhostPlugin;

        impl $crate::bindings::exports::wxhost::plugin::handler::Guest for WxhostPlugin {
            fn handle(request: $crate::Request) -> $crate::Response {
                wxhost_handle(request)
            }
        }

        // Only a wasm build exports it: the export names (`wxhost:plugin/…`) are
        // not symbols a native linker takes, and native builds are for unit tests.
        #[cfg(target_family = "wasm")]
        $crate::bindings::export_handler!(WxhostPlugin);
    };
}
