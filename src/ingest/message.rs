//! A Segment message as it arrives, read in one pass.
//!
//! The object fields (`properties`, `traits`, `context`, `integrations`) and any keys Sluice does
//! not interpret stay raw JSON: they are checked to be well-formed but not taken apart, which keeps
//! parsing cheap and passes them on byte for byte. Ids may arrive as strings or numbers (some SDKs
//! send numeric user ids); numbers are kept as their text. What needs no unescaping is borrowed
//! from the request's text, not copied: a message is copied once, into its log record.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The six Segment message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl MessageType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "track" => Self::Track,
            "identify" => Self::Identify,
            "page" => Self::Page,
            "screen" => Self::Screen,
            "group" => Self::Group,
            "alias" => Self::Alias,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Track => "track",
            Self::Identify => "identify",
            Self::Page => "page",
            Self::Screen => "screen",
            Self::Group => "group",
            Self::Alias => "alias",
        }
    }
}

/// A string field as sent: borrowed from the request unless it had escapes.
pub type Text<'a> = Cow<'a, str>;
/// An object or other value kept as its JSON text: borrowed from the request unless the server
/// made it (a merged batch context, the tracking plan's violations).
pub type Json<'a> = Cow<'a, RawValue>;

/// A message's fields as sent, before the field rules. Read from JSON text in memory
/// (`serde_json::from_str` or `from_slice`), which it borrows from.
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

impl<'de: 'a, 'a> Deserialize<'de> for RawMessage<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MessageVisitor(std::marker::PhantomData))
    }
}

struct MessageVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for MessageVisitor<'a> {
    type Value = RawMessage<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawMessage<'a>, A::Error> {
        let mut m = RawMessage::default();
        while let Some(key) = map.next_key::<JsonStr<'de>>()? {
            let key = key.0;
            match &*key {
                "type" => m.kind = text(&mut map, "type")?,
                "messageId" => m.message_id = id(&mut map, "messageId")?,
                "userId" => m.user_id = id(&mut map, "userId")?,
                "anonymousId" => m.anonymous_id = id(&mut map, "anonymousId")?,
                "groupId" => m.group_id = id(&mut map, "groupId")?,
                "previousId" => m.previous_id = id(&mut map, "previousId")?,
                "event" => m.event = text(&mut map, "event")?,
                "name" => m.name = text(&mut map, "name")?,
                "timestamp" => m.timestamp = text(&mut map, "timestamp")?,
                "originalTimestamp" => m.original_timestamp = text(&mut map, "originalTimestamp")?,
                "sentAt" => m.sent_at = text(&mut map, "sentAt")?,
                "properties" => m.properties = object(&mut map, "properties")?,
                "traits" => m.traits = object(&mut map, "traits")?,
                "context" => m.context = object(&mut map, "context")?,
                "integrations" => m.integrations = object(&mut map, "integrations")?,
                "writeKey" => m.write_key = text(&mut map, "writeKey")?,
                // Set by the server; whatever the client says is dropped.
                "receivedAt" => {
                    map.next_value::<IgnoredAny>()?;
                }
                _ => {
                    let value: &'de RawValue = map.next_value()?;
                    m.extra.retain(|(k, _)| k != &key);
                    m.extra.push((key, Cow::Borrowed(value)));
                }
            }
        }
        Ok(m)
    }
}

impl RawMessage<'_> {
    /// The values it holds as raw JSON: its objects and the keys Sluice does not interpret.
    pub fn raw_values(&self) -> impl Iterator<Item = &RawValue> {
        [
            &self.properties,
            &self.traits,
            &self.context,
            &self.integrations,
        ]
        .into_iter()
        .flatten()
        .map(|v| &**v)
        .chain(self.extra.iter().map(|(_, v)| &**v))
    }
}

/// A JSON string, borrowed from the input when it has no escapes. (serde's own `Cow<str>`
/// always copies, `#[serde(borrow)]` or not, when it is inside an `Option`.)
pub struct JsonStr<'de>(pub std::borrow::Cow<'de, str>);

impl<'de: 'a, 'a> Deserialize<'de> for JsonStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = JsonStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(JsonStr(v.into()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(JsonStr(v.to_owned().into()))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

impl std::ops::Deref for JsonStr<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

/// A string or null.
fn text<'de, A: MapAccess<'de>>(map: &mut A, field: &str) -> Result<Option<Text<'de>>, A::Error> {
    map.next_value::<Option<JsonStr<'de>>>()
        .map(|v| v.map(|s| s.0))
        .map_err(|_| de::Error::custom(format!("`{field}` must be a string")))
}

/// A string, a number (kept as the text it was sent as: read as a number, two ids above 2^53
/// could become one) or null.
fn id<'de, A: MapAccess<'de>>(map: &mut A, field: &str) -> Result<Option<Text<'de>>, A::Error> {
    // Borrowed: messages are read from text in memory, never from a stream.
    let raw: &'de RawValue = map.next_value()?;
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') if !text.contains('\\') => Ok(Some(Cow::Borrowed(&text[1..text.len() - 1]))),
        Some(b'"') => serde_json::from_str::<String>(text)
            .map(|s| Some(Cow::Owned(s)))
            .map_err(de::Error::custom),
        Some(b'n') => Ok(None),
        Some(b'-' | b'0'..=b'9') => Ok(Some(Cow::Borrowed(text))),
        _ => Err(de::Error::custom(format!("`{field}` must be a string"))),
    }
}

/// An object or null; anything else is refused.
fn object<'de, A: MapAccess<'de>>(map: &mut A, field: &str) -> Result<Option<Json<'de>>, A::Error> {
    let raw: &'de RawValue = map.next_value()?;
    match raw.get().as_bytes().first() {
        Some(b'{') => Ok(Some(Cow::Borrowed(raw))),
        Some(b'n') => Ok(None),
        _ => Err(de::Error::custom(format!("`{field}` must be an object"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<RawMessage<'_>, serde_json::Error> {
        serde_json::from_str(json)
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
    fn escaped_keys_are_read() {
        let m = parse(r#"{"user\u0049d":"u1"}"#).unwrap();
        assert_eq!(m.user_id.as_deref(), Some("u1"));
    }
}
