//! The durable intake log: every message the HTTP edge accepts is appended here, and fsynced,
//! before the client gets its answer. Every later stage (lake, profiles, destinations) is a
//! consumer that reads the log in order through its own durable cursor.
//!
//! ## Why our own segment files
//! The log is written by one thread and read sequentially; what matters is one fsync shared by
//! many requests, a checksum per record, cutting a torn tail on start, and deleting whole files
//! once consumers have passed them. Append-only segment files do exactly that in a few hundred
//! lines with nothing to tune; an embedded key-value store (sled, redb, fjall) would add its own
//! write-ahead log, compaction and write amplification underneath ours for no gain.
//!
//! ## Shape
//! - [`segment`]: the file format (header, framed records with CRC-32) and tail recovery.
//! - [`writer`]: the one thread that writes. Requests queue in a bounded channel; the thread
//!   takes everything queued (a *group*), writes it, fsyncs once and then answers each request
//!   with its offsets. Concurrent requests therefore share fsyncs, and an answer always means
//!   "on disk".
//! - [`reader`]: reads committed records from any offset, across segments.
//! - [`cursor`]: consumers' durable cursors; a segment is deleted once every registered
//!   consumer's cursor has passed it.
//!
//! - [`append`](Appender): the one way records enter the log, idempotent by key through
//!   [`dedup`]: the edge, the profile stage and the quarantine replay all append through it.
//!
//! ## What the rest of Sluice uses
//! The interface a second backend (JetStream, issue 20) has to give, and all of it:
//! - writing: [`Appender::begin`] / [`Pending::finish`] (keys reserved, then records appended and
//!   durable), and [`Appender::append_unkeyed`] for records that are never duplicates;
//! - reading: [`IntakeLog::reader`] from an offset (records in order, each with its offset),
//!   [`IntakeLog::end`] and [`IntakeLog::watch_end`] (the committed end, to wait for more);
//! - cursors: [`IntakeLog::consumer`] by name, then [`Consumer::read`], [`Consumer::commit`]
//!   (durable, at least once: a consumer resumes at its cursor and makes that idempotent),
//!   [`Consumer::committed`], [`Consumer::rewind`], [`Consumer::reopen`];
//! - lag and health: [`IntakeLog::stats`] (the end, each consumer's cursor, bytes held, failed)
//!   and [`IntakeLog::fill`] (how full, for a destination that moves its backlog off the log).
//!
//! Offsets number the records one by one, as a JetStream stream's sequence numbers do. The
//! module knows what a record holds (`crate::entry`) only to rebuild
//! the dedup state from it.
//!
//! ## Failure
//! When the log holds more than `max_size`, appends fail with [`AppendError::Full`], except
//! Sluice's own records ([`Room::Reserve`]: segment changes, clock records), which may use a
//! reserve of a sixteenth more. The profile stage appends those as it reads, and when it is the
//! log's slowest consumer only its own progress frees space: refused, it could never move again
//! (a full log at 50,000 msg/s over a stage far behind did just that, batch after batch). A failed
//! write or fsync cuts the file back to its last durable length, so nothing half-written is ever
//! read, and fails that group's appends; what was acknowledged before is untouched. If even the
//! cut fails, the log refuses all appends ([`AppendError::Failed`]) until a restart recovers it.

mod append;
pub mod cursor;
pub mod dedup;
pub mod reader;
pub mod segment;
mod writer;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::LogMetrics;
pub use append::{message_key, readmission_key, Appender, Pending};
pub use cursor::Consumer;
pub use reader::{LogReader, ReadError, Record};
use segment::SegmentFile;

/// Limits of one log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub dir: PathBuf,
    pub segment_size: u64,
    pub max_size: u64,
}

/// Records framed and ready to append, built by the caller so that the writer thread only copies
/// bytes to disk.
#[derive(Debug, Default)]
pub struct RecordBatch {
    buf: Vec<u8>,
    count: u64,
}

