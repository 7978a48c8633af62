//! The saver: writes what the profile stage hands it to the profile store, on its own thread, so
//! that the stage goes on applying messages while a save is encoded, written and committed (a
//! save of the 46,000 profiles a busy store changed in five seconds takes seconds).
//!
//! One save is in flight at a time. The stage hands over the changed profiles as `Arc`s and
//! changes its own copy of one only by copying it first (`Arc::make_mut`), so the saver writes
//! each profile as it was at the hand-off. The saver encodes them all before it writes anything,
//! letting go of each once encoded, so that the stage copies only the profiles it changes in
//! that short while (encoding is a small part of a save).
//!
//! The saver runs at the stage's CPU priority (nice 10). At the lowest it took what the core had
//! left, which was right while a save cost a B-tree's page copies (at the stage's priority it
//! made the stage apply at half speed: issue 5's notes); with the LSM store a save costs a few µs
//! of CPU per profile, and at nice 19 on a busy core one took 12 s for 0.2 s of work while the
//! stage, its cache full of unsaved profiles, waited for it (issue 19's notes). The stage waits
//! for a save only when its cache is full of profiles not saved yet.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use crate::intake_log::Consumer;
use crate::metrics::{ProfileStageMetrics, SegmentLabels};
use crate::profiles::profile::{Millis, Name, Profile};
use crate::profiles::store::{ProfileStore, StoreError, Writer};

/// Everything written besides the profiles themselves, gathered since the last hand-off.
#[derive(Default)]
pub struct Writes {
    /// Identities linked to a profile.
    pub links: hashbrown::HashMap<String, u64>,
    /// (segment, profile, member): the members index.
    pub members: Vec<(Name, u64, bool)>,
    /// (profile, from, to): timers moved.
    pub timers: Vec<(u64, Option<Millis>, Option<Millis>)>,
    /// Profiles merged away.
    pub deletes: Vec<u64>,
    /// How segment sizes changed.
    pub size_delta: HashMap<Name, i64>,
    /// When each segment that changed last did.
    pub last_change: HashMap<String, Millis>,
    /// Segments (key, rule fingerprint) whose backfill finished or that need none.
    /// The rule version each segment is backfilled for (`None`: none, it was unloaded).
    pub backfilled: Vec<(String, Option<u64>)>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
            && self.members.is_empty()
            && self.timers.is_empty()
            && self.deletes.is_empty()
            && self.size_delta.is_empty()
            && self.last_change.is_empty()
            && self.backfilled.is_empty()
    }
}

/// One save: committed in one transaction, so the store moves from one save's state to the next.
pub struct Save {
    pub profiles: Vec<Arc<Profile>>,
    pub writes: Writes,
    /// The log offset everything here reflects, and the counters kept in `meta`.
    pub offset: u64,
    /// The stage's time at `offset` (see "The stage's time" in `crate::profile_stage`).
    pub time: Millis,
    pub next_id: u64,
    pub profile_count: u64,
}

pub struct Saver {
    saves: Option<SyncSender<Save>>,
    done: Receiver<Result<(), StoreError>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Tests close it to hold a save in flight.
    #[cfg(test)]
    pub gate: Arc<Gate>,
}

/// Saves wait at it while it is closed.
#[cfg(test)]
pub struct Gate {
    open: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
}

#[cfg(test)]
impl Gate {
    pub fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let open = self.open.lock().unwrap();
        drop(self.changed.wait_while(open, |open| !*open).unwrap());
    }
}

