//! The profiles the stage holds in memory: decoded, bounded both in number and in (estimated)
//! bytes (a profile's size depends on its history, so a count alone does not bound memory), and,
//! behind those, more of them in their stored encoding ("cold"), in the rest of the memory bound.
//! Changed profiles stay decoded until the save that holds them has committed; only saved ones
//! are ever dropped, and a saved one dropped from the decoded profiles is kept cold while there
//! is room.
//!
//! Why a cold tier rather than a larger block cache in the store: the users active on a day are
//! a few in ten of those stored, spread over the whole store, so the store's blocks (a few
//! profiles each, most of them quiet) would need nearly the whole store in memory to hold them.
//! A cold profile takes its encoding (about 590 bytes in the benchmark, names written by their
//! numbers in the store's dictionary, against some 4 kB decoded) and costs a decode (about 1 µs)
//! instead of an identity and a profile read from the store (about 25 µs over 10,000,000
//! profiles).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::profiles::codec;
use crate::profiles::dictionary::Dictionary;
use crate::profiles::profile::{Millis, Name, Profile};

/// A profile held in memory, with what the store holds for it (to know what to write).
pub struct Held {
    /// Shared with the saver while a save holding it is in flight; see [`Held::profile_mut`].
    pub profile: Arc<Profile>,
    /// The memberships the members index holds once the saves handed off and the stage's
    /// `writes` commit (kept up to date at each batch's end).
    pub stored_members: BTreeSet<Name>,
    /// The timer as of the last save handed off: the store's once that save commits.
    pub stored_recheck: Option<Millis>,
    /// The timer as of the last batch's end; until the next save, the stage's timers in memory
    /// hold it for a changed profile, not the store.
    pub timer: Option<Millis>,
    /// Touched in the batch in progress (its timer and memberships are settled at the batch's end).
    pub touched: bool,
    /// Changed since the last save handed off.
    pub unsaved: bool,
    /// The number of the last save it went into (0: none since it was loaded). Until that save
    /// commits, the store holds an older version, so it must stay in the cache.
    pub saved_in: u64,
    /// Its memberships may differ from `stored_members` (a segment was entered or left, or a
    /// profile merged in) in the batch in progress: only then are the two compared, at the
    /// batch's end.
    pub memberships_changed: bool,
    /// The estimate counted for it in [`Cache::bytes`].
    bytes: usize,
}

impl Held {
    pub fn new(profile: Profile) -> Held {
        Held {
            stored_members: members(&profile),
            stored_recheck: profile.next_recheck(),
            timer: profile.next_recheck(),
            bytes: estimate(&profile),
            profile: Arc::new(profile),
            touched: false,
            unsaved: false,
            saved_in: 0,
            memberships_changed: false,
        }
    }

    /// The profile, to change: copied first if a save in flight still holds it.
    pub fn profile_mut(&mut self) -> &mut Profile {
        Arc::make_mut(&mut self.profile)
    }

    /// Whether the store holds it as it is here (nothing unsaved, no save of it in flight), so
    /// that it may be dropped.
    fn saved(&self, committed: u64) -> bool {
        !self.unsaved && self.saved_in <= committed
    }
}

/// The keys of the segments `p` is in.
pub fn members(p: &Profile) -> BTreeSet<Name> {
    p.memberships
        .iter()
        .filter(|(_, m)| m.member)
        .map(|(k, _)| k.clone())
        .collect()
}

/// The segments `p` entered and left since `stored` (the keys of those it was in), each in key
/// order. The profile's member keys (kept by segment place, not by key) are sorted, then merged
/// with the stored ones: no set is built.
pub fn membership_changes(stored: &BTreeSet<Name>, p: &Profile) -> (Vec<Name>, Vec<Name>) {
    let mut now: Vec<&Name> = p
        .memberships
        .iter()
        .filter(|(_, m)| m.member)
        .map(|(k, _)| k)
        .collect();
    now.sort_unstable();
    let mut now = now.into_iter().peekable();
    let mut was = stored.iter().peekable();
    let (mut entered, mut left) = (Vec::new(), Vec::new());
    loop {
        match (now.peek(), was.peek()) {
            (None, None) => return (entered, left),
            (Some(n), Some(w)) if n == w => {
                now.next();
                was.next();
            }
            (Some(n), w) if w.is_none_or(|w| n < w) => entered.extend(now.next().cloned()),
            _ => left.extend(was.next().cloned()),
        }
    }
}

/// Roughly what a decoded profile takes on the heap, from its lengths alone (walking its history
/// on every message would cost more than the estimate is worth). The constants are the sizes of
/// the entries with their allocations, for typical lengths; names are shared (interned), so an
/// entry counts only its pointer to one.
fn estimate(p: &Profile) -> usize {
    512 + p.anonymous_ids.len() * 64
        + p.traits.len() * 128
        + p.events.len() * 120
        + p.names.len() * 16
        + p.history.footprint()
        + p.memberships.len() * 64
}

/// What a cold profile takes besides its encoding: its slot in the map and the allocation's
/// own overhead.
const COLD_ENTRY: usize = 48;

