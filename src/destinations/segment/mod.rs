//! `type = "segment"`: batches forwarded to any Segment-compatible API (Segment, RudderStack,
//! another Sluice) at `<url>/v1/batch`, with the write key as HTTP Basic user.
//!
//! - `settings.rs`: the keys of the file.
//! - `sender.rs`: one request per batch.

mod sender;
mod settings;

pub use sender::SegmentApi;
pub use settings::Settings;
