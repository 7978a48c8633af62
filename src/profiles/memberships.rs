//! A profile's segment memberships.
//!
//! Evaluation reads and writes a dozen or more memberships per message, so they are kept by the
//! segment's place in the loaded segment set (a [`Layout`]), in a small sorted vector: finding
//! one compares small integers in one contiguous block, where a map keyed by the segment's name
//! compared strings and chased pointers. The layout is shared by every profile (one `Arc`), and
//! names each place, so the memberships still say which segment each one is of without the set.
//!
//! A profile whose memberships were laid out for another set (decoded from the store, or held
//! across a reload) is laid out again by [`Memberships::lay_out`], once, on its next evaluation.
//! Memberships of segments the layout does not name are kept aside by name: a reload may bring
//! their segment back.

use std::sync::Arc;

use super::profile::{intern, Millis, Name};

/// The loaded segments' keys, by place.
pub type Layout = Arc<[Name]>;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Membership {
    pub member: bool,
    /// How many times membership changed: makes the ids of emitted messages deterministic.
    pub changes: u32,
    pub since: Millis,
    /// The next moment at which the rule's answer could change with no new message.
    pub recheck_at: Option<Millis>,
}

impl Membership {
    /// Whether it carries nothing: never a member, and waiting for no moment.
    pub fn is_empty(&self) -> bool {
        !self.member && self.changes == 0 && self.recheck_at.is_none()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Memberships {
    layout: Layout,
    /// By place in `layout`, sorted by place.
    placed: Vec<(u32, Membership)>,
    /// Of segments `layout` does not name.
    aside: Vec<(Name, Membership)>,
}

impl Memberships {
    /// Lays the memberships out for `layout` (a no-op when they already are). `place` gives a
    /// key's place in it.
    pub fn lay_out(&mut self, layout: &Layout, place: impl Fn(&str) -> Option<usize>) {
        if Arc::ptr_eq(&self.layout, layout) {
            return;
        }
        let all: Vec<(Name, Membership)> = std::mem::take(self).into_pairs().collect();
        self.layout = layout.clone();
        for (key, m) in all {
            match place(&key) {
                Some(i) => self.placed.push((i as u32, m)),
                None => self.aside.push((key, m)),
            }
        }
        self.placed.sort_unstable_by_key(|(i, _)| *i);
    }

    /// The membership at `place` of the layout the memberships were last laid out for.
    pub fn at(&self, place: usize) -> Option<&Membership> {
        let i = self.find(place).ok()?;
        Some(&self.placed[i].1)
    }

    pub fn at_mut(&mut self, place: usize) -> Option<&mut Membership> {
        let i = self.find(place).ok()?;
        Some(&mut self.placed[i].1)
    }

    /// The membership at `place`, made (empty) if there is none.
    pub fn at_or_default(&mut self, place: usize) -> &mut Membership {
        let i = match self.find(place) {
            Ok(i) => i,
            Err(i) => {
                self.placed.insert(i, (place as u32, Membership::default()));
                i
            }
        };
        &mut self.placed[i].1
    }

    /// Drops the membership at `place` if it carries nothing.
    pub fn drop_if_empty(&mut self, place: usize) {
        if let Ok(i) = self.find(place) {
            if self.placed[i].1.is_empty() {
                self.placed.remove(i);
            }
        }
    }

    /// The memberships of segments the layout does not name (no longer loaded).
    pub fn aside_mut(&mut self) -> &mut Vec<(Name, Membership)> {
        &mut self.aside
    }

    /// The places whose membership waits for a moment at or before `now`.
    pub fn due(&self, now: Millis) -> impl Iterator<Item = usize> + '_ {
        self.placed
            .iter()
            .filter(move |(_, m)| m.recheck_at.is_some_and(|t| t <= now))
            .map(|(i, _)| *i as usize)
    }

    fn find(&self, place: usize) -> Result<usize, usize> {
        self.placed
            .binary_search_by_key(&(place as u32), |(i, _)| *i)
    }

    pub fn get(&self, key: &str) -> Option<&Membership> {
        self.iter().find(|(k, _)| &***k == key).map(|(_, m)| m)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The membership of segment `key`, made (empty) if there is none.
    pub fn entry(&mut self, key: &str) -> &mut Membership {
        if let Some(place) = self.layout.iter().position(|k| &**k == key) {
            return self.at_or_default(place);
        }
        let i = match self.aside.iter().position(|(k, _)| &**k == key) {
            Some(i) => i,
            None => {
                self.aside.push((intern(key), Membership::default()));
                self.aside.len() - 1
            }
        };
        &mut self.aside[i].1
    }

    pub fn insert(&mut self, key: &str, m: Membership) {
        *self.entry(key) = m;
    }

    pub fn len(&self) -> usize {
        self.placed.len() + self.aside.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every membership with its segment's key: the laid-out ones in place order, then the rest.
    pub fn iter(&self) -> impl Iterator<Item = (&Name, &Membership)> {
        let placed = self
            .placed
            .iter()
            .map(|(i, m)| (&self.layout[*i as usize], m));
        placed.chain(self.aside.iter().map(|(k, m)| (k, m)))
    }

    pub fn into_pairs(self) -> impl Iterator<Item = (Name, Membership)> {
        let layout = self.layout;
        let placed = self.placed.into_iter();
        placed
            .map(move |(i, m)| (layout[i as usize].clone(), m))
            .chain(self.aside)
    }

    /// The earliest moment any segment asked to be looked at again.
    pub fn next_recheck(&self) -> Option<Millis> {
        self.iter().filter_map(|(_, m)| m.recheck_at).min()
    }
}

/// From pairs with distinct keys (as a profile's stored encoding holds them), laid out for no set
/// yet: taken as they are, with no search per pair.
impl FromIterator<(Name, Membership)> for Memberships {
    fn from_iter<I: IntoIterator<Item = (Name, Membership)>>(pairs: I) -> Memberships {
        Memberships {
            aside: pairs.into_iter().collect(),
            ..Memberships::default()
        }
    }
}

/// Equal when they hold the same memberships, however laid out.
impl PartialEq for Memberships {
    fn eq(&self, other: &Memberships) -> bool {
        fn sorted(m: &Memberships) -> Vec<(&Name, &Membership)> {
            let mut pairs: Vec<(&Name, &Membership)> = m.iter().collect();
            pairs.sort_by(|a, b| a.0.cmp(b.0));
            pairs
        }
        sorted(self) == sorted(other)
    }
}

impl std::ops::Index<&str> for Memberships {
    type Output = Membership;

    fn index(&self, key: &str) -> &Membership {
        self.get(key)
            .unwrap_or_else(|| panic!("no membership of segment {key}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(keys: &[&str]) -> Layout {
        keys.iter().map(|k| Name::from(*k)).collect()
    }

    fn member(changes: u32) -> Membership {
        Membership {
            member: true,
            changes,
            ..Membership::default()
        }
    }

    #[test]
    fn a_new_layout_keeps_every_membership_under_its_key() {
        let mut m = Memberships::default();
        m.insert("b", member(1));
        m.insert("gone", member(2));
        let first = layout(&["a", "b"]);
        m.lay_out(&first, |k| first.iter().position(|f| &**f == k));
        assert_eq!(m.at(1), Some(&member(1)));
        assert_eq!(m.at(0), None);
        assert_eq!(m["gone"], member(2), "kept aside");
        // A reload that brings "gone" back at place 0 and moves "b" to place 2.
        let second = layout(&["gone", "x", "b"]);
        m.lay_out(&second, |k| second.iter().position(|f| &**f == k));
        assert_eq!(m.at(0), Some(&member(2)));
        assert_eq!(m.at(2), Some(&member(1)));
        assert_eq!(m.len(), 2);
        assert!(m.aside_mut().is_empty());
    }

    #[test]
    fn places_stay_sorted_as_they_are_made_and_dropped() {
        let keys = layout(&["a", "b", "c", "d"]);
        let mut m = Memberships::default();
        m.lay_out(&keys, |k| keys.iter().position(|f| &**f == k));
        for place in [3, 0, 2] {
            m.at_or_default(place).recheck_at = Some(place as Millis);
        }
        assert_eq!(m.due(2).collect::<Vec<_>>(), [0, 2]);
        m.at_or_default(2).recheck_at = None;
        m.drop_if_empty(2);
        m.drop_if_empty(0); // waits for a moment: stays
        let keys_in_order: Vec<&str> = m.iter().map(|(k, _)| &**k).collect();
        assert_eq!(keys_in_order, ["a", "d"]);
        assert_eq!(m.next_recheck(), Some(0));
        assert_eq!(m.entry("b"), &Membership::default());
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn equality_ignores_the_layout() {
        let keys = layout(&["a", "b"]);
        let mut laid_out = Memberships::default();
        laid_out.insert("b", member(1));
        laid_out.insert("a", member(2));
        laid_out.lay_out(&keys, |k| keys.iter().position(|f| &**f == k));
        let by_name: Memberships = [(Name::from("a"), member(2)), (Name::from("b"), member(1))]
            .into_iter()
            .collect();
        assert_eq!(laid_out, by_name);
        laid_out.at_or_default(0).changes = 3;
        assert_ne!(laid_out, by_name);
    }
}
