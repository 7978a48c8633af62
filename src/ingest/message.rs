//! A Segment message as it arrives, read in one pass.
//!
//! The object fields (`properties`, `traits`, `context`, `integrations`) and any keys Sluice does
//! not interpret stay raw JSON: they are held to the edge's bounds but not taken apart, which keeps
//! reading cheap and passes them on byte for byte. Ids may arrive as strings or numbers (some SDKs
//! send numeric user ids); numbers are kept as their text. What needs no unescaping is borrowed
//! from the request's text, not copied: a message is copied once, into its log record.

use std::borrow::Cow;

use serde_json::value::RawValue;

use super::bounds;

/// A string field as sent: borrowed from the request unless it had escapes.
pub type Text<'a> = Cow<'a, str>;

/// One JSON value kept as its text, always well-formed: borrowed from the request as sent, or
/// made by the server (a merged batch context, the tracking plan's violations).
#[derive(Debug)]
pub struct Json<'a>(Cow<'a, str>);

impl Json<'_> {
    /// `value` as JSON.
    pub fn of(value: &impl serde::Serialize) -> serde_json::Result<Json<'static>> {
        serde_json::to_string(value).map(|text| Json(Cow::Owned(text)))
    }

    pub fn get(&self) -> &str {
        &self.0
    }
}

/// A message's fields as sent, before the field rules; what it holds is borrowed from the JSON it
/// was read from.
#[derive(Debug, Default)]
pub struct RawMessage<'a> {
    pub kind: Option<Text<'a>>,
    pub message_id: Option<Text<'a>>,
    pub user_id: Option<Text<'a>>,
    pub anonymous_id: Option<Text<'a>>,
    pub group_id: Option<Text<'a>>,
    pub previous_id: Option<Text<'a>>,
    pub event: Option<Text<'a>>,
    pub name: Option<Text<'a>>,
    pub timestamp: Option<Text<'a>>,
    pub original_timestamp: Option<Text<'a>>,
    pub sent_at: Option<Text<'a>>,
    pub properties: Option<Json<'a>>,
    pub traits: Option<Json<'a>>,
    pub context: Option<Json<'a>>,
    pub integrations: Option<Json<'a>>,
    pub write_key: Option<Text<'a>>,
    /// Keys Sluice does not interpret (`channel`, `version`, `_metadata`, ...), kept as sent.
    pub extra: Vec<(Text<'a>, Json<'a>)>,
}

impl<'a> RawMessage<'a> {
    /// Reads a message, and holds the values it keeps raw to the edge's [`bounds`], in one pass.
    /// The JSON is known to be well-formed (a `RawValue` always is: the request was parsed once),
    /// so the pass only finds where each value ends; a second full parse, then a pass for the
    /// bounds, were a tenth of ingestion. The error is the reason to reject the message.
    pub fn read(raw: &'a RawValue) -> Result<Self, String> {
        let mut r = Reader {
            json: raw.get(),
            at: 0,
        };
        r.skip_space();
        if !r.eat(b'{') {
            return Err("a message must be a JSON object".into());
        }
        let mut m = RawMessage::default();
        r.skip_space();
        if r.eat(b'}') {
            return Ok(m);
        }
        loop {
            let key = r.string()?;
            r.skip_space();
            r.eat(b':');
            r.skip_space();
            match &*key {
                "type" => m.kind = r.text("type")?,
                "messageId" => m.message_id = r.id("messageId")?,
                "userId" => m.user_id = r.id("userId")?,
                "anonymousId" => m.anonymous_id = r.id("anonymousId")?,
                "groupId" => m.group_id = r.id("groupId")?,
                "previousId" => m.previous_id = r.id("previousId")?,
                "event" => m.event = r.text("event")?,
                "name" => m.name = r.text("name")?,
                "timestamp" => m.timestamp = r.text("timestamp")?,
                "originalTimestamp" => m.original_timestamp = r.text("originalTimestamp")?,
                "sentAt" => m.sent_at = r.text("sentAt")?,
                "properties" => m.properties = r.object("properties")?,
                "traits" => m.traits = r.object("traits")?,
                "context" => m.context = r.object("context")?,
                "integrations" => m.integrations = r.object("integrations")?,
                "writeKey" => m.write_key = r.text("writeKey")?,
                // Set by the server; whatever the client says is dropped.
                "receivedAt" => {
                    r.value()?;
                }
                _ => {
                    let value = r.value()?;
                    m.extra.retain(|(k, _)| k != &key);
                    m.extra.push((key, value));
                }
            }
            r.skip_space();
            // A comma, or the closing brace: the JSON is well-formed.
            if !r.eat(b',') {
                return Ok(m);
            }
            r.skip_space();
        }
    }
}

