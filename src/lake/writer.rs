//! The lake writer: a consumer of the intake log that files every entry into Parquet.
//!
//! It reads the log in order and adds each entry to the partition it belongs to (table and UTC
//! date of `receivedAt`), encoding Parquet as it goes. A *flush* covers a contiguous log range
//! `[start, end)`; it is cut when `storage.flush_interval` has passed or a size cap is reached, and
//! writes one file per partition named after the range:
//!
//! ```text
//! <table>/date=YYYY-MM-DD/<start:020>-<end:020>.parquet
//! ```
//!
//! Exactly once: before the first file of a flush is written, the range is recorded durably on
//! local disk (`<log dir>/lake.pending`). The log cursor moves to `end` only after every file of
//! the flush is durable, and then the record is removed. After a crash, a pending range that
//! starts at the cursor is read again from the log and flushed again whole: the same entries give
//! the same partitions and the same file names, so files that were written before the crash are
//! replaced by identical ones, never joined by a second copy.
//!
//! When storage (or the local disk holding the flush record and the cursor) fails, the flush is
//! retried with backoff (1 s doubling to 30 s) for as long as it takes; meanwhile the log keeps everything (it is the buffer), and when it fills the edge answers
//! 503. The writer runs on its own thread so that Parquet encoding never runs on the HTTP workers.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use datafusion::parquet::schema::types::ColumnPath;

use super::store::LakeStore;
use super::tables::{EventsBuilder, QuarantineBuilder, Table};
use super::typed::{TypedBuilder, TypedSource, TypedTables};
use crate::entry::{Entry, Status};
use crate::intake_log::{Consumer, ReadError, Record};
use crate::metrics::LakeMetrics;
use crate::supervisor::Health;

/// The log consumer name of the lake writer.
pub const CONSUMER: &str = "lake";

/// When to cut a flush.
#[derive(Debug, Clone)]
pub struct FlushPolicy {
    pub interval: Duration,
    /// Rows in one flush, all partitions together; bounds memory.
    pub max_rows: usize,
    /// Bytes of log records in one flush, all partitions together: rows can be large (up to the
    /// edge's limits), so rows alone do not bound memory.
    pub max_bytes: usize,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        FlushPolicy {
            interval: Duration::from_secs(10),
            max_rows: 500_000,
            max_bytes: 256 << 20,
        }
    }
}

/// Rows handed to the Parquet encoder at a time, and their bytes: an Arrow string column holds at
/// most 2 GiB, and a batch is held whole in memory until it is encoded.
const ENCODE_BATCH_ROWS: usize = 8192;
const ENCODE_BATCH_BYTES: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("encoding Parquet: {0}")]
    Encode(String),
    #[error(transparent)]
    Store(#[from] super::store::StoreError),
    #[error("lake writer state: {0}")]
    State(#[from] io::Error),
}

/// The file a partition of a flush goes to.
pub fn file_path(table: &str, date: NaiveDate, start: u64, end: u64) -> String {
    format!("{table}/date={date}/{start:020}-{end:020}.parquet")
}

/// `start` and `end` from a file name written by [`file_path`].
pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".parquet")?;
    let (start, end) = stem.split_once('-')?;
    if start.len() != 20 || end.len() != 20 {
        return None;
    }
    Some((start.parse().ok()?, end.parse().ok()?))
}

/// zstd level of flushes: cheap enough to keep up with ingestion on a shared core.
pub const FLUSH_ZSTD_LEVEL: i32 = 3;

/// Parquet settings of the lake's files; `zstd_level` trades CPU for size.
pub fn writer_properties(zstd_level: i32) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(zstd_level).unwrap_or_default(),
        ))
        .set_max_row_group_row_count(Some(1 << 20))
        .set_statistics_enabled(EnabledStatistics::Page)
        // Unique per row: a dictionary would only be abandoned after costing time.
        .set_column_dictionary_enabled(ColumnPath::from("message_id"), false)
        .build()
}

