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

/// A dedup with its runs in a folder of its own.
fn dedup(window_secs: u64, max_ids: usize) -> (Dedup, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let d = Dedup::new(
        &config(window_secs, max_ids),
        dir.path().join("dedup"),
        Default::default(),
    );
    (d, dir)
}

/// Keys like real ones: spread over the whole 128 bits.
fn k(n: u64) -> u128 {
    key("web", &n.to_string())
}

/// Reserves when nothing is in flight (the reservation does not wait).
fn reserve<'d>(d: &'d Dedup, keys: &[Option<u128>], log_end: u64) -> (Reservation<'d>, Vec<bool>) {
    d.reserve(keys, || log_end)
        .now_or_never()
        .expect("nothing in flight to wait for")
}

fn accept(d: &Dedup, keys: &[u64], at: DateTime<Utc>) -> Vec<bool> {
    let keys: Vec<Option<u128>> = keys.iter().map(|n| Some(k(*n))).collect();
    let (r, dups) = reserve(d, &keys, 0);
    r.commit(at);
    dups
}

fn files(d: &Dedup) -> usize {
    std::fs::read_dir(&d.dir).map_or(0, |e| e.count())
}

#[test]
fn keys_differ_by_source_and_id() {
    assert_ne!(key("web", "m1"), key("ios", "m1"));
    assert_ne!(key("web", "m1"), key("web", "m2"));
    assert_ne!(key("ab", "c"), key("a", "bc"));
    assert_eq!(key("web", "m1"), key("web", "m1"));
}

#[test]
fn a_second_copy_within_the_window_is_a_duplicate_in_memory_and_on_disk() {
    let (d, _dir) = dedup(3600, 1_000_000);
    assert_eq!(accept(&d, &[1, 2], t(0)), vec![false, false]);
    assert_eq!(accept(&d, &[2, 3], t(10)), vec![true, false]);
    // Twice in one batch: the second copy is the duplicate.
    assert_eq!(accept(&d, &[4, 4], t(20)), vec![false, true]);
    // Generated ids are never duplicates.
    let (_r, dups) = reserve(&d, &[None, None], 0);
    assert_eq!(dups, vec![false, false]);
    drop(_r);
    // Written to a run: found through the filter and a read of the run.
    d.checkpoint(0, t(30)).unwrap();
    assert_eq!(files(&d), 1);
    assert!(d.inner.lock().unwrap().recent.ids.is_empty());
    assert_eq!(
        accept(&d, &[1, 3, 4, 5], t(40)),
        vec![true, true, true, false]
    );
}

#[test]
fn ids_are_forgotten_after_the_window_and_their_runs_deleted() {
    let (d, _dir) = dedup(3600, 1_000_000);
    accept(&d, &[1], t(0));
    d.checkpoint(0, t(0)).unwrap();
    accept(&d, &[2], t(1_800));
    d.checkpoint(0, t(1_800)).unwrap();
    assert_eq!(files(&d), 2);
    d.checkpoint(0, t(3_601)).unwrap();
    assert_eq!(files(&d), 1, "the first run is past the window");
    assert_eq!(d.len(), 1);
    assert_eq!(accept(&d, &[1, 2], t(3_602)), vec![false, true]);
}

#[test]
fn a_failed_append_forgets_its_ids() {
    let (d, _dir) = dedup(3600, 1000);
    let (r, dups) = reserve(&d, &[Some(k(7))], 0);
    assert_eq!(dups, vec![false]);
    drop(r); // the append failed
    assert_eq!(accept(&d, &[7], t(1)), vec![false], "the retry is accepted");
}

