//! Deduplication by (source, messageId) within a time window, bounded in memory, kept across
//! restarts.
//!
//! Ids are remembered as 64-bit hashes in *generations*: the newest takes inserts; it is sealed
//! when it covers an eighth of the window or holds an eighth of `max_ids`. A sealed generation is
//! dropped whole once its newest id is older than the window, or, when more than `max_ids` are held,
//! oldest first (counted in `sluice_dedup_evicted`). A lookup checks every generation: at most
//! about nine.
//!
//! An id is *reserved* while its append is in flight and becomes remembered only once the append
//! is durable; a failed append forgets it, so the client's retry is not mistaken for a duplicate.
//! A copy that arrives while the original is in flight waits for the original's outcome: it is a
//! duplicate only if the original became durable (answering it at once could acknowledge a
//! message that is then lost). A request reserves all of its ids or none: it waits holding
//! nothing, so two requests can never wait for each other.
//!
//! Across restarts: a snapshot of the generations is written now and then, and the snapshot's log
//! offset becomes the durable cursor of the `dedup` log consumer. On start the snapshot is loaded
//! and the log is replayed from that cursor. The offset is chosen so that every accepted record
//! before it is in the snapshot: it is no later than the log's end when any still-unsettled
//! reservation was made (that request's records can only come after).

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::config::DedupConfig;
use crate::entry::{Entry, Status};
use crate::intake_log::{Consumer, IntakeLog};
use crate::metrics::DedupMetrics;

/// The dedup key of a message.
pub fn key(source: &str, message_id: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(source.as_bytes());
    h.update(&[0xff]);
    h.update(message_id.as_bytes());
    h.digest()
}

/// Keys are already hashes; hashing them again would only cost time.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type IdSet = hashbrown::HashSet<u64, BuildHasherDefault<PassThrough>>;

#[derive(Clone, Default)]
struct Generation {
    /// Receive times (µs) of the oldest and newest id in it.
    first: i64,
    last: i64,
    ids: IdSet,
}

struct Inner {
    sealed: VecDeque<Arc<Generation>>,
    current: Generation,
    /// Ids in flight, each with the outcome of its reservation: `true` once settled.
    reserved: hashbrown::HashMap<u64, watch::Receiver<bool>, BuildHasherDefault<PassThrough>>,
    /// Unsettled reservations: (log end when made, ticket).
    in_flight: BTreeSet<(u64, u64)>,
    next_ticket: u64,
    changed: bool,
}

pub struct Dedup {
    inner: Mutex<Inner>,
    window_micros: i64,
    max_ids: usize,
    metrics: Arc<DedupMetrics>,
}

/// Ids held for one request while its append is in flight. Dropping it unsettled counts as a
/// failed append.
pub struct Reservation<'a> {
    dedup: &'a Dedup,
    ticket: u64,
    log_end: u64,
    keys: Vec<u64>,
    settled: bool,
    /// Tells the copies waiting for these ids that they are settled (by sending, or by dropping).
    outcome: watch::Sender<bool>,
}

impl Reservation<'_> {
    /// The append is durable: remember the ids.
    pub fn commit(mut self, at: DateTime<Utc>) {
        self.dedup.settle(&self, Some(at.timestamp_micros()));
        self.settled = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.dedup.settle(self, None);
        }
        self.outcome.send_replace(true);
    }
}

impl Dedup {
    pub fn new(config: &DedupConfig, metrics: Arc<DedupMetrics>) -> Self {
        Dedup {
            inner: Mutex::new(Inner {
                sealed: VecDeque::new(),
                current: Generation::default(),
                reserved: Default::default(),
                in_flight: BTreeSet::new(),
                next_ticket: 0,
                changed: false,
            }),
            window_micros: i64::try_from(config.window.as_micros()).unwrap_or(i64::MAX),
            max_ids: config.max_ids.max(8),
            metrics,
        }
    }

