//! Fills a profile store with profiles as the profile stage would have built them from months of
//! web traffic, for the scale benchmark (`benches/scale.sh`): `user-{i}` with `anon-{i}`, for i
//! from 0, each with an identify (traits, a fifth of them on the pro plan) and a random number of
//! the web mix's page views and tracks (those of `sluice-loadgen --events web`) spread over the
//! days before the user was last seen. The users the load will send as (`--daily-active N`: the
//! first N of `sluice-loadgen --user-space` with the same count, by its `scatter`) were last seen
//! within the last day, as a product's daily-active users are; the others up to 60 days ago.
//! Each profile is evaluated for every segment of `--segments` and stored with its memberships,
//! its timer and the segments' sizes, marked as backfilled for those rules: a server started on
//! the store carries on from there, with no backfill.
//!
//! ```text
//! sluice-profilegen --segments benches/fifty-segments --dir data/profiles --profiles 10000000 \
//!     --daily-active 1000000
//! ```
//!
//! The store must not exist yet. Deterministic for a given `--seed` and start time but for the
//! times, which are relative to now.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use sluice::profiles::dictionary::Dictionary;
use sluice::profiles::profile::{Millis, Observed, Profile, Retention};
use sluice::profiles::store::{ProfileStore, SegmentStats};
use sluice::segments::watch::Loader;
use sluice::segments::Trigger;
use sluice::vocabulary::MessageType;
use sluice_loadgen::{mix, scatter, EVENTS};

/// Profiles written per transaction.
const CHUNK: u64 = 20_000;
const DAY: Millis = 86_400_000;
const CATEGORIES: [&str; 4] = ["products", "docs", "blog", "pricing"];

struct Options {
    segments: PathBuf,
    dir: PathBuf,
    profiles: u64,
    seed: u64,
    cache_bytes: usize,
    daily_active: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: sluice-profilegen --segments DIR --dir PROFILE_DIR --profiles N [--daily-active N] [--seed N] [--cache-mb 1024]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut o = Options {
        segments: PathBuf::new(),
        dir: PathBuf::new(),
        profiles: 0,
        seed: 1,
        cache_bytes: 1 << 30,
        daily_active: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--segments" => o.segments = value.into(),
            "--dir" => o.dir = value.into(),
            "--profiles" => o.profiles = value.parse().unwrap_or_else(|_| usage()),
            "--seed" => o.seed = value.parse().unwrap_or_else(|_| usage()),
            "--daily-active" => o.daily_active = value.parse().unwrap_or_else(|_| usage()),
            "--cache-mb" => {
                o.cache_bytes = value.parse::<usize>().unwrap_or_else(|_| usage()) << 20
            }
            _ => usage(),
        }
    }
    if o.dir.as_os_str().is_empty() || o.profiles == 0 || o.daily_active > o.profiles {
        usage()
    }
    o
}

/// A stream of random numbers for one user.
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = mix(self.0);
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn raw(json: String) -> Box<RawValue> {
    RawValue::from_string(json).expect("the generator writes valid JSON")
}

/// Which of `profiles` users the load sends as: the first `count` ranks, scattered as
/// `sluice-loadgen` scatters them.
fn daily_active(count: u64, profiles: u64) -> Vec<bool> {
    let mut active = vec![false; profiles as usize];
    for rank in 0..count {
        active[scatter(rank, profiles) as usize] = true;
    }
    active
}

/// The profile of `user-{i}`, built by applying its history of messages; last seen within the
/// last day if it is `active`.
fn profile(i: u64, active: bool, seed: u64, retention: &Retention, now: Millis) -> Profile {
    let mut draws = Draws(mix(seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d)));
    let mut p = Profile::new(i + 1);
    p.user_id = Some(format!("user-{i}"));
    p.add_anonymous_id(&format!("anon-{i}"));
    // Last seen within the last day or up to 60 days ago; active over up to 14 days before that.
    let last = now - draws.below(if active { DAY } else { 60 * DAY } as u64) as Millis;
    let span = 1 + draws.below(14 * DAY as u64) as Millis;
    let first = last - span;
    let plan = if draws.below(5) == 0 { "pro" } else { "free" };
    let traits = raw(format!(
        r#"{{"email":"user-{i}@example.com","name":"User {i}","plan":"{plan}","createdAt":"2026-01-{:02}T10:00:00.000Z"}}"#,
        1 + draws.below(28)
    ));
    p.apply(
        &Observed {
            kind: MessageType::Identify,
            event: None,
            at: first,
            properties: None,
            traits: Some(&traits),
        },
        retention,
        now,
    );
    // Most users send a few messages, some many: 1 + an exponential-ish number, at most 64.
    let messages = 1 + (draws.below(64) * draws.below(64) / 64);
    let mut at = first;
    for n in 0..messages {
        at = if n + 1 == messages {
            last
        } else {
            (at + draws.below(span as u64 / messages + 1) as Millis).min(last)
        };
        let page = draws.below(3) == 0;
        let (kind, event) = if page {
            (MessageType::Page, None)
        } else {
            (MessageType::Track, Some(EVENTS[draws.below(8) as usize]))
        };
        let properties = raw(format!(
            r#"{{"product_id":"sku-{}","price":{}.{:02},"quantity":{},"currency":"EUR","category":"{}"}}"#,
            draws.below(5000),
            draws.below(300),
            draws.below(100),
            1 + draws.below(4),
            CATEGORIES[draws.below(4) as usize]
        ));
        p.apply(
            &Observed {
                kind,
                event,
                at,
                properties: Some(&properties),
                traits: None,
            },
            retention,
            now,
        );
    }
    p
}

