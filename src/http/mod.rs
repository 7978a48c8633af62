//! The HTTP edge: Segment's tracking API, analytics.js settings, CORS, and the operations
//! endpoints. It reads requests and writes answers; what a body means and where it goes is the
//! ingest stage's job (`crate::ingest`), and `error` is the one place errors become statuses, for
//! this edge and for the admin API (`crate::admin`) alike.

mod body;
mod error;
mod ops;
mod settings;
mod tracking;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix_web::http::{header, Method};
use actix_web::middleware::DefaultHeaders;
use actix_web::{web, HttpRequest, HttpResponse};
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::ingest::{Ingest, Shape};
use crate::intake_log::dedup::Dedup;
use crate::intake_log::IntakeLog;
use crate::metrics::{Metrics, RequestLabels, Route, RouteLabels};
use crate::vocabulary::MessageType;
pub(crate) use body::gunzip;
pub use error::ApiError;

/// What the handlers share.
pub struct AppState {
    pub config: Arc<Config>,
    pub ingest: Arc<Ingest>,
    pub log: Arc<IntakeLog>,
    pub dedup: Arc<Dedup>,
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
    pub shutting_down: AtomicBool,
    /// The log's consumers and how they fare.
    pub stages: Arc<crate::supervisor::Stages>,
}

impl AppState {
    fn observe(&self, route: Route, status: u16, started: Instant) {
        let m = &self.metrics.ingest;
        m.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        m.request_seconds
            .get_or_create(&RouteLabels { route })
            .observe(started.elapsed().as_secs_f64());
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Every path the Segment SDKs post to: the documented ones, analytics.js's one-letter aliases
/// (`/v1/t`, ...), and the `/v1/b` batch path that analytics.js and the mobile SDKs use.
const TRACKING_PATHS: &[(&[&str], Shape, Route)] = &[
    (
        &["/v1/track", "/v1/t"],
        Shape::Single(MessageType::Track),
        Route::Track,
    ),
    (
        &["/v1/identify", "/v1/i"],
        Shape::Single(MessageType::Identify),
        Route::Identify,
    ),
    (
        &["/v1/page", "/v1/p"],
        Shape::Single(MessageType::Page),
        Route::Page,
    ),
    (
        &["/v1/screen", "/v1/s"],
        Shape::Single(MessageType::Screen),
        Route::Screen,
    ),
    (
        &["/v1/group", "/v1/g"],
        Shape::Single(MessageType::Group),
        Route::Group,
    ),
    (
        &["/v1/alias", "/v1/a"],
        Shape::Single(MessageType::Alias),
        Route::Alias,
    ),
    (
        &["/v1/batch", "/v1/import", "/v1/b"],
        Shape::Batch,
        Route::Batch,
    ),
];

/// Adds the tracking edge's routes and the operations endpoints to an actix-web app (the admin
/// API is `crate::admin::routes`), with a fallback answer for any other path.
pub fn routes(cfg: &mut web::ServiceConfig) {
    for (paths, shape, route) in TRACKING_PATHS {
        let (shape, route) = (*shape, *route);
        cfg.service(
            web::resource(paths.to_vec())
                .route(web::post().to(move |req, payload, state| {
                    tracking::receive(req, payload, state, shape, route)
                }))
                .route(web::method(Method::OPTIONS).to(preflight)),
        );
    }
    cfg.service(
        web::resource("/v1/m")
            .route(web::post().to(tracking::client_metrics))
            .route(web::method(Method::OPTIONS).to(preflight)),
    )
    .service(
        web::resource("/v1/projects/{write_key}/settings")
            .route(web::get().to(settings::project_settings))
            .route(web::method(Method::OPTIONS).to(preflight)),
    )
    .route("/healthz", web::get().to(ops::healthz))
    .route("/readyz", web::get().to(ops::readyz))
    .route("/metrics", web::get().to(ops::metrics))
    .default_service(web::to(fallback));
}

/// Headers on every answer, so that browsers let pages on any origin read them.
pub fn cors_headers() -> DefaultHeaders {
    DefaultHeaders::new().add((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
}

/// The answer to a CORS preflight: any origin may post with the headers it asks for.
async fn preflight(req: HttpRequest) -> HttpResponse {
    let asked = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Content-Type, Authorization, Content-Encoding")
        .to_string();
    HttpResponse::NoContent()
        .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, asked))
        .insert_header((header::ACCESS_CONTROL_MAX_AGE, "86400"))
        .finish()
}

async fn fallback(req: HttpRequest) -> HttpResponse {
    if req.method() == Method::OPTIONS {
        return preflight(req).await;
    }
    HttpResponse::NotFound().json(serde_json::json!({
        "success": false,
        "error": format!("no such endpoint: {} {}", req.method(), req.path()),
    }))
}
