//! The one place where errors become HTTP answers. Every error body is
//! `{"success":false,"error":"..."}`, with the per-message detail when there is one.

use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::ingest::{IngestError, Limit, Report};
use crate::intake_log::AppendError;
use crate::query::QueryError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{}", .0.describe())]
    TooLarge(Limit),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(&'static str),
    #[error("the request body did not arrive within {0:?}")]
    SlowBody(Duration),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A handler's blocking task that did not finish (it panicked, or the runtime is going away).
impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// What the admin API's stores and queues report as text: a failure of Sluice's own.
impl From<String> for ApiError {
    fn from(e: String) -> Self {
        ApiError::Internal(e)
    }
}

/// How long a client should wait after a 503: long enough for a stalled disk or a draining log.
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Query(e) => match e {
                QueryError::Invalid(_) => StatusCode::BAD_REQUEST,
                QueryError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
                QueryError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            },
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Ingest(e) => match e {
                IngestError::Malformed(_) | IngestError::AllRejected(_) => StatusCode::BAD_REQUEST,
                IngestError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
                IngestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                IngestError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        let mut body = json!({ "success": false, "error": self.to_string() });
        match self {
            ApiError::Ingest(IngestError::AllRejected(report)) => {
                body["accepted"] = report.accepted.into();
                body["rejected"] = serde_json::to_value(&report.rejected).unwrap_or_default();
            }
            ApiError::Ingest(IngestError::RateLimited { retry_after, .. }) => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                response.insert_header((header::RETRY_AFTER, secs));
                // analytics.js reads this one.
                response.insert_header(("X-RateLimit-Reset", secs));
            }
            ApiError::Busy(_) => {
                response.insert_header((header::RETRY_AFTER, 1));
            }
            ApiError::Ingest(IngestError::Unavailable(e)) => {
                response.insert_header((header::RETRY_AFTER, UNAVAILABLE_RETRY_AFTER.as_secs()));
                if let AppendError::Failed = e {
                    tracing::error!("refusing messages: the intake log needs a restart");
                }
            }
            _ => {}
        }
        response.json(body)
    }
}

/// The answer to a request whose messages were all durably handled.
pub fn accepted(report: &Report) -> HttpResponse {
    if report.rejected.is_empty() {
        HttpResponse::Ok().json(json!({ "success": true }))
    } else {
        HttpResponse::Ok().json(json!({
            "success": true,
            "accepted": report.accepted,
            "rejected": report.rejected,
        }))
    }
}
