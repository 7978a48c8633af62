//! The profile stage: a consumer of the intake log that keeps every profile current, evaluates
//! the segments each message can affect, wakes profiles whose time conditions come due, backfills
//! new or edited segments, and appends the resulting `Audience Entered` / `Audience Exited`
//! messages to the intake log (from where they reach the lake and destinations like any message).
//!
//! ## Batches, saves, exactly once
//! The stage works in batches: read up to [`BATCH`] records, apply each to its profile and
//! evaluate, then wake due timers and advance any backfill. The messages a batch emits are
//! appended to the log (durably) at the end of the batch, so their delay is one batch.
//!
//! The profile store is written in one transaction that stays open across batches and commits
//! (durably, with the log offset the stage reached) once every `profiles.save_interval`, or
//! sooner when the profiles changed since the last save fill the cache or when no message has
//! come for a second ([`QUIET`]). Changed profiles wait in the cache and are written once per
//! save, with their memberships (the members index) and their timers, however many messages
//! they took: redb copies a B-tree page for each write in a transaction, so writing per batch
//! cost a page copy per message. Until the save, the timers of changed profiles are in memory
//! ([`Stage::timers`]); due timers are read from both, skipping the store's entries for changed
//! profiles.
//!
//! A crash loses what was not saved, and the stage redoes it from the log: the same messages on
//! the same state emit the same changes with the same messageIds, and the dedup drops those the
//! log already holds. Nothing is emitted twice, and nothing is lost. The log's cursor for this
//! stage only advances with saves, so the log keeps what a redo needs. Readers of the store (the
//! admin API) see it as of the last save.
//!
//! Messages from the reserved source `sluice` (our own emissions) are not applied to profiles:
//! memberships are already on the profile.
//!
//! ## The stage's time
//! Rules and timers are evaluated at the stage's time ([`Stage::batch_time`]): the clock's once
//! the stage has caught up with the log, and while it is behind, the arrival time of the last
//! record it read. So time passes for the stage in the order the messages arrived, and a window
//! does not close on a profile whose next message is already in the log, unread: evaluated at
//! the clock's time, a stage catching up (after a restart, or behind a burst) would emit an exit
//! and then the entry again for every such profile, and send both on to destinations.
//!
//! This module owns the loop and the bookkeeping (timers, the members index, segment sizes); the
//! profile is `crate::profiles`, the rules are `crate::segments`.

mod cache;
pub mod emit;
pub mod history;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::clock::Clock;
use crate::entry::{Entry, Status};
use crate::ingest::dedup::{self, Dedup};
use crate::ingest::message::MessageType;
use crate::intake_log::{AppendError, IntakeLog, LogReader, Record, RecordBatch};
use crate::metrics::{
    Cause, CauseLabels, Direction, FailureClass, RuleFailureLabels, SegmentChangeLabels,
    SegmentLabels, SegmentMetrics,
};
use crate::profiles::identity::{self, Directory, Identifiers};
use crate::profiles::profile::{
    anonymous_key, event_name, user_key, Millis, Name, Names, Observed, Profile, Retention,
};
use crate::profiles::store::{ProfileStore, StoreError, Writer};
use crate::query::QueryEngine;
use crate::segments::api::Event;
use crate::segments::rules::{RuleFailure, SegmentSet, Trigger};
use cache::{members, Cache, Held};
use emit::Emission;
pub use emit::SOURCE;

/// The intake-log consumer name; its cursor only holds back log retention: the offset that
/// counts is the one committed in the profile store.
pub const CONSUMER: &str = "profiles";
/// Records read per batch.
pub const BATCH: usize = 2_000;
/// Profiles backfilled per batch, so that a backfill never holds up real-time evaluation long.
const BACKFILL_CHUNK: usize = 1_000;
/// Due timers handled per batch.
const TIMER_CHUNK: usize = 2_000;
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
}

