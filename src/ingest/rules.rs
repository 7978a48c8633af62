//! Segment's field rules, and what the server adds to every message it accepts.
//!
//! - `type` is one of track, identify, page, screen, group, alias (single-message endpoints set
//!   it from the path);
//! - `userId` or `anonymousId` is present, except for alias, which needs `userId` and
//!   `previousId`; track needs `event`, group needs `groupId`;
//! - timestamps are ISO-8601 dates.
//!
//! The server fills `messageId` when missing, sets `receivedAt`, merges batch-level `context`
//! and `integrations` into each message (the message's own keys win), and corrects the device
//! clock: `timestamp = receivedAt - (sentAt - timestamp)`, keeping the device's value as
//! `originalTimestamp`.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::message::{Json, RawMessage, Text};
use crate::vocabulary::{format_time, parse_time, to_micros, write_time, MessageType};

/// A message that passed the field rules, with everything the server adds; what the client sent
/// is still borrowed from the request.
#[derive(Debug)]
pub struct Message<'a> {
    pub kind: MessageType,
    pub message_id: Text<'a>,
    /// The server made the id up, so it cannot be a duplicate of anything.
    pub message_id_generated: bool,
    pub user_id: Option<Text<'a>>,
    pub anonymous_id: Option<Text<'a>>,
    pub group_id: Option<Text<'a>>,
    pub previous_id: Option<Text<'a>>,
    pub event: Option<Text<'a>>,
    pub name: Option<Text<'a>>,
    pub timestamp: DateTime<Utc>,
    pub original_timestamp: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub properties: Option<Json<'a>>,
    pub traits: Option<Json<'a>>,
    pub context: Option<Json<'a>>,
    pub integrations: Option<Json<'a>>,
    pub extra: Vec<(Text<'a>, Json<'a>)>,
}

/// What a batch says for all of its messages.
#[derive(Debug, Default)]
pub struct BatchDefaults {
    pub sent_at: Option<DateTime<Utc>>,
    pub context: Option<Map<String, Value>>,
    pub integrations: Option<Map<String, Value>>,
}

/// Applies the field rules; the error is the reason the message is rejected.
pub fn apply<'a>(
    raw: RawMessage<'a>,
    path_type: Option<MessageType>,
    batch: &BatchDefaults,
    received_at: DateTime<Utc>,
) -> Result<Message<'a>, String> {
    let kind = match (path_type, raw.kind.as_deref()) {
        (Some(kind), _) => kind,
        (None, Some(text)) => MessageType::parse(text).ok_or_else(|| {
            format!(
                "`type` must be one of track, identify, page, screen, group, alias, not `{text}`"
            )
        })?,
        (None, None) => return Err("`type` is missing".into()),
    };
    let present = |v: Option<Text<'a>>| v.filter(|s| !s.is_empty());
    let user_id = present(raw.user_id);
    let anonymous_id = present(raw.anonymous_id);
    let group_id = present(raw.group_id);
    let previous_id = present(raw.previous_id);
    let event = present(raw.event);
    match kind {
        MessageType::Alias => {
            if user_id.is_none() {
                return Err("alias needs `userId`".into());
            }
            if previous_id.is_none() {
                return Err("alias needs `previousId`".into());
            }
        }
        _ if user_id.is_none() && anonymous_id.is_none() => {
            return Err("`userId` or `anonymousId` is required".into())
        }
        MessageType::Track if event.is_none() => return Err("track needs `event`".into()),
        MessageType::Group if group_id.is_none() => return Err("group needs `groupId`".into()),
        _ => {}
    }

    let device_time = match raw
        .timestamp
        .as_deref()
        .or(raw.original_timestamp.as_deref())
    {
        Some(text) => Some(parse_time(text).ok_or_else(|| not_a_date("timestamp", text))?),
        None => None,
    };
    let sent_at = match raw.sent_at.as_deref() {
        Some(text) => Some(parse_time(text).ok_or_else(|| not_a_date("sentAt", text))?),
        None => batch.sent_at,
    };
    let received_at = to_micros(received_at);
    let timestamp = match (device_time, sent_at) {
        // Dates near the ends of the calendar could overflow; then the device's time stands.
        (Some(ts), Some(sent)) => received_at
            .checked_sub_signed(sent - ts)
            .map_or(ts, to_micros),
        (Some(ts), None) => ts,
        (None, _) => received_at,
    };

    let (message_id, message_id_generated) = match present(raw.message_id) {
        Some(id) => (id, false),
        None => (uuid::Uuid::new_v4().to_string().into(), true),
    };

    Ok(Message {
        kind,
        message_id,
        message_id_generated,
        user_id,
        anonymous_id,
        group_id,
        previous_id,
        event,
        name: present(raw.name),
        timestamp,
        original_timestamp: device_time,
        sent_at,
        received_at,
        properties: raw.properties,
        traits: raw.traits,
        context: merge(raw.context, batch.context.as_ref(), "context")?,
        integrations: merge(
            raw.integrations,
            batch.integrations.as_ref(),
            "integrations",
        )?,
        extra: raw.extra,
    })
}

