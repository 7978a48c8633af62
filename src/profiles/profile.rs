//! One person's profile: identifiers, merged traits, per event name counters, the recent history
//! that the loaded segment rules need, and the person's segment memberships. Pure data: applying a
//! message and merging two profiles touch nothing else.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Sets of names, with a fast hash: they are looked up for every message.
pub type Set<T> = hashbrown::HashSet<T>;
use Set as HashSet;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::vocabulary::{JsonStr, MessageType};

pub use super::history::History;
pub use super::memberships::{Membership, Memberships};

/// Times are milliseconds since the epoch.
pub type Millis = i64;

/// An event, property or segment name held by profiles: interned, so that a name is one
/// allocation shared by every profile rather than one per profile. Besides memory, that is
/// speed: a profile's names are read on every encode and lookup, and a private copy of each is
/// a cache miss of its own, while shared ones stay in the cache.
pub type Name = Arc<str>;

/// Names interned per thread, at most; past it, [`intern`] hands out private copies (event names
/// are chosen by clients, and the table must not grow without bound).
const MAX_INTERNED: usize = 65_536;

thread_local! {
    static INTERNED: RefCell<hashbrown::HashSet<Name>> = RefCell::new(hashbrown::HashSet::new());
}

/// `name` as a shared [`Name`]. Per thread, so that no lock is taken: the profile stage, which
/// holds nearly all profiles, is one thread.
pub fn intern(name: &str) -> Name {
    INTERNED.with_borrow_mut(|names| {
        if let Some(shared) = names.get(name) {
            return shared.clone();
        }
        let shared: Name = Arc::from(name);
        if names.len() < MAX_INTERNED {
            names.insert(shared.clone());
        }
        shared
    })
}

/// A profile keeps at most this many event names, anonymousIds, traits and history entries, so
/// that one noisy device cannot grow a profile without bound. What is past a cap is dropped and
/// counted ([`Dropped`]). The caps are drawn so that what a rule reads stays right:
/// - event names: past 500, a new name is counted only if a loaded rule names it (`did`,
///   `count`, `first`, `last`, `sum` with a literal name);
/// - anonymousIds: past 100, a new one is not linked to the profile (a message naming only it
///   makes a profile of its own); merges keep every one, so that each stays linked;
/// - history: at most 2,000 occurrences of each event name (its oldest dropped first), so page
///   views never push an order out of a sum, and 20,000 in all (the oldest first);
/// - traits: past 200, a new trait is dropped.
pub const MAX_EVENT_NAMES: usize = 500;
pub const MAX_ANONYMOUS_IDS: usize = 100;
pub const MAX_TRAITS: usize = 200;
pub const MAX_HISTORY_PER_NAME: usize = 2_000;
pub const MAX_HISTORY: usize = 20_000;
/// Names the history refers to, at most; past half of it, prune drops the unused ones.
pub const MAX_NAMES: usize = 4096;
/// Properties kept with a first or last occurrence are dropped past this size (bytes of JSON).
pub const MAX_KEPT_PROPERTIES: usize = 2048;

/// The name under which a message is counted: a track's event, and fixed names for page and
/// screen views; identify, group and alias are not events.
pub fn event_name(kind: MessageType, event: Option<&str>) -> Option<&str> {
    match kind {
        MessageType::Track => event,
        MessageType::Page => Some("Page Viewed"),
        MessageType::Screen => Some("Screen Viewed"),
        _ => None,
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    pub id: u64,
    /// A profile holds at most one userId: two are never merged.
    pub user_id: Option<String>,
    pub anonymous_ids: Vec<String>,
    pub traits: Map<String, Value>,
    pub first_seen: Millis,
    pub last_seen: Millis,
    pub events: BTreeMap<Name, EventStats>,
    /// The event and property names `history` refers to, each once, by place: a name is a
    /// string once per profile instead of once per occurrence, in memory and in the store.
    pub names: Vec<Name>,
    /// Occurrences inside the retention window, per event name.
    pub history: History,
    pub memberships: Memberships,
}

/// Which names' history may be past [`MAX_HISTORY_PER_NAME`] when a profile is pruned.
enum Over {
    Any,
    /// Only the name at this place (the one occurrence recorded since the last prune).
    Only(u16),
    Nothing,
}

/// What a profile dropped at its caps, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub event_names: u64,
    pub traits: u64,
    pub history: u64,
    pub anonymous_ids: u64,
}

