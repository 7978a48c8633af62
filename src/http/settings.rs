//! `GET /v1/projects/{writeKey}/settings`: what analytics.js (`@segment/analytics-next`) loads
//! before it sends anything. The answer points its Segment.io destination back at this server, with
//! no device-mode destinations, so a page works with nothing hosted elsewhere.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::AppState;

pub async fn project_settings(
    req: HttpRequest,
    write_key: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if state.config.source_by_write_key(&write_key).is_none() {
        return Err(ApiError::NotFound("unknown write key".into()));
    }
    let info = req.connection_info();
    let api_host = format!("{}/v1", info.host());
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "public, max-age=60"))
        .json(json!({
            "integrations": {
                "Segment.io": {
                    "apiKey": write_key.as_str(),
                    "apiHost": api_host,
                    "protocol": info.scheme(),
                    "unbundledIntegrations": [],
                    "addBundledMetadata": true,
                    "maybeBundledConfigIds": {},
                },
            },
            "plan": {
                "track": { "__default": { "enabled": true, "integrations": {} } },
                "identify": { "__default": { "enabled": true } },
                "group": { "__default": { "enabled": true } },
            },
            "edgeFunction": {},
            "analyticsNextEnabled": true,
            "middlewareSettings": {},
            "enabledMiddleware": {},
            "metrics": { "sampleRate": 0 },
            "legacyVideoPluginsEnabled": false,
            "remotePlugins": [],
        })))
}