    /// Marks which of `keys` are duplicates (`None` keys never are) and reserves the others. When
    /// some are in flight in another request, waits (holding nothing) until that one is settled,
    /// then looks again. `log_end` gives the log's committed end.
    pub async fn reserve(
        &self,
        keys: &[Option<u64>],
        now: DateTime<Utc>,
        log_end: impl Fn() -> u64,
    ) -> (Reservation<'_>, Vec<bool>) {
        loop {
            match self.try_reserve(keys, now, log_end()) {
                Ok(reserved) => return reserved,
                Err(mut in_flight) => {
                    // Err only means the reservation is gone: settled either way.
                    let _ = in_flight.wait_for(|settled| *settled).await;
                }
            }
        }
    }

    /// [`Dedup::reserve`] without the waiting: the outcome of a reservation in flight that holds
    /// one of `keys`, when there is one.
    fn try_reserve(
        &self,
        keys: &[Option<u64>],
        now: DateTime<Utc>,
        log_end: u64,
    ) -> Result<(Reservation<'_>, Vec<bool>), watch::Receiver<bool>> {
        let mut inner = self.inner.lock().unwrap();
        self.expire(&mut inner, now.timestamp_micros());
        let mut duplicate = Vec::with_capacity(keys.len());
        let mut mine = IdSet::default();
        let mut reserved = Vec::with_capacity(keys.len());
        for key in keys {
            let dup = match key {
                Some(k) if inner.remembers(*k) || mine.contains(k) => true,
                Some(k) => {
                    if let Some(outcome) = inner.reserved.get(k) {
                        return Err(outcome.clone());
                    }
                    mine.insert(*k);
                    reserved.push(*k);
                    false
                }
                None => false,
            };
            duplicate.push(dup);
        }
        let (outcome, waiting) = watch::channel(false);
        for k in &reserved {
            inner.reserved.insert(*k, waiting.clone());
        }
        let ticket = inner.next_ticket;
        inner.next_ticket += 1;
        inner.in_flight.insert((log_end, ticket));
        let reservation = Reservation {
            dedup: self,
            ticket,
            log_end,
            keys: reserved,
            settled: false,
            outcome,
        };
        Ok((reservation, duplicate))
    }

    fn settle(&self, r: &Reservation, committed_at: Option<i64>) {
        let mut inner = self.inner.lock().unwrap();
        inner.in_flight.remove(&(r.log_end, r.ticket));
        for k in &r.keys {
            inner.reserved.remove(k);
        }
        if let Some(at) = committed_at {
            for k in &r.keys {
                self.remember(&mut inner, *k, at);
            }
        }
    }

    fn remember(&self, inner: &mut Inner, key: u64, at: i64) {
        let span = self.window_micros / 8;
        let full = inner.current.ids.len() >= self.max_ids / 8;
        let old = !inner.current.ids.is_empty() && at.saturating_sub(inner.current.first) > span;
        if full || old {
            let sealed = std::mem::take(&mut inner.current);
            inner.sealed.push_back(Arc::new(sealed));
        }
        let g = &mut inner.current;
        if g.ids.is_empty() {
            g.first = at;
        }
        g.last = g.last.max(at);
        g.ids.insert(key);
        inner.changed = true;
        self.evict_over_capacity(inner);
    }

    fn expire(&self, inner: &mut Inner, now: i64) {
        let horizon = now.saturating_sub(self.window_micros);
        while inner.sealed.front().is_some_and(|g| g.last < horizon) {
            inner.sealed.pop_front();
            inner.changed = true;
        }
        if !inner.current.ids.is_empty() && inner.current.last < horizon {
            inner.current = Generation::default();
            inner.changed = true;
        }
    }

