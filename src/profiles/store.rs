//! The durable profile store: an LSM tree (fjall) in a folder under the data dir.
//!
//! Keyspaces (fjall's tables; keys are bytes, ordered, so integers are big-endian):
//! - `profiles`: profile id → the profile (its encoding: [`super::codec`]).
//! - `identities`: `user:<id>` / `anon:<id>` → profile id.
//! - `members`: (segment key, profile id) → (), for paging through a segment.
//! - `timers`: (due millis, profile id) → (): the timer index. Due entries are read in time order
//!   with a range scan, so waking a profile never scans the others.
//! - `segments`: segment key → its stats (size, last change, the rule version backfilled).
//! - `names`: number (u32) → name, the [`Dictionary`] stored profiles write names by.
//! - `meta`: `offset` (the intake-log offset every keyspace reflects), `next_id`, …
//!
//! Everything the profile stage did since its last save, the log offset included, is written as
//! one atomic batch, synced before the save counts as done, so a crash leaves the store as of some
//! save and the consumer resumes from exactly there.
//!
//! ## Why an LSM tree, and fjall
//! A save rewrites tens of thousands of profiles spread at random over millions. In a B-tree (redb,
//! which this store used before) each one copies its leaf page and the branch pages above it; an
//! LSM tree appends the batch to its journal and sorts it in memory, and its flushes and
//! compactions merge in large sequential runs. `benches/store.sh` runs the same fill, saves
//! (20,000 random keys, synced) and point reads on both, pinned to one core, CPU of every thread:
//!
//! | 400 B values         | save, per profile | point read | on disk  |
//! |----------------------|-------------------|------------|----------|
//! | redb, 1,000,000      | 41.4 µs           | 7.9 µs     | 1.1 GB   |
//! | fjall, 1,000,000     | 7.8 µs            | 10.7 µs    | 0.55 GB  |
//! | redb, 10,000,000     | 73.1 µs           | 15.3 µs    | 10.7 GB  |
//! | fjall, 10,000,000    | 11.6 µs           | 12.1 µs    | 5.1 GB   |
//!
//! (fjall's figures include its flushes and compactions.) With redb the saver was what kept the
//! profile stage behind at a million users (docs/performance.md). fjall is pure Rust like redb (no
//! C++ build, unlike RocksDB), keeps a bounded block cache, and has atomic batches across
//! keyspaces and consistent snapshots, which is what the save protocol needs.
//!
//! Profiles' blocks are compressed (lz4) as fjall does by default, from the third level on. At
//! every level they took 35 % fewer bytes (393 instead of 602 per profile in the scale
//! benchmark's store), but over 10,000,000 profiles fjall's compactions then took 22–25 % of the
//! core instead of 7 %, and the stage applied a third fewer messages (docs/performance.md, "Names
//! by number"). A keyspace keeps the policy it was made with.

use std::path::Path;
use std::sync::Arc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};
use serde::{Deserialize, Serialize};

use super::codec::{self, CodecError};
use super::dictionary::Dictionary;
use super::profile::{Millis, Profile};

#[derive(Debug, thiserror::Error)]
#[error("profile store: {0}")]
pub struct StoreError(String);

impl StoreError {
    pub fn missing(id: u64) -> StoreError {
        StoreError(format!("profile {id} is indexed but missing"))
    }

    pub fn saver_gone() -> StoreError {
        StoreError("the saver thread stopped".into())
    }

    fn corrupt(what: &str) -> StoreError {
        StoreError(format!("a stored {what} is malformed"))
    }
}

error_from!(StoreError: fjall::Error, CodecError, serde_json::Error, std::io::Error);

/// What is known of one segment across profiles.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentStats {
    pub size: u64,
    /// When a member last entered or left.
    pub last_change: Option<Millis>,
    /// The fingerprint of the rule whose backfill finished; another one means backfill again.
    pub backfilled: Option<u64>,
}

/// The keyspaces, as handles (cheap to clone).
#[derive(Clone)]
struct Keyspaces {
    profiles: Keyspace,
    identities: Keyspace,
    members: Keyspace,
    timers: Keyspace,
    segments: Keyspace,
    meta: Keyspace,
    names: Keyspace,
}

