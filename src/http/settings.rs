//! `GET /v1/projects/{writeKey}/settings`: what analytics.js (`@segment/analytics-next`) loads
//! before it sends anything. The answer points its Segment.io destination back at this server, with
//! no device-mode destinations, so a page works with nothing hosted elsewhere.

use actix_web::http::header;
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
    // Where analytics.js will post: `server.public_url` when set (the answer is then the same for
    // every request and may be cached by anyone), else the request's own Host (never a forwarded
    // host header: those are not part of a shared cache's key, so one forged request could point
    // every visitor's browser elsewhere), and then only the browser may keep the answer.
    let (api_host, protocol, cache) = match &state.config.server.public_url {
        Some(url) => {
            let mut host = url.host_str().unwrap_or_default().to_string();
            if let Some(port) = url.port() {
                host.push_str(&format!(":{port}"));
            }
            let path = url.path().trim_end_matches('/');
            (
                format!("{host}{path}/v1"),
                url.scheme().to_string(),
                "public, max-age=60",
            )
        }
        None => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| valid_host(h))
                .map_or_else(|| state.config.server.listen.to_string(), str::to_string);
            (
                format!("{host}/v1"),
                "http".to_string(),
                "private, max-age=60",
            )
        }
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, cache))
        .json(json!({
            "integrations": {
                "Segment.io": {
                    "apiKey": write_key.as_str(),
                    "apiHost": api_host,
                    "protocol": protocol,
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

/// A Host header worth echoing: a name or address with an optional port, nothing else.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}
