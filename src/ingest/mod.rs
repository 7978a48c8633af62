//! The ingest stage: turns one HTTP request body into durable intake-log records and a verdict.
//!
//! It owns the Segment contract that is not HTTP: the write key, the limits on messages and
//! batches, the field rules, rate limits and dedup. It reads the body it is given (already
//! decompressed and size-capped by the HTTP edge) and appends to the intake log; it knows nothing
//! of sockets, headers or status codes (`crate::http` maps [`IngestError`] to those).
//!
//! Rejected messages are not dropped: they go to the log marked rejected, with their reason, for
//! the quarantine. Nothing is acknowledged before the log has fsynced it.

pub mod bounds;
pub mod message;
pub mod plan;
pub mod rate_limit;
pub mod rules;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::clock::Clock;
use crate::config::{Config, SourceConfig};
use crate::entry::{Entry, Status};
use crate::intake_log::{message_key, AppendError, Appender, RecordBatch};
use crate::metrics::{IngestMetrics, MessageLabels, Outcome, SchemaMetrics};
use crate::schema::Live;
use crate::vocabulary::MessageType;
use message::RawMessage;
use plan::{Decision, Policy};
use rate_limit::RateLimits;
use rules::{BatchDefaults, SharedTime};

/// Segment's limits.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
pub const MAX_REQUEST_BYTES: usize = 500 * 1024;
pub const MAX_BATCH_MESSAGES: usize = 2500;
/// A batch's own `context` and `integrations`, together, as sent. They are merged into every
/// message, so they are bounded like a message.
pub const MAX_BATCH_CONTEXT_BYTES: usize = 32 * 1024;
/// What one request may add to the log, all its records together (messages as stored, with the
/// batch's context merged in and the server's fields; rejected ones with their reason). Merging
/// multiplies a batch's context by its messages: without this bound a 500 KB request could store
/// a gigabyte.
pub const MAX_STORED_REQUEST_BYTES: usize = 5 * 1024 * 1024;

/// What a record takes beyond [`Verdict::stored_len`], about: the frame and the entry's header, the
/// messageId again, and the keys and times the server writes into the message.
const RECORD_OVERHEAD_BYTES: usize = 384;

/// Which limit a request broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Message,
    Request,
    BatchCount,
    BatchContext,
    Stored,
}

impl Limit {
    pub fn describe(self) -> &'static str {
        match self {
            Limit::Message => "message exceeds the 32 KB limit per message",
            Limit::Request => "request exceeds the 500 KB limit per request (after decompression)",
            Limit::BatchCount => "batch exceeds the limit of 2500 messages per batch",
            Limit::BatchContext => {
                "the batch's own `context` and `integrations` exceed the 32 KB limit (together)"
            }
            Limit::Stored => {
                "request exceeds the 5 MB limit on what one request stores (its messages with the batch's `context` and `integrations` merged into each)"
            }
        }
    }
}

/// What the request was: one message of a type fixed by its path, or a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Single(MessageType),
    Batch,
}

/// One message that broke the field rules.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejection {
    pub index: usize,
    #[serde(rename = "messageId")]
    pub message_id: Option<String>,
    pub error: String,
}

/// The verdict on a request whose messages were looked at one by one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Durably accepted, duplicates included (they were accepted before).
    pub accepted: usize,
    pub rejected: Vec<Rejection>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("every message was rejected")]
    AllRejected(Report),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{}", .0.describe())]
    TooLarge(Limit),
    #[error("{message}")]
    RateLimited {
        retry_after: Duration,
        message: String,
    },
    #[error("{0}")]
    Unavailable(AppendError),
}

pub struct Ingest {
    sources: Vec<SourceConfig>,
    limits: RateLimits,
    log: Arc<Appender>,
    plan: Arc<Live>,
    default_policy: Policy,
    metrics: Arc<IngestMetrics>,
    schema_metrics: Arc<SchemaMetrics>,
    clock: Clock,
}

