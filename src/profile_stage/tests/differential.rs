//! The differential test of the profile stage: random workloads (identity links, aliases and
//! conflicts, duplicate messageIds, device timestamps weeks off or ahead, the clock moving by
//! seconds or days, segments added and edited while the stage is behind, saves, and the process
//! dying between batches) run through the real stage, its store, the log, the dedup and a lake;
//! after each, every profile's identifiers, counters and traits, and every segment's members,
//! are compared with a reference computed independently from the messages accepted, in plain
//! Rust, and every change the stage emitted is checked against the memberships.
//!
//! `cargo test` runs a short budget; `SLUICE_DIFFERENTIAL_CASES=10000` a long one (see
//! `tools/differential.sh`). A failing case is shrunk and its seed kept by proptest in
//! `proptest-regressions/`, where later runs try it first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;

/// Crash points run across every workload of this process, for the figure a long run reports.
static CRASHES: AtomicU64 = AtomicU64::new(0);
static WORKLOADS: AtomicU64 = AtomicU64::new(0);

const HOUR: Millis = 3_600_000;
const DAY: Millis = 24 * HOUR;

/// When a message says it happened, relative to its arrival.
#[derive(Debug, Clone, Copy)]
enum When {
    /// No timestamp: it happened when it arrived.
    Arrival,
    /// Seconds before it arrived (a late event, up to weeks).
    Before(u32),
    /// Seconds after it arrived: a device clock running ahead.
    Ahead(u32),
}

#[derive(Debug, Clone)]
enum Message {
    Track {
        user: Option<u8>,
        anonymous: Option<u8>,
        event: u8,
        revenue: u8,
        when: When,
    },
    Page {
        user: Option<u8>,
        anonymous: Option<u8>,
        when: When,
    },
    Identify {
        user: Option<u8>,
        anonymous: Option<u8>,
        pro: bool,
    },
    Alias {
        user: u8,
        previous: u8,
        anonymous: Option<u8>,
    },
}

#[derive(Debug, Clone)]
enum Send {
    New(Message),
    /// The message sent `n` messages ago (mod the count) again, with its messageId: a retry.
    Again(usize),
}

/// How much of the log the stage reads after a request.
#[derive(Debug, Clone, Copy)]
enum Run {
    /// Nothing: the stage falls behind.
    Not,
    OneBatch,
    All,
}

#[derive(Debug, Clone)]
enum Action {
    Send(Vec<Send>, Run),
    /// The clock moves on this many seconds.
    Advance(u32),
    /// These segments are loaded now (see [`segments`]).
    Load(u8),
    Save,
    /// The process dies and starts again from the store.
    Crash,
}

const EVENTS: [&str; 3] = ["Order Completed", "Ping", "Signed Up"];

fn user_id(u: u8) -> String {
    format!("u{u}")
}

fn anonymous_id(a: u8) -> String {
    format!("a{a}")
}

