use super::*;

fn options(dir: &Path) -> LogOptions {
    LogOptions {
        dir: dir.to_path_buf(),
        segment_size: 4096,
        max_size: 1 << 30,
    }
}

fn open(dir: &Path) -> (IntakeLog, Arc<LogMetrics>) {
    let metrics = Arc::new(LogMetrics::default());
    (
        IntakeLog::open(options(dir), metrics.clone()).unwrap(),
        metrics,
    )
}

fn batch(payloads: &[String]) -> RecordBatch {
    let mut b = RecordBatch::default();
    for p in payloads {
        b.push(p.as_bytes());
    }
    b
}

fn texts(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.payload.clone()).unwrap())
        .collect()
}

fn payloads(range: Range<u32>) -> Vec<String> {
    range
        .map(|i| format!("message number {i:05} {}", "padding ".repeat(10)))
        .collect()
}

#[tokio::test]
async fn appends_get_consecutive_offsets_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path());
    assert_eq!(log.append(batch(&payloads(0..3))).await.unwrap(), 0..3);
    assert_eq!(log.append(batch(&payloads(3..5))).await.unwrap(), 3..5);
    assert_eq!(log.end(), 5);
    let mut reader = log.reader(1);
    let records = reader.read(10).unwrap();
    assert_eq!(
        records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(texts(&records), payloads(1..5));
    assert!(reader.read(10).unwrap().is_empty());
}

#[tokio::test]
async fn an_empty_batch_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path());
    assert_eq!(log.append(RecordBatch::default()).await.unwrap(), 0..0);
    assert_eq!(log.end(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (log, metrics) = open(dir.path());
    let log = Arc::new(log);
    let mut tasks = Vec::new();
    for t in 0..64u32 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut ranges = Vec::new();
            for i in 0..20u32 {
                let p = vec![format!("task {t} item {i}")];
                ranges.push(log.append(batch(&p)).await.unwrap());
            }
            ranges
        }));
    }
    let mut offsets = Vec::new();
    for t in tasks {
        for r in t.await.unwrap() {
            offsets.extend(r);
        }
    }
    offsets.sort();
    assert_eq!(
        offsets,
        (0..1280).collect::<Vec<u64>>(),
        "every offset given exactly once"
    );
    let fsyncs = metrics.fsyncs.get();
    assert!(
        fsyncs < 1280,
        "64 concurrent writers should share fsyncs, got {fsyncs} for 1280 appends"
    );
    let all = log.reader(0).read(2000).unwrap();
    assert_eq!(all.len(), 1280);
}

#[tokio::test]
async fn reads_across_segments_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = open(dir.path());
        for chunk in 0..20 {
            log.append(batch(&payloads(chunk * 10..chunk * 10 + 10)))
                .await
                .unwrap();
        }
        assert!(log.stats().segments > 3, "4 KiB segments should roll");
    }
    let (log, _) = open(dir.path());
    assert_eq!(log.end(), 200);
    let records = log.reader(0).read(1000).unwrap();
    assert_eq!(texts(&records), payloads(0..200));
    assert_eq!(
        log.append(batch(&payloads(200..201))).await.unwrap(),
        200..201
    );
    let records = log.reader(150).read(1000).unwrap();
    assert_eq!(texts(&records), payloads(150..201));
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_every_complete_record_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = open(dir.path());
        log.append(batch(&payloads(0..5))).await.unwrap();
    }
    // Tear the last record in half, as a crash in the middle of a write would.
    let seg = segment::list(dir.path()).unwrap().pop().unwrap();
    let len = fs::metadata(&seg.path).unwrap().len();
    let file = fs::OpenOptions::new().write(true).open(&seg.path).unwrap();
    file.set_len(len - 10).unwrap();
    drop(file);
    let (log, _) = open(dir.path());
    assert_eq!(log.end(), 4);
    assert_eq!(texts(&log.reader(0).read(10).unwrap()), payloads(0..4));
    // New appends continue cleanly after the cut.
    assert_eq!(log.append(batch(&payloads(10..11))).await.unwrap(), 4..5);
    drop(log);
    let (log, _) = open(dir.path());
    assert_eq!(log.end(), 5);
}