/// What the edge needs besides the config.
pub struct Parts {
    pub log: Arc<Appender>,
    pub plan: Arc<Live>,
    pub metrics: Arc<IngestMetrics>,
    pub schema_metrics: Arc<SchemaMetrics>,
    pub clock: Clock,
}

/// The parts of a batch body Sluice reads; the messages stay raw until each is checked.
#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
    #[serde(rename = "sentAt")]
    sent_at: Option<String>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    #[serde(borrow)]
    integrations: Option<&'a RawValue>,
}

/// A message on its way to the log.
enum Verdict<'a> {
    Accepted(Box<rules::Message<'a>>),
    /// Acknowledged, but quarantined by the tracking plan.
    Blocked(Box<rules::Message<'a>>, String),
    Rejected {
        raw: &'a [u8],
        message_id: Option<String>,
        reason: String,
    },
}

impl Verdict<'_> {
    /// About what its record will take in the log (the JSON fields, not the few the server adds).
    fn stored_len(&self) -> usize {
        match self {
            Verdict::Accepted(m) => m.stored_len(),
            Verdict::Blocked(m, reason) => m.stored_len() + reason.len(),
            Verdict::Rejected { raw, reason, .. } => raw.len() + reason.len(),
        }
    }
}

impl Ingest {
    pub fn new(config: &Config, parts: Parts) -> Self {
        Ingest {
            sources: config.sources.clone(),
            limits: RateLimits::new(&config.sources),
            log: parts.log,
            plan: parts.plan,
            default_policy: Policy {
                unplanned: config.schemas.unplanned,
                violations: config.schemas.violations,
            },
            metrics: parts.metrics,
            schema_metrics: parts.schema_metrics,
            clock: parts.clock,
        }
    }

    fn policy(&self, source: &SourceConfig) -> Policy {
        Policy {
            unplanned: source.unplanned.unwrap_or(self.default_policy.unplanned),
            violations: source.violations.unwrap_or(self.default_policy.violations),
        }
    }

    fn source(&self, key: Option<&str>) -> Result<&SourceConfig, IngestError> {
        let key = key
            .filter(|k| !k.is_empty())
            .ok_or(IngestError::Unauthorized("missing write key"))?;
        self.sources
            .iter()
            .find(|s| s.write_key == key)
            .ok_or(IngestError::Unauthorized("unknown write key"))
    }

