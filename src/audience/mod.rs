//! The profile stage: a consumer of the intake log that keeps every profile current, evaluates
//! the segments each message can affect, wakes profiles whose time conditions come due, backfills
//! new or edited segments, and appends the resulting `Audience Entered` / `Audience Exited`
//! messages to the intake log (from where they reach the lake and destinations like any message).
//!
//! ## Batches, saves, exactly once
//! The stage works in batches: read up to [`BATCH`] records and apply each to its profile and
//! evaluate (waking, before each, the timers its arrival passes), then advance any backfill.
//! A backfill whose segments need history the profiles never kept first reads it back from the
//! lake ([`history`]), in a step of its own. The messages a batch emits are
//! appended to the log (durably) at the end of the batch, and every [`EMIT_EVERY`] within a
//! long one, so their delay is at most that much of a batch.
//!
//! The stage writes nothing to the profile store itself. Once every `profiles.save_interval`, or
//! sooner when the profiles changed since the last save fill the cache or when no message has
//! come for a second ([`QUIET`]), it hands a save to the [`saver`] thread: every changed profile
//! (shared, not copied), its memberships (the members index) and its timer, the identities
//! linked, the profiles merged away, and the log offset reached. The saver writes it all in one
//! transaction and commits it, durably, while the stage goes on with the next batches; one save
//! is in flight at a time. Changed profiles are written once per save however many messages
//! they took: redb copies a B-tree page for each write in a transaction, so writing per batch
//! cost a page copy per message.
//!
//! Meanwhile the stage reads the store as of the last save committed ([`Stage::read`]; redb
//! reads a snapshot) with in-memory overlays for what is newer: profiles changed since stay in
//! the cache until a committed save holds them, links stay in the identity map, profiles merged
//! away are in [`Stage::deleted`], and the timers of changed profiles are in [`Stage::timers`]
//! (due timers are read from both, skipping the store's entries for changed profiles).
//!
//! A crash (or a failed save) loses what was not saved, and the stage redoes it from the log:
//! the same records on the same state emit the same changes with the same messageIds
//! (evaluation depends only on the log, see below), and those the log already holds are not
//! appended again: the stage reads the messageIds of its own records past the saved offset
//! before it redoes anything, so this holds however long ago they were appended, beyond the
//! dedup's window. What the redo cannot repeat exactly (the segments loaded may have changed
//! since, a backfill may run in another order) it takes from the log: reading its own earlier
//! changes back, it brings a membership that is behind up to them and evaluates again
//! (`Batch::reconcile`). Nothing is emitted twice, and nothing is lost. The log's cursor for this stage only advances when a save commits, so the log
//! keeps what a redo needs. Readers of the store (the admin API) see it as of the last save
//! committed.
//!
//! Messages from the reserved source `sluice` (our own emissions) are not applied to profiles:
//! memberships are already on the profile.
//!
//! ## The stage's time
//! Rules and timers are evaluated at the stage's time, which is read from the log alone: the
//! latest arrival (`receivedAt`) of the records read so far. Before a record is applied, time
//! passes to its arrival, and every timer due by then is woken (at that time). When the stage has
//! read everything and a timer comes due by the clock, it appends a clock record
//! ([`Status::Clock`]: the clock's reading, no message) and wakes the timer when it reads that
//! record back. So a redo, reading the same records, evaluates at the same times and wakes the
//! same timers between the same records as the first run did; evaluated at the clock's time, it
//! emitted other changes, and the change counters went apart from what the log held. Time passes
//! in the order the messages arrived, too: a window does not close on a profile whose next
//! message is already in the log, unread (a stage catching up would emit an exit and then the
//! entry again for every such profile). The time is saved with the offset. The stage's own
//! records (emitted changes) do not move it: they arrive at the clock's time, which is ahead of a
//! stage catching up.
//!
//! This module owns the loop and the bookkeeping (timers, the members index, segment sizes); the
//! profile is `crate::profiles`, the rules are `crate::segments`.

mod cache;
pub mod emit;
pub mod history;
mod saver;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::clock::Clock;
use crate::entry::{Entry, Status};
use crate::ingest::dedup::{self, Dedup};
use crate::ingest::message::{JsonStr, MessageType};
use crate::intake_log::{AppendError, IntakeLog, LogReader, RecordBatch};
use crate::metrics::{
    CapLabels, Capped, Cause, CauseLabels, Direction, FailureClass, PauseLabels, RuleFailureLabels,
    SavePause, SegmentChangeLabels, SegmentLabels, SegmentMetrics,
};
use crate::profiles::identity::{self, Directory, Identifiers};
use crate::profiles::profile::{
    anonymous_key, event_name, user_key, Dropped, Millis, Name, Names, Observed, Profile, Retention,
};
use crate::profiles::store::{ProfileStore, Reader, StoreError};
use crate::query::{QueryEngine, QueryError};
use crate::segments::api::Message;
use crate::segments::rules::{RuleFailure, SegmentSet, Trigger};
use crate::supervisor::{supervise, Health};
use cache::{membership_changes, Cache, Held};
use emit::Emission;
pub use emit::SOURCE;
use saver::{Save, Saver, Writes};

