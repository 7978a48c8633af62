//! The lake's tables as Arrow: their schemas, and builders that turn intake-log entries into
//! record batches.
//!
//! Timestamps are UTC microseconds; `properties`, `traits`, `context` and `integrations` are JSON
//! text, byte for byte as stored in the log; `violations` is the array the tracking plan flagged
//! (also in `context.violations`), or null. The partition column `date` is
//! not in the files: it is the folder name (`date=YYYY-MM-DD`), the UTC date of `received_at`.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{ArrayRef, StringBuilder, TimestampMicrosecondBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::entry::Entry;
use crate::vocabulary::parse_time;

/// The fixed tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Events,
    Quarantine,
}

impl Table {
    /// The table's folder under the lake, and its name in SQL.
    pub fn name(self) -> &'static str {
        match self {
            Table::Events => "events",
            Table::Quarantine => "quarantine",
        }
    }

    pub fn schema(self) -> SchemaRef {
        match self {
            Table::Events => EVENTS.clone(),
            Table::Quarantine => QUARANTINE.clone(),
        }
    }
}

fn timestamp(name: &str, nullable: bool) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        nullable,
    )
}

fn text(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

static EVENTS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        text("message_id", false),
        text("type", false),
        text("event", true),
        text("name", true),
        text("user_id", true),
        text("anonymous_id", true),
        text("group_id", true),
        text("previous_id", true),
        text("source", false),
        timestamp("timestamp", false),
        timestamp("original_timestamp", true),
        timestamp("sent_at", true),
        timestamp("received_at", false),
        text("properties", true),
        text("traits", true),
        text("context", true),
        text("integrations", true),
        text("violations", true),
    ]))
});

static QUARANTINE: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        timestamp("received_at", false),
        text("source", false),
        text("message_id", true),
        text("type", true),
        text("event", true),
        text("reason", false),
        text("raw", false),
    ]))
});

/// Why an entry could not become a row. The log holds only what the edge wrote, so this means a
/// bug or a corrupt record; the writer counts it and files the record in the quarantine instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RowError(String);

/// An accepted message as the edge wrote it into the log.
#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "messageId", borrow)]
    message_id: Cow<'a, str>,
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(rename = "userId", borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(rename = "anonymousId", borrow)]
    anonymous_id: Option<Cow<'a, str>>,
    #[serde(rename = "groupId", borrow)]
    group_id: Option<Cow<'a, str>>,
    #[serde(rename = "previousId", borrow)]
    previous_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(rename = "originalTimestamp", borrow)]
    original_timestamp: Option<Cow<'a, str>>,
    #[serde(rename = "sentAt", borrow)]
    sent_at: Option<Cow<'a, str>>,
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
    #[serde(borrow)]
    traits: Option<&'a RawValue>,
    #[serde(borrow)]
    context: Option<&'a RawValue>,
    #[serde(borrow)]
    integrations: Option<&'a RawValue>,
}

/// The schema violations the tracking plan flagged, in `context.violations`.
#[derive(Deserialize)]
struct Flagged<'a> {
    #[serde(borrow)]
    violations: Option<&'a RawValue>,
}

fn violations(context: Option<&RawValue>) -> Option<&str> {
    let context = context.filter(|c| c.get().contains("\"violations\""))?;
    let flagged: Flagged = serde_json::from_str(context.get()).ok()?;
    flagged.violations.map(RawValue::get)
}

fn utc() -> Arc<str> {
    "UTC".into()
}

/// Rows of the `events` table.
pub struct EventsBuilder {
    message_id: StringBuilder,
    kind: StringBuilder,
    event: StringBuilder,
    name: StringBuilder,
    user_id: StringBuilder,
    anonymous_id: StringBuilder,
    group_id: StringBuilder,
    previous_id: StringBuilder,
    source: StringBuilder,
    timestamp: TimestampMicrosecondBuilder,
    original_timestamp: TimestampMicrosecondBuilder,
    sent_at: TimestampMicrosecondBuilder,
    received_at: TimestampMicrosecondBuilder,
    properties: StringBuilder,
    traits: StringBuilder,
    context: StringBuilder,
    integrations: StringBuilder,
    violations: StringBuilder,
    rows: usize,
}

impl Default for EventsBuilder {
    fn default() -> Self {
        let ts = || TimestampMicrosecondBuilder::new().with_timezone(utc());
        EventsBuilder {
            message_id: StringBuilder::new(),
            kind: StringBuilder::new(),
            event: StringBuilder::new(),
            name: StringBuilder::new(),
            user_id: StringBuilder::new(),
            anonymous_id: StringBuilder::new(),
            group_id: StringBuilder::new(),
            previous_id: StringBuilder::new(),
            source: StringBuilder::new(),
            timestamp: ts(),
            original_timestamp: ts(),
            sent_at: ts(),
            received_at: ts(),
            properties: StringBuilder::new(),
            traits: StringBuilder::new(),
            context: StringBuilder::new(),
            integrations: StringBuilder::new(),
            violations: StringBuilder::new(),
            rows: 0,
        }
    }
}

