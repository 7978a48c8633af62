//! Segments: `segments/*.toml` files, each a Rhai rule over one profile, compiled once and
//! evaluated in real time by the profile stage (`crate::profile_stage`).
//!
//! - [`files`]: reading a segment file (pure; every problem with its place).
//! - [`sandbox`]: the one function that builds a Rhai engine, with every limit set.
//! - [`api`]: what a rule sees (`user`, `event`, durations), and how time conditions note the
//!   moment they flip.
//! - [`analysis`]: what a rule reads, to evaluate on a message only the rules it can affect.
//! - [`native`]: rules of the common shapes, evaluated without Rhai (the same answers).
//! - [`rules`]: the compiled set and the evaluation of one profile.
//! - [`cases`]: the files' `[[test]]` cases, run by `sluice check`.
//! - [`watch`]: hot reload, keeping the last good version of a broken file.
//!
//! This module reads profiles and decides memberships; it never stores or emits anything.

pub mod analysis;
pub mod api;
pub mod cases;
pub mod files;
pub mod native;
pub mod rules;
pub mod sandbox;
pub mod watch;

pub use rules::{SegmentSet, Transition, Trigger};