    fn evict_over_capacity(&self, inner: &mut Inner) {
        while inner.len() > self.max_ids {
            let Some(oldest) = inner.sealed.pop_front() else {
                break;
            };
            self.metrics.evicted.inc_by(oldest.ids.len() as u64);
        }
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What to write to disk: every remembered id and the log offset that this covers.
    pub fn snapshot(&self, log_end: u64) -> Option<Snapshot> {
        let mut inner = self.inner.lock().unwrap();
        let offset = inner.safe_offset(log_end);
        if !inner.changed {
            return None;
        }
        inner.changed = false;
        let mut generations: Vec<Arc<Generation>> = inner.sealed.iter().cloned().collect();
        generations.push(Arc::new(inner.current.clone()));
        Some(Snapshot {
            offset,
            generations,
        })
    }

    /// Loads a snapshot written by [`Snapshot::write`]. A missing file is an empty dedup; a
    /// corrupt one is an error.
    pub fn load(&self, path: &Path) -> io::Result<bool> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let generations = Snapshot::decode(&bytes).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("dedup snapshot {} is corrupt", path.display()),
            )
        })?;
        let mut inner = self.inner.lock().unwrap();
        inner.sealed = generations.into_iter().map(Arc::new).collect();
        inner.current = Generation::default();
        Ok(true)
    }

    /// Remembers an id read back from the log at start-up.
    fn replay(&self, key: u64, at: i64) {
        let mut inner = self.inner.lock().unwrap();
        self.remember(&mut inner, key, at);
    }
}

impl Inner {
    /// Whether `key` was durably accepted within the window.
    fn remembers(&self, key: u64) -> bool {
        self.current.ids.contains(&key) || self.sealed.iter().any(|g| g.ids.contains(&key))
    }

    /// A log offset before which every accepted record's id is settled: the log's end, or earlier
    /// if a reservation made at an earlier end is still in flight.
    fn safe_offset(&self, log_end: u64) -> u64 {
        self.in_flight
            .first()
            .map_or(log_end, |(end, _)| (*end).min(log_end))
    }

    fn len(&self) -> usize {
        self.current.ids.len() + self.sealed.iter().map(|g| g.ids.len()).sum::<usize>()
    }
}

/// The remembered ids at one moment, ready to be written away from the lock.
pub struct Snapshot {
    /// Every accepted record before this log offset is in the snapshot.
    pub offset: u64,
    generations: Vec<Arc<Generation>>,
}

const SNAPSHOT_MAGIC: &[u8; 8] = b"SLDEDUP1";

impl Snapshot {
    /// Writes the snapshot to `path` atomically and durably.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        let file = fs::File::create(&tmp)?;
        let mut w = CrcWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
        };
        w.write_all(SNAPSHOT_MAGIC)?;
        w.write_all(&self.offset.to_le_bytes())?;
        w.write_all(&(self.generations.len() as u32).to_le_bytes())?;
        for g in &self.generations {
            w.write_all(&g.first.to_le_bytes())?;
            w.write_all(&g.last.to_le_bytes())?;
            w.write_all(&(g.ids.len() as u64).to_le_bytes())?;
            for id in &g.ids {
                w.write_all(&id.to_le_bytes())?;
            }
        }
        let crc = w.crc.clone().finalize();
        let mut file = w.inner.into_inner().map_err(|e| e.into_error())?;
        file.write_all(&crc.to_le_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        crate::intake_log::segment::sync_dir(path.parent().unwrap_or(Path::new(".")))
    }

    fn decode(bytes: &[u8]) -> Option<Vec<Generation>> {
        let (body, crc) = bytes.split_at(bytes.len().checked_sub(4)?);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return None;
        }
        let mut r = body;
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).ok()?;
        if &magic != SNAPSHOT_MAGIC {
            return None;
        }
        let _offset = read_u64(&mut r)?;
        let count = u32::from_le_bytes(take(&mut r)?);
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let first = read_u64(&mut r)? as i64;
            let last = read_u64(&mut r)? as i64;
            let n = read_u64(&mut r)? as usize;
            if r.len() < n.checked_mul(8)? {
                return None;
            }
            let mut ids = IdSet::default();
            ids.reserve(n);
            for _ in 0..n {
                ids.insert(read_u64(&mut r)?);
            }
            out.push(Generation { first, last, ids });
        }
        Some(out)
    }
}

