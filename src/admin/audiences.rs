//! `/admin/profiles/{id}`, `/admin/segments` and `/admin/segments/{key}/members`: reads of the
//! profile store as of its last save, through [`Audiences`]; they never wait on the profile stage.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{AdminState, Audiences};
use crate::http::ApiError;
use crate::profiles::profile::{Millis, Profile};

fn time(ms: Millis) -> Value {
    chrono::DateTime::from_timestamp_millis(ms)
        .map_or(Value::Null, |t| crate::vocabulary::format_time(t).into())
}

/// The contract's shape of a profile.
pub fn profile_json(p: &Profile) -> Value {
    let mut identities: Vec<Value> = Vec::new();
    if let Some(u) = &p.user_id {
        identities.push(json!({"type": "userId", "id": u}));
    }
    for a in &p.anonymous_ids {
        identities.push(json!({"type": "anonymousId", "id": a}));
    }
    let events: Map<String, Value> = p
        .events
        .iter()
        .map(|(name, s)| {
            (
                name.to_string(),
                json!({"count": s.count, "first": time(s.first), "last": time(s.last)}),
            )
        })
        .collect();
    json!({
        "identities": identities,
        "traits": p.traits,
        "segments": p.segments().collect::<Vec<_>>(),
        "events": events,
        "first_seen": time(p.first_seen),
        "last_seen": time(p.last_seen),
    })
}

/// `GET /admin/profiles/{id}`: `id` is any identifier (a userId first, then an anonymousId).
pub async fn profile(
    id: web::Path<String>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let audiences = state.audiences.clone();
    let found = web::block(move || audiences.profile(&id)).await??;
    match found {
        Some(p) => Ok(HttpResponse::Ok().json(profile_json(&p))),
        None => Err(ApiError::NotFound("no profile has this identifier".into())),
    }
}

/// `GET /admin/segments`: every loaded segment with its size, last change and rule errors.
pub async fn segments(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    let audiences = state.audiences.clone();
    let segments = web::block(move || audiences.segments()).await??;
    let rows: Vec<Value> = segments
        .into_iter()
        .map(|s| {
            json!({
                "key": s.key,
                "name": s.name,
                "description": s.description,
                "destinations": s.destinations,
                "size": s.size,
                "last_change": s.last_change.map_or(Value::Null, time),
                "errors": s.errors,
                "last_error": s.last_error,
                "backfilled": s.backfilled,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(rows))
}

#[derive(Deserialize)]
pub struct Page {
    /// The `next` of the previous page.
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /admin/segments/{key}/members?after=&limit=`: members in profile order,
/// `{"members": [{"id", "userId", "anonymousIds"}], "next": cursor or null}`.
pub async fn members(
    key: web::Path<String>,
    page: web::Query<Page>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, ApiError> {
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let after = page.after;
    let audiences: std::sync::Arc<dyn Audiences> = state.audiences.clone();
    let key = key.into_inner();
    let page = {
        let key = key.clone();
        web::block(move || audiences.members(&key, after, limit)).await??
    };
    let Some((profiles, next)) = page else {
        return Err(ApiError::NotFound(format!("no segment `{key}` is loaded")));
    };
    let members: Vec<Value> = profiles
        .iter()
        .map(|p| json!({"id": p.id, "userId": p.user_id, "anonymousIds": p.anonymous_ids}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"members": members, "next": next})))
}
