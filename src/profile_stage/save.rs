//! The stage's side of the save protocol (see "Batches, saves, exactly once"): handing a save to
//! the [`saver`](super::saver) thread, taking in its outcome, and going back to the last save
//! committed when anything fails. Also keeps the caches within bounds once a save lets them.

use super::*;

/// The stage's side of the saves: the saver, the save in flight, and when the last went.
pub(super) struct Saves {
    pub(super) saver: Saver,
    pub(super) in_flight: Option<InFlight>,
    /// The number of the last save handed off, and of the last one committed.
    pub(super) handed: u64,
    pub(super) committed: u64,
    /// The log offset of the last save handed off.
    pub(super) saved_offset: u64,
    /// When the last save was handed off.
    pub(super) last_saved: Instant,
    /// `profiles.save_interval`.
    pub(super) every: Duration,
}

/// The save handed to the saver and not committed yet.
pub(super) struct InFlight {
    /// Its number (see `Held::saved_in`).
    pub(super) number: u64,
    pub(super) deletes: Vec<u64>,
}

impl Stage {
    /// Whether anything was done since the last save handed off.
    pub(super) fn pending(&self) -> bool {
        self.offset != self.saves.saved_offset
            || !self.unsaved.is_empty()
            || !self.writes.is_empty()
    }

    /// Hands the saver every profile changed since the last save, with its timer, `writes` (the
    /// members index changes among them), and the offset reached. One save is in
    /// flight at a time: this first waits for the one before.
    pub(super) fn hand_off(&mut self) -> Result<(), StageError> {
        if self.saves.in_flight.is_some() {
            let waited = Instant::now();
            self.wait_for_save()?;
            self.pause(SavePause::Wait, waited);
        }
        let started = Instant::now();
        let number = self.saves.handed + 1;
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
        self.saves.saver.send(Save {
            profiles,
            writes,
            offset: self.offset,
            time: self.time,
            next_id: self.next_id,
            profile_count: self.profiles,
        })?;
        self.saves.in_flight = Some(InFlight { number, deletes });
        self.saves.handed = number;
        self.saves.saved_offset = self.offset;
        self.saves.last_saved = Instant::now();
        self.pause(SavePause::HandOff, started);
        Ok(())
    }

    /// Counts a pause of the stage for saves, from `started` until now.
    pub(super) fn pause(&self, at: SavePause, started: Instant) {
        self.metrics
            .save_pauses
            .get_or_create(&PauseLabels { at })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Hands off what is pending and waits until every save has committed.
    pub(super) fn flush(&mut self) -> Result<(), StageError> {
        if self.pending() {
            self.hand_off()?;
        }
        self.wait_for_save()
    }

    /// Waits for the save in flight, if any, to finish.
    pub(super) fn wait_for_save(&mut self) -> Result<(), StageError> {
        if self.saves.in_flight.is_some() {
            let outcome = self.saves.saver.wait();
            self.saved(outcome)?;
        }
        Ok(())
    }

    /// Takes in the outcome of the save in flight, if it has finished.
    pub(super) fn poll_save(&mut self) -> Result<(), StageError> {
        if self.saves.in_flight.is_some() {
            if let Some(outcome) = self.saves.saver.poll() {
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
    pub(super) fn saved(&mut self, outcome: Result<(), StoreError>) -> Result<(), StageError> {
        let flight = self.saves.in_flight.take().expect("a save in flight");
        outcome?;
        self.saves.committed = flight.number;
        self.read = self.store.read()?;
        for id in &flight.deletes {
            self.deleted.remove(id);
        }
        let cache = &self.cache;
        let changed = self
            .unsaved
            .iter()
            .filter_map(|&id| Some((cache.get(id)?.timer?, id)))
            .collect();
        self.timers.reset(changed);
        self.trim_cache();
        Ok(())
    }

    /// Forgets everything not saved and goes back to the store's state.
    pub(super) fn reset(&mut self) {
        self.metrics.redos.inc();
        // Whatever the save in flight does, the store will be as of some save: wait for it.
        if self.saves.in_flight.take().is_some() {
            let _ = self.saves.saver.wait();
        }
        self.cache.clear();
        self.touched.clear();
        self.unsaved.clear();
        self.writes = Writes::default();
        self.deleted.clear();
        self.identities.map.clear();
        self.removed.clear();
        self.emissions.clear();
        self.set_aside.clear();
        self.timers.reset(Vec::new());
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
        self.saves.saved_offset = self.offset;
        self.reader = self.log.reader(self.offset);
        if let Err(e) = self.read_own_ahead() {
            // The dedup still drops what it holds of them.
            tracing::error!(error = %e, "reading the stage's own records ahead of the redo failed");
        }
        let set = self.set.clone();
        let _ = self.install(set);
    }

    /// Keeps the caches within their bounds (it runs right after a save committed, when every
    /// profile not changed since is saved and may go): random eviction, by hash order.
    pub(super) fn trim_cache(&mut self) {
        self.cache.trim(self.saves.committed);
        // Links made since the last save was handed off are not in the store yet: they stay (and
        // the save in flight has just committed).
        self.identities.trim(self.writes.links.keys());
    }
}
