//! The lake writer against an in-memory store and a real log in a temporary folder.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use datafusion::arrow::array::AsArray;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use futures_util::TryStreamExt;
use object_store::ObjectStoreExt;

use super::writer::{Flush, FlushPolicy, LakeWriter};
use super::LakeStore;
use crate::entry::{Entry, Status};
use crate::intake_log::{IntakeLog, LogOptions, RecordBatch};
use crate::metrics::{LakeMetrics, LogMetrics};
use crate::supervisor::Health;

pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub log: IntakeLog,
    pub store: LakeStore,
}

pub(crate) fn fixture(store: LakeStore) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let log = IntakeLog::open(
        LogOptions {
            dir: dir.path().to_path_buf(),
            segment_size: 1 << 20,
            max_size: 1 << 30,
        },
        Arc::new(LogMetrics::default()),
    )
    .unwrap();
    Fixture { dir, log, store }
}

pub(crate) fn health() -> Arc<Health> {
    Health::new("lake", super::writer::CONSUMER, Arc::default())
}

/// The writer on its thread over `f`'s log and store.
fn start_writer(f: &Fixture, policy: FlushPolicy, health: Arc<Health>) -> super::LakeHandle {
    let metrics = Arc::new(LakeMetrics::default());
    super::LakeHandle::start(
        f.store.clone(),
        &f.log,
        policy,
        Default::default(),
        metrics,
        health,
    )
    .unwrap()
}

/// Stops the writer, which flushes what it has read.
async fn finish_writer(handle: super::LakeHandle) -> super::writer::Stopped {
    tokio::task::spawn_blocking(move || handle.finish())
        .await
        .unwrap()
}

pub(crate) fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

/// An accepted track as the edge writes it.
pub(crate) fn track(id: &str, event: &str, received: &str) -> Vec<u8> {
    let body = format!(
        r#"{{"type":"track","messageId":"{id}","userId":"u-{id}","event":"{event}","timestamp":"{received}","receivedAt":"{received}","properties":{{"plan":"pro","revenue":12.5}}}}"#
    );
    let mut out = Vec::new();
    Entry::encode(
        &mut out,
        Status::Accepted,
        at(received),
        "web",
        id,
        "",
        |b| b.extend_from_slice(body.as_bytes()),
    );
    out
}