fn not_a_date(field: &str, text: &str) -> String {
    format!("`{field}` is not an ISO-8601 date: `{text}`")
}

/// Adds the batch's keys that the message lacks.
fn merge<'a>(
    own: Option<Json<'a>>,
    batch: Option<&Map<String, Value>>,
    field: &str,
) -> Result<Option<Json<'a>>, String> {
    let Some(batch) = batch.filter(|b| !b.is_empty()) else {
        return Ok(own);
    };
    let mut merged: Map<String, Value> = match &own {
        Some(raw) => serde_json::from_str(raw.get()).map_err(|e| format!("`{field}`: {e}"))?,
        None => Map::new(),
    };
    for (key, value) in batch {
        merged.entry(key.clone()).or_insert_with(|| value.clone());
    }
    Json::of(&merged)
        .map(Some)
        .map_err(|e| format!("`{field}`: {e}"))
}

impl Message<'_> {
    /// The bytes of its JSON objects and texts: what its record in the log takes, but for the
    /// few hundred bytes of keys and timestamps.
    pub fn stored_len(&self) -> usize {
        let text = |v: &Option<Text>| v.as_ref().map_or(0, |t| t.len());
        let raw = |v: &Option<Json>| v.as_ref().map_or(0, |r| r.get().len());
        self.message_id.len()
            + text(&self.user_id)
            + text(&self.anonymous_id)
            + text(&self.group_id)
            + text(&self.previous_id)
            + text(&self.event)
            + text(&self.name)
            + raw(&self.properties)
            + raw(&self.traits)
            + raw(&self.context)
            + raw(&self.integrations)
            + self
                .extra
                .iter()
                .map(|(k, v)| k.len() + v.get().len())
                .sum::<usize>()
    }

    /// The message as Segment-spec JSON, as stored in the log and sent on to destinations. Times
    /// among `shared` are copied from there, not formatted again.
    pub fn write_json(&self, out: &mut Vec<u8>, shared: &[SharedTime]) {
        let mut w = ObjectWriter::new(out, shared);
        w.string("type", self.kind.as_str());
        w.string("messageId", &self.message_id);
        w.opt_string("userId", self.user_id.as_deref());
        w.opt_string("anonymousId", self.anonymous_id.as_deref());
        w.opt_string("groupId", self.group_id.as_deref());
        w.opt_string("previousId", self.previous_id.as_deref());
        w.opt_string("event", self.event.as_deref());
        w.opt_string("name", self.name.as_deref());
        w.time("timestamp", self.timestamp);
        if let Some(t) = self.original_timestamp {
            w.time("originalTimestamp", t);
        }
        if let Some(t) = self.sent_at {
            w.time("sentAt", t);
        }
        w.time("receivedAt", self.received_at);
        for (key, value) in [
            ("properties", &self.properties),
            ("traits", &self.traits),
            ("context", &self.context),
            ("integrations", &self.integrations),
        ] {
            if let Some(v) = value {
                w.raw(key, v.get());
            }
        }
        for (key, value) in &self.extra {
            w.client_raw(key, value.get());
        }
        w.finish();
    }
}

/// A time that every message of a request carries (its `receivedAt`, a batch's `sentAt`),
/// formatted once for all of them.
pub struct SharedTime {
    at: DateTime<Utc>,
    text: String,
}

impl SharedTime {
    pub fn new(at: DateTime<Utc>) -> Self {
        // As the message holds it.
        let at = to_micros(at);
        SharedTime {
            at,
            text: format_time(at),
        }
    }
}

/// Writes one JSON object key by key, without building a tree.
struct ObjectWriter<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    shared: &'a [SharedTime],
}

impl<'a> ObjectWriter<'a> {
    fn new(out: &'a mut Vec<u8>, shared: &'a [SharedTime]) -> Self {
        out.push(b'{');
        ObjectWriter {
            out,
            first: true,
            shared,
        }
    }

    /// A key of Sluice's own: plain ASCII, written as it is.
    fn key(&mut self, key: &'static str) {
        debug_assert!(key.bytes().all(|b| b.is_ascii_alphanumeric()));
        self.comma();
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A value under a key the client sent: the key escaped as needed.
    fn client_raw(&mut self, key: &str, json: &str) {
        self.comma();
        write_json_string(self.out, key);
        self.out.push(b':');
        self.out.extend_from_slice(json.as_bytes());
    }

    fn comma(&mut self) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
    }

