//! The names stored profiles refer to by number: event names, the property names their history
//! keeps numbers of, segment keys. Every profile holds the same few dozen names, and written out
//! in full they were 29 % of a stored profile (240 of 827 bytes in the scale benchmark's store);
//! as a number each is a byte or two. That makes the store and the profile cache's cold tier,
//! which keeps profiles in their stored encoding, hold more profiles in the same bytes.
//!
//! Names come from clients, so the dictionary is bounded: it numbers at most [`MAX_WORDS`] names,
//! each at most [`MAX_WORD_BYTES`] long; any other name is written in full where it is used.
//!
//! A number must be durable no later than the first stored profile that uses it. The store writes
//! every name numbered since its last commit into the same atomic batch as the profiles
//! ([`Dictionary::unsaved`]), and counts them saved once the batch commits
//! ([`Dictionary::saved`]): a crash loses only numbers no committed profile uses. Numbers are
//! given in order and saved as a prefix, so the store holds them densely from 0.

use std::sync::RwLock;

use super::profile::Name;

/// Names numbered, at most.
pub const MAX_WORDS: usize = 65_536;
/// The longest name numbered.
pub const MAX_WORD_BYTES: usize = 64;

#[derive(Debug, Default)]
pub struct Dictionary {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    ids: hashbrown::HashMap<Name, u32>,
    /// By number.
    names: Vec<Name>,
    /// How many of `names` (from the first) are durable.
    saved: usize,
}

impl Dictionary {
    /// A dictionary of names already durable, numbered by their place.
    pub fn with_saved(names: Vec<Name>) -> Dictionary {
        let ids = names
            .iter()
            .enumerate()
            .map(|(id, name)| (name.clone(), id as u32))
            .collect();
        let saved = names.len();
        Dictionary {
            inner: RwLock::new(Inner { ids, names, saved }),
        }
    }

    /// `name`'s number, given now if it has none and there is room; `None`: write it in full.
    pub fn number(&self, name: &str) -> Option<u32> {
        if let Some(&id) = self.read().ids.get(name) {
            return Some(id);
        }
        if name.len() > MAX_WORD_BYTES {
            return None;
        }
        let mut inner = self.write();
        if let Some(&id) = inner.ids.get(name) {
            return Some(id);
        }
        if inner.names.len() >= MAX_WORDS {
            return None;
        }
        let id = inner.names.len() as u32;
        let name: Name = name.into();
        inner.ids.insert(name.clone(), id);
        inner.names.push(name);
        Some(id)
    }

    /// Reads names by number with one lock for all of them (a profile's decoding).
    pub fn names<T>(&self, read: impl FnOnce(&[Name]) -> T) -> T {
        read(&self.read().names)
    }

    /// The names numbered but not yet durable: the first one's number, and the names in order.
    pub fn unsaved(&self) -> (u32, Vec<Name>) {
        let inner = self.read();
        (inner.saved as u32, inner.names[inner.saved..].to_vec())
    }

    /// The names numbered below `end` are durable.
    pub fn saved(&self, end: u32) {
        let mut inner = self.write();
        inner.saved = inner.saved.max(end as usize).min(inner.names.len());
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_numbered_once_in_order_and_saved_as_a_prefix() {
        let d = Dictionary::with_saved(vec!["Page Viewed".into()]);
        assert_eq!(d.number("Page Viewed"), Some(0));
        assert_eq!(d.unsaved(), (1, vec![]));
        assert_eq!(d.number("vip"), Some(1));
        assert_eq!(d.number("Order Completed"), Some(2));
        assert_eq!(d.number("vip"), Some(1));
        assert_eq!(
            d.unsaved(),
            (1, vec!["vip".into(), "Order Completed".into()])
        );
        // A batch that carried the first two commits; the third was numbered after it began.
        d.saved(2);
        assert_eq!(d.unsaved(), (2, vec!["Order Completed".into()]));
        // A late confirmation of an earlier batch moves nothing back.
        d.saved(1);
        assert_eq!(d.unsaved().0, 2);
        d.saved(99);
        assert_eq!(d.unsaved(), (3, vec![]));
        assert_eq!(d.names(|n| n[2].clone()), "Order Completed".into());
    }

    #[test]
    fn long_names_and_names_past_the_bound_are_not_numbered() {
        let d = Dictionary::default();
        assert_eq!(d.number(&"x".repeat(MAX_WORD_BYTES)), Some(0));
        assert_eq!(d.number(&"x".repeat(MAX_WORD_BYTES + 1)), None);
        for i in 1..MAX_WORDS {
            assert_eq!(d.number(&format!("event {i}")), Some(i as u32));
        }
        assert_eq!(d.number("one more"), None);
        assert_eq!(d.number("event 7"), Some(7));
        assert_eq!(d.unsaved().1.len(), MAX_WORDS);
    }
}
