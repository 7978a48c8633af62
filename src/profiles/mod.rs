//! Profiles: one per person, with identity resolution, kept in an embedded durable store.
//!
//! ## The store
//! The profile stage needs point reads and writes by key, a few ordered scans (members of a
//! segment, due timers, all profiles for a backfill), and several tables changed atomically
//! together with the intake-log offset they reflect. fjall, an LSM tree in pure Rust, gives that
//! with atomic batches across keyspaces and snapshots, and writes a save's scattered profiles
//! several times cheaper than the B-tree (redb) used before: figures and reasons in [`store`].
//! Its block cache is bounded, so memory does not grow with the number of profiles.
//!
//! - [`profile`]: the profile itself, applying a message and merging two profiles (pure).
//! - [`history`]: a profile's recent occurrences, per event name, for windowed rules.
//! - [`identity`]: which profile a message belongs to, linking and merging identifiers.
//! - [`memberships`]: a profile's segment memberships, laid out by the loaded segments.
//! - [`codec`]: a profile's stored encoding; [`dictionary`]: the names it writes by number.
//! - [`store`]: the keyspaces.
//!
//! This module knows nothing of rules or the intake log: `crate::profile_stage` drives it.

pub mod codec;
pub mod dictionary;
pub mod history;
pub mod identity;
pub mod memberships;
pub mod profile;
pub mod store;

pub use profile::{Millis, Profile};
pub use store::ProfileStore;
