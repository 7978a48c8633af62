//! `/admin/destinations`: each destination's delivery stats, its dead letter, and replay.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::AdminState;
use crate::http::ApiError;

/// `GET /admin/destinations`: `[{"name","type","delivered","retried","dead_lettered","backlog",
/// "dead_letter"}]`.
pub async fn list(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    let deliveries = state.deliveries.clone();
    let summaries = web::block(move || deliveries.summaries()).await?;
    Ok(HttpResponse::Ok().json(summaries))
}

#[derive(Deserialize)]
pub struct Page {
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /admin/destinations/{name}/dead?after=&limit=`: dead letters, oldest first, with why.
pub async fn dead(
    name: web::Path<String>,
    page: web::Query<Page>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let after = page.after;
    let deliveries = state.deliveries.clone();
    let name = name.into_inner();
    let found = web::block(move || deliveries.dead(&name, after, limit)).await?;
    let rows = found
        .ok_or_else(|| ApiError::NotFound("no destination has this name".into()))?
        .map_err(ApiError::Internal)?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|(seq, _)| *seq))
        .flatten();
    let dead: Vec<_> = rows
        .into_iter()
        .map(|(seq, d)| {
            let mut v = serde_json::to_value(d).expect("dead letters serialize");
            v["seq"] = seq.into();
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "dead": dead, "next": next })))
}

/// `POST /admin/destinations/{name}/replay`: every dead letter of the destination goes back to
/// delivery, once; answers `{"replayed": N}`.
pub async fn replay(
    name: web::Path<String>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    match state.deliveries.replay(&name).await {
        None => Err(ApiError::NotFound("no destination has this name".into())),
        Some(Err(e)) => Err(ApiError::Internal(e)),
        Some(Ok(n)) => Ok(HttpResponse::Ok().json(json!({ "replayed": n }))),
    }
}