pub struct Cache {
    /// hashbrown's hasher (foldhash, seeded at random per process) rather than SipHash: it is
    /// looked up several times per message, and it is bounded, so keys chosen to collide could
    /// slow it but not grow it.
    map: hashbrown::HashMap<u64, Held>,
    /// Saved profiles in their stored encoding, as the store holds them (committed): never one
    /// that is also in `map`, nor one merged away (loading takes a profile out of here first).
    cold: hashbrown::HashMap<u64, Box<[u8]>>,
    /// The estimate for `map`.
    bytes: usize,
    /// What `cold` takes.
    cold_bytes: usize,
    /// At most this many decoded profiles.
    max_profiles: usize,
    /// At most this much for both tiers.
    max_bytes: usize,
    /// The store's, which cold encodings use as the store's do.
    words: Arc<Dictionary>,
}

impl Cache {
    pub fn new(max_profiles: usize, max_bytes: usize, words: Arc<Dictionary>) -> Cache {
        Cache {
            map: hashbrown::HashMap::new(),
            cold: hashbrown::HashMap::new(),
            bytes: 0,
            cold_bytes: 0,
            max_profiles: max_profiles.max(1),
            max_bytes,
            words,
        }
    }

    /// A cold profile, decoded and taken out of the cold tier (to be [`Cache::insert`]ed).
    /// `None` when it is not cold, or when its encoding does not decode (then the store is read).
    pub fn thaw(&mut self, id: u64) -> Option<Profile> {
        let bytes = self.take_cold(id)?;
        codec::decode(&bytes, &self.words).ok()
    }

    /// Takes a profile's encoding out of the cold tier.
    fn take_cold(&mut self, id: u64) -> Option<Box<[u8]>> {
        let bytes = self.cold.remove(&id)?;
        self.cold_bytes -= bytes.len() + COLD_ENTRY;
        Some(bytes)
    }

    /// Whether the profile is in memory, decoded or cold.
    #[cfg(test)]
    pub fn holds(&self, id: u64) -> bool {
        self.map.contains_key(&id) || self.cold.contains_key(&id)
    }

    pub fn contains(&self, id: u64) -> bool {
        self.map.contains_key(&id)
    }

