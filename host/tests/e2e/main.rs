//! End-to-end and router tests, in one binary: each test binary links wasmtime
//! and sqlx again, so one binary is minutes less of CI. The modules are the
//! former test files; a test's name is `module::behaviour`.

/// The test kit, under the name the modules have always used.
use wxhost_testkit as common;

mod browser;
mod database;
mod deploy;
mod faults;
mod hot_swap;
mod lifecycle;
mod login;
mod paid_message;
mod payment_notify;
mod payments;
mod platform_certificates;
mod plugin_sql;
mod properties;
mod push;
mod quota;
mod reconcile;
mod refunds;
mod refusal;
mod router;
mod sandbox;
mod verify;
mod wechat_api;
