//! What a rule sees: `user` (the profile), `event` (the message that triggered the evaluation,
//! or `()` on a timer) and durations. Registered on the engine by [`super::sandbox::engine`].
//!
//! Time is never read from the system: every call answers as of the evaluation's `now`. Calls
//! whose answer changes as time passes (`did`/`count`/`sum` with a window, comparisons of an
//! `age()` with a duration) also note the moment their answer flips; the evaluation keeps the
//! earliest, and a timer wakes the profile then.

use std::cell::Cell;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use rhai::{Dynamic, Engine, ImmutableString};

use crate::profiles::history::Series;
use crate::profiles::profile::{Millis, Profile};
use crate::script::json_to_dynamic;

thread_local! {
    /// The earliest moment, after `now`, at which the rule being evaluated could answer
    /// differently with no new message. Evaluation is single-threaded per rule, so a thread-local
    /// is the simplest place that both the user API and duration comparisons can reach.
    static NEXT_FLIP: Cell<Option<Millis>> = const { Cell::new(None) };
}

/// Starts recording flips for one evaluation.
pub fn start_recording() {
    NEXT_FLIP.with(|n| n.set(None));
}

/// The earliest flip noted since [`start_recording`].
pub fn recorded() -> Option<Millis> {
    NEXT_FLIP.with(|n| n.get())
}

fn note_flip(at: Millis, now: Millis) {
    if at > now {
        NEXT_FLIP.with(|n| n.set(Some(n.get().map_or(at, |m| m.min(at)))));
    }
}

/// A length of time. An `age()` remembers the moment it is the age of (`anchor`), so that
/// comparing it with another duration can note when the comparison flips.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Duration {
    pub millis: Millis,
    anchor: Option<(Millis, Millis)>,
}

impl Duration {
    pub fn of(millis: Millis) -> Duration {
        Duration {
            millis,
            anchor: None,
        }
    }

    /// The age at `now` of something that happened at `at`.
    pub fn age(at: Millis, now: Millis) -> Duration {
        Duration {
            millis: now - at,
            anchor: Some((at, now)),
        }
    }

    pub fn compare(a: Duration, b: Duration) -> std::cmp::Ordering {
        // age <op> d flips when the age reaches d: at anchor + d (+1 ms for strict comparisons;
        // noting the later of the two is harmless for the other).
        match (a.anchor, b.anchor) {
            (Some((at, now)), None) => note_flip(at + b.millis + 1, now),
            (None, Some((at, now))) => note_flip(at + a.millis + 1, now),
            _ => {}
        }
        a.millis.cmp(&b.millis)
    }
}

/// The state of one profile's evaluation round, shared by every rule evaluated in it.
pub struct Round {
    pub profile: Arc<Profile>,
    pub now: Millis,
    /// Answers given so far in this round, which `in_segment` sees before the stored ones.
    answers: std::sync::Mutex<smallvec::SmallVec<[(usize, bool); 16]>>,
    /// Segment positions by key.
    keys: Arc<hashbrown::HashMap<String, usize>>,
    /// How far back profiles keep history: a longer window would answer from too little.
    kept: Millis,
    traits: OnceLock<Dynamic>,
}

impl Round {
    pub fn new(
        profile: Arc<Profile>,
        now: Millis,
        keys: Arc<hashbrown::HashMap<String, usize>>,
        kept: Millis,
    ) -> Arc<Round> {
        Arc::new(Round {
            profile,
            now,
            answers: std::sync::Mutex::new(smallvec::SmallVec::new()),
            keys,
            kept,
            traits: OnceLock::new(),
        })
    }

    /// Fails a windowed call whose window reaches further back than profiles keep history (a
    /// window computed at run time can: see `super::analysis::UNKNOWN_WINDOW`).
    fn within_kept(&self, within: Duration) -> Result<(), Box<rhai::EvalAltResult>> {
        if within.millis <= self.kept {
            return Ok(());
        }
        let days = |ms: Millis| ms as f64 / 86_400_000.0;
        Err(format!(
            "a window of {:.1} days reaches further back than the history profiles keep ({:.1} days); write the window as a literal duration (days(n)) so that the history kept follows it",
            days(within.millis),
            days(self.kept)
        )
        .into())
    }

