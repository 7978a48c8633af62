//! Identity resolution: which profile a message belongs to.
//!
//! A message carrying a userId and an anonymousId links the two; an alias links its userId with
//! its previousId, and with its anonymousId too when it carries one. When the two identifiers already belong to different profiles, those merge
//! into the one holding the userId, keeping all history. A profile holds at most one userId: a
//! link between two different userIds is a conflict, counted and logged, and never merged; the
//! message then goes to its userId's profile.

use super::profile::{anonymous_key, user_key, Dropped, Profile, Retention};
use super::store::StoreError;

/// Where profiles and the identity index live while a batch is being applied.
pub trait Directory {
    fn lookup(&mut self, identity: &str) -> Result<Option<u64>, StoreError>;
    fn link(&mut self, identity: &str, id: u64) -> Result<(), StoreError>;
    fn profile(&mut self, id: u64) -> Result<&mut Profile, StoreError>;
    /// A new, empty profile.
    fn create(&mut self) -> Result<u64, StoreError>;
    /// Takes a profile out (it is being merged into another).
    fn remove(&mut self, id: u64) -> Result<Profile, StoreError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub id: u64,
    pub created: bool,
    /// The profile that was merged into `id`, if any.
    pub absorbed: Option<u64>,
    /// Two different userIds were linked; nothing was merged.
    pub conflict: bool,
    /// What the profiles' caps dropped: an anonymousId not linked, what a merge left out.
    pub dropped: Dropped,
}

impl Resolved {
    fn existing(id: u64) -> Resolved {
        Resolved {
            id,
            created: false,
            absorbed: None,
            conflict: false,
            dropped: Dropped::default(),
        }
    }
}

/// The identifiers a message names.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identifiers<'a> {
    pub user_id: Option<&'a str>,
    pub anonymous_id: Option<&'a str>,
    /// An alias's previousId: an anonymousId or an earlier userId.
    pub previous_id: Option<&'a str>,
}

/// Finds, creates, links or merges profiles for `ids`. `None` when the message names no one.
/// `retention` is what merged profiles keep (the loaded rules').
pub fn resolve(
    dir: &mut impl Directory,
    ids: Identifiers,
    retention: &Retention,
) -> Result<Option<Resolved>, StoreError> {
    let third = ids
        .anonymous_id
        .filter(|a| !a.is_empty() && ids.previous_id.is_some_and(|p| p != *a));
    let Some(anonymous_id) = third else {
        return resolve_pair(dir, ids, retention);
    };
    // An alias with an anonymousId as well: the previousId is linked first, then the
    // anonymousId, each as a message naming the userId and that one would be.
    let aliased = resolve_pair(
        dir,
        Identifiers {
            anonymous_id: None,
            ..ids
        },
        retention,
    )?;
    let with_anonymous = resolve_pair(
        dir,
        Identifiers {
            anonymous_id: Some(anonymous_id),
            previous_id: None,
            ..ids
        },
        retention,
    )?;
    Ok(match (aliased, with_anonymous) {
        (Some(a), Some(b)) => Some(Resolved {
            id: b.id,
            created: (a.created && a.id == b.id) || b.created,
            absorbed: b.absorbed.or(a.absorbed),
            conflict: a.conflict || b.conflict,
            dropped: {
                let mut dropped = a.dropped;
                dropped.add(b.dropped);
                dropped
            },
        }),
        (a, b) => b.or(a),
    })
}