fn take<const N: usize>(r: &mut &[u8]) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).ok()?;
    Some(b)
}

fn read_u64(r: &mut &[u8]) -> Option<u64> {
    take::<8>(r).map(u64::from_le_bytes)
}

struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Where the snapshot lives.
pub fn snapshot_path(log_dir: &Path) -> PathBuf {
    log_dir.join("dedup.snapshot")
}

/// The log consumer name whose cursor is the snapshot's offset.
pub const CONSUMER: &str = "dedup";

/// Rebuilds the dedup state at start-up: the snapshot, then the log from the consumer's cursor.
pub fn recover(
    config: &DedupConfig,
    log: &IntakeLog,
    metrics: Arc<DedupMetrics>,
) -> io::Result<(Arc<Dedup>, Consumer)> {
    let dedup = Dedup::new(config, metrics);
    let path = snapshot_path(log.dir());
    if let Err(e) = dedup.load(&path) {
        // Losing dedup memory means a retried message may be stored twice; never losing one.
        tracing::error!(error = %e, "ignoring the dedup snapshot; duplicates sent before now may be accepted again");
    }
    let mut consumer = log.consumer(CONSUMER)?;
    let mut replayed = 0u64;
    loop {
        let records = consumer
            .read(4096)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if records.is_empty() {
            break;
        }
        for record in &records {
            match Entry::decode(&record.payload) {
                Ok(e) if e.status == Status::Accepted && !e.message_id.is_empty() => {
                    dedup.replay(key(e.source, e.message_id), e.received_at_micros);
                    replayed += 1;
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(offset = record.offset, error = %err, "skipping a log record while rebuilding dedup")
                }
            }
        }
    }
    dedup.expire(
        &mut dedup.inner.lock().unwrap(),
        Utc::now().timestamp_micros(),
    );
    tracing::info!(ids = dedup.len(), replayed, "dedup state recovered");
    Ok((Arc::new(dedup), consumer))
}

/// Writes a snapshot when something changed, then moves the `dedup` cursor to it.
pub fn checkpoint(dedup: &Dedup, log: &IntakeLog, consumer: &mut Consumer) -> io::Result<()> {
    let Some(snapshot) = dedup.snapshot(log.end()) else {
        // Nothing new remembered; still let the cursor follow the log so it can be trimmed.
        let offset = dedup.inner.lock().unwrap().safe_offset(log.end());
        return consumer.commit(offset.max(consumer.committed()));
    };
    snapshot.write(&snapshot_path(log.dir()))?;
    consumer.commit(snapshot.offset.max(consumer.committed()))
}

/// How often [`checkpoint`] runs while serving.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);

/// The thread that writes a checkpoint every [`CHECKPOINT_EVERY`].
pub struct Checkpoints {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<io::Result<()>>,
}

impl Checkpoints {
    pub fn start(
        dedup: Arc<Dedup>,
        log: Arc<IntakeLog>,
        mut consumer: Consumer,
    ) -> io::Result<Self> {
        let (stop, stopped) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sluice-dedup-checkpoints".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = checkpoint(&dedup, &log, &mut consumer) {
                        tracing::error!(error = %e, "dedup checkpoint failed; will retry");
                    }
                }
                checkpoint(&dedup, &log, &mut consumer)
            })?;
        Ok(Checkpoints { stop, thread })
    }

    /// Stops the loop after one last checkpoint; call once nothing appends any more.
    pub fn finish(self) -> io::Result<()> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .map_err(|_| io::Error::other("the dedup checkpoint thread panicked"))?
    }
}

#[cfg(test)]
mod tests;