impl Saver {
    /// Starts the saver; after each save commits, it moves the stage's log cursor (`consumer`) up
    /// to the save's offset, so that the log keeps what a redo from that save needs.
    pub fn start(
        store: Arc<ProfileStore>,
        metrics: Arc<ProfileStageMetrics>,
        mut consumer: Consumer,
    ) -> std::io::Result<Saver> {
        let (saves, inbox) = std::sync::mpsc::sync_channel::<Save>(1);
        let (report, done) = std::sync::mpsc::sync_channel(1);
        #[cfg(test)]
        let gate = Arc::new(Gate {
            open: std::sync::Mutex::new(true),
            changed: std::sync::Condvar::new(),
        });
        #[cfg(test)]
        let held = gate.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-saver".into())
            .spawn(move || {
                crate::thread_priority::lower();
                for save in inbox {
                    #[cfg(test)]
                    held.pass();
                    let started = Instant::now();
                    let written = save.profiles.len() as u64;
                    let offset = save.offset;
                    let result =
                        write(&store, &metrics, save).and_then(|()| Ok(consumer.commit(offset)?));
                    if result.is_ok() {
                        metrics.saved_profiles.inc_by(written);
                        metrics
                            .save_seconds
                            .observe(started.elapsed().as_secs_f64());
                    }
                    if report.send(result).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Saver {
            saves: Some(saves),
            done,
            thread: Some(thread),
            #[cfg(test)]
            gate,
        })
    }

    /// Hands `save` over; the caller waits for the previous one first ([`Saver::wait`]).
    pub fn send(&self, save: Save) -> Result<(), StoreError> {
        self.saves
            .as_ref()
            .expect("open until dropped")
            .send(save)
            .map_err(|_| StoreError::saver_gone())
    }

    /// The outcome of the save in flight, if it has finished.
    pub fn poll(&self) -> Option<Result<(), StoreError>> {
        match self.done.try_recv() {
            Ok(result) => Some(result),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(StoreError::saver_gone())),
        }
    }

    /// Waits for the save in flight to finish.
    pub fn wait(&self) -> Result<(), StoreError> {
        self.done.recv().map_err(|_| StoreError::saver_gone())?
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has written what it holds.
        self.saves = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write(
    store: &ProfileStore,
    metrics: &ProfileStageMetrics,
    save: Save,
) -> Result<(), StoreError> {
    let Save {
        profiles,
        writes,
        offset,
        time,
        next_id,
        profile_count,
    } = save;
    // Encoded first, and each profile let go of once it is: until then the stage copies one it
    // changes (`Arc::make_mut`). Held while the whole save was written, nearly every profile was
    // copied once per save.
    let mut encoded = store.encoded();
    for profile in profiles {
        encoded.push(&profile);
    }
    let mut w = store.write()?;
    for (identity, id) in &writes.links {
        w.link(identity, *id);
    }
    for (segment, id, member) in &writes.members {
        w.set_member(segment, *id, *member);
    }
    for &(id, from, to) in &writes.timers {
        w.move_timer(id, from, to);
    }
    for &id in &writes.deletes {
        w.delete_profile(id);
    }
    w.put_profiles(&encoded);
    drop(encoded);
    segment_stats(&mut w, metrics, &writes)?;
    w.set_meta("offset", offset);
    w.set_meta("time", time.max(0) as u64);
    w.set_meta("next_id", next_id);
    w.set_meta("profiles", profile_count);
    w.commit()?;
    metrics.profiles.set(profile_count as i64);
    Ok(())
}

/// Brings the stats of the segments that changed up to date: sizes, last changes, the rule
/// versions backfilled.
fn segment_stats(
    w: &mut Writer,
    metrics: &ProfileStageMetrics,
    writes: &Writes,
) -> Result<(), StoreError> {
    let mut changed: Vec<&str> = writes.size_delta.keys().map(|k| &**k).collect();
    changed.extend(writes.last_change.keys().map(|k| k.as_str()));
    changed.extend(writes.backfilled.iter().map(|(k, _)| k.as_str()));
    changed.sort_unstable();
    changed.dedup();
    for key in changed {
        let mut stats = w.segment_stats(key)?;
        let delta = writes.size_delta.get(key).copied().unwrap_or(0);
        stats.size = (stats.size as i64 + delta).max(0) as u64;
        if let Some(at) = writes.last_change.get(key) {
            stats.last_change = Some(*at);
        }
        if let Some((_, fingerprint)) = writes.backfilled.iter().find(|(k, _)| k == key) {
            stats.backfilled = *fingerprint;
        }
        w.put_segment_stats(key, &stats)?;
        metrics
            .sizes
            .get_or_create(&SegmentLabels {
                segment: key.to_string(),
            })
            .set(stats.size as i64);
    }
    Ok(())
}
