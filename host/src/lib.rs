//! wxhost: a WeChat backend whose handlers are sandboxed wasm components.
//! The host owns HTTP, the database, secrets and outbound calls, and lends
//! them to plugins through the WIT interfaces in `wit/`.

#![deny(unsafe_code)]

pub mod audit;
pub mod bindings;
pub mod caps;
pub mod check;
pub mod client_limit;
pub mod config;
pub mod database;
pub mod engine;
pub mod error;
pub mod frontend;
pub mod host;
pub mod internal_auth;
pub mod metrics;
pub mod openapi;
pub mod platform_certificates;
pub mod plugin;
pub mod reconcile;
pub mod role;
pub mod runtime;
pub mod scaffold;
pub mod server;
pub mod service_keys;
pub mod settings;
pub mod sim;
pub mod wechat;