impl Dropped {
    pub fn add(&mut self, other: Dropped) {
        self.event_names += other.event_names;
        self.traits += other.traits;
        self.history += other.history;
        self.anonymous_ids += other.anonymous_ids;
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventStats {
    pub count: u64,
    pub first: Millis,
    pub last: Millis,
    /// Properties of the first and last occurrence, as JSON, kept only for the event names whose
    /// `first`/`last` the rules look into.
    pub first_properties: Option<String>,
    pub last_properties: Option<String>,
}

/// The numeric properties kept with an occurrence for the rules that sum them, names by place in
/// [`Profile::names`]. Rules sum one property of an event, nearly always: one is kept in place,
/// as an allocation of its own per occurrence is a cache miss each time it is read or written.
pub type Values = smallvec::SmallVec<[(u16, f64); 1]>;

/// Which event names a retention setting covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Names {
    All,
    Only(HashSet<String>),
}

impl Default for Names {
    fn default() -> Self {
        Names::Only(HashSet::new())
    }
}

impl Retention {
    /// Keeps what either needs.
    pub fn union(&mut self, other: &Retention) {
        self.window = self.window.max(other.window);
        self.history.union(&other.history);
        self.objects.union(&other.objects);
        self.read.union(&other.read);
        self.values = match (self.values.take(), &other.values) {
            (Some(mut a), Some(b)) => {
                a.extend(b.iter().cloned());
                Some(a)
            }
            _ => None,
        };
    }

    /// Needs nothing: keeps no history and no values.
    pub fn nothing() -> Retention {
        Retention {
            values: Some(HashSet::new()),
            ..Retention::default()
        }
    }
}

impl Names {
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Names::All => true,
            Names::Only(names) => names.contains(name),
        }
    }

    /// Whether `name` is one of the names listed (`All` lists none).
    pub fn lists(&self, name: &str) -> bool {
        matches!(self, Names::Only(names) if names.contains(name))
    }

    pub fn union(&mut self, other: &Names) {
        match (&mut *self, other) {
            (Names::All, _) => {}
            (_, Names::All) => *self = Names::All,
            (Names::Only(a), Names::Only(b)) => a.extend(b.iter().cloned()),
        }
    }
}

/// What the loaded rules need a profile to keep besides its counters (from the rules' analysis).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retention {
    /// How far back history reaches.
    pub window: Millis,
    /// Event names whose occurrences are kept.
    pub history: Names,
    /// Numeric properties kept per occurrence, as (event, property); `None`: every top-level number.
    pub values: Option<HashSet<(String, String)>>,
    /// Event names whose first and last occurrence keep their properties.
    pub objects: Names,
    /// Event names the rules read by name: counted even past [`MAX_EVENT_NAMES`].
    pub read: Names,
}

/// The parts of a message a profile learns from.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub kind: MessageType,
    pub event: Option<&'a str>,
    pub at: Millis,
    pub properties: Option<&'a RawValue>,
    pub traits: Option<&'a RawValue>,
}

impl Profile {
    pub fn new(id: u64) -> Profile {
        Profile {
            id,
            ..Profile::default()
        }
    }

