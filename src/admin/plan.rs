//! `/admin/schemas`, `/admin/schemas/validate` and `/admin/replay/quarantine`: the tracking plan
//! in force, a dry run of it, and re-admitting what it blocked.

use actix_web::{web, HttpResponse};
use serde_json::value::RawValue;

use super::AdminState;
use crate::http::ApiError;
use crate::ingest::message::RawMessage;
use crate::ingest::plan;
use crate::ingest::rules::{self, BatchDefaults};
use crate::metrics::{PlanLabels, PlanOutcome};
use crate::replay::ReplayRequest;
use crate::schema::Verdict;
use crate::vocabulary::MessageType;

/// `GET /admin/schemas`: every enforced schema with its versions and how many messages it flagged
/// or blocked since the server started.
pub async fn schemas(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    let snapshot = state.plan.snapshot();
    let checks = &state.plan_metrics.checks;
    let count = |event: &str, outcome: PlanOutcome| {
        checks
            .get(&PlanLabels {
                event: event.to_string(),
                outcome,
            })
            .map_or(0, |c| c.get())
    };
    let mut rows: Vec<serde_json::Value> = snapshot
        .registry
        .entries()
        .map(|c| {
            let label = c.label();
            serde_json::json!({
                "type": c.kind.as_str(),
                "event": c.event,
                "versions": c.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
                "enforced": c.version(),
                "files": c.versions.iter().map(|v| v.path.display().to_string()).collect::<Vec<_>>(),
                "valid": count(&label, PlanOutcome::Valid),
                "violations": count(&label, PlanOutcome::Flagged) + count(&label, PlanOutcome::Blocked),
            })
        })
        .collect();
    rows.sort_by_key(|r| (r["type"].to_string(), r["event"].to_string()));
    Ok(HttpResponse::Ok().json(rows))
}

/// `POST /admin/schemas/validate`: a Segment message in; the field rules' and the registry's
/// verdict out, without storing anything.
pub async fn validate(
    body: web::Bytes,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let raw: &RawValue = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("not a message: {e}")))?;
    let raw = RawMessage::read(raw)
        .map_err(|reason| ApiError::BadRequest(format!("not a message: {reason}")))?;
    let message = match rules::apply(raw, None, &BatchDefaults::default(), chrono::Utc::now()) {
        Ok(m) => m,
        Err(reason) => {
            return Ok(HttpResponse::Ok()
                .json(serde_json::json!({ "verdict": "rejected", "errors": [reason] })))
        }
    };
    let snapshot = state.plan.snapshot();
    let Some(compiled) = snapshot
        .registry
        .lookup(message.kind, plan::lookup_name(&message))
    else {
        return Ok(
            HttpResponse::Ok().json(serde_json::json!({ "verdict": "unplanned", "errors": [] }))
        );
    };
    let payload = match message.kind {
        MessageType::Identify | MessageType::Group => message.traits.as_ref(),
        _ => message.properties.as_ref(),
    };
    let payload: serde_json::Value = payload
        .and_then(|p| serde_json::from_str(p.get()).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    let schema = serde_json::json!({ "type": compiled.kind.as_str(), "event": compiled.event, "version": compiled.version() });
    Ok(HttpResponse::Ok().json(match compiled.check(&payload) {
        Verdict::Invalid(errors) => {
            serde_json::json!({ "verdict": "invalid", "schema": schema, "errors": errors })
        }
        _ => serde_json::json!({ "verdict": "valid", "schema": schema, "errors": [] }),
    }))
}

/// `POST /admin/replay/quarantine {"event": ..., "since": ...}` (both optional): re-admits the
/// quarantined messages that the tracking plan in force lets through.
pub async fn replay_quarantine(
    body: web::Bytes,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let request: ReplayRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("expected {{\"event\", \"since\"}}: {e}")))?
    };
    let replayer = state.replayer.clone();
    let report = state
        .query_runtime
        .spawn(async move { replayer.replay(&request).await })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(report))
}
