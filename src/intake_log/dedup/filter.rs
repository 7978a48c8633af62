//! The in-memory filter over every id held on disk: a cuckoo filter of 12-bit fingerprints, four
//! to a bucket (1.5 bytes an id, one false hit in about 500 lookups at most), in 16 shards by the
//! key's top bits so that one grows (rebuilt from the ids on disk) without doubling the memory of
//! all. A hit only says "maybe": the caller confirms it on disk. Deleting an id that was inserted
//! removes exactly one copy of its fingerprint, so expiring a run of ids leaves the others found.
//!
//! Keys are already uniform hashes (xxh3-128): the bucket comes from the low 64 bits, the
//! fingerprint from the next 12, the shard from the top 4.

/// Shards of the filter, by the key's top four bits.
pub const SHARDS: usize = 16;
const SLOTS: usize = 4;
const BUCKET_BYTES: usize = 6;
const MAX_KICKS: usize = 500;

pub fn shard_of(key: u128) -> usize {
    (key >> 124) as usize
}

/// The keys of one shard: `[start, end]`.
pub fn shard_range(shard: usize) -> (u128, u128) {
    let start = (shard as u128) << 124;
    (start, start | ((1u128 << 124) - 1))
}

fn fingerprint(key: u128) -> u16 {
    match ((key >> 64) as u16) & 0xfff {
        0 => 1,
        f => f,
    }
}

/// One shard: `buckets` buckets of four 12-bit slots, 6 bytes each (plus 2 bytes of padding at the
/// end so that every bucket reads as one unaligned u64).
#[derive(Debug, Clone)]
pub struct Shard {
    bytes: Vec<u8>,
    buckets: usize,
    count: usize,
    /// A fingerprint that found no room in its last insert, kept so that it is not lost.
    victim: Option<(usize, u16)>,
    rng: u64,
}

