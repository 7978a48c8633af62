//! Profile update plus segment evaluation, alone: the web traffic mix of the load generator
//! (page views and eight kinds of tracks over 50,000 users) applied to in-memory profiles with
//! the 50 segments of `benches/fifty-segments/` loaded. And one rule on one profile, on the
//! native interpreter and on Rhai.
//!
//!     cargo bench --bench segments

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::value::RawValue;
use sluice::profiles::dictionary::Dictionary;
use sluice::profiles::profile::{event_name, Observed};
use sluice::profiles::Profile;
use sluice::segments::api;
use sluice::segments::{SegmentSet, Trigger};
use sluice::vocabulary::MessageType;
use sluice_loadgen::{mix, EVENTS};

const USERS: u64 = 50_000;
const T0: i64 = 1_767_225_600_000;

struct Message {
    user: u64,
    kind: MessageType,
    event: Option<&'static str>,
    properties: Box<RawValue>,
}

fn traffic(n: usize) -> Vec<Message> {
    (0..n as u64)
        .map(|i| {
            let r = mix(i);
            let page = r % 3 == 0;
            let properties = if page {
                r#"{"path":"/pricing","title":"Pricing"}"#.to_string()
            } else {
                format!(
                    r#"{{"product_id":"sku-{}","price":{}.5,"quantity":{}}}"#,
                    r % 5000,
                    r % 300,
                    1 + r % 4
                )
            };
            Message {
                user: (r >> 8) % USERS,
                kind: if page {
                    MessageType::Page
                } else {
                    MessageType::Track
                },
                event: (!page).then(|| EVENTS[(r >> 12) as usize % EVENTS.len()]),
                properties: RawValue::from_string(properties).unwrap(),
            }
        })
        .collect()
}

fn fifty_segments() -> SegmentSet {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/fifty-segments");
    let (set, problems) = sluice::segments::watch::Loader::new(&dir).load();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(set.len(), 50);
    set
}

/// Applies `m` to its profile and evaluates what it can affect, as the profile stage does.
fn process(set: &SegmentSet, profiles: &mut HashMap<u64, Profile>, m: &Message, at: i64) -> usize {
    let mut created = false;
    let profile = profiles.entry(m.user).or_insert_with(|| {
        created = true;
        Profile::new(m.user)
    });
    let event = event_name(m.kind, m.event);
    profile.apply(
        &Observed {
            kind: m.kind,
            event,
            at,
            properties: Some(&m.properties),
            traits: None,
        },
        &set.retention,
        at,
    );
    let message = api::Message {
        name: event.unwrap_or_default(),
        at,
        now: at,
        properties: Some(m.properties.get()),
        kind: m.kind.as_str(),
    };
    let trigger = if created {
        Trigger::All(Some(message))
    } else {
        Trigger::Message {
            event,
            identify: false,
            message,
        }
    };
    set.evaluate(profile, trigger, at).transitions.len()
}

fn profile_update_and_segments(c: &mut Criterion) {
    let set = fifty_segments();
    let messages = traffic(200_000);
    let mut profiles = HashMap::new();
    // Warm up: every user has a profile with some history, as in a running deployment.
    let mut at = T0;
    for m in &messages {
        at += 10;
        process(&set, &mut profiles, m, at);
    }
    let mut group = c.benchmark_group("profiles");
    group.throughput(Throughput::Elements(1_000));
    let mut next = 0usize;
    group.bench_function("update_and_evaluate_50_segments_x1000", |b| {
        b.iter(|| {
            let mut changes = 0;
            for _ in 0..1_000 {
                at += 10;
                changes += process(&set, &mut profiles, &messages[next % messages.len()], at);
                next += 1;
            }
            changes
        })
    });
    group.finish();
}

/// `busy_0` of the fifty segments, on a profile with 40 occurrences in its history.
fn one_rule_native_and_rhai(c: &mut Criterion) {
    use rhai::Dynamic;
    use sluice::segments::api::{Round, User};
    use sluice::segments::{native, sandbox};

    let rule = r#"user.count("Product Viewed", hours(24)) >= 3 && !user.did("Order Completed")"#;
    let set = fifty_segments();
    let mut profile = Profile::new(1);
    for i in 0..40 {
        let m = Observed {
            kind: MessageType::Track,
            event: Some(EVENTS[i % 4]),
            at: T0 + i as i64 * 60_000,
            properties: None,
            traits: None,
        };
        profile.apply(&m, &set.retention, T0 + 40 * 60_000);
    }
    let round = Round::new(
        std::sync::Arc::new(profile),
        T0 + 40 * 60_000,
        Default::default(),
        i64::MAX,
    );
    let compiled = native::compile(rule).expect("in the native subset");
    let engine = sandbox::engine();
    let ast = engine
        .compile_with_scope(&sandbox::compile_scope(), rule)
        .unwrap();
    let mut group = c.benchmark_group("one_rule");
    group.bench_function("native", |b| b.iter(|| compiled.eval(&round)));
    group.bench_function("rhai", |b| {
        b.iter(|| {
            let mut scope = sandbox::scope(Dynamic::from(User(round.clone())), Dynamic::UNIT);
            engine
                .eval_ast_with_scope::<Dynamic>(&mut scope, &ast)
                .unwrap()
        })
    });
    group.finish();
}

/// A profile's stored encoding, both ways: 10,000 profiles of 50 messages each over 25 minutes
/// (about what a user of `benches/segments.sh` has after its warm-up), so many that they do not
/// fit in the CPU's caches, as in the server.
fn profile_encoding(c: &mut Criterion) {
    use sluice::profiles::codec;

    let set = fifty_segments();
    let mut profiles = HashMap::new();
    for (i, m) in traffic(500_000).iter().enumerate() {
        let m = Message {
            user: i as u64 % 10_000,
            properties: m.properties.clone(),
            ..*m
        };
        process(&set, &mut profiles, &m, T0 + i as i64 * 3);
    }
    let profiles: Vec<Profile> = profiles.into_values().collect();
    let mut buffer = Vec::new();
    let words = Dictionary::default();
    let encoded: Vec<Vec<u8>> = profiles
        .iter()
        .map(|p| {
            let mut out = Vec::new();
            codec::encode(p, &words, &mut out);
            out
        })
        .collect();
    let bytes: usize = encoded.iter().map(Vec::len).sum();
    println!(
        "profile_encoding: {} bytes per profile",
        bytes / encoded.len()
    );
    let mut group = c.benchmark_group("profile_encoding");
    group.throughput(Throughput::Elements(profiles.len() as u64));
    group.bench_function("encode_x10000", |b| {
        b.iter(|| {
            for p in &profiles {
                buffer.clear();
                codec::encode(p, &words, &mut buffer);
            }
            buffer.len()
        })
    });
    group.bench_function("decode_x10000", |b| {
        b.iter(|| {
            encoded
                .iter()
                .map(|e| codec::decode(e, &words).unwrap().history.len())
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    profile_update_and_segments,
    one_rule_native_and_rhai,
    profile_encoding
);
criterion_main!(benches);