    /// Whether the profile is in the segment at `index` as of this round.
    pub fn member(&self, index: usize) -> bool {
        let answers = self.answers.lock().unwrap();
        match answers.iter().rev().find(|(i, _)| *i == index) {
            Some((_, answer)) => *answer,
            None => self.profile.memberships.at(index).is_some_and(|m| m.member),
        }
    }

    pub fn answer(&self, index: usize, member: bool) {
        self.answers.lock().unwrap().push((index, member));
    }
}

/// `user` in a rule.
#[derive(Clone)]
pub struct User(pub Arc<Round>);

/// An occurrence of an event: `event`, or what `user.first`/`user.last` return.
#[derive(Clone)]
pub struct Event {
    pub name: ImmutableString,
    pub at: Millis,
    pub now: Millis,
    /// The properties as JSON text, turned into a map only if the rule asks.
    pub properties: Option<Arc<str>>,
    pub kind: ImmutableString,
}

/// The message that triggered an evaluation, borrowed from it: made into the rule's `event` only
/// for a rule that runs on Rhai (the native interpreter does not read it), as that copies it.
#[derive(Clone, Copy)]
pub struct Message<'a> {
    pub name: &'a str,
    pub at: Millis,
    pub now: Millis,
    /// Properties (traits for an identify), as JSON text.
    pub properties: Option<&'a str>,
    pub kind: &'a str,
}

impl Message<'_> {
    pub fn to_event(&self) -> Event {
        Event {
            name: self.name.into(),
            at: self.at,
            now: self.now,
            properties: self.properties.map(Arc::from),
            kind: self.kind.into(),
        }
    }
}

impl Round {
    pub fn did(&self, name: &str) -> bool {
        self.profile.events.contains_key(name)
    }

    /// The occurrences of `name` within `within` of now: its series, and their positions in it.
    fn within(&self, name: &str, within: Duration) -> Option<(&Series, Range<usize>)> {
        let series = self.profile.history.get(self.profile.find(name)?)?;
        let range = series.between(self.now - within.millis, self.now);
        (!range.is_empty()).then_some((series, range))
    }

    pub fn did_within(&self, name: &str, within: Duration) -> bool {
        let Some((series, range)) = self.within(name, within) else {
            return false;
        };
        note_flip(series.time(range.end - 1) + within.millis + 1, self.now);
        true
    }

    pub fn count(&self, name: &str) -> i64 {
        self.profile.events.get(name).map_or(0, |s| s.count as i64)
    }

    pub fn count_within(&self, name: &str, within: Duration) -> i64 {
        let Some((series, range)) = self.within(name, within) else {
            return 0;
        };
        note_flip(series.time(range.start) + within.millis + 1, self.now);
        range.len() as i64
    }

    pub fn sum(&self, name: &str, property: &str, within: Duration) -> f64 {
        let Some((series, range)) = self.within(name, within) else {
            return 0.0;
        };
        note_flip(series.time(range.start) + within.millis + 1, self.now);
        let property = self.profile.find(property);
        range
            .map(|i| {
                let values = series.values(i);
                let value = values.iter().find(|(k, _)| Some(*k) == property);
                value.map_or(0.0, |(_, v)| *v)
            })
            .sum()
    }

    pub fn in_segment(&self, key: &str) -> bool {
        match self.keys.get(key) {
            Some(&index) => self.member(index),
            None => false,
        }
    }
}

impl User {
    fn occurrence(&self, name: &str, first: bool) -> Dynamic {
        let Some(stats) = self.0.profile.events.get(name) else {
            return Dynamic::UNIT;
        };
        let (at, properties) = if first {
            (stats.first, &stats.first_properties)
        } else {
            (stats.last, &stats.last_properties)
        };
        Dynamic::from(Event {
            name: name.into(),
            at,
            now: self.0.now,
            properties: properties.as_deref().map(Arc::from),
            kind: "track".into(),
        })
    }

    fn traits(&mut self) -> Dynamic {
        self.0
            .traits
            .get_or_init(|| {
                json_to_dynamic(&serde_json::Value::Object(self.0.profile.traits.clone()))
            })
            .clone()
    }

    fn first_seen(&mut self) -> Dynamic {
        self.seen(self.0.profile.first_seen)
    }

    fn last_seen(&mut self) -> Dynamic {
        self.seen(self.0.profile.last_seen)
    }

    fn seen(&self, at: Millis) -> Dynamic {
        Dynamic::from(Event {
            name: "".into(),
            at,
            now: self.0.now,
            properties: None,
            kind: "".into(),
        })
    }
}

