//! The rule API against hand-built profiles at chosen times (the clock is the `now` passed in),
//! and the property that indexed evaluation decides exactly what evaluating everything does.

use std::path::Path;

use proptest::prelude::*;
use serde_json::value::RawValue;

use super::*;
use crate::profiles::profile::Observed;
use crate::segments::files;
use crate::vocabulary::MessageType;

const MINUTE: Millis = 60_000;
const HOUR: Millis = 3_600_000;
const DAY: Millis = 24 * HOUR;
const T0: Millis = 1_767_225_600_000; // 2026-01-01T00:00:00Z

/// The segments `rules` (key, rule) compiled; they must compile.
pub(crate) fn set(rules: &[(&str, &str)]) -> SegmentSet {
    let files = rules
        .iter()
        .map(|(key, rule)| {
            let text = format!("rule = '''\n{rule}\n'''\n");
            files::parse(Path::new(&format!("{key}.toml")), &text).unwrap()
        })
        .collect();
    let (set, problems) = SegmentSet::build(files, None);
    assert!(problems.is_empty(), "{problems:?}");
    set
}

fn observe(
    p: &mut Profile,
    set: &SegmentSet,
    kind: MessageType,
    event: Option<&str>,
    json: &str,
    at: Millis,
) {
    let json = RawValue::from_string(json.to_string()).unwrap();
    let (properties, traits) = match kind {
        MessageType::Identify => (None, Some(&*json)),
        _ => (Some(&*json), None),
    };
    let m = Observed {
        kind,
        event,
        at,
        properties,
        traits,
    };
    p.apply(&m, &set.retention, at);
}

fn track(p: &mut Profile, set: &SegmentSet, event: &str, at: Millis, props: &str) {
    observe(p, set, MessageType::Track, Some(event), props, at);
}

fn identify(p: &mut Profile, set: &SegmentSet, traits: &str, at: Millis) {
    observe(p, set, MessageType::Identify, None, traits, at);
}

fn member(set: &SegmentSet, p: &mut Profile, key: &str, now: Millis) -> bool {
    let eval = set.evaluate(p, Trigger::All(None), now);
    assert!(eval.failures.is_empty(), "{:?}", eval.failures);
    p.memberships.get(key).is_some_and(|m| m.member)
}

fn event<'a>(name: &'a str, at: Millis, props: &'a str) -> Message<'a> {
    Message {
        name,
        at,
        now: at,
        properties: Some(props),
        kind: "track",
    }
}

