//! The words every stage shares: Segment's message types, a borrowed JSON string, times as the
//! spec writes them, and the names Sluice reserves. This module imports nothing of Sluice, so
//! anything may import it; [`crate::entry`], the format of one log record, stands beside it.

mod time;

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

pub use time::{format_time, parse_time, to_micros, write_time};

/// The source name of the records Sluice writes itself (segment changes, clock readings), which no
/// configured source may take.
pub const SOURCE: &str = "sluice";

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