/// [`resolve`] for a message that links at most two identifiers.
fn resolve_pair(
    dir: &mut impl Directory,
    ids: Identifiers,
    retention: &Retention,
) -> Result<Option<Resolved>, StoreError> {
    let user_id = ids.user_id.filter(|u| !u.is_empty());
    let other = ids
        .previous_id
        .or(ids.anonymous_id)
        .filter(|o| !o.is_empty() && Some(*o) != user_id);
    let by_user = match user_id {
        Some(u) => dir.lookup(&user_key(u))?,
        None => None,
    };
    // Nearly every message: the userId's profile already holds the anonymousId. A profile holds
    // only identifiers linked to it, so the index need not be asked.
    if let (Some(a), Some(o), None) = (by_user, other, ids.previous_id) {
        if dir.profile(a)?.anonymous_ids.iter().any(|known| known == o) {
            return Ok(Some(Resolved::existing(a)));
        }
    }
    // The other identifier's key, and the profile it belongs to.
    let (other_key, by_other) = match other {
        None => (None, None),
        Some(o) => {
            let anon = anonymous_key(o);
            match dir.lookup(&anon)? {
                Some(id) => (Some(anon), Some(id)),
                None if ids.previous_id.is_some() => {
                    let user = user_key(o);
                    match dir.lookup(&user)? {
                        Some(id) => (Some(user), Some(id)),
                        None => (Some(anon), None),
                    }
                }
                None => (Some(anon), None),
            }
        }
    };
    Ok(Some(match (user_id, by_user, by_other) {
        (None, _, None) => {
            let Some(key) = &other_key else {
                return Ok(None);
            };
            let id = dir.create()?;
            attach(dir, id, key)?;
            Resolved {
                created: true,
                ..Resolved::existing(id)
            }
        }
        (None, _, Some(id)) => Resolved::existing(id),
        (Some(_), Some(a), Some(b)) if a == b => Resolved::existing(a),
        (Some(_), Some(a), None) => {
            let mut resolved = Resolved::existing(a);
            if let Some(k) = &other_key {
                resolved.dropped = attach(dir, a, k)?;
            }
            resolved
        }
        (Some(u), None, None) => {
            let id = dir.create()?;
            attach(dir, id, &user_key(u))?;
            if let Some(k) = &other_key {
                attach(dir, id, k)?;
            }
            Resolved {
                created: true,
                ..Resolved::existing(id)
            }
        }
        (Some(u), None, Some(b)) => {
            if dir.profile(b)?.user_id.is_some() {
                // The other identifier belongs to someone with another userId.
                let id = dir.create()?;
                attach(dir, id, &user_key(u))?;
                Resolved {
                    created: true,
                    conflict: true,
                    ..Resolved::existing(id)
                }
            } else {
                attach(dir, b, &user_key(u))?;
                Resolved::existing(b)
            }
        }
        (Some(_), Some(a), Some(b)) => {
            if dir.profile(b)?.user_id.is_some() {
                Resolved {
                    conflict: true,
                    ..Resolved::existing(a)
                }
            } else {
                let absorbed = dir.remove(b)?;
                for key in absorbed.identity_keys() {
                    dir.link(&key, a)?;
                }
                let dropped = dir.profile(a)?.merge(absorbed, retention);
                Resolved {
                    absorbed: Some(b),
                    dropped,
                    ..Resolved::existing(a)
                }
            }
        }
    }))
}

