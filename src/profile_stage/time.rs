//! The stage's time and its timers (see "The stage's time"): time passes with the records read,
//! waking the timers due by then; with nothing to read, a clock record brings the clock's time in
//! through the log.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::cache::Cache;
use super::*;

/// Due timers handled per batch.
pub(super) const TIMER_CHUNK: usize = 2_000;
/// A clock record is appended at most this often (in the stage's time): a timer is woken up to
/// this late when no message comes.
pub(super) const TICK: Millis = 50;

/// The timers not in the store yet, and how far the store's were read.
#[derive(Default)]
pub(super) struct Timers {
    /// The timers of the profiles changed since the last save committed (the store's are as of
    /// that save), earliest first. Re-arming a profile's timer pushes the new one and leaves the
    /// old one to be skipped when met (lazy deletion): a re-arm, which a message that touches a
    /// time condition makes, costs one push, whatever the number of timers.
    changed: BinaryHeap<Reverse<(Millis, u64)>>,
    /// The last store timer read since the last save committed: those up to it were woken, or
    /// belong to changed profiles (whose timers are in `changed`).
    pub(super) cursor: Option<(Millis, u64)>,
    /// The store's first timer past `cursor`, once read (`None`: not read since the cursor or the
    /// store moved).
    pub(super) next_stored: Option<Option<Millis>>,
}

impl Timers {
    /// Arms a changed profile's timer (its earlier one, if any, goes stale).
    pub(super) fn arm(&mut self, due: Millis, id: u64) {
        self.changed.push(Reverse((due, id)));
    }

    /// From now on, the changed profiles' timers are `timers`, and the store's are read afresh.
    pub(super) fn reset(&mut self, timers: Vec<(Millis, u64)>) {
        self.changed = timers.into_iter().map(Reverse).collect();
        self.cursor = None;
        self.next_stored = None;
    }

    /// The earliest changed profile's timer that `current` says is still armed; the stale ones
    /// before it go.
    fn first(&mut self, current: impl Fn(Millis, u64) -> bool) -> Option<Millis> {
        while let Some(&Reverse((due, id))) = self.changed.peek() {
            if current(due, id) {
                return Some(due);
            }
            self.changed.pop();
        }
        None
    }

    /// Takes up to `limit` of the changed profiles' timers due at `now` that are still armed,
    /// earliest first.
    fn take_due(
        &mut self,
        now: Millis,
        limit: usize,
        current: impl Fn(Millis, u64) -> bool,
    ) -> Vec<(Millis, u64)> {
        let mut out: Vec<(Millis, u64)> = Vec::new();
        while out.len() < limit {
            match self.changed.peek() {
                Some(&Reverse(timer)) if timer.0 <= now => {
                    self.changed.pop();
                    // Armed twice over (re-armed back to an earlier time): woken once.
                    if current(timer.0, timer.1) && out.last() != Some(&timer) {
                        out.push(timer);
                    }
                }
                _ => break,
            }
        }
        out
    }
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
        let current = armed(&self.cache, self.saves.committed);
        Ok(stored.into_iter().chain(self.timers.first(current)).min())
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
    /// the last save committed (their timers are in memory), and the stage's. The stage's are
    /// taken: the caller wakes each.
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
        let current = armed(cache, committed);
        due.extend(self.timers.take_due(now, TIMER_CHUNK, current));
        Ok(due)
    }
}

/// Whether (due, id) is the timer a changed profile has now: one changed since the last save
/// committed (`committed`), still held (one merged away is not), and due then.
fn armed(cache: &Cache, committed: u64) -> impl Fn(Millis, u64) -> bool + '_ {
    move |due, id| {
        cache
            .get(id)
            .is_some_and(|h| (h.unsaved || h.saved_in > committed) && h.timer == Some(due))
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
        // Loaded now, so the evaluation below does not read it again.
        if stage.deleted.contains(&id) || !stage.load(id)? {
            // A stale timer of a profile merged away: drop it.
            stage.writes.timers.push((id, Some(due), None));
            return Ok(());
        }
        self.stage.metrics.timer_wakeups.inc();
        // A timer that comes due with nothing to re-evaluate (its segment was unloaded) is
        // cleared by the evaluation.
        self.evaluate(set, id, Trigger::Timer, Some((Cause::Timer, due * 1_000)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rearmed_timer_is_woken_once_at_its_new_time() {
        let mut timers = Timers::default();
        // Profile 1 armed for 5, then re-armed for 9, then back to 5; profile 2 armed for 7.
        timers.arm(5, 1);
        timers.arm(9, 1);
        timers.arm(5, 1);
        timers.arm(7, 2);
        let armed = |now: &[(Millis, u64)]| {
            let now = now.to_vec();
            move |due, id| now.contains(&(due, id))
        };
        let current = [(5, 1), (7, 2)];
        assert_eq!(timers.first(armed(&current)), Some(5));
        assert_eq!(timers.take_due(6, 10, armed(&current)), [(5, 1)]);
        // Profile 2 re-armed for 20: its 7 is stale, and the stale 9 of profile 1 too.
        timers.arm(20, 2);
        let current = [(20, 2)];
        assert_eq!(timers.take_due(19, 10, armed(&current)), []);
        assert_eq!(timers.first(armed(&current)), Some(20));
        assert_eq!(timers.take_due(25, 10, armed(&current)), [(20, 2)]);
        assert_eq!(timers.first(armed(&current)), None);
    }

    #[test]
    fn timers_come_due_in_order_and_in_chunks() {
        let mut timers = Timers::default();
        for id in (0..10u64).rev() {
            timers.arm(100 + id as Millis, id);
        }
        let all = |_, _| true;
        assert_eq!(timers.take_due(105, 3, all), [(100, 0), (101, 1), (102, 2)]);
        assert_eq!(
            timers.take_due(105, 10, all),
            [(103, 3), (104, 4), (105, 5)]
        );
        timers.reset(vec![(1, 1)]);
        assert_eq!(timers.first(all), Some(1));
        assert_eq!(timers.cursor, None);
    }
}
