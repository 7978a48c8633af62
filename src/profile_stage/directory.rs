//! The stage as the identity resolver's directory ([`Directory`]): identities cached in memory
//! over the last save committed, profiles loaded into the cache, created and merged away.

use super::*;

/// The identity index as far as it was read or written: this stage is its only writer.
/// hashbrown's hasher for the same reason as the cache's. It holds every link not committed yet:
/// it is trimmed only right after a save committed, and keeps the links made since the last
/// hand-off. Keyed by [`identity_hash`], not by the identifier: a lookup compares 16 bytes in
/// place rather than following a pointer to the string, and an entry is 32 bytes.
pub(super) struct Identities {
    pub(super) map: hashbrown::HashMap<u128, u64>,
    /// Identities kept in memory, at most.
    pub(super) max: usize,
}

impl Identities {
    /// Back to nine tenths of the bound once over it, keeping the identities in `keep`.
    pub(super) fn trim<'k>(&mut self, keep: impl Iterator<Item = &'k String>) {
        if self.map.len() <= self.max {
            return;
        }
        let excess = self.map.len() - self.max * 9 / 10;
        let keep: HashSet<u128> = keep.map(|k| identity_hash(k)).collect();
        let victims: Vec<u128> = self
            .map
            .keys()
            .filter(|k| !keep.contains(*k))
            .take(excess)
            .copied()
            .collect();
        for key in victims {
            self.map.remove(&key);
        }
    }
}

/// An identity index key's 128-bit hash: the stage's identity map is keyed by it. Two keys with
/// the same hash would share a profile; among a billion keys the chance of that is about 10^-21.
pub(super) fn identity_hash(key: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(key.as_bytes())
}

impl Stage {
    /// Brings a profile not merged away into the cache, decoded: from the cold ones, or else from
    /// the store. Returns whether there is such a profile.
    pub(super) fn load(&mut self, id: u64) -> Result<bool, StoreError> {
        if self.cache.contains(id) {
            return Ok(true);
        }
        let profile = match self.cache.thaw(id) {
            Some(profile) => Some(profile),
            None => self.read.profile(id)?,
        };
        let Some(profile) = profile else {
            return Ok(false);
        };
        self.cache.insert(id, Held::new(profile));
        Ok(true)
    }
}

impl Directory for Batch<'_> {
    fn lookup(&mut self, identity: &str) -> Result<Option<u64>, StoreError> {
        let stage = &mut self.stage;
        let hash = identity_hash(identity);
        if let Some(id) = stage.identities.map.get(&hash) {
            return Ok(Some(*id));
        }
        let found = stage.read.lookup(identity)?;
        if let Some(id) = found {
            self.stage.identities.map.insert(hash, id);
        }
        Ok(found)
    }

    fn link(&mut self, identity: &str, id: u64) -> Result<(), StoreError> {
        let stage = &mut self.stage;
        stage.writes.links.insert(identity.to_string(), id);
        stage.identities.map.insert(identity_hash(identity), id);
        Ok(())
    }

    fn profile(&mut self, id: u64) -> Result<&mut Profile, StoreError> {
        if !self.stage.cache.contains(id)
            && (self.stage.deleted.contains(&id) || !self.stage.load(id)?)
        {
            return Err(StoreError::missing(id));
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
                stage.timers.arm(due, id);
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
        self.stage.removed.push(Removed {
            id,
            stored_members: held.stored_members,
            stored_recheck: held.stored_recheck,
        });
        Ok(Arc::try_unwrap(held.profile).unwrap_or_else(|shared| (*shared).clone()))
    }
}