impl Keyspaces {
    fn all(&self) -> [(&'static str, &Keyspace); 7] {
        [
            ("profiles", &self.profiles),
            ("identities", &self.identities),
            ("members", &self.members),
            ("timers", &self.timers),
            ("segments", &self.segments),
            ("meta", &self.meta),
            ("names", &self.names),
        ]
    }
}

pub struct ProfileStore {
    db: Database,
    ks: Keyspaces,
    words: Arc<Dictionary>,
}

impl ProfileStore {
    /// Opens (or creates) the store in `dir`, with `cache_bytes` of block cache.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<ProfileStore, StoreError> {
        std::fs::create_dir_all(dir)?;
        if dir.join("profiles.redb").exists() {
            return Err(StoreError(format!(
                "{} holds a store written by an earlier version (profiles.redb); \
                 move it away to start a new one (profiles are then rebuilt only from what the \
                 intake log still holds)",
                dir.display()
            )));
        }
        let builder = Database::builder(dir.join("store"))
            .cache_size(cache_bytes as u64)
            // Saves sync themselves, once per batch.
            .manual_journal_persist(true)
            // What an open replays: 1.1 GB of journal took 23.5 s to replay (a store the
            // profile generator left unflushed). At the least fjall allows, a restart replays
            // about a second's worth; the memtables are flushed that much more often.
            .max_journaling_size(64 << 20);
        // fjall's flush and compaction workers are spawned by `open` and take the opening
        // thread's CPU priority: opened from a thread at the saver's, they are background work,
        // not an equal of ingestion. Should they fall behind, fjall stalls the saver's writes,
        // and so the stage: the work stays bounded.
        let db = std::thread::scope(|s| {
            s.spawn(|| {
                crate::thread_priority::lower();
                builder.open()
            })
            .join()
            .expect("opening the store does not panic")
        })?;
        let keyspace = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        let ks = Keyspaces {
            profiles: keyspace("profiles")?,
            identities: keyspace("identities")?,
            members: keyspace("members")?,
            timers: keyspace("timers")?,
            segments: keyspace("segments")?,
            meta: keyspace("meta")?,
            names: keyspace("names")?,
        };
        let words = Arc::new(read_dictionary(&ks.names)?);
        Ok(ProfileStore { db, ks, words })
    }

    /// The names stored profiles refer to by number; whoever encodes or decodes profiles outside
    /// the store (the profile cache's cold tier) uses this one.
    pub fn dictionary(&self) -> &Arc<Dictionary> {
        &self.words
    }

    /// An empty buffer of profiles to [`Writer::put_profiles`], encoded with this store's names.
    pub fn encoded(&self) -> Encoded {
        Encoded {
            words: self.words.clone(),
            bytes: Vec::new(),
            ends: Vec::new(),
        }
    }

    /// The bytes the store takes on disk.
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.db.disk_space()?)
    }

    /// What each keyspace's tables take on disk (its memtable not counted), by name.
    pub fn keyspace_bytes(&self) -> Vec<(&'static str, u64)> {
        self.ks
            .all()
            .into_iter()
            .map(|(name, keyspace)| (name, keyspace.disk_space()))
            .collect()
    }

    /// Writes every keyspace's memtable out to its tables and waits, so that the journal holds
    /// nothing to replay at the next open (the profile generator ends with it).
    pub fn flush(&self) -> Result<(), StoreError> {
        for (_, keyspace) in self.ks.all() {
            keyspace.rotate_memtable_and_wait()?;
        }
        Ok(())
    }

    pub fn read(&self) -> Result<Reader, StoreError> {
        Ok(Reader {
            view: self.db.snapshot(),
            ks: self.ks.clone(),
            words: self.words.clone(),
        })
    }

    pub fn write(&self) -> Result<Writer, StoreError> {
        Ok(Writer {
            batch: self.db.batch().durability(Some(PersistMode::SyncAll)),
            ks: self.ks.clone(),
            words: self.words.clone(),
            words_written: None,
        })
    }
}

/// A consistent view of the store as of its last commit.
pub struct Reader {
    view: Snapshot,
    ks: Keyspaces,
    words: Arc<Dictionary>,
}

impl Reader {
    pub fn profile(&self, id: u64) -> Result<Option<Profile>, StoreError> {
        Ok(match self.view.get(&self.ks.profiles, id.to_be_bytes())? {
            Some(bytes) => Some(codec::decode(&bytes, &self.words)?),
            None => None,
        })
    }

    pub fn lookup(&self, identity: &str) -> Result<Option<u64>, StoreError> {
        self.view
            .get(&self.ks.identities, identity)?
            .map(|v| be_u64(&v, "identity"))
            .transpose()
    }

