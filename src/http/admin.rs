//! `/admin/*`: the operator's API, behind `Authorization: Bearer <server.admin_token>`. With no
//! token configured, the admin API does not exist (404).

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::query;

/// Lets the request through when it carries the admin token.
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