fn micros(field: &str, text: &str) -> Result<i64, RowError> {
    parse_time(text)
        .map(|t| t.timestamp_micros())
        .ok_or_else(|| RowError(format!("`{field}` is not a date: {text}")))
}

fn opt_micros(field: &str, text: Option<&str>) -> Result<Option<i64>, RowError> {
    text.map(|t| micros(field, t)).transpose()
}

impl EventsBuilder {
    /// Adds an accepted entry; on error nothing is added. Returns the event name of a track.
    pub fn append(&mut self, entry: &Entry) -> Result<Option<String>, RowError> {
        let m: Stored = serde_json::from_slice(entry.body)
            .map_err(|e| RowError(format!("stored message does not parse: {e}")))?;
        let timestamp = micros("timestamp", &m.timestamp)?;
        let original = opt_micros("originalTimestamp", m.original_timestamp.as_deref())?;
        let sent_at = opt_micros("sentAt", m.sent_at.as_deref())?;
        let track_event = (m.kind == "track")
            .then(|| m.event.as_deref().map(str::to_string))
            .flatten();
        self.message_id.append_value(&m.message_id);
        self.kind.append_value(&m.kind);
        self.event.append_option(m.event);
        self.name.append_option(m.name);
        self.user_id.append_option(m.user_id);
        self.anonymous_id.append_option(m.anonymous_id);
        self.group_id.append_option(m.group_id);
        self.previous_id.append_option(m.previous_id);
        self.source.append_value(entry.source);
        self.timestamp.append_value(timestamp);
        self.original_timestamp.append_option(original);
        self.sent_at.append_option(sent_at);
        self.received_at.append_value(entry.received_at_micros);
        self.properties
            .append_option(m.properties.map(RawValue::get));
        self.traits.append_option(m.traits.map(RawValue::get));
        self.context.append_option(m.context.map(RawValue::get));
        self.integrations
            .append_option(m.integrations.map(RawValue::get));
        self.violations.append_option(violations(m.context));
        self.rows += 1;
        Ok(track_event)
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The rows so far as a batch; the builder starts empty again.
    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        self.rows = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.message_id.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.event.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.anonymous_id.finish()),
            Arc::new(self.group_id.finish()),
            Arc::new(self.previous_id.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.original_timestamp.finish()),
            Arc::new(self.sent_at.finish()),
            Arc::new(self.received_at.finish()),
            Arc::new(self.properties.finish()),
            Arc::new(self.traits.finish()),
            Arc::new(self.context.finish()),
            Arc::new(self.integrations.finish()),
            Arc::new(self.violations.finish()),
        ];
        RecordBatch::try_new(EVENTS.clone(), columns)
    }
}

/// Rows of the `quarantine` table.
pub struct QuarantineBuilder {
    received_at: TimestampMicrosecondBuilder,
    source: StringBuilder,
    message_id: StringBuilder,
    kind: StringBuilder,
    event: StringBuilder,
    reason: StringBuilder,
    raw: StringBuilder,
    rows: usize,
}

impl Default for QuarantineBuilder {
    fn default() -> Self {
        QuarantineBuilder {
            received_at: TimestampMicrosecondBuilder::new().with_timezone(utc()),
            source: StringBuilder::new(),
            message_id: StringBuilder::new(),
            kind: StringBuilder::new(),
            event: StringBuilder::new(),
            reason: StringBuilder::new(),
            raw: StringBuilder::new(),
            rows: 0,
        }
    }
}

/// What can be read of a rejected message, which may break any rule.
#[derive(Deserialize, Default)]
struct Glimpse {
    #[serde(rename = "type")]
    kind: Option<String>,
    event: Option<String>,
    #[serde(rename = "messageId")]
    message_id: Option<String>,
}