    /// Up to `limit` member profile ids of `segment`, in id order, after `after`.
    pub fn members(
        &self,
        segment: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        let from = member_key(segment, start);
        let to = member_key(segment, u64::MAX);
        let mut out = Vec::new();
        for row in self.view.range(&self.ks.members, from..=to).take(limit) {
            let key = row.key()?;
            out.push(be_u64(&key[key.len() - 8..], "member")?);
        }
        Ok(out)
    }

    pub fn segment_stats(&self, key: &str) -> Result<SegmentStats, StoreError> {
        segment_stats(self.view.get(&self.ks.segments, key)?)
    }

    /// The keys of every segment with stats, loaded or not.
    pub fn segment_keys(&self) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        for row in self.view.iter(&self.ks.segments) {
            let key = row.key()?;
            let key = std::str::from_utf8(&key).map_err(|_| StoreError::corrupt("segment key"))?;
            keys.push(key.to_string());
        }
        Ok(keys)
    }

    /// The earliest timer after `after`, if any.
    pub fn next_due(&self, after: Option<(Millis, u64)>) -> Result<Option<Millis>, StoreError> {
        let start = timer_key(timer_after(after));
        match self.view.range(&self.ks.timers, start..).next() {
            Some(row) => Ok(Some(timer_of(&row.key()?)?.0)),
            None => Ok(None),
        }
    }

    /// Up to `limit` timers (due time, profile) due at `now` and after `after`, earliest first.
    pub fn due(
        &self,
        after: Option<(Millis, u64)>,
        now: Millis,
        limit: usize,
    ) -> Result<Vec<(Millis, u64)>, StoreError> {
        let start = timer_after(after);
        let end = (now, u64::MAX);
        if start > end {
            return Ok(Vec::new());
        }
        let range = timer_key(start)..=timer_key(end);
        let mut out = Vec::new();
        for row in self.view.range(&self.ks.timers, range).take(limit) {
            out.push(timer_of(&row.key()?)?);
        }
        Ok(out)
    }

    /// Profile ids after `after` in id order, for backfill.
    pub fn profile_ids(&self, after: Option<u64>, limit: usize) -> Result<Vec<u64>, StoreError> {
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for row in self
            .view
            .range(&self.ks.profiles, start.to_be_bytes()..)
            .take(limit)
        {
            out.push(be_u64(&row.key()?, "profile id")?);
        }
        Ok(out)
    }

    pub fn meta(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.view
            .get(&self.ks.meta, key)?
            .map(|v| be_u64(&v, "meta value"))
            .transpose()
    }
}

/// Profiles in their stored encoding, one after another in one buffer, ready for
/// [`Writer::put_profiles`]: whoever holds the profiles can let each go once it is encoded.
/// Made by [`ProfileStore::encoded`].
pub struct Encoded {
    words: Arc<Dictionary>,
    bytes: Vec<u8>,
    /// Each profile's id and where its encoding ends in `bytes`.
    ends: Vec<(u64, usize)>,
}

impl Encoded {
    pub fn push(&mut self, profile: &Profile) {
        codec::encode(profile, &self.words, &mut self.bytes);
        self.ends.push((profile.id, self.bytes.len()));
    }

    /// The bytes of every profile encoded so far.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(_, end)| end));
        self.ends
            .iter()
            .zip(starts)
            .map(|(&(id, end), start)| (id, &self.bytes[start..end]))
    }
}

/// One atomic change to the store; nothing is visible or durable before [`Writer::commit`].
/// Its reads ([`Writer::segment_stats`]) see the store as last committed, not its own writes.
pub struct Writer {
    batch: fjall::OwnedWriteBatch,
    ks: Keyspaces,
    words: Arc<Dictionary>,
    /// Where the names this batch writes end (their numbers are below it).
    words_written: Option<u32>,
}

impl Writer {
    /// Writes profiles encoded beforehand, with every name numbered and not yet durable (those
    /// the profiles use among them).
    pub fn put_profiles(&mut self, profiles: &Encoded) {
        for (id, bytes) in profiles.iter() {
            self.batch
                .insert(&self.ks.profiles, id.to_be_bytes(), bytes);
        }
        let (first, names) = self.words.unsaved();
        for (id, name) in (first..).zip(&names) {
            self.batch
                .insert(&self.ks.names, id.to_be_bytes(), name.as_bytes());
        }
        self.words_written = Some(first + names.len() as u32);
    }

    pub fn delete_profile(&mut self, id: u64) {
        self.batch.remove(&self.ks.profiles, id.to_be_bytes());
    }

    pub fn link(&mut self, identity: &str, id: u64) {
        self.batch
            .insert(&self.ks.identities, identity, id.to_be_bytes());
    }

