//! Backfill of new or edited segments: their history read back from the lake first (a step of
//! its own, see [`Batch::fill_history`]), then every saved profile evaluated for them, a chunk per
//! batch.

use super::batch::count_drops;
use super::*;

pub(super) struct Backfill {
    pub(super) segments: HashSet<usize>,
    pub(super) after: Option<u64>,
    /// History to read back from the lake before the first chunk, if the segments need any (and
    /// the stage has a lake).
    pub(super) fill: Option<Retention>,
    /// Failed reads of the lake so far, and when to try again.
    pub(super) fill_failures: u32,
    pub(super) retry_at: Option<Instant>,
}

/// The history the `stale` segments need, if any.
pub(super) fn needed_history(set: &SegmentSet, stale: &HashSet<usize>) -> Option<Retention> {
    let mut needed = Retention::nothing();
    for &i in stale {
        needed.union(&set.segments[i].deps.retention);
    }
    let nothing = matches!(&needed.history, Names::Only(n) if n.is_empty()) || needed.window == 0;
    (!nothing).then_some(needed)
}

/// Profiles backfilled per batch, so that a backfill never holds up real-time evaluation long.
pub(super) const BACKFILL_CHUNK: usize = 1_000;

/// History is read back from the lake for a backfill only while the stage is at most this many
/// records behind the log's end (they are listed, to leave their rows out).
pub(super) const MAX_AHEAD: u64 = 200_000;

pub(super) const DAY: Millis = 86_400_000;

impl Stage {
    /// The history the backfill waits for, if it is time to read it back from the lake: not
    /// while a failed read waits to be tried again, nor while the stage is far behind the log
    /// (every record ahead of it is listed, to leave its rows out: see
    /// [`Batch::fill_history`]).
    pub(super) fn fill_due(&self) -> Option<Retention> {
        let b = self.backfill.as_ref()?;
        let waiting = b.retry_at.is_some_and(|at| at > Instant::now());
        let behind = self.log.end().saturating_sub(self.offset) > MAX_AHEAD;
        (!waiting && !behind).then(|| b.fill.clone()).flatten()
    }

    /// A step that reads the backfill's history back from the lake, and nothing else: no record
    /// is applied while the profiles take it in, so what a save hands off in the middle (to keep
    /// the cache bounded) is as of the stage's offset. A failed read is tried again later, with
    /// growing pauses; the backfill waits for it.
    pub(super) fn fill(&mut self, needed: Retention) -> Result<bool, StageError> {
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
    pub(super) fn keys_ahead(&self) -> Result<HashSet<u128>, StageError> {
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
                        keys.insert(message_key(e.source, e.message_id));
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Batch<'_> {
    pub(super) fn backfill(&mut self, set: &SegmentSet, ids: &[u64]) -> Result<(), StageError> {
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
    pub(super) fn fill_history(
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
    pub(super) fn owner(
        &mut self,
        row: &history::LakeOccurrence,
    ) -> Result<Option<u64>, StageError> {
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
    pub(super) fn prune(
        &mut self,
        set: &SegmentSet,
        touched: &mut HashSet<u64>,
    ) -> Result<(), StageError> {
        let now = self.stage.time;
        let mut dropped = Dropped::default();
        for id in touched.drain() {
            dropped.history += self.held(id)?.profile_mut().prune(&set.retention, now);
        }
        count_drops(&self.stage.metrics, dropped);
        Ok(())
    }
}