/// A cursor over the well-formed JSON of one message.
struct Reader<'a> {
    json: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    fn next_byte(&self) -> Option<u8> {
        self.json.as_bytes().get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while self.next_byte().is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.next_byte() == Some(byte);
        self.at += usize::from(found);
        found
    }

    /// The string at the cursor, unescaped.
    fn string(&mut self) -> Result<Text<'a>, String> {
        let start = self.at;
        let (end, escaped) = bounds::after_string(self.json.as_bytes(), start + 1);
        self.at = end;
        let quoted = self.json.get(start..end).unwrap_or_default();
        if escaped {
            return serde_json::from_str::<String>(quoted)
                .map(Cow::Owned)
                .map_err(|e| e.to_string());
        }
        Ok(Cow::Borrowed(
            quoted.get(1..end - start - 1).unwrap_or_default(),
        ))
    }

    /// A value kept as its JSON, held to the bounds at a message's first level.
    fn value(&mut self) -> Result<Json<'a>, String> {
        let start = self.at;
        self.at = bounds::value_end(self.json.as_bytes(), start, 1)?;
        Ok(Json(Cow::Borrowed(&self.json[start..self.at])))
    }

    /// A string or null.
    fn text(&mut self, field: &str) -> Result<Option<Text<'a>>, String> {
        match self.next_byte() {
            Some(b'"') => self.string().map(Some),
            Some(b'n') => self.value().map(|_| None),
            _ => Err(format!("`{field}` must be a string")),
        }
    }

    /// A string, a number (kept as the text it was sent as: read as a number, two ids above 2^53
    /// could become one) or null.
    fn id(&mut self, field: &str) -> Result<Option<Text<'a>>, String> {
        match self.next_byte() {
            Some(b'-' | b'0'..=b'9') => {
                let start = self.at;
                self.at = bounds::number_end(self.json.as_bytes(), start);
                Ok(Some(Cow::Borrowed(&self.json[start..self.at])))
            }
            _ => self.text(field),
        }
    }

    /// An object or null; anything else is refused.
    fn object(&mut self, field: &str) -> Result<Option<Json<'a>>, String> {
        match self.next_byte() {
            Some(b'{') => self.value().map(Some),
            Some(b'n') => self.value().map(|_| None),
            _ => Err(format!("`{field}` must be an object")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<RawMessage<'_>, String> {
        let raw: &RawValue = serde_json::from_str(json).map_err(|e| e.to_string())?;
        RawMessage::read(raw)
    }

    #[test]
    fn reads_every_field_and_keeps_the_rest_raw() {
        let m = parse(
            r#"{"type":"track","event":"Signed Up","userId":42,"anonymousId":"a1",
                "messageId":"m1","timestamp":"2026-01-01T00:00:00Z","properties":{"plan":"pro"},
                "context":{"ip":"1.2.3.4"},"channel":"server","_metadata":{"x":[1,2]},
                "receivedAt":"ignored","writeKey":"wk"}"#,
        )
        .unwrap();
        assert_eq!(m.kind.as_deref(), Some("track"));
        assert_eq!(m.event.as_deref(), Some("Signed Up"));
        assert_eq!(m.user_id.as_deref(), Some("42"));
        assert_eq!(m.anonymous_id.as_deref(), Some("a1"));
        assert_eq!(m.properties.unwrap().get(), r#"{"plan":"pro"}"#);
        assert_eq!(m.write_key.as_deref(), Some("wk"));
        let extra: Vec<(&str, &str)> = m.extra.iter().map(|(k, v)| (&**k, v.get())).collect();
        assert_eq!(
            extra,
            vec![("channel", "\"server\""), ("_metadata", r#"{"x":[1,2]}"#)]
        );
    }

    #[test]
    fn null_fields_are_absent() {
        let m = parse(r#"{"userId":null,"properties":null,"event":null}"#).unwrap();
        assert!(m.user_id.is_none() && m.properties.is_none() && m.event.is_none());
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = parse(r#"{"properties":[1]}"#).unwrap_err().to_string();
        assert!(e.contains("`properties` must be an object"), "{e}");
        let e = parse(r#"{"userId":{"a":1}}"#).unwrap_err().to_string();
        assert!(e.contains("`userId` must be a string"), "{e}");
        let e = parse(r#"{"event":5}"#).unwrap_err().to_string();
        assert!(e.contains("`event` must be a string"), "{e}");
        assert!(parse("[1,2]").is_err());
    }

    #[test]
    fn numeric_ids_keep_the_text_they_were_sent_as() {
        let ids = [
            "18446744073709551617",
            "18446744073709551618",
            "42",
            "-7",
            "1.5",
            "1e3",
        ];
        for id in ids {
            let json = format!(r#"{{"userId":{id}}}"#);
            let m = parse(&json).unwrap();
            assert_eq!(m.user_id.as_deref(), Some(id));
        }
    }

    #[test]
    fn spaced_and_escaped_json_reads_as_compact_json_does() {
        let spaced = parse(
            "{ \"type\" :\t\"track\" ,\n \"event\": \"A \\\"quoted\\\" \\u00e9vent\",\r\n
               \"userId\" : -7 , \"properties\" : { \"a\" : [ 1 , { \"b\" : null } ] } ,
               \"version\" : 2 , \"channel\" : \"s\" , \"channel\" : \"server\" }",
        )
        .unwrap();
        assert_eq!(spaced.kind.as_deref(), Some("track"));
        assert_eq!(spaced.event.as_deref(), Some("A \"quoted\" \u{e9}vent"));
        assert_eq!(spaced.user_id.as_deref(), Some("-7"));
        assert_eq!(
            spaced.properties.unwrap().get(),
            r#"{ "a" : [ 1 , { "b" : null } ] }"#
        );
        // A repeated key: the last one stands.
        let extra: Vec<(&str, &str)> = spaced.extra.iter().map(|(k, v)| (&**k, v.get())).collect();
        assert_eq!(extra, vec![("version", "2"), ("channel", "\"server\"")]);
        assert!(parse("{}").unwrap().kind.is_none());
        assert!(parse(" { } ").unwrap().extra.is_empty());
    }

    #[test]
    fn what_a_message_keeps_raw_is_held_to_the_bounds() {
        let deep = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        // The message is the first level: what it holds may nest one less than the limit.
        let fits = format!(
            r#"{{"userId":"u","_metadata":{}}}"#,
            deep(bounds::MAX_DEPTH - 1)
        );
        assert!(parse(&fits).is_ok());
        for field in ["properties", "context", "_metadata", "receivedAt"] {
            let json = format!(
                r#"{{"userId":"u","{field}":{{"a":{}}}}}"#,
                deep(bounds::MAX_DEPTH)
            );
            let e = parse(&json).unwrap_err();
            assert!(e.contains("nested deeper than 64"), "{field}: {e}");
        }
        let e = parse(r#"{"properties":{"revenue":1e400}}"#).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        let e = parse(r#"{"version":-1e999}"#).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        // An id is text, whatever number it looks like.
        assert_eq!(
            parse(r#"{"userId":1e400}"#).unwrap().user_id.as_deref(),
            Some("1e400")
        );
    }

    #[test]
    fn escaped_keys_are_read() {
        let m = parse(r#"{"user\u0049d":"u1"}"#).unwrap();
        assert_eq!(m.user_id.as_deref(), Some("u1"));
    }
}
