//! The native interpreter against Rhai: the same rules on the same profiles must give the same
//! answers and note the same flip moments.

use std::sync::Arc;

use proptest::prelude::*;
use rhai::Dynamic;

use super::*;
use crate::profiles::memberships::Layout;
use crate::profiles::profile::{EventStats, Membership, Millis, Name, Profile};
use crate::segments::api::{self, User};
use crate::segments::sandbox;

const HOUR: Millis = 3_600_000;
const T0: Millis = 1_767_225_600_000;
const NAMES: [&str; 3] = ["A", "B", "Page Viewed"];

/// The answer (or the error) and the flip moment noted, with Rhai.
fn rhai(rule: &str, round: &Arc<Round>) -> (Result<bool, String>, Option<Millis>) {
    thread_local! {
        static ENGINE: rhai::Engine = sandbox::engine();
    }
    ENGINE.with(|engine| rhai_on(engine, rule, round))
}

fn rhai_on(
    engine: &rhai::Engine,
    rule: &str,
    round: &Arc<Round>,
) -> (Result<bool, String>, Option<Millis>) {
    let ast = engine
        .compile_with_scope(&sandbox::compile_scope(), rule)
        .unwrap_or_else(|e| panic!("{rule}: {e}"));
    let mut scope = sandbox::scope(Dynamic::from(User(round.clone())), Dynamic::UNIT);
    api::start_recording();
    let answer = engine
        .eval_ast_with_scope::<Dynamic>(&mut scope, &ast)
        .map_err(|e| e.to_string())
        .and_then(|v| v.as_bool().map_err(str::to_string));
    (answer, api::recorded())
}

fn native(rule: &str, round: &Round) -> (Option<bool>, Option<Millis>) {
    let compiled = compile(rule).unwrap_or_else(|| panic!("{rule} should compile natively"));
    api::start_recording();
    let answer = compiled.eval(round);
    (answer, api::recorded())
}

fn round(mut profile: Profile, now: Millis) -> Arc<Round> {
    let keys: Arc<hashbrown::HashMap<String, usize>> = Arc::new(
        [("a".to_string(), 0), ("b".to_string(), 1)]
            .into_iter()
            .collect(),
    );
    let layout: Layout = ["a", "b"].into_iter().map(Name::from).collect();
    profile
        .memberships
        .lay_out(&layout, |key| keys.get(key).copied());
    Round::new(Arc::new(profile), now, keys, Millis::MAX)
}

fn agree(rule: &str, round: &Arc<Round>) {
    let (expected, expected_flip) = rhai(rule, round);
    let (answer, flip) = native(rule, round);
    match answer {
        Some(answer) => assert_eq!(
            (Ok(answer), flip),
            (expected, expected_flip),
            "{rule}\nprofile: {:?}",
            round.profile
        ),
        // The native interpreter gives up only where Rhai fails the rule.
        None => assert!(
            expected.is_err(),
            "{rule}: native failed, Rhai said {expected:?}"
        ),
    }
}

fn shipped_rules() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut rules = Vec::new();
    for dir in ["benches/fifty-segments", "segments"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let file = crate::segments::files::read(&path).unwrap();
                rules.push((path.display().to_string(), file.rule));
            }
        }
    }
    rules
}

#[test]
fn the_benchmark_rules_all_compile_natively() {
    let rules = shipped_rules();
    let native: Vec<_> = rules
        .iter()
        .filter(|(path, _)| path.contains("fifty-segments"))
        .map(|(path, rule)| (path, compile(rule).is_some()))
        .collect();
    assert_eq!(native.len(), 50);
    let refused: Vec<_> = native.iter().filter(|(_, ok)| !ok).collect();
    assert!(refused.is_empty(), "{refused:?}");
}

#[test]
fn what_is_not_in_the_subset_is_left_to_rhai() {
    for rule in [
        r#"event.name == "A""#,
        r#"user.count("A") + 1 > 2"#,
        r#"if user.did("A") { true } else { false }"#,
        r#"user.first("A").age().days > 1"#,
        r#"user.first("A") == user.first("B")"#,
        r#"user.count("A") == 1 == true"#,
        r#"user.traits.plan"#,
        r#"user.traits.vip && user.did("A")"#,
        r#"let name = "A"; user.did(name)"#,
        r#"user.did("A");"#,
        r#"user.count("A")"#,
        r#"user.did("A") > user.did("B")"#,
        "user.count(`A`) > 1",
        r#"user.traits.a == user.traits.b"#,
        r#"let user = 1; true"#,
        "1.5e3 > 1",
    ] {
        assert!(compile(rule).is_none(), "{rule}");
    }
}