/// The table a partition belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Fixed(Table),
    /// A typed table, by track event name.
    Typed(String),
}

enum Rows {
    Events(Box<EventsBuilder>),
    Quarantine(Box<QuarantineBuilder>),
    Typed(Box<TypedBuilder>),
}

/// One partition of a flush: rows being built, and the Parquet file being encoded.
struct Partition {
    /// The table's folder under the lake.
    folder: String,
    rows: Rows,
    /// Bytes of the log records behind the rows not yet encoded.
    pending_bytes: usize,
    encoder: ArrowWriter<Vec<u8>>,
}

impl Partition {
    fn new(target: &Target, typed: &TypedTables) -> Result<Self, WriteError> {
        let (folder, rows, schema) = match target {
            Target::Fixed(Table::Events) => (
                "events".to_string(),
                Rows::Events(Box::default()),
                Table::Events.schema(),
            ),
            Target::Fixed(Table::Quarantine) => (
                "quarantine".to_string(),
                Rows::Quarantine(Box::default()),
                Table::Quarantine.schema(),
            ),
            Target::Typed(event) => {
                let table = &typed[event];
                (
                    table.folder(),
                    Rows::Typed(Box::new(table.builder())),
                    table.schema.clone(),
                )
            }
        };
        let encoder = ArrowWriter::try_new(
            Vec::new(),
            schema,
            Some(writer_properties(FLUSH_ZSTD_LEVEL)),
        )
        .map_err(|e| WriteError::Encode(e.to_string()))?;
        Ok(Partition {
            folder,
            rows,
            pending_bytes: 0,
            encoder,
        })
    }

    fn pending_rows(&self) -> usize {
        match &self.rows {
            Rows::Events(b) => b.len(),
            Rows::Quarantine(b) => b.len(),
            Rows::Typed(b) => b.len(),
        }
    }

    fn encode_pending(&mut self) -> Result<(), WriteError> {
        if self.pending_rows() == 0 {
            return Ok(());
        }
        let batch: RecordBatch = match &mut self.rows {
            Rows::Events(b) => b.finish(),
            Rows::Quarantine(b) => b.finish(),
            Rows::Typed(b) => b.finish(),
        }
        .map_err(|e| WriteError::Encode(e.to_string()))?;
        self.pending_bytes = 0;
        self.encoder
            .write(&batch)
            .map_err(|e| WriteError::Encode(e.to_string()))
    }

    fn into_bytes(mut self) -> Result<Vec<u8>, WriteError> {
        self.encode_pending()?;
        self.encoder
            .into_inner()
            .map_err(|e| WriteError::Encode(e.to_string()))
    }
}

/// The entries of one log range, sorted into partitions.
pub struct Flush {
    pub start: u64,
    pub end: u64,
    partitions: BTreeMap<(Target, NaiveDate), Partition>,
    typed: Arc<TypedTables>,
    rows: usize,
    /// Bytes of the log records added.
    bytes: usize,
    /// When the first record was added: the flush interval counts from there.
    opened: Option<Instant>,
    /// Entries that could not become rows of their table and went to the quarantine instead.
    misfiled: u64,
}

