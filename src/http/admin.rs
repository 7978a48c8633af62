//! `/admin/*`: the operator's API, behind `Authorization: Bearer <server.admin_token>`. With no
//! token configured, the admin API does not exist (404).

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::ingest::message::{MessageType, RawMessage};
use crate::ingest::plan;
use crate::ingest::rules::{self, BatchDefaults};
use crate::metrics::{PlanLabels, PlanOutcome};
use crate::query;
use crate::replay::ReplayRequest;
use crate::schema::Verdict;

/// Lets the request through when it carries the admin token.
pub(super) fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let Some(token) = state.config.server.admin_token.as_deref() else {
        return Err(ApiError::NotFound(
            "the admin API is off (no server.admin_token)".into(),
        ));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::Forbidden("wrong admin token")),
        None => Err(ApiError::Unauthorized(
            "admin API needs Authorization: Bearer <token>",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
pub struct QueryRequest {
    sql: String,
}

/// `POST /admin/query {"sql": "..."}`: the rows as a JSON array of objects.
pub async fn query(
    req: HttpRequest,
    body: web::Json<QueryRequest>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let _slot = state
        .query_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy("too many queries are running; try again shortly"))?;
    let engine = state.query.clone();
    let sql = body.into_inner().sql;
    // On the query runtime, so that a heavy query never holds an HTTP worker.
    let result = state
        .query_runtime
        .spawn(async move {
            let result = engine.sql(&sql).await?;
            query::to_json_rows(&result)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(result))
}

/// `GET /admin/schemas`: every enforced schema with its versions and how many messages it flagged
/// or blocked since the server started.
pub async fn schemas(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let snapshot = state.plan.snapshot();
    let checks = &state.metrics.schema.checks;
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
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let raw: RawMessage = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("not a message: {e}")))?;
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
        MessageType::Identify | MessageType::Group => message.traits.as_deref(),
        _ => message.properties.as_deref(),
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
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
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
