//! The stage's time and its timers (see "The stage's time"): time passes with the records read,
//! waking the timers due by then; with nothing to read, a clock record brings the clock's time in
//! through the log.

use super::*;

/// Due timers handled per batch.
pub(super) const TIMER_CHUNK: usize = 2_000;
/// A clock record is appended at most this often (in the stage's time): a timer is woken up to
/// this late when no message comes.
pub(super) const TICK: Millis = 50;

/// The timers not in the store yet, and how far the store's were read.
#[derive(Default)]
pub(super) struct Timers {
    /// The timers of the profiles changed since the last save committed, (due, profile): the
    /// store's are as of that save.
    pub(super) changed: BTreeSet<(Millis, u64)>,
    /// The last store timer read since the last save committed: those up to it were woken, or
    /// belong to changed profiles (whose timers are in `changed`).
    pub(super) cursor: Option<(Millis, u64)>,
    /// The store's first timer past `cursor`, once read (`None`: not read since the cursor or the
    /// store moved).
    pub(super) next_stored: Option<Option<Millis>>,
}

/// Whether a record moves the stage's time: a message from a client, or a clock record. The
/// stage's own emissions do not (see "The stage's time").
pub(super) fn moves_time(entry: &Entry) -> bool {
    entry.source != SOURCE || entry.status == Status::Clock
}

impl Stage {
    /// The stage's time, as a date.
    pub(super) fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.time).unwrap_or_default()
    }

    /// When the stage will append a clock record, by the clock, if no record comes first: once
    /// a timer is due, and at least [`TICK`] after the stage's time.
    pub(super) fn next_tick(&mut self) -> Result<Option<Millis>, StoreError> {
        Ok(self.next_due()?.map(|due| due.max(self.time + TICK)))
    }

    /// The earliest timer not woken yet: the store's past the cursor (it may be a changed
    /// profile's, which [`Stage::due`] passes over) or the stage's.
    pub(super) fn next_due(&mut self) -> Result<Option<Millis>, StoreError> {
        let stored = match self.timers.next_stored {
            Some(due) => due,
            None => {
                let due = self.read.next_due(self.timers.cursor)?;
                self.timers.next_stored = Some(due);
                due
            }
        };
        Ok(stored
            .into_iter()
            .chain(self.timers.changed.first().map(|t| t.0))
            .min())
    }

    /// Appends a clock record: the clock's time, for the stage to read back.
    pub(super) fn append_clock(&mut self) -> Result<(), AppendError> {
        let now = (self.clock)();
        let mut record = RecordBatch::with_capacity(64);
        record.push_with(|b| Entry::encode(b, Status::Clock, now, SOURCE, "", "", |_| {}));
        self.runtime
            .block_on(self.appender.append_unkeyed(record))
            .map(drop)
    }

    /// Timers due at `now`: the store's past the cursor, except those of profiles changed since
    /// the last save committed (their timers are in memory), and the stage's.
    pub(super) fn due(&mut self, now: Millis) -> Result<Vec<(Millis, u64)>, StoreError> {
        let stored = self.read.due(self.timers.cursor, now, TIMER_CHUNK)?;
        if let Some(last) = stored.last() {
            self.timers.cursor = Some(*last);
            self.timers.next_stored = None;
        }
        let (cache, committed) = (&self.cache, self.saves.committed);
        let changed = |id: u64| {
            cache
                .get(id)
                .is_some_and(|h| h.unsaved || h.saved_in > committed)
        };
        let mut due: Vec<(Millis, u64)> =
            stored.into_iter().filter(|(_, id)| !changed(*id)).collect();
        due.extend(
            self.timers
                .changed
                .range(..=(now, u64::MAX))
                .take(TIMER_CHUNK),
        );
        Ok(due)
    }
}

impl Batch<'_> {
    /// Time passes to `to` (a record's arrival), if that is later than the stage's time: every
    /// timer due by then is woken first, at `to`, whatever profile it is of.
    pub(super) fn pass_time(
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

    pub(super) fn wake(
        &mut self,
        set: &SegmentSet,
        id: u64,
        due: Millis,
    ) -> Result<(), StageError> {
        let stage = &mut self.stage;
        if stage.deleted.contains(&id)
            || (!stage.cache.contains(id) && stage.read.profile(id)?.is_none())
        {
            // A stale timer of a profile merged away: drop it.
            stage.writes.timers.push((id, Some(due), None));
            stage.timers.changed.remove(&(due, id));
            return Ok(());
        }
        self.stage.metrics.timer_wakeups.inc();
        // A timer that comes due with nothing to re-evaluate (its segment was unloaded) is
        // cleared by the evaluation.
        self.evaluate(set, id, Trigger::Timer, Some((Cause::Timer, due * 1_000)))
    }
}