fn main() {
    let o = parse_options();
    let (set, problems) = Loader::new(&o.segments).load();
    for problem in &problems {
        eprintln!("{problem}");
    }
    if !problems.is_empty() {
        std::process::exit(1);
    }
    if o.dir.join("store").exists() {
        eprintln!("{} holds a profile store already", o.dir.display());
        std::process::exit(1);
    }
    let store = ProfileStore::open(&o.dir, o.cache_bytes).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as Millis;
    let started = Instant::now();
    let active = daily_active(o.daily_active, o.profiles);
    let mut sizes = vec![0u64; set.segments.len()];
    let mut encoded_bytes = 0;
    let mut history_bytes = 0;
    let mut start = 0;
    while start < o.profiles {
        let end = (start + CHUNK).min(o.profiles);
        let mut encoded = store.encoded();
        let mut identities = Vec::new();
        let mut members = Vec::new();
        let mut timers = Vec::new();
        for i in start..end {
            let mut p = profile(i, active[i as usize], o.seed, &set.retention, now);
            set.evaluate(&mut p, Trigger::All(None), now);
            for (place, segment) in set.segments.iter().enumerate() {
                if p.memberships.get(&segment.key).is_some_and(|m| m.member) {
                    sizes[place] += 1;
                    members.push((place, p.id));
                }
            }
            if let Some(due) = p.next_recheck() {
                timers.push((p.id, due));
            }
            identities.extend(p.identity_keys().into_iter().map(|k| (k, p.id)));
            encoded.push(&p);
            history_bytes += history_bytes_of(&p, store.dictionary());
        }
        encoded_bytes += encoded.bytes();
        // In key order: the store's sort of the batch has less to do.
        identities.sort_unstable();
        let mut w = store.write().expect("a write transaction");
        w.put_profiles(&encoded);
        for (key, id) in &identities {
            w.link(key, *id);
        }
        for (place, id) in members {
            w.set_member(&set.segments[place].key, id, true);
        }
        for (id, due) in timers {
            w.move_timer(id, None, Some(due));
        }
        w.set_meta("next_id", end + 1);
        w.set_meta("profiles", end);
        w.set_meta("time", now as u64);
        w.set_meta("offset", 0);
        for (place, segment) in set.segments.iter().enumerate() {
            let stats = SegmentStats {
                size: sizes[place],
                last_change: Some(now),
                backfilled: Some(segment.fingerprint),
            };
            w.put_segment_stats(&segment.key, &stats)
                .expect("segment stats written");
        }
        w.commit().expect("committed");
        start = end;
        if start % 1_000_000 == 0 || start == o.profiles {
            eprintln!(
                "{start} profiles in {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let bytes = store
        .flush()
        .and_then(|()| store.disk_bytes())
        .unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        });
    println!(
        "{} profiles, {} identities, {} memberships over {} segments; encoded {} bytes per profile \
         ({} of them history); store {} MB, {} bytes per profile; {:.0} s",
        o.profiles,
        o.profiles * 2,
        sizes.iter().sum::<u64>(),
        set.segments.len(),
        encoded_bytes / o.profiles as usize,
        history_bytes / o.profiles as usize,
        bytes >> 20,
        bytes / o.profiles,
        started.elapsed().as_secs_f64()
    );
    let by_keyspace: Vec<String> = store
        .keyspace_bytes()
        .into_iter()
        .map(|(name, bytes)| format!("{name} {}", bytes / o.profiles))
        .collect();
    println!("bytes per profile by keyspace: {}", by_keyspace.join(", "));
}

/// The bytes of `p`'s encoding that its history takes (with the names it refers to).
fn history_bytes_of(p: &sluice::profiles::Profile, words: &Dictionary) -> usize {
    let mut without = p.clone();
    without.history.clear();
    without.names.clear();
    let (mut all, mut rest) = (Vec::new(), Vec::new());
    sluice::profiles::codec::encode(p, words, &mut all);
    sluice::profiles::codec::encode(&without, words, &mut rest);
    all.len() - rest.len()
}