/// A profile with a few occurrences of each name at random times before `now`, random traits of
/// every JSON type, and random memberships of segments `a` and `b`.
fn profiles() -> impl Strategy<Value = (Profile, Millis)> {
    let occurrences = prop::collection::vec((0..NAMES.len(), 0..72 * HOUR, 0..50u8), 0..12);
    let trait_value = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        (-3i64..8).prop_map(serde_json::Value::from),
        (-3.0f64..30.0).prop_map(serde_json::Value::from),
        prop::sample::select(vec!["pro", "free", ""]).prop_map(serde_json::Value::from),
        Just(serde_json::json!([1, 2])),
        Just(serde_json::json!({"x": 1})),
    ];
    let traits = prop::collection::vec(
        (prop::sample::select(vec!["plan", "age"]), trait_value),
        0..3,
    );
    (
        occurrences,
        traits,
        any::<(bool, bool)>(),
        0..48 * HOUR,
        0..72 * HOUR,
    )
        .prop_map(
            |(occurrences, traits, (in_a, in_b), seen_ago, now_offset)| {
                let now = T0 + 72 * HOUR;
                let mut p = Profile::new(1);
                let mut sorted = occurrences;
                sorted.sort_by_key(|(_, ago, _)| std::cmp::Reverse(*ago));
                for (name, ago, price) in sorted {
                    let at = now - ago;
                    let name = NAMES[name];
                    let stats = p.events.entry(name.into()).or_insert(EventStats {
                        first: at,
                        ..EventStats::default()
                    });
                    stats.count += 1;
                    stats.last = at;
                    let values = [("price".to_string(), f64::from(price) / 2.0)];
                    p.record(name, at, &values);
                }
                let history = p.history.occurrences();
                let (first, last) = (history.first().map(|o| o.at), history.last().map(|o| o.at));
                p.first_seen = first.unwrap_or(now - seen_ago);
                p.last_seen = last.unwrap_or(now - seen_ago);
                for (name, value) in traits {
                    p.traits.insert(name.to_string(), value);
                }
                for (key, member) in [("a", in_a), ("b", in_b)] {
                    p.memberships.insert(
                        key,
                        Membership {
                            member,
                            ..Membership::default()
                        },
                    );
                }
                (p, now - now_offset % HOUR)
            },
        )
}

/// Rules built from the subset's atoms, joined at random.
fn rules() -> impl Strategy<Value = String> {
    let atoms = vec![
        r#"user.did("A")"#,
        r#"user.did("B", hours(24))"#,
        r#"user.did("Page Viewed", minutes(90))"#,
        r#"user.count("A") >= 2"#,
        r#"user.count("B", hours(36)) > 1"#,
        r#"user.count("A", days(2)) == 0"#,
        r#"user.sum("A", "price", hours(48)) >= 20.5"#,
        r#"user.sum("B", "price", days(1)) < 10"#,
        r#"user.in_segment("a")"#,
        r#"!user.in_segment("b")"#,
        r#"user.in_segment("unknown")"#,
        r#"user.traits.plan == "pro""#,
        r#"user.traits.plan != "pro""#,
        r#"user.traits.plan < "q""#,
        r#"user.traits.age >= 18"#,
        r#"user.traits.age < 2.5"#,
        r#"user.traits.age == true"#,
        r#"user.traits.plan != false"#,
        r#"18 <= user.traits.age"#,
        "user.last_seen.age() > hours(20)",
        "user.last_seen.age() <= days(1)",
        "days(1) < user.first_seen.age()",
        "user.first_seen.age() == hours(3)",
        r#"user.first("A") != () && user.first("A").age() > hours(30)"#,
        r#"user.last("B") == () || user.last("B").age() <= hours(12)"#,
        r#"user.first("Page Viewed").age() < days(2)"#,
        r#"user.traits.plan != ()"#,
        r#"user.count("A") > -1"#,
        // Near the boundaries, where `<` and `<=` part.
        r#"user.count("A") < 2"#,
        r#"user.count("B") <= 1"#,
        r#"user.count("A", hours(48)) != 1"#,
        r#"user.count("B") >= 1.0"#,
        r#"user.traits.age < 3"#,
        r#"user.traits.age <= 3.0"#,
        r#"3 > user.traits.age"#,
        r#"user.traits.age == 3"#,
        r#"user.traits.plan <= "pro""#,
        "true",
        "2 > 1.5",
    ];
    let atom = prop::sample::select(atoms).prop_map(str::to_string);
    let expr = atom.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a} && {b}")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
            inner.prop_map(|a| format!("!({a})")),
        ]
    });
    prop_oneof![
        3 => expr.clone(),
        1 => expr.prop_map(|a| format!("let x = user.last_seen.age(); ({a}) && x > hours(1)")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn native_and_rhai_agree(rule in rules(), (profile, now) in profiles()) {
        agree(&rule, &round(profile, now));
    }

    #[test]
    fn the_shipped_rules_agree((profile, now) in profiles()) {
        let round = round(profile, now);
        for (_, rule) in shipped_rules() {
            if compile(&rule).is_some() {
                agree(&rule, &round);
            }
        }
    }
}
