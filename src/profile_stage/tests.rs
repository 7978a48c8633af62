//! The stage driven batch by batch, with a save held in flight by the saver's test gate: what
//! it keeps, reads and deletes while the store is behind it.

use std::sync::atomic::AtomicI64;

use serde_json::{json, Value};

mod differential;

use super::*;
use crate::config::DedupConfig;
use crate::intake_log::dedup::Dedup;
use crate::intake_log::LogOptions;
use object_store::ObjectStoreExt;

const T0: &str = "2026-01-01T00:00:00Z";

struct Fixture {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    log: Arc<IntakeLog>,
    store: Arc<ProfileStore>,
    /// The stage's clock, in milliseconds.
    now: Arc<AtomicI64>,
    stage: Stage,
    messages: usize,
    /// What the stage was built from, to build it again.
    parts: Parts,
    live: Arc<LiveSegments>,
    /// The lake the stage reads history back from, if it has one, and its writer.
    lake: Option<(crate::lake::LakeStore, crate::lake::writer::LakeWriter)>,
}

fn set(rules: &[(&str, &str)]) -> Arc<SegmentSet> {
    Arc::new(crate::segments::rules::tests::set(rules))
}

/// What a stage is built from, over a log and a store in `dir`, with a clock the test moves.
fn parts(
    dir: &std::path::Path,
    runtime: &tokio::runtime::Runtime,
    cache_size: usize,
    log_max_size: u64,
) -> (Parts, Arc<AtomicI64>) {
    let options = LogOptions {
        dir: dir.join("log"),
        segment_size: 64 << 20,
        max_size: log_max_size,
    };
    let log = Arc::new(IntakeLog::open(options, Default::default()).unwrap());
    let store = Arc::new(ProfileStore::open(&dir.join("profiles"), 1 << 20).unwrap());
    // Longer than any test's span of time: what the dedup forgets, a test forgets on purpose.
    let dedup = Dedup::new(
        &DedupConfig {
            window: Duration::from_secs(365 * 86_400),
            max_ids: 10_000,
        },
        dir.join("log/dedup"),
        Default::default(),
    );
    let start = DateTime::parse_from_rfc3339(T0).unwrap().timestamp_millis();
    let now = Arc::new(AtomicI64::new(start));
    let clock: Clock = {
        let now = now.clone();
        Arc::new(move || DateTime::from_timestamp_millis(now.load(Ordering::SeqCst)).unwrap())
    };
    let parts = Parts {
        store,
        // As the server gives it: the stage's own records may use the log's reserve.
        appender: Arc::new(Appender::new(log.clone(), Arc::new(dedup)).for_own_records()),
        log,
        metrics: Default::default(),
        clock,
        runtime: runtime.handle().clone(),
        cache_size,
        cache_memory: usize::MAX,
        save_every: Duration::from_secs(3600),
        lake: None,
        health: Health::new("profiles", CONSUMER, Default::default()),
    };
    (parts, now)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

impl Fixture {
    fn new(cache_size: usize, segments: Arc<SegmentSet>) -> Fixture {
        Fixture::build(cache_size, segments, false)
    }

    /// A stage with a lake (in memory), which [`Fixture::flush_lake`] fills from the log.
    fn with_lake(segments: Arc<SegmentSet>) -> Fixture {
        Fixture::build(100, segments, true)
    }

    fn with_lake_and_cache(cache_size: usize, segments: Arc<SegmentSet>) -> Fixture {
        Fixture::build(cache_size, segments, true)
    }

    fn build(cache_size: usize, segments: Arc<SegmentSet>, with_lake: bool) -> Fixture {
        Fixture::build_with_log(cache_size, segments, with_lake, 1 << 30)
    }

    fn build_with_log(
        cache_size: usize,
        segments: Arc<SegmentSet>,
        with_lake: bool,
        log_max_size: u64,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime();
        let (mut parts, now) = parts(dir.path(), &runtime, cache_size, log_max_size);
        let lake = with_lake.then(|| {
            let store = crate::lake::LakeStore::in_memory();
            std::fs::create_dir_all(dir.path().join("lake-state")).unwrap();
            let writer = crate::lake::writer::LakeWriter::new(
                store.clone(),
                parts.log.consumer(crate::lake::writer::CONSUMER).unwrap(),
                &dir.path().join("lake-state"),
                Default::default(),
                Default::default(),
                runtime.handle().clone(),
                Default::default(),
            )
            .unwrap();
            let limits = crate::query::QueryLimits::default();
            parts.lake = Some(QueryEngine::new(store.clone(), Default::default(), limits));
            (store, writer)
        });
        let (log, store) = (parts.log.clone(), parts.store.clone());
        let live = Arc::new(LiveSegments::new(segments.clone()));
        let consumer = log.consumer(CONSUMER).unwrap();
        let mut stage = Stage::new(parts.clone(), consumer, live.clone()).unwrap();
        stage.install(segments).unwrap();
        // The segments are new: their backfill (of no profiles) finishes with a save.
        while stage.step().unwrap() {}
        stage.flush().unwrap();
        assert!(stage.backfill.is_none());
        Fixture {
            _dir: dir,
            runtime,
            log,
            store,
            now,
            stage,
            messages: 0,
            parts,
            live,
            lake,
        }
    }

    /// Writes everything the log holds past the lake's cursor to the lake.
    fn flush_lake(&mut self) {
        use crate::lake::writer::{Flush, CONSUMER};
        let start = self.log.consumer(CONSUMER).unwrap().committed();
        let mut flush = Flush::new(start, Default::default());
        for r in self.log.reader(start).read(usize::MAX).unwrap() {
            flush.add(&r).unwrap();
        }
        let (_, writer) = self.lake.as_mut().expect("a fixture with a lake");
        writer.write(&flush.finish().unwrap()).unwrap();
    }

    /// Appends `messages` to the log (one request: one arrival time), as the edge writes them,
    /// and does not run the stage.
    fn append(&mut self, messages: &[Value]) {
        let received = (self.stage.clock)();
        let mut records = RecordBatch::default();
        for m in messages {
            self.messages += 1;
            push_as_the_edge(&mut records, &format!("m{}", self.messages), m, received);
        }
        self.runtime.block_on(self.log.append(records)).unwrap();
    }

    /// The process dies (nothing unsaved is written) and starts again from the store; with
    /// `forget_dedup`, its dedup has forgotten every id (as after an outage longer than its
    /// window).
    fn crash_and_restart(&mut self, forget_dedup: bool) {
        if forget_dedup {
            let dir = self._dir.path().join(format!("dedup-{}", self.messages));
            let config = DedupConfig {
                window: Duration::from_secs(3600),
                max_ids: 10_000,
            };
            let dedup = Arc::new(Dedup::new(&config, dir, Default::default()));
            let appender = Appender::new(self.parts.log.clone(), dedup);
            self.parts.appender = Arc::new(appender.for_own_records());
        }
        // A save in flight is written first (the saver finishes it): the process died right
        // after it committed. Nothing else the old stage holds is written.
        let _ = self.stage.wait_for_save();
        let consumer = self.log.consumer(CONSUMER).unwrap();
        let stage = Stage::new(self.parts.clone(), consumer, self.live.clone()).unwrap();
        drop(std::mem::replace(&mut self.stage, stage));
        self.stage.install(self.live.current()).unwrap();
    }

    /// Runs the stage until it has nothing to do (clock records included).
    fn settle(&mut self) {
        while self.stage.step().unwrap() {}
    }

    /// The segment changes in the log, in order: (messageId, event) of the `sluice` source's
    /// tracks.
    fn changes(&self) -> Vec<(String, String)> {
        let records = self.log.reader(0).read(10_000).unwrap();
        records
            .iter()
            .filter_map(|r| {
                let e = Entry::decode(&r.payload).ok()?;
                let body: Value = serde_json::from_slice(e.body).ok()?;
                (e.source == SOURCE && body["type"] == "track").then(|| {
                    let event = body["event"].as_str().unwrap().to_string();
                    (e.message_id.to_string(), event)
                })
            })
            .collect()
    }

    /// Appends `messages` to the log, then runs the stage over them in one batch.
    fn step(&mut self, messages: &[Value]) -> Result<(), StageError> {
        self.append(messages);
        assert!(self.stage.step()?, "the batch had work");
        Ok(())
    }

    fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }

    /// The profile the store holds for `identity` (`user:...` or `anon:...`).
    fn stored(&self, identity: &str) -> Option<Profile> {
        let r = self.store.read().unwrap();
        let id = r.lookup(identity).unwrap()?;
        r.profile(id).unwrap()
    }
}