    /// Every identifier, as `user:<id>` / `anon:<id>` keys of the identity index.
    pub fn identity_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.user_id.iter().map(|u| user_key(u)).collect();
        keys.extend(self.anonymous_ids.iter().map(|a| anonymous_key(a)));
        keys
    }

    /// Whether the profile holds the anonymousId `id`, or can take it (under its cap).
    pub fn has_room_for_anonymous_id(&self, id: &str) -> bool {
        self.anonymous_ids.len() < MAX_ANONYMOUS_IDS || self.anonymous_ids.iter().any(|a| a == id)
    }

    /// Adds the anonymousId `id`, whatever the cap (the caller links it only if
    /// [`Profile::has_room_for_anonymous_id`]).
    pub fn add_anonymous_id(&mut self, id: &str) {
        if !self.anonymous_ids.iter().any(|a| a == id) {
            self.anonymous_ids.push(id.to_string());
        }
    }

    /// Learns from one message. `now` bounds the history window. Returns what the caps dropped.
    pub fn apply(&mut self, m: &Observed, retention: &Retention, now: Millis) -> Dropped {
        let mut dropped = Dropped::default();
        if self.first_seen == 0 || m.at < self.first_seen {
            self.first_seen = m.at;
        }
        self.last_seen = self.last_seen.max(m.at);
        if m.kind == MessageType::Identify {
            if let Some(Value::Object(traits)) = m.traits.and_then(|t| parse(t.get())) {
                for (k, v) in traits {
                    if self.traits.len() < MAX_TRAITS || self.traits.contains_key(&k) {
                        self.traits.insert(k, v);
                    } else {
                        dropped.traits += 1;
                    }
                }
            }
        }
        let Some(name) = event_name(m.kind, m.event) else {
            return dropped;
        };
        let keep_object = retention.objects.contains(name);
        let properties = || {
            m.properties
                .map(|p| p.get())
                .filter(|p| keep_object && p.len() <= MAX_KEPT_PROPERTIES)
                .map(str::to_string)
        };
        let room = self.events.len() < MAX_EVENT_NAMES || retention.read.lists(name);
        match self.events.get_mut(name) {
            Some(stats) => {
                stats.count += 1;
                if m.at < stats.first {
                    stats.first = m.at;
                    stats.first_properties = properties();
                }
                if m.at >= stats.last {
                    stats.last = m.at;
                    stats.last_properties = properties();
                }
            }
            None if room => {
                let kept = properties();
                self.events.insert(
                    intern(name),
                    EventStats {
                        count: 1,
                        first: m.at,
                        last: m.at,
                        first_properties: kept.clone(),
                        last_properties: kept,
                    },
                );
            }
            None => dropped.event_names += 1,
        }
        let recorded = if retention.history.contains(name) && m.at >= now - retention.window {
            let values = numeric_values(
                name,
                m.properties.map(RawValue::get),
                retention.values.as_ref(),
            );
            self.record(name, m.at, &values)
        } else {
            None
        };
        // Each name is within its cap after every prune: only the one recorded can be past it.
        let over = recorded.map_or(Over::Nothing, Over::Only);
        dropped.history += self.prune_past(retention, now, over);
        dropped
    }

    /// The place of `name` in [`Profile::names`], added if new; `None` when the table is full.
    fn place(&mut self, name: &str) -> Option<u16> {
        if let Some(i) = self.find(name) {
            return Some(i);
        }
        if self.names.len() >= MAX_NAMES {
            return None;
        }
        self.names.push(intern(name));
        Some((self.names.len() - 1) as u16)
    }

    /// The place of `name`, if the history refers to it. A profile's history uses a handful of
    /// names: a scan beats hashing them.
    pub fn find(&self, name: &str) -> Option<u16> {
        self.names
            .iter()
            .position(|n| &**n == name)
            .map(|i| i as u16)
    }

    /// The name at `place` ("" for a place past the table, which a damaged record could hold).
    pub fn name(&self, place: u16) -> &str {
        name_at(&self.names, place)
    }

    /// Adds an occurrence to the history, after those at the same time.
    /// Returns the name's place, or `None` when the name table is full (nothing is recorded).
    pub fn record(&mut self, name: &str, at: Millis, values: &[(String, f64)]) -> Option<u16> {
        let name = self.place(name)?;
        let values = self.places_of(values);
        self.history.record(name, at, values);
        Some(name)
    }

    /// `values` with their names as places (those the name table has no room for left out).
    fn places_of(&mut self, values: &[(String, f64)]) -> Values {
        values
            .iter()
            .filter_map(|(k, v)| Some((self.place(k)?, *v)))
            .collect()
    }

    /// How many occurrences of `name` at `at` the history holds.
    pub fn count_at(&self, name: &str, at: Millis) -> usize {
        let series = self.find(name).and_then(|place| self.history.get(place));
        series.map_or(0, |s| s.between(at, at).len())
    }

    /// Adds to the `nth` occurrence of `name` at `at` the `values` it does not hold (an
    /// occurrence read back from the lake for a rule that sums what the profile did not keep).
    pub fn add_values(&mut self, name: &str, at: Millis, nth: usize, values: &[(String, f64)]) {
        let Some(place) = self.find(name) else {
            return;
        };
        if self.count_at(name, at) <= nth {
            return;
        }
        let values = self.places_of(values);
        let Some(held) = self.history.values_at(place, at, nth) else {
            return;
        };
        for (key, value) in values {
            if !held.iter().any(|(k, _)| *k == key) {
                held.push((key, value));
            }
        }
    }

    /// Drops history outside the window, and the oldest entries past the caps. Returns how many
    /// entries the caps dropped (what leaves with the window is not a drop).
    pub fn prune(&mut self, retention: &Retention, now: Millis) -> u64 {
        self.prune_past(retention, now, Over::Any)
    }

    /// [`Profile::prune`], knowing which names may be past [`MAX_HISTORY_PER_NAME`] (after a
    /// message, only the one it recorded).
    fn prune_past(&mut self, retention: &Retention, now: Millis, over_cap: Over) -> u64 {
        // Occurrences of names no longer needed are not hunted down here (that would cost a
        // lookup per name per message): they leave with the window or the caps.
        self.history.drop_before(now - retention.window);
        let mut dropped = self.history.cap_total(MAX_HISTORY);
        dropped += match over_cap {
            Over::Any => self.history.cap_each_name(MAX_HISTORY_PER_NAME),
            Over::Only(place) => self.history.cap_name(place, MAX_HISTORY_PER_NAME),
            Over::Nothing => 0,
        };
        if self.names.len() > MAX_NAMES / 2 {
            self.compact_names();
        }
        dropped
    }

    /// Drops the names no occurrence refers to any more.
    fn compact_names(&mut self) {
        // A place past the table (a damaged record could hold one) stays past it: `name` gives "".
        const PAST: u16 = u16::MAX;
        let mut used = vec![false; self.names.len()];
        for place in self.history.places() {
            if let Some(u) = used.get_mut(usize::from(place)) {
                *u = true;
            }
        }
        let mut moved = Vec::with_capacity(self.names.len());
        for (name, used) in std::mem::take(&mut self.names).into_iter().zip(used) {
            moved.push(if used { self.names.len() as u16 } else { PAST });
            if used {
                self.names.push(name);
            }
        }
        self.history
            .renumber(|place| moved.get(usize::from(place)).copied().unwrap_or(PAST));
    }

    /// Takes in everything `other` knows (its messages are disjoint from ours, so counts add).
    /// Our traits win over `other`'s where both have one: `self` is the surviving profile. Every
    /// anonymousId is kept, past the cap too: each is linked to a profile, and the merge moves
    /// those links here. Returns what the caps dropped.
    pub fn merge(&mut self, other: Profile, retention: &Retention) -> Dropped {
        let mut dropped = Dropped::default();
        if self.user_id.is_none() {
            self.user_id = other.user_id;
        }
        for a in &other.anonymous_ids {
            self.add_anonymous_id(a);
        }
        for (k, v) in other.traits {
            if self.traits.contains_key(&k) {
                continue;
            }
            if self.traits.len() < MAX_TRAITS {
                self.traits.insert(k, v);
            } else {
                dropped.traits += 1;
            }
        }
        if other.first_seen != 0 && (self.first_seen == 0 || other.first_seen < self.first_seen) {
            self.first_seen = other.first_seen;
        }
        self.last_seen = self.last_seen.max(other.last_seen);
        for (name, theirs) in other.events {
            let room = self.events.len() < MAX_EVENT_NAMES || retention.read.lists(&name);
            match self.events.get_mut(&name) {
                Some(ours) => {
                    ours.count += theirs.count;
                    if theirs.first < ours.first {
                        ours.first = theirs.first;
                        ours.first_properties = theirs.first_properties;
                    }
                    if theirs.last > ours.last {
                        ours.last = theirs.last;
                        ours.last_properties = theirs.last_properties;
                    }
                }
                None if room => {
                    self.events.insert(name, theirs);
                }
                None => dropped.event_names += 1,
            }
        }
        for theirs in other.history.series() {
            let Some(name) = self.place(name_at(&other.names, theirs.name)) else {
                continue;
            };
            let occurrences: Vec<(Millis, Values)> = (0..theirs.len())
                .map(|i| {
                    let values = theirs
                        .values(i)
                        .iter()
                        .filter_map(|(k, v)| Some((self.place(name_at(&other.names, *k))?, *v)))
                        .collect();
                    (theirs.time(i), values)
                })
                .collect();
            self.history.merge(name, occurrences);
        }
        dropped.history += self.history.cap_total(MAX_HISTORY);
        dropped.history += self.history.cap_each_name(MAX_HISTORY_PER_NAME);
        for (key, theirs) in other.memberships.into_pairs() {
            let ours = self.memberships.entry(&key);
            ours.member |= theirs.member;
            ours.changes = ours.changes.max(theirs.changes);
            ours.recheck_at = match (ours.recheck_at, theirs.recheck_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        dropped
    }

    /// The earliest moment any segment asked to be looked at again.
    pub fn next_recheck(&self) -> Option<Millis> {
        self.memberships.next_recheck()
    }

    /// Keys of the segments this profile is in.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.memberships
            .iter()
            .filter(|(_, m)| m.member)
            .map(|(k, _)| &**k)
    }
}

