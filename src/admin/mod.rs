//! `/admin/*`: the operator's API, behind `Authorization: Bearer <server.admin_token>`. With no
//! token configured, the admin API does not exist (404). The token is checked by [`guard`], which
//! wraps the whole scope, before a handler reads anything of the request's body.
//!
//! It stands apart from the tracking edge (`crate::http`, whose error answers it shares): its
//! handlers see [`AdminState`], which holds the lake's query engine, the plan and the replayer,
//! and reaches profiles, segments and destinations only through the narrow traits below
//! ([`Audiences`], [`Deliveries`]), which the wiring implements over the running stages.

mod audiences;
mod destinations;
mod plan;
mod query;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest};
use std::sync::Arc;

use crate::config::QueryConfig;
use crate::destinations::queue::Dead;
use crate::destinations::Summary;
use crate::http::ApiError;
use crate::metrics::SchemaMetrics;
use crate::profiles::Profile;
use crate::query::QueryEngine;
use crate::replay::Replayer;
use crate::schema::Live;

/// The admin token of the shipped demo config (`sluice.toml`); the server warns when it is in use.
pub const DEMO_TOKEN: &str = "demo-admin-token";

/// What the admin handlers share.
pub struct AdminState {
    /// `server.admin_token`; `None` turns the admin API off.
    pub token: Option<String>,
    pub query_limits: QueryConfig,
    pub lake: QueryEngine,
    /// Where admin queries and replays run, away from the HTTP workers.
    pub query_runtime: tokio::runtime::Handle,
    /// Admin queries allowed to run at once.
    pub query_slots: Arc<tokio::sync::Semaphore>,
    /// The tracking plan in force, and what it counted.
    pub plan: Arc<Live>,
    pub plan_metrics: Arc<SchemaMetrics>,
    pub replayer: Arc<Replayer>,
    pub audiences: Arc<dyn Audiences>,
    pub deliveries: Arc<dyn Deliveries>,
}

/// Profiles and segments as the admin API reads them: the profile store as of its last save, and
/// the segments in force. Blocking calls (the handlers run them off the HTTP workers).
pub trait Audiences: Send + Sync {
    /// The profile one of whose identifiers is `id`: a userId first, then an anonymousId.
    fn profile(&self, id: &str) -> Result<Option<Profile>, String>;
    /// Every loaded segment.
    fn segments(&self) -> Result<Vec<SegmentSummary>, String>;
    /// A page of a segment's members in profile order, after the profile id `after`, with the
    /// `after` of the next page (`None` at the end); `None` when no segment `key` is loaded.
    fn members(
        &self,
        key: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Option<Members>, String>;
}

/// A page of members, and where the next page starts.
pub type Members = (Vec<Profile>, Option<u64>);

/// One loaded segment as `GET /admin/segments` shows it.
pub struct SegmentSummary {
    pub key: String,
    pub name: String,
    pub description: String,
    pub destinations: Vec<String>,
    pub size: u64,
    pub last_change: Option<crate::profiles::profile::Millis>,
    pub errors: u64,
    pub last_error: Option<String>,
    /// Whether its backfill for the rule in force has finished.
    pub backfilled: bool,
}

/// The destinations as the admin API sees and steers them.
#[async_trait::async_trait]
pub trait Deliveries: Send + Sync {
    fn summaries(&self) -> Vec<Summary>;
    /// A page of a destination's dead letter with each entry's sequence number; `None` when no
    /// destination has this name. Blocking.
    fn dead(
        &self,
        name: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Option<Result<Vec<(u64, Dead)>, String>>;
    /// Sends a destination's dead letter back to delivery; how many went.
    async fn replay(&self, name: &str) -> Option<Result<usize, String>>;
}

/// Lets the request on to the admin handler when it carries the admin token; answers it
/// otherwise, without reading its body.
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<AdminState>>()
        .expect("the app holds its state");
    if let Err(e) = authorize(req.request(), state) {
        return Ok(req.error_response(e).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

fn authorize(req: &HttpRequest, state: &AdminState) -> Result<(), ApiError> {
    let Some(token) = state.token.as_deref() else {
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

/// Adds the `/admin` scope to an actix-web app; the app holds a `web::Data<AdminState>`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/admin")
            .wrap(actix_web::middleware::from_fn(guard))
            .service(
                web::resource("/query")
                    .app_data(
                        web::JsonConfig::default()
                            .limit(1 << 20)
                            .content_type_required(false)
                            .error_handler(|e, _| {
                                ApiError::BadRequest(format!("expected {{\"sql\": \"...\"}}: {e}"))
                                    .into()
                            }),
                    )
                    .route(web::post().to(query::query)),
            )
            .route("/schemas", web::get().to(plan::schemas))
            .route("/schemas/validate", web::post().to(plan::validate))
            .route(
                "/replay/quarantine",
                web::post().to(plan::replay_quarantine),
            )
            .route("/profiles/{id}", web::get().to(audiences::profile))
            .route("/segments", web::get().to(audiences::segments))
            .route("/segments/{key}/members", web::get().to(audiences::members))
            .route("/destinations", web::get().to(destinations::list))
            .route(
                "/destinations/{name}/dead",
                web::get().to(destinations::dead),
            )
            .route(
                "/destinations/{name}/replay",
                web::post().to(destinations::replay),
            ),
    );
}
