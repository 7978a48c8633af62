use super::*;
use crate::intake_log::{LogOptions, RecordBatch};
use crate::metrics::LogMetrics;
use futures_util::FutureExt;

fn config(window_secs: u64, max_ids: usize) -> DedupConfig {
    DedupConfig {
        window: Duration::from_secs(window_secs),
        max_ids,
    }
}

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
}

/// Reserves when nothing is in flight (the reservation does not wait).
fn reserve<'d>(
    d: &'d Dedup,
    keys: &[Option<u64>],
    at: DateTime<Utc>,
    log_end: u64,
) -> (Reservation<'d>, Vec<bool>) {
    d.reserve(keys, at, || log_end)
        .now_or_never()
        .expect("nothing in flight to wait for")
}

fn accept(d: &Dedup, keys: &[u64], at: DateTime<Utc>) -> Vec<bool> {
    let keys: Vec<Option<u64>> = keys.iter().map(|k| Some(*k)).collect();
    let (r, dups) = reserve(d, &keys, at, 0);
    r.commit(at);
    dups
}

#[test]
fn keys_differ_by_source_and_id() {
    assert_ne!(key("web", "m1"), key("ios", "m1"));
    assert_ne!(key("web", "m1"), key("web", "m2"));
    assert_ne!(key("ab", "c"), key("a", "bc"));
    assert_eq!(key("web", "m1"), key("web", "m1"));
}

#[test]
fn a_second_copy_within_the_window_is_a_duplicate() {
    let d = Dedup::new(&config(3600, 1000), Default::default());
    assert_eq!(accept(&d, &[1, 2], t(0)), vec![false, false]);
    assert_eq!(accept(&d, &[2, 3], t(10)), vec![true, false]);
    // Twice in one batch: the second copy is the duplicate.
    assert_eq!(accept(&d, &[4, 4], t(20)), vec![false, true]);
    // Generated ids are never duplicates.
    let (_r, dups) = reserve(&d, &[None, None], t(30), 0);
    assert_eq!(dups, vec![false, false]);
}

#[test]
fn ids_are_forgotten_after_the_window() {
    let d = Dedup::new(&config(3600, 1000), Default::default());
    accept(&d, &[1], t(0));
    // Time passes, in steps, so that generations are sealed and expire.
    for step in 1..=20 {
        accept(&d, &[1000 + step as u64], t(step * 600));
    }
    assert_eq!(
        accept(&d, &[1], t(12_001)),
        vec![false],
        "an hour later it is new again"
    );
}

#[test]
fn a_failed_append_forgets_its_ids() {
    let d = Dedup::new(&config(3600, 1000), Default::default());
    let (r, dups) = reserve(&d, &[Some(7)], t(0), 0);
    assert_eq!(dups, vec![false]);
    drop(r); // the append failed
    assert_eq!(accept(&d, &[7], t(1)), vec![false], "the retry is accepted");
}

