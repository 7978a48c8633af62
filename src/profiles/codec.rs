//! The stored form of a profile: a compact binary encoding written by hand.
//!
//! A profile is rewritten whole every time it changes, so its encoding is on the profile stage's
//! hot path: going through serde (postcard) cost about a quarter of the stage's time, most of it
//! per-field calls and buffer growth. This writes into one reused buffer and reads without
//! copying more than the profile's own strings.
//!
//! Layout (integers are LEB128 varints, signed ones zigzag-encoded; strings are a length and
//! UTF-8; `f64` is 8 bytes little-endian):
//!
//! ```text
//! FORMAT id user_id? [anonymous_id] traits-as-JSON first_seen last_seen
//! [name count first last-first first_properties? last_properties?]      events
//! [name]                                                               names
//! [name-place [time] values?]                                          history, per name
//! [key flags changes since recheck_at?]                                memberships
//! ```
//!
//! A list is its length, then its items; `x?` is a byte 0 or 1, then `x` if 1. A `name` (an event,
//! property or segment name) is its number in the store's [`Dictionary`] plus one, or 0 and the
//! name in full when it has no number. A history series is one event name's occurrences
//! ([`super::history`]): the first time in full, each later one as its (unsigned) step from the
//! one before, a few bytes instead of eight; `values`, when present, is one `[property-place
//! value]` list per occurrence. Names read in full are interned as they are read; numbered ones
//! are the dictionary's, shared alike. A decoding error names what it was reading; it never
//! panics, whatever the bytes.
//!
//! Formats 1 and 2 wrote every name in full (1 also kept one history list of every name in time
//! order, `[name-place time-step [property-place value]]`); both are still read (a store written
//! by an earlier build), and each profile is rewritten in format 3 when it next changes.

use serde_json::Map;

use super::dictionary::Dictionary;
use super::history::{History, Series};
use super::profile::{intern, EventStats, Membership, Millis, Name, Profile, Values};

/// The first byte of every encoded profile; a store written in another format does not decode.
const FORMAT: u8 = 3;
/// The format before names were numbered, still read.
const FORMAT_NAMES_IN_FULL: u8 = 2;
/// The format before history was kept per name, still read.
const FORMAT_ONE_LIST: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("stored profile: {0}")]
pub struct CodecError(String);

/// Appends `p`'s encoding to `out`, numbering in `words` the names that have no number yet.
pub fn encode(p: &Profile, words: &Dictionary, out: &mut Vec<u8>) {
    let mut w = Writer { out, words };
    w.byte(FORMAT);
    w.unsigned(p.id);
    w.option(p.user_id.as_deref(), Writer::string);
    w.list(&p.anonymous_ids, |w, a| w.string(a));
    if p.traits.is_empty() {
        w.string("");
    } else {
        // Traits are JSON values of any shape: kept as JSON text.
        w.string(&serde_json::to_string(&p.traits).expect("a JSON map always serializes"));
    }
    w.signed(p.first_seen);
    w.signed(p.last_seen);
    w.list(&p.events, |w, (name, s)| {
        w.name(name);
        w.unsigned(s.count);
        w.signed(s.first);
        w.signed(s.last.wrapping_sub(s.first));
        w.option(s.first_properties.as_deref(), Writer::string);
        w.option(s.last_properties.as_deref(), Writer::string);
    });
    w.list(&p.names, |w, n| w.name(n));
    w.list(p.history.series(), |w, s| {
        w.unsigned(u64::from(s.name));
        let mut previous = None;
        w.list(s.times(), |w, at| {
            match previous {
                None => w.signed(at),
                Some(before) => w.unsigned(at.wrapping_sub(before) as u64),
            }
            previous = Some(at);
        });
        let has_values = s.has_values();
        w.byte(u8::from(has_values));
        if has_values {
            for i in 0..s.len() {
                w.list(s.values(i), |w, (place, value)| {
                    w.unsigned(u64::from(*place));
                    w.out.extend_from_slice(&value.to_le_bytes());
                });
            }
        }
    });
    w.unsigned(p.memberships.len() as u64);
    for (key, m) in p.memberships.iter() {
        w.name(key);
        w.byte(u8::from(m.member));
        w.unsigned(u64::from(m.changes));
        w.signed(m.since);
        w.option(m.recheck_at, Writer::signed);
    }
}

