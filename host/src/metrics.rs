//! Prometheus metrics: the `metrics` facade, recorded into one
//! metrics-exporter-prometheus recorder per process, rendered by `GET /metrics`
//! on the admin listener.
//!
//! | metric | labels |
//! | --- | --- |
//! | `wxhost_http_requests_total`, `wxhost_http_request_duration_seconds` | role, plugin, route, status |
//! | `wxhost_plugin_failures_total` | plugin, kind (trap, timeout, out_of_memory) |
//! | `wxhost_plugin_instantiate_seconds` | plugin |
//! | `wxhost_plugin_loaded` (1 for the version serving) | role, plugin, version |
//! | `wxhost_plugin_reloads_total` | outcome |
//! | `wxhost_plugin_outcomes_total` (what a plugin says it did: applied, duplicate) | plugin, route, outcome |
//! | `wxhost_db_pool_connections` | state (idle, in_use) |
//! | `wxhost_outbound_calls_total`, `wxhost_outbound_call_duration_seconds` | service (wechat, wechatpay), call, outcome |
//! | `wxhost_access_token_refreshes_total` | |

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets (seconds): sub-millisecond sandbox calls up to the longest deadlines.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Whether a plugin's reported outcome may be a label value: a short word,
/// so a plugin cannot grow the metric without bound.
pub fn is_outcome_label(outcome: &str) -> bool {
    (1..=32).contains(&outcome.len())
        && outcome.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder (installed on first use).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if something else installed a recorder first (never in wxhost).
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        handle
    })
}

/// Keeps histograms bounded between scrapes.
pub fn spawn_upkeep(shutdown: tokio_util::sync::CancellationToken) {
    let handle = handle();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => handle.run_upkeep(),
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

/// The exposition text, with the database pool sampled now.
pub fn render(db: Option<&crate::database::Database>) -> String {
    if let Some(db) = db {
        let (size, idle) = db.pool_usage();
        let (size, idle) = (size as usize, idle);
        metrics::gauge!("wxhost_db_pool_connections", "state" => "idle").set(idle as f64);
        metrics::gauge!("wxhost_db_pool_connections", "state" => "in_use")
            .set(size.saturating_sub(idle) as f64);
    }
    handle().render()
}

/// One outbound call to WeChat or WeChat Pay.
pub fn outbound(service: &'static str, call: &str, outcome: &'static str, elapsed: Duration) {
    let call = call.to_string();
    metrics::counter!("wxhost_outbound_calls_total", "service" => service, "call" => call.clone(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!("wxhost_outbound_call_duration_seconds", "service" => service, "call" => call)
        .record(elapsed.as_secs_f64());
}