    pub fn set_member(&mut self, segment: &str, id: u64, member: bool) {
        let key = member_key(segment, id);
        if member {
            self.batch.insert(&self.ks.members, key, []);
        } else {
            self.batch.remove(&self.ks.members, key);
        }
    }

    /// Moves a profile's timer from `old` to `new`.
    pub fn move_timer(&mut self, id: u64, old: Option<Millis>, new: Option<Millis>) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.batch.remove(&self.ks.timers, timer_key((old, id)));
        }
        if let Some(new) = new {
            self.batch.insert(&self.ks.timers, timer_key((new, id)), []);
        }
    }

    pub fn segment_stats(&self, key: &str) -> Result<SegmentStats, StoreError> {
        segment_stats(self.ks.segments.get(key)?)
    }

    pub fn put_segment_stats(&mut self, key: &str, stats: &SegmentStats) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(stats)?;
        self.batch.insert(&self.ks.segments, key, bytes);
        Ok(())
    }

    pub fn set_meta(&mut self, key: &str, value: u64) {
        self.batch.insert(&self.ks.meta, key, value.to_be_bytes());
    }

    /// Makes everything written visible and durable (synced) at once.
    pub fn commit(self) -> Result<(), StoreError> {
        self.batch.commit()?;
        if let Some(end) = self.words_written {
            self.words.saved(end);
        }
        Ok(())
    }
}

/// The dictionary as stored: numbers from 0 with no gap (batches write them as a prefix).
fn read_dictionary(names: &Keyspace) -> Result<Dictionary, StoreError> {
    let mut words = Vec::new();
    for row in names.iter() {
        let (key, value) = row.into_inner()?;
        let id = <[u8; 4]>::try_from(&key[..])
            .map(u32::from_be_bytes)
            .map_err(|_| StoreError::corrupt("name number"))?;
        if id as usize != words.len() {
            return Err(StoreError::corrupt("dictionary (a number is missing)"));
        }
        let name = std::str::from_utf8(&value).map_err(|_| StoreError::corrupt("name"))?;
        words.push(name.into());
    }
    Ok(Dictionary::with_saved(words))
}

/// A member's key: the segment key's length (so one key is never a prefix of another's rows), the
/// key, the profile id.
fn member_key(segment: &str, id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(segment.len() + 12);
    key.extend_from_slice(&(segment.len() as u32).to_be_bytes());
    key.extend_from_slice(segment.as_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// A timer's key, ordered as (due, id): the due time with its sign bit flipped sorts as bytes.
fn timer_key((due, id): (Millis, u64)) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&((due as u64) ^ (1 << 63)).to_be_bytes());
    key[8..].copy_from_slice(&id.to_be_bytes());
    key
}

fn timer_of(key: &[u8]) -> Result<(Millis, u64), StoreError> {
    if key.len() != 16 {
        return Err(StoreError::corrupt("timer"));
    }
    let due = (be_u64(&key[..8], "timer")? ^ (1 << 63)) as Millis;
    Ok((due, be_u64(&key[8..], "timer")?))
}

