//! Deduplication by (source, messageId) within a time window (`dedup.window`, 24 h by default),
//! kept across restarts, with memory that stays small however many ids the window holds.
//!
//! ## Where an id is
//! - **recent**: ids accepted since the last checkpoint, in memory, exact;
//! - **runs** ([`runs`]): files of sorted 128-bit keys on disk, written at each checkpoint (every
//!   30 s, or sooner once [`SEAL_AT`] ids have come), with every 256th key in memory;
//! - **the filter** ([`filter`]): 1.5 bytes for each id held in runs (1.6–1.9 bytes with its
//!   free room). A hit only says "maybe": it is confirmed by reading one 4 KB block of a run,
//!   newest run first. About one lookup in 500 meets a false hit.
//!
//! A run is deleted, and its ids taken out of the filter, once its newest id is older than the
//! window. Runs of the same twenty-fourth of the window are merged once eight of them are there, so
//! a confirmation reads at most a few dozen files. `dedup.max_ids` caps the ids held: past it, the
//! oldest runs go before their time, counted in `sluice_dedup_evicted_total`. At 2,000 msg/s for
//! 24 h (172.8 M ids) the filter takes about 300 MB and the runs 2.8 GB of disk.
//!
//! ## Reservations
//! An id is *reserved* while its append is in flight and becomes remembered only once the append
//! is durable; a failed append forgets it, so the client's retry is not mistaken for a duplicate.
//! A copy that arrives while the original is in flight waits for the original's outcome: it is a
//! duplicate only if the original became durable (answering it at once could acknowledge a
//! message that is then lost). A request reserves all of its ids or none: it waits holding
//! nothing, so two requests can never wait for each other.
//!
//! ## Across restarts
//! Runs are durable when written. The `dedup` log consumer's cursor is the offset before which
//! every accepted record's id is in a run: no later than the log's end when any still-unsettled
//! reservation was made (that request's records can only come after). Start-up opens the runs
//! (reading each whole, to check it and to fill the filter: a few seconds per 100 M ids) and
//! replays the log from that cursor into recent.

mod filter;
pub mod runs;

use std::collections::BTreeSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::{Consumer, IntakeLog};
use crate::config::DedupConfig;
use crate::entry::{Entry, Status};
use crate::metrics::DedupMetrics;
use filter::{shard_of, shard_range, Filter, Shard, SHARDS};
use runs::Run;

/// The dedup key of a message: 128 bits, so that two ids of a window never share one.
pub fn key(source: &str, message_id: &str) -> u128 {
    key_in(0xff, source, message_id)
}

/// A key in the space `separator` names (a byte no UTF-8 text holds: `0xfe` or `0xff`), so that
/// keys of two spaces never meet.
pub fn key_in(separator: u8, source: &str, message_id: &str) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(source.as_bytes());
    h.update(&[separator]);
    h.update(message_id.as_bytes());
    h.digest128()
}

/// Recent ids that make the checkpoint come early.
pub const SEAL_AT: usize = 500_000;
/// How often a checkpoint runs while serving.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);
/// Ids a new filter has room for; it grows with what it holds.
const FIRST_CAPACITY: usize = 1 << 20;
/// A shard grows (is rebuilt from the runs) past this load, to [`GROWN_LOAD`].
const MAX_LOAD: f64 = 0.92;
const GROWN_LOAD: f64 = 0.78;
/// Runs of one twenty-fourth of the window are merged once there are this many.
const MERGE_AT: usize = 8;

/// Keys are already hashes; hashing them again would only cost time.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u128 keys are hashed")
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

type IdSet = hashbrown::HashSet<u128, BuildHasherDefault<PassThrough>>;

/// Ids remembered in memory, with the receive times (µs) of the oldest and newest.
#[derive(Default)]
struct Recent {
    ids: IdSet,
    first: i64,
    last: i64,
}