/// Links `key` to profile `id` and records the identifier on the profile; an anonymousId past
/// the profile's cap is neither (see `super::profile::MAX_ANONYMOUS_IDS`), and counted as dropped.
fn attach(dir: &mut impl Directory, id: u64, key: &str) -> Result<Dropped, StoreError> {
    let profile = dir.profile(id)?;
    if let Some(user) = key.strip_prefix("user:") {
        profile.user_id = Some(user.to_string());
    } else if let Some(anon) = key.strip_prefix("anon:") {
        if !profile.has_room_for_anonymous_id(anon) {
            return Ok(Dropped {
                anonymous_ids: 1,
                ..Dropped::default()
            });
        }
        profile.add_anonymous_id(anon);
    }
    dir.link(key, id)?;
    Ok(Dropped::default())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn keep() -> Retention {
        Retention::default()
    }

    /// The profile a message naming `ids` resolves to (it names someone).
    fn resolved(d: &mut Memory, ids: Identifiers) -> Resolved {
        resolve(d, ids, &keep()).unwrap().unwrap()
    }

    #[derive(Default)]
    struct Memory {
        index: HashMap<String, u64>,
        /// Every key looked up, in order.
        asked: Vec<String>,
        profiles: HashMap<u64, Profile>,
        next: u64,
    }

    impl Directory for Memory {
        fn lookup(&mut self, identity: &str) -> Result<Option<u64>, StoreError> {
            self.asked.push(identity.to_string());
            Ok(self.index.get(identity).copied())
        }
        fn link(&mut self, identity: &str, id: u64) -> Result<(), StoreError> {
            self.index.insert(identity.to_string(), id);
            Ok(())
        }
        fn profile(&mut self, id: u64) -> Result<&mut Profile, StoreError> {
            Ok(self.profiles.get_mut(&id).expect("profile exists"))
        }
        fn create(&mut self) -> Result<u64, StoreError> {
            self.next += 1;
            self.profiles.insert(self.next, Profile::new(self.next));
            Ok(self.next)
        }
        fn remove(&mut self, id: u64) -> Result<Profile, StoreError> {
            Ok(self.profiles.remove(&id).expect("profile exists"))
        }
    }

    fn ids<'a>(user: Option<&'a str>, anon: Option<&'a str>) -> Identifiers<'a> {
        Identifiers {
            user_id: user,
            anonymous_id: anon,
            previous_id: None,
        }
    }

    #[test]
    fn anonymous_history_joins_the_identified_profile() {
        let mut d = Memory::default();
        let anon = resolved(&mut d, ids(None, Some("a1")));
        assert!(anon.created);
        d.profile(anon.id)
            .unwrap()
            .traits
            .insert("seen".into(), true.into());
        let user = resolved(&mut d, ids(Some("u1"), None));
        assert_ne!(user.id, anon.id);
        // A message with both links them: the anonymous profile merges into the user's.
        let both = resolved(&mut d, ids(Some("u1"), Some("a1")));
        assert_eq!(both.id, user.id);
        assert_eq!(both.absorbed, Some(anon.id));
        assert!(!d.profiles.contains_key(&anon.id));
        let p = &d.profiles[&user.id];
        assert_eq!(p.traits["seen"], true);
        assert_eq!(p.anonymous_ids, ["a1"]);
        assert_eq!(d.index["anon:a1"], user.id);
        // From now on the anonymousId alone finds the user.
        assert_eq!(resolved(&mut d, ids(None, Some("a1"))).id, user.id);
    }

    #[test]
    fn an_anonymous_profile_learns_its_user_id() {
        let mut d = Memory::default();
        let anon = resolved(&mut d, ids(None, Some("a1")));
        let user = resolved(&mut d, ids(Some("u1"), Some("a1")));
        assert_eq!(user.id, anon.id);
        assert_eq!(d.profiles[&anon.id].user_id.as_deref(), Some("u1"));
    }

    #[test]
    fn two_user_ids_are_never_merged() {
        let mut d = Memory::default();
        let u1 = resolved(&mut d, ids(Some("u1"), Some("shared-device")));
        let u2 = resolved(&mut d, ids(Some("u2"), Some("shared-device")));
        assert!(u2.conflict);
        assert_ne!(u1.id, u2.id);
        assert_eq!(d.profiles[&u1.id].user_id.as_deref(), Some("u1"));
        assert_eq!(
            d.index["anon:shared-device"], u1.id,
            "the device stays with u1"
        );
        // Both profiles exist on their own; an alias between the two userIds is a conflict too.
        let alias = Identifiers {
            user_id: Some("u2"),
            anonymous_id: None,
            previous_id: Some("u1"),
        };
        let r = resolved(&mut d, alias);
        assert!(r.conflict);
        assert_eq!(d.profiles.len(), 2);
    }

    #[test]
    fn alias_links_a_previous_anonymous_id() {
        let mut d = Memory::default();
        let anon = resolved(&mut d, ids(None, Some("a1")));
        let user = resolved(&mut d, ids(Some("u1"), None));
        let alias = Identifiers {
            user_id: Some("u1"),
            anonymous_id: None,
            previous_id: Some("a1"),
        };
        let r = resolved(&mut d, alias);
        assert_eq!((r.id, r.absorbed), (user.id, Some(anon.id)));
        assert!(resolve(&mut d, ids(None, None), &keep()).unwrap().is_none());
    }

    /// The contract links a userId and an anonymousId that arrive on one message: an alias is one
    /// too. All three profiles end up one.
    #[test]
    fn an_alias_with_an_anonymous_id_links_all_three() {
        let mut d = Memory::default();
        let previous = resolved(&mut d, ids(None, Some("p1")));
        let device = resolved(&mut d, ids(None, Some("a1")));
        let user = resolved(&mut d, ids(Some("u1"), None));
        let alias = Identifiers {
            user_id: Some("u1"),
            anonymous_id: Some("a1"),
            previous_id: Some("p1"),
        };
        let r = resolved(&mut d, alias);
        assert_eq!(r.id, user.id);
        assert!(r.absorbed.is_some());
        assert_eq!(d.profiles.len(), 1, "{:?}", d.profiles.keys());
        assert!(!d.profiles.contains_key(&previous.id));
        assert!(!d.profiles.contains_key(&device.id));
        for key in ["user:u1", "anon:p1", "anon:a1"] {
            assert_eq!(d.index[key], user.id, "{key}");
        }
        let mut anonymous = d.profiles[&user.id].anonymous_ids.clone();
        anonymous.sort();
        assert_eq!(anonymous, ["a1", "p1"]);
        // New to all three: one profile with every identifier.
        let mut d = Memory::default();
        let r = resolved(&mut d, alias);
        assert!(r.created);
        assert_eq!(d.profiles.len(), 1);
        assert_eq!(d.index["anon:a1"], r.id);
        assert_eq!(d.index["anon:p1"], r.id);
    }

    /// Past its cap a profile does not take a new anonymousId: it is not linked (a message naming
    /// only it makes a profile of its own), and it is counted. What a profile lists is what is
    /// linked to it, so a merge later moves every link.
    #[test]
    fn past_the_cap_an_anonymous_id_is_not_linked_and_counted() {
        use crate::profiles::profile::MAX_ANONYMOUS_IDS;
        let mut d = Memory::default();
        let mut user = 0;
        for i in 0..MAX_ANONYMOUS_IDS {
            let r = resolve(&mut d, ids(Some("u1"), Some(&format!("a{i}"))), &keep());
            user = r.unwrap().unwrap().id;
        }
        let past = resolved(&mut d, ids(Some("u1"), Some("late")));
        assert_eq!(past.id, user);
        assert_eq!(past.dropped.anonymous_ids, 1);
        assert!(!d.index.contains_key("anon:late"), "not linked");
        assert_eq!(d.profiles[&user].anonymous_ids.len(), MAX_ANONYMOUS_IDS);
        let alone = resolved(&mut d, ids(None, Some("late")));
        assert_ne!(alone.id, user, "a profile of its own");
        // A message naming both merges them: that profile's anonymousId comes with it.
        let merged = resolved(&mut d, ids(Some("u1"), Some("late")));
        assert_eq!(merged.absorbed, Some(alone.id));
        assert_eq!(d.index["anon:late"], user);
        assert_eq!(d.profiles[&user].anonymous_ids.len(), MAX_ANONYMOUS_IDS + 1);
    }

    #[test]
    fn a_known_pair_needs_one_lookup() {
        let mut d = Memory::default();
        let first = resolved(&mut d, ids(Some("u1"), Some("a1")));
        d.asked.clear();
        let again = resolved(&mut d, ids(Some("u1"), Some("a1")));
        assert_eq!(again, Resolved::existing(first.id));
        assert_eq!(d.asked, ["user:u1"]);
        // A new anonymousId of the same user is looked up, and linked.
        d.asked.clear();
        let other = resolved(&mut d, ids(Some("u1"), Some("a2")));
        assert_eq!(other.id, first.id);
        assert_eq!(d.asked, ["user:u1", "anon:a2"]);
        assert_eq!(d.index["anon:a2"], first.id);
    }
}