/// The intake-log consumer name; its cursor only holds back log retention: the offset that
/// counts is the one committed in the profile store.
pub const CONSUMER: &str = "profiles";
/// Records read per batch.
pub const BATCH: usize = 2_000;
/// Profiles backfilled per batch, so that a backfill never holds up real-time evaluation long.
const BACKFILL_CHUNK: usize = 1_000;
/// History is read back from the lake for a backfill only while the stage is at most this many
/// records behind the log's end (they are listed, to leave their rows out).
const MAX_AHEAD: u64 = 200_000;
const DAY: Millis = 86_400_000;
/// Due timers handled per batch.
const TIMER_CHUNK: usize = 2_000;
/// A batch that runs longer than this (the stage behind, a burst of timers) appends what it has
/// emitted so far before going on: a change's delay includes the rest of its batch.
const EMIT_EVERY: Duration = Duration::from_millis(10);
/// Failed batches in a row that the stage redoes itself before it gives up to its supervisor.
const MAX_REDOS: u32 = 5;
/// How long the loop sleeps at most when there is nothing to do.
const IDLE: Duration = Duration::from_millis(100);
/// A clock record is appended at most this often (in the stage's time): a timer is woken up to
/// this late when no message comes.
const TICK: Millis = 50;
/// After this long with nothing to do, what is pending is saved without waiting for
/// `profiles.save_interval`: the interval spaces saves out under load, and a quiet store need
/// not stay behind for it.
const QUIET: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("appending emitted messages: {0}")]
    Append(#[from] AppendError),
    #[error(transparent)]
    Read(#[from] crate::intake_log::ReadError),
    #[error("intake log cursor: {0}")]
    Cursor(#[from] std::io::Error),
    #[error("starting the profile saver: {0}")]
    Saver(std::io::Error),
}

/// The segment set in force, for the admin API.
pub struct LiveSegments(RwLock<Arc<SegmentSet>>);

impl LiveSegments {
    pub fn new(set: Arc<SegmentSet>) -> Self {
        LiveSegments(RwLock::new(set))
    }

    pub fn current(&self) -> Arc<SegmentSet> {
        self.0.read().unwrap().clone()
    }

    fn replace(&self, set: Arc<SegmentSet>) {
        *self.0.write().unwrap() = set;
    }
}

#[derive(Clone)]
pub struct Parts {
    pub store: Arc<ProfileStore>,
    pub log: Arc<IntakeLog>,
    pub dedup: Arc<Dedup>,
    pub metrics: Arc<SegmentMetrics>,
    pub clock: Clock,
    pub runtime: tokio::runtime::Handle,
    /// Profiles kept decoded in memory between batches, at most, and their (estimated) bytes.
    pub cache_size: usize,
    pub cache_memory: usize,
    /// How often the store saves (commits, durably) what the stage has done.
    pub save_every: Duration,
    /// The lake, to read back history a backfill needs.
    pub lake: Option<QueryEngine>,
    /// The stage's supervisor: failures are counted there, and records it keeps failing on are
    /// set aside (to the quarantine, through the log).
    pub health: Arc<Health>,
}

/// The running stage.
pub struct AudienceHandle {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl AudienceHandle {
    /// Starts the stage with `set`; later sets arrive on `sets`. A stage that fails is started
    /// again from the store (see `crate::supervisor`).
    pub fn start(
        parts: Parts,
        set: Arc<SegmentSet>,
        sets: std::sync::mpsc::Receiver<Arc<SegmentSet>>,
        live: Arc<LiveSegments>,
    ) -> Result<AudienceHandle, StageError> {
        let consumer = parts.log.consumer(CONSUMER)?;
        let stop = Arc::new(AtomicBool::new(false));
        // Started here the first time, so that a store that cannot be read fails the start.
        let mut first = Stage::new(parts.clone(), consumer.reopen()?, live.clone())?;
        first.install(set)?;
        let mut first = Some(first);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("sluice-profiles".into())
                .spawn(move || {
                    // Ingestion wins the core when both want it: this stage catches up from the
                    // log afterwards, and nothing it does is on a client's path.
                    crate::thread_priority::lower();
                    let health = parts.health.clone();
                    supervise(
                        &health,
                        || stop.load(Ordering::Relaxed),
                        || {
                            let stage = match first.take() {
                                Some(stage) => stage,
                                None => {
                                    let consumer = consumer.reopen()?;
                                    let mut stage =
                                        Stage::new(parts.clone(), consumer, live.clone())?;
                                    stage.install(live.current())?;
                                    stage
                                }
                            };
                            stage.run(&stop, &sets)
                        },
                    );
                })?
        };
        Ok(AudienceHandle { stop, thread })
    }

    /// Finishes the batch in progress and stops.
    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// A record of the log the supervisor set aside: the stage kept failing on it.
struct SetAside {
    offset: u64,
    payload: Vec<u8>,
    reason: String,
}

/// A profile merged away, with what the store (once the last save handed off commits) and the
/// stage's timers hold for it.
struct Removed {
    id: u64,
    stored_members: BTreeSet<Name>,
    stored_recheck: Option<Millis>,
}

struct Backfill {
    segments: HashSet<usize>,
    after: Option<u64>,
    /// History to read back from the lake before the first chunk, if the segments need any (and
    /// the stage has a lake).
    fill: Option<Retention>,
    /// Failed reads of the lake so far, and when to try again.
    fill_failures: u32,
    retry_at: Option<Instant>,
}

/// The save handed to the saver and not committed yet.
struct InFlight {
    /// Its number (see `Held::saved_in`).
    number: u64,
    deletes: Vec<u64>,
}

struct Stage {
    store: Arc<ProfileStore>,
    /// The store as of the last save committed.
    read: Reader,
    saver: Saver,
    log: Arc<IntakeLog>,
    dedup: Arc<Dedup>,
    metrics: Arc<SegmentMetrics>,
    health: Arc<Health>,
    /// Records the supervisor set aside, to be filed in the quarantine with the batch's emissions.
    set_aside: Vec<SetAside>,
    clock: Clock,
    runtime: tokio::runtime::Handle,
    lake: Option<QueryEngine>,
    reader: LogReader,
    live: Arc<LiveSegments>,
    set: Arc<SegmentSet>,
    cache: Cache,
    /// Profiles touched in the batch in progress (in the cache).
    touched: Vec<u64>,
    /// Profiles changed since the last save handed off (in the cache, unless merged away).
    unsaved: Vec<u64>,
    /// What the next save writes besides the profiles.
    writes: Writes,
    in_flight: Option<InFlight>,
    /// The number of the last save handed off, and of the last one committed.
    handed: u64,
    committed: u64,
    /// Profiles merged away whose deletion is not committed yet: `read` may still have them.
    deleted: HashSet<u64>,
    /// The identity index as far as it was read or written: this stage is its only writer.
    /// hashbrown's hasher for the same reason as the cache's. It holds every link not committed
    /// yet: it is trimmed only right after a save committed, and keeps the links made since the
    /// last hand-off. Keyed by [`identity_hash`], not by the identifier: a lookup compares 16
    /// bytes in place rather than following a pointer to the string, and an entry is 32 bytes.
    identities: hashbrown::HashMap<u128, u64>,
    /// Identities kept in memory, at most.
    max_identities: usize,
    /// Profiles merged away in this batch, with what the store and the stage's timers hold for
    /// them.
    removed: Vec<Removed>,
    next_id: u64,
    /// Profiles in the store (kept in `meta`, as counting a table is not free).
    profiles: u64,
    offset: u64,
    backfill: Option<Backfill>,
    /// The timers of the profiles changed since the last save committed, (due, profile): the
    /// store's are as of that save.
    timers: BTreeSet<(Millis, u64)>,
    /// The last store timer read since the last save committed: those up to it were woken, or
    /// belong to changed profiles (whose timers are in `timers`).
    timer_cursor: Option<(Millis, u64)>,
    /// The store's first timer past `timer_cursor`, once read (`None`: not read since the cursor
    /// or the store moved).
    next_stored_due: Option<Option<Millis>>,
    /// The messageIds of the stage's own records in the log past the saved offset, up to
    /// `own_ahead_until`: a redo appends none of them again.
    own_ahead: HashSet<String>,
    own_ahead_until: u64,
    emissions: Vec<Emission>,
    /// The log offset of the last save handed off.
    saved_offset: u64,
    /// When the last save was handed off.
    last_saved: Instant,
    /// When the last batch with anything to do ended.
    last_busy: Instant,
    save_every: Duration,
    last_conflict_log: Option<Instant>,
    /// The stage's time (see "The stage's time" above): it never goes back.
    time: Millis,
    /// Whether the next step appends a clock record first (for a backfill).
    clock_wanted: bool,
}

impl Stage {
    fn new(
        parts: Parts,
        consumer: crate::intake_log::Consumer,
        live: Arc<LiveSegments>,
    ) -> Result<Stage, StageError> {
        let read = parts.store.read()?;
        let offset = read.meta("offset")?.unwrap_or(consumer.committed());
        let next_id = read.meta("next_id")?.unwrap_or(1);
        let time = read.meta("time")?.map_or(0, |t| t as Millis);
        let profiles = read.meta("profiles")?.unwrap_or(0);
        parts.metrics.profiles.set(profiles as i64);
        let saver = Saver::start(parts.store.clone(), parts.metrics.clone(), consumer)
            .map_err(StageError::Saver)?;
        let set = live.current();
        let mut stage = Stage {
            reader: parts.log.reader(offset),
            store: parts.store,
            read,
            saver,
            log: parts.log,
            dedup: parts.dedup,
            metrics: parts.metrics,
            health: parts.health,
            set_aside: Vec::new(),
            clock: parts.clock,
            runtime: parts.runtime,
            lake: parts.lake,
            live,
            set,
            cache: Cache::new(parts.cache_size, parts.cache_memory),
            touched: Vec::new(),
            unsaved: Vec::new(),
            writes: Writes::default(),
            in_flight: None,
            handed: 0,
            committed: 0,
            deleted: HashSet::new(),
            identities: hashbrown::HashMap::new(),
            max_identities: parts.cache_size.max(1) * 2,
            removed: Vec::new(),
            next_id,
            profiles,
            offset,
            backfill: None,
            timers: BTreeSet::new(),
            timer_cursor: None,
            next_stored_due: None,
            own_ahead: HashSet::new(),
            own_ahead_until: offset,
            emissions: Vec::new(),
            saved_offset: offset,
            last_saved: Instant::now(),
            last_busy: Instant::now(),
            save_every: parts.save_every,
            last_conflict_log: None,
            time,
            clock_wanted: false,
        };
        stage.read_own_ahead()?;
        Ok(stage)
    }

    /// Notes the messageIds of the stage's own records between the saved offset and the log's
    /// end: what a redo emits again is already there.
    fn read_own_ahead(&mut self) -> Result<(), StageError> {
        self.own_ahead.clear();
        let mut reader = self.log.reader(self.offset);
        loop {
            let records = reader.read(BATCH)?;
            if records.is_empty() {
                break;
            }
            for record in &records {
                match Entry::decode(&record.payload) {
                    Ok(e) if e.source == SOURCE && !e.message_id.is_empty() => {
                        self.own_ahead.insert(e.message_id.to_string());
                    }
                    _ => {}
                }
            }
        }
        self.own_ahead_until = reader.position();
        Ok(())
    }

    /// The stage's time, as a date.
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.time).unwrap_or_default()
    }

    /// Puts `set` in force and plans the backfill of segments whose rule is new.
    fn install(&mut self, set: Arc<SegmentSet>) -> Result<(), StageError> {
        // A backfill walks the saved profiles: save first, so that it meets every one.
        self.flush()?;
        let mut stale = HashSet::new();
        for (i, s) in set.segments.iter().enumerate() {
            let stats = self.read.segment_stats(&s.key)?;
            self.metrics
                .sizes
                .get_or_create(&SegmentLabels {
                    segment: s.key.clone(),
                })
                .set(stats.size as i64);
            if stats.backfilled != Some(s.fingerprint) {
                if s.backfill {
                    stale.insert(i);
                } else {
                    self.writes
                        .backfilled
                        .push((s.key.clone(), Some(s.fingerprint)));
                }
            }
        }
        // A segment no longer loaded is not evaluated: its memberships go stale. Loaded again, even
        // with the same rule, it is backfilled again.
        for key in self.read.segment_keys()? {
            if set.position(&key).is_none() && self.read.segment_stats(&key)?.backfilled.is_some() {
                self.writes.backfilled.push((key, None));
            }
        }
        let fill = self
            .lake
            .as_ref()
            .and_then(|_| needed_history(&set, &stale));
        // The backfill evaluates at the stage's time: the next step brings it up to the clock's,
        // through the log (a stage behind gets there as it reads).
        self.clock_wanted |= !stale.is_empty();
        self.backfill = (!stale.is_empty()).then_some(Backfill {
            segments: stale,
            after: None,
            fill,
            fill_failures: 0,
            retry_at: None,
        });
        self.live.replace(set.clone());
        self.set = set;
        Ok(())
    }

    /// Runs until `stop` is set. A failed batch or save is redone from the last save committed,
    /// after a pause; after [`MAX_REDOS`] in a row the stage gives up, and its supervisor starts it
    /// again whole.
    fn run(
        mut self,
        stop: &AtomicBool,
        sets: &std::sync::mpsc::Receiver<Arc<SegmentSet>>,
    ) -> Result<(), StageError> {
        let mut failures = 0u32;
        while !stop.load(Ordering::Relaxed) {
            if let Some(set) = sets.try_iter().last() {
                if let Err(e) = self.install(set.clone()) {
                    // The save before it failed: go back to the last one, then try again.
                    tracing::error!(error = %e, "installing reloaded segments failed; redoing from the last save");
                    self.reset();
                    if let Err(e) = self.install(set) {
                        tracing::error!(error = %e, "installing reloaded segments failed");
                    }
                }
            }
            match self.step() {
                Ok(true) => failures = 0,
                Ok(false) => {
                    // Nothing to do now: save what is pending once it is due, or once it has
                    // been quiet for a while, and the save before has committed (messages may
                    // come while it is written; the next step takes it in).
                    let due = self.last_saved.elapsed() >= self.save_every
                        || self.last_busy.elapsed() >= QUIET;
                    if self.pending() && due && self.in_flight.is_none() {
                        if let Err(e) = self.hand_off() {
                            tracing::error!(error = %e, "saving the profile store failed; redoing from the last save");
                            self.health.failed(&e.to_string());
                            self.reset();
                        }
                    }
                    self.idle()
                }
                Err(e) => {
                    failures += 1;
                    self.health.between_records();
                    if failures >= MAX_REDOS {
                        return Err(e);
                    }
                    tracing::error!(error = %e, "profile stage batch failed; redoing it from the store");
                    self.health.failed(&e.to_string());
                    self.reset();
                    std::thread::sleep(Duration::from_millis(100 * u64::from(failures)));
                }
            }
        }
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "the profile store's last save failed; the next start redoes it from the log");
        }
        Ok(())
    }

    /// Whether anything was done since the last save handed off.
    fn pending(&self) -> bool {
        self.offset != self.saved_offset || !self.unsaved.is_empty() || !self.writes.is_empty()
    }

    /// Hands the saver every profile changed since the last save, with its timer, `writes` (the
    /// members index changes among them), and the offset reached. One save is in
    /// flight at a time: this first waits for the one before.
    fn hand_off(&mut self) -> Result<(), StageError> {
        if self.in_flight.is_some() {
            let waited = Instant::now();
            self.wait_for_save()?;
            self.pause(SavePause::Wait, waited);
        }
        let started = Instant::now();
        let number = self.handed + 1;
        let unsaved = std::mem::take(&mut self.unsaved);
        let writes = &mut self.writes;
        let mut profiles = Vec::with_capacity(unsaved.len());
        for id in unsaved {
            // Profiles merged away since are no longer in the cache.
            let Some(held) = self.cache.get_mut(id) else {
                continue;
            };
            held.unsaved = false;
            held.saved_in = number;
            if held.stored_recheck != held.timer {
                writes.timers.push((id, held.stored_recheck, held.timer));
                held.stored_recheck = held.timer;
            }
            profiles.push(held.profile.clone());
        }
        let writes = std::mem::take(&mut self.writes);
        let deletes = writes.deletes.clone();
        self.saver.send(Save {
            profiles,
            writes,
            offset: self.offset,
            time: self.time,
            next_id: self.next_id,
            profile_count: self.profiles,
        })?;
        self.in_flight = Some(InFlight { number, deletes });
        self.handed = number;
        self.saved_offset = self.offset;
        self.last_saved = Instant::now();
        self.pause(SavePause::HandOff, started);
        Ok(())
    }

    /// Counts a pause of the stage for saves, from `started` until now.
    fn pause(&self, at: SavePause, started: Instant) {
        self.metrics
            .save_pauses
            .get_or_create(&PauseLabels { at })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Hands off what is pending and waits until every save has committed.
    fn flush(&mut self) -> Result<(), StageError> {
        if self.pending() {
            self.hand_off()?;
        }
        self.wait_for_save()
    }

    /// Waits for the save in flight, if any, to finish.
    fn wait_for_save(&mut self) -> Result<(), StageError> {
        if self.in_flight.is_some() {
            let outcome = self.saver.wait();
            self.saved(outcome)?;
        }
        Ok(())
    }

    /// Takes in the outcome of the save in flight, if it has finished.
    fn poll_save(&mut self) -> Result<(), StageError> {
        if self.in_flight.is_some() {
            if let Some(outcome) = self.saver.poll() {
                let started = Instant::now();
                self.saved(outcome)?;
                self.pause(SavePause::Commit, started);
            }
        }
        Ok(())
    }

    /// After the save in flight finished: on success, reads the store as of it, takes the
    /// timers it wrote out of memory, and lets the caches drop what it saved. A failure goes up,
    /// and the caller resets to the last save committed.
    fn saved(&mut self, outcome: Result<(), StoreError>) -> Result<(), StageError> {
        let flight = self.in_flight.take().expect("a save in flight");
        outcome?;
        self.committed = flight.number;
        self.read = self.store.read()?;
        for id in &flight.deletes {
            self.deleted.remove(id);
        }
        let cache = &self.cache;
        self.timers = self
            .unsaved
            .iter()
            .filter_map(|&id| Some((cache.get(id)?.timer?, id)))
            .collect();
        self.timer_cursor = None;
        self.next_stored_due = None;
        self.trim_cache();
        Ok(())
    }

    /// Forgets everything not saved and goes back to the store's state.
    fn reset(&mut self) {
        self.metrics.redos.inc();
        // Whatever the save in flight does, the store will be as of some save: wait for it.
        if self.in_flight.take().is_some() {
            let _ = self.saver.wait();
        }
        self.cache.clear();
        self.touched.clear();
        self.unsaved.clear();
        self.writes = Writes::default();
        self.deleted.clear();
        self.identities.clear();
        self.removed.clear();
        self.emissions.clear();
        self.set_aside.clear();
        self.timers.clear();
        self.timer_cursor = None;
        self.next_stored_due = None;
        if let Ok(read) = self.store.read() {
            self.offset = read.meta("offset").ok().flatten().unwrap_or(self.offset);
            self.time = read.meta("time").ok().flatten().map_or(0, |t| t as Millis);
            self.next_id = read.meta("next_id").ok().flatten().unwrap_or(self.next_id);
            self.profiles = read
                .meta("profiles")
                .ok()
                .flatten()
                .unwrap_or(self.profiles);
            self.read = read;
        }
        self.saved_offset = self.offset;
        self.reader = self.log.reader(self.offset);
        if let Err(e) = self.read_own_ahead() {
            // The dedup still drops what it holds of them.
            tracing::error!(error = %e, "reading the stage's own records ahead of the redo failed");
        }
        let set = self.set.clone();
        let _ = self.install(set);
    }

    /// Waits for new records or the next clock record, briefly.
    fn idle(&mut self) {
        let tick = self.next_tick().ok().flatten();
        let now = (self.clock)().timestamp_millis();
        let wait = match tick {
            Some(at) if at <= now => return,
            Some(at) => IDLE.min(Duration::from_millis((at - now) as u64)),
            None => IDLE,
        };
        let mut end = self.log.watch_end();
        let position = self.reader.position();
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(wait, end.wait_for(|&e| e > position)).await;
        });
    }

    /// One step: the backfill's read of history from the lake when it is due, or else a batch
    /// of records (with the due timers they pass and a backfill chunk), or a clock record when a
    /// timer is due and there is nothing to read. Returns whether there was anything to do.
    fn step(&mut self) -> Result<bool, StageError> {
        self.poll_save()?;
        if self.clock_wanted {
            self.append_clock()?;
            self.clock_wanted = false;
        }
        if let Some(needed) = self.fill_due() {
            return self.fill(needed);
        }
        let records = self.reader.read(BATCH)?;
        // The backfill's chunks wait for its history to be read back from the lake.
        let chunk_due = self.backfill.as_ref().is_some_and(|b| b.fill.is_none());
        if records.is_empty() {
            if self
                .next_tick()?
                .is_some_and(|at| at <= (self.clock)().timestamp_millis())
            {
                // A timer is due by the clock: the next step reads the clock record and wakes it.
                self.append_clock()?;
                return Ok(true);
            }
            if !chunk_due {
                return Ok(false);
            }
        }
        let backfill_ids = match &self.backfill {
            Some(b) if chunk_due => Some(self.read.profile_ids(b.after, BACKFILL_CHUNK)?),
            _ => None,
        };
        let started = Instant::now();
        let set = self.set.clone();
        let mut batch = Batch { stage: self };
        let mut emitted = started;
        for record in &records {
            let entry = Entry::decode(&record.payload).ok();
            if let Some(e) = entry.as_ref().filter(|e| moves_time(e)) {
                batch.pass_time(&set, e.received_at_micros.div_euclid(1_000), &mut emitted)?;
            }
            let health = batch.stage.health.clone();
            if let Some(reason) = health.set_aside(record.offset) {
                batch.stage.set_aside.push(SetAside {
                    offset: record.offset,
                    payload: record.payload.clone(),
                    reason,
                });
                continue;
            }
            let Some(entry) = entry else {
                continue;
            };
            if entry.status != Status::Accepted {
                continue;
            }
            if entry.source == SOURCE {
                if record.offset < batch.stage.own_ahead_until {
                    batch.reconcile(&set, &entry)?;
                }
                continue;
            }
            // A panic from here on is blamed on this record; an error (a store's) is not.
            health.working_on(record.offset);
            #[cfg(test)]
            if entry.message_id == crate::supervisor::POISON_FOR_TESTS {
                panic!("the tests' poison record");
            }
            batch.message(&set, &entry)?;
            batch.stage.health.between_records();
            batch.emit_if_long(&mut emitted)?;
        }
        if let Some(ids) = &backfill_ids {
            batch.backfill(&set, ids)?;
        }
        let end = records.last().map_or(self.offset, |r| r.offset + 1);
        let backfill_done = backfill_ids.map(|ids| ids.len() < BACKFILL_CHUNK);
        self.settle()?;
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.batch_records.observe(records.len() as f64);
        if let (Some(true), Some(b)) = (backfill_done, &self.backfill) {
            let finished = b.segments.iter().map(|&i| &set.segments[i]);
            self.writes
                .backfilled
                .extend(finished.map(|s| (s.key.clone(), Some(s.fingerprint))));
        }
        self.offset = end;
        if self.offset >= self.own_ahead_until && !self.own_ahead.is_empty() {
            // The redo is past every record it could repeat.
            self.own_ahead = HashSet::new();
        }
        self.last_busy = Instant::now();
        // Over its bounds, the cache drops saved profiles; if it is still over, the unsaved ones
        // and those of the save in flight fill it, and only saves let them go: then the stage
        // waits for the save in flight. A save merely due does not wait: while one is in
        // flight, the next grows.
        self.cache.trim(self.committed);
        let due = self.last_saved.elapsed() >= self.save_every || backfill_done == Some(true);
        if self.cache.over() || (due && self.in_flight.is_none()) {
            self.hand_off()?;
        }
        if backfill_done == Some(true) {
            tracing::info!("segment backfill finished");
            self.backfill = None;
        }
        Ok(true)
    }

    /// The history the backfill waits for, if it is time to read it back from the lake: not
    /// while a failed read waits to be tried again, nor while the stage is far behind the log
    /// (every record ahead of it is listed, to leave its rows out: see
    /// [`Batch::fill_history`]).
    fn fill_due(&self) -> Option<Retention> {
        let b = self.backfill.as_ref()?;
        let waiting = b.retry_at.is_some_and(|at| at > Instant::now());
        let behind = self.log.end().saturating_sub(self.offset) > MAX_AHEAD;
        (!waiting && !behind).then(|| b.fill.clone()).flatten()
    }

    /// A step that reads the backfill's history back from the lake, and nothing else: no record
    /// is applied while the profiles take it in, so what a save hands off in the middle (to keep
    /// the cache bounded) is as of the stage's offset. A failed read is tried again later, with
    /// growing pauses; the backfill waits for it.
    fn fill(&mut self, needed: Retention) -> Result<bool, StageError> {
        let set = self.set.clone();
        let started = Instant::now();
        let outcome = Batch { stage: self }.fill_history(&set, &needed)?;
        self.settle()?;
        self.last_busy = Instant::now();
        let Some(b) = self.backfill.as_mut() else {
            return Ok(true);
        };
        match outcome {
            Ok(added) => {
                b.fill = None;
                tracing::info!(
                    occurrences = added,
                    seconds = started.elapsed().as_secs_f64(),
                    "history read back from the lake for a backfill"
                );
            }
            Err(e) => {
                b.fill_failures += 1;
                let pause = Duration::from_secs(5 << b.fill_failures.min(6));
                b.retry_at = Some(Instant::now() + pause);
                self.metrics.backfill_read_failures.inc();
                tracing::warn!(error = %e, retry_in = ?pause, "reading history back from the lake for a backfill failed; the backfill waits for it");
            }
        }
        Ok(true)
    }

    /// The dedup keys of the accepted records from the stage's offset to the log's end.
    fn keys_ahead(&self) -> Result<HashSet<u128>, StageError> {
        let mut keys = HashSet::new();
        let mut reader = self.log.reader(self.offset);
        loop {
            let records = reader.read(BATCH)?;
            if records.is_empty() {
                return Ok(keys);
            }
            for record in &records {
                match Entry::decode(&record.payload) {
                    Ok(e) if e.status == Status::Accepted && !e.message_id.is_empty() => {
                        keys.insert(dedup::key(e.source, e.message_id));
                    }
                    _ => {}
                }
            }
        }
    }

    /// When the stage will append a clock record, by the clock, if no record comes first: once
    /// a timer is due, and at least [`TICK`] after the stage's time.
    fn next_tick(&mut self) -> Result<Option<Millis>, StoreError> {
        Ok(self.next_due()?.map(|due| due.max(self.time + TICK)))
    }

    /// The earliest timer not woken yet: the store's past the cursor (it may be a changed
    /// profile's, which [`Stage::due`] passes over) or the stage's.
    fn next_due(&mut self) -> Result<Option<Millis>, StoreError> {
        let stored = match self.next_stored_due {
            Some(due) => due,
            None => {
                let due = self.read.next_due(self.timer_cursor)?;
                self.next_stored_due = Some(due);
                due
            }
        };
        Ok(stored
            .into_iter()
            .chain(self.timers.first().map(|t| t.0))
            .min())
    }

    /// Appends a clock record: the clock's time, for the stage to read back.
    fn append_clock(&mut self) -> Result<(), AppendError> {
        let now = (self.clock)();
        let mut record = RecordBatch::with_capacity(64);
        record.push_with(|b| Entry::encode(b, Status::Clock, now, SOURCE, "", "", |_| {}));
        self.runtime.block_on(self.log.append(record)).map(drop)
    }

    /// Timers due at `now`: the store's past the cursor, except those of profiles changed since
    /// the last save committed (their timers are in memory), and the stage's.
    fn due(&mut self, now: Millis) -> Result<Vec<(Millis, u64)>, StoreError> {
        let stored = self.read.due(self.timer_cursor, now, TIMER_CHUNK)?;
        if let Some(last) = stored.last() {
            self.timer_cursor = Some(*last);
            self.next_stored_due = None;
        }
        let (cache, committed) = (&self.cache, self.committed);
        let changed = |id: u64| {
            cache
                .get(id)
                .is_some_and(|h| h.unsaved || h.saved_in > committed)
        };
        let mut due: Vec<(Millis, u64)> =
            stored.into_iter().filter(|(_, id)| !changed(*id)).collect();
        due.extend(self.timers.range(..=(now, u64::MAX)).take(TIMER_CHUNK));
        Ok(due)
    }

    /// The end of a batch: appends what it emitted to the log, deletes the profiles merged away,
    /// and notes the membership changes of the profiles it touched. Those profiles, with their
    /// memberships and timers, are written by the next save.
    fn settle(&mut self) -> Result<(), StageError> {
        self.append_emissions()?;
        let writes = &mut self.writes;
        for gone in self.removed.drain(..) {
            for key in gone.stored_members {
                *writes.size_delta.entry(key.clone()).or_default() -= 1;
                writes.members.push((key, gone.id, false));
            }
            writes.timers.push((gone.id, gone.stored_recheck, None));
            writes.deletes.push(gone.id);
        }
        for id in std::mem::take(&mut self.touched) {
            // Profiles merged away this batch are no longer in the cache.
            self.cache.resize(id);
            let Some(held) = self.cache.get_mut(id) else {
                continue;
            };
            held.touched = false;
            // Here rather than at the hand-off, which would walk every changed profile at once
            // (and, long after this batch, mostly out of the CPU's caches).
            if std::mem::take(&mut held.memberships_changed) {
                let writes = &mut self.writes;
                let (entered, left) = membership_changes(&held.stored_members, &held.profile);
                for key in entered {
                    *writes.size_delta.entry(key.clone()).or_default() += 1;
                    held.stored_members.insert(key.clone());
                    writes.members.push((key, id, true));
                }
                for key in left {
                    *writes.size_delta.entry(key.clone()).or_default() -= 1;
                    held.stored_members.remove(&key);
                    writes.members.push((key, id, false));
                }
            }
        }
        Ok(())
    }

    /// Appends what the batch emitted to the log, and the records it set aside (as rejected, for
    /// the quarantine). The records arrive now, by the clock; the messages in them carry the
    /// stage's time, at which the changes happened.
    fn append_emissions(&mut self) -> Result<(), AppendError> {
        if !self.set_aside.is_empty() {
            self.append_set_aside()?;
        }
        if self.emissions.is_empty() {
            return Ok(());
        }
        let now = (self.clock)();
        let keys: Vec<Option<u128>> = self
            .emissions
            .iter()
            .map(|e| Some(dedup::key(SOURCE, &e.message_id)))
            .collect();
        let (reservation, duplicate) = self
            .runtime
            .block_on(self.dedup.reserve(&keys, || self.log.end()));
        let mut records =
            RecordBatch::with_capacity(self.emissions.iter().map(|e| e.body.len() + 64).sum());
        for (e, dup) in self.emissions.iter().zip(duplicate) {
            if !dup && !self.own_ahead.contains(&e.message_id) {
                records.push_with(|b| {
                    Entry::encode(b, Status::Accepted, now, SOURCE, &e.message_id, "", |b| {
                        b.extend_from_slice(&e.body)
                    })
                });
            }
        }
        if !records.is_empty() {
            self.runtime.block_on(self.log.append(records))?;
        }
        reservation.commit(now);
        let durable = (self.clock)().timestamp_micros();
        for e in &self.emissions {
            if let Some((cause, at)) = e.cause {
                self.metrics
                    .change_delay
                    .get_or_create(&CauseLabels { cause })
                    .observe((durable - at).max(0) as f64 / 1e6);
            }
        }
        self.emissions.clear();
        Ok(())
    }

    /// Files the records set aside in the quarantine: appended to the log as rejected records of
    /// the `sluice` source, each under an id of its offset so that a redo adds none twice.
    fn append_set_aside(&mut self) -> Result<(), AppendError> {
        let now = (self.clock)();
        let ids: Vec<String> = self
            .set_aside
            .iter()
            .map(|s| format!("set-aside-profiles-{}", s.offset))
            .collect();
        let keys: Vec<Option<u128>> = ids.iter().map(|id| Some(dedup::key(SOURCE, id))).collect();
        let (reservation, duplicate) = self
            .runtime
            .block_on(self.dedup.reserve(&keys, || self.log.end()));
        let mut records = RecordBatch::default();
        for ((s, id), dup) in self.set_aside.iter().zip(&ids).zip(duplicate) {
            if dup || self.own_ahead.contains(id) {
                continue;
            }
            let body = Entry::decode(&s.payload).map_or(&s.payload[..], |e| e.body);
            records.push_with(|b| {
                Entry::encode(b, Status::Rejected, now, SOURCE, id, &s.reason, |b| {
                    b.extend_from_slice(body)
                })
            });
        }
        if !records.is_empty() {
            self.runtime.block_on(self.log.append(records))?;
        }
        reservation.commit(now);
        for s in self.set_aside.drain(..) {
            self.health.was_set_aside(s.offset);
        }
        Ok(())
    }

    /// Keeps the caches within their bounds (it runs right after a save committed, when every
    /// profile not changed since is saved and may go): random eviction, by hash order.
    fn trim_cache(&mut self) {
        self.cache.trim(self.committed);
        let max_identities = self.max_identities;
        if self.identities.len() > max_identities {
            let excess = self.identities.len() - max_identities * 9 / 10;
            // Links made since the last save was handed off are not in the store yet: they stay
            // (and the save in flight has just committed).
            let links: HashSet<u128> = self.writes.links.keys().map(|k| identity_hash(k)).collect();
            let victims: Vec<u128> = self
                .identities
                .keys()
                .filter(|k| !links.contains(*k))
                .take(excess)
                .copied()
                .collect();
            for key in victims {
                self.identities.remove(&key);
            }
        }
    }
}

