//! Health, readiness and Prometheus metrics.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::AppState;
use crate::metrics::ConsumerLabels;

/// The process is up and answering.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Ready to accept messages: not shutting down, and the intake log can take writes. The body also
/// shows each stage that consumes the log: `running`, or `restarting` within a minute of a failure,
/// with its restarts, last error and lag. A stage that fails does not make the node unready: the
/// log keeps what it has not processed, and it is started again.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let stats = state.log.stats();
    let problem = if state.is_shutting_down() {
        Some("shutting down")
    } else if stats.failed {
        Some("intake log failed; restart to recover")
    } else if stats.nearly_full() {
        Some("intake log is full")
    } else {
        None
    };
    let lag = |consumer: &str| {
        stats
            .consumers
            .iter()
            .find(|(name, _)| name == consumer)
            .map(|(_, cursor)| stats.end.saturating_sub(*cursor))
    };
    let stages: Vec<serde_json::Value> = state
        .stages
        .statuses()
        .into_iter()
        .map(|s| {
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            v["lag"] = lag(&s.consumer).into();
            v
        })
        .collect();
    let degraded = stages.iter().any(|s| s["state"] != "running");
    match problem {
        None => HttpResponse::Ok().json(json!({
            "status": if degraded { "degraded" } else { "ready" },
            "stages": stages,
        })),
        Some(reason) => HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "5"))
            .json(json!({ "status": "unavailable", "reason": reason, "stages": stages })),
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let stats = state.log.stats();
    let gauges = &state.metrics.state;
    gauges.log_bytes.set(stats.bytes as i64);
    gauges.log_segments.set(stats.segments as i64);
    gauges.log_end_offset.set(stats.end as i64);
    for (consumer, cursor) in &stats.consumers {
        gauges
            .consumer_lag
            .get_or_create(&ConsumerLabels {
                consumer: consumer.clone(),
            })
            .set(stats.end.saturating_sub(*cursor) as i64);
    }
    gauges.dedup_ids.set(state.dedup.len() as i64);
    gauges.dedup_memory.set(state.dedup.memory() as i64);
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        return HttpResponse::InternalServerError().body(e.to_string());
    }
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(text)
}