/// The profile `bytes` encode, its numbered names read from `words`.
pub fn decode(bytes: &[u8], words: &Dictionary) -> Result<Profile, CodecError> {
    words.names(|words| decode_with(bytes, words))
}

fn decode_with(bytes: &[u8], words: &[Name]) -> Result<Profile, CodecError> {
    let mut r = Reader {
        bytes,
        at: 0,
        words: None,
    };
    let format = r.byte("format")?;
    match format {
        FORMAT => r.words = Some(words),
        FORMAT_NAMES_IN_FULL | FORMAT_ONE_LIST => {}
        _ => {
            return Err(CodecError(format!(
                "format {format}, this build reads formats {FORMAT_ONE_LIST} to {FORMAT}"
            )))
        }
    }
    let id = r.unsigned("id")?;
    let user_id = r.option("userId", |r| r.string("userId"))?;
    let anonymous_ids = r.list("anonymousIds", |r| r.string("anonymousId"))?;
    let traits_text = r.str("traits")?;
    let traits = if traits_text.is_empty() {
        Map::new()
    } else {
        serde_json::from_str(traits_text).map_err(|e| CodecError(format!("traits: {e}")))?
    };
    let first_seen = r.signed("first_seen")?;
    let last_seen = r.signed("last_seen")?;
    let events = r
        .list("events", |r| {
            let name = r.name("event name")?;
            let count = r.unsigned("event count")?;
            let first = r.signed("event first")?;
            let last = first.wrapping_add(r.signed("event last")?);
            let first_properties = r.option("event properties", |r| r.string("properties"))?;
            let last_properties = r.option("event properties", |r| r.string("properties"))?;
            Ok((
                name,
                EventStats {
                    count,
                    first,
                    last,
                    first_properties,
                    last_properties,
                },
            ))
        })?
        .into_iter()
        .collect();
    let names = r.list("names", |r| r.name("name"))?;
    let history = if format == FORMAT_ONE_LIST {
        r.one_list_history()?
    } else {
        History::from_series(r.list("history", Reader::series)?)
    };
    let memberships = r
        .list("memberships", |r| {
            let key = r.name("segment key")?;
            let member = r.byte("membership")? & 1 == 1;
            let changes = u32::try_from(r.unsigned("membership changes")?)
                .map_err(|_| CodecError("membership changes past u32".into()))?;
            let since = r.signed("membership since")?;
            let recheck_at = r.option("recheck_at", |r| r.signed("recheck_at"))?;
            Ok((
                key,
                Membership {
                    member,
                    changes,
                    since,
                    recheck_at,
                },
            ))
        })?
        .into_iter()
        .collect();
    if r.at != bytes.len() {
        return Err(CodecError(format!(
            "{} bytes after the profile",
            bytes.len() - r.at
        )));
    }
    Ok(Profile {
        id,
        user_id,
        anonymous_ids,
        traits,
        first_seen,
        last_seen,
        events,
        names,
        history,
        memberships,
    })
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    words: &'a Dictionary,
}