/// One batch in progress.
struct Batch<'s> {
    stage: &'s mut Stage,
}

/// The fields of a message the profile stage reads.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    event: Option<JsonStr<'a>>,
    #[serde(rename = "userId", borrow)]
    user_id: Option<JsonStr<'a>>,
    #[serde(rename = "anonymousId", borrow)]
    anonymous_id: Option<JsonStr<'a>>,
    #[serde(rename = "previousId", borrow)]
    previous_id: Option<JsonStr<'a>>,
    #[serde(borrow)]
    timestamp: Option<JsonStr<'a>>,
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
    #[serde(borrow)]
    traits: Option<&'a RawValue>,
}

impl Batch<'_> {
    /// Appends what the batch has emitted so far once it has run [`EMIT_EVERY`] since `since`
    /// (the batch's start or the last such append). Safe mid-batch: a redo emits the same
    /// messages with the same messageIds, and the dedup drops those already in the log.
    fn emit_if_long(&mut self, since: &mut Instant) -> Result<(), StageError> {
        if since.elapsed() >= EMIT_EVERY {
            self.stage.append_emissions()?;
            *since = Instant::now();
        }
        Ok(())
    }

    /// Time passes to `to` (a record's arrival), if that is later than the stage's time: every
    /// timer due by then is woken first, at `to`, whatever profile it is of.
    fn pass_time(
        &mut self,
        set: &SegmentSet,
        to: Millis,
        emitted: &mut Instant,
    ) -> Result<(), StageError> {
        if to <= self.stage.time {
            return Ok(());
        }
        self.stage.time = to;
        // A woken profile's next timer is later than `to`, and the store's cursor moves on: this
        // ends.
        while self.stage.next_due()?.is_some_and(|due| due <= to) {
            for (due, id) in self.stage.due(to)? {
                self.wake(set, id, due)?;
                self.emit_if_long(emitted)?;
            }
        }
        Ok(())
    }

    fn message(&mut self, set: &SegmentSet, entry: &Entry) -> Result<(), StageError> {
        let Ok(m) = serde_json::from_slice::<Fields>(entry.body) else {
            return Ok(());
        };
        let Some(kind) = MessageType::parse(&m.kind) else {
            return Ok(());
        };
        let ids = Identifiers {
            user_id: m.user_id.as_deref(),
            anonymous_id: m.anonymous_id.as_deref(),
            previous_id: m
                .previous_id
                .as_deref()
                .filter(|_| kind == MessageType::Alias),
        };
        let Some(resolved) = identity::resolve(self, ids, &set.retention)? else {
            return Ok(());
        };
        let metrics = self.stage.metrics.clone();
        metrics.messages.inc();
        if resolved.absorbed.is_some() {
            metrics.merges.inc();
            // The merge brought in the other profile's memberships.
            self.held(resolved.id)?.memberships_changed = true;
        }
        if resolved.conflict {
            metrics.conflicts.inc();
            let quiet = self
                .stage
                .last_conflict_log
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
            if !quiet {
                self.stage.last_conflict_log = Some(Instant::now());
                tracing::warn!(
                    message_id = entry.message_id,
                    "identity conflict: a message links two different userIds; not merged (logged at most every 10 s)"
                );
            }
        }
        let now_ms = self.stage.time;
        // A message happened when its timestamp says, but not after it arrived: a device whose
        // clock runs ahead (and no `sentAt` for the edge to correct it by) would otherwise be
        // seen in the future, outside every window until then and with no timer for it.
        let arrived = entry.received_at_micros.div_euclid(1_000);
        let at = m
            .timestamp
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or(arrived, |t| t.timestamp_millis().min(arrived));
        let event = event_name(kind, m.event.as_deref());
        let observed = Observed {
            kind,
            event,
            at,
            properties: m.properties,
            traits: m.traits,
        };
        let message = Message {
            name: event.unwrap_or_default(),
            at,
            now: now_ms,
            properties: (if kind == MessageType::Identify {
                m.traits
            } else {
                m.properties
            })
            .map(RawValue::get),
            kind: kind.as_str(),
        };
        let trigger = if resolved.created || resolved.absorbed.is_some() {
            Trigger::All(Some(message))
        } else {
            Trigger::Message {
                event,
                identify: kind == MessageType::Identify,
                message,
            }
        };
        let held = self.held(resolved.id)?;
        let mut dropped = held.profile_mut().apply(&observed, &set.retention, now_ms);
        dropped.add(resolved.dropped);
        if dropped != Dropped::default() {
            count_drops(&metrics, dropped);
        }
        let cause = Some((Cause::Message, entry.received_at_micros));
        self.evaluate(set, resolved.id, trigger, cause)
    }

    /// A change the stage emitted before a crash, read back by the redo: the log says what was
    /// sent on. A redo evaluates as the first run did, but with the segments in force when it
    /// runs and backfills in its own order, so it can fall behind what the log holds: then the
    /// membership takes the change, and the segment is evaluated again, so that what is sent on
    /// next follows on from what was sent (and no change number is used twice).
    fn reconcile(&mut self, set: &SegmentSet, entry: &Entry) -> Result<(), StageError> {
        let Some((key, id, changes, entered)) = emit::parse_change_id(entry.message_id) else {
            return Ok(());
        };
        let stage = &mut self.stage;
        let held = match stage.cache.get(id) {
            Some(held) => held.profile.memberships.get(key).map(|m| m.changes),
            None if stage.deleted.contains(&id) => return Ok(()),
            None => match stage.read.profile(id)? {
                Some(p) => p.memberships.get(key).map(|m| m.changes),
                // Merged away since.
                None => return Ok(()),
            },
        };
        if held.unwrap_or(0) >= changes {
            return Ok(());
        }
        let since = stage.time;
        let profile = self.held(id)?;
        profile.memberships_changed = true;
        let m = profile.profile_mut().memberships.entry(key);
        (m.changes, m.member, m.since) = (changes, entered, since);
        if let Some(place) = set.position(key) {
            let only = HashSet::from([place]);
            self.evaluate(set, id, Trigger::Only(&only), None)?;
        }
        Ok(())
    }

    fn wake(&mut self, set: &SegmentSet, id: u64, due: Millis) -> Result<(), StageError> {
        let stage = &mut self.stage;
        if stage.deleted.contains(&id)
            || (!stage.cache.contains(id) && stage.read.profile(id)?.is_none())
        {
            // A stale timer of a profile merged away: drop it.
            stage.writes.timers.push((id, Some(due), None));
            stage.timers.remove(&(due, id));
            return Ok(());
        }
        self.stage.metrics.timer_wakeups.inc();
        // A timer that comes due with nothing to re-evaluate (its segment was unloaded) is
        // cleared by the evaluation.
        self.evaluate(set, id, Trigger::Timer, Some((Cause::Timer, due * 1_000)))
    }

    fn backfill(&mut self, set: &SegmentSet, ids: &[u64]) -> Result<(), StageError> {
        let segments = match &self.stage.backfill {
            Some(b) => b.segments.clone(),
            None => return Ok(()),
        };
        for &id in ids {
            // A profile merged away since the last save committed is still in the store.
            if !self.stage.deleted.contains(&id) {
                self.evaluate(set, id, Trigger::Only(&segments), None)?;
            }
        }
        if let (Some(b), Some(last)) = (self.stage.backfill.as_mut(), ids.last()) {
            b.after = Some(*last);
        }
        Ok(())
    }

    /// Merges the occurrences the lake holds for `needed` into the profiles they belong to, a day
    /// of event time at a time, and returns how many it added. An error reading the lake is
    /// given back as such (the caller tries again later); the store's go up.
    ///
    /// Exactly once: the lake holds the messages the stage applied, and some it has not applied
    /// yet; the profiles hold some of those it applied (of the names the rules kept). A row of a
    /// record ahead of the stage is left out (the stage applies it later), and of the `n` rows of
    /// one profile, name and moment, as many are added as the profile holds fewer than `n`; the
    /// ones it holds take the values they lack. So filling twice (a crash during a fill) adds
    /// nothing the second time, and two orders of one request (one `receivedAt`) stay two.
    fn fill_history(
        &mut self,
        set: &SegmentSet,
        needed: &Retention,
    ) -> Result<Result<u64, QueryError>, StageError> {
        let Some(lake) = self.stage.lake.clone() else {
            return Ok(Ok(0));
        };
        let now = self.stage.time;
        let mut added = 0;
        let mut touched = HashSet::new();
        let since = (now - needed.window).div_euclid(DAY) * DAY;
        let mut day = since;
        while day <= now {
            let runtime = self.stage.runtime.clone();
            // The last day reads on past it: a device clock ahead counts as of its arrival.
            let to = (day + DAY <= now).then_some(day + DAY);
            let stream = match runtime.block_on(history::open(&lake, needed, since, day, to)) {
                Ok(Some(stream)) => stream,
                Ok(None) => break,
                Err(e) => return Ok(Err(e)),
            };
            // Listed after the lake's files were: every row of a record ahead is in it.
            let ahead = self.stage.keys_ahead()?;
            let mut stream = std::pin::pin!(stream);
            // (profile, name, moment) -> (occurrences the profile held, rows read).
            let mut seen: hashbrown::HashMap<u128, (usize, usize)> = hashbrown::HashMap::new();
            while let Some(batch) = runtime.block_on(futures_util::StreamExt::next(&mut stream)) {
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(e) => return Ok(Err(e.into())),
                };
                for row in history::occurrences(&batch, set.retention.values.as_ref()) {
                    if ahead.contains(&row.key) {
                        continue;
                    }
                    let Some(id) = self.owner(&row)? else {
                        continue;
                    };
                    let profile = self.held(id)?.profile_mut();
                    let moment = xxhash_rust::xxh3::xxh3_128(
                        format!("{id}\0{}\0{}", row.name, row.at).as_bytes(),
                    );
                    let (held, read) = seen
                        .entry(moment)
                        .or_insert_with(|| (profile.count_at(&row.name, row.at), 0));
                    if *read < *held {
                        profile.add_values(&row.name, row.at, *read, &row.values);
                    } else {
                        profile.record(&row.name, row.at, &row.values);
                        added += 1;
                    }
                    *read += 1;
                    touched.insert(id);
                    if self.stage.cache.over() {
                        // Save what is filled so far, so that the cache lets it go.
                        self.prune(set, &mut touched)?;
                        self.stage.settle()?;
                        self.stage.flush()?;
                    }
                }
            }
            day += DAY;
        }
        self.prune(set, &mut touched)?;
        Ok(Ok(added))
    }

    /// The profile a row read back from the lake belongs to, if it has one.
    fn owner(&mut self, row: &history::LakeOccurrence) -> Result<Option<u64>, StageError> {
        if let Some(u) = &row.user_id {
            if let Some(id) = self.lookup(&user_key(u))? {
                return Ok(Some(id));
            }
        }
        Ok(match &row.anonymous_id {
            Some(a) => self.lookup(&anonymous_key(a))?,
            None => None,
        })
    }

    /// Drops from the `touched` profiles' history what the rules do not need, and forgets them.
    fn prune(&mut self, set: &SegmentSet, touched: &mut HashSet<u64>) -> Result<(), StageError> {
        let now = self.stage.time;
        let mut dropped = Dropped::default();
        for id in touched.drain() {
            dropped.history += self.held(id)?.profile_mut().prune(&set.retention, now);
        }
        count_drops(&self.stage.metrics, dropped);
        Ok(())
    }

    /// Evaluates the segments `trigger` calls for on the profile, at the stage's time; notes the
    /// changes to emit and the profile's next timer.
    fn evaluate(
        &mut self,
        set: &SegmentSet,
        id: u64,
        trigger: Trigger,
        cause: Option<(Cause, i64)>,
    ) -> Result<(), StageError> {
        let (now, now_ms) = (self.stage.now(), self.stage.time);
        let metrics = self.stage.metrics.clone();
        let held = self.held(id)?;
        let evaluation = set.evaluate(held.profile_mut(), trigger, now_ms);
        held.memberships_changed |= !evaluation.transitions.is_empty();
        let (before, timer) = (held.timer, held.profile.next_recheck());
        if timer != before {
            held.timer = timer;
            let timers = &mut self.stage.timers;
            if let Some(due) = before {
                timers.remove(&(due, id));
            }
            if let Some(due) = timer {
                timers.insert((due, id));
            }
        }
        metrics
            .evaluations
            .inc_by((evaluation.transitions.len() + evaluation.failures.len()) as u64);
        for (i, failure) in &evaluation.failures {
            let class = match failure {
                RuleFailure::Budget => FailureClass::Budget,
                RuleFailure::Error => FailureClass::Error,
            };
            metrics
                .rule_failures
                .get_or_create(&RuleFailureLabels {
                    segment: set.segments[*i].key.clone(),
                    class,
                })
                .inc();
        }
        let held = self.stage.cache.get(id).expect("loaded above");
        let profile = &held.profile;
        let mut out = Vec::new();
        let mut changed = Vec::new();
        for t in &evaluation.transitions {
            let segment = &set.segments[t.segment];
            out.extend(emit::change(
                segment, profile, t.entered, t.changes, now, cause,
            ));
            metrics
                .changes
                .get_or_create(&SegmentChangeLabels {
                    segment: segment.key.clone(),
                    direction: if t.entered {
                        Direction::Entered
                    } else {
                        Direction::Exited
                    },
                })
                .inc();
            changed.push(segment.key.clone());
        }
        for key in changed {
            self.stage.writes.last_change.insert(key, now_ms);
        }
        self.stage.emissions.extend(out);
        Ok(())
    }

    /// The profile, loaded into the cache if needed.
    fn held(&mut self, id: u64) -> Result<&mut Held, StageError> {
        Directory::profile(self, id)?;
        Ok(self
            .stage
            .cache
            .get_mut(id)
            .expect("loaded by Directory::profile"))
    }
}