/// A copy that arrives while its original is being written must not be acknowledged before the
/// original is durable: if that write then failed, the 200 would have lost the message.
#[tokio::test]
async fn a_copy_of_an_id_in_flight_waits_for_the_original() {
    let (d, _dir) = dedup(3600, 1000);
    let d = Arc::new(d);
    for original_succeeds in [false, true] {
        let id = k(u64::from(original_succeeds) + 100);
        let other = k(u64::from(original_succeeds) + 1000);
        let (original, dups) = reserve(&d, &[Some(id)], 0);
        assert_eq!(dups, vec![false]);
        let copy = {
            let d = d.clone();
            tokio::spawn(async move {
                // Another id of the same request must not be held while it waits.
                let (r, dups) = d.reserve(&[Some(other), Some(id)], || 0).await;
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
            reserve(&d, &[Some(other)], 0).1,
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
        let (_r, dups) = reserve(&d, &[Some(id)], 0);
        assert_eq!(dups, vec![true], "stored exactly once");
    }
}

#[test]
fn past_max_ids_the_oldest_runs_go_early_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(DedupMetrics::default());
    let d = Dedup::new(
        &config(86_400, 1_000),
        dir.path().join("dedup"),
        metrics.clone(),
    );
    for round in 0..10u64 {
        let ids: Vec<u64> = (round * 300..(round + 1) * 300).collect();
        accept(&d, &ids, t(round as i64));
        d.checkpoint(0, t(round as i64)).unwrap();
    }
    assert!(d.len() <= 1_300, "{}", d.len());
    assert!(metrics.evicted.get() >= 1_700, "{}", metrics.evicted.get());
    assert_eq!(
        accept(&d, &[2_999], t(20)),
        vec![true],
        "recent ids are kept"
    );
}

#[test]
fn checkpoint_offset_waits_for_reservations_in_flight() {
    let (d, _dir) = dedup(3600, 1000);
    let (r, _) = reserve(&d, &[Some(k(1))], 40);
    assert_eq!(d.checkpoint(50, t(0)).unwrap(), 40);
    r.commit(t(0));
    assert_eq!(d.checkpoint(55, t(0)).unwrap(), 55);
}

/// Runs of one twenty-fourth of the window are merged: few files to read on a confirmation, and
/// every id still found.
#[test]
fn small_runs_are_merged_and_every_id_stays_found() {
    let (d, _dir) = dedup(24 * 3600, 1_000_000);
    for round in 0..20u64 {
        let ids: Vec<u64> = (round * 50..(round + 1) * 50).collect();
        accept(&d, &ids, t(round as i64 * 10));
        d.checkpoint(0, t(round as i64 * 10)).unwrap();
    }
    assert!(files(&d) < 8, "{} run files", files(&d));
    let all: Vec<u64> = (0..1_000).collect();
    assert!(accept(&d, &all, t(300)).iter().all(|dup| *dup));
    assert_eq!(d.len(), 1_000);
}

/// The filter grows (shard by shard, rebuilt from the runs) as the ids do, and finds them all.
#[test]
fn the_filter_grows_with_the_ids_it_holds() {
    let (d, _dir) = dedup(24 * 3600, 10_000_000);
    let before = d.inner.lock().unwrap().filter.bytes();
    for round in 0..3u64 {
        let ids: Vec<u64> = (round * 600_000..(round + 1) * 600_000).collect();
        accept(&d, &ids, t(round as i64));
        d.checkpoint(0, t(round as i64)).unwrap();
    }
    let after = d.inner.lock().unwrap().filter.bytes();
    assert!(after > before, "{before} -> {after}");
    let bytes_per_id = after as f64 / 1_800_000.0;
    assert!(bytes_per_id < 2.1, "{bytes_per_id} bytes an id");
    let sample: Vec<u64> = (0..1_800_000).step_by(997).collect();
    assert!(accept(&d, &sample, t(10)).iter().all(|dup| *dup));
}

fn entry(source: &str, id: &str, status: Status) -> Vec<u8> {
    let mut b = Vec::new();
    Entry::encode(&mut b, status, Utc::now(), source, id, "", |b| {
        b.extend_from_slice(b"{}")
    });
    b
}

#[tokio::test]
async fn recovers_from_runs_plus_log_after_a_restart() {
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
        batch.push(&entry("web", "before-checkpoint", Status::Accepted));
        log.append(batch).await.unwrap();
        dedup.replay(
            key("web", "before-checkpoint"),
            Utc::now().timestamp_micros(),
        );
        checkpoint(&dedup, &log, &mut consumer).unwrap();
        assert_eq!(consumer.committed(), 1);
        // After the checkpoint: only in the log.
        let mut batch = RecordBatch::default();
        batch.push(&entry("web", "after-checkpoint", Status::Accepted));
        batch.push(&entry("web", "rejected-one", Status::Rejected));
        log.append(batch).await.unwrap();
    }
    let log = IntakeLog::open(options, Arc::new(LogMetrics::default())).unwrap();
    let (dedup, _) = recover(&cfg, &log, Default::default()).unwrap();
    let keys = [
        Some(key("web", "before-checkpoint")),
        Some(key("web", "after-checkpoint")),
        Some(key("web", "rejected-one")),
        Some(key("ios", "after-checkpoint")),
    ];
    let (_r, dups) = reserve(&dedup, &keys, log.end());
    assert_eq!(dups, vec![true, true, false, false]);
}

mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        // Each checkpoint fsyncs a run file: fewer cases than the default keep this test short.
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A copy within the window is always caught, and an id never accepted is never called a
        /// duplicate, with checkpoints (runs, merges, expiry) between any two steps. (Ids older
        /// than the window may be remembered a little longer, up to one run's span.)
        #[test]
        fn catches_every_copy_within_the_window(
            events in proptest::collection::vec((0u64..50, 0i64..600, any::<bool>()), 1..300)
        ) {
            let (d, _dir) = dedup(1000, 1_000_000);
            let mut accepted_at: HashMap<u64, i64> = HashMap::new();
            let mut now = 0i64;
            for (id, step, checkpoint) in events {
                now += step;
                if checkpoint {
                    d.checkpoint(0, t(now)).unwrap();
                }
                let dup = accept(&d, &[id], t(now))[0];
                match accepted_at.get(&id) {
                    None => prop_assert!(!dup, "never seen, yet a duplicate"),
                    Some(&first) if now - first <= 1000 => prop_assert!(dup, "seen {}s ago", now - first),
                    Some(_) => {}
                }
                if !dup {
                    accepted_at.insert(id, now);
                }
            }
        }
    }
}