    /// Checks, stores and answers one request. `basic_key` is the write key from HTTP Basic auth.
    pub async fn handle(
        &self,
        shape: Shape,
        body: &[u8],
        basic_key: Option<&str>,
    ) -> Result<Report, IngestError> {
        let received_at = (self.clock)();
        let request = self.read(shape, body, basic_key)?;
        let source = request.source;
        let count = |outcome: Outcome, n: usize| {
            if n > 0 {
                let labels = MessageLabels {
                    source: source.name.clone(),
                    outcome,
                };
                self.metrics
                    .messages
                    .get_or_create(&labels)
                    .inc_by(n as u64);
            }
        };
        if let Err(e) = self.check_rate(source, request.messages.len()) {
            count(Outcome::RateLimited, request.messages.len());
            return Err(e);
        }

        let path_type = match shape {
            Shape::Single(t) => Some(t),
            Shape::Batch => None,
        };
        // One registry for the whole request, even if a reload swaps it meanwhile.
        let snapshot = self.plan.snapshot();
        let policy = self.policy(source);
        let mut verdicts: Vec<Verdict> = Vec::with_capacity(request.messages.len());
        // Bounded as it grows: merging the batch's context is what could make it large.
        let mut stored = 0;
        for raw in &request.messages {
            let verdict = match check(raw, path_type, &request.defaults, received_at) {
                Verdict::Accepted(m) => {
                    match plan::enforce(m, &snapshot.registry, policy, &self.schema_metrics) {
                        Decision::Store(m) => Verdict::Accepted(m),
                        Decision::Block(m, reason) => Verdict::Blocked(m, reason),
                    }
                }
                other => other,
            };
            stored += verdict.stored_len();
            if stored > MAX_STORED_REQUEST_BYTES {
                return Err(IngestError::TooLarge(Limit::Stored));
            }
            verdicts.push(verdict);
        }
        let keys: Vec<Option<u128>> = verdicts
            .iter()
            .map(|v| match v {
                Verdict::Accepted(m) | Verdict::Blocked(m, _) if !m.message_id_generated => {
                    Some(message_key(&source.name, &m.message_id))
                }
                _ => None,
            })
            .collect();
        let pending = self.log.begin(&keys).await;

        // The times every message carries, formatted once.
        let shared: Vec<SharedTime> = std::iter::once(received_at)
            .chain(request.defaults.sent_at)
            .map(SharedTime::new)
            .collect();
        // Sized once: growing it would copy every record written so far.
        let per_record = RECORD_OVERHEAD_BYTES + source.name.len();
        let mut records = RecordBatch::with_capacity(stored + verdicts.len() * per_record);
        let mut report = Report::default();
        let mut duplicates = 0;
        let mut blocked = 0;
        for (index, (verdict, &dup)) in verdicts.into_iter().zip(pending.duplicates()).enumerate() {
            match verdict {
                Verdict::Accepted(_) | Verdict::Blocked(..) if dup => duplicates += 1,
                Verdict::Blocked(m, reason) => {
                    // Quarantined as enriched, so that a replay can admit it as it was received.
                    records.push_with(|out| {
                        let id = &m.message_id;
                        Entry::encode(
                            out,
                            Status::Rejected,
                            received_at,
                            &source.name,
                            id,
                            &reason,
                            |out| m.write_json(out, &shared),
                        )
                    });
                    blocked += 1;
                }
                Verdict::Accepted(m) => {
                    records.push_with(|out| {
                        let id = &m.message_id;
                        Entry::encode(
                            out,
                            Status::Accepted,
                            received_at,
                            &source.name,
                            id,
                            "",
                            |out| m.write_json(out, &shared),
                        )
                    });
                    report.accepted += 1;
                }
                Verdict::Rejected {
                    raw,
                    message_id,
                    reason,
                } => {
                    records.push_with(|out| {
                        let id = message_id.as_deref().unwrap_or("");
                        Entry::encode(
                            out,
                            Status::Rejected,
                            received_at,
                            &source.name,
                            id,
                            &reason,
                            |out| out.extend_from_slice(raw),
                        )
                    });
                    report.rejected.push(Rejection {
                        index,
                        message_id,
                        error: reason,
                    });
                }
            }
        }

        // The estimate above leaves out the keys and timestamps the server writes: the records
        // themselves are held to the limit.
        if records.byte_len() > MAX_STORED_REQUEST_BYTES {
            return Err(IngestError::TooLarge(Limit::Stored));
        }
        if let Err(e) = pending.finish(records, received_at).await {
            count(Outcome::Unavailable, request.messages.len());
            return Err(IngestError::Unavailable(e));
        }
        count(Outcome::Accepted, report.accepted);
        count(Outcome::Blocked, blocked);
        count(Outcome::Duplicate, duplicates);
        count(Outcome::Rejected, report.rejected.len());

        // A message the plan blocked was still received as the client meant: not an error.
        report.accepted += duplicates + blocked;
        if report.accepted == 0 && !report.rejected.is_empty() {
            return Err(IngestError::AllRejected(report));
        }
        Ok(report)
    }

