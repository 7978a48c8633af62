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
//! batch and commits it, durably, while the stage goes on with the next batches; one save is in
//! flight at a time. Changed profiles are written once per save however many messages they took,
//! and a save syncs the disk once.
//!
//! Meanwhile the stage reads the store as of the last save committed ([`Stage::read`], a
//! snapshot) with in-memory overlays for what is newer: profiles changed since stay in
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
//! ## Rooms
//! The stage is one struct ([`Stage`]) whose work is split by concern, one file each: the loop
//! and a step (here), a batch's evaluation ([`batch`]), the save protocol ([`save`]; the saver
//! thread is [`saver`]), the stage's time and timers ([`time`]), the identity cache and the
//! profiles it loads ([`directory`]), backfill with its read-back of history ([`backfill`],
//! [`history`]), and the records the stage writes itself ([`own_records`], [`emit`]). The profile
//! is `crate::profiles`, the rules are `crate::segments`.
//!
//! The stage's name is `profiles` wherever it shows: its log consumer, its thread
//! (`sluice-profiles`), its entry in `/readyz` and in the supervisor's metrics.

mod backfill;
mod batch;
mod cache;
mod directory;
pub mod emit;
pub mod history;
mod own_records;
mod save;
mod saver;
#[cfg(test)]
mod tests;
mod time;

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
use crate::intake_log::{message_key, AppendError, Appender, IntakeLog, LogReader, RecordBatch};
use crate::metrics::{
    CacheTier, CacheTierLabels, CapLabels, Capped, Cause, CauseLabels, Direction, FailureClass,
    PauseLabels, ProfileStageMetrics, RuleFailureLabels, SavePause, SegmentChangeLabels,
    SegmentLabels,
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
use crate::vocabulary::SOURCE;
use crate::vocabulary::{JsonStr, MessageType};
use backfill::{needed_history, Backfill, BACKFILL_CHUNK};
use batch::Batch;
use cache::{membership_changes, Cache, Held};
use directory::Identities;
use emit::Emission;
use own_records::{OwnAhead, SetAside};
use save::Saves;
use saver::{Save, Saver, Writes};
use time::{moves_time, Timers};

/// The intake-log consumer name; its cursor only holds back log retention: the offset that
/// counts is the one committed in the profile store.
pub const CONSUMER: &str = "profiles";
/// Records read per batch.
pub const BATCH: usize = 2_000;
/// Failed batches in a row that the stage redoes itself before it gives up to its supervisor.
const MAX_REDOS: u32 = 5;
/// Identities kept in memory: two per decoded profile, or one per this many bytes of the
/// cache's memory bound (about what a cold profile takes) when that is more, so that a user whose
/// profile is cold is found without a read of the store. One takes about 40 bytes, outside the
/// bound.
const IDENTITY_MEMORY: usize = 512;
/// How long the loop sleeps at most when there is nothing to do.
const IDLE: Duration = Duration::from_millis(100);
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
    /// Where the stage appends what it emits: the log's idempotent append.
    pub appender: Arc<Appender>,
    pub metrics: Arc<ProfileStageMetrics>,
    pub clock: Clock,
    pub runtime: tokio::runtime::Handle,
    /// Profiles kept decoded in memory between batches, at most, and what those and the cold ones
    /// (in their stored encoding) take, at most (`cache.rs`).
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
pub struct ProfileStage {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl ProfileStage {
    /// Starts the stage with `set`; later sets arrive on `sets`. A stage that fails is started
    /// again from the store (see `crate::supervisor`).
    pub fn start(
        parts: Parts,
        set: Arc<SegmentSet>,
        sets: std::sync::mpsc::Receiver<Arc<SegmentSet>>,
        live: Arc<LiveSegments>,
    ) -> Result<ProfileStage, StageError> {
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
        Ok(ProfileStage { stop, thread })
    }

    /// Finishes the batch in progress and stops.
    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// A profile merged away, with what the store (once the last save handed off commits) and the
/// stage's timers hold for it.
struct Removed {
    id: u64,
    stored_members: BTreeSet<Name>,
    stored_recheck: Option<Millis>,
}

struct Stage {
    store: Arc<ProfileStore>,
    /// The store as of the last save committed.
    read: Reader,
    /// Saves handed to the saver and committed (`save.rs`).
    saves: Saves,
    log: Arc<IntakeLog>,
    appender: Arc<Appender>,
    metrics: Arc<ProfileStageMetrics>,
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
    /// Profiles merged away whose deletion is not committed yet: `read` may still have them.
    deleted: HashSet<u64>,
    /// The identity index as far as it was read or written (`directory.rs`).
    identities: Identities,
    /// Profiles merged away in this batch, with what the store and the stage's timers hold for
    /// them.
    removed: Vec<Removed>,
    next_id: u64,
    /// Profiles in the store (kept in `meta`, as counting a table is not free).
    profiles: u64,
    offset: u64,
    backfill: Option<Backfill>,
    /// The timers not in the store yet, and how far the store's were read (`time.rs`).
    timers: Timers,
    /// The stage's own records ahead of the saved offset (`own_records.rs`).
    own_ahead: OwnAhead,
    emissions: Vec<Emission>,
    /// When the last batch with anything to do ended.
    last_busy: Instant,
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
        let words = parts.store.dictionary().clone();
        let mut stage = Stage {
            reader: parts.log.reader(offset),
            store: parts.store,
            read,
            saves: Saves {
                saver,
                in_flight: None,
                handed: 0,
                committed: 0,
                saved_offset: offset,
                last_saved: Instant::now(),
                every: parts.save_every,
            },
            log: parts.log,
            appender: parts.appender,
            metrics: parts.metrics,
            health: parts.health,
            set_aside: Vec::new(),
            clock: parts.clock,
            runtime: parts.runtime,
            lake: parts.lake,
            live,
            set,
            cache: Cache::new(parts.cache_size, parts.cache_memory, words),
            touched: Vec::new(),
            unsaved: Vec::new(),
            writes: Writes::default(),
            deleted: HashSet::new(),
            identities: Identities {
                map: hashbrown::HashMap::new(),
                max: (parts.cache_size.max(1) * 2).max(parts.cache_memory / IDENTITY_MEMORY),
            },
            removed: Vec::new(),
            next_id,
            profiles,
            offset,
            backfill: None,
            timers: Timers::default(),
            own_ahead: OwnAhead {
                ids: HashSet::new(),
                until: offset,
            },
            emissions: Vec::new(),
            last_busy: Instant::now(),
            last_conflict_log: None,
            time,
            clock_wanted: false,
        };
        stage.read_own_ahead()?;
        Ok(stage)
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
                    let due = self.saves.last_saved.elapsed() >= self.saves.every
                        || self.last_busy.elapsed() >= QUIET;
                    if self.pending() && due && self.saves.in_flight.is_none() {
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

    /// Sets the cache's gauges.
    fn count_cache(&self) {
        let [decoded, cold] = self.cache.tiers();
        for (tier, (profiles, bytes)) in [(CacheTier::Decoded, decoded), (CacheTier::Cold, cold)] {
            let labels = CacheTierLabels { tier };
            self.metrics
                .cache_profiles
                .get_or_create(&labels)
                .set(profiles as i64);
            self.metrics
                .cache_bytes
                .get_or_create(&labels)
                .set(bytes as i64);
        }
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
                if record.offset < batch.stage.own_ahead.until {
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
        if self.offset >= self.own_ahead.until && !self.own_ahead.ids.is_empty() {
            // The redo is past every record it could repeat.
            self.own_ahead.ids = HashSet::new();
        }
        self.last_busy = Instant::now();
        // Over its bounds, the cache drops saved profiles; if it is still over, the unsaved ones
        // and those of the save in flight fill it, and only saves let them go: then the stage
        // waits for the save in flight. A save merely due does not wait: while one is in
        // flight, the next grows.
        self.cache.trim(self.saves.committed);
        self.count_cache();
        let due =
            self.saves.last_saved.elapsed() >= self.saves.every || backfill_done == Some(true);
        if self.cache.over() || (due && self.saves.in_flight.is_none()) {
            self.hand_off()?;
        }
        if backfill_done == Some(true) {
            tracing::info!("segment backfill finished");
            self.backfill = None;
        }
        Ok(true)
    }
}