#[test]
fn did_and_count_with_and_without_windows() {
    let s = set(&[
        ("ever", r#"user.did("A")"#),
        ("recent", r#"user.did("A", hours(2))"#),
        ("three", r#"user.count("A") >= 3"#),
        ("three_today", r#"user.count("A", days(1)) >= 3"#),
    ]);
    let mut p = Profile::new(1);
    for at in [T0, T0 + HOUR, T0 + 2 * HOUR] {
        track(&mut p, &s, "A", at, "{}");
    }
    assert!(member(&s, &mut p, "ever", T0 + 2 * HOUR));
    assert!(member(&s, &mut p, "recent", T0 + 2 * HOUR));
    assert!(member(&s, &mut p, "three", T0 + 2 * HOUR));
    assert!(member(&s, &mut p, "three_today", T0 + 2 * HOUR));
    // A day later the window no longer holds the first occurrence.
    assert!(!member(&s, &mut p, "three_today", T0 + DAY + 1));
    assert!(!member(&s, &mut p, "recent", T0 + 5 * HOUR));
    assert!(member(&s, &mut p, "ever", T0 + 100 * DAY));
}

#[test]
fn evaluation_notes_when_the_answer_flips() {
    let s = set(&[
        ("recent", r#"user.did("A", hours(2))"#),
        (
            "aged",
            r#"let f = user.first("A"); f != () && f.age() > hours(1)"#,
        ),
        ("today", r#"user.count("A", days(1)) >= 2"#),
    ]);
    let mut p = Profile::new(1);
    track(&mut p, &s, "A", T0, "{}");
    track(&mut p, &s, "A", T0 + 30 * MINUTE, "{}");
    s.evaluate(&mut p, Trigger::All(None), T0 + 30 * MINUTE);
    let m = &p.memberships;
    assert!(m["recent"].member && !m["aged"].member && m["today"].member);
    // did within 2 h of the last A: false from T0 + 30 min + 2 h.
    assert_eq!(
        m["recent"].recheck_at,
        Some(T0 + 30 * MINUTE + 2 * HOUR + 1)
    );
    // the first A is older than 1 h just after T0 + 1 h.
    assert_eq!(m["aged"].recheck_at, Some(T0 + HOUR + 1));
    // the oldest A of the day leaves the window at T0 + 1 day.
    assert_eq!(m["today"].recheck_at, Some(T0 + DAY + 1));
    assert_eq!(p.next_recheck(), Some(T0 + HOUR + 1));
    // A millisecond early, the timer changes nothing.
    assert!(s
        .evaluate(&mut p, Trigger::Timer, T0 + HOUR)
        .transitions
        .is_empty());
    // On the timer, only what came due is looked at, and it flips.
    let eval = s.evaluate(&mut p, Trigger::Timer, T0 + HOUR + 1);
    assert_eq!(eval.transitions.len(), 1);
    assert_eq!(s.segments[eval.transitions[0].segment].key, "aged");
    assert!(p.memberships["aged"].member);
    assert_eq!(
        p.memberships["aged"].recheck_at, None,
        "older only gets older"
    );
}

#[test]
fn an_entry_that_only_waited_for_a_moment_goes_when_that_moment_changes_nothing() {
    let s = set(&[(
        "aged_buyer",
        r#"let f = user.first("A"); f != () && f.age() > hours(1) && user.count("B") >= 1"#,
    )]);
    let mut p = Profile::new(1);
    track(&mut p, &s, "A", T0, "{}");
    s.evaluate(&mut p, Trigger::All(None), T0);
    let m = &p.memberships["aged_buyer"];
    assert!(!m.member);
    assert_eq!(m.recheck_at, Some(T0 + HOUR + 1));
    // An hour on, the first A is old enough but there is no B: still out, and nothing left to
    // wait for, so the entry carries nothing.
    let eval = s.evaluate(&mut p, Trigger::Timer, T0 + HOUR + 1);
    assert!(eval.transitions.is_empty());
    assert!(p.memberships.is_empty(), "{:?}", p.memberships);
    assert_eq!(p.next_recheck(), None);
}

#[test]
fn sum_first_last_traits_and_in_segment() {
    let s = set(&[
        (
            "spender",
            r#"user.sum("Order Completed", "revenue", days(30)) >= 100.0"#,
        ),
        (
            "last_big",
            r#"let o = user.last("Order Completed"); o != () && o.properties.revenue > 50"#,
        ),
        ("pro", r#"user.traits.plan == "pro""#),
        (
            "pro_spender",
            r#"user.in_segment("pro") && user.in_segment("spender")"#,
        ),
        (
            "named",
            r#"let f = user.first("Order Completed"); f != () && f.name == "Order Completed" && f.properties.order_id == "o-1""#,
        ),
    ]);
    let mut p = Profile::new(1);
    track(
        &mut p,
        &s,
        "Order Completed",
        T0,
        r#"{"order_id":"o-1","revenue":70}"#,
    );
    track(
        &mut p,
        &s,
        "Order Completed",
        T0 + DAY,
        r#"{"order_id":"o-2","revenue":40.5}"#,
    );
    assert!(member(&s, &mut p, "spender", T0 + DAY));
    assert!(!member(&s, &mut p, "last_big", T0 + DAY));
    assert!(member(&s, &mut p, "named", T0 + DAY));
    assert!(!member(&s, &mut p, "pro_spender", T0 + DAY));
    identify(&mut p, &s, r#"{"plan":"pro"}"#, T0 + DAY);
    assert!(member(&s, &mut p, "pro_spender", T0 + DAY));
    // 31 days on, the first order has left the window: 40.5 < 100.
    assert!(!member(&s, &mut p, "spender", T0 + 31 * DAY));
    assert!(!member(&s, &mut p, "pro_spender", T0 + 31 * DAY));
}

#[test]
fn event_is_the_triggering_message_and_unit_on_a_timer() {
    let s = set(&[(
        "big_order",
        r#"event != () && event.name == "Order Completed" && event.properties.revenue > 100"#,
    )]);
    let mut p = Profile::new(1);
    let e = event("Order Completed", T0, r#"{"revenue": 250}"#);
    track(&mut p, &s, "Order Completed", T0, r#"{"revenue": 250}"#);
    let trigger = Trigger::Message {
        event: Some("Order Completed"),
        identify: false,
        message: e,
    };
    let eval = s.evaluate(&mut p, trigger, T0);
    assert!(
        eval.failures.is_empty(),
        "{:?}",
        *s.segments[0].health.last_error.lock().unwrap()
    );
    assert_eq!(eval.transitions.len(), 1);
    assert!(
        !member(&s, &mut p, "big_order", T0 + 1),
        "no message, no event"
    );
}

#[test]
fn a_failing_rule_changes_nothing_and_is_counted() {
    let s = set(&[
        ("looping", "loop {} true"),
        ("text", r#""yes""#),
        ("fine", "true"),
    ]);
    let mut p = Profile::new(1);
    let eval = s.evaluate(&mut p, Trigger::All(None), T0);
    assert_eq!(eval.transitions.len(), 1);
    let mut classes: Vec<(String, RuleFailure)> = eval
        .failures
        .iter()
        .map(|(i, c)| (s.segments[*i].key.clone(), *c))
        .collect();
    classes.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        classes,
        [
            ("looping".to_string(), RuleFailure::Budget),
            ("text".to_string(), RuleFailure::Error)
        ]
    );
    assert!(!p.memberships.contains_key("looping"));
    let looping = &s.segments[s.position("looping").unwrap()];
    assert_eq!(looping.health.errors.load(Ordering::Relaxed), 1);
}

#[test]
fn in_segment_cycles_are_refused_and_order_follows_dependencies() {
    let cyclic = ["a", "b"].map(|k| {
        let other = if k == "a" { "b" } else { "a" };
        let text = format!("rule = 'user.in_segment(\"{other}\")'");
        files::parse(Path::new(&format!("{k}.toml")), &text).unwrap()
    });
    let reader = files::parse(Path::new("c.toml"), "rule = 'user.in_segment(\"d\")'").unwrap();
    let base = files::parse(Path::new("d.toml"), "rule = 'true'").unwrap();
    let (set, problems) =
        SegmentSet::build(cyclic.into_iter().chain([reader, base]).collect(), None);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems.iter().all(|p| p.message.contains("cycle")));
    let keys: Vec<&str> = set.segments.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["d", "c"]);
    let mut p = Profile::new(1);
    assert!(
        member(&set, &mut p, "c", T0),
        "c sees d's answer from the same round"
    );
}

#[test]
fn rhai_errors_point_into_the_file() {
    let text = "name = \"x\"\nrule = '''\nuser.did(\"A\") &&\n  user.nope(\n'''\n";
    let file = files::parse(Path::new("s/x.toml"), text).unwrap();
    let (_, problems) = SegmentSet::build(vec![file], None);
    assert_eq!(problems.len(), 1);
    let p = problems[0].to_string();
    assert!(p.starts_with("s/x.toml:") && p.contains("rule:"), "{p}");
    assert!(problems[0].line >= 3, "{p}");
}

/// The rules the property test runs: windows, counts, traits, in_segment, ages and sums.
const MIX: &[(&str, &str)] = &[
    ("did_a", r#"user.did("A")"#),
    ("recent_b", r#"user.did("B", minutes(30))"#),
    ("not_c", r#"!user.did("C")"#),
    ("two_a_hour", r#"user.count("A", hours(1)) >= 2"#),
    ("plan", r#"user.traits.plan == "pro""#),
    (
        "pro_and_a",
        r#"user.in_segment("plan") && user.in_segment("did_a")"#,
    ),
    (
        "b_aged",
        r#"let b = user.first("B"); b != () && b.age() > minutes(45) && !user.did("C")"#,
    ),
    ("spend", r#"user.sum("D", "v", hours(2)) > 10"#),
    ("quiet", r#"user.last_seen.age() > minutes(50)"#),
];

#[derive(Debug, Clone)]
enum Step {
    Track(usize, i64, Millis),
    Identify(bool, Millis),
    Wait(Millis),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0usize..4, 0i64..10, 0..40 * MINUTE).prop_map(|(e, v, gap)| Step::Track(e, v, gap)),
        (any::<bool>(), 0..40 * MINUTE).prop_map(|(pro, gap)| Step::Identify(pro, gap)),
        (0..3 * HOUR).prop_map(Step::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    /// Evaluating only the segments a message can affect, and on timers only those that came
    /// due, gives after every step the memberships that evaluating every segment gives.
    #[test]
    fn indexed_evaluation_equals_evaluating_everything(
        first in 0usize..4,
        rest in proptest::collection::vec(step(), 0..40),
    ) {
        // A profile exists from its first message on.
        let steps: Vec<Step> = std::iter::once(Step::Track(first, 1, 0)).chain(rest).collect();
        let s = set(MIX);
        let mut indexed = Profile::new(1);
        let mut full = Profile::new(1);
        let mut now = T0;
        let names = ["A", "B", "C", "D"];
        for (n, st) in steps.iter().enumerate() {
            let message = match st {
                Step::Track(e, v, gap) => Some((*gap, Some(names[*e]), format!(r#"{{"v":{v}}}"#), false)),
                Step::Identify(pro, gap) => {
                    let plan = if *pro { "pro" } else { "free" };
                    Some((*gap, None, format!(r#"{{"plan":"{plan}"}}"#), true))
                }
                Step::Wait(_) => None,
            };
            match (st, message) {
                (_, Some((gap, name, json, identify))) => {
                    now += gap;
                    let kind = if identify { MessageType::Identify } else { MessageType::Track };
                    observe(&mut indexed, &s, kind, name, &json, now);
                    observe(&mut full, &s, kind, name, &json, now);
                    let e = event(name.unwrap_or(""), now, &json);
                    let trigger = if n == 0 {
                        Trigger::All(Some(e))
                    } else {
                        Trigger::Message { event: name, identify, message: e }
                    };
                    s.evaluate(&mut indexed, trigger, now);
                    s.evaluate(&mut full, Trigger::All(Some(e)), now);
                }
                (Step::Wait(gap), None) => {
                    // Time passes: the indexed side wakes at each noted moment on the way, as
                    // the timer would; the full side re-evaluates everything at the end.
                    let until = now + gap;
                    while let Some(due) = indexed.next_recheck().filter(|&d| d <= until) {
                        s.evaluate(&mut indexed, Trigger::Timer, due);
                    }
                    now = until;
                    s.evaluate(&mut full, Trigger::All(None), now);
                }
                _ => unreachable!(),
            }
            let members = |p: &Profile| -> Vec<String> {
                p.segments().map(str::to_string).collect()
            };
            prop_assert_eq!(members(&indexed), members(&full), "after step {} {:?}", n, st);
        }
    }
}

#[test]
fn the_due_timer_of_an_unloaded_segment_is_dropped() {
    let s = set(&[("kept", "true")]);
    let mut p = Profile::new(1);
    p.memberships.insert(
        "gone",
        crate::profiles::profile::Membership {
            member: true,
            changes: 1,
            since: T0,
            recheck_at: Some(T0),
        },
    );
    s.evaluate(&mut p, Trigger::Timer, T0 + 1);
    assert_eq!(p.next_recheck(), None, "woken once, not at every batch");
    assert!(p.memberships["gone"].member, "the membership itself stays");
}

#[test]
fn a_rule_cannot_change_what_the_next_rule_sees() {
    let s = set(&[
        ("a_shadow", "let user = 1; let x = 5; true"),
        ("b_reader", r#"!user.did("A")"#),
    ]);
    let mut p = Profile::new(1);
    assert!(member(&s, &mut p, "b_reader", T0), "b sees the real `user`");
}

/// Rhai counts its size limits over whole values, the ones a rule is given included: a profile
/// with as many traits as it keeps (200) used to make every rule that read them fail.
#[test]
fn rules_read_a_profile_with_hundreds_of_traits() {
    let s = set(&[(
        "many",
        r#"let t = user.traits; t.len() == 200 && t.plan == "pro" && t.k7.len() == 100"#,
    )]);
    let mut p = Profile::new(1);
    let mut traits: serde_json::Map<String, serde_json::Value> = (0..199)
        .map(|i| (format!("k{i}"), "x".repeat(100).into()))
        .collect();
    traits.insert("plan".into(), "pro".into());
    identify(
        &mut p,
        &s,
        &serde_json::Value::Object(traits).to_string(),
        T0,
    );
    assert!(member(&s, &mut p, "many", T0));
}

/// A window computed at run time gets the history kept for computed windows: one longer than that
/// fails the rule (counted, membership unchanged) rather than answer from part of the history.
#[test]
fn a_computed_window_longer_than_the_history_kept_fails_the_rule() {
    let set = set(&[
        ("short", r#"let n = 10; user.did("A", days(n))"#),
        ("long", r#"let n = 120; user.count("A", days(n)) > 0"#),
    ]);
    assert_eq!(
        set.retention.window,
        crate::segments::analysis::UNKNOWN_WINDOW
    );
    let mut p = Profile::new(1);
    track(&mut p, &set, "A", T0, "{}");
    let eval = set.evaluate(&mut p, Trigger::All(None), T0 + DAY);
    let long = set.position("long").unwrap();
    assert_eq!(eval.failures, [(long, RuleFailure::Error)]);
    assert!(p.memberships.get("short").unwrap().member);
    assert!(p.memberships.get("long").is_none_or(|m| !m.member));
    let error = set.segments[long].health.last_error.lock().unwrap().clone();
    assert!(error.unwrap().contains("further back than the history"));
}

/// `in_segment("b")` reads `b`: removing `b` (or adding it) is a new fingerprint for the rule that
/// reads it, so that rule is backfilled (evaluated on every profile) again.
#[test]
fn a_rule_reading_a_segment_is_new_when_that_segment_comes_or_goes() {
    let reader = ("reader", r#"!user.in_segment("b")"#);
    let b = ("b", r#"user.did("A")"#);
    let other = ("other", r#"user.did("B")"#);
    let fingerprint = |rules: &[(&str, &str)]| {
        let set = set(rules);
        set.segments[set.position("reader").unwrap()].fingerprint
    };
    let with_b = fingerprint(&[reader, b]);
    assert_ne!(with_b, fingerprint(&[reader]));
    assert_eq!(
        with_b,
        fingerprint(&[reader, b, other]),
        "other segments do not count"
    );
    let plain = set(&[other]);
    assert_eq!(
        plain.segments[0].fingerprint,
        xxhash_rust::xxh3::xxh3_64(plain.segments[0].file.rule.as_bytes()),
        "a rule reading no segment keeps the fingerprint it had"
    );
}

/// `sluice check` notes the rules the caps can bend: a computed event name (past the cap on
/// names only written-out names are counted) and a computed window; plain rules get no note.
#[test]
fn check_notes_the_rules_the_caps_can_bend() {
    let set = set(&[
        ("named", r#"let e = "Signed Up"; user.did(e)"#),
        ("windowed", r#"let n = 7; user.count("A", days(n)) > 1"#),
        ("plain", r#"user.did("A") && user.count("B", days(7)) > 1"#),
    ]);
    let notes: Vec<String> = set.notes().iter().map(|n| n.to_string()).collect();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].starts_with("named.toml:2:1: note: this rule reads event names it computes"));
    assert!(notes[1].starts_with("windowed.toml:2:1: note: this rule computes a window"));
}