/// Adds `message` to `records` as the edge stores an accepted one from the `web` source: with
/// its messageId, its arrival, and a timestamp (the arrival when it has none).
fn push_as_the_edge(records: &mut RecordBatch, id: &str, message: &Value, received: DateTime<Utc>) {
    let mut m = message.clone();
    m["messageId"] = json!(id);
    m["receivedAt"] = json!(crate::vocabulary::format_time(received));
    if m.get("timestamp").is_none() {
        m["timestamp"] = m["receivedAt"].clone();
    }
    let body = m.to_string();
    records.push_with(|b| {
        Entry::encode(b, Status::Accepted, received, "web", id, "", |b| {
            b.extend_from_slice(body.as_bytes())
        })
    });
}

fn page(who: Value) -> Value {
    let mut m = json!({"type": "page", "name": "Home"});
    m.as_object_mut()
        .unwrap()
        .extend(who.as_object().unwrap().clone());
    m
}

/// Clients fill the log to its limit while the stage is behind: the stage still applies what it
/// reads and emits its segment changes, into the log's reserve. Refused, it failed every batch,
/// and never moved again when it was the log's slowest consumer (only its progress frees space).
#[test]
fn a_log_full_of_client_messages_does_not_stop_the_stage() {
    let rules = set(&[("viewers", r#"user.did("Page Viewed")"#)]);
    let mut f = Fixture::build_with_log(100, rules, false, 128 * 1024);
    let users: Vec<Value> = (0..5)
        .map(|i| page(json!({"userId": format!("u{i}")})))
        .collect();
    f.append(&users);
    let mut filler = 0;
    loop {
        let received = (f.stage.clock)();
        let mut records = RecordBatch::default();
        let id = format!("filler-{filler}");
        push_as_the_edge(&mut records, &id, &users[filler % 5], received);
        if f.runtime.block_on(f.log.append(records)).is_err() {
            break;
        }
        filler += 1;
    }
    assert!(
        filler > 100,
        "the log took {filler} messages before it was full"
    );
    f.settle();
    assert_eq!(f.changes_of("viewers").len(), 5, "each user entered once");
    assert!(
        f.log.stats().bytes > 128 * 1024,
        "the changes went into the reserve"
    );
}

/// A profile a save in flight holds is older in the store until that save commits: the cache
/// must keep it, even over its bounds, or the next message reads the store's older version (here,
/// none at all).
#[test]
fn a_profile_in_a_save_in_flight_stays_cached_until_the_save_commits() {
    let mut f = Fixture::new(3, set(&[("viewers", r#"user.did("Page Viewed")"#)]));
    let gate = f.stage.saves.saver.gate.clone();
    gate.set(false);
    f.step(&[page(json!({"userId": "u1"})), page(json!({"userId": "u2"}))])
        .unwrap();
    f.stage.hand_off().unwrap();
    // Two more profiles put the cache over its bound of three, so the stage hands the next save
    // off and waits for this one: the gate opens a little later.
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        gate.set(true);
    });
    f.step(&[page(json!({"userId": "u3"})), page(json!({"userId": "u4"}))])
        .unwrap();
    f.step(&[page(json!({"userId": "u1"}))]).unwrap();
    opener.join().unwrap();
    f.stage.flush().unwrap();
    let u1 = f.stored("user:u1").expect("u1 saved");
    assert_eq!(u1.events["Page Viewed"].count, 2);
    assert_eq!(f.stage.metrics.redos.get(), 0);
}

/// A batch's due timers and backfill chunk are listed at its start, from the store; a message in
/// the same batch can merge one of those profiles away. It must stay gone: neither woken nor
/// backfilled back into the cache, and so never saved again.
#[test]
fn a_profile_merged_away_is_not_woken_or_backfilled_back() {
    let recent = ("recent", r#"user.did("Page Viewed", minutes(20))"#);
    let mut f = Fixture::new(100, set(&[recent]));
    f.step(&[
        page(json!({"anonymousId": "a1"})),
        json!({"type": "track", "event": "Signed Up", "userId": "u1"}),
    ])
    .unwrap();
    f.stage.flush().unwrap();
    let anonymous = f.stored("anon:a1").expect("a1's profile").id;
    assert_eq!(
        f.store.read().unwrap().next_due(None).unwrap(),
        Some(f.stored("anon:a1").unwrap().first_seen + 20 * 60_000 + 1),
        "a1's timer: the first moment its page view is out of the window"
    );
    // A new segment to backfill, and the window's end passed: the next batch lists a1's
    // profile both as due and in its backfill chunk, then merges it into u1's.
    f.stage
        .install(set(&[recent, ("known", r#"user.traits.email != ()"#)]))
        .unwrap();
    f.advance(Duration::from_secs(21 * 60));
    f.step(&[json!({"type": "identify", "userId": "u1", "anonymousId": "a1"})])
        .unwrap();
    f.stage.flush().unwrap();
    let r = f.store.read().unwrap();
    assert_eq!(
        r.profile(anonymous).unwrap(),
        None,
        "a1's profile stays deleted"
    );
    assert_eq!(r.meta("profiles").unwrap(), Some(1));
    assert_eq!(r.members("recent", None, 10).unwrap(), Vec::<u64>::new());
    assert_eq!(r.next_due(None).unwrap(), None, "no timer left behind");
    let u1 = f.stored("anon:a1").expect("a1 is u1 now");
    assert_eq!(u1.user_id.as_deref(), Some("u1"));
    assert_eq!(f.stage.metrics.redos.get(), 0);
}

/// A message the stage keeps failing on (here, it panics) does not stop it: it is started again
/// from the store, and after three failures the message is filed in the quarantine (a rejected
/// record of the `sluice` source, with the reason) and the messages after it are applied.
#[test]
fn a_message_the_stage_keeps_failing_on_is_set_aside_and_the_stage_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let (parts, _) = parts(dir.path(), &runtime, 100, 1 << 30);
    let (log, store, health) = (parts.log.clone(), parts.store.clone(), parts.health.clone());
    let segments = set(&[("seen", r#"user.did("Page Viewed")"#)]);
    let live = Arc::new(LiveSegments::new(segments.clone()));
    let (_sets, reloaded) = std::sync::mpsc::sync_channel(1);
    let stage = ProfileStage::start(parts, segments, reloaded, live).unwrap();
    let mut records = RecordBatch::default();
    let received = DateTime::parse_from_rfc3339(T0).unwrap().to_utc();
    for (id, user) in [
        ("m1", "before"),
        (crate::supervisor::POISON_FOR_TESTS, "poisoned"),
        ("m3", "after"),
    ] {
        let body = page(json!({ "userId": user })).to_string();
        records.push_with(|b| {
            Entry::encode(b, Status::Accepted, received, "web", id, "", |b| {
                b.extend_from_slice(body.as_bytes())
            })
        });
    }
    let appended = runtime.block_on(log.append(records)).unwrap();
    // (A clock record, for the new segment's backfill, may come before them.)
    let poisoned_at = appended.start + 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    let quarantined = loop {
        let found: Vec<(String, String)> = log
            .reader(0)
            .read(100)
            .unwrap()
            .iter()
            .filter_map(|r| {
                let e = Entry::decode(&r.payload).ok()?;
                (e.status == Status::Rejected)
                    .then(|| (e.message_id.to_string(), e.reason.to_string()))
            })
            .collect();
        if !found.is_empty() {
            break found;
        }
        assert!(Instant::now() < deadline, "nothing was set aside");
        std::thread::sleep(Duration::from_millis(20));
    };
    stage.finish();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(
        quarantined[0].0,
        format!("set-aside-profiles-{poisoned_at}")
    );
    assert!(
        quarantined[0].1.contains("failed on it 3 times") && quarantined[0].1.contains("poison"),
        "{quarantined:?}"
    );
    assert_eq!(health.status().restarts, 3);
    let r = store.read().unwrap();
    assert!(r.lookup("user:before").unwrap().is_some());
    assert!(
        r.lookup("user:after").unwrap().is_some(),
        "the stage went on"
    );
    assert!(r.lookup("user:poisoned").unwrap().is_none());
}

/// The issue's case: `did("Ping", seconds(30))`; a Ping enters, the timer exits, the process
/// dies before a save and is started again, and the redo must evaluate as the first run did (at
/// the times the log holds, waking the timer where the clock record is): the next Ping enters
/// again and its timer exits again, under the next change numbers, and nothing is doubled.
/// Evaluated at the clock's time, the redo saw no entry at all, counted no change, and the later
/// changes reused ids the dedup held: they were dropped. With `forget_dedup` the dedup holds
/// none of them (an outage longer than its window): the redo must still append nothing twice.
fn a_redo_emits_what_the_first_run_did(forget_dedup: bool) {
    let ping = ("pinged", r#"user.did("Ping", seconds(30))"#);
    let mut f = Fixture::new(100, set(&[ping]));
    let ping = json!({"type": "track", "event": "Ping", "userId": "u1"});
    f.step(std::slice::from_ref(&ping)).unwrap();
    f.advance(Duration::from_secs(31));
    f.settle();
    assert_eq!(f.changes().len(), 2, "entered, then exited on the timer");
    f.crash_and_restart(forget_dedup);
    f.settle();
    f.step(&[ping]).unwrap();
    f.advance(Duration::from_secs(31));
    f.settle();
    f.stage.flush().unwrap();
    let profile = f.stored("user:u1").unwrap().id;
    let id = |n: u32, direction: &str| {
        (
            format!("audience-pinged-{profile}-{n}-{direction}"),
            format!(
                "Audience {}",
                if direction == "entered" {
                    "Entered"
                } else {
                    "Exited"
                }
            ),
        )
    };
    assert_eq!(
        f.changes(),
        [
            id(1, "entered"),
            id(2, "exited"),
            id(3, "entered"),
            id(4, "exited")
        ]
    );
    let u1 = f.stored("user:u1").unwrap();
    assert_eq!(u1.memberships.get("pinged").unwrap().changes, 4);
    assert_eq!(f.stage.metrics.redos.get(), 0);
}

#[test]
fn a_redo_after_a_crash_emits_what_the_first_run_did() {
    a_redo_emits_what_the_first_run_did(false);
}

#[test]
fn a_redo_appends_nothing_twice_when_the_dedup_has_forgotten_the_ids() {
    a_redo_emits_what_the_first_run_did(true);
}

/// A device clock ahead of the server's (and no `sentAt` to correct it): the event counts as of
/// its arrival, so it is inside the window now, and `last_seen` is not in the future.
#[test]
fn a_timestamp_in_the_future_counts_as_of_the_arrival() {
    let mut f = Fixture::new(100, set(&[("recent", r#"user.did("Ping", minutes(10))"#)]));
    let ahead = "2026-01-02T00:00:00Z";
    f.step(&[json!({"type": "track", "event": "Ping", "userId": "u1", "timestamp": ahead})])
        .unwrap();
    f.stage.flush().unwrap();
    let u1 = f.stored("user:u1").unwrap();
    let arrived = DateTime::parse_from_rfc3339(T0).unwrap().timestamp_millis();
    assert_eq!(u1.last_seen, arrived);
    assert!(
        u1.memberships.get("recent").unwrap().member,
        "in the window now"
    );
    assert_eq!(
        u1.next_recheck(),
        Some(arrived + 10 * 60_000 + 1),
        "the timer for the window's end"
    );
}

fn order(user: &str, revenue: f64, timestamp: &str) -> Value {
    json!({"type": "track", "event": "Order Completed", "userId": user,
        "timestamp": timestamp, "properties": {"revenue": revenue}})
}

const SEEN: (&str, &str) = ("seen", r#"user.did("Page Viewed")"#);

impl Fixture {
    /// The changes of `segment` in the log, as (messageId, event).
    fn changes_of(&self, segment: &str) -> Vec<(String, String)> {
        let prefix = format!("audience-{segment}-");
        let mut changes = self.changes();
        changes.retain(|(id, _)| id.starts_with(&prefix));
        changes
    }

    fn member(&self, identity: &str, segment: &str) -> bool {
        let profile = self.stored(identity).unwrap();
        profile.memberships.get(segment).is_some_and(|m| m.member)
    }

    /// The revenues of `identity`'s orders in its history, in time order.
    fn order_history(&self, identity: &str) -> Vec<Option<f64>> {
        let p = self.stored(identity).unwrap();
        let (name, revenue) = (p.find("Order Completed"), p.find("revenue"));
        let Some(orders) = name.and_then(|name| p.history.get(name)) else {
            return Vec::new();
        };
        (0..orders.len())
            .map(|i| {
                orders
                    .values(i)
                    .iter()
                    .find(|(k, _)| Some(*k) == revenue)
                    .map(|v| v.1)
            })
            .collect()
    }
}

/// A segment added while the stage is behind: the lake already holds an order the stage has not
/// applied. Read back and then applied, it counted twice (600 became 800, a false entry).
#[test]
fn history_read_back_leaves_out_what_the_stage_has_not_applied_yet() {
    let mut f = Fixture::with_lake(set(&[SEEN]));
    f.step(&[order("u1", 200.0, "2026-01-01T00:00:00Z")])
        .unwrap();
    f.step(&[order("u1", 200.0, "2026-01-01T00:00:01Z")])
        .unwrap();
    // The stage falls behind a burst of other people's page views, then u1's third order; the
    // lake writer is ahead of it and holds them all.
    let pages: Vec<Value> = (0..BATCH)
        .map(|i| page(json!({ "userId": format!("p{i}") })))
        .collect();
    f.append(&pages);
    f.append(&[order("u1", 200.0, "2026-01-01T00:00:02Z")]);
    f.flush_lake();
    let spenders = (
        "spenders",
        r#"user.sum("Order Completed", "revenue", days(30)) >= 700.0"#,
    );
    f.stage.install(set(&[SEEN, spenders])).unwrap();
    f.settle();
    f.stage.flush().unwrap();
    assert_eq!(
        f.order_history("user:u1"),
        [Some(200.0), Some(200.0), Some(200.0)]
    );
    assert!(!f.member("user:u1", "spenders"), "600 is not 700");
    assert_eq!(f.changes_of("spenders"), []);
}

/// Every message of one request shares its arrival; without timestamps they share their moment
/// too. Read back, two orders of one request stay two (matched by moment, they became one).
#[test]
fn history_read_back_keeps_two_orders_of_one_moment() {
    let mut f = Fixture::with_lake(set(&[SEEN]));
    let at = "2026-01-01T00:00:00Z";
    f.step(&[order("u2", 100.0, at), order("u2", 150.0, at)])
        .unwrap();
    f.flush_lake();
    let spenders = (
        "spenders",
        r#"user.sum("Order Completed", "revenue", days(30)) >= 250.0"#,
    );
    f.stage.install(set(&[SEEN, spenders])).unwrap();
    f.settle();
    f.stage.flush().unwrap();
    let mut revenues = f.order_history("user:u2");
    revenues.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(revenues, [Some(100.0), Some(150.0)]);
    assert!(f.member("user:u2", "spenders"));
}

/// A new segment that only counts orders reads their history back: the orders the profile
/// already kept must keep the revenue another rule sums (replaced by copies without it,
/// `big_spenders` left on the next order).
#[test]
fn history_read_back_keeps_the_values_other_rules_sum() {
    let big = (
        "big_spenders",
        r#"user.sum("Order Completed", "revenue", days(30)) >= 500.0"#,
    );
    let mut f = Fixture::with_lake(set(&[big]));
    f.step(&[order("u3", 600.0, "2026-01-01T00:00:00Z")])
        .unwrap();
    f.flush_lake();
    let recent = (
        "recent_buyers",
        r#"user.count("Order Completed", days(7)) >= 1"#,
    );
    f.stage.install(set(&[big, recent])).unwrap();
    f.settle();
    f.advance(Duration::from_secs(1));
    f.step(&[order("u3", 1.0, "2026-01-01T00:00:01Z")]).unwrap();
    f.stage.flush().unwrap();
    assert_eq!(f.order_history("user:u3"), [Some(600.0), Some(1.0)]);
    assert!(f.member("user:u3", "big_spenders"));
    assert!(f.member("user:u3", "recent_buyers"));
    assert_eq!(
        f.changes_of("big_spenders").len(),
        1,
        "entered once, never left"
    );
}

/// The lake cannot be read (a broken file): the backfill waits, counted, and is not marked done;
/// once the lake reads again, it reads the history back and finishes.
#[test]
fn a_failed_read_of_the_lake_is_tried_again_and_the_backfill_waits_for_it() {
    let mut f = Fixture::with_lake(set(&[SEEN]));
    f.step(&[order("u4", 300.0, "2026-01-01T00:00:00Z")])
        .unwrap();
    f.flush_lake();
    let (store, _) = f.lake.as_ref().unwrap();
    let (store, broken) = (
        store.clone(),
        store.path("events/date=2026-01-01/broken.parquet"),
    );
    f.runtime
        .block_on(store.store.put(&broken, b"not parquet".to_vec().into()))
        .unwrap();
    let spenders = (
        "spenders",
        r#"user.sum("Order Completed", "revenue", days(30)) >= 250.0"#,
    );
    let segments = set(&[SEEN, spenders]);
    let fingerprint = segments.segments[1].fingerprint;
    f.stage.install(segments).unwrap();
    f.settle();
    f.stage.flush().unwrap();
    assert_eq!(f.stage.metrics.backfill_read_failures.get(), 1);
    assert!(!f
        .stored("user:u4")
        .unwrap()
        .memberships
        .contains_key("spenders"));
    let stats = f.store.read().unwrap().segment_stats("spenders").unwrap();
    assert_ne!(stats.backfilled, Some(fingerprint), "not done");
    f.runtime.block_on(store.store.delete(&broken)).unwrap();
    f.stage.backfill.as_mut().unwrap().retry_at = None;
    f.settle();
    f.stage.flush().unwrap();
    assert!(f.member("user:u4", "spenders"));
    let stats = f.store.read().unwrap().segment_stats("spenders").unwrap();
    assert_eq!(stats.backfilled, Some(fingerprint));
}

/// The process dies after a change was emitted and before a save; the segment is unloaded
/// before the redo runs. The log says `pinged` was entered: the redo's profile takes that, so
/// when the segment is loaded again (edited) its exit is emitted under the next number, and
/// nothing is sent twice or left claiming a membership Sluice has forgotten. (Found by the
/// differential test.)
#[test]
fn a_redo_with_other_segments_loaded_takes_the_changes_the_log_holds() {
    let pinged = |hours: u32| ("pinged", format!(r#"user.did("Ping", hours({hours}))"#));
    let (day, hour) = (pinged(24), pinged(1));
    let mut f = Fixture::new(100, set(&[(day.0, &day.1)]));
    f.step(&[json!({"type": "track", "event": "Ping", "userId": "u1"})])
        .unwrap();
    f.crash_and_restart(false);
    f.stage.install(set(&[SEEN])).unwrap();
    f.settle();
    f.advance(Duration::from_secs(2 * 3600));
    f.stage.install(set(&[SEEN, (hour.0, &hour.1)])).unwrap();
    f.settle();
    f.stage.flush().unwrap();
    let profile = f.stored("user:u1").unwrap();
    assert_eq!(
        f.changes_of("pinged"),
        [
            (
                format!("audience-pinged-{}-1-entered", profile.id),
                "Audience Entered".into()
            ),
            (
                format!("audience-pinged-{}-2-exited", profile.id),
                "Audience Exited".into()
            ),
        ]
    );
    let m = profile.memberships.get("pinged").unwrap();
    assert_eq!((m.member, m.changes), (false, 2));
}

/// The read-back is bounded by the profile cache: with room for 4 profiles and 40 people's
/// orders in the lake, it saves what it has filled as it goes (so the cache lets those go) and
/// every one of them is filled.
#[test]
fn history_read_back_saves_as_it_goes_to_stay_in_the_cache() {
    let mut f = Fixture::with_lake_and_cache(4, set(&[SEEN]));
    let orders: Vec<Value> = (0..40)
        .map(|i| order(&format!("u{i}"), 60.0, "2026-01-01T00:00:00Z"))
        .collect();
    f.step(&orders).unwrap();
    f.stage.flush().unwrap();
    f.flush_lake();
    let spenders = (
        "spenders",
        r#"user.sum("Order Completed", "revenue", days(30)) >= 50.0"#,
    );
    f.stage.install(set(&[SEEN, spenders])).unwrap();
    let saves = f.stage.saves.handed;
    // The clock record, then the read-back alone.
    while f.stage.backfill.as_ref().is_some_and(|b| b.fill.is_some()) {
        assert!(f.stage.step().unwrap());
    }
    assert!(
        f.stage.saves.handed - saves >= 40 / 4,
        "{} saves during the read-back",
        f.stage.saves.handed - saves
    );
    f.settle();
    f.stage.flush().unwrap();
    for i in 0..40 {
        assert!(f.member(&format!("user:u{i}"), "spenders"), "u{i}");
    }
}