impl RecordBatch {
    pub fn with_capacity(bytes: usize) -> Self {
        RecordBatch {
            buf: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    /// Adds one record whose payload `write` appends to the buffer it is given.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        segment::frame_into(&mut self.buf, write);
        self.count += 1;
    }

    pub fn push(&mut self, payload: &[u8]) {
        self.push_with(|b| b.extend_from_slice(payload));
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn byte_len(&self) -> usize {
        self.buf.len()
    }
}

/// Why an append did not happen. Every case is worth retrying later: nothing of the batch was
/// made durable, and nothing acknowledged before was harmed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    #[error("intake log is full ({held} bytes held, limit {max})")]
    Full { held: u64, max: u64 },
    #[error("intake log write failed: {0}")]
    Io(String),
    #[error("intake log refuses writes after a failure it could not undo; restart to recover")]
    Failed,
    #[error("intake log is shut down")]
    Closed,
}

/// State shared by the writer, readers and consumers.
pub(crate) struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    /// The committed end: one past the last durable record.
    end: watch::Sender<u64>,
    failed: AtomicBool,
    /// Registered consumers and their durable cursors.
    cursors: Mutex<HashMap<String, u64>>,
    /// Opened by [`open_read_only`] beside a possibly running writer: the newest segment may end
    /// in a record being written, which is then the end rather than corruption.
    read_only: bool,
}

pub(crate) struct State {
    /// Oldest first; the last one is the one being written. `size` is the durable length.
    segments: Vec<SegmentFile>,
    total_bytes: u64,
}

impl Shared {
    fn end(&self) -> u64 {
        *self.end.borrow()
    }