#[tokio::test]
async fn full_log_refuses_appends_without_harming_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(LogMetrics::default());
    let log = IntakeLog::open(
        LogOptions {
            dir: dir.path().to_path_buf(),
            segment_size: 4096,
            max_size: 8192,
        },
        metrics,
    )
    .unwrap();
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..100 {
        match log.append(batch(&payloads(i..i + 5))).await {
            Ok(_) => accepted += 5,
            Err(AppendError::Full { .. }) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(refused > 0 && accepted > 0);
    assert!(log.stats().bytes <= 8192);
    assert_eq!(log.reader(0).read(10_000).unwrap().len(), accepted as usize);
}

/// Sluice's own records (segment changes, clock records) go on past `max_size`, into a reserve
/// of a sixteenth more, and no further.
#[tokio::test]
async fn own_records_may_use_the_reserve_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        dir: dir.path().to_path_buf(),
        segment_size: 64 * 1024,
        max_size: 16 * 1024,
    };
    let log = IntakeLog::open(options.clone(), Arc::new(LogMetrics::default())).unwrap();
    let one = || batch(&payloads(0..1));
    let mut clients = 0;
    while log.append(one()).await.is_ok() {
        clients += 1;
    }
    let full = log.stats().bytes;
    assert!(full <= options.max_size, "{full}");
    let mut own = 0;
    loop {
        match log.append_in(Room::Reserve, one()).await {
            Ok(_) => own += 1,
            Err(AppendError::Full { max, .. }) => {
                assert_eq!(max, options.max_size + options.reserve());
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(own > 0, "the full log still took Sluice's own records");
    let held = log.stats().bytes;
    assert!(held > options.max_size && held <= options.max_size + options.reserve());
    assert!(
        log.append(one()).await.is_err(),
        "and clients are still refused"
    );
    assert_eq!(log.reader(0).read(10_000).unwrap().len(), clients + own);
}

#[tokio::test]
async fn consumers_resume_at_their_cursor_and_release_segments() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = open(dir.path());
        let mut slow = log.consumer("slow").unwrap();
        let mut fast = log.consumer("fast").unwrap();
        for chunk in 0..20 {
            log.append(batch(&payloads(chunk * 10..chunk * 10 + 10)))
                .await
                .unwrap();
        }
        let segments_before = log.stats().segments;
        let read = fast.read(1000).unwrap();
        assert_eq!(read.len(), 200);
        fast.commit(200).unwrap();
        assert_eq!(
            log.stats().segments,
            segments_before,
            "the slow consumer holds every segment"
        );
        assert_eq!(slow.read(50).unwrap().len(), 50);
        slow.commit(50).unwrap();
        let after = log.stats();
        assert!(
            after.segments < segments_before,
            "segments before offset 50 are deleted"
        );
        assert!(after.start <= 50);
        assert!(matches!(log.reader(0).read(1), Err(ReadError::Gone { .. })));
        assert!(slow.commit(10_000).is_err(), "cannot commit past the end");
    }
    let (log, _) = open(dir.path());
    let mut slow = log.consumer("slow").unwrap();
    assert_eq!(slow.committed(), 50);
    let rest = slow.read(1000).unwrap();
    assert_eq!(rest.first().map(|r| r.offset), Some(50));
    assert_eq!(texts(&rest), payloads(50..200));
    let fast = log.consumer("fast").unwrap();
    assert_eq!(fast.committed(), 200);
}

#[tokio::test]
async fn a_new_consumer_starts_at_the_oldest_record_and_waits_for_more() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path());
    log.append(batch(&payloads(0..2))).await.unwrap();
    let mut c = log.consumer("late").unwrap();
    assert_eq!(c.read(10).unwrap().len(), 2);
    let log = Arc::new(log);
    let writer = log.clone();
    let waiter = tokio::spawn(async move {
        c.wait().await;
        c.read(10).unwrap()
    });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    writer.append(batch(&payloads(2..3))).await.unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(texts(&got), payloads(2..3));
}

