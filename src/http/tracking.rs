//! The Segment tracking endpoints: one message per request (`/v1/track`, ...) or a batch
//! (`/v1/batch`, `/v1/import`, and analytics.js's short paths).

use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use tracing::Instrument;

use super::error::{self, ApiError};
use super::{body, AppState};
use crate::ingest::{IngestError, Report, Shape};
use crate::metrics::Route;

/// Reads, checks and stores one request, then answers it.
pub async fn receive(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    shape: Shape,
    route: Route,
) -> HttpResponse {
    let started = Instant::now();
    let span = tracing::debug_span!("ingest", ?route);
    let response = match handle(&req, payload, &state, shape).instrument(span).await {
        Ok(report) => error::accepted(&report),
        Err(e) => {
            log_refusal(&e);
            e.error_response()
        }
    };
    state.observe(route, response.status().as_u16(), started);
    response
}

async fn handle(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    shape: Shape,
) -> Result<Report, ApiError> {
    let basic_key = body::basic_write_key(req)?;
    let deadline = state.config.server.body_timeout;
    let body = tokio::time::timeout(deadline, body::read(req, payload))
        .await
        .map_err(|_| ApiError::SlowBody(deadline))??;
    let ingest = state.ingest.clone();
    // Run to the end even if the client goes away: once the append is queued, the log and the
    // dedup state must learn how it ended.
    let handled =
        actix_web::rt::spawn(
            async move { ingest.handle(shape, &body, basic_key.as_deref()).await },
        );
    handled
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

fn log_refusal(e: &ApiError) {
    match e {
        ApiError::Ingest(IngestError::Unavailable(cause)) => {
            tracing::warn!(error = %cause, "refused a request: the intake log cannot take it")
        }
        ApiError::Internal(cause) => tracing::error!(error = %cause, "request failed"),
        other => tracing::debug!(error = %other, "refused a request"),
    }
}

/// analytics.js reports its own telemetry to `/v1/m`; it is not event data.
pub async fn client_metrics() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "success": true }))
}
