//! The one `bindgen!` of the host: Rust types and traits for every interface in
//! `wit/`. Capability modules implement the generated `Host` traits.
//!
//! Every capability reports errors one way: a function returns its WIT error
//! wrapped in [`CapabilityError`], into which `?` converts the WIT error (and
//! each module's own errors, through the WIT error); a host bug is
//! `CapabilityError::trap`, which ends the plugin's call instead of reaching it.

wasmtime::component::bindgen!({
    world: "plugin-host",
    path: "../wit",
    imports: {
        "wxhost:plugin/db": async | trappable,
        "wxhost:plugin/internal-call": async | trappable,
        "wxhost:plugin/wechat-api": async | trappable,
        "wxhost:plugin/wechat-pay": async | trappable,
        "wxhost:plugin/session": async | trappable,
        // verify-push may consult the database (the app role's signature ledger).
        "wxhost:plugin/callback-crypto": async | trappable,
        default: trappable,
    },
    exports: { default: async },
    trappable_error_type: {
        "wxhost:plugin/callback-crypto.crypto-error" => crate::bindings::CapabilityError<crate::bindings::wxhost::plugin::callback_crypto::CryptoError>,
        "wxhost:plugin/db.error" => crate::bindings::CapabilityError<crate::bindings::wxhost::plugin::db::Error>,
        "wxhost:plugin/internal-call.call-error" => crate::bindings::CapabilityError<crate::bindings::wxhost::plugin::internal_call::CallError>,
        "wxhost:plugin/wechat-api.api-error" => crate::bindings::CapabilityError<crate::bindings::wxhost::plugin::wechat_api::ApiError>,
        "wxhost:plugin/wechat-pay.pay-error" => crate::bindings::CapabilityError<crate::bindings::wxhost::plugin::wechat_pay::PayError>,
        "wxhost:plugin/session.session-error" => crate::bindings::CapabilityError<crate::bindings::wxhost::plugin::session::SessionError>,
    },
    with: {
        "wxhost:plugin/db.transaction": crate::caps::db::transaction::Transaction,
    },
});

/// The error of a capability call: the WIT error `E` for the plugin, or a trap.
pub type CapabilityError<E> = wasmtime_wasi::TrappableError<E>;