impl QuarantineBuilder {
    /// Adds a rejected entry, or an accepted one that could not become an event row (`reason`
    /// then says why).
    pub fn append(&mut self, entry: &Entry, reason: &str) {
        let raw = String::from_utf8_lossy(entry.body);
        // Only strings are taken: a rejected message may have any shape.
        let glimpse: Glimpse = serde_json::from_str(&raw).unwrap_or_default();
        let message_id = Some(entry.message_id)
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .or(glimpse.message_id);
        self.received_at.append_value(entry.received_at_micros);
        self.source.append_value(entry.source);
        self.message_id.append_option(message_id);
        self.kind.append_option(glimpse.kind);
        self.event.append_option(glimpse.event);
        self.reason.append_value(reason);
        self.raw.append_value(&raw);
        self.rows += 1;
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        self.rows = 0;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.received_at.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.message_id.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.event.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.raw.finish()),
        ];
        RecordBatch::try_new(QUARANTINE.clone(), columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Status;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::TimestampMicrosecondType;

    fn entry(status: Status, body: &str, reason: &str) -> Vec<u8> {
        let at = chrono::DateTime::from_timestamp_micros(1_767_225_600_000_001).unwrap();
        let mut out = Vec::new();
        Entry::encode(&mut out, status, at, "web", "m-1", reason, |b| {
            b.extend_from_slice(body.as_bytes())
        });
        out
    }

    #[test]
    fn an_accepted_message_becomes_one_event_row() {
        let body = r#"{"type":"track","messageId":"m-1","userId":"u\"1","event":"Signed Up","timestamp":"2026-01-01T00:00:00.5Z","originalTimestamp":"2025-12-31T23:00:00Z","receivedAt":"2026-01-01T00:00:00.000001Z","properties":{"plan":"pro","n":[1,2]},"context":{"ip":"1.2.3.4"},"channel":"web"}"#;
        let bytes = entry(Status::Accepted, body, "");
        let mut b = EventsBuilder::default();
        b.append(&Entry::decode(&bytes).unwrap()).unwrap();
        let batch = b.finish().unwrap();
        assert_eq!(batch.num_rows(), 1);
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        assert_eq!(col("message_id").as_string::<i32>().value(0), "m-1");
        assert_eq!(col("type").as_string::<i32>().value(0), "track");
        assert_eq!(col("user_id").as_string::<i32>().value(0), "u\"1");
        assert_eq!(col("event").as_string::<i32>().value(0), "Signed Up");
        assert!(col("name").is_null(0));
        assert_eq!(col("source").as_string::<i32>().value(0), "web");
        assert_eq!(
            col("properties").as_string::<i32>().value(0),
            r#"{"plan":"pro","n":[1,2]}"#
        );
        assert!(col("traits").is_null(0));
        let ts = col("timestamp");
        let ts = ts.as_primitive::<TimestampMicrosecondType>();
        assert_eq!(ts.value(0), 1_767_225_600_500_000);
        let received = col("received_at");
        assert_eq!(
            received.as_primitive::<TimestampMicrosecondType>().value(0),
            1_767_225_600_000_001
        );
        assert!(col("sent_at").is_null(0));
        assert_eq!(batch.schema(), Table::Events.schema());
        assert_eq!(b.len(), 0, "finish empties the builder");
    }

    #[test]
    fn flagged_violations_fill_their_column() {
        let body = r#"{"type":"track","messageId":"m","userId":"u","event":"E","timestamp":"2026-01-01T00:00:00Z","context":{"ip":"1","violations":[{"path":"/x","message":"bad"}]}}"#;
        let bytes = entry(Status::Accepted, body, "");
        let mut b = EventsBuilder::default();
        b.append(&Entry::decode(&bytes).unwrap()).unwrap();
        let plain = entry(
            Status::Accepted,
            &body.replace(r#","violations":[{"path":"/x","message":"bad"}]"#, ""),
            "",
        );
        b.append(&Entry::decode(&plain).unwrap()).unwrap();
        let batch = b.finish().unwrap();
        let col = batch.column_by_name("violations").unwrap();
        assert_eq!(
            col.as_string::<i32>().value(0),
            r#"[{"path":"/x","message":"bad"}]"#
        );
        assert!(col.is_null(1));
    }

    #[test]
    fn a_broken_stored_message_adds_nothing() {
        let bytes = entry(Status::Accepted, r#"{"type":"track"}"#, "");
        let mut b = EventsBuilder::default();
        assert!(b.append(&Entry::decode(&bytes).unwrap()).is_err());
        assert_eq!(b.finish().unwrap().num_rows(), 0);
    }

    #[test]
    fn a_rejected_message_becomes_a_quarantine_row_with_its_raw_json() {
        let raw = r#"{"type":"track","userId":"u","properties":{"x":1}}"#;
        let bytes = entry(Status::Rejected, raw, "track needs `event`");
        let mut q = QuarantineBuilder::default();
        let e = Entry::decode(&bytes).unwrap();
        q.append(&e, e.reason);
        q.append(&e, "again, with a number for a type");
        let batch = q.finish().unwrap();
        assert_eq!(batch.num_rows(), 2);
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        assert_eq!(
            col("reason").as_string::<i32>().value(0),
            "track needs `event`"
        );
        assert_eq!(col("raw").as_string::<i32>().value(0), raw);
        assert_eq!(col("type").as_string::<i32>().value(0), "track");
        assert!(col("event").is_null(0));
        assert_eq!(col("message_id").as_string::<i32>().value(0), "m-1");
    }
}