#[tokio::test]
async fn read_only_open_reads_what_a_writer_has_written() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path());
    for chunk in 0..5 {
        log.append(batch(&payloads(chunk * 10..chunk * 10 + 10)))
            .await
            .unwrap();
    }
    let (factory, start) = open_read_only(dir.path()).unwrap();
    assert_eq!(start, 0);
    let records = factory.reader(0).read(usize::MAX).unwrap();
    assert_eq!(texts(&records), payloads(0..50));
    assert!(open_read_only(&dir.path().join("nothing")).is_err());
}

#[tokio::test]
async fn a_read_only_reader_goes_past_a_segment_the_live_log_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path());
    log.append(batch(&payloads(0..100))).await.unwrap();
    log.append(batch(&payloads(100..110))).await.unwrap();
    let (factory, start) = open_read_only(dir.path()).unwrap();
    let segments = segment::list(dir.path()).unwrap();
    assert!(segments.len() >= 2, "the first group fills a segment");
    // Trimmed between listing the log and reading it, as a live server does.
    std::fs::remove_file(&segments[0].path).unwrap();
    let records = factory.reader(start).read(usize::MAX).unwrap();
    let second = segments[1].base as u32;
    assert!(second > 0);
    assert_eq!(texts(&records), payloads(second..110));
}

#[test]
fn consumer_names_are_checked() {
    assert!(cursor::dir(Path::new("/x")).ends_with("cursors"));
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path());
    assert!(log.consumer("../escape").is_err());
    assert!(log.consumer("").is_err());
    assert!(log.consumer("lake").is_ok());
}

#[tokio::test]
async fn closed_log_refuses_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path());
    log.close();
    assert!(matches!(
        log.append(batch(&payloads(0..1))).await,
        Err(AppendError::Closed)
    ));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        /// Append this many records.
        Append(u8),
        /// Close and reopen the log.
        Restart,
        /// A crash in the middle of a write: junk after the last record, then a restart.
        TornWrite(Vec<u8>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (1u8..20).prop_map(Step::Append),
            1 => Just(Step::Restart),
            1 => proptest::collection::vec(any::<u8>(), 1..40).prop_map(Step::TornWrite),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Whatever happens between appends, the log holds exactly the acknowledged records, in
        /// order, with consecutive offsets: none lost, none doubled.
        #[test]
        fn holds_exactly_what_was_acknowledged(steps in proptest::collection::vec(step(), 1..25)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let mut acknowledged: Vec<String> = Vec::new();
            let mut log = Some(open(dir.path()).0);
            for s in steps {
                match s {
                    Step::Append(n) => {
                        let from = acknowledged.len() as u32;
                        let items = payloads(from..from + n as u32);
                        let range = runtime.block_on(log.as_ref().unwrap().append(batch(&items))).unwrap();
                        prop_assert_eq!(range.start, acknowledged.len() as u64);
                        acknowledged.extend(items);
                    }
                    Step::Restart => {
                        drop(log.take());
                        log = Some(open(dir.path()).0);
                    }
                    Step::TornWrite(junk) => {
                        drop(log.take());
                        let newest = segment::list(dir.path()).unwrap().pop().unwrap();
                        let mut f = fs::OpenOptions::new().append(true).open(&newest.path).unwrap();
                        std::io::Write::write_all(&mut f, &junk).unwrap();
                        drop(f);
                        log = Some(open(dir.path()).0);
                    }
                }
            }
            let log = log.unwrap();
            let records = log.reader(0).read(usize::MAX).unwrap();
            let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
            prop_assert_eq!(offsets, (0..acknowledged.len() as u64).collect::<Vec<_>>());
            prop_assert_eq!(texts(&records), acknowledged);
        }
    }
}