struct Inner {
    recent: Recent,
    /// Being written to a run: still looked up here until its run is in the filter.
    sealing: Option<Arc<Recent>>,
    /// Oldest first.
    runs: Vec<Arc<Run>>,
    filter: Filter,
    /// Ids in flight, each with the ticket of the reservation that holds it.
    reserved: hashbrown::HashMap<u128, u64, BuildHasherDefault<PassThrough>>,
    /// The outcome of each reservation in flight, by ticket: `true` once settled.
    outcomes: hashbrown::HashMap<u64, watch::Receiver<bool>>,
    /// Unsettled reservations: (log end when made, ticket).
    in_flight: BTreeSet<(u64, u64)>,
    next_ticket: u64,
    /// The number the next run gets.
    next_run: u64,
}

pub struct Dedup {
    inner: Mutex<Inner>,
    /// Where the runs are.
    dir: PathBuf,
    window_micros: i64,
    max_ids: usize,
    metrics: Arc<DedupMetrics>,
    /// Wakes the checkpoint thread when recent ids pile up.
    nudge: Mutex<Option<SyncSender<()>>>,
}

/// Ids held for one request while its append is in flight. Dropping it unsettled counts as a
/// failed append.
pub struct Reservation<'a> {
    dedup: &'a Dedup,
    ticket: u64,
    log_end: u64,
    keys: Vec<u128>,
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
    /// An empty dedup whose runs go to `dir`.
    pub fn new(config: &DedupConfig, dir: PathBuf, metrics: Arc<DedupMetrics>) -> Self {
        Dedup {
            inner: Mutex::new(Inner {
                recent: Recent::default(),
                sealing: None,
                runs: Vec::new(),
                filter: Filter::with_capacity(FIRST_CAPACITY),
                reserved: Default::default(),
                outcomes: Default::default(),
                in_flight: BTreeSet::new(),
                next_ticket: 0,
                next_run: 0,
            }),
            dir,
            window_micros: i64::try_from(config.window.as_micros()).unwrap_or(i64::MAX),
            max_ids: config.max_ids.max(8),
            metrics,
            nudge: Mutex::new(None),
        }
    }

    /// Marks which of `keys` are duplicates (`None` keys never are) and reserves the others. When
    /// some are in flight in another request, waits (holding nothing) until that one is settled,
    /// then looks again. `log_end` gives the log's committed end.
    pub async fn reserve(
        &self,
        keys: &[Option<u128>],
        log_end: impl Fn() -> u64,
    ) -> (Reservation<'_>, Vec<bool>) {
        loop {
            match self.try_reserve(keys, log_end()) {
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
        keys: &[Option<u128>],
        log_end: u64,
    ) -> Result<(Reservation<'_>, Vec<bool>), watch::Receiver<bool>> {
        let mut inner = self.inner.lock().unwrap();
        let inner = &mut *inner;
        let ticket = inner.next_ticket;
        let mut duplicate = Vec::with_capacity(keys.len());
        let mut reserved = Vec::with_capacity(keys.len());
        for key in keys {
            let dup = match key {
                None => false,
                Some(k) => match inner.reserved.get(k) {
                    // A second copy in this request.
                    Some(t) if *t == ticket => true,
                    Some(t) => {
                        // Another request's: hold nothing while waiting for it.
                        let outcome = inner.outcomes[t].clone();
                        for k in &reserved {
                            inner.reserved.remove(k);
                        }
                        return Err(outcome);
                    }
                    None if self.remembers(inner, *k) => true,
                    None => {
                        inner.reserved.insert(*k, ticket);
                        reserved.push(*k);
                        false
                    }
                },
            };
            duplicate.push(dup);
        }
        let (outcome, waiting) = watch::channel(false);
        inner.outcomes.insert(ticket, waiting);
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

    /// Whether `key` was durably accepted within the window (or a little longer: a run goes whole).
    fn remembers(&self, inner: &Inner, key: u128) -> bool {
        if inner.recent.ids.contains(&key)
            || inner.sealing.as_ref().is_some_and(|s| s.ids.contains(&key))
        {
            return true;
        }
        if !inner.filter.contains(key) {
            return false;
        }
        self.metrics.disk_checks.inc();
        inner.runs.iter().rev().any(|run| {
            run.contains(key).unwrap_or_else(|e| {
                // Not knowing means storing a message twice, never losing one.
                tracing::error!(run = %run.path.display(), error = %e, "reading a dedup run failed; the id counts as new");
                false
            })
        })
    }

    fn settle(&self, r: &Reservation, committed_at: Option<i64>) {
        let mut inner = self.inner.lock().unwrap();
        inner.in_flight.remove(&(r.log_end, r.ticket));
        inner.outcomes.remove(&r.ticket);
        for k in &r.keys {
            inner.reserved.remove(k);
        }
        if let Some(at) = committed_at {
            for k in &r.keys {
                remember(&mut inner.recent, *k, at);
            }
            if inner.recent.ids.len() >= SEAL_AT {
                if let Some(nudge) = self.nudge.lock().unwrap().as_ref() {
                    let _ = nudge.try_send(());
                }
            }
        }
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        let inner = self.inner.lock().unwrap();
        inner.recent.ids.len()
            + inner.sealing.as_ref().map_or(0, |s| s.ids.len())
            + inner.filter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of memory it holds: the filter, the runs' indexes, and recent ids.
    pub fn memory(&self) -> usize {
        let inner = self.inner.lock().unwrap();
        let set = |ids: &IdSet| ids.capacity() * 17;
        inner.filter.bytes()
            + inner.runs.iter().map(|r| r.index_bytes()).sum::<usize>()
            + set(&inner.recent.ids)
            + inner.sealing.as_ref().map_or(0, |s| set(&s.ids))
    }

    /// Writes recent ids to a run, takes expired runs out, merges small ones; returns the log
    /// offset before which every accepted record's id is now in a run.
    pub fn checkpoint(&self, log_end: u64, now: DateTime<Utc>) -> io::Result<u64> {
        let (sealing, offset, number) = {
            let mut inner = self.inner.lock().unwrap();
            let offset = inner.safe_offset(log_end);
            if inner.recent.ids.is_empty() {
                (None, offset, 0)
            } else {
                let recent = Arc::new(std::mem::take(&mut inner.recent));
                inner.sealing = Some(recent.clone());
                inner.next_run += 1;
                (Some(recent), offset, inner.next_run - 1)
            }
        };
        if let Some(recent) = sealing {
            if let Err(e) = self.seal(&recent, number) {
                // Back to recent: the next checkpoint tries again; the cursor stays.
                let mut inner = self.inner.lock().unwrap();
                inner.sealing = None;
                let back = &mut inner.recent;
                back.first = match back.ids.is_empty() {
                    true => recent.first,
                    false => back.first.min(recent.first),
                };
                back.last = back.last.max(recent.last);
                back.ids.extend(recent.ids.iter().copied());
                return Err(e);
            }
        }
        self.expire(now.timestamp_micros())?;
        self.merge()?;
        Ok(offset)
    }

    /// Writes `recent` as run `number` and puts its ids in the filter.
    fn seal(&self, recent: &Recent, number: u64) -> io::Result<()> {
        let mut keys: Vec<u128> = recent.ids.iter().copied().collect();
        keys.sort_unstable();
        let run = Arc::new(runs::write(
            &self.dir,
            (number, number),
            (recent.first, recent.last),
            keys.len() as u64,
            keys.iter().map(|k| Ok(*k)),
        )?);
        let mut incoming = [0usize; SHARDS];
        for k in &keys {
            incoming[shard_of(*k)] += 1;
        }
        let full: Vec<usize> = {
            let mut inner = self.inner.lock().unwrap();
            inner.runs.push(run);
            (0..SHARDS)
                .filter(|&s| {
                    let shard = &inner.filter.shards[s];
                    (shard.len() + incoming[s]) as f64 > shard.capacity() as f64 * MAX_LOAD
                })
                .collect()
        };
        // A shard that would be too full is built again, bigger, from the runs (this one with
        // them); the others take the new ids, a chunk at a time so that lookups wait little.
        for &s in &full {
            self.rebuild(s)?;
        }
        let mut failed = Vec::new();
        for chunk in keys.chunks(50_000) {
            let mut inner = self.inner.lock().unwrap();
            for k in chunk {
                let s = shard_of(*k);
                if !full.contains(&s) && !failed.contains(&s) && !inner.filter.shards[s].insert(*k)
                {
                    failed.push(s);
                }
            }
        }
        for s in failed {
            self.rebuild(s)?;
        }
        self.inner.lock().unwrap().sealing = None;
        Ok(())
    }

    /// Builds shard `s` again from the runs, with room to spare, and puts it in place. Only the
    /// checkpoint thread changes the runs and the filter, so they hold still meanwhile.
    fn rebuild(&self, s: usize) -> io::Result<()> {
        let runs: Vec<Arc<Run>> = self.inner.lock().unwrap().runs.clone();
        let (start, end) = shard_range(s);
        let mut keys = Vec::new();
        for run in &runs {
            run.each_in(start, end, |k| keys.push(k))?;
        }
        let mut capacity = ((keys.len() as f64 / GROWN_LOAD) as usize).max(FIRST_CAPACITY / SHARDS);
        let shard = loop {
            let mut shard = Shard::with_capacity(capacity);
            if keys.iter().all(|k| shard.insert(*k)) {
                break shard;
            }
            capacity += capacity / 2;
        };
        tracing::debug!(
            shard = s,
            ids = keys.len(),
            capacity,
            "dedup filter shard rebuilt"
        );
        self.inner.lock().unwrap().filter.shards[s] = shard;
        Ok(())
    }

    /// Takes out the oldest runs: those past the window, and more while over `max_ids`.
    fn expire(&self, now: i64) -> io::Result<()> {
        let horizon = now.saturating_sub(self.window_micros);
        loop {
            let (run, early) = {
                let mut inner = self.inner.lock().unwrap();
                let held = inner.filter.len();
                let early = match inner.runs.first() {
                    Some(r) if r.last < horizon => false,
                    Some(_) if held > self.max_ids && inner.runs.len() > 1 => true,
                    _ => return Ok(()),
                };
                // From now on no lookup confirms on it.
                (inner.runs.remove(0), early)
            };
            for s in 0..SHARDS {
                let (start, end) = shard_range(s);
                let mut keys = Vec::new();
                run.each_in(start, end, |k| keys.push(k))?;
                let mut inner = self.inner.lock().unwrap();
                for k in keys {
                    inner.filter.shards[s].remove(k);
                }
            }
            std::fs::remove_file(&run.path)?;
            if early {
                self.metrics.evicted.inc_by(run.count);
                tracing::warn!(
                    ids = run.count,
                    max_ids = self.max_ids,
                    "dedup forgot ids before their window ended: raise dedup.max_ids"
                );
            }
        }
    }

    /// Merges the runs of one twenty-fourth of the window once there are [`MERGE_AT`] of them.
    fn merge(&self) -> io::Result<()> {
        let span = (self.window_micros / 24).max(1);
        let group: Vec<Arc<Run>> = {
            let inner = self.inner.lock().unwrap();
            let mut group: Vec<Arc<Run>> = Vec::new();
            for run in &inner.runs {
                match group.first() {
                    Some(head) if head.first / span == run.first / span => group.push(run.clone()),
                    _ if group.len() >= MERGE_AT => break,
                    _ => group = vec![run.clone()],
                }
            }
            if group.len() < MERGE_AT {
                return Ok(());
            }
            group
        };
        let parts: Vec<&Run> = group.iter().map(|r| r.as_ref()).collect();
        let merged = Arc::new(runs::merge(&self.dir, &parts)?);
        {
            let mut inner = self.inner.lock().unwrap();
            let at = inner
                .runs
                .iter()
                .position(|r| Arc::ptr_eq(r, &group[0]))
                .expect("only this thread takes runs out");
            inner.runs.splice(at..at + group.len(), [merged]);
        }
        for run in group {
            std::fs::remove_file(&run.path)?;
        }
        Ok(())
    }

    /// Puts `runs` (opened at start-up) in place and fills the filter from them.
    fn install(&self, runs: Vec<Run>) -> io::Result<()> {
        {
            let mut inner = self.inner.lock().unwrap();
            inner.next_run = runs.iter().map(|r| r.hi + 1).max().unwrap_or(0);
            inner.runs = runs.into_iter().map(Arc::new).collect();
        }
        for s in 0..SHARDS {
            self.rebuild(s)?;
        }
        Ok(())
    }

    /// Remembers an id read back from the log at start-up, unless a run already holds it.
    fn replay(&self, key: u128, at: i64) {
        let mut inner = self.inner.lock().unwrap();
        if !self.remembers(&inner, key) {
            remember(&mut inner.recent, key, at);
        }
    }
}

fn remember(recent: &mut Recent, key: u128, at: i64) {
    if recent.ids.is_empty() {
        recent.first = at;
    }
    recent.first = recent.first.min(at);
    recent.last = recent.last.max(at);
    recent.ids.insert(key);
}

impl Inner {
    /// A log offset before which every accepted record's id is settled: the log's end, or earlier
    /// if a reservation made at an earlier end is still in flight.
    fn safe_offset(&self, log_end: u64) -> u64 {
        self.in_flight
            .first()
            .map_or(log_end, |(end, _)| (*end).min(log_end))
    }
}

/// The log consumer name whose cursor is where the runs end.
pub const CONSUMER: &str = "dedup";

/// Rebuilds the dedup state at start-up: the runs, then the log from the consumer's cursor.
pub fn recover(
    config: &DedupConfig,
    log: &IntakeLog,
    metrics: Arc<DedupMetrics>,
) -> io::Result<(Arc<Dedup>, Consumer)> {
    let dir = runs::dir(log.dir());
    let dedup = Dedup::new(config, dir.clone(), metrics);
    // Before 128-bit keys and runs, the ids were in one snapshot of 64-bit keys.
    let old = log.dir().join("dedup.snapshot");
    if old.exists() {
        tracing::warn!("the dedup snapshot of an older version is not read: ids it held may be accepted again once");
        std::fs::remove_file(&old)?;
    }
    let started = std::time::Instant::now();
    let runs = runs::open_all(&dir).or_else(|e| {
        // Losing dedup memory means a retried message may be stored twice; never losing one.
        tracing::error!(error = %e, dir = %dir.display(), "ignoring the dedup runs; duplicates sent before now may be accepted again");
        let aside = dir.with_extension(format!("unreadable-{}", Utc::now().timestamp()));
        std::fs::rename(&dir, &aside)?;
        Ok::<_, io::Error>(Vec::new())
    })?;
    dedup.install(runs)?;
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
    tracing::info!(ids = dedup.len(), replayed, took = ?started.elapsed(), "dedup state recovered");
    Ok((Arc::new(dedup), consumer))
}

/// Runs a checkpoint, then moves the `dedup` cursor to where the runs end.
pub fn checkpoint(dedup: &Dedup, log: &IntakeLog, consumer: &mut Consumer) -> io::Result<()> {
    let offset = dedup.checkpoint(log.end(), Utc::now())?;
    consumer.commit(offset.max(consumer.committed()))
}

/// The thread that runs a checkpoint every [`CHECKPOINT_EVERY`], or sooner when recent ids pile
/// up.
pub struct Checkpoints {
    stop: Arc<AtomicBool>,
    wake: SyncSender<()>,
    thread: std::thread::JoinHandle<io::Result<()>>,
}

impl Checkpoints {
    pub fn start(
        dedup: Arc<Dedup>,
        log: Arc<IntakeLog>,
        mut consumer: Consumer,
    ) -> io::Result<Self> {
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        *dedup.nudge.lock().unwrap() = Some(wake.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("sluice-dedup-checkpoints".into())
                .spawn(move || {
                    while let Ok(()) | Err(RecvTimeoutError::Timeout) =
                        woken.recv_timeout(CHECKPOINT_EVERY)
                    {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Err(e) = checkpoint(&dedup, &log, &mut consumer) {
                            tracing::error!(error = %e, "dedup checkpoint failed; will retry");
                        }
                    }
                    checkpoint(&dedup, &log, &mut consumer)
                })?
        };
        Ok(Checkpoints { stop, wake, thread })
    }

    /// Stops the loop after one last checkpoint; call once nothing appends any more.
    pub fn finish(self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.try_send(());
        self.thread
            .join()
            .map_err(|_| io::Error::other("the dedup checkpoint thread panicked"))?
    }
}

#[cfg(test)]
mod tests;