pub(crate) fn rejected(id: &str, received: &str) -> Vec<u8> {
    let mut out = Vec::new();
    Entry::encode(
        &mut out,
        Status::Rejected,
        at(received),
        "web",
        id,
        "track needs `event`",
        |b| b.extend_from_slice(format!(r#"{{"type":"track","messageId":"{id}"}}"#).as_bytes()),
    );
    out
}

pub(crate) async fn append(log: &IntakeLog, entries: &[Vec<u8>]) {
    let mut batch = RecordBatch::default();
    for e in entries {
        batch.push(e);
    }
    log.append(batch).await.unwrap();
}

pub(crate) fn writer(f: &Fixture) -> LakeWriter {
    let consumer = f.log.consumer(super::writer::CONSUMER).unwrap();
    let runtime = tokio::runtime::Handle::current();
    LakeWriter::new(
        f.store.clone(),
        consumer,
        f.dir.path(),
        FlushPolicy::default(),
        Arc::new(LakeMetrics::default()),
        runtime,
        Default::default(),
    )
    .unwrap()
}

/// Reads everything the log holds from the lake consumer's cursor into one flush and writes it.
pub(crate) fn flush_all(f: &Fixture, w: &mut LakeWriter) {
    let start = f.log.consumer(super::writer::CONSUMER).unwrap().committed();
    let mut flush = Flush::new(start, Default::default());
    for r in f.log.reader(start).read(usize::MAX).unwrap() {
        flush.add(&r).unwrap();
    }
    w.write(&flush.finish().unwrap()).unwrap();
}

pub(crate) async fn files(store: &LakeStore) -> Vec<String> {
    let mut names: Vec<String> = store
        .store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    names.sort();
    names
}

async fn read_column(store: &LakeStore, path: &str, column: &str) -> Vec<String> {
    let bytes = store
        .store
        .get(&object_store::path::Path::from(path))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let col = batch
            .column_by_name(column)
            .unwrap()
            .as_string::<i32>()
            .clone();
        out.extend(col.iter().map(|v| v.unwrap_or("").to_string()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_writes_one_file_per_table_and_date_named_by_its_range() {
    let f = fixture(LakeStore::in_memory());
    append(
        &f.log,
        &[
            track("a", "Signed Up", "2026-03-01T23:59:59Z"),
            rejected("r", "2026-03-01T23:59:59.5Z"),
            track("b", "Signed Up", "2026-03-02T00:00:00Z"),
        ],
    )
    .await;
    let mut w = writer(&f);
    tokio::task::block_in_place(|| flush_all(&f, &mut w));
    assert_eq!(
        files(&f.store).await,
        vec![
            "events/date=2026-03-01/00000000000000000000-00000000000000000003.parquet",
            "events/date=2026-03-02/00000000000000000000-00000000000000000003.parquet",
            "quarantine/date=2026-03-01/00000000000000000000-00000000000000000003.parquet",
        ]
    );
    let ids = read_column(
        &f.store,
        "events/date=2026-03-01/00000000000000000000-00000000000000000003.parquet",
        "message_id",
    )
    .await;
    assert_eq!(ids, vec!["a"]);
    let reasons = read_column(
        &f.store,
        "quarantine/date=2026-03-01/00000000000000000000-00000000000000000003.parquet",
        "reason",
    )
    .await;
    assert_eq!(reasons, vec!["track needs `event`"]);
    assert_eq!(
        f.log.consumer(super::writer::CONSUMER).unwrap().committed(),
        3,
        "the cursor moved past the flush"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_some_files_is_redone_into_the_same_files() {
    let f = fixture(LakeStore::in_memory());
    append(
        &f.log,
        &[
            track("a", "E", "2026-03-01T10:00:00Z"),
            track("b", "E", "2026-03-02T10:00:00Z"),
        ],
    )
    .await;
    let mut w = writer(&f);
    // The crash: the range was recorded and one of the two files written, nothing committed.
    let mut flush = Flush::new(0, Default::default());
    for r in f.log.reader(0).read(10).unwrap() {
        flush.add(&r).unwrap();
    }
    let encoded = flush.finish().unwrap();
    let pending = f.dir.path().join("lake.pending");
    {
        let mut b = 0u64.to_le_bytes().to_vec();
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
        std::fs::write(&pending, b).unwrap();
    }
    let first = &encoded.files[0];
    f.store
        .store
        .put(&f.store.path(&first.path), first.bytes.clone().into())
        .await
        .unwrap();
    drop(w);

    // More messages arrive before the restart; they must not join the redone flush.
    append(&f.log, &[track("c", "E", "2026-03-01T11:00:00Z")]).await;
    w = writer(&f);
    tokio::task::block_in_place(|| w.recover(&health())).unwrap();
    assert!(!pending.exists());
    assert_eq!(
        files(&f.store).await,
        vec![
            "events/date=2026-03-01/00000000000000000000-00000000000000000002.parquet",
            "events/date=2026-03-02/00000000000000000000-00000000000000000002.parquet",
        ],
        "the same two files, each once"
    );
    tokio::task::block_in_place(|| flush_all(&f, &mut w));
    let all = files(&f.store).await;
    assert_eq!(all.len(), 3);
    assert!(
        all[1].ends_with("00000000000000000002-00000000000000000003.parquet"),
        "{all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_thread_flushes_on_interval_and_on_stop() {
    let f = fixture(LakeStore::in_memory());
    let policy = FlushPolicy {
        interval: std::time::Duration::from_millis(200),
        max_rows: 1000,
        ..FlushPolicy::default()
    };
    let handle = start_writer(&f, policy, health());
    append(&f.log, &[track("a", "E", "2026-03-01T10:00:00Z")]).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while files(&f.store).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no flush after the interval"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    append(&f.log, &[track("b", "E", "2026-03-01T10:00:01Z")]).await;
    let stopped = finish_writer(handle).await;
    assert_eq!(stopped, super::writer::Stopped::Flushed);
    assert_eq!(
        files(&f.store).await.len(),
        2,
        "stopping flushes what was read"
    );
    assert_eq!(
        f.log.consumer(super::writer::CONSUMER).unwrap().committed(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failures_are_retried_until_storage_returns() {
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let store = LakeStore::from_url(&format!("file://{}", lake_dir.display())).unwrap();
    // `events` is a file, so nothing can be written under it: storage is "down".
    std::fs::write(lake_dir.join("events"), b"in the way").unwrap();
    let f = fixture(store);
    let metrics = Arc::new(LakeMetrics::default());
    let policy = FlushPolicy {
        interval: std::time::Duration::from_millis(50),
        max_rows: 1000,
        ..FlushPolicy::default()
    };
    let handle = super::LakeHandle::start(
        f.store.clone(),
        &f.log,
        policy,
        Default::default(),
        metrics.clone(),
        health(),
    )
    .unwrap();
    append(&f.log, &[track("a", "E", "2026-03-01T10:00:00Z")]).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metrics.flush_errors.get() == 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        f.log.consumer(super::writer::CONSUMER).unwrap().committed(),
        0,
        "nothing committed while failing"
    );
    // Storage comes back.
    std::fs::remove_file(lake_dir.join("events")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while f.log.consumer(super::writer::CONSUMER).unwrap().committed() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flush was not retried"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(lake_dir
        .join("events/date=2026-03-01/00000000000000000000-00000000000000000001.parquet")
        .exists());
    let stopped = finish_writer(handle).await;
    assert_eq!(stopped, super::writer::Stopped::Flushed);
}

mod compaction {
    use super::*;
    use crate::lake::compaction::{Compactor, Pass};
    use crate::query::{QueryEngine, QueryLimits};
    use chrono::NaiveDate;

    fn day(d: &str) -> NaiveDate {
        d.parse().unwrap()
    }

    /// Three flushes into one closed partition (2026-03-01) and one into today's (2026-03-02).
    async fn three_small_files() -> (Fixture, LakeWriter) {
        let f = fixture(LakeStore::in_memory());
        let mut w = writer(&f);
        for (i, received) in [
            "2026-03-01T10:00:00Z",
            "2026-03-01T11:00:00Z",
            "2026-03-01T12:00:00Z",
            "2026-03-02T01:00:00Z",
        ]
        .iter()
        .enumerate()
        {
            append(
                &f.log,
                &[
                    track(&format!("m{i}"), "E", received),
                    rejected(&format!("r{i}"), received),
                ],
            )
            .await;
            tokio::task::block_in_place(|| flush_all(&f, &mut w));
        }
        (f, w)
    }

    async fn ids(f: &Fixture) -> Vec<String> {
        let engine = QueryEngine::new(f.store.clone(), Default::default(), QueryLimits::default());
        let r = engine
            .sql("SELECT message_id FROM events ORDER BY message_id")
            .await
            .unwrap();
        let rows = crate::query::to_json_rows(&r).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["message_id"].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_partitions_are_merged_into_one_file_per_run() {
        let (f, _w) = three_small_files().await;
        let before = ids(&f).await;
        let pass = Compactor::new(f.store.clone())
            .run_once(day("2026-03-02"), 8)
            .await
            .unwrap();
        assert_eq!(
            pass,
            Pass {
                files_merged: 6,
                files_written: 2,
                superseded_deleted: 0
            }
        );
        assert_eq!(
            files(&f.store).await,
            vec![
                "events/date=2026-03-01/00000000000000000000-00000000000000000006.parquet",
                "events/date=2026-03-02/00000000000000000006-00000000000000000008.parquet",
                "quarantine/date=2026-03-01/00000000000000000000-00000000000000000006.parquet",
                "quarantine/date=2026-03-02/00000000000000000006-00000000000000000008.parquet",
            ]
        );
        assert_eq!(ids(&f).await, before, "the same rows, once each");
        let again = Compactor::new(f.store.clone())
            .run_once(day("2026-03-02"), 8)
            .await
            .unwrap();
        assert_eq!(again, Pass::default(), "nothing left to do");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_past_the_writers_cursor_and_open_partitions_are_left_alone() {
        let (f, _w) = three_small_files().await;
        // The cursor is at 4: only the first two flushes (offsets 0..4) may be merged.
        let pass = Compactor::new(f.store.clone())
            .run_once(day("2026-03-02"), 4)
            .await
            .unwrap();
        assert_eq!(pass.files_written, 2);
        let names = files(&f.store).await;
        assert!(names.contains(
            &"events/date=2026-03-01/00000000000000000000-00000000000000000004.parquet".to_string()
        ));
        assert!(names.contains(
            &"events/date=2026-03-01/00000000000000000004-00000000000000000006.parquet".to_string()
        ));
        // With today = 2026-03-01 nothing is closed.
        let (g, _w) = three_small_files().await;
        let pass = Compactor::new(g.store.clone())
            .run_once(day("2026-03-01"), 8)
            .await
            .unwrap();
        assert_eq!(pass, Pass::default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_stay_under_the_target_size() {
        let (f, _w) = three_small_files().await;
        let one_file = f
            .store
            .store
            .list(None)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()[0]
            .size;
        let pass = Compactor::new(f.store.clone())
            .with_target_bytes(one_file * 2 + one_file / 2)
            .run_once(day("2026-03-02"), 8)
            .await
            .unwrap();
        // Three files of the closed events partition: a run of two, and one left alone.
        assert!(pass.files_written >= 1);
        assert!(files(&f.store)
            .await
            .iter()
            .any(|n| n.ends_with("00000000000000000004-00000000000000000006.parquet")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_between_merge_and_delete_never_shows_a_row_twice() {
        let (f, _w) = three_small_files().await;
        let before = ids(&f).await;
        // Compact a copy of the lake, then put the merged file beside the original inputs: the
        // state a crash after the merged write and before the deletes leaves.
        let inputs: Vec<_> = f
            .store
            .store
            .list(None)
            .try_collect::<Vec<_>>()
            .await
            .unwrap();
        let copy = LakeStore::in_memory();
        for o in &inputs {
            let bytes = f
                .store
                .store
                .get(&o.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            copy.store.put(&o.location, bytes.into()).await.unwrap();
        }
        Compactor::new(copy.clone())
            .run_once(day("2026-03-02"), 8)
            .await
            .unwrap();
        let merged = object_store::path::Path::from(
            "events/date=2026-03-01/00000000000000000000-00000000000000000006.parquet",
        );
        let bytes = copy
            .store
            .get(&merged)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        f.store.store.put(&merged, bytes.into()).await.unwrap();
        assert_eq!(files(&f.store).await.len(), 9);
        assert_eq!(ids(&f).await, before, "queries hide the superseded inputs");
        let pass = Compactor::new(f.store.clone())
            .run_once(day("2026-03-02"), 8)
            .await
            .unwrap();
        assert_eq!(pass.superseded_deleted, 3);
        assert_eq!(ids(&f).await, before);
    }

    fn parquet_with_columns(columns: &[&str]) -> bytes::Bytes {
        use datafusion::arrow::array::{ArrayRef, StringArray};
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(*c, DataType::Utf8, true))
                .collect::<Vec<_>>(),
        ));
        let arrays: Vec<ArrayRef> = columns
            .iter()
            .map(|c| Arc::new(StringArray::from(vec![*c])) as ArrayRef)
            .collect();
        let batch =
            datafusion::arrow::record_batch::RecordBatch::try_new(schema.clone(), arrays).unwrap();
        let mut w =
            datafusion::parquet::arrow::ArrowWriter::try_new(Vec::new(), schema, None).unwrap();
        w.write(&batch).unwrap();
        bytes::Bytes::from(w.into_inner().unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn typed_tables_are_compacted_only_among_files_of_one_schema() {
        let store = LakeStore::in_memory();
        let folder = "tracks/order_completed/date=2026-03-01";
        for (start, columns) in [
            (0u64, &["a"][..]),
            (1, &["a"]),
            (2, &["a", "b"]),
            (3, &["a", "b"]),
        ] {
            let path = store.path(&format!("{folder}/{start:020}-{:020}.parquet", start + 1));
            store
                .store
                .put(&path, parquet_with_columns(columns).into())
                .await
                .unwrap();
        }
        let pass = Compactor::new(store.clone())
            .run_once(day("2026-03-02"), 10)
            .await
            .unwrap();
        assert_eq!(pass.files_written, 2);
        assert_eq!(
            files(&store).await,
            vec![
                format!("{folder}/00000000000000000000-00000000000000000002.parquet"),
                format!("{folder}/00000000000000000002-00000000000000000004.parquet"),
            ]
        );
    }
}

/// Rows can be large (a message with the batch's context merged in): a flush is cut by bytes
/// too, so one flush never holds more than memory (or an Arrow column) can take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_is_cut_by_bytes_as_well_as_rows() {
    let f = fixture(LakeStore::in_memory());
    let big = |id: &str| {
        let body = format!(
            r#"{{"type":"track","messageId":"{id}","userId":"u","event":"E","timestamp":"2026-03-01T10:00:00Z","receivedAt":"2026-03-01T10:00:00Z","properties":{{"pad":"{}"}}}}"#,
            "x".repeat(60_000)
        );
        let mut out = Vec::new();
        Entry::encode(
            &mut out,
            Status::Accepted,
            at("2026-03-01T10:00:00Z"),
            "web",
            id,
            "",
            |b| b.extend_from_slice(body.as_bytes()),
        );
        out
    };
    let entries: Vec<Vec<u8>> = (0..40).map(|i| big(&format!("m{i}"))).collect();
    append(&f.log, &entries).await;
    let policy = FlushPolicy {
        interval: std::time::Duration::from_secs(3600),
        max_rows: 1_000_000,
        max_bytes: 1 << 20,
    };

    let mut flush = Flush::new(0, Default::default());
    for r in f.log.reader(0).read(18).unwrap() {
        assert!(!flush.is_due(&policy), "due before 1 MiB");
        flush.add(&r).unwrap();
    }
    assert!(flush.is_due(&policy), "due at 18 × 60 KB");

    let handle = start_writer(&f, policy, health());
    let stopped = finish_writer(handle).await;
    assert_eq!(stopped, super::writer::Stopped::Flushed);
    let written = files(&f.store).await;
    assert_eq!(
        written.len(),
        3,
        "40 rows of 60 KB in flushes of 1 MiB: {written:?}"
    );
    let mut ids = Vec::new();
    for file in &written {
        ids.extend(read_column(&f.store, file, "message_id").await);
    }
    ids.sort();
    let mut expected: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    expected.sort();
    assert_eq!(ids, expected, "every row once");
}

/// A record the writer fails on does not stop it: it is started again from its cursor, and after
/// three failures on that record the record goes to the quarantine with the reason; every other
/// record is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_writer_keeps_failing_on_is_set_aside_and_the_writer_goes_on() {
    let f = fixture(LakeStore::in_memory());
    append(
        &f.log,
        &[
            track("before", "E", "2026-03-01T10:00:00Z"),
            track(
                crate::supervisor::POISON_FOR_TESTS,
                "E",
                "2026-03-01T10:00:01Z",
            ),
            track("after", "E", "2026-03-01T10:00:02Z"),
        ],
    )
    .await;
    let health = health();
    let policy = FlushPolicy {
        interval: std::time::Duration::from_millis(50),
        ..FlushPolicy::default()
    };
    let handle = start_writer(&f, policy, health.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while f.log.consumer(super::writer::CONSUMER).unwrap().committed() < 3 {
        assert!(std::time::Instant::now() < deadline, "the writer is stuck");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    append(&f.log, &[track("later", "E", "2026-03-01T10:00:03Z")]).await;
    let stopped = finish_writer(handle).await;
    assert_eq!(stopped, super::writer::Stopped::Flushed);
    assert_eq!(health.status().restarts, 3);

    let mut events = Vec::new();
    let mut quarantined = Vec::new();
    for file in files(&f.store).await {
        if file.starts_with("events/") {
            events.extend(read_column(&f.store, &file, "message_id").await);
        } else if file.starts_with("quarantine/") {
            quarantined.extend(read_column(&f.store, &file, "message_id").await);
            let reasons = read_column(&f.store, &file, "reason").await;
            assert!(reasons[0].contains("failed on it 3 times"), "{reasons:?}");
            assert!(reasons[0].contains("poison record"), "{reasons:?}");
        }
    }
    events.sort();
    assert_eq!(events, vec!["after", "before", "later"]);
    assert_eq!(quarantined, vec![crate::supervisor::POISON_FOR_TESTS]);
}