    fn string(&mut self, key: &'static str, value: &str) {
        self.key(key);
        write_json_string(self.out, value);
    }

    fn opt_string(&mut self, key: &'static str, value: Option<&str>) {
        if let Some(v) = value {
            self.string(key, v);
        }
    }

    fn time(&mut self, key: &'static str, t: DateTime<Utc>) {
        self.key(key);
        self.out.push(b'"');
        match self.shared.iter().find(|s| s.at == t) {
            Some(s) => self.out.extend_from_slice(s.text.as_bytes()),
            None => write_time(self.out, t),
        }
        self.out.push(b'"');
    }

    fn raw(&mut self, key: &'static str, json: &str) {
        self.key(key);
        self.out.extend_from_slice(json.as_bytes());
    }

    fn finish(self) {
        self.out.push(b'}');
    }
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Most strings need no escape: copied as they are (what serde_json escapes is a quote, a
    // backslash and the control characters).
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        parse_time(text).unwrap()
    }

    fn raw(json: &str) -> RawMessage<'_> {
        RawMessage::read(serde_json::from_str(json).unwrap()).unwrap()
    }

    fn admit(json: &str) -> Result<Message<'_>, String> {
        apply(
            raw(json),
            None,
            &BatchDefaults::default(),
            at("2026-01-01T12:00:00Z"),
        )
    }

    fn json_of(m: &Message) -> Value {
        let mut out = Vec::new();
        m.write_json(&mut out, &[]);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn each_missing_field_is_named() {
        let cases = [
            (r#"{"userId":"u"}"#, "`type` is missing"),
            (r#"{"type":"shout","userId":"u"}"#, "`type` must be one of"),
            (
                r#"{"type":"track","event":"E"}"#,
                "`userId` or `anonymousId` is required",
            ),
            (
                r#"{"type":"track","userId":"","event":"E"}"#,
                "`userId` or `anonymousId` is required",
            ),
            (r#"{"type":"track","userId":"u"}"#, "track needs `event`"),
            (r#"{"type":"group","userId":"u"}"#, "group needs `groupId`"),
            (
                r#"{"type":"alias","previousId":"p"}"#,
                "alias needs `userId`",
            ),
            (
                r#"{"type":"alias","userId":"u"}"#,
                "alias needs `previousId`",
            ),
            (
                r#"{"type":"page","userId":"u","timestamp":"yesterday"}"#,
                "`timestamp` is not an ISO-8601 date",
            ),
            (
                r#"{"type":"page","userId":"u","sentAt":"soon"}"#,
                "`sentAt` is not an ISO-8601 date",
            ),
        ];
        for (json, reason) in cases {
            let err = admit(json).unwrap_err();
            assert!(err.contains(reason), "{json}: {err}");
        }
    }

    #[test]
    fn each_valid_type_passes() {
        for json in [
            r#"{"type":"track","anonymousId":"a","event":"E"}"#,
            r#"{"type":"identify","userId":"u","traits":{"email":"x@y.z"}}"#,
            r#"{"type":"page","anonymousId":"a","name":"Home"}"#,
            r#"{"type":"screen","userId":"u"}"#,
            r#"{"type":"group","userId":"u","groupId":"g"}"#,
            r#"{"type":"alias","userId":"u","previousId":"p"}"#,
        ] {
            admit(json).unwrap_or_else(|e| panic!("{json}: {e}"));
        }
    }

    #[test]
    fn the_path_sets_the_type() {
        let m = apply(
            raw(r#"{"userId":"u","event":"E"}"#),
            Some(MessageType::Track),
            &BatchDefaults::default(),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(m.kind, MessageType::Track);
    }

    #[test]
    fn clock_skew_is_corrected_and_the_device_time_kept() {
        // The device clock is 1 h behind: it says it sent at 11:00:05 an event from 11:00:00; the
        // server received it at 12:00:00.
        let m = admit(
            r#"{"type":"track","userId":"u","event":"E",
                "timestamp":"2026-01-01T11:00:00Z","sentAt":"2026-01-01T11:00:05Z"}"#,
        )
        .unwrap();
        assert_eq!(m.timestamp, at("2026-01-01T11:59:55Z"));
        assert_eq!(m.original_timestamp, Some(at("2026-01-01T11:00:00Z")));
        assert_eq!(m.received_at, at("2026-01-01T12:00:00Z"));
        let j = json_of(&m);
        assert_eq!(j["timestamp"], "2026-01-01T11:59:55Z");
        assert_eq!(j["originalTimestamp"], "2026-01-01T11:00:00Z");
        assert_eq!(j["sentAt"], "2026-01-01T11:00:05Z");
        assert_eq!(j["receivedAt"], "2026-01-01T12:00:00Z");
    }

    #[test]
    fn batch_sent_at_applies_and_missing_timestamp_is_received_at() {
        let batch = BatchDefaults {
            sent_at: Some(at("2026-01-01T11:00:10Z")),
            ..Default::default()
        };
        let now = at("2026-01-01T12:00:00Z");
        let m = apply(
            raw(r#"{"type":"track","userId":"u","event":"E","timestamp":"2026-01-01T11:00:00.250+00:00"}"#),
            None,
            &batch,
            now,
        )
        .unwrap();
        assert_eq!(m.timestamp, at("2026-01-01T11:59:50.250Z"));
        let m = apply(
            raw(r#"{"type":"track","userId":"u","event":"E"}"#),
            None,
            &batch,
            now,
        )
        .unwrap();
        assert_eq!(m.timestamp, now);
        assert_eq!(m.original_timestamp, None);
    }

    #[test]
    fn absurd_dates_do_not_panic() {
        let m = admit(
            r#"{"type":"track","userId":"u","event":"E",
                "timestamp":"0001-01-01T00:00:00Z","sentAt":"9999-12-31T23:59:59Z"}"#,
        )
        .unwrap();
        // Ten thousand years of skew is corrected like any other.
        assert_eq!(
            m.timestamp,
            m.received_at - (at("9999-12-31T23:59:59Z") - at("0001-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn message_id_is_filled_when_missing() {
        let m = admit(r#"{"type":"screen","userId":"u"}"#).unwrap();
        assert!(m.message_id_generated);
        assert_eq!(m.message_id.len(), 36);
        let m = admit(r#"{"type":"screen","userId":"u","messageId":"mine"}"#).unwrap();
        assert!(!m.message_id_generated);
        assert_eq!(m.message_id, "mine");
    }

    #[test]
    fn shared_times_write_what_formatting_writes() {
        let batch = BatchDefaults {
            sent_at: Some(at("2026-01-01T11:59:59.5Z")),
            ..Default::default()
        };
        let received = at("2026-01-01T12:00:00.123456Z");
        let m = apply(
            raw(r#"{"type":"track","userId":"u","event":"E","timestamp":"2026-01-01T11:59:58Z"}"#),
            None,
            &batch,
            received,
        )
        .unwrap();
        let (mut formatted, mut copied) = (Vec::new(), Vec::new());
        m.write_json(&mut formatted, &[]);
        let shared = [
            SharedTime::new(received),
            SharedTime::new(at("2026-01-01T11:59:59.5Z")),
        ];
        m.write_json(&mut copied, &shared);
        assert_eq!(
            String::from_utf8(copied).unwrap(),
            String::from_utf8(formatted).unwrap()
        );
        assert!(shared
            .iter()
            .all(|s| s.at == m.received_at || Some(s.at) == m.sent_at));
    }

    #[test]
    fn batch_context_and_integrations_merge_under_the_message() {
        let batch = BatchDefaults {
            context: Some(
                serde_json::from_str(r#"{"library":{"name":"batch"},"ip":"9.9.9.9"}"#).unwrap(),
            ),
            integrations: Some(serde_json::from_str(r#"{"All":false}"#).unwrap()),
            ..Default::default()
        };
        let m = apply(
            raw(r#"{"type":"track","userId":"u","event":"E","context":{"ip":"1.1.1.1"}}"#),
            None,
            &batch,
            Utc::now(),
        )
        .unwrap();
        let j = json_of(&m);
        assert_eq!(
            j["context"]["ip"], "1.1.1.1",
            "the message's own value wins"
        );
        assert_eq!(j["context"]["library"]["name"], "batch");
        assert_eq!(j["integrations"]["All"], false);
    }

    #[test]
    fn written_json_keeps_unknown_keys_and_drops_the_write_key() {
        let m = admit(
            r#"{"type":"track","userId":"u","event":"Ünïcode \"quoted\"","writeKey":"secret",
                "properties":{"a":1},"channel":"web"}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        m.write_json(&mut out, &[]);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("secret"));
        let j: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j["event"], "Ünïcode \"quoted\"");
        assert_eq!(j["properties"]["a"], 1);
        assert_eq!(j["channel"], "web");
        assert_eq!(j["type"], "track");
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "plain",
            "",
            "quote \" here",
            "back\\slash",
            "tab\there",
            "\u{1}",
            "é😀",
            "\u{7f}",
        ] {
            let mut ours = Vec::new();
            write_json_string(&mut ours, s);
            assert_eq!(ours, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }
}