    pub fn get(&self, id: u64) -> Option<&Held> {
        self.map.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Held> {
        self.map.get_mut(&id)
    }

    pub fn insert(&mut self, id: u64, held: Held) {
        self.take_cold(id);
        self.bytes += held.bytes;
        if let Some(old) = self.map.insert(id, held) {
            self.bytes -= old.bytes;
        }
    }

    pub fn remove(&mut self, id: u64) -> Option<Held> {
        let held = self.map.remove(&id)?;
        self.bytes -= held.bytes;
        Some(held)
    }

    /// Estimates a profile's size again, after it changed.
    pub fn resize(&mut self, id: u64) {
        if let Some(held) = self.map.get_mut(&id) {
            let bytes = estimate(&held.profile);
            self.bytes = self.bytes - held.bytes + bytes;
            held.bytes = bytes;
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
        self.cold.clear();
        self.cold_bytes = 0;
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    pub fn cold(&self) -> (usize, usize) {
        (self.cold.len(), self.cold_bytes)
    }

    /// The profiles it holds and what they take, decoded then cold, for the metrics.
    pub fn tiers(&self) -> [(usize, usize); 2] {
        [
            (self.map.len(), self.bytes),
            (self.cold.len(), self.cold_bytes),
        ]
    }

    /// Whether it holds more than either bound allows. Cold profiles can always go, so only the
    /// decoded ones keep it over after [`Cache::trim`].
    pub fn over(&self) -> bool {
        self.map.len() > self.max_profiles || self.bytes + self.cold_bytes > self.max_bytes
    }

    /// When it is over a bound: moves saved profiles, in hash order (a random eviction: cheap,
    /// and good enough here), from the decoded ones to the cold ones until the decoded hold at
    /// most 90 % of both bounds, or only unsaved ones; then drops cold ones, in hash order, until
    /// both tiers together take at most 90 % of the memory bound. `committed` is the number of
    /// the last save committed.
    pub fn trim(&mut self, committed: u64) {
        if !self.over() {
            return;
        }
        let (max_profiles, max_bytes) = (self.max_profiles * 9 / 10, self.max_bytes / 10 * 9);
        let (mut len, mut bytes) = (self.map.len(), self.bytes);
        let mut victims = Vec::new();
        for (id, held) in &self.map {
            if len <= max_profiles && bytes <= max_bytes {
                break;
            }
            if held.saved(committed) {
                victims.push(*id);
                len -= 1;
                bytes -= held.bytes;
            }
        }
        let mut encoded = Vec::new();
        for id in victims {
            let Some(held) = self.remove(id) else {
                continue;
            };
            encoded.clear();
            codec::encode(&held.profile, &self.words, &mut encoded);
            self.cold_bytes += encoded.len() + COLD_ENTRY;
            self.cold.insert(id, encoded.as_slice().into());
        }
        let mut excess = (self.bytes + self.cold_bytes).saturating_sub(max_bytes);
        if excess == 0 {
            return;
        }
        let mut gone = Vec::new();
        for (id, bytes) in &self.cold {
            if excess == 0 {
                break;
            }
            gone.push(*id);
            excess = excess.saturating_sub(bytes.len() + COLD_ENTRY);
        }
        for id in gone {
            self.take_cold(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_history(id: u64, entries: usize) -> Profile {
        let mut p = Profile::new(id);
        for i in 0..entries {
            p.record("Page Viewed", i as Millis, &[]);
        }
        p
    }

    #[test]
    fn trimming_keeps_both_bounds_and_every_profile_not_yet_saved() {
        let mut cache = Cache::new(100, 200_000, Default::default());
        for id in 0..50 {
            let mut held = Held::new(with_history(id, 1_000));
            held.unsaved = id < 5;
            // In save 7, which has not committed yet.
            held.saved_in = if (5..10).contains(&id) { 7 } else { 6 };
            cache.insert(id, held);
        }
        assert!(cache.over(), "50 profiles of ~8 KB are over 200 KB");
        cache.trim(6);
        assert!(cache.bytes() <= 180_000, "{}", cache.bytes());
        assert!(
            (0..10).all(|id| cache.contains(id)),
            "unsaved profiles and those of a save in flight stay"
        );
        let kept = cache.len();
        assert!((10..50).contains(&kept), "{kept}");

        let mut small = Cache::new(10, usize::MAX, Default::default());
        (0..20).for_each(|id| small.insert(id, Held::new(Profile::new(id))));
        small.trim(0);
        assert_eq!(small.len(), 9);
    }

    #[test]
    fn saved_profiles_trimmed_go_cold_and_come_back_whole() {
        let mut cache = Cache::new(10, usize::MAX, Default::default());
        for id in 0..20 {
            let mut held = Held::new(with_history(id, 5));
            held.unsaved = id == 0;
            cache.insert(id, held);
        }
        cache.trim(0);
        assert_eq!(cache.len(), 9);
        assert_eq!(cache.cold().0, 11, "every profile trimmed is kept cold");
        assert!(cache.contains(0), "an unsaved profile stays decoded");
        let cold = (0..20).find(|&id| !cache.contains(id)).unwrap();
        assert!(cache.holds(cold));
        assert_eq!(cache.thaw(cold), Some(with_history(cold, 5)));
        assert!(!cache.holds(cold), "thawed, it is no longer cold");
        assert_eq!(cache.thaw(cold), None);

        let other = (0..20)
            .find(|&id| !cache.contains(id) && id != cold)
            .unwrap();
        cache.insert(other, Held::new(with_history(other, 1)));
        assert_eq!(cache.cold().0, 9, "a profile inserted is not also cold");
        cache.clear();
        assert_eq!(cache.cold(), (0, 0));
    }

    #[test]
    fn cold_profiles_go_first_when_memory_runs_short() {
        let max = 6_000;
        let mut cache = Cache::new(5, max, Default::default());
        for id in 0..50 {
            let mut held = Held::new(with_history(id, 5));
            held.unsaved = id < 3;
            cache.insert(id, held);
        }
        cache.trim(0);
        let (cold, cold_bytes) = cache.cold();
        assert!(
            cache.bytes() + cold_bytes <= max / 10 * 9,
            "{} + {cold_bytes}",
            cache.bytes()
        );
        assert!(cold > 0 && cold + cache.len() < 50, "{cold} cold");
        assert!((0..3).all(|id| cache.contains(id)));
        assert!(!cache.over());
    }

    #[test]
    fn membership_changes_are_what_entered_and_what_left() {
        let mut p = Profile::new(1);
        for (key, member) in [("a", true), ("b", false), ("c", true), ("e", true)] {
            let m = p.memberships.entry(key);
            m.member = member;
        }
        let stored: BTreeSet<Name> = ["b", "c", "d"].into_iter().map(Name::from).collect();
        let (entered, left) = membership_changes(&stored, &p);
        assert_eq!(entered, [Name::from("a"), Name::from("e")]);
        assert_eq!(left, [Name::from("b"), Name::from("d")]);
        assert_eq!(
            membership_changes(&members(&p), &p),
            (Vec::new(), Vec::new())
        );
    }

    #[test]
    fn the_byte_count_follows_changes() {
        let mut cache = Cache::new(10, usize::MAX, Default::default());
        cache.insert(1, Held::new(Profile::new(1)));
        let empty = cache.bytes();
        *cache.get_mut(1).unwrap().profile_mut() = with_history(1, 1_000);
        cache.resize(1);
        assert!(cache.bytes() >= empty + 8_000, "{}", cache.bytes());
        cache.insert(1, Held::new(Profile::new(1)));
        assert_eq!(
            cache.bytes(),
            empty,
            "a replaced entry is not counted twice"
        );
        cache.remove(1);
        assert_eq!(cache.bytes(), 0);
    }
}
