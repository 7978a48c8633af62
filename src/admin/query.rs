//! `POST /admin/query`: SQL over the lake, streamed as JSON rows.

use actix_web::{web, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::AdminState;
use crate::http::ApiError;
use crate::query::{self, QueryError};

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
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let slot = state
        .query_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy("too many queries are running; try again shortly"))?;
    let engine = state.lake.clone();
    let sql = body.into_inner().sql;
    let max_rows = state.query_limits.max_rows;
    let max_bytes = state.query_limits.max_result_bytes as usize;
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
