//! Sluice: a self-hosted customer data platform and event router.
//!
//! Data flows one way through the modules:
//!
//! ```text
//! http  →  ingest  →  intake_log  →  consumers: lake (Parquet), dedup runs,
//!                          ↑                  profile_stage (profiles → segments),
//!                          │                  destinations (one each: webhooks, Segment APIs)
//!                          └── Audience Entered / Exited ──┘
//! query  ←  lake
//! ```
//!
//! - [`http`]: the Segment-compatible HTTP edge and the operations endpoints.
//! - [`admin`]: the operator's API (`/admin/*`), over narrow views of the stages.
//! - [`ingest`]: write keys, limits, field rules, rate limits; turns a body into records.
//! - [`intake_log`]: the durable, group-committed, segment-file log with consumer cursors, and its
//!   one idempotent append (the dedup lives here).
//! - [`vocabulary`]: the words every stage shares (message types, times, reserved names);
//!   [`entry`]: what one record of the log holds.
//! - [`lake`]: the log consumer that writes Parquet to object storage exactly once, and compaction.
//! - [`query`]: DataFusion SQL over the lake.
//! - [`replay`]: re-admitting quarantined messages once the plan lets them through.
//! - [`schema`]: the schema files in `schemas/` (the lake's typed tables come from them).
//! - [`profile_stage`]: the `profiles` stage: applies messages to profiles, evaluates segments, emits
//!   changes back into the log.
//! - [`profiles`]: the profile, identity resolution, the embedded store.
//! - [`segments`]: segment files, the rule API, evaluation.
//! - [`script`]: the one sandboxed Rhai engine (limits, JSON values, error positions) that segment
//!   rules and destination filters and transforms run on.
//! - [`destinations`]: destination files, routing, the delivery engine, queue and dead letter.
//! - [`app`]: the wiring, and the only module that knows the whole chain.
//! - [`supervisor`]: starts a failed stage again, counts it, sets aside what it keeps failing on.
//! - [`config`], [`diagnostic`], [`metrics`], [`clock`], [`commands`], [`text`],
//!   [`folder_watch`], [`thread_priority`]: around the flow.
//!
//! ## Layers
//!
//! A module uses only modules of the layers below its own, so imports follow the flow: the edge
//! reaches down to the log, consumers reach the log and what they derive from, and nothing
//! downstream reaches back up to the edge. `tests/it/layering.rs` checks this list against every
//! `crate::` path on each `cargo test` (test code may reach across, to drive a module as the server
//! does).
//!
//! ```text
//! wiring        app commands fuzz
//! edge          admin
//!               http
//! admission     replay
//!               ingest
//! consumers     profile_stage destinations
//!               query
//!               lake
//! rules         segments
//!               profiles schema
//! the log       intake_log
//! around        config supervisor folder_watch script
//!               entry diagnostic
//! words         vocabulary text clock metrics thread_priority
//! ```

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

pub mod admin;
pub mod app;
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
pub mod profile_stage;
pub mod profiles;
pub mod query;
pub mod replay;
pub mod schema;
pub mod script;
pub mod segments;
pub mod supervisor;
pub mod text;
pub mod thread_priority;
pub mod vocabulary;
