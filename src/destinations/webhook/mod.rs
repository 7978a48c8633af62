//! `type = "webhook"`: Segment-spec JSON posted to a URL, signed.
//!
//! - `settings.rs`: the keys of the file.
//! - `sender.rs`: one request per batch.

mod sender;
mod settings;

pub use sender::{signature, Webhook};
pub use settings::Settings;
