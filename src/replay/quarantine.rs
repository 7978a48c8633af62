//! Re-admitting quarantined messages once the tracking plan lets them through.
//!
//! The candidates are the quarantine's rows that the plan blocked (reasons `schema:` and
//! `unplanned:`; a message that broke the field rules stays where it is) and that are not in
//! `events` already. Each was quarantined as enriched, so it is checked against the registry in
//! force now and, if it passes, appended to the intake log as accepted with its original
//! `messageId`, `receivedAt` and timestamps: from there it reaches the lake like any message.
//!
//! Exactly once: the lake is consulted (a message in `events` is not a candidate), and the append
//! is the log's idempotent one, keyed by the message's [`readmission_key`]: within the dedup
//! window a message is let in once, also before the lake has flushed it and across restarts once
//! the dedup has checkpointed. (A message let in before, blocked again by a plan changed since, and
//! not flushed yet, counts as still blocked.)

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::TimestampMicrosecondType;
use datafusion::common::ScalarValue;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::{Config, Unplanned};
use crate::entry::{Entry, Status};
use crate::ingest::plan::Policy;
use crate::intake_log::{readmission_key, AppendError, Appender, RecordBatch};
use crate::query::{QueryEngine, QueryError};
use crate::schema::{Live, Verdict};
use crate::vocabulary::MessageType;

/// Which quarantined messages to try.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReplayRequest {
    /// Only this event (track) or name (page/screen).
    pub event: Option<String>,
    /// Only messages received at or after this time (RFC 3339).
    pub since: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Quarantined by the plan, matching the request, not yet in `events`.
    pub candidates: usize,
    pub readmitted: usize,
    /// Still invalid or unplanned under the plan in force.
    pub still_blocked: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the quarantine: {0}")]
    Query(#[from] QueryError),
    #[error("`since`: `{0}` is not an RFC 3339 time")]
    Since(String),
    #[error("{0}")]
    Append(#[from] AppendError),
}

pub struct Replayer {
    engine: QueryEngine,
    log: Arc<Appender>,
    plan: Arc<Live>,
    sources: Vec<(String, Policy)>,
}

/// The parts of a stored message the plan looks at.
#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(rename = "type")]
    kind: String,
    event: Option<String>,
    name: Option<String>,
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
    #[serde(borrow)]
    traits: Option<&'a RawValue>,
}

impl Replayer {
    pub fn new(config: &Config, engine: QueryEngine, log: Arc<Appender>, plan: Arc<Live>) -> Self {
        let sources = config
            .sources
            .iter()
            .map(|s| {
                let policy = Policy {
                    unplanned: s.unplanned.unwrap_or(config.schemas.unplanned),
                    violations: s.violations.unwrap_or(config.schemas.violations),
                };
                (s.name.clone(), policy)
            })
            .collect();
        Replayer {
            engine,
            log,
            plan,
            sources,
        }
    }

    pub async fn replay(&self, request: &ReplayRequest) -> Result<ReplayReport, ReplayError> {
        let mut sql = String::from(
            "SELECT q.source, q.message_id, q.received_at, q.raw FROM quarantine q \
             WHERE (q.reason LIKE 'schema:%' OR q.reason LIKE 'unplanned:%') AND q.message_id IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM events e WHERE e.message_id = q.message_id AND e.source = q.source)",
        );
        let mut params = Vec::new();
        if let Some(event) = &request.event {
            params.push(ScalarValue::from(event.as_str()));
            sql.push_str(&format!(" AND q.event = ${}", params.len()));
        }
        if let Some(since) = &request.since {
            let t = crate::vocabulary::parse_time(since)
                .ok_or_else(|| ReplayError::Since(since.clone()))?;
            params.push(ScalarValue::TimestampMicrosecond(
                Some(t.timestamp_micros()),
                Some("UTC".into()),
            ));
            sql.push_str(&format!(" AND q.received_at >= ${}", params.len()));
        }
        sql.push_str(" ORDER BY q.received_at");
        let rows = self.engine.sql_with_params(&sql, params).await?;

        // The messages that pass the plan now, once each.
        let snapshot = self.plan.snapshot();
        let mut report = ReplayReport::default();
        let mut passing = Vec::new();
        let mut keys = Vec::new();
        for batch in &rows.batches {
            let source = batch.column(0).as_string::<i32>();
            let message_id = batch.column(1).as_string::<i32>();
            let received_at = batch.column(2).as_primitive::<TimestampMicrosecondType>();
            let raw = batch.column(3).as_string::<i32>();
            for i in 0..batch.num_rows() {
                let key = Some(readmission_key(source.value(i), message_id.value(i)));
                if keys.contains(&key) {
                    continue;
                }
                let policy = self
                    .sources
                    .iter()
                    .find(|(name, _)| name == source.value(i))
                    .map(|(_, p)| *p);
                if !passes(&snapshot.registry, policy, raw.value(i)) {
                    report.candidates += 1;
                    report.still_blocked += 1;
                    continue;
                }
                let at = chrono::DateTime::from_timestamp_micros(if received_at.is_null(i) {
                    0
                } else {
                    received_at.value(i)
                })
                .unwrap_or_default();
                let (source, message_id, raw) =
                    (source.value(i), message_id.value(i), raw.value(i));
                passing.push((at, source, message_id, raw));
                keys.push(key);
            }
        }
        // Those not let in already, appended as accepted.
        let pending = self.log.begin(&keys).await;
        let mut records = RecordBatch::default();
        for ((at, source, message_id, raw), _) in passing
            .iter()
            .zip(pending.duplicates())
            .filter(|(_, &dup)| !dup)
        {
            records.push_with(|out| {
                Entry::encode(out, Status::Accepted, *at, source, message_id, "", |out| {
                    out.extend_from_slice(raw.as_bytes())
                })
            });
        }
        report.readmitted = records.len() as usize;
        report.candidates += report.readmitted;
        pending.finish(records, chrono::Utc::now()).await?;
        tracing::info!(?request, ?report, "quarantine replay");
        Ok(report)
    }
}

/// Whether a quarantined (enriched) message passes the plan now: valid against its schema, or
/// unplanned where its source now allows that.
fn passes(registry: &crate::schema::Registry, policy: Option<Policy>, raw: &str) -> bool {
    let Ok(stored) = serde_json::from_str::<Stored>(raw) else {
        return false;
    };
    let Some(kind) = MessageType::parse(&stored.kind) else {
        return false;
    };
    let (name, payload) = match kind {
        MessageType::Track => (stored.event.as_deref(), stored.properties),
        MessageType::Page | MessageType::Screen => (stored.name.as_deref(), stored.properties),
        MessageType::Identify | MessageType::Group => (None, stored.traits),
        MessageType::Alias => return true,
    };
    let payload: Value = payload
        .and_then(|p| serde_json::from_str(p.get()).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    match registry.check(kind, name, &payload) {
        Verdict::Valid => true,
        Verdict::Invalid(_) => false,
        Verdict::Unplanned => policy.is_some_and(|p| p.unplanned == Unplanned::Allow),
    }
}