/// The segments that `variant` loads: `buyers` always, the others by its bits, each with the
/// threshold or window (its parameter) that an edit (another variant) changes: (key, rule,
/// parameter).
fn segments(variant: u8) -> Vec<(&'static str, String, i64)> {
    let bit = |n: u8| variant & (1 << n) != 0;
    let mut out = vec![("buyers", r#"user.did("Order Completed")"#.to_string(), 0)];
    if bit(0) {
        let n = if bit(1) { 3 } else { 2 };
        out.push(("viewers", format!(r#"user.count("Page Viewed") >= {n}"#), n));
    }
    if bit(2) {
        let hours = if bit(3) { 24 } else { 1 };
        out.push((
            "pinged",
            format!(r#"user.did("Ping", hours({hours}))"#),
            hours,
        ));
    }
    if bit(4) {
        let x = if bit(5) { 100 } else { 50 };
        let rule = format!(r#"user.sum("Order Completed", "revenue", days(7)) >= {x}.0"#);
        out.push(("spenders", rule, x));
    }
    if bit(6) {
        out.push(("pro", r#"user.traits.plan == "pro""#.to_string(), 0));
    }
    if bit(7) {
        let rule = r#"user.in_segment("buyers") && !did(user, "Ping", hours(1))"#;
        out.push(("quiet_buyers", rule.to_string(), 0));
    }
    out
}

fn segment_set(variant: u8) -> Arc<SegmentSet> {
    let rules = segments(variant);
    let rules: Vec<(&str, &str)> = rules.iter().map(|(k, r, _)| (*k, r.as_str())).collect();
    set(&rules)
}

/// One profile as the reference sees it.
#[derive(Debug, Clone, Default)]
struct Group {
    user: Option<String>,
    anonymous: BTreeSet<String>,
    traits: Map<String, Value>,
    first_seen: Millis,
    last_seen: Millis,
    /// Per event name: count, first, last.
    events: BTreeMap<String, (u64, Millis, Millis)>,
    /// Every occurrence: name, moment, revenue.
    occurrences: Vec<(String, Millis, f64)>,
    /// Whether another profile was merged into this one.
    merged: bool,
}

/// The reference: the messages the edge accepted, applied in log order to groups of identifiers.
#[derive(Default)]
struct Reference {
    groups: Vec<Option<Group>>,
    /// `user:<id>` / `anon:<id>` to the group.
    index: HashMap<String, usize>,
}

impl Reference {
    fn create(&mut self) -> usize {
        self.groups.push(Some(Group::default()));
        self.groups.len() - 1
    }

    fn group(&mut self, g: usize) -> &mut Group {
        self.groups[g].as_mut().expect("a live group")
    }

    fn link(&mut self, key: String, g: usize) {
        if let Some(a) = key.strip_prefix("anon:") {
            self.group(g).anonymous.insert(a.to_string());
        } else if let Some(u) = key.strip_prefix("user:") {
            self.group(g).user = Some(u.to_string());
        }
        self.index.insert(key, g);
    }

    /// `absorbed` into `into`: identifiers and occurrences join, counters add, `into`'s traits win.
    fn merge(&mut self, absorbed: usize, into: usize) {
        let b = self.groups[absorbed].take().expect("a live group");
        for a in &b.anonymous {
            self.index.insert(format!("anon:{a}"), into);
        }
        let a = self.group(into);
        a.merged = true;
        a.anonymous.extend(b.anonymous);
        for (k, v) in b.traits {
            a.traits.entry(k).or_insert(v);
        }
        if b.first_seen != 0 && (a.first_seen == 0 || b.first_seen < a.first_seen) {
            a.first_seen = b.first_seen;
        }
        a.last_seen = a.last_seen.max(b.last_seen);
        for (name, (count, first, last)) in b.events {
            let e = a.events.entry(name).or_insert((0, first, last));
            e.0 += count;
            e.1 = e.1.min(first);
            e.2 = e.2.max(last);
        }
        a.occurrences.extend(b.occurrences);
    }

    /// The group a message naming `user` and `other` (an anonymousId key) belongs to, linking
    /// and merging as the contract says: a userId and an anonymousId on one message are one
    /// person, unless the anonymousId is already someone else's with another userId.
    fn resolve(&mut self, user: Option<&str>, other: Option<String>) -> Option<usize> {
        let by_user = user.and_then(|u| self.index.get(&format!("user:{u}")).copied());
        let by_other = other.as_ref().and_then(|k| self.index.get(k).copied());
        Some(match (user, by_user, by_other) {
            (None, _, None) => {
                let g = self.create();
                self.link(other?, g);
                g
            }
            (None, _, Some(g)) => g,
            (Some(_), Some(a), Some(b)) if a == b => a,
            (Some(_), Some(a), None) => {
                if let Some(k) = other {
                    self.link(k, a);
                }
                a
            }
            (Some(u), None, None) => {
                let g = self.create();
                self.link(format!("user:{u}"), g);
                if let Some(k) = other {
                    self.link(k, g);
                }
                g
            }
            (Some(u), None, Some(b)) => {
                let g = if self.group(b).user.is_some() {
                    self.create()
                } else {
                    b
                };
                self.link(format!("user:{u}"), g);
                g
            }
            (Some(_), Some(a), Some(b)) => {
                if self.group(b).user.is_none() {
                    self.merge(b, a);
                }
                a
            }
        })
    }

    /// Applies one accepted message that arrived at `arrived`.
    fn apply(&mut self, m: &Message, arrived: Millis) {
        let anon = |a: &Option<u8>| a.map(|a| format!("anon:{}", anonymous_id(a)));
        let user = |u: &Option<u8>| u.map(user_id);
        let g = match m {
            Message::Track {
                user: u,
                anonymous: a,
                ..
            }
            | Message::Page {
                user: u,
                anonymous: a,
                ..
            }
            | Message::Identify {
                user: u,
                anonymous: a,
                ..
            } => self.resolve(user(u).as_deref(), anon(a)),
            Message::Alias {
                user: u,
                previous,
                anonymous,
            } => {
                let u = user_id(*u);
                let previous = format!("anon:{}", anonymous_id(*previous));
                let first = self.resolve(Some(&u), Some(previous.clone()));
                match anon(anonymous).filter(|a| *a != previous) {
                    Some(a) => self.resolve(Some(&u), Some(a)),
                    None => first,
                }
            }
        };
        let Some(g) = g else {
            return;
        };
        let at = moment(m, arrived);
        let group = self.group(g);
        if group.first_seen == 0 || at < group.first_seen {
            group.first_seen = at;
        }
        group.last_seen = group.last_seen.max(at);
        let (name, revenue) = match m {
            Message::Track { event, revenue, .. } => {
                (EVENTS[usize::from(*event)], f64::from(*revenue))
            }
            Message::Page { .. } => ("Page Viewed", 0.0),
            Message::Identify { pro, .. } => {
                let plan = if *pro { "pro" } else { "free" };
                group.traits.insert("plan".into(), plan.into());
                return;
            }
            Message::Alias { .. } => return,
        };
        let e = group.events.entry(name.to_string()).or_insert((0, at, at));
        e.0 += 1;
        e.1 = e.1.min(at);
        e.2 = e.2.max(at);
        group.occurrences.push((name.to_string(), at, revenue));
    }

    /// Whether `g` is in `key`'s segment (as [`segments`] defines it) at `now`.
    fn member(g: &Group, key: &str, parameter: i64, now: Millis) -> bool {
        let count = |name: &str| g.events.get(name).map_or(0, |e| e.0);
        let within = |name: &'static str, window: Millis| {
            g.occurrences
                .iter()
                .filter(move |(n, at, _)| n == name && *at >= now - window && *at <= now)
        };
        match key {
            "buyers" => count("Order Completed") > 0,
            "viewers" => count("Page Viewed") as i64 >= parameter,
            "pinged" => within("Ping", parameter * HOUR).next().is_some(),
            "spenders" => {
                within("Order Completed", 7 * DAY).map(|o| o.2).sum::<f64>() >= parameter as f64
            }
            "pro" => g.traits.get("plan") == Some(&json!("pro")),
            "quiet_buyers" => count("Order Completed") > 0 && within("Ping", HOUR).next().is_none(),
            other => panic!("no reference for segment {other}"),
        }
    }
}

/// When `m`, arrived at `arrived`, happened as the profile stage counts it.
fn moment(m: &Message, arrived: Millis) -> Millis {
    match when(m) {
        When::Arrival | When::Ahead(_) => arrived,
        When::Before(s) => arrived - Millis::from(s) * 1_000,
    }
}

fn when(m: &Message) -> When {
    match m {
        Message::Track { when, .. } | Message::Page { when, .. } => *when,
        _ => When::Arrival,
    }
}

/// `m` as a client sends it, arriving at `arrived`.
fn body(m: &Message, arrived: Millis) -> Value {
    let mut out = match m {
        Message::Track { event, revenue, .. } => {
            json!({"type": "track", "event": EVENTS[usize::from(*event)],
            "properties": {"revenue": revenue}})
        }
        Message::Page { .. } => json!({"type": "page", "name": "Home"}),
        Message::Identify { pro, .. } => {
            json!({"type": "identify", "traits": {"plan": if *pro { "pro" } else { "free" }}})
        }
        Message::Alias {
            previous,
            anonymous,
            ..
        } => {
            let mut alias = json!({"type": "alias", "previousId": anonymous_id(*previous)});
            if let Some(a) = anonymous {
                alias["anonymousId"] = json!(anonymous_id(*a));
            }
            alias
        }
    };
    let (user, anonymous) = match m {
        Message::Track {
            user, anonymous, ..
        }
        | Message::Page {
            user, anonymous, ..
        }
        | Message::Identify {
            user, anonymous, ..
        } => (*user, *anonymous),
        Message::Alias { user, .. } => (Some(*user), None),
    };
    if let Some(u) = user {
        out["userId"] = json!(user_id(u));
    }
    if let Some(a) = anonymous {
        out["anonymousId"] = json!(anonymous_id(a));
    }
    let time =
        |ms: Millis| crate::vocabulary::format_time(DateTime::from_timestamp_millis(ms).unwrap());
    match when(m) {
        When::Arrival => {}
        When::Before(s) => out["timestamp"] = json!(time(arrived - Millis::from(s) * 1_000)),
        When::Ahead(s) => out["timestamp"] = json!(time(arrived + Millis::from(s) * 1_000)),
    }
    out
}

fn when_strategy() -> impl Strategy<Value = When> {
    prop_oneof![
        3 => Just(When::Arrival),
        2 => (0u32..21 * 86_400).prop_map(When::Before),
        1 => (0u32..86_400).prop_map(When::Ahead),
    ]
}

fn who() -> impl Strategy<Value = (Option<u8>, Option<u8>)> {
    prop_oneof![
        (0u8..4).prop_map(|u| (Some(u), None)),
        (0u8..6).prop_map(|a| (None, Some(a))),
        (0u8..4, 0u8..6).prop_map(|(u, a)| (Some(u), Some(a))),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        4 => (who(), 0u8..3, 0u8..80, when_strategy()).prop_map(|((user, anonymous), event, revenue, when)| {
            Message::Track { user, anonymous, event, revenue, when }
        }),
        2 => (who(), when_strategy()).prop_map(|((user, anonymous), when)| Message::Page { user, anonymous, when }),
        1 => (who(), any::<bool>()).prop_map(|((user, anonymous), pro)| Message::Identify { user, anonymous, pro }),
        1 => (0u8..4, 0u8..6, proptest::option::of(0u8..6)).prop_map(|(user, previous, anonymous)| {
            Message::Alias { user, previous, anonymous }
        }),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    let run = prop_oneof![Just(Run::Not), Just(Run::OneBatch), Just(Run::All)];
    let send =
        prop_oneof![6 => message().prop_map(Send::New), 1 => (0usize..20).prop_map(Send::Again)];
    prop_oneof![
        8 => (proptest::collection::vec(send, 1..6), run).prop_map(|(m, r)| Action::Send(m, r)),
        3 => prop_oneof![1u32..120, 600u32..7_200, 3_600u32..4 * 86_400].prop_map(Action::Advance),
        1 => any::<u8>().prop_map(Action::Load),
        1 => Just(Action::Save),
        2 => Just(Action::Crash),
    ]
}

/// The edge's part: a messageId seen before is dropped by the dedup; the rest are appended as
/// one request. Returns the messages accepted.
fn send(f: &mut Fixture, messages: &[(String, Message)]) -> Vec<Message> {
    let arrived = (f.stage.clock)();
    let keys: Vec<Option<u128>> = messages
        .iter()
        .map(|(id, _)| Some(message_key("web", id)))
        .collect();
    let appender = f.parts.appender.clone();
    let pending = f.runtime.block_on(appender.begin(&keys));
    let mut records = RecordBatch::default();
    let mut accepted = Vec::new();
    for ((id, m), &dup) in messages.iter().zip(pending.duplicates()) {
        if dup {
            continue;
        }
        push_as_the_edge(
            &mut records,
            id,
            &body(m, arrived.timestamp_millis()),
            arrived,
        );
        accepted.push(m.clone());
    }
    f.runtime
        .block_on(pending.finish(records, arrived))
        .unwrap();
    accepted
}

/// Runs `actions`, then lets time pass and the stage read everything; compares.
fn run(first: u8, cache: usize, actions: &[Action]) -> Result<(), TestCaseError> {
    let mut f = Fixture::with_lake_and_cache(cache, segment_set(first));
    let mut variant = first;
    let mut reference = Reference::default();
    let mut sent: Vec<(String, Message)> = Vec::new();
    for action in actions {
        match action {
            Action::Send(messages, how) => {
                let mut request = Vec::new();
                for m in messages {
                    match m {
                        Send::New(m) => {
                            let id = format!("m{}", sent.len());
                            sent.push((id.clone(), m.clone()));
                            request.push((id, m.clone()));
                        }
                        Send::Again(n) if !sent.is_empty() => {
                            request.push(sent[sent.len() - 1 - n % sent.len()].clone());
                        }
                        Send::Again(_) => {}
                    }
                }
                let arrived = (f.stage.clock)().timestamp_millis();
                for m in send(&mut f, &request) {
                    reference.apply(&m, arrived);
                }
                match how {
                    Run::Not => {}
                    Run::OneBatch => {
                        f.stage.step().unwrap();
                    }
                    Run::All => f.settle(),
                }
                // Each request arrives in a millisecond of its own.
                f.advance(Duration::from_millis(1));
            }
            Action::Advance(seconds) => f.advance(Duration::from_secs(u64::from(*seconds))),
            Action::Load(next) => {
                // The lake writer has caught up with the log: a backfill reads back all the
                // history the stage applied (what it has not applied yet, it applies later).
                f.flush_lake();
                variant = *next;
                f.stage.install(segment_set(variant)).unwrap();
            }
            Action::Save => f.stage.flush().unwrap(),
            Action::Crash => {
                CRASHES.fetch_add(1, Ordering::Relaxed);
                f.crash_and_restart(false);
            }
        }
    }
    f.advance(Duration::from_secs(1));
    f.settle();
    f.stage.flush().unwrap();
    compare(&f, &reference, variant)
}

fn compare(f: &Fixture, reference: &Reference, variant: u8) -> Result<(), TestCaseError> {
    let now = f.stage.time;
    let r = f.store.read().unwrap();
    let live: Vec<&Group> = reference.groups.iter().flatten().collect();
    prop_assert_eq!(
        r.meta("profiles").unwrap(),
        Some(live.len() as u64),
        "profiles"
    );
    let loaded = segments(variant);
    let mut unmerged = Vec::new();
    for g in live {
        let keys: Vec<String> = g
            .user
            .iter()
            .map(|u| format!("user:{u}"))
            .chain(g.anonymous.iter().map(|a| format!("anon:{a}")))
            .collect();
        let ids: BTreeSet<Option<u64>> = keys.iter().map(|k| r.lookup(k).unwrap()).collect();
        prop_assert_eq!(ids.len(), 1, "{:?} are one profile: {:?}", keys, ids);
        let id = ids.into_iter().next().unwrap();
        prop_assert!(id.is_some(), "{:?} has a profile", keys);
        let p = r.profile(id.unwrap()).unwrap().expect("stored");
        prop_assert_eq!(&p.user_id, &g.user);
        let anonymous: BTreeSet<String> = p.anonymous_ids.iter().cloned().collect();
        prop_assert_eq!(&anonymous, &g.anonymous);
        prop_assert_eq!(&p.traits, &g.traits, "{:?}", keys);
        prop_assert_eq!(
            (p.first_seen, p.last_seen),
            (g.first_seen, g.last_seen),
            "{:?}",
            keys
        );
        let events: BTreeMap<String, (u64, Millis, Millis)> = p
            .events
            .iter()
            .map(|(k, e)| (k.to_string(), (e.count, e.first, e.last)))
            .collect();
        prop_assert_eq!(&events, &g.events, "{:?}", keys);
        for (key, rule, parameter) in &loaded {
            let expected = Reference::member(g, key, *parameter, now);
            let member = p.memberships.get(key).is_some_and(|m| m.member);
            prop_assert_eq!(
                member,
                expected,
                "{:?} in {} ({}) at {}",
                keys,
                key,
                rule,
                now
            );
        }
        if !g.merged {
            unmerged.push(p);
        }
    }
    // What was emitted: each change once, and for a profile that never merged, its changes of
    // each segment in order (1, 2, 3 ...), alternating, ending where its membership is.
    let mut ids = HashSet::new();
    let mut changes: HashMap<(u64, String), Vec<(u32, bool)>> = HashMap::new();
    for (id, event) in f.changes() {
        prop_assert!(ids.insert(id.clone()), "{} emitted twice", id);
        let rest = id.strip_prefix("audience-").unwrap();
        let parts: Vec<&str> = rest.rsplitn(4, '-').collect();
        let (direction, n, profile, key) = (parts[0], parts[1], parts[2], parts[3]);
        prop_assert_eq!(direction == "entered", event == "Audience Entered");
        changes
            .entry((profile.parse().unwrap(), key.to_string()))
            .or_default()
            .push((n.parse().unwrap(), direction == "entered"));
    }
    for p in unmerged {
        for (key, _, _) in &loaded {
            let emitted = changes.remove(&(p.id, key.to_string())).unwrap_or_default();
            let m = p.memberships.get(key);
            let expected: Vec<(u32, bool)> = (1..=m.map_or(0, |m| m.changes))
                .map(|n| (n, n % 2 == 1))
                .collect();
            prop_assert_eq!(&emitted, &expected, "profile {} in {}", p.id, key);
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("SLUICE_DIFFERENTIAL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]
    /// Whatever the workload, the stage's profiles and memberships are what the messages say,
    /// and what it emitted is each change once, in order.
    #[test]
    fn the_stage_agrees_with_the_reference(
        first in any::<u8>(),
        cache in prop_oneof![Just(4usize), Just(100usize)],
        actions in proptest::collection::vec(action(), 1..40),
    ) {
        WORKLOADS.fetch_add(1, Ordering::Relaxed);
        run(first, cache, &actions)?;
        let (workloads, crashes) = (WORKLOADS.load(Ordering::Relaxed), CRASHES.load(Ordering::Relaxed));
        if workloads % 250 == 0 || u64::from(cases()) == workloads {
            eprintln!("differential: {workloads} workloads, {crashes} crash points");
        }
    }
}