fn name_at(names: &[Name], place: u16) -> &str {
    names.get(usize::from(place)).map_or("", |n| n)
}

pub fn user_key(user_id: &str) -> String {
    format!("user:{user_id}")
}

pub fn anonymous_key(anonymous_id: &str) -> String {
    format!("anon:{anonymous_id}")
}

fn parse(json: &str) -> Option<Value> {
    serde_json::from_str(json).ok()
}

/// The numbers among `properties` (a JSON object) that `wanted` asks to keep for event `name`
/// (every one when `wanted` is `None`), at most 32, in the object's order.
///
/// It reads the object in place rather than into a `serde_json::Value`: that built a map, a key
/// string and a value for every property of every message with a property some rule sums.
pub fn numeric_values(
    name: &str,
    properties: Option<&str>,
    wanted: Option<&HashSet<(String, String)>>,
) -> Vec<(String, f64)> {
    if let Some(wanted) = wanted {
        if !wanted.iter().any(|(event, _)| event == name) {
            return Vec::new();
        }
    }
    let Some(json) = properties else {
        return Vec::new();
    };
    let keep = |key: &str| wanted.is_none_or(|w| w.iter().any(|(e, p)| e == name && p == key));
    let mut found = Vec::new();
    let mut reader = serde_json::Deserializer::from_str(json);
    let numbers = Numbers {
        keep,
        found: &mut found,
    };
    if serde::Deserializer::deserialize_map(&mut reader, numbers).is_err() {
        // Not an object, or not JSON: no numbers (the edge only logs objects, so this is rare).
        found.clear();
    }
    found
}

