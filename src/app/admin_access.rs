//! The admin API's narrow traits ([`crate::admin::Audiences`], [`crate::admin::Deliveries`])
//! implemented over the running stages: the wiring is the one place that knows both sides.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::admin::{Audiences, Deliveries, Members, SegmentSummary};
use crate::destinations::queue::Dead;
use crate::destinations::{Destinations, Summary};
use crate::profile_stage::LiveSegments;
use crate::profiles::profile::{anonymous_key, user_key};
use crate::profiles::{Profile, ProfileStore};

/// The profile store (as of its last save) and the segments in force.
pub struct StoreAudiences {
    pub store: Arc<ProfileStore>,
    pub segments: Arc<LiveSegments>,
}

impl Audiences for StoreAudiences {
    fn profile(&self, id: &str) -> Result<Option<Profile>, String> {
        let read = self.store.read().map_err(|e| e.to_string())?;
        let found = match read.lookup(&user_key(id)).map_err(|e| e.to_string())? {
            Some(pid) => Some(pid),
            None => read.lookup(&anonymous_key(id)).map_err(|e| e.to_string())?,
        };
        match found {
            Some(pid) => read.profile(pid).map_err(|e| e.to_string()),
            None => Ok(None),
        }
    }

    fn segments(&self) -> Result<Vec<SegmentSummary>, String> {
        let set = self.segments.current();
        let read = self.store.read().map_err(|e| e.to_string())?;
        set.segments
            .iter()
            .map(|s| {
                let stats = read.segment_stats(&s.key).map_err(|e| e.to_string())?;
                Ok(SegmentSummary {
                    key: s.key.clone(),
                    name: s.name.clone(),
                    description: s.description.clone(),
                    destinations: s.destinations.clone(),
                    size: stats.size,
                    last_change: stats.last_change,
                    errors: s.health.errors.load(Ordering::Relaxed),
                    last_error: s.health.last_error.lock().unwrap().clone(),
                    backfilled: stats.backfilled == Some(s.fingerprint),
                })
            })
            .collect()
    }

    fn members(
        &self,
        key: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Option<Members>, String> {
        if self.segments.current().position(key).is_none() {
            return Ok(None);
        }
        let read = self.store.read().map_err(|e| e.to_string())?;
        let ids = read.members(key, after, limit).map_err(|e| e.to_string())?;
        let mut profiles = Vec::with_capacity(ids.len());
        for id in &ids {
            // A member merged away since the page was listed is left out.
            if let Some(p) = read.profile(*id).map_err(|e| e.to_string())? {
                profiles.push(p);
            }
        }
        let next = (ids.len() == limit).then(|| ids.last().copied()).flatten();
        Ok(Some((profiles, next)))
    }
}

#[async_trait::async_trait]
impl Deliveries for Destinations {
    fn summaries(&self) -> Vec<Summary> {
        Destinations::summaries(self)
    }

    fn dead(
        &self,
        name: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Option<Result<Vec<(u64, Dead)>, String>> {
        Destinations::dead(self, name, after, limit)
    }

    async fn replay(&self, name: &str) -> Option<Result<usize, String>> {
        Destinations::replay(self, name).await
    }
}