    /// Parses the envelope (one message, or a batch with its shared fields), finds the source and
    /// applies the request-level limits. The messages stay raw.
    fn read<'b>(
        &self,
        shape: Shape,
        body: &'b [u8],
        basic_key: Option<&str>,
    ) -> Result<Request<'_, 'b>, IngestError> {
        let malformed = |e: serde_json::Error| IngestError::Malformed(e.to_string());
        match shape {
            Shape::Single(_) => {
                if body.len() > MAX_MESSAGE_BYTES {
                    return Err(IngestError::TooLarge(Limit::Message));
                }
                let raw: &RawValue = serde_json::from_slice(body).map_err(malformed)?;
                let body_key = match basic_key {
                    None => peek(raw).write_key,
                    Some(_) => None,
                };
                Ok(Request {
                    source: self.source(basic_key.or(body_key.as_deref()))?,
                    defaults: BatchDefaults::default(),
                    messages: vec![raw],
                })
            }
            Shape::Batch => {
                let parsed: BatchBody = serde_json::from_slice(body).map_err(malformed)?;
                let source = self.source(basic_key.or(parsed.write_key.as_deref()))?;
                let messages = parsed
                    .batch
                    .ok_or_else(|| IngestError::Malformed("`batch` is missing".into()))?;
                if messages.len() > MAX_BATCH_MESSAGES {
                    return Err(IngestError::TooLarge(Limit::BatchCount));
                }
                let shared = [parsed.context, parsed.integrations];
                let shared_bytes: usize = shared.iter().flatten().map(|v| v.get().len()).sum();
                if shared_bytes > MAX_BATCH_CONTEXT_BYTES {
                    return Err(IngestError::TooLarge(Limit::BatchContext));
                }
                Ok(Request {
                    source,
                    defaults: BatchDefaults {
                        sent_at: parsed
                            .sent_at
                            .as_deref()
                            .and_then(crate::vocabulary::parse_time),
                        context: batch_object(parsed.context, "context")?,
                        integrations: batch_object(parsed.integrations, "integrations")?,
                    },
                    messages,
                })
            }
        }
    }

    fn check_rate(&self, source: &SourceConfig, messages: usize) -> Result<(), IngestError> {
        self.limits.check(&source.name, messages).map_err(|over| {
            let message = if over.larger_than_burst {
                format!("{messages} messages is more than this source's rate limit allows at once")
            } else {
                "rate limit exceeded for this source".to_string()
            };
            IngestError::RateLimited {
                retry_after: over.retry_after,
                message,
            }
        })
    }
}

/// A batch-level `context` or `integrations`: an object, or absent.
fn batch_object(
    raw: Option<&RawValue>,
    field: &str,
) -> Result<Option<Map<String, Value>>, IngestError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    // Merged into every message: within the bounds a message must keep.
    bounds::check(raw.get().as_bytes(), 1)
        .map_err(|reason| IngestError::Malformed(format!("the batch's `{field}`: {reason}")))?;
    serde_json::from_str::<Option<Map<String, Value>>>(raw.get())
        .map_err(|_| IngestError::Malformed(format!("the batch's `{field}` must be an object")))
}

/// A request whose envelope has been read.
struct Request<'s, 'b> {
    source: &'s SourceConfig,
    defaults: BatchDefaults,
    messages: Vec<&'b RawValue>,
}

/// Applies the size limit and the field rules to one raw message.
fn check<'a>(
    raw: &'a RawValue,
    path_type: Option<MessageType>,
    defaults: &BatchDefaults,
    received_at: chrono::DateTime<chrono::Utc>,
) -> Verdict<'a> {
    let bytes = raw.get().as_bytes();
    let rejected = |message_id: Option<String>, reason: String| Verdict::Rejected {
        raw: bytes,
        message_id,
        reason,
    };
    if bytes.len() > MAX_MESSAGE_BYTES {
        return rejected(peek(raw).message_id, Limit::Message.describe().to_string());
    }
    match RawMessage::read(raw) {
        Err(reason) => rejected(peek(raw).message_id, reason),
        Ok(parsed) => {
            // Kept for a rejection (borrowed: no copy unless one is made).
            let message_id = parsed.message_id.clone();
            match rules::apply(parsed, path_type, defaults, received_at) {
                Ok(m) => Verdict::Accepted(Box::new(m)),
                Err(reason) => rejected(message_id.map(Cow::into_owned), reason),
            }
        }
    }
}

/// The top-level strings Sluice needs before (or without) reading a message in full: the write key
/// of a single-message call, and the messageId of a message that failed to parse as one.
#[derive(Deserialize, Default)]
struct Peek {
    #[serde(rename = "messageId")]
    message_id: Option<String>,
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
}

fn peek(raw: &RawValue) -> Peek {
    serde_json::from_str(raw.get()).unwrap_or_default()
}

#[cfg(test)]
mod tests;