/// A copy that arrives while its original is being written must not be acknowledged before the
/// original is durable: if that write then failed, the 200 would have lost the message.
#[tokio::test]
async fn a_copy_of_an_id_in_flight_waits_for_the_original() {
    let d = Arc::new(Dedup::new(&config(3600, 1000), Default::default()));
    for original_succeeds in [false, true] {
        let id = u64::from(original_succeeds) + 100;
        let (original, dups) = reserve(&d, &[Some(id)], t(0), 0);
        assert_eq!(dups, vec![false]);
        let copy = {
            let d = d.clone();
            tokio::spawn(async move {
                // Another id of the same request must not be held while it waits.
                let (r, dups) = d.reserve(&[Some(id + 1000), Some(id)], t(1), || 0).await;
                if !dups[1] {
                    r.commit(t(1));
                }
                dups
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !copy.is_finished(),
            "answered before the original's outcome"
        );
        assert_eq!(
            reserve(&d, &[Some(id + 1000)], t(0), 0).1,
            vec![false],
            "the waiting request holds none of its ids"
        );
        if original_succeeds {
            original.commit(t(0));
        } else {
            drop(original);
        }
        let dups = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("the copy goes on once the original is settled")
            .unwrap();
        assert_eq!(
            dups[1], original_succeeds,
            "a duplicate only of an original that became durable"
        );
        assert_eq!(accept(&d, &[id], t(2)), vec![true], "stored exactly once");
    }
}

#[test]
fn memory_is_bounded_by_max_ids() {
    let metrics = Arc::new(DedupMetrics::default());
    let d = Dedup::new(&config(86_400, 800), metrics.clone());
    for i in 0..10_000u64 {
        accept(&d, &[i], t(0));
        assert!(d.len() <= 800);
    }
    assert!(metrics.evicted.get() >= 9_000);
    assert_eq!(
        accept(&d, &[9_999], t(1)),
        vec![true],
        "recent ids are kept"
    );
}

#[test]
fn snapshot_offset_waits_for_reservations_in_flight() {
    let d = Dedup::new(&config(3600, 1000), Default::default());
    let (r, _) = reserve(&d, &[Some(1)], t(0), 40);
    let snap = d.snapshot(50);
    assert!(snap.is_none(), "nothing remembered yet");
    assert_eq!(d.inner.lock().unwrap().safe_offset(50), 40);
    r.commit(t(0));
    let snap = d.snapshot(55).unwrap();
    assert_eq!(snap.offset, 55);
}

#[test]
fn snapshots_round_trip_and_corruption_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dedup.snapshot");
    let d = Dedup::new(&config(3600, 1000), Default::default());
    accept(&d, &[1, 2, 3], t(0));
    d.snapshot(3).unwrap().write(&path).unwrap();
    let restored = Dedup::new(&config(3600, 1000), Default::default());
    assert!(restored.load(&path).unwrap());
    assert_eq!(accept(&restored, &[3, 4], t(5)), vec![true, false]);

    let mut bytes = fs::read(&path).unwrap();
    bytes[20] ^= 1;
    fs::write(&path, &bytes).unwrap();
    assert!(Dedup::new(&config(3600, 1000), Default::default())
        .load(&path)
        .is_err());
    assert!(!Dedup::new(&config(3600, 1000), Default::default())
        .load(&dir.path().join("missing"))
        .unwrap());
}

fn entry(source: &str, id: &str, status: Status) -> Vec<u8> {
    let mut b = Vec::new();
    Entry::encode(&mut b, status, Utc::now(), source, id, "", |b| {
        b.extend_from_slice(b"{}")
    });
    b
}

#[tokio::test]
async fn recovers_from_snapshot_plus_log_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        dir: dir.path().to_path_buf(),
        segment_size: 1 << 20,
        max_size: 1 << 30,
    };
    let cfg = config(3600, 100_000);
    {
        let log = IntakeLog::open(options.clone(), Arc::new(LogMetrics::default())).unwrap();
        let (dedup, mut consumer) = recover(&cfg, &log, Default::default()).unwrap();
        let mut batch = RecordBatch::default();
        batch.push(&entry("web", "before-snapshot", Status::Accepted));
        log.append(batch).await.unwrap();
        dedup.replay(key("web", "before-snapshot"), Utc::now().timestamp_micros());
        checkpoint(&dedup, &log, &mut consumer).unwrap();
        assert_eq!(consumer.committed(), 1);
        // After the snapshot: only in the log.
        let mut batch = RecordBatch::default();
        batch.push(&entry("web", "after-snapshot", Status::Accepted));
        batch.push(&entry("web", "rejected-one", Status::Rejected));
        log.append(batch).await.unwrap();
    }
    let log = IntakeLog::open(options, Arc::new(LogMetrics::default())).unwrap();
    let (dedup, _) = recover(&cfg, &log, Default::default()).unwrap();
    let now = Utc::now();
    let keys = [
        Some(key("web", "before-snapshot")),
        Some(key("web", "after-snapshot")),
        Some(key("web", "rejected-one")),
        Some(key("ios", "after-snapshot")),
    ];
    let (_r, dups) = reserve(&dedup, &keys, now, log.end());
    assert_eq!(dups, vec![true, true, false, false]);
}

mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Under capacity, a copy within the window is always caught, and an id never accepted is
        /// never called a duplicate. (Ids older than the window may be remembered a little longer,
        /// up to one generation.)
        #[test]
        fn catches_every_copy_within_the_window(
            events in proptest::collection::vec((0u64..50, 0i64..600), 1..300)
        ) {
            let d = Dedup::new(&config(1000, 1_000_000), Default::default());
            let mut accepted_at: HashMap<u64, i64> = HashMap::new();
            let mut now = 0i64;
            for (key, step) in events {
                now += step;
                let dup = accept(&d, &[key], t(now))[0];
                match accepted_at.get(&key) {
                    None => prop_assert!(!dup, "never seen, yet a duplicate"),
                    Some(&first) if now - first <= 1000 => prop_assert!(dup, "seen {}s ago", now - first),
                    Some(_) => {}
                }
                if !dup {
                    accepted_at.insert(key, now);
                }
            }
        }
    }
}