/// The running stage.
pub struct AudienceHandle {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl AudienceHandle {
    /// Starts the stage with `set`; later sets arrive on `sets`.
    pub fn start(
        parts: Parts,
        set: Arc<SegmentSet>,
        sets: std::sync::mpsc::Receiver<Arc<SegmentSet>>,
        live: Arc<LiveSegments>,
    ) -> Result<AudienceHandle, StageError> {
        let consumer = parts.log.consumer(CONSUMER)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut stage = Stage::new(parts, consumer, live)?;
        stage.install(set)?;
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("sluice-profiles".into())
                .spawn(move || {
                    // Ingestion wins the core when both want it: this stage catches up from the
                    // log afterwards, and nothing it does is on a client's path.
                    crate::thread_priority::lower();
                    stage.run(&stop, &sets)
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

/// A profile merged away, with what the store (as of the last save) and the stage's timers hold
/// for it.
struct Removed {
    id: u64,
    stored_members: BTreeSet<Name>,
    stored_recheck: Option<Millis>,
    timer: Option<Millis>,
}

struct Backfill {
    segments: HashSet<usize>,
    after: Option<u64>,
    /// History to read back from the lake before the first chunk, if the segments need any.
    fill: Option<Retention>,
}

struct Stage {
    store: Arc<ProfileStore>,
    log: Arc<IntakeLog>,
    dedup: Arc<Dedup>,
    metrics: Arc<SegmentMetrics>,
    clock: Clock,
    runtime: tokio::runtime::Handle,
    lake: Option<QueryEngine>,
    consumer: crate::intake_log::Consumer,
    reader: LogReader,
    live: Arc<LiveSegments>,
    set: Arc<SegmentSet>,
    cache: Cache,
    /// The store transaction open since the last save.
    open: Option<Writer>,
    /// Profiles touched in the batch in progress (in the cache).
    touched: Vec<u64>,
    /// Profiles changed since the last save (in the cache, unless merged away).
    unsaved: Vec<u64>,
    /// The identity index as far as it was read or written: this stage is its only writer.
    /// hashbrown's hasher for the same reason as the cache's.
    identities: hashbrown::HashMap<String, u64>,
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
    /// Segments whose rule is in force without a backfill (`backfill = false`) or whose backfill
    /// finished, to record at the next save.
    backfilled: Vec<usize>,
    /// The timers of the profiles changed since the last save, (due, profile): the store's are as
    /// of the last save.
    timers: BTreeSet<(Millis, u64)>,
    /// The last store timer read since the last save: those up to it were woken, or belong to
    /// changed profiles (whose timers are in `timers`).
    timer_cursor: Option<(Millis, u64)>,
    /// How segment sizes changed since the last save.
    size_delta: HashMap<String, i64>,
    emissions: Vec<Emission>,
    last_change: HashMap<String, Millis>,
    /// The log offset of the last save.
    saved_offset: u64,
    last_saved: Instant,
    /// When the last batch with anything to do ended.
    last_busy: Instant,
    save_every: Duration,
    last_conflict_log: Option<Instant>,
    /// The time of the last batch: the stage's time never goes back.
    time: DateTime<Utc>,
}

impl Stage {
    fn new(
        parts: Parts,
        consumer: crate::intake_log::Consumer,
        live: Arc<LiveSegments>,
    ) -> Result<Stage, StageError> {
        let w = parts.store.write()?;
        let offset = w.meta("offset")?.unwrap_or(consumer.committed());
        let next_id = w.meta("next_id")?.unwrap_or(1);
        let profiles = w.meta("profiles")?.unwrap_or(0);
        parts.metrics.profiles.set(profiles as i64);
        drop(w);
        let set = live.current();
        Ok(Stage {
            reader: parts.log.reader(offset),
            store: parts.store,
            log: parts.log,
            dedup: parts.dedup,
            metrics: parts.metrics,
            clock: parts.clock,
            runtime: parts.runtime,
            lake: parts.lake,
            consumer,
            live,
            set,
            cache: Cache::new(parts.cache_size, parts.cache_memory),
            open: None,
            touched: Vec::new(),
            unsaved: Vec::new(),
            identities: hashbrown::HashMap::new(),
            max_identities: parts.cache_size.max(1) * 2,
            removed: Vec::new(),
            next_id,
            profiles,
            offset,
            backfill: None,
            backfilled: Vec::new(),
            timers: BTreeSet::new(),
            timer_cursor: None,
            size_delta: HashMap::new(),
            emissions: Vec::new(),
            last_change: HashMap::new(),
            saved_offset: offset,
            last_saved: Instant::now(),
            last_busy: Instant::now(),
            save_every: parts.save_every,
            last_conflict_log: None,
            time: DateTime::<Utc>::MIN_UTC,
        })
    }

    /// Puts `set` in force and plans the backfill of segments whose rule is new.
    fn install(&mut self, set: Arc<SegmentSet>) -> Result<(), StageError> {
        // A backfill walks the saved profiles: save first, so that it meets every one.
        if self.pending() {
            self.save()?;
        }
        let r = self.store.read()?;
        let mut stale = HashSet::new();
        self.backfilled.clear();
        for (i, s) in set.segments.iter().enumerate() {
            let stats = r.segment_stats(&s.key)?;
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
                    self.backfilled.push(i);
                }
            }
        }
        let fill = self
            .lake
            .as_ref()
            .and_then(|_| needed_history(&set, &stale));
        self.backfill = (!stale.is_empty()).then_some(Backfill {
            segments: stale,
            after: None,
            fill,
        });
        self.live.replace(set.clone());
        self.set = set;
        Ok(())
    }

    fn run(mut self, stop: &AtomicBool, sets: &std::sync::mpsc::Receiver<Arc<SegmentSet>>) {
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
                    // been quiet for a while.
                    let due = self.last_saved.elapsed() >= self.save_every
                        || self.last_busy.elapsed() >= QUIET;
                    if self.pending() && due {
                        if let Err(e) = self.save() {
                            tracing::error!(error = %e, "saving the profile store failed; redoing from the last save");
                            self.reset();
                        }
                    }
                    self.idle()
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "profile stage batch failed; redoing it from the store");
                    self.reset();
                    std::thread::sleep(Duration::from_millis(100 * u64::from(failures.min(50))));
                }
            }
        }
        if self.pending() {
            if let Err(e) = self.save() {
                tracing::error!(error = %e, "the profile store's last save failed; the next start redoes it from the log");
            }
        }
    }

    /// Whether anything was done since the last save.
    fn pending(&self) -> bool {
        self.offset != self.saved_offset || self.open.is_some()
    }

    /// Writes every profile changed since the last save, with its memberships and its timer,
    /// and the segment stats, then commits the open transaction, durably, with the offset
    /// reached; then lets the log's cursor move up to it.
    fn save(&mut self) -> Result<(), StageError> {
        let started = Instant::now();
        let w = match self.open.take() {
            Some(w) => w,
            None => self.store.write()?,
        };
        let unsaved = std::mem::take(&mut self.unsaved);
        let mut size_delta = std::mem::take(&mut self.size_delta);
        let mut written = 0;
        for &id in &unsaved {
            // Profiles merged away since are no longer in the cache.
            let Some(held) = self.cache.get_mut(id) else {
                continue;
            };
            written += 1;
            held.unsaved = false;
            let p = &held.profile;
            if std::mem::take(&mut held.memberships_changed)
                && !p.segments().eq(held.stored_members.iter().map(|k| &**k))
            {
                let now_members = members(p);
                for key in now_members.difference(&held.stored_members) {
                    w.set_member(key, id, true)?;
                    *size_delta.entry(key.to_string()).or_default() += 1;
                }
                for key in held.stored_members.difference(&now_members) {
                    w.set_member(key, id, false)?;
                    *size_delta.entry(key.to_string()).or_default() -= 1;
                }
                held.stored_members = now_members;
            }
            w.move_timer(id, held.stored_recheck, held.timer)?;
            held.stored_recheck = held.timer;
        }
        let cache = &self.cache;
        w.put_profiles(
            unsaved
                .iter()
                .filter_map(|&id| cache.get(id))
                .map(|h| &h.profile),
        )?;
        self.save_segment_stats(&w, &size_delta)?;
        w.set_meta("offset", self.offset)?;
        w.set_meta("next_id", self.next_id)?;
        w.set_meta("profiles", self.profiles)?;
        w.commit()?;
        self.timers.clear();
        self.timer_cursor = None;
        self.saved_offset = self.offset;
        self.last_saved = Instant::now();
        self.consumer.commit(self.offset)?;
        self.metrics.profiles.set(self.profiles as i64);
        self.metrics.saved_profiles.inc_by(written);
        self.metrics
            .save_seconds
            .observe(started.elapsed().as_secs_f64());
        self.trim_cache();
        Ok(())
    }

    /// Brings the stats of the segments that changed since the last save up to date: sizes,
    /// last changes, the rule versions backfilled.
    fn save_segment_stats(
        &mut self,
        w: &Writer,
        size_delta: &HashMap<String, i64>,
    ) -> Result<(), StageError> {
        let set = self.set.clone();
        let mut changed: HashSet<String> = size_delta.keys().cloned().collect();
        changed.extend(self.last_change.keys().cloned());
        let backfilled = std::mem::take(&mut self.backfilled);
        changed.extend(backfilled.iter().map(|&i| set.segments[i].key.clone()));
        for key in changed {
            let mut stats = w.segment_stats(&key)?;
            stats.size =
                (stats.size as i64 + size_delta.get(&key).copied().unwrap_or(0)).max(0) as u64;
            if let Some(at) = self.last_change.get(&key) {
                stats.last_change = Some(*at);
            }
            if let Some(s) = set.position(&key).filter(|s| backfilled.contains(s)) {
                stats.backfilled = Some(set.segments[s].fingerprint);
            }
            w.put_segment_stats(&key, &stats)?;
            self.metrics
                .sizes
                .get_or_create(&SegmentLabels { segment: key })
                .set(stats.size as i64);
        }
        self.last_change.clear();
        Ok(())
    }

    /// Forgets everything not saved and goes back to the store's state.
    fn reset(&mut self) {
        self.open = None; // aborts the transaction
        self.cache.clear();
        self.touched.clear();
        self.unsaved.clear();
        self.identities.clear();
        self.removed.clear();
        self.emissions.clear();
        self.last_change.clear();
        self.timers.clear();
        self.timer_cursor = None;
        self.size_delta.clear();
        if let Ok(w) = self.store.write() {
            self.offset = w.meta("offset").ok().flatten().unwrap_or(self.offset);
            self.next_id = w.meta("next_id").ok().flatten().unwrap_or(self.next_id);
            self.profiles = w.meta("profiles").ok().flatten().unwrap_or(self.profiles);
        }
        self.saved_offset = self.offset;
        self.reader = self.log.reader(self.offset);
        let set = self.set.clone();
        let _ = self.install(set);
    }

    /// Waits for new records or the next timer, briefly.
    fn idle(&self) {
        // The timers as the open transaction and the stage have them, if one is open.
        let next_due = match &self.open {
            Some(w) => {
                let stored = w.next_due(self.timer_cursor).ok().flatten();
                stored
                    .into_iter()
                    .chain(self.timers.first().map(|t| t.0))
                    .min()
            }
            None => self
                .store
                .read()
                .ok()
                .and_then(|r| r.next_due().ok().flatten()),
        };
        let now = (self.clock)().timestamp_millis();
        let wait = match next_due {
            Some(due) if due <= now => return,
            Some(due) => IDLE.min(Duration::from_millis((due - now) as u64)),
            None => IDLE,
        };
        let mut end = self.log.watch_end();
        let position = self.reader.position();
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(wait, end.wait_for(|&e| e > position)).await;
        });
    }

    /// One batch. Returns whether there was anything to do.
    fn step(&mut self) -> Result<bool, StageError> {
        let records = self.reader.read(BATCH)?;
        let now = self.batch_time(&records);
        let now_ms = now.timestamp_millis();
        let was_open = self.open.is_some();
        let w = match self.open.take() {
            Some(w) => w,
            None => self.store.write()?,
        };
        let due = self.due(&w, now_ms)?;
        let backfill_ids = match &self.backfill {
            Some(b) => Some(w.profile_ids(b.after, BACKFILL_CHUNK)?),
            None => None,
        };
        if records.is_empty() && due.is_empty() && backfill_ids.is_none() {
            // Segments to record as backfilled keep it open, so that the next save comes.
            if was_open || !self.backfilled.is_empty() {
                self.open = Some(w);
            } // else it wrote nothing: let it go
            return Ok(false);
        }
        let set = self.set.clone();
        let mut batch = Batch { stage: self, w: &w };
        for record in &records {
            let Ok(entry) = Entry::decode(&record.payload) else {
                continue;
            };
            if entry.status != Status::Accepted || entry.source == SOURCE {
                continue;
            }
            batch.message(&set, &entry, now)?;
        }
        for (due, id) in &due {
            batch.wake(&set, *id, *due, now)?;
        }
        if let Some(ids) = &backfill_ids {
            batch.backfill(&set, ids, now)?;
        }
        let end = records.last().map_or(self.offset, |r| r.offset + 1);
        let backfill_done = backfill_ids.map(|ids| ids.len() < BACKFILL_CHUNK);
        self.settle(&w)?;
        if let (Some(true), Some(b)) = (backfill_done, &self.backfill) {
            self.backfilled.extend(b.segments.iter().copied());
        }
        self.offset = end;
        self.open = Some(w);
        self.last_busy = Instant::now();
        // Over its bounds, the cache drops saved profiles; if it is still over, the unsaved ones
        // alone fill it, and a save lets them go.
        self.cache.trim();
        if self.last_saved.elapsed() >= self.save_every
            || self.cache.over()
            || backfill_done == Some(true)
        {
            self.save()?;
        }
        if backfill_done == Some(true) {
            tracing::info!("segment backfill finished");
            self.backfill = None;
        }
        Ok(true)
    }

    /// The moment a batch is evaluated at (see "The stage's time" above): the clock's when the
    /// stage has read everything, else the arrival time of the last record read; never earlier
    /// than the last batch's, nor later than the clock.
    fn batch_time(&mut self, records: &[Record]) -> DateTime<Utc> {
        let clock = (self.clock)();
        let behind = self.reader.position() < self.log.end();
        let arrived = records
            .last()
            .and_then(|r| Entry::decode(&r.payload).ok())
            .and_then(|e| DateTime::from_timestamp_micros(e.received_at_micros));
        let time = match arrived {
            Some(arrived) if behind => arrived.min(clock),
            _ => clock,
        };
        self.time = self.time.max(time);
        self.time
    }

    /// Timers due at `now`: the store's past the cursor, except those of profiles changed since
    /// the last save (their timers are in memory), and the stage's.
    fn due(&mut self, w: &Writer, now: Millis) -> Result<Vec<(Millis, u64)>, StoreError> {
        let stored = w.due(self.timer_cursor, now, TIMER_CHUNK)?;
        if let Some(last) = stored.last() {
            self.timer_cursor = Some(*last);
        }
        let cache = &self.cache;
        let mut due: Vec<(Millis, u64)> = stored
            .into_iter()
            .filter(|(_, id)| !cache.get(*id).is_some_and(|h| h.unsaved))
            .collect();
        due.extend(self.timers.range(..=(now, u64::MAX)).take(TIMER_CHUNK));
        Ok(due)
    }

    /// The end of a batch: appends what it emitted to the log, deletes the profiles merged away,
    /// and brings the stage's timers up to date with the profiles it touched. Those profiles,
    /// with their memberships and timers, are written at the next save.
    fn settle(&mut self, w: &Writer) -> Result<(), StageError> {
        self.append_emissions()?;
        for gone in self.removed.drain(..) {
            for key in gone.stored_members {
                w.set_member(&key, gone.id, false)?;
                *self.size_delta.entry(key.to_string()).or_default() -= 1;
            }
            w.move_timer(gone.id, gone.stored_recheck, None)?;
            if let Some(due) = gone.timer {
                self.timers.remove(&(due, gone.id));
            }
            w.delete_profile(gone.id)?;
        }
        for id in std::mem::take(&mut self.touched) {
            // Profiles merged away this batch are no longer in the cache.
            self.cache.resize(id);
            let Some(held) = self.cache.get_mut(id) else {
                continue;
            };
            held.touched = false;
            if !held.unsaved {
                held.unsaved = true;
                self.unsaved.push(id);
                // From now until the save, the stage's timers hold this profile's.
                if let Some(due) = held.timer {
                    self.timers.insert((due, id));
                }
            }
            let timer = held.profile.next_recheck();
            if timer != held.timer {
                if let Some(due) = held.timer {
                    self.timers.remove(&(due, id));
                }
                if let Some(due) = timer {
                    self.timers.insert((due, id));
                }
                held.timer = timer;
            }
        }
        Ok(())
    }

    /// Appends what the batch emitted to the log. The records arrive now, by the clock; the
    /// messages in them carry the stage's time, at which the changes happened.
    fn append_emissions(&mut self) -> Result<(), AppendError> {
        if self.emissions.is_empty() {
            return Ok(());
        }
        let now = (self.clock)();
        let keys: Vec<Option<u64>> = self
            .emissions
            .iter()
            .map(|e| Some(dedup::key(SOURCE, &e.message_id)))
            .collect();
        let (reservation, duplicate) = self.dedup.reserve(&keys, now, self.log.end());
        let mut records =
            RecordBatch::with_capacity(self.emissions.iter().map(|e| e.body.len() + 64).sum());
        for (e, dup) in self.emissions.iter().zip(duplicate) {
            if !dup {
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

    /// Keeps the caches within their bounds (it runs right after a save, when every profile
    /// is saved and may go): random eviction, by hash order.
    fn trim_cache(&mut self) {
        self.cache.trim();
        let max_identities = self.max_identities;
        if self.identities.len() > max_identities {
            let excess = self.identities.len() - max_identities * 9 / 10;
            let victims: Vec<String> = self.identities.keys().take(excess).cloned().collect();
            for key in victims {
                self.identities.remove(&key);
            }
        }
    }
}

/// One batch in progress: the stage and the open transaction.
struct Batch<'s, 'w> {
    stage: &'s mut Stage,
    w: &'w Writer,
}

/// The fields of a message the profile stage reads.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(rename = "userId", borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(rename = "anonymousId", borrow)]
    anonymous_id: Option<Cow<'a, str>>,
    #[serde(rename = "previousId", borrow)]
    previous_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
    #[serde(borrow)]
    traits: Option<&'a RawValue>,
}

impl Batch<'_, '_> {
    fn message(
        &mut self,
        set: &SegmentSet,
        entry: &Entry,
        now: DateTime<Utc>,
    ) -> Result<(), StageError> {
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
        let Some(resolved) = identity::resolve(self, ids)? else {
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
        let now_ms = now.timestamp_millis();
        let at = m
            .timestamp
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or(entry.received_at_micros / 1_000, |t| t.timestamp_millis());
        let event = event_name(kind, m.event.as_deref());
        let observed = Observed {
            kind,
            event,
            at,
            properties: m.properties,
            traits: m.traits,
        };
        let event_object = Event {
            name: event.unwrap_or_default().into(),
            at,
            now: now_ms,
            properties: (if kind == MessageType::Identify {
                m.traits
            } else {
                m.properties
            })
            .map(|p| Arc::from(p.get())),
            kind: kind.as_str().into(),
        };
        let trigger = if resolved.created || resolved.absorbed.is_some() {
            Trigger::All(Some(&event_object))
        } else {
            Trigger::Message {
                event,
                identify: kind == MessageType::Identify,
                event_object: &event_object,
            }
        };
        let held = self.held(resolved.id)?;
        held.profile.apply(&observed, &set.retention, now_ms);
        let cause = Some((Cause::Message, entry.received_at_micros));
        self.evaluate(set, resolved.id, trigger, now, cause)
    }

    fn wake(
        &mut self,
        set: &SegmentSet,
        id: u64,
        due: Millis,
        now: DateTime<Utc>,
    ) -> Result<(), StageError> {
        if !self.stage.cache.contains(id) && self.w.profile(id)?.is_none() {
            // A stale timer of a profile merged away: drop it.
            self.w.move_timer(id, Some(due), None)?;
            return Ok(());
        }
        self.stage.metrics.timer_wakeups.inc();
        // A timer that comes due with nothing to re-evaluate (its segment was unloaded) is
        // cleared by the evaluation.
        self.evaluate(
            set,
            id,
            Trigger::Timer,
            now,
            Some((Cause::Timer, due * 1_000)),
        )
    }

    fn backfill(
        &mut self,
        set: &SegmentSet,
        ids: &[u64],
        now: DateTime<Utc>,
    ) -> Result<(), StageError> {
        let segments = match &self.stage.backfill {
            Some(b) => b.segments.clone(),
            None => return Ok(()),
        };
        if let Some(needed) = self.stage.backfill.as_mut().and_then(|b| b.fill.take()) {
            self.fill_history(set, &needed, now)?;
        }
        for &id in ids {
            self.evaluate(set, id, Trigger::Only(&segments), now, None)?;
        }
        if let (Some(b), Some(last)) = (self.stage.backfill.as_mut(), ids.last()) {
            b.after = Some(*last);
        }
        Ok(())
    }

    /// Merges the occurrences the lake holds for `needed` into the profiles they belong to.
    fn fill_history(
        &mut self,
        set: &SegmentSet,
        needed: &Retention,
        now: DateTime<Utc>,
    ) -> Result<(), StageError> {
        let Some(lake) = self.stage.lake.clone() else {
            return Ok(());
        };
        let now_ms = now.timestamp_millis();
        let rows = match self
            .stage
            .runtime
            .block_on(history::read(&lake, needed, now_ms))
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "reading history back from the lake for a backfill failed; backfilling from the profiles alone");
                return Ok(());
            }
        };
        let mut touched = HashSet::new();
        for row in rows {
            let by_user = match &row.user_id {
                Some(u) => self.lookup(&user_key(u))?,
                None => None,
            };
            let id = match (by_user, &row.anonymous_id) {
                (Some(id), _) => id,
                (None, Some(a)) => match self.lookup(&anonymous_key(a))? {
                    Some(id) => id,
                    None => continue,
                },
                (None, None) => continue,
            };
            self.held(id)?
                .profile
                .record(&row.name, row.at, &row.values, true);
            touched.insert(id);
        }
        for id in &touched {
            self.held(*id)?.profile.prune(&set.retention, now_ms);
        }
        tracing::info!(
            profiles = touched.len(),
            "history read back from the lake for a backfill"
        );
        Ok(())
    }

    fn evaluate(
        &mut self,
        set: &SegmentSet,
        id: u64,
        trigger: Trigger,
        now: DateTime<Utc>,
        cause: Option<(Cause, i64)>,
    ) -> Result<(), StageError> {
        let now_ms = now.timestamp_millis();
        let metrics = self.stage.metrics.clone();
        let held = self.held(id)?;
        let evaluation = set.evaluate(&mut held.profile, trigger, now_ms);
        held.memberships_changed |= !evaluation.transitions.is_empty();
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
            self.stage.last_change.insert(key, now_ms);
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

impl Directory for Batch<'_, '_> {
    fn lookup(&mut self, identity: &str) -> Result<Option<u64>, StoreError> {
        if let Some(id) = self.stage.identities.get(identity) {
            return Ok(Some(*id));
        }
        let found = self.w.lookup(identity)?;
        if let Some(id) = found {
            self.stage.identities.insert(identity.to_string(), id);
        }
        Ok(found)
    }

    fn link(&mut self, identity: &str, id: u64) -> Result<(), StoreError> {
        self.w.link(identity, id)?;
        self.stage.identities.insert(identity.to_string(), id);
        Ok(())
    }

    fn profile(&mut self, id: u64) -> Result<&mut Profile, StoreError> {
        if !self.stage.cache.contains(id) {
            let profile = self.w.profile(id)?.ok_or_else(|| StoreError::missing(id))?;
            self.stage.cache.insert(id, Held::new(profile));
        }
        let held = self.stage.cache.get_mut(id).expect("inserted above");
        if !held.touched {
            held.touched = true;
            self.stage.touched.push(id);
        }
        Ok(&mut held.profile)
    }

    fn create(&mut self) -> Result<u64, StoreError> {
        let id = self.stage.next_id;
        self.stage.next_id += 1;
        self.stage.profiles += 1;
        let mut held = Held::new(Profile::new(id));
        held.touched = true;
        self.stage.cache.insert(id, held);
        self.stage.touched.push(id);
        Ok(id)
    }

    fn remove(&mut self, id: u64) -> Result<Profile, StoreError> {
        Directory::profile(self, id)?;
        let held = self.stage.cache.remove(id).expect("loaded above");
        self.stage.profiles -= 1;
        self.stage.removed.push(Removed {
            id,
            stored_members: held.stored_members,
            stored_recheck: held.stored_recheck,
            timer: held.timer,
        });
        Ok(held.profile)
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