impl Flush {
    pub fn new(start: u64, typed: Arc<TypedTables>) -> Self {
        Flush {
            start,
            end: start,
            partitions: BTreeMap::new(),
            typed,
            rows: 0,
            bytes: 0,
            opened: None,
            misfiled: 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Adds the next record of the log (its offset must be `end`).
    pub fn add(&mut self, record: &Record) -> Result<(), WriteError> {
        debug_assert_eq!(record.offset, self.end);
        self.end = record.offset + 1;
        self.bytes += record.payload.len();
        self.opened.get_or_insert_with(Instant::now);
        let entry = match Entry::decode(&record.payload) {
            Ok(e) => e,
            Err(e) => {
                // Written by us and checksummed, so this is a bug; keep going, loudly.
                tracing::error!(offset = record.offset, error = %e, "unreadable intake log record left out of the lake");
                self.misfiled += 1;
                return Ok(());
            }
        };
        #[cfg(test)]
        if entry.message_id == crate::supervisor::POISON_FOR_TESTS {
            panic!("the tests' poison record");
        }
        let date = DateTime::from_timestamp_micros(entry.received_at_micros)
            .unwrap_or_default()
            .date_naive();
        match entry.status {
            Status::Accepted => {
                let size = record.payload.len();
                let partition = self.partition(Target::Fixed(Table::Events), date, size)?;
                let Rows::Events(rows) = &mut partition.rows else {
                    unreachable!("events partitions hold event rows")
                };
                match rows.append(&entry) {
                    Ok(Some(event)) if self.typed.contains_key(&event) => {
                        let partition = self.partition(Target::Typed(event), date, size)?;
                        let Rows::Typed(rows) = &mut partition.rows else {
                            unreachable!("typed partitions hold typed rows")
                        };
                        if let Err(e) = rows.append(&entry) {
                            tracing::error!(offset = record.offset, error = %e, "track left out of its typed table");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(offset = record.offset, error = %e, "accepted message filed in the quarantine");
                        self.misfiled += 1;
                        let reason = format!("could not be stored as an event: {e}");
                        self.quarantine(&entry, &reason, date)?;
                    }
                }
            }
            Status::Rejected => self.quarantine(&entry, entry.reason, date)?,
            // The profile stage's clock: nothing to store.
            Status::Clock => return Ok(()),
        }
        self.rows += 1;
        Ok(())
    }

    /// Files the next record of the log in the quarantine with `reason`, as little read as can
    /// be: it is one the writer failed on.
    pub fn set_aside(&mut self, record: &Record, reason: &str) -> Result<(), WriteError> {
        debug_assert_eq!(record.offset, self.end);
        self.end = record.offset + 1;
        self.bytes += record.payload.len();
        self.opened.get_or_insert_with(Instant::now);
        self.misfiled += 1;
        let entry = Entry::decode(&record.payload).unwrap_or(Entry {
            status: Status::Rejected,
            received_at_micros: 0,
            source: "",
            message_id: "",
            reason: "",
            body: &record.payload,
        });
        let date = DateTime::from_timestamp_micros(entry.received_at_micros)
            .unwrap_or_default()
            .date_naive();
        self.quarantine(&entry, reason, date)?;
        self.rows += 1;
        Ok(())
    }

    fn quarantine(
        &mut self,
        entry: &Entry,
        reason: &str,
        date: NaiveDate,
    ) -> Result<(), WriteError> {
        let size = entry.body.len() + reason.len();
        let partition = self.partition(Target::Fixed(Table::Quarantine), date, size)?;
        let Rows::Quarantine(rows) = &mut partition.rows else {
            unreachable!("quarantine partitions hold quarantine rows")
        };
        rows.append(entry, reason);
        Ok(())
    }

    /// The partition a row of about `size` bytes goes to, with room for it in its next batch.
    fn partition(
        &mut self,
        target: Target,
        date: NaiveDate,
        size: usize,
    ) -> Result<&mut Partition, WriteError> {
        let partition = match self.partitions.entry((target, date)) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let partition = Partition::new(&e.key().0, &self.typed)?;
                e.insert(partition)
            }
        };
        if partition.pending_rows() >= ENCODE_BATCH_ROWS
            || partition.pending_bytes + size > ENCODE_BATCH_BYTES
        {
            partition.encode_pending()?;
        }
        partition.pending_bytes += size;
        Ok(partition)
    }

    /// Whether it is time to write this flush out.
    pub fn is_due(&self, policy: &FlushPolicy) -> bool {
        self.is_full(policy)
            || (self.end > self.start
                && self.opened.is_some_and(|t| t.elapsed() >= policy.interval))
    }

    /// Whether it holds as much as one flush may.
    pub fn is_full(&self, policy: &FlushPolicy) -> bool {
        self.end > self.start && (self.rows >= policy.max_rows || self.bytes >= policy.max_bytes)
    }

    /// Encodes every partition into its file.
    pub fn finish(self) -> Result<EncodedFlush, WriteError> {
        let (start, end) = (self.start, self.end);
        let files = self
            .partitions
            .into_iter()
            .map(|((_, date), partition)| {
                Ok(FlushFile {
                    path: file_path(&partition.folder, date, start, end),
                    bytes: bytes::Bytes::from(partition.into_bytes()?),
                })
            })
            .collect::<Result<_, WriteError>>()?;
        Ok(EncodedFlush {
            start,
            end,
            rows: self.rows,
            misfiled: self.misfiled,
            files,
        })
    }
}

/// A flush ready to be stored.
pub struct EncodedFlush {
    pub start: u64,
    pub end: u64,
    pub rows: usize,
    pub misfiled: u64,
    pub files: Vec<FlushFile>,
}

/// One Parquet file of a flush, its path relative to the lake.
pub struct FlushFile {
    pub path: String,
    pub bytes: bytes::Bytes,
}

/// The durable record of a flush in progress.
struct Pending {
    path: PathBuf,
}

impl Pending {
    fn load(&self) -> io::Result<Option<(u64, u64)>> {
        match std::fs::read(&self.path) {
            Ok(b) if b.len() == 20 && crc32fast::hash(&b[..16]).to_le_bytes() == b[16..] => {
                Ok(Some((
                    u64::from_le_bytes(b[..8].try_into().unwrap()),
                    u64::from_le_bytes(b[8..16].try_into().unwrap()),
                )))
            }
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is corrupt", self.path.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn store(&self, start: u64, end: u64) -> io::Result<()> {
        let mut b = start.to_le_bytes().to_vec();
        b.extend_from_slice(&end.to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, &b)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        sync_parent(&self.path)
    }

    fn clear(&self) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => sync_parent(&self.path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    crate::intake_log::segment::sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Adds the next record to `flush`, or files it in the quarantine when the supervisor set it
/// aside (the writer kept failing on it).
fn take(flush: &mut Flush, record: &Record, health: &Health) -> Result<(), WriteError> {
    if let Some(reason) = health.set_aside(record.offset) {
        flush.set_aside(record, &reason)?;
        health.was_set_aside(record.offset);
        return Ok(());
    }
    health.working_on(record.offset);
    flush.add(record)?;
    health.between_records();
    Ok(())
}

/// The lake writer: owns the `lake` consumer of the log.
pub struct LakeWriter {
    store: LakeStore,
    consumer: Consumer,
    pending: Pending,
    policy: FlushPolicy,
    metrics: Arc<LakeMetrics>,
    /// The runtime that drives the object store's I/O; this thread blocks on it.
    runtime: tokio::runtime::Handle,
    typed: Arc<TypedSource>,
}

/// How the writer's loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Everything read was flushed.
    Flushed,
    /// Storage was failing when the stop came; the log keeps what was not flushed.
    Abandoned,
}

impl LakeWriter {
    /// `runtime` drives the object store's I/O while the writer's own thread waits on it.
    pub fn new(
        store: LakeStore,
        consumer: Consumer,
        state_dir: &Path,
        policy: FlushPolicy,
        metrics: Arc<LakeMetrics>,
        runtime: tokio::runtime::Handle,
        typed: Arc<TypedSource>,
    ) -> io::Result<Self> {
        Ok(LakeWriter {
            typed,
            store,
            consumer,
            pending: Pending {
                path: state_dir.join("lake.pending"),
            },
            policy,
            metrics,
            runtime,
        })
    }

    /// Redoes a flush that a crash interrupted, so that its files are whole and counted once.
    pub fn recover(&mut self, health: &Health) -> Result<(), WriteError> {
        let Some((start, end)) = self.pending.load()? else {
            return Ok(());
        };
        let committed = self.consumer.committed();
        if start != committed {
            // The flush was committed; only its record was left behind.
            return Ok(self.pending.clear()?);
        }
        tracing::info!(start, end, "redoing a lake flush interrupted by a crash");
        let mut flush = Flush::new(start, self.typed.current());
        while flush.end < end {
            let want = (end - flush.end).min(4096) as usize;
            let records = self.consumer.read(want)?;
            if records.is_empty() {
                return Err(WriteError::State(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the log ends before the interrupted flush {start}..{end}"),
                )));
            }
            for r in &records {
                take(&mut flush, r, health)?;
            }
        }
        self.write(&flush.finish()?)
    }

    /// Writes a flush's files and then moves the cursor past it.
    pub fn write(&mut self, flush: &EncodedFlush) -> Result<(), WriteError> {
        let started = Instant::now();
        if flush.end == flush.start {
            return Ok(());
        }
        self.pending.store(flush.start, flush.end)?;
        for file in &flush.files {
            let path = self.store.path(&file.path);
            self.runtime
                .block_on(self.store.put_durable(&path, file.bytes.clone()))?;
            self.metrics.files_written.inc();
            self.metrics.bytes_written.inc_by(file.bytes.len() as u64);
        }
        self.consumer.commit(flush.end)?;
        self.pending.clear()?;
        self.metrics.rows_written.inc_by(flush.rows as u64);
        self.metrics.misfiled.inc_by(flush.misfiled);
        self.metrics
            .flush_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            start = flush.start,
            end = flush.end,
            rows = flush.rows,
            files = flush.files.len(),
            "lake flush written"
        );
        Ok(())
    }