/// Reads a JSON object's top-level numbers that `keep` names into `found`, skipping the rest.
struct Numbers<'f, K> {
    keep: K,
    found: &'f mut Vec<(String, f64)>,
}

impl<'de, K: Fn(&str) -> bool> serde::de::Visitor<'de> for Numbers<'_, K> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(JsonStr(key)) = map.next_key::<JsonStr<'de>>()? {
            let value: &RawValue = map.next_value()?;
            if self.found.len() >= 32 || !(self.keep)(&key) {
                continue;
            }
            let text = value.get();
            if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
                // A JSON number is also valid Rust float syntax.
                if let Some(n) = text.parse::<f64>().ok().filter(|n| n.is_finite()) {
                    self.found.push((key.into_owned(), n));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_string()).unwrap()
    }

    fn keep_all() -> Retention {
        Retention {
            window: 30 * 86_400_000,
            history: Names::All,
            values: None,
            objects: Names::All,
            read: Names::All,
        }
    }

    #[test]
    fn numeric_values_are_the_wanted_top_level_numbers() {
        let json = r#"{"revenue": 12.5, "tax": -1e2, "n\u0061me": 3, "sku": "7", "nested": {"revenue": 9},
            "list": [1, 2], "flag": true, "none": null, "big": 18446744073709551616}"#;
        let all = numeric_values("Order Completed", Some(json), None);
        assert_eq!(
            all,
            [
                ("revenue".to_string(), 12.5),
                ("tax".to_string(), -100.0),
                ("name".to_string(), 3.0),
                ("big".to_string(), 18446744073709551616.0),
            ]
        );
        let wanted: HashSet<(String, String)> =
            [("Order Completed".to_string(), "revenue".to_string())]
                .into_iter()
                .collect();
        assert_eq!(
            numeric_values("Order Completed", Some(json), Some(&wanted)),
            [("revenue".to_string(), 12.5)]
        );
        assert!(numeric_values("Page Viewed", Some(json), Some(&wanted)).is_empty());
        for not_an_object in ["[1, 2]", "3", "{\"a\": 1", "", "null"] {
            assert!(
                numeric_values("x", Some(not_an_object), None).is_empty(),
                "{not_an_object}"
            );
        }
        let many: String = (0..40)
            .map(|i| format!("\"k{i}\": {i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            numeric_values("x", Some(&format!("{{{many}}}")), None).len(),
            32
        );
    }

    #[test]
    fn a_name_is_shared_until_the_table_is_full() {
        let a = intern("Order Completed");
        assert!(Arc::ptr_eq(&a, &intern("Order Completed")));
        assert!(!Arc::ptr_eq(&a, &intern("Order Completed ")));
        for i in 0..MAX_INTERNED {
            intern(&format!("name {i}"));
        }
        let late = intern("late");
        assert_eq!(&*late, "late");
        assert!(
            !Arc::ptr_eq(&late, &intern("late")),
            "past the cap, a private copy"
        );
        assert!(Arc::ptr_eq(&a, &intern("Order Completed")));
    }

    #[test]
    fn counts_events_and_merges_traits() {
        let mut p = Profile::new(1);
        let props = raw(r#"{"revenue": 30, "currency": "EUR"}"#);
        let traits = raw(r#"{"plan": "pro", "email": "a@example.com"}"#);
        let r = keep_all();
        for at in [3_000, 1_000, 2_000] {
            let m = Observed {
                kind: MessageType::Track,
                event: Some("Order Completed"),
                at,
                properties: Some(&props),
                traits: None,
            };
            p.apply(&m, &r, 10_000);
        }
        let identify = Observed {
            kind: MessageType::Identify,
            event: None,
            at: 500,
            properties: None,
            traits: Some(&traits),
        };
        p.apply(&identify, &r, 10_000);
        let stats = &p.events["Order Completed"];
        assert_eq!((stats.count, stats.first, stats.last), (3, 1_000, 3_000));
        assert_eq!(p.first_seen, 500);
        assert_eq!(p.last_seen, 3_000);
        assert_eq!(p.traits["plan"], "pro");
        let history = p.history.occurrences();
        let times: Vec<_> = history.iter().map(|o| o.at).collect();
        assert_eq!(times, [1_000, 2_000, 3_000]);
        let (property, value) = history[0].values[0];
        assert_eq!((p.name(property), value), ("revenue", 30.0));
        assert_eq!(p.name(history[0].name), "Order Completed");
    }

    #[test]
    fn history_keeps_only_what_the_rules_need() {
        let mut p = Profile::new(1);
        let r = Retention {
            window: 1_000,
            history: Names::Only(["A".to_string()].into()),
            values: Some(HashSet::new()),
            objects: Names::default(),
            read: Names::default(),
        };
        for (name, at) in [("A", 100), ("B", 200), ("A", 5_000)] {
            let m = Observed {
                kind: MessageType::Track,
                event: Some(name),
                at,
                properties: None,
                traits: None,
            };
            p.apply(&m, &r, 5_000);
        }
        assert_eq!(
            p.history.len(),
            1,
            "B is not needed and A at 100 is outside the window"
        );
        assert_eq!(p.history.occurrences()[0].at, 5_000);
        assert_eq!(p.events["B"].count, 1, "counters keep every name");
        assert_eq!(p.events["A"].last_properties, None);
    }

    #[test]
    fn merge_adds_counts_and_keeps_history_sorted() {
        let r = keep_all();
        let mut a = Profile::new(1);
        a.user_id = Some("u1".into());
        a.traits.insert("plan".into(), "pro".into());
        let mut b = Profile::new(2);
        b.add_anonymous_id("anon-1");
        b.traits.insert("plan".into(), "free".into());
        b.traits.insert("utm".into(), "ad".into());
        let page = |at| Observed {
            kind: MessageType::Page,
            event: None,
            at,
            properties: None,
            traits: None,
        };
        a.apply(&page(2_000), &r, 4_000);
        b.apply(&page(1_000), &r, 4_000);
        b.apply(&page(3_000), &r, 4_000);
        a.merge(b, &r);
        let stats = &a.events["Page Viewed"];
        assert_eq!((stats.count, stats.first, stats.last), (3, 1_000, 3_000));
        assert_eq!(a.anonymous_ids, ["anon-1"]);
        assert_eq!(a.traits["plan"], "pro", "the survivor's traits win");
        assert_eq!(a.traits["utm"], "ad");
        let times: Vec<_> = a.history.occurrences().iter().map(|o| o.at).collect();
        assert_eq!(times, [1_000, 2_000, 3_000]);
        assert_eq!(a.identity_keys(), ["user:u1", "anon:anon-1"]);
    }

    #[test]
    fn occurrences_at_one_moment_are_counted_and_take_values_they_lack() {
        let mut p = Profile::new(1);
        let v = |k: &str, x: f64| vec![(k.to_string(), x)];
        for (name, at) in [("A", 1), ("B", 2), ("A", 2), ("A", 2), ("A", 3)] {
            p.record(name, at, &v("revenue", 1.0));
        }
        assert_eq!(p.count_at("A", 2), 2);
        assert_eq!(p.count_at("B", 2), 1);
        assert_eq!(p.count_at("A", 4), 0);
        assert_eq!(p.count_at("C", 2), 0);
        p.add_values("A", 2, 1, &[("revenue".into(), 9.0), ("tax".into(), 2.0)]);
        let a = p.history.get(p.find("A").unwrap()).unwrap();
        let values = |i: usize| -> Vec<(&str, f64)> {
            a.values(i).iter().map(|(k, v)| (p.name(*k), *v)).collect()
        };
        assert_eq!(values(1), [("revenue", 1.0)], "the first at 2 is untouched");
        assert_eq!(
            values(2),
            [("revenue", 1.0), ("tax", 2.0)],
            "what it holds stays; what it lacks is added"
        );
    }

    #[test]
    fn names_no_occurrence_uses_are_dropped_and_places_follow() {
        let mut p = Profile::new(1);
        let keep = Retention {
            window: 1_000,
            ..keep_all()
        };
        for i in 0..MAX_NAMES / 2 {
            p.record(&format!("old {i}"), 0, &[]);
        }
        p.record("new", 5_000, &[("price".to_string(), 2.0)]);
        p.prune(&keep, 5_000);
        assert_eq!(p.names, [intern("new"), intern("price")]);
        let o = p.history.occurrences()[0];
        assert_eq!((p.name(o.name), p.name(o.values[0].0)), ("new", "price"));

        // A place past the table (a damaged record) neither panics nor takes a name.
        p.history
            .values_at(0, 5_000, 0)
            .unwrap()
            .push((60_000, 1.0));
        for i in 0..MAX_NAMES / 2 {
            p.record(&format!("more {i}"), 0, &[]);
        }
        p.prune(&keep, 5_000);
        assert_eq!(p.names, [intern("new"), intern("price")]);
        assert_eq!(p.name(p.history.occurrences()[0].values[1].0), "");
    }

    #[test]
    fn merged_history_keeps_its_names() {
        let r = keep_all();
        let (mut a, mut b) = (Profile::new(1), Profile::new(2));
        a.record("A", 1, &[]);
        b.record("B", 2, &[("price".to_string(), 3.0)]);
        b.record("A", 3, &[]);
        a.merge(b, &r);
        a.prune(&r, 10);
        let history = a.history.occurrences();
        let got: Vec<(&str, Millis)> = history.iter().map(|o| (a.name(o.name), o.at)).collect();
        assert_eq!(got, [("A", 1), ("B", 2), ("A", 3)]);
        assert_eq!(a.name(history[1].values[0].0), "price");
    }
}

#[cfg(test)]
mod caps {
    use super::*;

    fn track<'a>(event: &'a str, at: Millis, properties: Option<&'a RawValue>) -> Observed<'a> {
        Observed {
            kind: MessageType::Track,
            event: Some(event),
            at,
            properties,
            traits: None,
        }
    }

    fn thirty_days_of_everything() -> Retention {
        Retention {
            window: 30 * 86_400_000,
            history: Names::All,
            values: None,
            objects: Names::default(),
            read: Names::default(),
        }
    }

    /// Page views past the cap drop the oldest page views, not the order another rule sums.
    #[test]
    fn the_history_cap_is_per_event_name() {
        let keep = thirty_days_of_everything();
        let revenue = RawValue::from_string(r#"{"revenue": 600}"#.to_string()).unwrap();
        let mut p = Profile::new(1);
        let mut dropped = p.apply(
            &track("Order Completed", 1_000, Some(&revenue)),
            &keep,
            1_000,
        );
        let pages = MAX_HISTORY_PER_NAME + 500;
        for i in 0..pages {
            let at = 2_000 + i as Millis;
            dropped.add(p.apply(&track("Page Viewed", at, None), &keep, at));
        }
        let orders = p.history.get(p.find("Order Completed").unwrap()).unwrap();
        assert_eq!(orders.len(), 1, "the order stays");
        assert_eq!(orders.values(0).len(), 1);
        assert_eq!(p.history.len(), 1 + MAX_HISTORY_PER_NAME);
        assert_eq!(
            p.history.occurrences()[1].at,
            2_500,
            "the oldest page views went"
        );
        assert_eq!(dropped.history, 500, "and every one is counted");
    }

    /// History recorded without a prune in between (a backfill's read-back) is capped name by
    /// name by the next prune.
    #[test]
    fn a_prune_caps_every_name() {
        let keep = thirty_days_of_everything();
        let mut p = Profile::new(1);
        for i in 0..MAX_HISTORY_PER_NAME + 100 {
            p.record("A", i as Millis, &[]);
            p.record("B", i as Millis, &[]);
        }
        assert_eq!(p.prune(&keep, 10_000), 200);
        for name in ["A", "B"] {
            let held: Vec<Millis> = p
                .history
                .get(p.find(name).unwrap())
                .unwrap()
                .times()
                .collect();
            assert_eq!(held.len(), MAX_HISTORY_PER_NAME, "{name}");
            assert_eq!(held[0], 100, "{name}: the oldest went");
        }
    }

    /// Past the cap on event names, a name a rule reads is still counted (`did`, `count`,
    /// `first`, `last` see it as the windowed calls do); another is dropped, counted.
    #[test]
    fn past_the_name_cap_the_names_rules_read_are_still_counted() {
        let keep = Retention {
            read: Names::Only(["Upgraded".to_string()].into()),
            ..Retention::nothing()
        };
        let mut p = Profile::new(1);
        for i in 0..MAX_EVENT_NAMES {
            p.apply(&track(&format!("noise {i}"), 1, None), &keep, 1);
        }
        let read = p.apply(&track("Upgraded", 2, None), &keep, 2);
        let unread = p.apply(&track("Other", 3, None), &keep, 3);
        assert_eq!(p.events["Upgraded"].count, 1);
        assert!(!p.events.contains_key("Other"));
        assert_eq!((read.event_names, unread.event_names), (0, 1));
    }
}
