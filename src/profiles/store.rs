//! The durable profile store: one redb file under the data dir.
//!
//! Tables:
//! - `profiles`: profile id → the profile (its encoding: [`super::codec`]).
//! - `identities`: `user:<id>` / `anon:<id>` → profile id.
//! - `members`: (segment key, profile id) → (), for paging through a segment.
//! - `timers`: (due millis, profile id) → (): the timer index. Due entries are read in time order
//!   with a range scan, so waking a profile never scans the others.
//! - `segments`: segment key → its stats (size, last change, the rule version backfilled).
//! - `meta`: `offset` (the intake-log offset every table reflects), `next_id`.
//!
//! Everything the profile stage did since its last save, the log offset included, is written in
//! one transaction, so a crash leaves the store as of some save and the consumer resumes from
//! exactly there.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::codec::{self, CodecError};
use super::profile::{Millis, Profile};

const PROFILES: TableDefinition<u64, &[u8]> = TableDefinition::new("profiles");
const IDENTITIES: TableDefinition<&str, u64> = TableDefinition::new("identities");
const MEMBERS: TableDefinition<(&str, u64), ()> = TableDefinition::new("members");
const TIMERS: TableDefinition<(i64, u64), ()> = TableDefinition::new("timers");
const SEGMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("segments");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

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
}

error_from!(
    StoreError:
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    CodecError,
    serde_json::Error,
    std::io::Error
);

/// What is known of one segment across profiles.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentStats {
    pub size: u64,
    /// When a member last entered or left.
    pub last_change: Option<Millis>,
    /// The fingerprint of the rule whose backfill finished; another one means backfill again.
    pub backfilled: Option<u64>,
}

pub struct ProfileStore {
    db: Database,
}

impl ProfileStore {
    /// Opens (or creates) the store in `dir`, with `cache_bytes` of page cache.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<ProfileStore, StoreError> {
        std::fs::create_dir_all(dir)?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(dir.join("profiles.redb"))?;
        // Create the tables, so that readers never meet a missing one.
        let w = db.begin_write()?;
        w.open_table(PROFILES)?;
        w.open_table(IDENTITIES)?;
        w.open_table(MEMBERS)?;
        w.open_table(TIMERS)?;
        w.open_table(SEGMENTS)?;
        w.open_table(META)?;
        w.commit()?;
        Ok(ProfileStore { db })
    }

    pub fn read(&self) -> Result<Reader, StoreError> {
        Ok(Reader(self.db.begin_read()?))
    }

    pub fn write(&self) -> Result<Writer, StoreError> {
        Ok(Writer(self.db.begin_write()?))
    }
}

/// A consistent view of the store as of its last commit.
pub struct Reader(redb::ReadTransaction);

impl Reader {
    pub fn profile(&self, id: u64) -> Result<Option<Profile>, StoreError> {
        decode(&self.0.open_table(PROFILES)?, id)
    }