    /// Deletes sealed segments that every registered consumer has passed.
    fn apply_retention(&self) -> io::Result<()> {
        let Some(min_cursor) = self.cursors.lock().unwrap().values().copied().min() else {
            return Ok(());
        };
        let removed: Vec<SegmentFile> = {
            let mut state = self.state.lock().unwrap();
            let mut n = 0;
            // Segment i is done when the next one starts at or before the slowest cursor.
            while n + 1 < state.segments.len() && state.segments[n + 1].base <= min_cursor {
                n += 1;
            }
            let removed: Vec<SegmentFile> = state.segments.drain(..n).collect();
            state.total_bytes -= removed.iter().map(|s| s.size).sum::<u64>();
            removed
        };
        for segment in &removed {
            fs::remove_file(&segment.path)?;
            tracing::debug!(segment = segment.base, "deleted intake log segment");
        }
        if !removed.is_empty() {
            segment::sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// A point-in-time view of the log, for metrics and health checks.
#[derive(Debug, Clone)]
pub struct LogStats {
    pub start: u64,
    pub end: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub segments: usize,
    pub failed: bool,
    pub consumers: Vec<(String, u64)>,
}

impl LogStats {
    /// Too close to `max_size` to take a full-size request: a quarter of the limit or 1 MiB,
    /// whichever is less, is what must be left.
    pub fn nearly_full(&self) -> bool {
        let headroom = (self.max_bytes / 4).min(1 << 20);
        self.bytes + headroom > self.max_bytes
    }
}

struct Command {
    batch: RecordBatch,
    room: Room,
    reply: oneshot::Sender<Result<Range<u64>, AppendError>>,
}

/// How much of the disk an append may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Up to `max_size`: what clients send.
    Limit,
    /// Up to `max_size` and the reserve ([`LogOptions::reserve`]): Sluice's own records.
    Reserve,
}

impl LogOptions {
    /// What [`Room::Reserve`] may take past `max_size`.
    pub fn reserve(&self) -> u64 {
        self.max_size / 16
    }
}

/// The intake log. Cheap to share behind an `Arc`; appends from many tasks are group-committed.
pub struct IntakeLog {
    shared: Arc<Shared>,
    options: LogOptions,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How many appends may wait for the writer before callers wait to enqueue.
const QUEUE_CAPACITY: usize = 4096;

impl IntakeLog {
    /// Opens (or creates) the log in `options.dir`, cutting off a torn tail, and starts the
    /// writer thread.
    pub fn open(options: LogOptions, metrics: Arc<LogMetrics>) -> io::Result<IntakeLog> {
        fs::create_dir_all(&options.dir)?;
        fs::create_dir_all(cursor::dir(&options.dir))?;
        let mut segments = segment::list(&options.dir)?;
        let (active_file, end) = match segments.last_mut() {
            None => {
                let (seg, file) = segment::create(&options.dir, 0)?;
                segments.push(seg);
                (file, 0)
            }
            Some(last) => {
                let recovered = segment::recover_tail(last).map_err(|e| {
                    io::Error::new(e.kind(), format!("recovering {}: {e}", last.path.display()))
                })?;
                if recovered.cut_bytes > 0 {
                    tracing::warn!(
                        segment = %last.path.display(),
                        bytes = recovered.cut_bytes,
                        "cut a torn tail off the intake log (writes that were never acknowledged)"
                    );
                }
                last.size = recovered.valid_len;
                let file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&last.path)?;
                (file, last.base + recovered.records)
            }
        };
        let total_bytes = segments.iter().map(|s| s.size).sum();
        let active = segments.last().expect("at least one segment").clone();
        let shared = Arc::new(Shared {
            dir: options.dir.clone(),
            state: Mutex::new(State {
                segments,
                total_bytes,
            }),
            end: watch::Sender::new(end),
            failed: AtomicBool::new(false),
            cursors: Mutex::new(HashMap::new()),
            read_only: false,
        });
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer = writer::Writer::new(
            shared.clone(),
            options.clone(),
            active,
            active_file,
            end,
            metrics,
        );
        let handle = std::thread::Builder::new()
            .name("sluice-log-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(IntakeLog {
            shared,
            options,
            commands: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Appends the batch and resolves once it is durable, with the offsets it got.
    pub async fn append(&self, batch: RecordBatch) -> Result<Range<u64>, AppendError> {
        self.append_in(Room::Limit, batch).await
    }

    /// [`IntakeLog::append`], within `room`.
    pub async fn append_in(
        &self,
        room: Room,
        batch: RecordBatch,
    ) -> Result<Range<u64>, AppendError> {
        if self.shared.failed.load(Ordering::Relaxed) {
            return Err(AppendError::Failed);
        }
        let sender = self
            .commands
            .lock()
            .unwrap()
            .clone()
            .ok_or(AppendError::Closed)?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(Command { batch, room, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        answer.await.unwrap_or(Err(AppendError::Closed))
    }

    /// One past the last durable record.
    pub fn end(&self) -> u64 {
        self.shared.end()
    }

    /// A receiver that changes whenever the committed end moves.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.shared.end.subscribe()
    }

    /// Reads committed records from `offset`.
    pub fn reader(&self, offset: u64) -> LogReader {
        LogReader::new(self.shared.clone(), offset)
    }

    /// Registers the consumer `name` and returns it at its durable cursor (a new consumer starts at
    /// the oldest record held). From now on the log keeps every record the consumer has not
    /// committed.
    pub fn consumer(&self, name: &str) -> io::Result<Consumer> {
        Consumer::register(self.shared.clone(), name)
    }

    /// How much of `max_size` the log holds, from 0 to 1 (past 1 appends fail). Cheaper than
    /// [`IntakeLog::stats`] for a caller that asks often.
    pub fn fill(&self) -> f64 {
        let held = self.shared.state.lock().unwrap().total_bytes;
        held as f64 / self.options.max_size.max(1) as f64
    }

    pub fn stats(&self) -> LogStats {
        let (start, bytes, segments) = {
            let state = self.shared.state.lock().unwrap();
            (
                state.segments[0].base,
                state.total_bytes,
                state.segments.len(),
            )
        };
        let mut consumers: Vec<(String, u64)> = self
            .shared
            .cursors
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        consumers.sort();
        LogStats {
            start,
            end: self.end(),
            bytes,
            max_bytes: self.options.max_size,
            segments,
            failed: self.shared.failed.load(Ordering::Relaxed),
            consumers,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    /// Stops taking appends, lets the writer finish what is queued, and waits for it.
    pub fn close(&self) {
        self.commands.lock().unwrap().take();
        if let Some(handle) = self.writer.lock().unwrap().take() {
            let _ = handle.join();
        }
    }
}

impl Drop for IntakeLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// Opens a log's files for reading only, without recovering or writing anything, as
/// `sluice log dump` does while a server may be running on the same folder.
pub fn open_read_only(dir: &Path) -> io::Result<(LogReaderFactory, u64)> {
    let segments = segment::list(dir)?;
    if segments.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no intake log in {}", dir.display()),
        ));
    }
    let total_bytes = segments.iter().map(|s| s.size).sum();
    let start = segments[0].base;
    let shared = Arc::new(Shared {
        dir: dir.to_path_buf(),
        state: Mutex::new(State {
            segments,
            total_bytes,
        }),
        // Unknown until read: the reader stops at the first incomplete record instead.
        end: watch::Sender::new(u64::MAX),
        failed: AtomicBool::new(false),
        cursors: Mutex::new(HashMap::new()),
        read_only: true,
    });
    Ok((LogReaderFactory { shared }, start))
}

/// Makes readers over a log opened with [`open_read_only`].
pub struct LogReaderFactory {
    shared: Arc<Shared>,
}

impl LogReaderFactory {
    pub fn reader(&self, offset: u64) -> LogReader {
        LogReader::new(self.shared.clone(), offset)
    }

    /// The durable cursor of a consumer, if it has one.
    pub fn cursor(&self, name: &str) -> io::Result<Option<u64>> {
        cursor::load(&self.shared.dir, name)
    }
}

#[cfg(test)]
mod tests;
