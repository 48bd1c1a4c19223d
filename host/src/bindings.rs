//! The one `bindgen!` of the host: Rust types and traits for every interface in
//! `wit/`. Capability modules implement the generated `Host` traits.

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
    with: {
        "wxhost:plugin/db.transaction": crate::caps::db::transaction::Transaction,
    },
});
