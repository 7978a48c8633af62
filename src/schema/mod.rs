//! The schema registry: `schemas/**/*.json`, each a JSON Schema (draft 2020-12) for the
//! `properties` of one track event (or of page/screen) or the `traits` of identify/group, named
//! by its `x-sluice` header:
//!
//! ```json
//! { "x-sluice": { "type": "track", "event": "Order Completed", "version": 2 }, "type": "object", ... }
//! ```
//!
//! - [`files`]: finding, reading and indexing the files; every version is kept.
//! - [`compat`]: what a new version breaks of the previous one, for `sluice check`.
//! - [`registry`]: each schema compiled once; the newest version of each event enforced.
//! - [`live`]: the registry in force, swapped whole on reload.
//! - [`watch`]: hot reload of the folder, keeping the last good version of a broken file.
//!
//! The registry decides; what happens to a message it calls invalid or unplanned is the ingest
//! stage's policy (`crate::ingest`). The lake's typed tables come from the same files.

pub mod compat;
pub mod files;
pub mod live;
pub mod registry;
pub mod watch;

pub use files::{SchemaFile, Schemas};
pub use live::Live;
pub use registry::{Registry, Verdict, Violation};
