//! Sluice: a self-hosted customer data platform and event router.
//!
//! Data flows one way through the modules:
//!
//! ```text
//! http  →  ingest  →  intake_log  →  consumers: lake (Parquet), dedup runs,
//!                          ↑                  audience (profiles → segments),
//!                          │                  destinations (one each: webhooks, Segment APIs)
//!                          └── Audience Entered / Exited ──┘
//! query  ←  lake
//! ```
//!
//! - [`http`]: the Segment-compatible HTTP edge and the operations endpoints.
//! - [`ingest`]: write keys, limits, field rules, rate limits, dedup; turns a body into records.
//! - [`entry`]: what one record of the log holds (shared by producers and consumers).
//! - [`intake_log`]: the durable, group-committed, segment-file log with consumer cursors.
//! - [`lake`]: the log consumer that writes Parquet to object storage exactly once, and compaction.
//! - [`query`]: DataFusion SQL over the lake.
//! - [`replay`]: re-admitting quarantined messages once the plan lets them through.
//! - [`schema`]: the schema files in `schemas/` (the lake's typed tables come from them).
//! - [`audience`]: the profile stage: applies messages to profiles, evaluates segments, emits
//!   changes back into the log.
//! - [`profiles`]: the profile, identity resolution, the embedded store.
//! - [`segments`]: segment files, the Rhai sandbox and rule API, evaluation.
//! - [`destinations`]: destination files, routing, the delivery engine, queue and dead letter.
//! - [`app`]: the wiring, and the only module that knows the whole chain.
//! - [`supervisor`]: starts a failed stage again, counts it, sets aside what it keeps failing on.
//! - [`config`], [`diagnostic`], [`metrics`], [`clock`], [`commands`], [`text`]: around the flow.

/// `impl From<E> for $error` for each `E` listed, keeping only the message: for the errors of
/// stores whose callers report them rather than match on them.
macro_rules! error_from {
    ($error:ident: $($t:ty),* $(,)?) => {$(
        impl From<$t> for $error {
            fn from(e: $t) -> Self {
                $error(e.to_string())
            }
        }
    )*};
}

pub mod app;
pub mod audience;
pub mod clock;
pub mod commands;
pub mod config;
pub mod destinations;
pub mod diagnostic;
pub mod entry;
pub mod folder_watch;
#[doc(hidden)]
pub mod fuzz;
pub mod http;
pub mod ingest;
pub mod intake_log;
pub mod lake;
pub mod metrics;
pub mod profiles;
pub mod query;
pub mod replay;
pub mod schema;
pub mod segments;
pub mod supervisor;
pub mod text;
pub mod thread_priority;
