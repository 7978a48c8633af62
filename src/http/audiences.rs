//! `/admin/profiles/{id}`, `/admin/segments` and `/admin/segments/{key}/members`: reads of the
//! profile store, behind the admin token. They read the store's last committed batch and never
//! wait on the profile stage.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::AppState;
use crate::profiles::profile::{anonymous_key, user_key, Millis, Profile};
use crate::profiles::store::StoreError;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

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
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let store = state.profiles.clone();
    let found = web::block(move || -> Result<Option<Profile>, StoreError> {
        let r = store.read()?;
        let pid = match r.lookup(&user_key(&id))? {
            Some(pid) => Some(pid),
            None => r.lookup(&anonymous_key(&id))?,
        };
        match pid {
            Some(pid) => r.profile(pid),
            None => Ok(None),
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    match found {
        Some(p) => Ok(HttpResponse::Ok().json(profile_json(&p))),
        None => Err(ApiError::NotFound("no profile has this identifier".into())),
    }
}

/// `GET /admin/segments`: every loaded segment with its size, last change and rule errors.
pub async fn segments(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let set = state.segments.current();
    let store = state.profiles.clone();
    let rows = web::block(move || -> Result<Vec<Value>, StoreError> {
        let r = store.read()?;
        set.segments
            .iter()
            .map(|s| {
                let stats = r.segment_stats(&s.key)?;
                let errors = s.health.errors.load(std::sync::atomic::Ordering::Relaxed);
                Ok(json!({
                    "key": s.key,
                    "name": s.name,
                    "description": s.description,
                    "destinations": s.destinations,
                    "size": stats.size,
                    "last_change": stats.last_change.map_or(Value::Null, time),
                    "errors": errors,
                    "last_error": *s.health.last_error.lock().unwrap(),
                    "backfilled": stats.backfilled == Some(s.fingerprint),
                }))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
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
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let key = key.into_inner();
    if state.segments.current().position(&key).is_none() {
        return Err(ApiError::NotFound(format!("no segment `{key}` is loaded")));
    }
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    let after = page.after;
    let store = state.profiles.clone();
    let body = web::block(move || -> Result<Value, StoreError> {
        let r = store.read()?;
        let ids = r.members(&key, after, limit)?;
        let mut members = Vec::new();
        for id in &ids {
            if let Some(p) = r.profile(*id)? {
                members
                    .push(json!({"id": id, "userId": p.user_id, "anonymousIds": p.anonymous_ids}));
            }
        }
        let next = (ids.len() == limit).then(|| ids.last().copied()).flatten();
        Ok(json!({"members": members, "next": next}))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(body))
}