impl Shard {
    /// Room for about `capacity` ids.
    pub fn with_capacity(capacity: usize) -> Shard {
        let buckets = capacity.div_ceil(SLOTS).max(1);
        Shard {
            bytes: vec![0; buckets * BUCKET_BYTES + 2],
            buckets,
            count: 0,
            victim: None,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    pub fn capacity(&self) -> usize {
        self.buckets * SLOTS
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    fn index(&self, key: u128) -> usize {
        ((key as u64) % self.buckets as u64) as usize
    }

    /// The other bucket of a fingerprint: `h(fp) - i (mod n)`, which leads back to `i` again.
    fn alternate(&self, i: usize, fp: u16) -> usize {
        let n = self.buckets as u64;
        let h = u64::from(fp).wrapping_mul(0x9E37_79B9_7F4A_7C15) % n;
        ((h + n - i as u64) % n) as usize
    }

    fn word(&self, bucket: usize) -> u64 {
        let at = bucket * BUCKET_BYTES;
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().expect("8 bytes")) & 0xFFFF_FFFF_FFFF
    }

    fn set_word(&mut self, bucket: usize, word: u64) {
        let at = bucket * BUCKET_BYTES;
        self.bytes[at..at + BUCKET_BYTES].copy_from_slice(&word.to_le_bytes()[..BUCKET_BYTES]);
    }

    fn slot(word: u64, j: usize) -> u16 {
        ((word >> (12 * j)) & 0xfff) as u16
    }

    fn with_slot(word: u64, j: usize, fp: u16) -> u64 {
        (word & !(0xfff << (12 * j))) | (u64::from(fp) << (12 * j))
    }

    fn holds(&self, bucket: usize, fp: u16) -> bool {
        let word = self.word(bucket);
        (0..SLOTS).any(|j| Self::slot(word, j) == fp)
    }

    pub fn contains(&self, key: u128) -> bool {
        let fp = fingerprint(key);
        let i = self.index(key);
        self.holds(i, fp)
            || self.holds(self.alternate(i, fp), fp)
            || self
                .victim
                .is_some_and(|(b, f)| f == fp && (b == i || b == self.alternate(i, fp)))
    }

    /// Puts `fp` in an empty slot of `bucket`, if it has one.
    fn put(&mut self, bucket: usize, fp: u16) -> bool {
        let word = self.word(bucket);
        match (0..SLOTS).find(|&j| Self::slot(word, j) == 0) {
            Some(j) => {
                self.set_word(bucket, Self::with_slot(word, j, fp));
                true
            }
            None => false,
        }
    }

    /// Adds `key`; `false` when the shard is too full to take it (it is then unchanged, but for
    /// fingerprints moved between their two buckets).
    pub fn insert(&mut self, key: u128) -> bool {
        if self.victim.is_some() {
            return false;
        }
        let mut fp = fingerprint(key);
        let mut i = self.index(key);
        if self.put(i, fp) || self.put(self.alternate(i, fp), fp) {
            self.count += 1;
            return true;
        }
        for _ in 0..MAX_KICKS {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            if self.rng & 1 == 0 {
                i = self.alternate(i, fp);
            }
            let j = (self.rng >> 1) as usize % SLOTS;
            let word = self.word(i);
            let out = Self::slot(word, j);
            self.set_word(i, Self::with_slot(word, j, fp));
            fp = out;
            i = self.alternate(i, fp);
            if self.put(i, fp) {
                self.count += 1;
                return true;
            }
        }
        // The key is in; the fingerprint last pushed out waits here, still found.
        self.victim = Some((i, fp));
        self.count += 1;
        true
    }

    /// Takes out one copy of `key`'s fingerprint; `false` when none was there.
    pub fn remove(&mut self, key: u128) -> bool {
        let fp = fingerprint(key);
        let i = self.index(key);
        let alt = self.alternate(i, fp);
        if let Some((b, f)) = self.victim {
            if f == fp && (b == i || b == alt) {
                self.victim = None;
                self.count -= 1;
                return true;
            }
        }
        for bucket in [i, alt] {
            let word = self.word(bucket);
            if let Some(j) = (0..SLOTS).find(|&j| Self::slot(word, j) == fp) {
                self.set_word(bucket, Self::with_slot(word, j, 0));
                self.count -= 1;
                self.reinsert_victim();
                return true;
            }
        }
        false
    }

    /// A slot was freed: the victim may fit now.
    fn reinsert_victim(&mut self) {
        if let Some((b, fp)) = self.victim.take() {
            if !(self.put(b, fp) || self.put(self.alternate(b, fp), fp)) {
                self.victim = Some((b, fp));
            }
        }
    }
}

/// The whole filter: [`SHARDS`] shards.
#[derive(Debug, Clone)]
pub struct Filter {
    pub shards: Vec<Shard>,
}

impl Filter {
    /// Room for about `capacity` ids, spread over the shards.
    pub fn with_capacity(capacity: usize) -> Filter {
        Filter {
            shards: (0..SHARDS)
                .map(|_| Shard::with_capacity(capacity.div_ceil(SHARDS)))
                .collect(),
        }
    }

    pub fn contains(&self, key: u128) -> bool {
        self.shards[shard_of(key)].contains(key)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(Shard::len).sum()
    }

    pub fn bytes(&self) -> usize {
        self.shards.iter().map(Shard::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize, seed: u64) -> Vec<u128> {
        (0..n as u64)
            .map(|i| xxhash_rust::xxh3::xxh3_128(&(i ^ (seed << 40)).to_le_bytes()))
            .collect()
    }

    #[test]
    fn holds_what_it_took_and_rarely_what_it_did_not() {
        let mut shard = Shard::with_capacity(10_000);
        let inside = keys(9_400, 1);
        for k in &inside {
            assert!(shard.insert(*k));
        }
        assert!(
            inside.iter().all(|k| shard.contains(*k)),
            "no false negative"
        );
        let outside = keys(100_000, 2);
        let false_hits = outside.iter().filter(|k| shard.contains(**k)).count();
        assert!(
            false_hits < 300,
            "{false_hits} false hits in 100,000 (about 8/4096 expected)"
        );
        assert_eq!(shard.len(), 9_400);
    }

    #[test]
    fn removing_takes_out_exactly_what_went_in() {
        let mut shard = Shard::with_capacity(5_000);
        let all = keys(4_500, 3);
        for k in &all {
            shard.insert(*k);
        }
        let (gone, kept) = all.split_at(2_000);
        for k in gone {
            assert!(shard.remove(*k));
        }
        assert!(
            kept.iter().all(|k| shard.contains(*k)),
            "the others are still found"
        );
        assert_eq!(shard.len(), 2_500);
        for k in kept {
            assert!(shard.remove(*k));
        }
        assert_eq!(shard.len(), 0);
        assert!(shard.bytes.iter().all(|b| *b == 0), "empty again");
    }

    #[test]
    fn an_overfull_shard_says_so_and_keeps_what_it_had() {
        let mut shard = Shard::with_capacity(1_000);
        let all = keys(2_000, 4);
        let mut taken = Vec::new();
        for k in &all {
            if !shard.insert(*k) {
                break;
            }
            taken.push(*k);
        }
        assert!(taken.len() >= 950 && taken.len() < 2_000, "{}", taken.len());
        assert!(
            taken.iter().all(|k| shard.contains(*k)),
            "nothing lost on the way to full"
        );
    }

    #[test]
    fn shards_split_the_key_space_in_order() {
        assert_eq!(shard_of(0), 0);
        assert_eq!(shard_of(u128::MAX), SHARDS - 1);
        for s in 0..SHARDS {
            let (start, end) = shard_range(s);
            assert_eq!((shard_of(start), shard_of(end)), (s, s));
        }
    }
}