    /// Writes `flush`, retrying storage failures with backoff until it succeeds; `false` when
    /// `stop` was set before it could.
    fn write_with_retries(&mut self, flush: Flush, stop: &AtomicBool) -> Result<bool, WriteError> {
        let encoded = flush.finish()?;
        let mut delay = Duration::from_secs(1);
        loop {
            match self.write(&encoded) {
                Ok(()) => return Ok(true),
                // Storage, or the local disk for the flush record or the cursor: both may come back.
                Err(e @ (WriteError::Store(_) | WriteError::State(_))) => {
                    self.metrics.flush_errors.inc();
                    tracing::warn!(error = %e, retry_in = ?delay, "lake flush failed; the log keeps the messages");
                }
                Err(other) => return Err(other),
            }
            let until = Instant::now() + delay;
            while Instant::now() < until {
                if stop.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// Runs until `stop` is set, then flushes what it has read.
    pub fn run(mut self, stop: &AtomicBool, health: &Health) -> Result<Stopped, WriteError> {
        self.recover(health)?;
        let mut flush = Flush::new(self.consumer.position(), self.typed.current());
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            let records = self.consumer.read(4096)?;
            for r in &records {
                take(&mut flush, r, health)?;
                if flush.is_full(&self.policy) {
                    let next = Flush::new(flush.end, self.typed.current());
                    let done = std::mem::replace(&mut flush, next);
                    if !self.write_with_retries(done, stop)? {
                        return Ok(Stopped::Abandoned);
                    }
                }
            }
            let due = flush.is_due(&self.policy) || (stopping && records.is_empty());
            if due && flush.end > flush.start {
                let next = Flush::new(flush.end, self.typed.current());
                let done = std::mem::replace(&mut flush, next);
                if !self.write_with_retries(done, stop)? {
                    return Ok(Stopped::Abandoned);
                }
            } else if due {
                flush = Flush::new(flush.end, self.typed.current());
            }
            if stopping && records.is_empty() && flush.end == flush.start {
                return Ok(Stopped::Flushed);
            }
            if records.is_empty() {
                // Wait for more, but not past the flush deadline, and look at `stop` often.
                let wait = self.consumer.wait();
                self.runtime.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_millis(100), wait).await;
                });
            }
        }
    }
}
