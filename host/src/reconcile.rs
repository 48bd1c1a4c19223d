//! `wxhost reconcile`: a day's orders and refunds held against WeChat Pay's
//! trade bill. The host loads the app role's plugins in this process (no
//! listener) and calls the one that serves [`ROUTE`] (the payment plugin),
//! which asks the host for the bill through `wechat-pay.trade-bill`, credits
//! a payment the books lack exactly as its notify would have, and answers
//! the report this prints and writes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde_json::Value;

use crate::bindings::wxhost::plugin::types as wit;
use crate::config::{self, Role};
use crate::host::Host;
use crate::runtime::RouteMatch;
use crate::settings::Settings;

/// The internal route the host calls with `{"date": "YYYY-MM-DD"}`.
pub const ROUTE: (&str, &str) = ("POST", "/api/v1/internal/payment/reconcile");

/// A day's bill and one query per missing payment take longer than a
/// request is allowed: the plugin's deadline for this call.
const DEADLINE_MS: u64 = 120_000;

/// What reconciling one day found.
pub struct Reconciled {
    /// The plugin's report (see the README's "Reconciliation").
    pub report: Value,
    pub discrepancies: usize,
}

/// The day before today in China Standard Time, as WeChat Pay's bills name days.
pub fn yesterday() -> String {
    let today = crate::wechat::pay::today_cst();
    crate::wechat::pay::day_name(today.previous_day().unwrap_or(today))
}

/// Reconciles `date` (`YYYY-MM-DD`) with the plugins of `config_path`'s app role.
pub async fn run(config_path: &Path, mut settings: Settings, date: &str) -> anyhow::Result<Reconciled> {
    crate::wechat::pay::parse_day(date)
        .with_context(|| format!("--date {date} is not a day as YYYY-MM-DD"))?;
    settings.retain_for(&[Role::App]);
    settings.check_secret_strength()?;
    let mut config = config::load(config_path)?;
    let app = config.roles.get_mut(&Role::App).context("plugins.toml has no [roles.app] section")?;
    app.deadline_ms = app.deadline_ms.max(DEADLINE_MS);
    let engine = crate::engine::new(config.max_instances, config.reset_dirty_pages_only)?;
    let services = Arc::new(crate::server::open_services(&config, &settings, &[Role::App]).await?);
    let host = Host::start(engine, services, &config, &[Role::App]).await?;
    let runtime = host.runtime(Role::App);
    let RouteMatch::Found { plugin, .. } = runtime.route(ROUTE.0, ROUTE.1) else {
        anyhow::bail!(
            "no app-role plugin serves `{} {}` (the payment plugin does: add the route to its routes in {})",
            ROUTE.0,
            ROUTE.1,
            config_path.display()
        );
    };
    let request = wit::Request {
        method: ROUTE.0.into(),
        route: ROUTE.1.into(),
        path: ROUTE.1.into(),
        query: String::new(),
        params: Vec::new(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::json!({ "date": date }).to_string().into_bytes(),
        request_id: format!("reconcile-{:024x}", rand::random::<u128>() >> 32),
        client_ip: None,
        service: None,
    };
    let answer = host
        .call(plugin.clone(), request)
        .await
        .map_err(|failure| anyhow::anyhow!("the {} plugin failed: {failure}", plugin.identity.name))?;
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    if answer.status != 200 {
        let error = &body["error"];
        anyhow::bail!(
            "{} ({}): nothing was reconciled",
            error["message"].as_str().unwrap_or("the reconciliation failed"),
            error["code"].as_str().unwrap_or("unknown")
        );
    }
    let discrepancies = body["discrepancies"]
        .as_array()
        .map(Vec::len)
        .context("the plugin's report has no discrepancies list")?;
    Ok(Reconciled { report: body, discrepancies })
}

/// Where the report of `date` goes in `dir`.
pub fn report_path(dir: &Path, date: &str) -> PathBuf {
    dir.join(format!("reconcile-{date}.json"))
}

/// The report for people: both sides' totals, then each discrepancy.
pub fn summary(report: &Value) -> String {
    let yuan = |fen: &Value| {
        let fen = fen.as_i64().unwrap_or_default();
        format!("¥{}.{:02}", fen / 100, fen % 100)
    };
    let side = |s: &Value| {
        format!(
            "{} payments {}, {} refunds {}",
            s["payments"],
            yuan(&s["paid_fen"]),
            s["refunds"],
            yuan(&s["refunded_fen"])
        )
    };
    let mut out = format!(
        "WeChat Pay's bill of {}\n  WeChat Pay: {}\n  here:       {}\n",
        report["date"].as_str().unwrap_or("?"),
        side(&report["bill"]),
        side(&report["here"])
    );
    let found = report["discrepancies"].as_array().cloned().unwrap_or_default();
    if found.is_empty() {
        out.push_str("  the books agree\n");
    }
    for d in &found {
        let refund = d["out_refund_no"].as_str().map(|r| format!(" refund {r}")).unwrap_or_default();
        out.push_str(&format!(
            "  {:<24} order {}{refund}: {}\n",
            d["kind"].as_str().unwrap_or("?"),
            d["out_trade_no"].as_str().unwrap_or("?"),
            d["action"].as_str().unwrap_or("?")
        ));
    }
    if !found.is_empty() {
        out.push_str(&format!("  {} discrepancies\n", found.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_both_sides_and_every_discrepancy_with_what_was_done() {
        let report = serde_json::json!({
            "date": "2026-12-06",
            "bill": { "payments": 2, "paid_fen": 4980, "refunds": 1, "refunded_fen": 990, "other_lines": 0 },
            "here": { "payments": 1, "paid_fen": 990, "refunds": 1, "refunded_fen": 990 },
            "discrepancies": [
                { "kind": "not_paid_here", "out_trade_no": "A123456", "out_refund_no": null, "action": "credited" },
                { "kind": "refund_state_mismatch", "out_trade_no": "B123456", "out_refund_no": "R1", "action": "reported" },
            ],
        });
        let text = summary(&report);
        assert!(text.contains("bill of 2026-12-06"), "{text}");
        assert!(text.contains("WeChat Pay: 2 payments ¥49.80, 1 refunds ¥9.90"), "{text}");
        assert!(text.contains("here:       1 payments ¥9.90"), "{text}");
        assert!(text.contains("not_paid_here") && text.contains("order A123456: credited"), "{text}");
        assert!(text.contains("order B123456 refund R1: reported"), "{text}");
        assert!(text.contains("2 discrepancies"), "{text}");
        let agreed = serde_json::json!({ "date": "2026-12-06", "bill": {}, "here": {}, "discrepancies": [] });
        assert!(summary(&agreed).contains("the books agree"));
    }

    #[test]
    fn yesterday_is_a_day_as_wechat_pay_names_it() {
        let day = yesterday();
        assert!(crate::wechat::pay::parse_day(&day).is_some(), "{day}");
    }
}