impl Event {
    fn properties(&mut self) -> Dynamic {
        match &self.properties {
            Some(json) => serde_json::from_str::<serde_json::Value>(json)
                .map(|v| json_to_dynamic(&v))
                .unwrap_or(Dynamic::UNIT),
            None => Dynamic::from_map(rhai::Map::new()),
        }
    }

    fn timestamp(&mut self) -> ImmutableString {
        crate::vocabulary::format_time(
            chrono::DateTime::from_timestamp_millis(self.at).unwrap_or_default(),
        )
        .into()
    }
}

/// What a windowed call answers: a window longer than the history kept fails the rule.
type Windowed<T> = Result<T, Box<rhai::EvalAltResult>>;

/// Registers the types and functions above.
pub fn register(engine: &mut Engine) {
    engine
        .register_type_with_name::<User>("User")
        .register_fn("did", |u: &mut User, name: &str| u.0.did(name))
        .register_fn(
            "did",
            |u: &mut User, name: &str, within: Duration| -> Windowed<bool> {
                u.0.within_kept(within)?;
                Ok(u.0.did_within(name, within))
            },
        )
        .register_fn("count", |u: &mut User, name: &str| u.0.count(name))
        .register_fn(
            "count",
            |u: &mut User, name: &str, within: Duration| -> Windowed<i64> {
                u.0.within_kept(within)?;
                Ok(u.0.count_within(name, within))
            },
        )
        .register_fn(
            "sum",
            |u: &mut User, name: &str, property: &str, within: Duration| -> Windowed<f64> {
                u.0.within_kept(within)?;
                Ok(u.0.sum(name, property, within))
            },
        )
        .register_fn("first", |u: &mut User, name: &str| u.occurrence(name, true))
        .register_fn("last", |u: &mut User, name: &str| u.occurrence(name, false))
        .register_fn("in_segment", |u: &mut User, key: &str| u.0.in_segment(key))
        .register_get("traits", User::traits)
        .register_get("first_seen", User::first_seen)
        .register_get("last_seen", User::last_seen);

    engine
        .register_type_with_name::<Event>("Event")
        .register_get("name", |e: &mut Event| e.name.clone())
        .register_get("type", |e: &mut Event| e.kind.clone())
        .register_get("properties", Event::properties)
        .register_get("timestamp", Event::timestamp)
        .register_fn("age", |e: &mut Event| Duration::age(e.at, e.now));

    engine
        .register_type_with_name::<Duration>("Duration")
        .register_fn("seconds", |n: i64| Duration::of(n.saturating_mul(1_000)))
        .register_fn("minutes", |n: i64| Duration::of(n.saturating_mul(60_000)))
        .register_fn("hours", |n: i64| Duration::of(n.saturating_mul(3_600_000)))
        .register_fn("days", |n: i64| Duration::of(n.saturating_mul(86_400_000)))
        .register_get("seconds", |d: &mut Duration| d.millis / 1_000)
        .register_get("minutes", |d: &mut Duration| d.millis / 60_000)
        .register_get("hours", |d: &mut Duration| d.millis / 3_600_000)
        .register_get("days", |d: &mut Duration| d.millis / 86_400_000)
        .register_fn("+", |a: Duration, b: Duration| {
            Duration::of(a.millis + b.millis)
        })
        .register_fn("-", |a: Duration, b: Duration| {
            Duration::of(a.millis - b.millis)
        })
        .register_fn("*", |a: Duration, n: i64| {
            Duration::of(a.millis.saturating_mul(n))
        })
        .register_fn(">", |a: Duration, b: Duration| {
            Duration::compare(a, b).is_gt()
        })
        .register_fn(">=", |a: Duration, b: Duration| {
            Duration::compare(a, b).is_ge()
        })
        .register_fn("<", |a: Duration, b: Duration| {
            Duration::compare(a, b).is_lt()
        })
        .register_fn("<=", |a: Duration, b: Duration| {
            Duration::compare(a, b).is_le()
        })
        .register_fn("==", |a: Duration, b: Duration| {
            Duration::compare(a, b).is_eq()
        })
        .register_fn("!=", |a: Duration, b: Duration| {
            Duration::compare(a, b).is_ne()
        })
        .register_fn("to_string", |d: &mut Duration| format!("{}ms", d.millis));
}