    pub fn lookup(&self, identity: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .0
            .open_table(IDENTITIES)?
            .get(identity)?
            .map(|v| v.value()))
    }

    /// Up to `limit` member profile ids of `segment`, in id order, after `after`.
    pub fn members(
        &self,
        segment: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let t = self.0.open_table(MEMBERS)?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for row in t.range((segment, start)..=(segment, u64::MAX))? {
            let (key, _) = row?;
            out.push(key.value().1);
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn segment_stats(&self, key: &str) -> Result<SegmentStats, StoreError> {
        segment_stats(&self.0.open_table(SEGMENTS)?, key)
    }

    /// The keys of every segment with stats, loaded or not.
    pub fn segment_keys(&self) -> Result<Vec<String>, StoreError> {
        let t = self.0.open_table(SEGMENTS)?;
        let mut keys = Vec::new();
        for row in t.iter()? {
            keys.push(row?.0.value().to_string());
        }
        Ok(keys)
    }

    /// The earliest timer after `after`, if any.
    pub fn next_due(&self, after: Option<(Millis, u64)>) -> Result<Option<Millis>, StoreError> {
        let t = self.0.open_table(TIMERS)?;
        let first = t.range(timer_after(after)..)?.next().transpose()?;
        Ok(first.map(|(k, _)| k.value().0))
    }

    /// Up to `limit` timers (due time, profile) due at `now` and after `after`, earliest first.
    pub fn due(
        &self,
        after: Option<(Millis, u64)>,
        now: Millis,
        limit: usize,
    ) -> Result<Vec<(Millis, u64)>, StoreError> {
        let t = self.0.open_table(TIMERS)?;
        let mut out = Vec::new();
        let start = timer_after(after);
        if start > (now, u64::MAX) {
            return Ok(out);
        }
        for row in t.range(start..=(now, u64::MAX))? {
            let (key, _) = row?;
            out.push(key.value());
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// Profile ids after `after` in id order, for backfill.
    pub fn profile_ids(&self, after: Option<u64>, limit: usize) -> Result<Vec<u64>, StoreError> {
        let t = self.0.open_table(PROFILES)?;
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut out = Vec::new();
        for row in t.range(start..)? {
            out.push(row?.0.value());
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    pub fn meta(&self, key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.0.open_table(META)?.get(key)?.map(|v| v.value()))
    }
}

/// Profiles in their stored encoding, one after another in one buffer, ready for
/// [`Writer::put_profiles`]: whoever holds the profiles can let each go once it is encoded.
#[derive(Default)]
pub struct Encoded {
    bytes: Vec<u8>,
    /// Each profile's id and where its encoding ends in `bytes`.
    ends: Vec<(u64, usize)>,
}

impl Encoded {
    pub fn push(&mut self, profile: &Profile) {
        codec::encode(profile, &mut self.bytes);
        self.ends.push((profile.id, self.bytes.len()));
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&(_, end)| end));
        self.ends
            .iter()
            .zip(starts)
            .map(|(&(id, end), start)| (id, &self.bytes[start..end]))
    }
}

/// One transaction that changes the store; nothing is visible or durable before [`Writer::commit`].
pub struct Writer(redb::WriteTransaction);

impl Writer {
    /// Writes profiles encoded beforehand, with one table handle.
    pub fn put_profiles(&self, profiles: &Encoded) -> Result<(), StoreError> {
        let mut table = self.0.open_table(PROFILES)?;
        for (id, bytes) in profiles.iter() {
            table.insert(id, bytes)?;
        }
        Ok(())
    }

    pub fn delete_profile(&self, id: u64) -> Result<(), StoreError> {
        self.0.open_table(PROFILES)?.remove(id)?;
        Ok(())
    }

    pub fn link(&self, identity: &str, id: u64) -> Result<(), StoreError> {
        self.0.open_table(IDENTITIES)?.insert(identity, id)?;
        Ok(())
    }

    pub fn set_member(&self, segment: &str, id: u64, member: bool) -> Result<(), StoreError> {
        let mut t = self.0.open_table(MEMBERS)?;
        if member {
            t.insert((segment, id), ())?;
        } else {
            t.remove((segment, id))?;
        }
        Ok(())
    }

    /// Moves a profile's timer from `old` to `new`.
    pub fn move_timer(
        &self,
        id: u64,
        old: Option<Millis>,
        new: Option<Millis>,
    ) -> Result<(), StoreError> {
        if old == new {
            return Ok(());
        }
        let mut t = self.0.open_table(TIMERS)?;
        if let Some(old) = old {
            t.remove((old, id))?;
        }
        if let Some(new) = new {
            t.insert((new, id), ())?;
        }
        Ok(())
    }

    pub fn segment_stats(&self, key: &str) -> Result<SegmentStats, StoreError> {
        segment_stats(&self.0.open_table(SEGMENTS)?, key)
    }

    pub fn put_segment_stats(&self, key: &str, stats: &SegmentStats) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(stats)?;
        self.0.open_table(SEGMENTS)?.insert(key, bytes.as_slice())?;
        Ok(())
    }

    pub fn set_meta(&self, key: &str, value: u64) -> Result<(), StoreError> {
        self.0.open_table(META)?.insert(key, value)?;
        Ok(())
    }

    /// Makes everything written visible and durable at once.
    pub fn commit(self) -> Result<(), StoreError> {
        Ok(self.0.commit()?)
    }
}

fn decode(
    t: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> Result<Option<Profile>, StoreError> {
    Ok(match t.get(id)? {
        Some(bytes) => Some(codec::decode(bytes.value())?),
        None => None,
    })
}

/// The first timer key past `after` (the smallest key with none).
fn timer_after(after: Option<(Millis, u64)>) -> (Millis, u64) {
    match after {
        None => (Millis::MIN, 0),
        Some((due, id)) if id < u64::MAX => (due, id + 1),
        Some((due, _)) => (due.saturating_add(1), 0),
    }
}

fn segment_stats(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<SegmentStats, StoreError> {
    Ok(match t.get(key)? {
        Some(bytes) => serde_json::from_slice(bytes.value())?,
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
            let w = store.write().unwrap();
            let mut p = Profile::new(1);
            p.user_id = Some("u1".into());
            let mut encoded = Encoded::default();
            encoded.push(&p);
            w.put_profiles(&encoded).unwrap();
            w.link("user:u1", 1).unwrap();
            w.set_member("vip", 1, true).unwrap();
            w.move_timer(1, None, Some(500)).unwrap();
            w.set_meta("offset", 42).unwrap();
            w.commit().unwrap();
            let w = store.write().unwrap();
            w.set_meta("offset", 99).unwrap();
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
        let w = store.write().unwrap();
        w.move_timer(2, None, Some(500)).unwrap();
        w.commit().unwrap();
        let r = store.read().unwrap();
        assert_eq!(r.due(Some((500, 1)), 500, 10).unwrap(), [(500, 2)]);
        assert_eq!(r.next_due(Some((500, 1))).unwrap(), Some(500));
        assert_eq!(r.next_due(Some((500, 2))).unwrap(), None);
        let w = store.write().unwrap();
        w.move_timer(2, Some(500), None).unwrap();
        w.move_timer(1, Some(500), Some(800)).unwrap();
        w.commit().unwrap();
        assert_eq!(store.read().unwrap().due(None, 600, 10).unwrap(), []);
        // A reader keeps the view it began with (the profile stage reads so while a save commits).
        assert_eq!(r.due(None, 600, 10).unwrap(), [(500, 1), (500, 2)]);
        assert_eq!(store.read().unwrap().next_due(None).unwrap(), Some(800));
    }
}
