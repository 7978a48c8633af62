//! `/admin/*`: the operator's API, behind `Authorization: Bearer <server.admin_token>`. With no
//! token configured, the admin API does not exist (404). The token is checked by [`guard`], which
//! wraps the whole scope, before a handler reads anything of the request's body.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::error::ApiError;
use super::AppState;
use crate::ingest::message::RawMessage;
use crate::ingest::plan;
use crate::ingest::rules::{self, BatchDefaults};
use crate::metrics::{PlanLabels, PlanOutcome};
use crate::query::{self, QueryError};
use crate::replay::ReplayRequest;
use crate::schema::Verdict;
use crate::vocabulary::MessageType;

/// Lets the request on to the admin handler when it carries the admin token; answers it
/// otherwise, without reading its body.
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .expect("the app holds its state");
    if let Err(e) = authorize(req.request(), state) {
        return Ok(req.error_response(e).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
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
        Some(g) if same_secret(g, token) => Ok(()),
        Some(_) => Err(ApiError::Forbidden("wrong admin token")),
        None => Err(ApiError::Unauthorized(
            "admin API needs Authorization: Bearer <token>",
        )),
    }
}

/// Compares digests, so that the time taken says nothing of the token: not where the first
/// difference is, nor its length.
fn same_secret(given: &str, token: &str) -> bool {
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let (a, b) = (digest(given), digest(token));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[derive(Deserialize)]
pub struct QueryRequest {
    sql: String,
}

/// `POST /admin/query {"sql": "..."}`: the rows as a JSON array of objects, streamed as the query
/// makes them. At most `query.max_rows` rows; a result that grows past `query.max_result_bytes`, or
/// a query that fails or times out once rows were sent, ends the response with an error (the body is
/// cut short, so a client never takes part of a result for all of it). A client that goes away
/// stops its query.
pub async fn query(
    body: web::Json<QueryRequest>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let slot = state
        .query_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy("too many queries are running; try again shortly"))?;
    let engine = state.query.clone();
    let sql = body.into_inner().sql;
    let max_rows = state.config.query.max_rows;
    let max_bytes = state.config.query.max_result_bytes as usize;
    let (started, start) = oneshot::channel();
    let (chunks, body) = mpsc::channel::<Result<Bytes, ApiError>>(2);
    // On the query runtime, so that a heavy query never holds an HTTP worker.
    state.query_runtime.spawn(async move {
        let _slot = slot;
        let timeout = engine.timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let planned = tokio::time::timeout_at(deadline, engine.stream(&sql, Some(max_rows))).await;
        let mut rows = match planned {
            Err(_) => return drop(started.send(Err(QueryError::Timeout(timeout)))),
            Ok(Err(e)) => return drop(started.send(Err(e))),
            Ok(Ok(rows)) => rows,
        };
        if started.send(Ok(())).is_err() {
            return;
        }
        let mut first = true;
        let mut out = b"[".to_vec();
        let mut sent = 0;
        loop {
            let next = tokio::select! {
                next = rows.next() => next.map(|r| r.map_err(QueryError::from)),
                _ = tokio::time::sleep_until(deadline) => Some(Err(QueryError::Timeout(timeout))),
                // The client went away: dropping the rows stops the query.
                _ = chunks.closed() => return,
            };
            let result = match next {
                None => {
                    out.push(b']');
                    let _ = chunks.send(Ok(out.into())).await;
                    return;
                }
                Some(Err(e)) => Err(e),
                Some(Ok(batch)) => query::append_json_rows(&batch, &mut first, &mut out),
            };
            sent += out.len();
            let chunk = match result {
                Ok(()) if sent > max_bytes => Err(QueryError::Failed(format!(
                    "the result is larger than query.max_result_bytes ({max_bytes} bytes); narrow the query"
                ))),
                Ok(()) => Ok(Bytes::from(std::mem::take(&mut out))),
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if let Err(e) = &chunk {
                tracing::warn!(error = %e, "admin query stopped after sending part of its result");
            }
            if chunks.send(chunk.map_err(ApiError::from)).await.is_err() || failed {
                return;
            }
        }
    });
    start
        .await
        .map_err(|_| ApiError::Internal("the query stopped before it started".into()))??;
    let body = futures_util::stream::unfold(body, |mut body| async move {
        body.recv().await.map(|chunk| (chunk, body))
    });
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .streaming(body))
}

/// `GET /admin/schemas`: every enforced schema with its versions and how many messages it flagged
/// or blocked since the server started.
pub async fn schemas(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
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
    body: web::Bytes,
    state: web::Data<AppState>,
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
    state: web::Data<AppState>,
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
