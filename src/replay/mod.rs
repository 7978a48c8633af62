//! `sluice replay`: putting messages that were set aside back on their way. Today: quarantined
//! messages once the tracking plan lets them through ([`quarantine`]). Replays run inside the
//! server (the log has one writer); the command asks it through the admin API.

pub mod quarantine;

pub use quarantine::{ReplayReport, ReplayRequest, Replayer};