/// Counts what the profiles' caps dropped.
fn count_drops(metrics: &SegmentMetrics, dropped: Dropped) {
    for (what, n) in [
        (Capped::EventName, dropped.event_names),
        (Capped::Trait, dropped.traits),
        (Capped::History, dropped.history),
        (Capped::AnonymousId, dropped.anonymous_ids),
    ] {
        if n > 0 {
            metrics.capped.get_or_create(&CapLabels { what }).inc_by(n);
        }
    }
}

/// Whether a record moves the stage's time: a message from a client, or a clock record. The
/// stage's own emissions do not (see "The stage's time").
fn moves_time(entry: &Entry) -> bool {
    entry.source != SOURCE || entry.status == Status::Clock
}

/// An identity index key's 128-bit hash: the stage's identity map is keyed by it. Two keys with
/// the same hash would share a profile; among a billion keys the chance of that is about 10^-21.
fn identity_hash(key: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(key.as_bytes())
}

impl Directory for Batch<'_> {
    fn lookup(&mut self, identity: &str) -> Result<Option<u64>, StoreError> {
        let stage = &mut self.stage;
        let hash = identity_hash(identity);
        if let Some(id) = stage.identities.get(&hash) {
            return Ok(Some(*id));
        }
        let found = stage.read.lookup(identity)?;
        if let Some(id) = found {
            self.stage.identities.insert(hash, id);
        }
        Ok(found)
    }

    fn link(&mut self, identity: &str, id: u64) -> Result<(), StoreError> {
        let stage = &mut self.stage;
        stage.writes.links.insert(identity.to_string(), id);
        stage.identities.insert(identity_hash(identity), id);
        Ok(())
    }

    fn profile(&mut self, id: u64) -> Result<&mut Profile, StoreError> {
        if !self.stage.cache.contains(id) {
            if self.stage.deleted.contains(&id) {
                return Err(StoreError::missing(id));
            }
            let profile = self
                .stage
                .read
                .profile(id)?
                .ok_or_else(|| StoreError::missing(id))?;
            self.stage.cache.insert(id, Held::new(profile));
        }
        let stage = &mut self.stage;
        let held = stage.cache.get_mut(id).expect("inserted above");
        if !held.touched {
            held.touched = true;
            stage.touched.push(id);
        }
        if !held.unsaved {
            held.unsaved = true;
            stage.unsaved.push(id);
            // From now until the save, the stage's timers hold this profile's.
            if let Some(due) = held.timer {
                stage.timers.insert((due, id));
            }
        }
        Ok(held.profile_mut())
    }

    fn create(&mut self) -> Result<u64, StoreError> {
        let id = self.stage.next_id;
        self.stage.next_id += 1;
        self.stage.profiles += 1;
        let mut held = Held::new(Profile::new(id));
        held.touched = true;
        held.unsaved = true;
        self.stage.cache.insert(id, held);
        self.stage.touched.push(id);
        self.stage.unsaved.push(id);
        Ok(id)
    }

    fn remove(&mut self, id: u64) -> Result<Profile, StoreError> {
        Directory::profile(self, id)?;
        let held = self.stage.cache.remove(id).expect("loaded above");
        // From now on: a timer read or a backfill chunk listed at the batch's start may still
        // name it.
        self.stage.deleted.insert(id);
        self.stage.profiles -= 1;
        if let Some(due) = held.timer {
            self.stage.timers.remove(&(due, id));
        }
        self.stage.removed.push(Removed {
            id,
            stored_members: held.stored_members,
            stored_recheck: held.stored_recheck,
        });
        Ok(Arc::try_unwrap(held.profile).unwrap_or_else(|shared| (*shared).clone()))
    }
}

/// The history the `stale` segments need, if any.
fn needed_history(set: &SegmentSet, stale: &HashSet<usize>) -> Option<Retention> {
    let mut needed = Retention::nothing();
    for &i in stale {
        needed.union(&set.segments[i].deps.retention);
    }
    let nothing = matches!(&needed.history, Names::Only(n) if n.is_empty()) || needed.window == 0;
    (!nothing).then_some(needed)
}