fn be_u64(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = bytes.try_into().map_err(|_| StoreError::corrupt(what))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The first timer key past `after` (the smallest key with none).
fn timer_after(after: Option<(Millis, u64)>) -> (Millis, u64) {
    match after {
        None => (Millis::MIN, 0),
        Some((due, id)) if id < u64::MAX => (due, id + 1),
        Some((due, _)) => (due.saturating_add(1), 0),
    }
}

fn segment_stats(bytes: Option<fjall::Slice>) -> Result<SegmentStats, StoreError> {
    Ok(match bytes {
        Some(bytes) => serde_json::from_slice(&bytes)?,
        None => SegmentStats::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_committed_survives_a_reopen_and_what_is_not_does_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ProfileStore::open(dir.path(), 1 << 20).unwrap();
            let mut w = store.write().unwrap();
            let mut p = Profile::new(1);
            p.user_id = Some("u1".into());
            let mut encoded = store.encoded();
            encoded.push(&p);
            w.put_profiles(&encoded);
            w.link("user:u1", 1);
            w.set_member("vip", 1, true);
            w.move_timer(1, None, Some(500));
            w.set_meta("offset", 42);
            w.commit().unwrap();
            let mut w = store.write().unwrap();
            w.set_meta("offset", 99);
            drop(w); // never committed
        }
        let store = ProfileStore::open(dir.path(), 1 << 20).unwrap();
        let r = store.read().unwrap();
        assert_eq!(r.lookup("user:u1").unwrap(), Some(1));
        assert_eq!(
            r.profile(1).unwrap().unwrap().user_id.as_deref(),
            Some("u1")
        );
        assert_eq!(r.members("vip", None, 10).unwrap(), [1]);
        assert_eq!(r.meta("offset").unwrap(), Some(42));
        assert_eq!(r.due(None, 499, 10).unwrap(), []);
        assert_eq!(r.due(None, 500, 10).unwrap(), [(500, 1)]);
        let mut w = store.write().unwrap();
        w.move_timer(2, None, Some(500));
        w.commit().unwrap();
        let r = store.read().unwrap();
        assert_eq!(r.due(Some((500, 1)), 500, 10).unwrap(), [(500, 2)]);
        assert_eq!(r.next_due(Some((500, 1))).unwrap(), Some(500));
        assert_eq!(r.next_due(Some((500, 2))).unwrap(), None);
        let mut w = store.write().unwrap();
        w.move_timer(2, Some(500), None);
        w.move_timer(1, Some(500), Some(800));
        w.commit().unwrap();
        assert_eq!(store.read().unwrap().due(None, 600, 10).unwrap(), []);
        // A reader keeps the view it began with (the profile stage reads so while a save commits).
        assert_eq!(r.due(None, 600, 10).unwrap(), [(500, 1), (500, 2)]);
        assert_eq!(store.read().unwrap().next_due(None).unwrap(), Some(800));
    }

    #[test]
    fn a_name_is_durable_with_the_first_committed_profile_that_uses_it() {
        let dir = tempfile::tempdir().unwrap();
        let with = |id: u64, segment: &str| {
            let mut p = Profile::new(id);
            p.memberships
                .insert(segment, super::super::profile::Membership::default());
            p
        };
        let save = |store: &ProfileStore, p: &Profile, commit: bool| {
            let mut encoded = store.encoded();
            encoded.push(p);
            let mut w = store.write().unwrap();
            w.put_profiles(&encoded);
            if commit {
                w.commit().unwrap();
            }
        };
        {
            let store = ProfileStore::open(dir.path(), 1 << 20).unwrap();
            save(&store, &with(1, "vip"), true);
            // Numbered, but its batch never commits: the next batch carries it.
            save(&store, &with(2, "gone"), false);
            save(&store, &with(3, "late"), true);
            // Numbered by an encoding outside the store (the cache's cold tier): never written.
            store.dictionary().number("cold");
        }
        let store = ProfileStore::open(dir.path(), 1 << 20).unwrap();
        let r = store.read().unwrap();
        assert_eq!(r.profile(1).unwrap().unwrap(), with(1, "vip"));
        assert_eq!(r.profile(2).unwrap(), None);
        assert_eq!(r.profile(3).unwrap().unwrap(), with(3, "late"));
        assert_eq!(store.dictionary().unsaved(), (3, vec![]), "vip, gone, late");
        // Numbers go on from there.
        assert_eq!(store.dictionary().number("next"), Some(3));
    }

    #[test]
    fn keys_keep_their_order_and_segments_do_not_mix() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProfileStore::open(dir.path(), 1 << 20).unwrap();
        let mut w = store.write().unwrap();
        // One segment's key is a prefix of the other's: their members stay apart.
        w.set_member("vip", 7, true);
        w.set_member("vip2", 3, true);
        w.set_member("vi", 5, true);
        // Negative times sort before positive ones.
        w.move_timer(9, None, Some(3));
        w.move_timer(8, None, Some(-5));
        w.move_timer(4, None, Some(1 << 40));
        w.commit().unwrap();
        let r = store.read().unwrap();
        assert_eq!(r.members("vip", None, 10).unwrap(), [7]);
        assert_eq!(r.members("vip2", None, 10).unwrap(), [3]);
        assert_eq!(r.members("vi", None, 10).unwrap(), [5]);
        assert_eq!(r.members("v", None, 10).unwrap(), Vec::<u64>::new());
        assert_eq!(
            r.due(None, 1 << 41, 10).unwrap(),
            [(-5, 8), (3, 9), (1 << 40, 4)]
        );
        assert_eq!(r.next_due(Some((-5, 8))).unwrap(), Some(3));
    }

    #[test]
    fn a_store_of_the_earlier_format_is_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("profiles.redb"), b"old").unwrap();
        let error = ProfileStore::open(dir.path(), 1 << 20).err().unwrap();
        assert!(error.to_string().contains("profiles.redb"), "{error}");
    }
}