impl Writer<'_> {
    fn byte(&mut self, b: u8) {
        self.out.push(b);
    }

    fn unsigned(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.out.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.out.push(v as u8);
    }

    fn signed(&mut self, v: i64) {
        self.unsigned(((v << 1) ^ (v >> 63)) as u64);
    }

    fn string(&mut self, s: &str) {
        self.unsigned(s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }

    fn name(&mut self, name: &str) {
        match self.words.number(name) {
            Some(id) => self.unsigned(u64::from(id) + 1),
            None => {
                self.unsigned(0);
                self.string(name);
            }
        }
    }

    fn option<T>(&mut self, v: Option<T>, write: impl FnOnce(&mut Self, T)) {
        match v {
            Some(v) => {
                self.byte(1);
                write(self, v);
            }
            None => self.byte(0),
        }
    }

    fn list<I: IntoIterator>(&mut self, items: I, mut write: impl FnMut(&mut Self, I::Item))
    where
        I::IntoIter: ExactSizeIterator,
    {
        let items = items.into_iter();
        self.unsigned(items.len() as u64);
        for item in items {
            write(self, item);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// The dictionary's names by number, for a format that numbers names.
    words: Option<&'a [Name]>,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], CodecError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| CodecError(format!("ends inside {what}")))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn byte(&mut self, what: &str) -> Result<u8, CodecError> {
        Ok(self.take(1, what)?[0])
    }

    fn unsigned(&mut self, what: &str) -> Result<u64, CodecError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte(what)?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError(format!("{what}: varint too long")))
    }

    fn signed(&mut self, what: &str) -> Result<i64, CodecError> {
        let v = self.unsigned(what)?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn place(&mut self, what: &str) -> Result<u16, CodecError> {
        u16::try_from(self.unsigned(what)?).map_err(|_| CodecError(format!("{what} past u16")))
    }

    fn str(&mut self, what: &str) -> Result<&'a str, CodecError> {
        let len = usize::try_from(self.unsigned(what)?)
            .map_err(|_| CodecError(format!("{what}: length past usize")))?;
        std::str::from_utf8(self.take(len, what)?)
            .map_err(|_| CodecError(format!("{what}: not UTF-8")))
    }

    fn string(&mut self, what: &str) -> Result<String, CodecError> {
        self.str(what).map(str::to_string)
    }

    fn name(&mut self, what: &str) -> Result<Name, CodecError> {
        let Some(words) = self.words else {
            return self.str(what).map(intern);
        };
        match self.unsigned(what)? {
            0 => self.str(what).map(intern),
            n => usize::try_from(n - 1)
                .ok()
                .and_then(|id| words.get(id))
                .cloned()
                .ok_or_else(|| CodecError(format!("{what}: name number {} is unknown", n - 1))),
        }
    }

    fn option<T>(
        &mut self,
        what: &str,
        read: impl FnOnce(&mut Self) -> Result<T, CodecError>,
    ) -> Result<Option<T>, CodecError> {
        match self.byte(what)? {
            0 => Ok(None),
            1 => read(self).map(Some),
            b => Err(CodecError(format!("{what}: option byte {b}"))),
        }
    }

    /// The length of a list.
    fn count(&mut self, what: &str) -> Result<usize, CodecError> {
        let len = self.unsigned(what)?;
        // Every item takes at least one byte: a length past what is left is damage, and must not
        // reserve memory.
        if len > (self.bytes.len() - self.at) as u64 {
            return Err(CodecError(format!("{what}: {len} items in fewer bytes")));
        }
        Ok(len as usize)
    }

    fn list<T>(
        &mut self,
        what: &str,
        mut read: impl FnMut(&mut Self) -> Result<T, CodecError>,
    ) -> Result<Vec<T>, CodecError> {
        let len = self.count(what)?;
        let mut items = Vec::with_capacity(len);
        for _ in 0..len {
            items.push(read(self)?);
        }
        Ok(items)
    }

    /// One event name's occurrences (format 2).
    fn series(&mut self) -> Result<Series, CodecError> {
        let name = self.place("history name")?;
        let count = self.count("occurrences")?;
        let mut times: Vec<Millis> = Vec::with_capacity(count);
        for i in 0..count {
            let at = if i == 0 {
                self.signed("occurrence time")?
            } else {
                let step = i64::try_from(self.unsigned("occurrence time")?).ok();
                step.and_then(|step| times[i - 1].checked_add(step))
                    .ok_or_else(|| CodecError("occurrence time past the last one".into()))?
            };
            times.push(at);
        }
        let values = match self.byte("occurrence values")? {
            0 => Vec::new(),
            1 => (0..count)
                .map(|_| self.values())
                .collect::<Result<_, _>>()?,
            b => return Err(CodecError(format!("occurrence values: flag byte {b}"))),
        };
        Ok(Series::from_parts(name, times, values))
    }

    /// The numbers kept with one occurrence.
    fn values(&mut self) -> Result<Values, CodecError> {
        let count = self.count("occurrence values")?;
        let mut values = Values::with_capacity(count);
        for _ in 0..count {
            let place = self.place("property name")?;
            let value = f64::from_le_bytes(self.take(8, "property value")?.try_into().unwrap());
            values.push((place, value));
        }
        Ok(values)
    }

    /// The history of format 1: one list of every name's occurrences in time order, split into
    /// series (each allocated once, to its length).
    fn one_list_history(&mut self) -> Result<History, CodecError> {
        let count = self.count("history")?;
        let mut occurrences = Vec::with_capacity(count);
        let mut at: Millis = 0;
        for _ in 0..count {
            let name = self.place("occurrence name")?;
            at = at.wrapping_add(self.signed("occurrence time")?);
            occurrences.push((name, at, self.values()?));
        }
        // Stable: each name's occurrences stay in the order written, which was time order (a
        // damaged record's are sorted, as a series must be).
        occurrences.sort_by_key(|(name, at, _)| (*name, *at));
        let mut series = Vec::new();
        for run in occurrences.chunk_by(|a, b| a.0 == b.0) {
            let times = run.iter().map(|o| o.1).collect();
            let values = if run.iter().any(|o| !o.2.is_empty()) {
                run.iter().map(|o| o.2.clone()).collect()
            } else {
                Vec::new()
            };
            series.push((run[0].1, Series::from_parts(run[0].0, times, values)));
        }
        // Series in the order their names first came, as recording them would give.
        series.sort_by_key(|(first, _)| *first);
        Ok(History::from_series(
            series.into_iter().map(|(_, s)| s).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rich() -> Profile {
        let mut p = Profile::new(7);
        p.user_id = Some("ü-1".into());
        p.add_anonymous_id("anon-1");
        p.add_anonymous_id("anon-2");
        p.traits
            .insert("nested".into(), serde_json::json!({"a": [1, 2.5, null]}));
        p.traits.insert("plan".into(), "pro".into());
        p.first_seen = -5;
        p.last_seen = 1_767_225_600_000;
        p.events.insert(
            "Order Completed".into(),
            EventStats {
                count: 3,
                first: 1_000,
                last: 900,
                first_properties: Some(r#"{"revenue":1}"#.into()),
                last_properties: None,
            },
        );
        p.memberships.insert(
            "vip",
            Membership {
                member: true,
                changes: u32::MAX,
                since: 5,
                recheck_at: Some(-9),
            },
        );
        p.memberships.insert("gone", Membership::default());
        let t = 1_767_225_600_000;
        let revenue = |x| vec![("revenue".to_string(), x)];
        p.record("Order Completed", t, &revenue(30.5));
        p.record("Page Viewed", t, &[]);
        p.record("Order Completed", t - 60_000, &revenue(f64::MIN));
        p.record("Order Completed", t + 1, &revenue(-0.0));
        p
    }

    /// The dictionary these tests share (names keep their numbers across tests, as in a store).
    fn words() -> &'static Dictionary {
        static WORDS: std::sync::OnceLock<Dictionary> = std::sync::OnceLock::new();
        WORDS.get_or_init(Dictionary::default)
    }

    fn encoded(p: &Profile) -> Vec<u8> {
        let mut out = Vec::new();
        encode(p, words(), &mut out);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Profile, CodecError> {
        super::decode(bytes, words())
    }

    fn from_hex(hex: &str) -> Vec<u8> {
        hex.as_bytes()
            .chunks(2)
            .map(|b| u8::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn round_trips() {
        for p in [Profile::new(0), Profile::new(u64::MAX), rich()] {
            assert_eq!(decode(&encoded(&p)).unwrap(), p);
        }
    }

    #[test]
    fn names_are_read_shared() {
        let bytes = encoded(&rich());
        let (p, q) = (decode(&bytes).unwrap(), decode(&bytes).unwrap());
        let names = |p: &Profile| {
            let (event, _) = p.events.first_key_value().unwrap();
            let (segment, _) = p.memberships.iter().next().unwrap();
            [event.clone(), segment.clone(), p.names[0].clone()]
        };
        for (a, b) in names(&p).iter().zip(&names(&q)) {
            assert!(std::sync::Arc::ptr_eq(a, b), "{a}");
        }
    }

    #[test]
    fn numbered_names_take_a_byte_and_need_their_dictionary() {
        let p = rich();
        let numbered = encoded(&p);
        let full = Dictionary::with_saved(Vec::new());
        for i in 0..super::super::dictionary::MAX_WORDS {
            full.number(&format!("{i}"));
        }
        let mut in_full = Vec::new();
        encode(&p, &full, &mut in_full);
        assert_eq!(
            super::decode(&in_full, &full).unwrap(),
            p,
            "a full dictionary"
        );
        // "Order Completed" (an event, and a name of the history), "revenue", "Page Viewed",
        // "vip", "gone": each a byte (a number below 127), not 0, its length and its text.
        let names: usize = [15, 15, 7, 11, 3, 4].iter().map(|len| 1 + len).sum();
        assert_eq!(in_full.len() - numbered.len(), names);
        let error = super::decode(&numbered, &Dictionary::default()).unwrap_err();
        assert!(error.to_string().contains("is unknown"), "{error}");
    }

    #[test]
    fn appends_to_what_the_buffer_holds() {
        let p = rich();
        let mut out = vec![9, 9];
        encode(&p, words(), &mut out);
        assert_eq!(decode(&out[2..]).unwrap(), p);
    }

    #[test]
    fn damaged_bytes_give_an_error_not_a_panic() {
        let bytes = encoded(&rich());
        for end in 0..bytes.len() {
            assert!(decode(&bytes[..end]).is_err(), "cut at {end}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        for i in 0..bytes.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[i] ^= flip;
                let _ = decode(&damaged); // must return, whatever it returns
            }
        }
        // A huge list length must not reserve memory.
        let mut huge = vec![FORMAT, 1, 0];
        huge.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(decode(&huge).is_err());
    }

    /// `rich()` as the build before history per name stored it.
    const RICH_IN_FORMAT_ONE: &str = "01070104c3bc2d310206616e6f6e2d3106616e6f6e2d322a7b226e6573746564223a7b2261223a5b312c322e352c6e756c6c5d7d2c22706c616e223a2270726f227d0980a0d5edee66010f4f7264657220436f6d706c6574656403d00fc701010d7b22726576656e7565223a317d00030f4f7264657220436f6d706c6574656407726576656e75650b50616765205669657765640400c0f6cdedee660101ffffffffffffefff00c0a90701010000000000803e40020000000201010000000000000080020376697001ffffffff0f0a011104676f6e6500000000";

    /// `rich()` as the build before numbered names stored it.
    const RICH_IN_FORMAT_TWO: &str = "02070104c3bc2d310206616e6f6e2d3106616e6f6e2d322a7b226e6573746564223a7b2261223a5b312c322e352c6e756c6c5d7d2c22706c616e223a2270726f227d0980a0d5edee66010f4f7264657220436f6d706c6574656403d00fc701010d7b22726576656e7565223a317d00030f4f7264657220436f6d706c6574656407726576656e75650b5061676520566965776564020003c0f6cdedee66e0d40301010101ffffffffffffefff01010000000000803e4001010000000000000080020180a0d5edee6600020376697001ffffffff0f0a011104676f6e6500000000";

    #[test]
    fn format_two_is_still_read() {
        assert_eq!(decode(&from_hex(RICH_IN_FORMAT_TWO)).unwrap(), rich());
    }

    #[test]
    fn format_one_is_still_read() {
        assert_eq!(decode(&from_hex(RICH_IN_FORMAT_ONE)).unwrap(), rich());
        assert_eq!(
            encoded(&rich())[0],
            FORMAT,
            "and written in the current one"
        );
    }

    #[test]
    fn out_of_order_times_are_damage() {
        let mut p = Profile::new(1);
        p.history.record(0, 5, Values::new());
        p.history.record(0, 7, Values::new());
        p.names.push(intern("A"));
        let mut bytes = encoded(&p);
        // The last step (7 - 5, one byte 0x04 before the values flag and the memberships) made
        // larger than u64 allows as an i64.
        let step = bytes.len() - 3;
        assert_eq!(bytes[step], 2);
        bytes.splice(step..=step, [0xff; 9].into_iter().chain([0x01]));
        assert!(decode(&bytes)
            .unwrap_err()
            .to_string()
            .contains("occurrence time"));
    }

    #[test]
    fn another_format_is_refused_by_name() {
        let mut bytes = encoded(&rich());
        bytes[0] = FORMAT + 1;
        assert!(decode(&bytes).unwrap_err().to_string().contains("format"));
    }

    #[test]
    fn an_occurrence_takes_a_few_bytes() {
        // Each name once and small time steps: an order with its revenue takes 14 bytes, about
        // a third of writing out its names and time.
        let mut p = rich();
        let before = encoded(&p).len();
        let t = 1_767_225_700_000;
        for i in 0..100 {
            p.record(
                "Order Completed",
                t + i * 60_000,
                &[("revenue".to_string(), 2.0)],
            );
        }
        let per_entry = (encoded(&p).len() - before) / 100;
        assert!(per_entry <= 14, "{per_entry} bytes per entry");
    }
}
